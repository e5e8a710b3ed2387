"""RL rollouts through vLLM against transformers generate, on the real model (SmolLM2-135M-Instruct) on this CPU.

    python bench/bench_vllm_rollout.py                     # PPO and GRPO, both backends (about 20 minutes here)
    python bench/bench_vllm_rollout.py --parts ppo --updates 3

ppo:  RL_stage2.py PPO with --rollout_backend hf (transformers generate from the bf16 sampling copy of the policy,
      the CPU default) and with --rollout_backend vllm (a colocated vLLM engine, weights pushed after each
      update): generated tokens/s of the rollout (target 2x), episodes/s, and the time of an update, which for
      vLLM includes the weight push.
grpo: TRL's GRPO through RL_stage2.py --algorithm grpo, without and with vLLM: episodes/s by TRL's own step_time.

Each run is a child process of its own (a vLLM engine holds process-wide state); each figure is the median over
the timed updates, the first being a warm-up left out. The engine's start-up (one to two minutes here, mostly
compilation, later starts reuse vLLM's cache) is reported apart.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_real_model import rl_flags  # noqa: E402
from huatuo.pretrained import smollm2_instruct  # noqa: E402
from huatuo.report import read_jsonl  # noqa: E402

ROLLOUT_TARGET = 2.0
BACKENDS = ("hf", "vllm")


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=("ppo", "grpo"), default=["ppo", "grpo"])
    parser.add_argument("--model", default=None, help="Model folder (default: the converted SmolLM2).")
    parser.add_argument("--prompts_per_update", type=int, default=8, help="Episodes per update.")
    parser.add_argument("--response_length", type=int, default=128, help="Tokens per response.")
    parser.add_argument("--updates", type=int, default=4, help="Updates per run; the first is a warm-up.")
    return parser.parse_args()


def run(flags: list[str], log: Path) -> float:
    """RL_stage2.py in a child process; its wall time."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "RL_stage2.py", *flags], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    if done.returncode:
        raise SystemExit(f"RL_stage2.py failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def bench_ppo(model: Path, work: Path, args) -> None:
    results = {}
    for backend in BACKENDS:
        out = work / f"ppo_{backend}"
        wall = run(
            rl_flags(model, out, args, "ppo") + ["--rollout_backend", backend], work / f"ppo_{backend}.log"
        )
        rows = read_jsonl(out / "metrics.jsonl")
        timed = rows[1:]
        results[backend] = {
            "tokens/s": statistics.median(
                r["val/response_length"] * args.prompts_per_update / r["time/generate"] for r in timed
            ),
            "episodes/s": statistics.median(r["eps"] for r in timed),
            "update s": statistics.median(r["time/update"] for r in timed),
            "start s": wall - sum(args.prompts_per_update / r["eps"] for r in rows),
        }
    print(
        f"\nPPO on {model.name}: {args.prompts_per_update} episodes per update, response_length "
        f"{args.response_length}, {args.updates - 1} timed updates"
    )
    for backend, r in results.items():
        print(
            f"  {backend:<5} rollout {r['tokens/s']:6.1f} generated tokens/s, {r['episodes/s']:.3f} episodes/s, "
            f"update {r['update s']:.1f} s, start-up and saving {r['start s']:.0f} s"
        )
    ratio = results["vllm"]["tokens/s"] / results["hf"]["tokens/s"]
    print(f"  rollout generation vllm / hf: {ratio:.2f}x (target {ROLLOUT_TARGET}x)")
    eps = results["vllm"]["episodes/s"] / results["hf"]["episodes/s"]
    print(f"  PPO episodes/s vllm / hf: {eps:.2f}x")


def bench_grpo(model: Path, work: Path, args) -> None:
    results = {}
    for backend in BACKENDS:
        out = work / f"grpo_{backend}"
        flags = rl_flags(model, out, args, "grpo") + ["--num_generations", "4", "--logging_steps", "1"]
        flags += ["--num_ppo_epochs", "1", "--rollout_backend", backend]
        wall = run(flags, work / f"grpo_{backend}.log")
        rows = [r for r in read_jsonl(out / "metrics.jsonl") if "step_time" in r][1:]
        results[backend] = (args.prompts_per_update / statistics.median(r["step_time"] for r in rows), wall)
    print(
        f"\nGRPO (TRL) on {model.name}: {args.prompts_per_update} episodes per step, 4 generations per prompt"
    )
    for backend, (eps, wall) in results.items():
        print(f"  {backend:<5} {eps:.3f} episodes/s over the timed steps; whole run {wall:.0f} s")
    print(f"  GRPO episodes/s vllm / hf: {results['vllm'][0] / results['hf'][0]:.2f}x")


def main(args):
    model = Path(args.model) if args.model else smollm2_instruct()
    with tempfile.TemporaryDirectory(prefix="bench_vllm_") as scratch:
        if "ppo" in args.parts:
            bench_ppo(model, Path(scratch), args)
        if "grpo" in args.parts:
            bench_grpo(model, Path(scratch), args)


if __name__ == "__main__":
    main(parse_args())
