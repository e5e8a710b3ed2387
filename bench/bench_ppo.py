"""PPO throughput on the tiny offline models: episodes per second and where an update's time goes.

    python bench/bench_ppo.py                       # 8 prompts per update, 64-token responses, 4 updates
    python bench/bench_ppo.py --response_length 128 --prompts_per_update 16

Rollout is sampling plus the policy, reference and value forward passes over the samples; reward is the
verifier (the tiny 2-label classifier, run on every response as it is once the policy writes the
Thinking/Final Response layout); update is GAE and the PPO epochs. The first update warms up and is left
out. The target is the rate at which the demo's PPO step (16 episodes) fits in half a minute.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from huatuo.ppo import PPOConfig  # noqa: E402
from huatuo.ppo_trainer import PPOTrainer  # noqa: E402
from huatuo.reward import ClassifierVerifier, RewardFunction  # noqa: E402
from huatuo.tiny import build_tiny_models  # noqa: E402

TARGET_EPS = 16 / 30


class VerifierOnEveryResponse:
    """The classifier verifier on every response, skipping the format check that random text would fail."""

    def __init__(self, path):
        self.verifier = ClassifierVerifier(str(path), device="cpu")
        self.levels = RewardFunction("rule")

    def judge(self, responses, references):
        return self.verifier(responses, references)

    def rewards(self, judgements):
        return self.levels.rewards(judgements)


def main(args):
    torch.manual_seed(0)
    # the tiny models and the run folder are scratch: removed when the bench ends
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as scratch:
        run(args, Path(scratch))


def run(args, work: Path):
    paths = build_tiny_models(work / "models")
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"], padding_side="left")
    problems = json.loads((ROOT / "data" / "demo_data.json").read_text(encoding="utf-8"))
    prompts = []
    for item in problems:
        messages = [{"role": "user", "content": item["Open-ended Verifiable Question"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append({"input_ids": ids, "reference": item["Ground-True Answer"]})

    config = PPOConfig(
        output_dir=str(work / "run"),
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        response_length=args.response_length,
        per_device_train_batch_size=args.prompts_per_update // 2,
        gradient_accumulation_steps=2,
        local_rollout_forward_batch_size=args.prompts_per_update,
        total_episodes=args.prompts_per_update * args.updates,
        learning_rate=1e-5,
    )
    trainer = PPOTrainer(
        config,
        tokenizer,
        AutoModelForCausalLM.from_pretrained(paths["policy"]),
        AutoModelForCausalLM.from_pretrained(paths["policy"]),
        AutoModelForSequenceClassification.from_pretrained(paths["value"], num_labels=1),
        VerifierOnEveryResponse(paths["verifier"]),
        prompts,
    )
    trainer.train()
    records = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()][1:]

    phases = {
        name: statistics.mean(r[f"time/{name}"] for r in records) for name in ("rollout", "reward", "update")
    }
    total = sum(phases.values())
    eps = statistics.mean(r["eps"] for r in records)
    mean_length = statistics.mean(r["val/response_length"] for r in records)
    print(
        f"PPO on tiny models, CPU ({torch.get_num_threads()} threads): {args.prompts_per_update} prompts per update, "
        f"response_length {args.response_length} (mean {mean_length:.0f} tokens), {len(records)} timed updates"
    )
    for name, seconds in phases.items():
        print(f"  {name:<8}{seconds:7.2f} s/update  ({100 * seconds / total:4.1f}%)")
    print(f"episodes/s: {eps:.2f}  (target {TARGET_EPS:.2f}: ratio {eps / TARGET_EPS:.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prompts_per_update", type=int, default=8, help="Prompts rolled out per update (even)."
    )
    parser.add_argument("--response_length", type=int, default=64, help="Most tokens sampled per response.")
    parser.add_argument("--updates", type=int, default=4, help="PPO updates; the first is a warm-up.")
    main(parser.parse_args())
