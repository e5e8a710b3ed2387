"""Training speed on the real pretrained model (SmolLM2-135M-Instruct) on this CPU, each figure beside its baseline.

    python bench/bench_real_model.py                  # sft, ppo and grpo (about 15 minutes on 2 cores)
    python bench/bench_real_model.py --parts sft      # one part

sft:  the bare forward and backward of the model under bf16 autocast at batch 4 x 512 tokens (the ideal), against
      a whole SFT_stage1.py step at the same shapes (forward, backward, clipping, AdamW, logging), with the loss
      from the model's own head (what SFT_stage1.py does on a CPU) and with TRL's fused head (what it did
      before). Target: the SFT step at 0.8 of the bare throughput or more. fp32 figures are printed beside.
ppo:  PPO updates on the demo's problems, rollout in fp32 (before: no bf16 on a CPU) against bf16 autocast
      (now the default where the CPU has bf16 instructions): generated tokens/s (target 1.5x), episodes/s and
      where an update's time goes.
grpo: TRL's GRPO through RL_stage2.py --algorithm grpo at the same response length, episodes/s beside ours.

Runs of the two sides alternate where they are compared, so that load from other work falls on both; each
figure is the median over the timed steps, the first step of every run being a warm-up left out.
"""

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM  # noqa: E402

import RL_stage2  # noqa: E402
import SFT_stage1  # noqa: E402
from huatuo.pretrained import smollm2_instruct  # noqa: E402
from huatuo.report import read_jsonl  # noqa: E402

SFT_TARGET = 0.8
ROLLOUT_TARGET = 1.5


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=("sft", "ppo", "grpo"), default=["sft", "ppo", "grpo"])
    parser.add_argument("--model", default=None, help="Model folder (default: the converted SmolLM2).")
    parser.add_argument("--batch", type=int, default=4, help="SFT examples per step.")
    parser.add_argument("--seq_len", type=int, default=512, help="SFT tokens per example.")
    parser.add_argument("--steps", type=int, default=4, help="SFT steps per run; the first is a warm-up.")
    parser.add_argument("--prompts_per_update", type=int, default=8, help="PPO/GRPO episodes per update.")
    parser.add_argument("--response_length", type=int, default=128, help="PPO/GRPO tokens per response.")
    parser.add_argument("--updates", type=int, default=3, help="PPO updates per run; the first is a warm-up.")
    return parser.parse_args()


@contextlib.contextmanager
def precision(bf16: bool):
    """The precision `accelerate launch --mixed_precision` would ask the SFT script for."""
    with mock.patch.dict(os.environ, {"ACCELERATE_MIXED_PRECISION": "bf16" if bf16 else "no"}):
        yield


# ------------------------------------------------------------------------------------------------ SFT
def bare_tokens_per_second(model_path: Path, args, bf16: bool) -> float:
    """Forward and backward alone, on random tokens, with the loss from the model's own head."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.randint(100, model.config.vocab_size, (args.batch, args.seq_len))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return args.batch * args.seq_len / statistics.median(seconds[1:])


def sft_data(path: Path, args) -> None:
    """Examples long enough that each keeps exactly seq_len tokens after truncation: every batch is batch x seq_len."""
    items = json.loads((ROOT / "data" / "demo_data.json").read_text(encoding="utf-8"))
    rows = [
        {
            "Question": item["Question"],
            "Complex_CoT": " ".join([item["Complex_CoT"]] * (1 + 2 * args.seq_len // 300)),
            "Response": item["Response"],
        }
        for item in items
    ]
    path.write_text(json.dumps(rows[: args.batch * args.steps]), encoding="utf-8")


def sft_tokens_per_second(
    model_path: Path, data: Path, work: Path, args, bf16: bool, fused_head: bool
) -> float:
    """Tokens per second of whole SFT_stage1.py steps, from its own per-step metrics.jsonl."""
    flags = [
        "--model_path", str(model_path), "--data_path", str(data), "--n_epochs", "1",
        "--train_bsz_per_gpu", str(args.batch), "--gradient_accumulation_steps", "1",
        "--max_seq_len", str(args.seq_len), "--output_dir", str(work / "ckpts"), "--log_dir", str(work / "logs"),
        "--report_to", "none", "--logging_steps", "1", "--max_ckpts", "1", "--learning_rate", "1e-5",
    ]  # fmt: skip
    devices = ("cuda", "xpu", "cpu") if fused_head else ("cuda", "xpu")
    with precision(bf16), mock.patch("huatuo.sft.FUSED_HEAD_DEVICES", devices):
        SFT_stage1.main(SFT_stage1.parse_args(flags))
    rows = [r for r in read_jsonl(work / "logs" / "sft_stage1" / "metrics.jsonl") if "tokens_per_second" in r]
    return statistics.median(r["tokens_per_second"] for r in rows[1:])


def bench_sft(model_path: Path, work: Path, args) -> None:
    data = work / "sft_data.json"
    sft_data(data, args)
    results = {}
    for bf16 in (True, False):
        label = "bf16" if bf16 else "fp32"
        results[f"bare {label}"] = bare_tokens_per_second(model_path, args, bf16)
        for fused in (False, True):
            name = f"SFT step {label}, {'TRL fused head' if fused else 'model head'}"
            results[name] = sft_tokens_per_second(
                model_path, data, work / name.replace(" ", "_"), args, bf16, fused
            )
    print(
        f"\nSFT on {model_path.name}, batch {args.batch} x {args.seq_len} tokens, {torch.get_num_threads()} threads"
    )
    for name, value in results.items():
        bare = results["bare bf16" if "bf16" in name else "bare fp32"]
        print(f"  {name:<36}{value:8.1f} tokens/s  ({value / bare:.2f} of bare)")
    ratio = results["SFT step bf16, model head"] / results["bare bf16"]
    print(f"  SFT step / bare forward+backward, bf16: {ratio:.2f} (target {SFT_TARGET})")
    print(
        f"  bf16 / fp32: bare {results['bare bf16'] / results['bare fp32']:.2f}x, SFT step "
        f"{results['SFT step bf16, model head'] / results['SFT step fp32, model head']:.2f}x"
    )


# ------------------------------------------------------------------------------------------------ PPO / GRPO
def rl_flags(model_path: Path, out: Path, args, algorithm: str) -> list[str]:
    return [
        "--model_name_or_path", str(model_path), "--value_model_path", str(model_path),
        "--reward_model_path", "rule", "--dataset_name", str(ROOT / "data" / "demo_data.json"),
        "--output_dir", str(out), "--algorithm", algorithm, "--response_length", str(args.response_length),
        "--temperature", "0.7", "--total_episodes", str(args.prompts_per_update * args.updates),
        "--per_device_train_batch_size", str(args.prompts_per_update // 2), "--gradient_accumulation_steps", "2",
        "--local_rollout_forward_batch_size", str(args.prompts_per_update), "--learning_rate", "1e-6",
        "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--eval_fraction", "0",
    ]  # fmt: skip


def ppo_run(model_path: Path, out: Path, args, bf16: bool) -> dict:
    flags = rl_flags(model_path, out, args, "ppo") + ["--bf16", str(bf16)]
    RL_stage2.main(RL_stage2.parse_args(flags))
    timed = read_jsonl(out / "metrics.jsonl")[1:]
    tokens = [r["val/response_length"] * args.prompts_per_update / r["time/generate"] for r in timed]
    return {
        "generated tokens/s": statistics.median(tokens),
        "episodes/s": statistics.median(r["eps"] for r in timed),
        **{
            k: statistics.median(r[f"time/{k}"] for r in timed)
            for k in ("generate", "rollout", "reward", "update")
        },
    }


def bench_ppo(model_path: Path, work: Path, args) -> dict:
    runs = {"fp32 (before)": ppo_run(model_path, work / "ppo_fp32", args, False)}
    runs["bf16 (default)"] = ppo_run(model_path, work / "ppo_bf16", args, True)
    print(
        f"\nPPO on {model_path.name}: {args.prompts_per_update} episodes per update, response_length "
        f"{args.response_length}, rule verifier, value model from the same checkpoint"
    )
    for name, r in runs.items():
        split = r["rollout"] + r["reward"] + r["update"]
        print(
            f"  {name:<15} generate {r['generated tokens/s']:6.1f} tokens/s, {r['episodes/s']:.3f} episodes/s; "
            f"per update: rollout {r['rollout']:.1f} s ({100 * r['rollout'] / split:.0f}%, of which sampling "
            f"{r['generate']:.1f} s), reward {r['reward']:.2f} s, update {r['update']:.1f} s "
            f"({100 * r['update'] / split:.0f}%)"
        )
    ratio = runs["bf16 (default)"]["generated tokens/s"] / runs["fp32 (before)"]["generated tokens/s"]
    print(f"  rollout generation bf16 / fp32: {ratio:.2f}x (target {ROLLOUT_TARGET}x)")
    return runs


def bench_grpo(model_path: Path, work: Path, args, ppo: dict | None) -> None:
    out = work / "grpo"
    flags = rl_flags(model_path, out, args, "grpo") + ["--num_generations", "4", "--logging_steps", "1"]
    start = time.perf_counter()
    RL_stage2.main(RL_stage2.parse_args(flags))
    wall = time.perf_counter() - start
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "step_time" in r]
    step = statistics.median(r["step_time"] for r in rows[1:]) if len(rows) > 1 else None
    per_step = args.prompts_per_update
    print(
        f"\nGRPO (TRL) on {model_path.name}: {per_step} episodes per step (4 generations per prompt), "
        f"response_length {args.response_length}"
    )
    if step:
        print(f"  {per_step / step:.3f} episodes/s over the timed steps ({step:.1f} s per step)")
    print(
        f"  {args.prompts_per_update * args.updates / wall:.3f} episodes/s over the whole run, loading included"
    )
    if ppo and step:
        ours = ppo["bf16 (default)"]["episodes/s"]
        print(f"  PPO (ours, bf16) / GRPO (TRL): {ours / (per_step / step):.2f}")


def main(args):
    logging.disable(logging.WARNING)
    model_path = Path(args.model) if args.model else smollm2_instruct()
    with tempfile.TemporaryDirectory(prefix="bench_real_") as scratch:
        work = Path(scratch)
        ppo = None
        if "sft" in args.parts:
            bench_sft(model_path, work, args)
        if "ppo" in args.parts:
            ppo = bench_ppo(model_path, work, args)
        if "grpo" in args.parts:
            bench_grpo(model_path, work, args, ppo)


if __name__ == "__main__":
    main(parse_args())
