"""Throughput of huatuo.llm.LLMClient against a local OpenAI-compatible server with 1 s latency.

Real API calls take seconds, so a large run keeps hundreds of requests in flight; the client must
then be limited by the server, not by its own CPU. For each concurrency C the client sends
`rounds * C` chat requests with C in flight; the ideal rate is C / latency. The server runs in its
own process so that the CPU time printed is the client's alone.

    python bench/bench_llm_client.py                      # C = 64, 256, 1024; latency 1 s
    python bench/bench_llm_client.py --concurrency 256 --rounds 10
    python bench/bench_llm_client.py --client openai           # the openai SDK, for comparison

Targets: completed/ideal >= 0.95 at 256 and >= 0.8 at 1024.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from huatuo.llm import LLMClient, LLMError  # noqa: E402

TARGETS = {256: 0.95, 1024: 0.8}


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.stub_server", "--latency", str(latency), "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    base_url = proc.stdout.readline().strip()
    if not base_url.startswith("http"):
        proc.kill()
        raise RuntimeError("stub server did not start")
    return proc, base_url


async def measure(base_url: str, concurrency: int, rounds: int, client: str) -> tuple[float, float, int]:
    """Seconds of wall time, client CPU seconds, and failures for rounds * concurrency requests."""
    messages = [{"role": "user", "content": "Which vitamin deficiency causes scurvy?"}]
    if client == "huatuo":
        llm = LLMClient(base_url, "bench", concurrency=concurrency, max_retries=0, timeout=60)
        send, errors = (lambda: llm.chat(messages, max_tokens=16)), (LLMError,)
    else:
        import openai

        llm = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
        semaphore = asyncio.Semaphore(concurrency)

        async def send():
            async with semaphore:
                return await llm.chat.completions.create(model="bench", messages=messages, max_tokens=16)

        errors = (openai.OpenAIError,)

    # One lane per slot sending its requests back to back, as huatuo.store.run_all drives the client.
    async def lane() -> int:
        failed = 0
        for _ in range(rounds):
            try:
                await send()
            except errors:
                failed += 1
        return failed

    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        failures = await asyncio.gather(*(lane() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        await llm.close()
    return wall, cpu, sum(failures)


def main(args: argparse.Namespace) -> None:
    proc, base_url = start_server(args.latency)
    try:
        print(
            f"client {args.client}  server {base_url}  latency {args.latency:g} s  "
            f"rounds {args.rounds}  cpus {os.cpu_count()}"
        )
        print(
            f"{'concurrency':>11} {'requests':>8} {'req/s':>8} {'ideal':>7} {'fraction':>8} "
            f"{'target':>6} {'cpu ms/req':>10} {'failed':>6}"
        )
        for concurrency in args.concurrency:
            wall, cpu, failed = asyncio.run(measure(base_url, concurrency, args.rounds, args.client))
            total = args.rounds * concurrency
            rate, ideal = total / wall, concurrency / args.latency
            target = TARGETS.get(concurrency)
            target_text = f"{target:.2f}" if target else "-"
            print(
                f"{concurrency:>11} {total:>8} {rate:>8.1f} {ideal:>7.0f} {rate / ideal:>8.3f} "
                f"{target_text:>6} {1000 * cpu / total:>10.3f} {failed:>6}"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[64, 256, 1024], help="requests in flight"
    )
    parser.add_argument("--rounds", type=int, default=5, help="requests per concurrency slot (default: 5)")
    parser.add_argument(
        "--client",
        choices=["huatuo", "openai"],
        default="huatuo",
        help="huatuo.llm.LLMClient (default), or the openai SDK's AsyncOpenAI for comparison",
    )
    parser.add_argument("--latency", type=float, default=1.0, help="server latency in seconds (default: 1)")
    main(parser.parse_args())
