"""Running stage commands as children that never outlive their parent: each in a process group of its own,
its output copied to a log file (and the console), the whole group stopped on Ctrl-C or SIGTERM. Also the
process tree of a running server, read from /proc, for measuring its memory and checking that it stopped."""

import os
import shlex
import signal
import subprocess
import sys
from contextlib import contextmanager, suppress
from pathlib import Path


class StageFailed(RuntimeError):
    pass


@contextmanager
def signals_deferred():
    """Hold off Ctrl-C and SIGTERM while cleaning up, so that a second Ctrl-C cannot leave a server running;
    one that arrived meanwhile is honoured once the cleanup is done."""
    received = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: received.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left of it after `grace` seconds."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # Kills the leader if it outlived the grace period, and any worker it left behind in its group.
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_logged(cmd: list[str], shown_cmd: str, log_path: Path, cwd: Path, env: dict, quiet: bool) -> None:
    """Run cmd in a new session, appending its output to log_path and, unless quiet, to the console.
    Raises StageFailed with the log's tail when it exits non-zero."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {shown_cmd}\n".encode())
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                log.write(chunk)
                log.flush()  # so that `tail -f log.txt` follows a quiet run as it goes
                if not quiet:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            returncode = proc.wait()
        except BaseException:
            with signals_deferred():
                stop_group(proc)
            raise
        finally:
            proc.stdout.close()
    if returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise StageFailed(
            f"`{shown_cmd}` exited with status {returncode}; log: {log_path}\n"
            + "\n".join("    " + line for line in tail)
        )


def process_tree(root: int) -> list[int]:
    """root and every live (not zombie) descendant of it, read from /proc; empty once root is gone."""
    children: dict[int, list[int]] = {}
    live = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) may hold spaces and parentheses: the fields after it are split.
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if state != "Z":
            live.add(int(entry.name))
            children.setdefault(int(ppid), []).append(int(entry.name))
    tree, todo = [], [root] if root in live else []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def tree_rss(root: int) -> int:
    """Resident bytes summed over root's process tree (pages shared between processes count in each)."""
    total = 0
    for pid in process_tree(root):
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def join_command(cmd: list[str]) -> str:
    """The command as a person would type it: the running interpreter shown as `python`."""
    return shlex.join(["python" if part == sys.executable else part for part in cmd])
