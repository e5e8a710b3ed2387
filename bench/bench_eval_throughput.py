"""Questions per second of evaluation/eval.py against a local OpenAI-compatible server with 1 s latency.

A reasoning model's reply takes seconds, so eval.py keeps many one-prompt requests in flight; the
harness (prompt building, the client, saving each reply as it arrives, scoring) must then be limited
by the server, not by its own CPU. The benchmark builds an eval file of `--rounds * --concurrency`
questions, runs eval.py end to end (loading, asking, scoring, writing the outputs) with
`--concurrency` requests in flight, and compares the rate with the ideal concurrency / latency.
The server runs in its own process so that it does not compete with eval.py for the interpreter.

    python bench/bench_eval_throughput.py                        # 256 in flight, 10 rounds, 1 s latency
    python bench/bench_eval_throughput.py --concurrency 1024 --rounds 5

Target: at least 0.9 of the ideal 256 questions/s at concurrency 256.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evaluation import eval as ev  # noqa: E402

TARGET = 0.9


# A reply shaped like the trained model's: about 700 tokens of thinking, then a short final answer.
REPLY = (
    "## Thinking\n\n"
    + "The findings point to one mechanism, and the other options do not explain all of them. " * 45
    + "\n\n## Final Response\n\nThe presentation fits option B best. The answer is B."
)


def serve(latency: float, queue) -> None:
    """Run the scripted server in this (child) process, answering every request with REPLY."""
    from tests.stub_server import StubServer

    async def run() -> None:
        server = StubServer(lambda body: REPLY, latency=latency, record=False)
        await server.start()
        queue.put(server.base_url)
        await asyncio.Event().wait()

    asyncio.run(run())


def start_server(latency: float) -> tuple[multiprocessing.Process, str]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=serve, args=(latency, queue), daemon=True)
    proc.start()
    return proc, queue.get(timeout=60)


def eval_file(path: Path, count: int) -> None:
    """`count` four-option questions of realistic length, split over two sources."""
    stem = "A 45-year-old patient presents with fatigue and a laboratory finding described at length. " * 6
    items = [
        {
            "question": f"{stem}Question {i}: which option is correct?",
            "options": {letter: f"Option {letter} for question {i}" for letter in "ABCD"},
            "answer_idx": "ABCD"[i % 4],
            "answer": f"Option {'ABCD'[i % 4]} for question {i}",
        }
        for i in range(count)
    ]
    half = count // 2
    path.write_text(json.dumps({"Bench_A": items[:half], "Bench_B": items[half:]}), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=10, help="questions = rounds * concurrency")
    parser.add_argument("--latency", type=float, default=1.0, help="seconds the server takes per reply")
    args = parser.parse_args()

    count = args.rounds * args.concurrency
    proc, base_url = start_server(args.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench_eval.json"
            eval_file(path, count)
            argv = [
                "--model_name",
                "bench",
                "--eval_file",
                str(path),
                "--base_url",
                base_url,
                "--api",
                "chat",
            ]
            argv += ["--concurrency", str(args.concurrency), "--max_retries", "0", "--output_dir", tmp]
            start = time.perf_counter()
            # The per-source table is not the point here; keep the benchmark's output to its figures.
            with contextlib.redirect_stdout(io.StringIO()):
                summary = ev.main(ev.parse_args(argv))
            elapsed = time.perf_counter() - start
    finally:
        proc.kill()
        proc.join()

    failed = sum(m["failed_items"] for m in summary["sources"].values())
    rate = count / elapsed
    ideal = args.concurrency / args.latency
    print(
        f"questions: {count}, concurrency: {args.concurrency}, server latency: {args.latency:g} s, failed: {failed}"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} cpus, load average {load} (other work on the machine slows both sides)")
    print(f"wall time: {elapsed:.2f} s (ideal {count / ideal:.2f} s)")
    print(
        f"throughput: {rate:.1f} questions/s, ideal {ideal:.1f}/s, ratio {rate / ideal:.3f} (target >= {TARGET})"
    )


if __name__ == "__main__":
    main()
