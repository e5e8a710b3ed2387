"""Full training against LoRA: peak resident memory and seconds per step, for PPO updates and SFT steps.

    python bench/bench_lora.py                                  # random weights in SmolLM2-135M's shape
    python bench/bench_lora.py --model_path data/models/SmolLM2-135M-Instruct --lora_r 16

Each run is RL_stage2.py (PPO, value model = the policy's weights, rule verifier) or SFT_stage1.py with the same
flags, once without and once with --lora_r, in a process of its own so that its peak resident set size
(ru_maxrss) is its alone. Without --model_path the models are built with random weights in the shape of
SmolLM2-135M (30 layers, width 576, a 49152-token vocabulary with tied embeddings): time and memory depend on the
shape, not on the values. PPO: seconds per update is the median over the updates after the first (rollout,
scoring and the PPO epochs); SFT: the training loop's wall time over its steps.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SmolLM2-135M's architecture (its config.json), built with random weights when no --model_path is given.
SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
)  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model_path", default=None, help="A causal LM folder; default: SmolLM2-135M's shape."
    )
    parser.add_argument("--lora_r", type=int, default=16, help="Rank of the LoRA runs.")
    parser.add_argument(
        "--ppo_updates", type=int, default=3, help="PPO updates per run (the first is warm-up)."
    )
    parser.add_argument("--prompts_per_update", type=int, default=4, help="PPO prompts per update.")
    parser.add_argument("--response_length", type=int, default=16, help="PPO tokens sampled per response.")
    parser.add_argument("--sft_steps", type=int, default=3, help="SFT optimizer steps per run.")
    parser.add_argument("--sft_batch", type=int, default=2, help="SFT examples per step.")
    parser.add_argument("--max_seq_len", type=int, default=128, help="SFT tokens per example at most.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in each run.")
    parser.add_argument("--child", choices=["ppo", "sft"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--child_lora", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_model(folder: Path) -> Path:
    """Random weights in SmolLM2-135M's shape, with the tiny models' tokenizer (ids past it decode to nothing)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from huatuo.tiny import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        **SMOLLM2_135M,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ one run, in its own process
def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    lora = ["--lora_r", str(args.child_lora)] if args.child_lora else []
    if args.child == "ppo":
        import RL_stage2

        flags = [
            "--model_name_or_path", args.model_path, "--reward_model_path", "rule",
            "--dataset_name", str(ROOT / "data" / "demo_data.json"), "--output_dir", str(work / "ppo"),
            "--response_length", str(args.response_length), "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", str(args.prompts_per_update // 2), "--num_ppo_epochs", "1",
            "--local_rollout_forward_batch_size", str(args.prompts_per_update),
            "--total_episodes", str(args.prompts_per_update * args.ppo_updates), "--learning_rate", "1e-5",
            "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", *lora,
        ]  # fmt: skip
        RL_stage2.main(RL_stage2.parse_args(flags))
        rows = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
        seconds = [args.prompts_per_update / row["eps"] for row in rows[1:]]
        return {"seconds_per_step": statistics.median(seconds), "steps": len(seconds)}
    import SFT_stage1

    # a data file of exactly sft_steps batches, so that the run is that many optimizer steps
    data = json.loads((ROOT / "data" / "demo_data.json").read_text(encoding="utf-8"))
    subset = work / "sft_data.json"
    subset.write_text(json.dumps(data[: args.sft_steps * args.sft_batch]), encoding="utf-8")
    flags = [
        "--model_path", args.model_path, "--data_path", str(subset), "--output_dir", str(work / "sft"),
        "--log_dir", str(work / "sft_logs"), "--report_to", "none", "--max_seq_len", str(args.max_seq_len),
        "--train_bsz_per_gpu", str(args.sft_batch), "--gradient_accumulation_steps", "1", "--n_epochs", "1", *lora,
    ]  # fmt: skip
    metrics = SFT_stage1.main(SFT_stage1.parse_args(flags)).metrics
    return {"seconds_per_step": metrics["train_runtime"] / args.sft_steps, "steps": args.sft_steps}


def run_child(stage: str, lora_r: int, model_path: str, args, work: Path) -> dict:
    """Run one stage in a child process; its result plus the child's own peak resident set size."""
    command = [
        sys.executable, __file__, "--child", stage, "--child_lora", str(lora_r), "--model_path", model_path,
        "--work", str(work), "--threads", str(args.threads), "--ppo_updates", str(args.ppo_updates),
        "--prompts_per_update", str(args.prompts_per_update), "--response_length", str(args.response_length),
        "--sft_steps", str(args.sft_steps), "--sft_batch", str(args.sft_batch), "--max_seq_len", str(args.max_seq_len),
    ]  # fmt: skip
    out = work / "result.json"
    env = {**os.environ, "BENCH_RESULT": str(out), "OMP_NUM_THREADS": str(args.threads)}
    # The child writes its own peak (RUSAGE_SELF) with its result: RUSAGE_CHILDREN here would be the maximum
    # over every child so far.
    proc = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} (lora_r={lora_r}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(args):
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as scratch:
        scratch = Path(scratch)
        model_path = args.model_path or str(build_model(scratch / "model"))
        results = {}
        for stage in ("ppo", "sft"):
            for lora_r in (0, args.lora_r):
                work = scratch / f"{stage}_{lora_r}"
                work.mkdir()
                results[stage, lora_r] = run_child(stage, lora_r, model_path, args, work)
    shape = args.model_path or "random weights, SmolLM2-135M shape"
    print(f"model: {shape}; {args.threads} threads")
    print("| stage | training | peak RSS (GiB) | seconds per step |")
    print("|---|---|---|---|")
    for stage in ("ppo", "sft"):
        for lora_r in (0, args.lora_r):
            r = results[stage, lora_r]
            name = "full" if lora_r == 0 else f"LoRA r={lora_r}"
            print(f"| {stage} | {name} | {r['peak_rss_gib']:.2f} | {r['seconds_per_step']:.2f} |")
        full, lora = results[stage, 0], results[stage, args.lora_r]
        print(
            f"{stage}: LoRA uses {full['peak_rss_gib'] - lora['peak_rss_gib']:.2f} GiB less at peak "
            f"({lora['peak_rss_gib'] / full['peak_rss_gib']:.2f}x) and is "
            f"{full['seconds_per_step'] / lora['seconds_per_step']:.2f}x as fast per step"
        )


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.child:
        result = child(parsed)
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        Path(os.environ["BENCH_RESULT"]).write_text(json.dumps(result))
    else:
        main(parsed)
