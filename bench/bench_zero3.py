"""One process against two under DeepSpeed ZeRO-3, on the real model (SmolLM2-135M-Instruct) and this CPU.

    python bench/bench_zero3.py                          # sft and ppo (about 15 minutes on 2 cores)
    python bench/bench_zero3.py --parts sft --steps 3    # smaller

Each side trains on the same global batch: one plain process (no DeepSpeed) with every core, against 2 processes
under configs/cpu_zero3_2proc.yaml (gloo, one thread each, so the cores are shared the same way), both in fp32 (that
config's precision). ZeRO-3 splits the batch over the processes and gathers each layer's weights for every forward
and backward, so on one machine it trades speed for memory; on GPUs each process brings its own device.

sft: supervised tokens/s of whole SFT_stage1.py steps, from its metrics.jsonl (summed over processes).
ppo: episodes/s of RL_stage2.py updates (rule verifier, value model from the same checkpoint), from metrics.jsonl.
Each figure is the median over the timed steps, the first of every run being a warm-up left out.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_real_model import sft_data  # noqa: E402
from huatuo.pretrained import smollm2_instruct  # noqa: E402
from huatuo.report import read_jsonl  # noqa: E402

ZERO3_CONFIG = ROOT / "configs" / "cpu_zero3_2proc.yaml"
PROCESSES = 2


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=("sft", "ppo"), default=["sft", "ppo"])
    parser.add_argument("--model", default=None, help="Model folder (default: the converted SmolLM2).")
    parser.add_argument("--batch", type=int, default=4, help="SFT examples per step, over all processes.")
    parser.add_argument("--seq_len", type=int, default=256, help="SFT tokens per example.")
    parser.add_argument("--steps", type=int, default=4, help="SFT steps per run; the first is a warm-up.")
    parser.add_argument(
        "--prompts_per_update", type=int, default=8, help="PPO episodes per update, over all processes."
    )
    parser.add_argument("--response_length", type=int, default=64, help="PPO tokens per response.")
    parser.add_argument("--updates", type=int, default=3, help="PPO updates per run; the first is a warm-up.")
    parser.add_argument("--timeout", type=int, default=1800, help="Seconds before a run counts as hung.")
    args = parser.parse_args()
    for name in ("batch", "prompts_per_update"):
        if getattr(args, name) % (2 * PROCESSES):
            parser.error(f"--{name} must be a multiple of {2 * PROCESSES}, so both sides split it evenly")
    return args


def run(script: str, flags: list[str], processes: int, work: Path, timeout: int) -> None:
    """The stage script in one plain process, or under `accelerate launch` with the 2-process ZeRO-3 config."""
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "no", "WANDB_MODE": "disabled"}
    if processes == 1:
        command = [sys.executable, str(ROOT / script), *flags]
    else:
        env["OMP_NUM_THREADS"] = "1"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO3_CONFIG),
            str(ROOT / script), *flags,
        ]  # fmt: skip
    log = work / "run.log"
    with open(log, "w") as out:
        code = subprocess.run(
            command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    if code:
        raise RuntimeError(
            f"{script} with {processes} process(es) exited with {code}:\n{log.read_text()[-3000:]}"
        )


def sft_tokens_per_second(model: Path, data: Path, work: Path, args, processes: int) -> float:
    work.mkdir()
    flags = [
        "--model_path", str(model), "--data_path", str(data), "--n_epochs", "1",
        "--train_bsz_per_gpu", str(args.batch // processes), "--gradient_accumulation_steps", "1",
        "--max_seq_len", str(args.seq_len), "--output_dir", str(work / "ckpts"), "--log_dir", str(work / "logs"),
        "--report_to", "none", "--logging_steps", "1", "--max_ckpts", "1", "--learning_rate", "1e-5",
    ]  # fmt: skip
    run("SFT_stage1.py", flags, processes, work, args.timeout)
    rows = read_jsonl(work / "logs" / "sft_stage1" / "metrics.jsonl")
    return statistics.median(r["supervised_tokens_per_second"] for r in rows[1:])


def ppo_episodes_per_second(model: Path, work: Path, args, processes: int) -> float:
    work.mkdir()
    local = args.prompts_per_update // processes
    flags = [
        "--model_name_or_path", str(model), "--value_model_path", str(model), "--reward_model_path", "rule",
        "--dataset_name", str(ROOT / "data" / "demo_data.json"), "--output_dir", str(work / "out"),
        "--response_length", str(args.response_length), "--temperature", "0.7",
        "--total_episodes", str(args.prompts_per_update * args.updates), "--per_device_train_batch_size",
        str(local // 2), "--gradient_accumulation_steps", "2", "--local_rollout_forward_batch_size", str(local),
        "--num_ppo_epochs", "1", "--learning_rate", "1e-6", "--bf16", "False", "--save_strategy", "no",
        "--eval_strategy", "no", "--report_to", "none", "--eval_fraction", "0",
    ]  # fmt: skip
    run("RL_stage2.py", flags, processes, work, args.timeout)
    return statistics.median(r["eps"] for r in read_jsonl(work / "out" / "metrics.jsonl")[1:])


def main(args):
    model = Path(args.model) if args.model else smollm2_instruct()
    load = os.getloadavg()[0]
    print(f"{model.name} on {os.cpu_count()} cores, load average {load:.1f} at the start; fp32 on both sides")
    with tempfile.TemporaryDirectory(prefix="bench_zero3_") as scratch:
        work = Path(scratch)
        if "sft" in args.parts:
            data = work / "sft_data.json"
            sft_data(data, args)
            one = sft_tokens_per_second(model, data, work / "sft_1", args, 1)
            two = sft_tokens_per_second(model, data, work / "sft_2", args, PROCESSES)
            print(
                f"SFT step, batch {args.batch} x {args.seq_len} tokens: 1 process {one:.1f} supervised tokens/s, "
                f"{PROCESSES} processes under ZeRO-3 {two:.1f} ({two / one:.2f}x)"
            )
        if "ppo" in args.parts:
            one = ppo_episodes_per_second(model, work / "ppo_1", args, 1)
            two = ppo_episodes_per_second(model, work / "ppo_2", args, PROCESSES)
            print(
                f"PPO update, {args.prompts_per_update} prompts x {args.response_length} tokens, 1 PPO epoch: "
                f"1 process {one:.3f} episodes/s, {PROCESSES} processes under ZeRO-3 {two:.3f} ({two / one:.2f}x)"
            )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main(parse_args())
