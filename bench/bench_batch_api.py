"""Batch mode of the search stage against the scripted Files and Batches server: batches per search round.

Runs search_for_complex_reasoning_path.py on N scripted problems at depth 3 (one attempt, efficient
search on). Problem i fails its first i % 5 verifications, so the rounds differ between problems and
the longest needs 11 calls (the initial CoT, 4 verifications, 3 refinements, the label refinement,
the natural rewrite and the final answer). The ideal is one batch per search round: as many batches as
the longest problem has calls. The same run in synchronous mode gives the call count to match and the
client CPU to compare with. The server runs in its own process so that the CPU time is the client's.

    python bench/bench_batch_api.py                      # 1000 problems, depth 3
    python bench/bench_batch_api.py --problems 200 --mode batch
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import search_for_complex_reasoning_path as search  # noqa: E402
from huatuo.items import ANSWER, QUESTION  # noqa: E402

_verifications: Counter = Counter()


def respond(body: dict) -> str:
    """The scripted model, run by the server process: problem i fails its first i % 5 verifications."""
    prompt = body["messages"][-1]["content"]
    if "<model_answer>" in prompt:
        pid = int(re.search(r"\[a(\d+)\]", prompt).group(1))
        _verifications[pid] += 1
        return "True" if _verifications[pid] > pid % 5 else "False"
    pid = re.search(r"\[q(\d+)\]", prompt).group(1)
    if "<thought_process>" in prompt:
        return json.dumps({"NaturalReasoning": f"Hmm, so for case {pid} it has to be this.\n\nYes."})
    if "<internal_thinking>" in prompt:
        return f"The answer for case {pid}."
    steps = [
        {"action": "Inner Thinking", "title": "Look", "content": f"Thinking about case {pid}."},
        {"action": "Final Conclusion", "content": f"A conclusion for case {pid}."},
        {"action": "Verification", "content": "Checked."},
    ]
    return json.dumps({"CoT": steps})


def start_server() -> tuple[subprocess.Popen, str]:
    # The server imports this file by module name to answer with respond().
    server = ["-m", "tests.batch_stub_server", "--port", "0", "--responder", "bench.bench_batch_api:respond"]
    proc = subprocess.Popen(
        [sys.executable, *server],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    base_url = proc.stdout.readline().strip()
    if not base_url.startswith("http"):
        proc.kill()
        raise RuntimeError("batch stub server did not start")
    return proc, base_url


def run(mode: str, problems: int, workdir: Path) -> dict:
    data = workdir / "problems.json"
    items = [{QUESTION: f"[q{i}] What explains case {i}?", ANSWER: f"[a{i}]"} for i in range(1, problems + 1)]
    data.write_text(json.dumps(items), encoding="utf-8")
    out = workdir / mode
    argv = ["--data_path", str(data), "--output_dir", str(out), "--model_name", "bench"]
    argv += ["--max_search_depth", "3", "--max_search_attempts", "1", "--num_process", str(problems)]
    if mode == "batch":
        argv += ["--batch_api", "--batch_window", "600", "--poll_interval", "0.05"]
    proc, base_url = start_server()
    try:
        # The run's own log (one line per batch status) is not the figure measured here.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            search.main(search.parse_args([*argv, "--api_url", base_url]))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    (path,) = out.glob("problems_CoT_search_[0-9]*.json")
    records = json.loads(path.read_text(encoding="utf-8"))
    calls = [len(r["llm_log"]) for r in records]
    batches = [
        len(json.loads(p.read_text())["requests"])
        for p in sorted((out / "problems_CoT_search_batches").glob("batch_*[0-9].json"))
    ]
    return {
        "kept": len(records),
        "requests": sum(calls),
        "rounds": max(calls),
        "batches": batches,
        "cpu": cpu,
        "wall": wall,
    }


def main(args: argparse.Namespace) -> None:
    modes = ["sync", "batch"] if args.mode == "both" else [args.mode]
    print(f"search of {args.problems} problems, depth 3, one attempt, efficient search")
    print(
        f"{'mode':>5} {'kept':>5} {'requests':>8} {'rounds':>6} {'batches':>7} {'cpu ms/req':>10} {'wall s':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            r = run(mode, args.problems, Path(tmp))
            batches = len(r["batches"]) if mode == "batch" else "-"
            print(
                f"{mode:>5} {r['kept']:>5} {r['requests']:>8} {r['rounds']:>6} {batches:>7} "
                f"{1000 * r['cpu'] / r['requests']:>10.3f} {r['wall']:>7.1f}"
            )
            if mode == "batch":
                print(f"requests per batch: {r['batches']}")
                print(f"batches / rounds: {len(r['batches']) / r['rounds']:.2f} (ideal 1.00)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--problems", type=int, default=1000, help="scripted problems to search (default: 1000)"
    )
    parser.add_argument(
        "--mode",
        choices=["both", "batch", "sync"],
        default="both",
        help="batch mode, synchronous mode, or both for comparison (default: both)",
    )
    main(parser.parse_args())
