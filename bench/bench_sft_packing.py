"""Supervised tokens per second of SFT with --packing against pad-to-longest batches.

Both modes train the tiny policy for one epoch on the demo data with the same batches (same seed), so they
see the same supervised tokens; the runs alternate so that load from other work on the machine falls on both.
Torch runs on one thread by default: on a small shared CPU, thread contention otherwise swamps the difference.
Besides wall-clock throughput (train_runtime), supervised tokens per CPU-second of this process are printed,
which other work on the machine disturbs less. Target: packing faster than padding (ratio > 1).

    python bench/bench_sft_packing.py
    python bench/bench_sft_packing.py --rounds 5 --train_bsz_per_gpu 8
"""

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import SFT_stage1  # noqa: E402
from huatuo.tiny import build_tiny_models  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data_path", default=str(ROOT / "data" / "demo_data.json"), help="SFT data to train on."
    )
    parser.add_argument("--rounds", type=int, default=3, help="Runs of each mode, alternating.")
    parser.add_argument("--train_bsz_per_gpu", type=int, default=4, help="Examples per micro-batch.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2, help="Micro-batches per step.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    return parser.parse_args()


def run_once(policy, data_path, work, packing: bool, bsz: int, accumulation: int) -> tuple[float, float]:
    """Supervised tokens per wall second and per CPU second of one training run."""
    flags = [
        "--model_path", str(policy), "--data_path", data_path, "--n_epochs", "1",
        "--train_bsz_per_gpu", str(bsz), "--gradient_accumulation_steps", str(accumulation),
        "--output_dir", str(work / "ckpts"), "--log_dir", str(work / "logs"), "--report_to", "none",
        "--logging_steps", "1000",
    ]  # fmt: skip
    if packing:
        flags.append("--packing")
    cpu_start = time.process_time()
    metrics = SFT_stage1.main(SFT_stage1.parse_args(flags)).metrics
    cpu_seconds = time.process_time() - cpu_start
    supervised = metrics["supervised_tokens_per_second"] * metrics["train_runtime"]
    return metrics["supervised_tokens_per_second"], supervised / cpu_seconds


def main(args):
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        policy = build_tiny_models(tmp / "tiny")["policy"]
        wall = {"pad-to-longest": [], "packing": []}
        cpu = {"pad-to-longest": [], "packing": []}
        for round_index in range(args.rounds):
            for name, packing in (("pad-to-longest", False), ("packing", True)):
                per_wall, per_cpu = run_once(
                    policy,
                    args.data_path,
                    tmp / f"{name}-{round_index}",  # a fresh run folder: SFT never overwrites checkpoints
                    packing,
                    args.train_bsz_per_gpu,
                    args.gradient_accumulation_steps,
                )
                wall[name].append(per_wall)
                cpu[name].append(per_cpu)

    print(
        f"tiny policy, {args.data_path}, 1 epoch, batch {args.train_bsz_per_gpu} x {args.gradient_accumulation_steps}, "
        f"{args.rounds} alternating runs per mode, {args.threads} torch thread(s)"
    )
    for unit, results in (("supervised tokens/s", wall), ("supervised tokens/CPU-s", cpu)):
        median = {name: statistics.median(values) for name, values in results.items()}
        for name, values in results.items():
            runs = ", ".join(f"{v:.0f}" for v in values)
            print(f"{name:>15}: {median[name]:8.0f} {unit} (median of {runs})")
        ratio = median["packing"] / median["pad-to-longest"]
        print(f"packing / pad-to-longest = {ratio:.2f}x in {unit} (target > 1)")


if __name__ == "__main__":
    main(parse_args())
