"""The whole pipeline on data/demo_data.json, on one CPU, in a few minutes (what `make demo` runs).

    python demo.py                          # into demo_out/; a rerun skips the stages already done
    python demo.py --redo rl                # redo RL and the stages that build on it (eval)
    python demo.py --force                  # redo every stage
    OPENAI_API_KEY=sk-... python demo.py    # also construct and search 5 problems with gpt-4o
    API_URL=http://127.0.0.1:8000/v1 API_MODEL=Qwen2.5-7B-Instruct python demo.py  # a local server

Stages, each run as the command its banner prints (copy it to run the stage alone):
  models  build the tiny offline policy, value model and verifier (huatuo.tiny)
  api     only when OPENAI_API_KEY or API_URL is set: construct verifiable problems from the first 5 MCQs,
          then search reasoning paths for them (construct_verifiable_medical_problems.py,
          search_for_complex_reasoning_path.py); otherwise the reasoning bundled in data/ is used
  sft     fine-tune the tiny policy on the bundled complex chains of thought (SFT_stage1.py)
  rl      PPO from the SFT checkpoint with the tiny value model and the rule verifier (RL_stage2.py)
  eval    serve the RL checkpoint with evaluation/launch_sglang_server.sh --backend transformers, run
          evaluation/eval.py on evaluation/data/eval_sample.json, stop the server with kill_sglang_server.sh

Outputs under --out_dir (default demo_out/): args.json (this run's flags); one folder per stage with its
outputs, the stage's console output (log.txt) and, once finished, done.json (its summary; a rerun skips
the stage); report/ with summary.md (stage, items, wall time, key figure), sft_loss.png, ppo_reward.png
and eval.md.

Every child runs in a process group of its own; Ctrl-C (or SIGTERM) stops that group, and a server once
launched is always stopped through the kill script, so nothing is left running.
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from huatuo.report import first_last, markdown_table, plot_curve, read_jsonl
from huatuo.store import save_args, write_json_atomic

ROOT = Path(__file__).resolve().parent
DEMO_DATA = ROOT / "data" / "demo_data.json"
EVAL_SAMPLE = ROOT / "evaluation" / "data" / "eval_sample.json"
MCQ_KEYS = ("question", "options", "answer_idx", "answer")
PYTHON = sys.executable

STAGES = ("models", "api", "sft", "rl", "eval")
# A stage reruns whenever a stage it builds on reran; the API stage feeds nothing (SFT trains on the bundle).
NEEDS = {"models": (), "api": (), "sft": ("models",), "rl": ("models", "sft"), "eval": ("rl",)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run = parser.add_argument_group("what to run")
    run.add_argument("--out_dir", default="demo_out", help="Folder for every stage's outputs and the report.")
    run.add_argument("--force", action="store_true", help="Redo every stage, even those already done.")
    run.add_argument(
        "--redo",
        nargs="+",
        choices=STAGES,
        default=[],
        metavar="STAGE",
        help=f"Redo these stages and the stages that build on them ({', '.join(STAGES)}).",
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="Send the stages' own output only to <out_dir>/<stage>/log.txt, not to the console.",
    )

    api = parser.add_argument_group("API stage (runs only when OPENAI_API_KEY or API_URL is set)")
    api.add_argument(
        "--api_items", type=int, default=5, help="How many of the bundled MCQs to construct and search."
    )
    api.add_argument(
        "--api_model",
        default=os.environ.get("API_MODEL", "gpt-4o"),
        help="Model name sent to the server (default: $API_MODEL, else gpt-4o).",
    )
    api.add_argument(
        "--api_url",
        default=os.environ.get("API_URL"),
        help="OpenAI-compatible base URL (default: $API_URL, else OpenAI's). The key is read from "
        "OPENAI_API_KEY by the stage scripts and never written anywhere.",
    )

    sizes = parser.add_argument_group("stage sizes (small, so that the demo takes minutes on 2 CPU cores)")
    sizes.add_argument("--sft_epochs", type=int, default=2, help="SFT passes over the 32 bundled examples.")
    sizes.add_argument(
        "--sft_max_seq_len", type=int, default=1024, help="SFT examples keep their last N tokens."
    )
    sizes.add_argument("--rl_episodes", type=int, default=32, help="PPO episodes (4 per update).")
    sizes.add_argument("--response_length", type=int, default=48, help="Tokens per PPO rollout.")
    sizes.add_argument("--eval_max_new_tokens", type=int, default=32, help="Tokens per eval reply.")
    sizes.add_argument("--port", type=int, default=0, help="Port of the eval server (0: any free port).")
    args = parser.parse_args(argv)
    for name in (
        "api_items",
        "sft_epochs",
        "sft_max_seq_len",
        "rl_episodes",
        "response_length",
        "eval_max_new_tokens",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------------
# running children


class StageFailed(RuntimeError):
    pass


def shown(path) -> str:
    """A path as the banner shows it and the child receives it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


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


class Demo:
    def __init__(self, args):
        self.args = args
        self.out_dir = Path(args.out_dir).resolve()
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            WANDB_MODE="offline",
            TOKENIZERS_PARALLELISM="false",
            # Sized for a CPU; on a GPU machine configs/cpu.yaml's second process would claim cuda:1,
            # which a one-GPU machine lacks.
            CUDA_VISIBLE_DEVICES="",
        )

    def stage_dir(self, stage: str) -> Path:
        return self.out_dir / stage

    def run(self, cmd: list[str], stage: str) -> None:
        """Run cmd from the repository root in a new session, copying its output to the stage's log.txt."""
        shown_cmd = shlex.join(["python" if part == PYTHON else part for part in cmd])
        print(f"$ {shown_cmd}", flush=True)
        log_path = self.stage_dir(stage) / "log.txt"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {shown_cmd}\n".encode())
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                while chunk := os.read(proc.stdout.fileno(), 65536):
                    log.write(chunk)
                    if not self.args.quiet:
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
                f"`{shown_cmd}` exited with status {returncode}; log: {shown(log_path)}\n"
                + "\n".join("    " + line for line in tail)
            )


# ---------------------------------------------------------------------------------------------------------
# stages: each runs its commands and returns its summary (items, key figure, outputs), or None when skipped


def flags(**values) -> list[str]:
    """--name value pairs in the order given; True gives a bare switch."""
    out = []
    for name, value in values.items():
        out += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return out


def stage_models(demo: Demo) -> dict:
    out = demo.stage_dir("models")
    demo.run([PYTHON, "-m", "huatuo.tiny", *flags(out_dir=shown(out))], "models")
    params = {name: safetensors_params(out / name) for name in ("policy", "value", "verifier")}
    return {
        "items": "3 models",
        "figure": ", ".join(f"{name} {count / 1e6:.2f}M params" for name, count in params.items()),
        "outputs": {name: shown(out / name) for name in params},
    }


def stage_api(demo: Demo) -> dict | None:
    args = demo.args
    if not (os.environ.get("OPENAI_API_KEY") or args.api_url):
        print(
            "OPENAI_API_KEY and API_URL are not set: skipping construction and search, "
            "using the reasoning bundled in data/demo_data.json."
        )
        return None
    out = demo.stage_dir("api")
    items = json.loads(DEMO_DATA.read_text(encoding="utf-8"))[: args.api_items]
    mcqs_path = out / "demo_mcqs.json"
    write_json_atomic(mcqs_path, [{key: item[key] for key in MCQ_KEYS} for item in items])
    server = flags(model_name=args.api_model, **({"api_url": args.api_url} if args.api_url else {}))
    demo.run(
        [
            PYTHON,
            "construct_verifiable_medical_problems.py",
            *flags(data_path=shown(mcqs_path), output_dir=shown(out)),
            *server,
        ],
        "api",
    )
    constructed = newest(out.glob(f"{mcqs_path.stem}_final_*.json"), "merged construction file")
    kept = sum(r.get("status") == "kept" for r in json.loads(constructed.read_text(encoding="utf-8")))
    merged, searched = None, []
    if kept:  # the search passes over the items construction dropped
        search = flags(
            data_path=shown(constructed), output_dir=shown(out), max_search_attempts=1, max_search_depth=2
        )
        demo.run([PYTHON, "search_for_complex_reasoning_path.py", *search, *server], "api")
        pattern = re.compile(re.escape(constructed.stem) + r"_CoT_search_\d+\.json")
        candidates = out.glob(f"{constructed.stem}_CoT_search_*.json")
        merged = newest((p for p in candidates if pattern.fullmatch(p.name)), "merged search file")
        searched = json.loads(merged.read_text(encoding="utf-8"))
    return {
        "items": f"{len(items)} MCQs",
        "figure": f"{kept}/{len(items)} made verifiable, {len(searched)} with a verified reasoning path",
        "outputs": {"problems": shown(constructed), "reasoning": shown(merged) if merged else None},
    }


def stage_sft(demo: Demo) -> dict:
    args = demo.args
    out = demo.stage_dir("sft")
    launcher = (
        ["accelerate", "launch"]
        if shutil.which("accelerate")
        else [PYTHON, "-m", "accelerate.commands.launch"]
    )
    # configs/cpu.yaml runs 2 data-parallel processes over gloo: a global batch of 2 x 2 = 4 examples.
    # A free rendezvous port keeps two demos (or a demo beside the tests) from colliding.
    launch = [*launcher, *flags(config_file="configs/cpu.yaml", main_process_port=free_port())]
    sft = flags(
        model_path=shown(demo.out_dir / "models" / "policy"),
        data_path=shown(DEMO_DATA),
        output_dir=shown(out / "ckpts"),
        log_dir=shown(out / "logs"),
        experiment_name="demo",
        n_epochs=args.sft_epochs,
        train_bsz_per_gpu=2,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,  # a random 0.1M-parameter model needs a far larger step than 5e-6
        warmup_rates=0.1,
        max_seq_len=args.sft_max_seq_len,
        max_ckpts=1,
        packing=True,
        report_to="none",
    )
    demo.run([*launch, "SFT_stage1.py", *sft], "sft")
    metrics = out / "logs" / "demo" / "metrics.jsonl"
    loss = first_last(read_jsonl(metrics), "loss")
    return {
        "items": f"{count_sft_items(DEMO_DATA)} examples x {args.sft_epochs} epochs",
        "figure": f"loss {loss[0]:.2f} -> {loss[1]:.2f}" if loss else "no loss logged",
        "outputs": {
            "checkpoint": shown(newest_checkpoint(out / "ckpts" / "demo")),
            "metrics": shown(metrics),
        },
    }


def stage_rl(demo: Demo) -> dict:
    args = demo.args
    out = demo.stage_dir("rl") / "ppo"
    # 2 prompts x 2 accumulation steps = 4 episodes per update; the held-out split is scored at the end.
    updates = -(-args.rl_episodes // 4)
    ppo = flags(
        model_name_or_path=load_done(demo, "sft")["outputs"]["checkpoint"],
        value_model_path=shown(demo.out_dir / "models" / "value"),
        reward_model_path="rule",
        dataset_name=shown(DEMO_DATA),
        output_dir=shown(out),
        response_length=args.response_length,
        temperature=0.7,
        total_episodes=args.rl_episodes,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        local_rollout_forward_batch_size=4,
        learning_rate=1e-5,
        save_strategy="no",
        eval_strategy="steps",
        eval_steps=updates,
        report_to="none",
    )
    demo.run([PYTHON, "RL_stage2.py", *ppo], "rl")
    rows = read_jsonl(out / "metrics.jsonl")
    score, kl, held_out = (
        first_last(rows, key) for key in ("objective/scores", "objective/kl", "eval/mean_reward")
    )
    figure = f"mean score {score[0]:.2f} -> {score[1]:.2f}" if score else "no score logged"
    if kl:
        figure += f", kl {kl[1]:.3f}"
    if held_out:
        figure += f", held-out reward {held_out[1]:.2f}"
    return {
        "items": f"{args.rl_episodes} episodes, {updates} updates",
        "figure": figure,
        "outputs": {"checkpoint": shown(out), "metrics": shown(out / "metrics.jsonl")},
    }


def stage_eval(demo: Demo) -> dict:
    args = demo.args
    out = demo.stage_dir("eval")
    model = load_done(demo, "rl")["outputs"]["checkpoint"]
    port = args.port or free_port()
    server = flags(run_dir=shown(out / "server"))
    try:
        demo.run(
            [
                "bash",
                "evaluation/launch_sglang_server.sh",
                "--backend",
                "transformers",
                *server,
                "--timeout",
                "600",
                model,
                str(port),
            ],
            "eval",
        )
        evaluate = flags(
            model_name=model,
            eval_file=shown(EVAL_SAMPLE),
            port=port,
            max_new_tokens=args.eval_max_new_tokens,
            concurrency=4,
            seed=0,
            output_dir=shown(out / "results"),
        )
        demo.run([PYTHON, "evaluation/eval.py", *evaluate], "eval")
    finally:
        with signals_deferred():
            try:
                demo.run(
                    ["bash", "evaluation/kill_sglang_server.sh", *server, "--grace", "10", str(port)], "eval"
                )
            except StageFailed as err:
                print(f"warning: stopping the server failed: {err}", file=sys.stderr)
    summary_path = newest((out / "results").glob("*_summary.json"), "eval summary")
    sources = json.loads(summary_path.read_text(encoding="utf-8"))["sources"]
    items = sum(s["items"] for s in sources.values())
    correct = sum(s["correct"] for s in sources.values())
    return {
        "items": f"{items} questions, {len(sources)} sources",
        "figure": f"accuracy {correct / items:.1%} (last match)",
        "outputs": {"summary": shown(summary_path)},
    }


STAGE_FUNCTIONS = {
    "models": stage_models,
    "api": stage_api,
    "sft": stage_sft,
    "rl": stage_rl,
    "eval": stage_eval,
}
DESCRIPTIONS = {
    "models": "build the tiny offline policy, value model and verifier (seconds, deterministic)",
    "api": "construct verifiable problems from bundled MCQs and search reasoning paths through an LLM API",
    "sft": "fine-tune the tiny policy on the bundled complex chains of thought",
    "rl": "PPO from the SFT checkpoint with the tiny value model and the rule verifier",
    "eval": "serve the RL checkpoint on the CPU, evaluate it on the bundled sample, stop the server",
}


# ---------------------------------------------------------------------------------------------------------
# helpers


def newest(paths, what: str) -> Path:
    paths = sorted(paths, key=lambda p: p.stat().st_mtime)
    if not paths:
        raise StageFailed(f"the stage's command succeeded but wrote no {what}")
    return paths[-1]


def newest_checkpoint(run_dir: Path) -> Path:
    """The tfmr/ folder of the checkpoint with the highest global step under run_dir."""
    found = [
        (int(m.group(1)), p)
        for p in run_dir.glob("checkpoint-*/tfmr")
        if (m := re.search(r"-(\d+)$", p.parent.name))
    ]
    if not found:
        raise StageFailed(f"no checkpoint-*/tfmr folder in {shown(run_dir)}")
    return max(found)[1]


def safetensors_params(model_dir: Path) -> int:
    """Parameter count read from the safetensors headers, without loading any weights."""
    total = 0
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total


def count_sft_items(path: Path) -> int:
    keys = ("Question", "Complex_CoT", "Response")
    return sum(all(str(item.get(k) or "").strip() for k in keys) for item in json.loads(path.read_text()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def done_path(demo: Demo, stage: str) -> Path:
    return demo.stage_dir(stage) / "done.json"


def load_done(demo: Demo, stage: str) -> dict:
    return json.loads(done_path(demo, stage).read_text())


def banner(index: int, stage: str) -> None:
    line = "=" * 100
    print(f"\n{line}\n[{index}/{len(STAGES) - 1}] {stage}: {DESCRIPTIONS[stage]}\n{line}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# report


def write_report(demo: Demo, rows: list[list[str]]) -> Path:
    report = demo.out_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    table = markdown_table(["stage", "items", "wall time", "key figure", "status"], rows)
    (report / "summary.md").write_text(f"# Demo summary\n\n{table}\n", encoding="utf-8")
    print(f"\n{table}\n")
    plots = [
        ("sft", "metrics", "step", "loss", "sft_loss.png", "SFT training loss", "loss"),
        (
            "rl",
            "metrics",
            "episode",
            ["objective/scores", "objective/rlhf_reward"],
            "ppo_reward.png",
            "PPO mean score and KL-shaped reward per update",
            "reward",
        ),
    ]
    for stage, key, x_key, y_keys, name, title, ylabel in plots:
        if done_path(demo, stage).exists():
            metrics = read_jsonl(ROOT / load_done(demo, stage)["outputs"][key])
            plot_curve(metrics, x_key, y_keys, report / name, title, ylabel)
    if done_path(demo, "eval").exists():
        summary = json.loads((ROOT / load_done(demo, "eval")["outputs"]["summary"]).read_text())
        (report / "eval.md").write_text(eval_markdown(summary), encoding="utf-8")
    return report


def eval_markdown(summary: dict) -> str:
    rows = []
    for source, s in summary["sources"].items():
        rows.append(
            [
                source,
                s["items"],
                f"{s['accuracy']:.1%}",
                f"{s['accuracy_first']:.1%}",
                f"{s['accuracy_max_first_last']:.1%}",
                f"{s['no_answer_rate']:.0%}",
                s["failed_items"],
            ]
        )
    settings = summary.get("settings", {})
    return (
        f"# Evaluation of {settings.get('model')}\n\n"
        f"Eval file {settings.get('eval_file')} (sha256 {settings.get('eval_file_sha256')}), "
        f"temperature {settings.get('temperature')}, top_p {settings.get('top_p')}, "
        f"{settings.get('max_new_tokens')} new tokens.\n\n"
        + markdown_table(
            [
                "source",
                "items",
                "accuracy (last match)",
                "first match",
                "max(first, last)",
                "no answer",
                "failed",
            ],
            rows,
        )
        + "\n"
    )


# ---------------------------------------------------------------------------------------------------------


def plan(done: set[str], redo: set[str]) -> list[str]:
    """The stages to run, in order: those not done, those asked for, and every stage built on one of those."""
    todo: list[str] = []
    for stage in STAGES:
        if stage not in done or stage in redo or any(need in todo for need in NEEDS[stage]):
            todo.append(stage)
    return todo


def main(args) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # banners and errors (stderr) appear in order when piped
    demo = Demo(args)
    save_args(demo.out_dir / "args.json", args)
    todo = plan(
        {s for s in STAGES if done_path(demo, s).exists()}, set(STAGES) if args.force else set(args.redo)
    )
    rows = []
    where = "setup"
    try:
        status = 0
        try:
            # -------------------------------------------------------------- run the stages in order
            for index, stage in enumerate(STAGES):
                where = f"the {stage} stage"
                banner(index, stage)
                if stage not in todo:
                    done = load_done(demo, stage)
                    figure, wall = done["figure"], done["wall_s"]
                    print(f"done earlier ({wall:.1f} s): {figure}; skipping (--redo {stage} redoes it)")
                    rows.append(
                        [stage, done["items"], f"{done['wall_s']:.1f} s", done["figure"], "done earlier"]
                    )
                    continue
                done_path(demo, stage).unlink(missing_ok=True)
                # A rerun starts the stage afresh, except the API stage, whose scripts resume from their
                # per-item files so that calls already paid for are not made again (--redo api starts afresh).
                if stage != "api" or stage in args.redo or args.force:
                    shutil.rmtree(demo.stage_dir(stage), ignore_errors=True)
                start = time.monotonic()
                summary = STAGE_FUNCTIONS[stage](demo)
                wall = time.monotonic() - start
                if summary is None:
                    rows.append([stage, "-", "-", "skipped: no OPENAI_API_KEY or API_URL", "skipped"])
                    continue
                write_json_atomic(
                    done_path(demo, stage), {"stage": stage, "wall_s": round(wall, 1), **summary}
                )
                rows.append([stage, summary["items"], f"{wall:.1f} s", summary["figure"], "ran"])
                print(f"{stage} done in {wall:.1f} s: {summary['figure']}")
        except StageFailed as err:
            print(f"\nerror in {where}: {err}", file=sys.stderr)
            rows.append([stage, "-", "-", "failed (see log.txt)", "failed"])
            status = 1

        # ------------------------------------------------------------------ report
        where = "the report"
        report = write_report(demo, rows)
        print(f"report: {shown(report)}/ (summary.md, sft_loss.png, ppo_reward.png, eval.md)")
        return status
    except KeyboardInterrupt:
        print(
            f"\ninterrupted during {where}; every process it started is stopped. Run the same command again "
            "to go on from there.",
            file=sys.stderr,
        )
        return 130


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_interrupt)
    sys.exit(main(parse_args()))
