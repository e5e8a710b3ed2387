"""GRPO and RLOO beside PPO: TRL's maintained GRPOTrainer and RLOOTrainer with the stage-2 reward and data.

RL_stage2.py --algorithm grpo|rloo hands its parsed arguments here:

    trainer = train_with_trl("grpo", args, train_dataset, eval_dataset, RewardFunction(args.reward_model_path))

Datasets hold a "prompt" column (chat messages, [{"role": "user", "content": question}], which TRL renders
with the tokenizer's chat template; or text already templated) and a "reference" column (the ground-truth
answer). The shared stage-2 flags map onto TRL's configs as follows; TrainingArguments fields
(output_dir, learning_rate, warmup_ratio, per_device_train_batch_size, gradient_accumulation_steps,
save_strategy/save_steps/save_total_limit, eval_strategy/eval_steps, bf16, gradient_checkpointing,
report_to, run_name, seed, ...) are copied as they are:

    response_length   -> max_completion_length      temperature    -> temperature
    kl_coef           -> beta (KL penalty weight)   num_ppo_epochs -> num_iterations
    cliprange         -> epsilon                    num_generations (group size per prompt, default 4)
    total_episodes    -> max_steps = ceil(total_episodes * num_iterations / (per_device_train_batch_size
                         * gradient_accumulation_steps * world size)); an episode is one sampled response,
                         as in PPO, and TRL reuses each sampled batch for num_iterations optimizer steps, so
                         the three algorithms spend the same generation budget
    rollout_backend "vllm" -> use_vllm (colocated with training, CPU or GPU; vllm_max_model_length = max_prompt_length
                         + response_length; vllm_tensor_parallel_size, vllm_enable_sleep_mode and
                         vllm_importance_sampling_correction as they are)
    loss_type (GRPO)  -> loss_type (grpo, dr_grpo, dapo, ...; TRL's default when unset)
    lora_r, lora_alpha, lora_dropout, lora_target_modules -> peft_config (a LoRA adapter; TRL then computes the
                         reference log-probabilities with the adapter switched off, so no second model is loaded)

With LoRA every checkpoint-N/ and the final folder hold the merged model (servable as a full fine-tune) and the
adapter alone in adapter/; resuming reads the adapter back from there.

Besides TRL's own metrics (reward, kl, entropy, clip ratios, completion lengths), every log carries the
verifier's correct_rate and format_rate (eval_ prefixed on the held-out split) and is appended to
<output_dir>/metrics.jsonl. --resume_from_checkpoint latest (or a checkpoint-N path) resumes, as for PPO.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from transformers import AutoTokenizer, TrainerCallback, TrainingArguments
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from huatuo.checkpoints import drop_logged_after, find_checkpoint
from huatuo.lora import MergedLoraSaveMixin, lora_config
from huatuo.models import attn_implementation, check_vllm_installed, ensure_chat_template
from huatuo.reward import RewardFunction, reward_stats


class VLLMRolloutMixin:
    """With use_vllm, TRL's engine takes the weight sync of huatuo/vllm_rollout.py, which also works on a CPU and
    leaves a LoRA policy's base weights untouched."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.use_vllm:
            from huatuo.vllm_rollout import use_vllm_rollout

            use_vllm_rollout(self.vllm_generation)


class MergedGRPOTrainer(VLLMRolloutMixin, MergedLoraSaveMixin, GRPOTrainer):
    """GRPOTrainer whose LoRA saves are merged and servable (huatuo/lora.py)."""


class MergedRLOOTrainer(VLLMRolloutMixin, MergedLoraSaveMixin, RLOOTrainer):
    """RLOOTrainer whose LoRA saves are merged and servable (huatuo/lora.py)."""


TRL_ALGORITHMS = {"grpo": (GRPOConfig, MergedGRPOTrainer), "rloo": (RLOOConfig, MergedRLOOTrainer)}
DEFAULT_NUM_GENERATIONS = 4
# TRL 1.16's GRPO loss aggregations, checked here so that a typo fails before any model loads.
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")

# Stage-2 flag name -> TRL config field.
RENAMED = {
    "response_length": "max_completion_length",
    "temperature": "temperature",
    "kl_coef": "beta",
    "num_ppo_epochs": "num_iterations",
    "cliprange": "epsilon",
    "num_generations": "num_generations",
    "vllm_gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "vllm_tensor_parallel_size": "vllm_tensor_parallel_size",
    "vllm_enable_sleep_mode": "vllm_enable_sleep_mode",
    "vllm_importance_sampling_correction": "vllm_importance_sampling_correction",
}


def completion_text(completion) -> str:
    """TRL passes plain strings for text prompts and a list of messages for chat prompts."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


def make_trl_reward(reward_fn: RewardFunction):
    """Wrap the stage-2 reward in TRL's reward-function signature (dataset columns arrive as keyword
    lists, so the "reference" column comes in as `reference`)."""

    def medical_verifier(prompts, completions, reference, log_metric=None, **kwargs) -> list[float]:
        judgements = reward_fn.judge([completion_text(c) for c in completions], reference)
        rewards = reward_fn.rewards(judgements)
        if log_metric is not None:
            stats = reward_stats(judgements, rewards)
            log_metric("correct_rate", stats["correct_rate"])
            log_metric("format_rate", stats["format_rate"])
        return rewards

    return medical_verifier


class MetricsFileCallback(TrainerCallback):
    """Append every log (train and eval) as one JSON line, on the main process only; a resumed run first
    drops the lines logged after its checkpoint."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step > 0:  # resumed
            drop_logged_after(self.path, "step", state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_trl_batch(algorithm: str, args, world_size: int) -> None:
    """TRL samples num_generations responses per prompt and needs whole groups in every generation batch;
    say which stage-2 flags to change, before TRL fails with its own field names."""
    num_generations = getattr(args, "num_generations", None) or DEFAULT_NUM_GENERATIONS
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    if num_generations < 2:
        raise ValueError(f"--num_generations must be at least 2 for {algorithm} (got {num_generations})")
    if batch % num_generations:
        raise ValueError(
            f"{algorithm}: per_device_train_batch_size * gradient_accumulation_steps * processes = "
            f"{args.per_device_train_batch_size} * {args.gradient_accumulation_steps} * {world_size} = {batch} "
            f"must be a multiple of --num_generations {num_generations}; change --num_generations or "
            f"--gradient_accumulation_steps"
        )


def trl_config(algorithm: str, args, world_size: int | None = None, evaluate: bool = True):
    """The GRPOConfig or RLOOConfig for the stage-2 arguments `args` (any object with the flags as
    attributes: RL_stage2.py's config, a TrainingArguments, an argparse Namespace). evaluate=False turns
    evaluation off (no held-out split)."""
    if algorithm not in TRL_ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; TRL runs {', '.join(TRL_ALGORITHMS)}")
    config_class, _ = TRL_ALGORITHMS[algorithm]
    world_size = world_size or _world_size()
    check_trl_batch(algorithm, args, world_size)

    shared = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    fields = {name: getattr(args, name) for name in shared if hasattr(args, name)}
    for ours, theirs in RENAMED.items():
        if getattr(args, ours, None) is not None:
            fields[theirs] = getattr(args, ours)
    fields.setdefault("num_generations", DEFAULT_NUM_GENERATIONS)
    loss_type = getattr(args, "loss_type", None)
    if loss_type is not None:
        if algorithm != "grpo":
            raise ValueError(f"--loss_type selects a GRPO loss; it does not apply to {algorithm}")
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"--loss_type must be one of {', '.join(GRPO_LOSS_TYPES)}, got {loss_type!r}")
        fields["loss_type"] = loss_type
    # Eval asks for one response per held-out prompt, as PPO's evaluation does: mean reward, correct and
    # format rates of the policy's own sample.
    fields["num_generations_eval"] = 1
    if not evaluate:
        fields["eval_strategy"] = "no"
    attention = attn_implementation()
    fields["model_init_kwargs"] = {"attn_implementation": attention}
    if attention == "flash_attention_2":
        # Flash kernels take half precision only and TRL samples outside autocast, so the policy is loaded in
        # bf16 (what DeepSpeed's bf16 mode runs anyway); elsewhere it stays fp32 under sdpa.
        fields["model_init_kwargs"]["dtype"] = "bfloat16"
    fields["use_vllm"] = getattr(args, "rollout_backend", "hf") == "vllm"
    if fields["use_vllm"]:
        check_vllm_installed()
        fields["vllm_mode"] = "colocate"
        if getattr(args, "max_prompt_length", None):
            # the longest prompt plus the response, not the model's own limit (131,072 tokens for a Llama-3.1)
            fields["vllm_max_model_length"] = args.max_prompt_length + fields.get(
                "max_completion_length", config_class.max_completion_length
            )
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    if getattr(args, "total_episodes", None):
        # TRL samples once every num_iterations optimizer steps, so each step consumes per_step / num_iterations
        # fresh responses.
        iterations = fields.get("num_iterations") or config_class.num_iterations
        fields["max_steps"] = math.ceil(args.total_episodes * iterations / per_step)
    # Secrets never reach a config, which TRL writes into every checkpoint.
    fields.pop("hub_token", None)
    return config_class(**fields)


def train_with_trl(
    algorithm: str, args, train_dataset, eval_dataset, reward_fn: RewardFunction, callbacks=None
):
    """Train `args.model_name_or_path` with GRPO or RLOO on `train_dataset` ("prompt", "reference"),
    evaluating on `eval_dataset` (or None); save the final model and tokenizer to `args.output_dir` and
    return the trainer. `args.resume_from_checkpoint`: None starts afresh, "latest" takes the newest
    checkpoint in output_dir, a path takes that checkpoint."""
    if eval_dataset is not None and len(eval_dataset) == 0:
        eval_dataset = None
    config = trl_config(algorithm, args, evaluate=eval_dataset is not None)
    _, trainer_class = TRL_ALGORITHMS[algorithm]
    tokenizer = ensure_chat_template(AutoTokenizer.from_pretrained(args.model_name_or_path))
    trainer = trainer_class(
        model=args.model_name_or_path,
        reward_funcs=make_trl_reward(reward_fn),
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(Path(config.output_dir) / "metrics.jsonl"), *(callbacks or [])],
        peft_config=lora_config(args) if getattr(args, "lora_r", 0) else None,
    )
    trainer.train(
        resume_from_checkpoint=find_checkpoint(
            getattr(args, "resume_from_checkpoint", None), config.output_dir
        )
    )
    trainer.save_model(config.output_dir)
    return trainer
