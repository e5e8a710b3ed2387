"""Format rate and accuracy of the demo's models on real benchmark questions, served on this CPU, and how fast
vLLM serves them against `transformers serve`.

    python bench/bench_eval_real.py --eval_dir PATH/TO/eval --per_source 25
    python bench/bench_eval_real.py --eval_dir PATH/TO/eval --models base=.cache/SmolLM2-135M-Instruct ppo=demo_out/rl/ppo
    python bench/bench_eval_real.py --eval_dir PATH/TO/eval --models base=.cache/SmolLM2-135M-Instruct --backend both

--eval_dir is a folder of benchmark files, each a JSON list of MCQs (`question`, `options`, `answer_idx`,
`answer`) named medqa.json, medmcqa.json, pubmedqa.json and mmlu_pro_medical.json (those present are used); the
first --per_source items of each are asked. The benchmark data is not part of this repository. By default the
models are those of the last `make demo` run (base, SFT and PPO, read from demo_out/*/done.json). Each model
is served with evaluation/launch_sglang_server.sh --backend BACKEND, asked through evaluation/eval.py
(greedy, --max_new_tokens), then stopped; the replies are scored by last-match accuracy and no-answer share (the
scorer) and by the RL reward's format check and rule verifier. A 135M model is near chance on these exams.

Each run prints questions/s and generated tokens/s over the asking alone (eval.py end to end, not the server's
start), the peak resident memory summed over the server's process tree (sampled every 0.5 s while asking; pages
two processes share count twice) and the load average. `--backend both` serves each model on transformers serve,
then on vLLM, with the same questions and settings, and prints the ratios. Targets: vLLM >= 3x the questions/s at
no more memory.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from huatuo.report import markdown_table, reply_scores  # noqa: E402
from huatuo.runner import tree_rss  # noqa: E402

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
    parser.add_argument(
        "--backend",
        choices=("transformers", "vllm", "both"),
        default="transformers",
        help="What serves the models (launch_sglang_server.sh --backend); both: each model on transformers serve "
        "then on vLLM, same questions and settings, with questions/s and peak server memory side by side.",
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


@contextmanager
def served(model: str, run_dir: str, backend: str = "transformers", server_flags: tuple[str, ...] = ()):
    """Serve `model` through the launch script for the block, then stop it with the kill script; server_flags
    go to the server after `--`. Yields the port and the server's process group id (its leader's pid)."""
    port = str(free_port())
    launch = ["bash", "evaluation/launch_sglang_server.sh", "--backend", backend, "--run_dir", run_dir]
    extra = ["--", *server_flags] if server_flags else []
    try:
        subprocess.run([*launch, "--timeout", "600", model, port, *extra], cwd=ROOT, check=True)
        yield port, int((Path(run_dir) / f"server_{port}.pid").read_text().split()[0])
    finally:
        subprocess.run(["bash", "evaluation/kill_sglang_server.sh", "--run_dir", run_dir, port], cwd=ROOT)


def ask(model: str, eval_file: Path, port: str, out: Path, args) -> tuple[dict, list[dict], float]:
    """eval.py's questions of eval_file to the server on `port`. Returns eval.py's per-source summary, its
    replies and the seconds spent asking."""
    start = time.perf_counter()
    # Greedy: transformers serve decodes greedily whatever the temperature for a model whose generation config
    # does (SmolLM2's), and temperature 0 makes vLLM do the same, so both backends write the same replies.
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
            "--temperature",
            "0",
            "--seed",
            "0",
            "--output_dir",
            str(out),
        ],  # fmt: skip
        cwd=ROOT,
        check=True,
    )
    seconds = time.perf_counter() - start
    summary_path = next(out.glob("*_summary.json"))
    replies = json.loads(
        summary_path.with_name(summary_path.name.removesuffix("_summary.json") + ".json").read_text()
    )
    return json.loads(summary_path.read_text())["sources"], replies, seconds


def evaluate(
    model: str,
    eval_file: Path,
    out: Path,
    args,
    server_flags: tuple[str, ...] = (),
    backend: str = "transformers",
) -> tuple[dict, list[dict], float]:
    """Serve `model`, ask eval.py's questions of eval_file, stop the server (see served and ask)."""
    with served(model, str(out / "server"), backend, server_flags) as (port, _):
        return ask(model, eval_file, port, out, args)


class PeakMemory:
    """Samples the resident memory summed over a process tree every `interval` seconds while in the block."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval, self.peak = root, interval, tree_rss(root)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, tree_rss(self.root))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


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
    backends = ("transformers", "vllm") if args.backend == "both" else (args.backend,)
    print(f"load average at the start: {load_average()}")
    rows, speed = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_eval_real_") as scratch:
        eval_file = Path(scratch) / "questions.json"
        eval_file.write_text(json.dumps(data), encoding="utf-8")
        for label, model in models.items():
            for backend in backends:
                out = Path(scratch) / label / backend
                launched = time.perf_counter()
                with served(model, str(out / "server"), backend) as (port, pgid):
                    ready = time.perf_counter() - launched
                    with PeakMemory(pgid) as memory:
                        sources, replies, seconds = ask(model, eval_file, port, out, args)
                items = sum(s["items"] for s in sources.values())
                tokens = sum(s["items"] * s["mean_completion_tokens"] for s in sources.values())
                speed[label, backend] = items / seconds, memory.peak
                print(
                    f"{label} on {backend}: {items} questions in {seconds:.0f} s ({items / seconds:.2f} questions/s, "
                    f"{tokens / seconds:.1f} generated tokens/s), peak server memory {memory.peak / 2**30:.2f} GiB, "
                    f"ready {ready:.0f} s after launch; load average {load_average()}"
                )
                rows += score_rows(f"{label} ({backend})" if len(backends) > 1 else label, sources, replies)
            if len(backends) > 1:
                (rate, peak), (vllm_rate, vllm_peak) = speed[label, "transformers"], speed[label, "vllm"]
                print(
                    f"{label}, vLLM against transformers serve: {vllm_rate / rate:.2f}x questions/s (target >= 3), "
                    f"{vllm_peak / peak:.2f}x peak memory (target <= 1)"
                )
    print(
        f"\n{sum(len(v) for v in data.values())} real questions per model, {args.max_new_tokens}-token replies, "
        f"{args.concurrency} in flight\n"
    )
    headers = ["model", "source", "items", "accuracy (last match)", "no answer", "format rate", "mean reward"]
    print(markdown_table(headers, rows))


def score_rows(label: str, sources: dict, replies: list[dict]) -> list[list]:
    """Per source and over all: last-match accuracy, no-answer share, format rate and mean RL reward."""
    scores = reply_scores(replies)
    items = sum(s["items"] for s in sources.values())
    rows = []
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
    return rows


if __name__ == "__main__":
    main(parse_args())
