"""Format rate and accuracy of the demo's models on real benchmark questions, served on this CPU.

    python bench/bench_eval_real.py --eval_dir PATH/TO/eval --per_source 25
    python bench/bench_eval_real.py --eval_dir PATH/TO/eval --models base=.cache/SmolLM2-135M-Instruct ppo=demo_out/rl/ppo

--eval_dir is a folder of benchmark files, each a JSON list of MCQs (`question`, `options`, `answer_idx`,
`answer`) named medqa.json, medmcqa.json, pubmedqa.json and mmlu_pro_medical.json (those present are used); the
first --per_source items of each are asked. The benchmark data is not part of this repository. By default the
models are those of the last `make demo` run (base, SFT and PPO, read from demo_out/*/done.json). Each model
is served with evaluation/launch_sglang_server.sh --backend transformers, asked through evaluation/eval.py
(greedy, --max_new_tokens), then stopped; the replies are scored by last-match accuracy and no-answer share (the
scorer) and by the RL reward's format check and rule verifier. A 135M model is near chance on these exams.
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from huatuo.report import markdown_table, reply_scores  # noqa: E402

SOURCES = {
    "medqa.json": "MedQA_USLME_test",
    "medmcqa.json": "MedMCQA_validation",
    "pubmedqa.json": "PubMedQA_test",
    "mmlu_pro_medical.json": "MMLU-Pro_Medical_test",
}


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eval_dir", required=True, help="Folder with the benchmark JSON files.")
    parser.add_argument("--per_source", type=int, default=25, help="Questions asked from each benchmark.")
    parser.add_argument("--max_new_tokens", type=int, default=512, help="Reply budget (the demo's).")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="Requests in flight. Mind memory: the CPU server with continuous batching reached 12.6-13.9 GB "
        "resident here on these questions, at 32 and at 8 in flight.",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="LABEL=PATH",
        help="Models to serve (default: the demo's).",
    )
    parser.add_argument(
        "--demo_dir", default=str(ROOT / "demo_out"), help="Where the demo's models are found."
    )
    return parser.parse_args()


def demo_models(demo_dir: Path) -> dict[str, str]:
    """The demo's models; its paths are relative to its repository, the folder holding demo_dir."""
    stages = ("models", "sft", "rl")
    done = {stage: json.loads((demo_dir / stage / "done.json").read_text()) for stage in stages}
    paths = {
        "base": done["models"]["outputs"]["policy"],
        "sft": done["sft"]["outputs"]["checkpoint"],
        "ppo": done["rl"]["outputs"]["checkpoint"],
    }
    return {label: str(demo_dir.resolve().parent / path) for label, path in paths.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def evaluate(
    model: str, eval_file: Path, out: Path, args, server_flags: tuple[str, ...] = ()
) -> tuple[dict, list[dict], float]:
    """Serve `model`, ask eval.py's questions of eval_file, stop the server; server_flags go to the server
    after `--`. Returns eval.py's per-source summary, its replies and the seconds spent asking."""
    port, run_dir = str(free_port()), str(out / "server")
    launch = ["bash", "evaluation/launch_sglang_server.sh", "--backend", "transformers", "--run_dir", run_dir]
    extra = ["--", *server_flags] if server_flags else []
    subprocess.run([*launch, "--timeout", "600", model, port, *extra], cwd=ROOT, check=True)
    start = time.perf_counter()
    try:
        subprocess.run(
            [
                sys.executable,
                "evaluation/eval.py",
                "--model_name",
                model,
                "--eval_file",
                str(eval_file),
                "--port",
                port,
                "--max_new_tokens",
                str(args.max_new_tokens),
                "--concurrency",
                str(args.concurrency),
                "--seed",
                "0",
                "--output_dir",
                str(out),
            ],  # fmt: skip
            cwd=ROOT,
            check=True,
        )
    finally:
        subprocess.run(["bash", "evaluation/kill_sglang_server.sh", "--run_dir", run_dir, port], cwd=ROOT)
    seconds = time.perf_counter() - start
    summary_path = next(out.glob("*_summary.json"))
    replies = json.loads(
        summary_path.with_name(summary_path.name.removesuffix("_summary.json") + ".json").read_text()
    )
    return json.loads(summary_path.read_text())["sources"], replies, seconds


def main(args):
    eval_dir = Path(args.eval_dir)
    data = {
        name: json.loads((eval_dir / file).read_text(encoding="utf-8"))[: args.per_source]
        for file, name in SOURCES.items()
        if (eval_dir / file).is_file()
    }
    if not data:
        raise SystemExit(f"{eval_dir}: none of {', '.join(SOURCES)} found")
    models = dict(m.split("=", 1) for m in args.models) if args.models else demo_models(Path(args.demo_dir))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_eval_real_") as scratch:
        eval_file = Path(scratch) / "questions.json"
        eval_file.write_text(json.dumps(data), encoding="utf-8")
        for label, model in models.items():
            sources, replies, seconds = evaluate(model, eval_file, Path(scratch) / label, args)
            scores = reply_scores(replies)
            items = sum(s["items"] for s in sources.values())
            for name, s in [*sources.items(), ("all", None)]:
                if s is None:
                    correct = sum(m["correct"] for m in sources.values())
                    no_answer = sum(m["no_answer_rate"] * m["items"] for m in sources.values()) / items
                    accuracy, count = correct / items, items
                else:
                    accuracy, no_answer, count = s["accuracy"], s["no_answer_rate"], s["items"]
                r = scores[name]
                rows.append(
                    [label, name, count, f"{accuracy:.1%}", f"{no_answer:.0%}", f"{r['format_rate']:.2f}",
                     f"{r['mean_reward']:.3f}"]
                )  # fmt: skip
            print(f"{label}: {items} questions in {seconds:.0f} s ({items / seconds:.2f} questions/s)")
    print(
        f"\n{sum(len(v) for v in data.values())} real questions per model, {args.max_new_tokens}-token greedy replies\n"
    )
    headers = ["model", "source", "items", "accuracy (last match)", "no answer", "format rate", "mean reward"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main(parse_args())
