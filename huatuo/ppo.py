"""PPO for stage 2: a compact trainer on accelerate (DeepSpeed ZeRO-3 capable) and the pure PPO arithmetic.

TRL no longer ships a PPO trainer, so the method lives here, reusing TRL's maintained pieces (log-softmax
gather, entropy, DeepSpeed inference wrapping, vLLM colocated generation). One update:

1. rollout: sample a response per prompt at `temperature`, cut it after the first stop token;
2. score: the reward function reads (response text, reference answer);
3. shape: per-token reward = -kl_coef * (logprob - ref_logprob), plus the score on the last response token;
4. GAE with gamma and lam, advantages whitened over the batch's response tokens;
5. num_ppo_epochs passes over num_mini_batches mini-batches with the clipped policy loss and the clipped
   value loss, loss = pg + vf_coef * vf.

The pure functions below (batch plan, KL-shaped rewards, GAE, whitening, losses) take and return tensors
only, so the tests check them against hand-computed values.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch
from transformers import TrainingArguments

from huatuo.models import bf16_by_default, bf16_supported

SECRET_FIELDS = ("hub_token", "api_key")


# ==========================================================================================
# Configuration
# ==========================================================================================
@dataclass
class PPOConfig(TrainingArguments):
    """Training arguments plus the PPO fields. Defaults follow the paper's 8B run (the seed command)."""

    output_dir: str = field(
        default="./ckpts", metadata={"help": "Checkpoints, metrics.jsonl and the final model."}
    )
    learning_rate: float = field(
        default=5e-7, metadata={"help": "AdamW learning rate for policy and value model."}
    )
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Sequences per forward/backward pass on each process (micro-batch)."}
    )
    gradient_accumulation_steps: int = field(
        default=16, metadata={"help": "Micro-batches accumulated into one optimizer step."}
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction of optimizer steps for linear warmup (sets --warmup_steps when given)."},
    )
    response_length: int = field(default=1300, metadata={"help": "Most tokens sampled per response."})
    temperature: float = field(
        default=0.5, metadata={"help": "Sampling temperature; log-probabilities are computed at it too."}
    )
    local_rollout_forward_batch_size: int = field(
        default=8, metadata={"help": "Prompts per generate/forward chunk during rollout, per process."}
    )
    num_ppo_epochs: int = field(default=3, metadata={"help": "Passes over each rollout batch."})
    num_mini_batches: int = field(
        default=1, metadata={"help": "Mini-batches (optimizer steps) per PPO epoch."}
    )
    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Responses to train on in all; default num_train_epochs x train size."},
    )
    kl_coef: float = field(
        default=0.03, metadata={"help": "Weight of the per-token KL penalty to the reference."}
    )
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value prediction clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight (the paper reports 1.0)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of responses that never emit a stop token."},
    )
    num_sample_generations: int = field(
        default=10,
        metadata={
            "help": "Held-out completions written to samples/ at each evaluation; -1 writes all, 0 none."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 autocast for rollout, scoring and updates (fp32 master weights). Default: as `accelerate "
            "launch` asks, else on where the device supports it (a bf16 GPU, or a CPU with AVX512-BF16 or AMX); "
            "--bf16 False opts out."
        },
    )
    rollout_backend: str = field(
        default="hf",
        metadata={
            "help": "hf: transformers generate. vllm: a vLLM engine in each process (CPU or GPU), given the "
            "policy's weights after every update."
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={
            "help": "GPU memory share of the colocated vLLM engine (--rollout_backend vllm). On a CPU the KV "
            "cache takes VLLM_CPU_KVCACHE_SPACE GiB of RAM instead."
        },
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={
            "help": "ZeRO-3 with --rollout_backend hf: gather the whole policy on every process for sampling "
            "(fast). --ds3_gather_for_generation False samples from the shards instead, gathering layer by "
            "layer at every token: much slower, but a policy too large for one device can roll out."
        },
    )
    vllm_tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "GPUs each vLLM engine spans; must divide the number of processes."},
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={
            "help": "Free the engine's GPU memory (weights and KV cache) between rollouts, at the cost of a "
            "weight push before each one."
        },
    )

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.bf16 is None:
            self.bf16 = bf16_by_default()
        elif self.bf16 and not bf16_supported():
            warnings.warn(
                "--bf16 True asked for, but this device has no bf16 support: training in fp32.", stacklevel=2
            )
            self.bf16 = False
        # Without a GPU, say so: TrainingArguments refuses bf16 off the GPU unless use_cpu is set.
        self.use_cpu = self.use_cpu or not torch.cuda.is_available()
        super().__post_init__()
        if self.rollout_backend not in ("hf", "vllm"):
            raise ValueError(f"--rollout_backend must be 'hf' or 'vllm', got {self.rollout_backend!r}")
        for name in ("temperature", "cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name} must be in [0, 1], got {getattr(self, name)}")


def config_for_saving(config: PPOConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in SECRET_FIELDS}


# ==========================================================================================
# Batch arithmetic
# ==========================================================================================
@dataclass
class BatchPlan:
    """How many prompts each process rolls out per update, how they split, and how many updates run."""

    local_batch_size: int  # prompts per process per update
    local_mini_batch_size: int  # prompts per process per optimizer step
    global_batch_size: int  # prompts per update over all processes
    num_updates: int
    optimizer_steps: int  # for the learning-rate schedule

    @property
    def episodes(self) -> int:
        return self.num_updates * self.global_batch_size


def plan_batches(
    per_device_train_batch_size: int,
    gradient_accumulation_steps: int,
    num_mini_batches: int,
    num_ppo_epochs: int,
    local_rollout_forward_batch_size: int,
    response_length: int,
    total_episodes: int,
    world_size: int = 1,
) -> BatchPlan:
    """local = per_device x grad_accum x mini_batches; global = local x world; updates = ceil(total / global).

    Checked before any model loads, with the flags to change named, instead of failing mid-run."""
    for name, value in (
        ("per_device_train_batch_size", per_device_train_batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("num_mini_batches", num_mini_batches),
        ("num_ppo_epochs", num_ppo_epochs),
        ("local_rollout_forward_batch_size", local_rollout_forward_batch_size),
        ("response_length", response_length),
        ("total_episodes", total_episodes),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    local_mini = per_device_train_batch_size * gradient_accumulation_steps
    local = local_mini * num_mini_batches
    global_batch = local * world_size
    if total_episodes < global_batch:
        raise ValueError(
            f"--total_episodes {total_episodes} is smaller than one PPO batch of {global_batch} prompts "
            f"(per_device_train_batch_size {per_device_train_batch_size} x gradient_accumulation_steps "
            f"{gradient_accumulation_steps} x num_mini_batches {num_mini_batches} x {world_size} processes): "
            "raise --total_episodes or lower those flags."
        )
    updates = math.ceil(total_episodes / global_batch)
    return BatchPlan(local, local_mini, global_batch, updates, updates * num_ppo_epochs * num_mini_batches)


def plan_for(config, num_examples: int, world_size: int) -> BatchPlan:
    """plan_batches from a PPOConfig; without --total_episodes the run is num_train_epochs over the data."""
    return plan_batches(
        config.per_device_train_batch_size,
        config.gradient_accumulation_steps,
        config.num_mini_batches,
        config.num_ppo_epochs,
        config.local_rollout_forward_batch_size,
        config.response_length,
        config.total_episodes or int(config.num_train_epochs * num_examples),
        world_size,
    )


def interval_in_updates(
    strategy: str, steps: float | None, num_updates: int, updates_per_epoch: int, flag: str
):
    """Turn a save/eval strategy into 'every N updates' (None when off). Fractional steps are a share of the run."""
    strategy = getattr(strategy, "value", strategy)
    if strategy == "no":
        return None
    if strategy == "epoch":
        return max(1, updates_per_epoch)
    if strategy != "steps":
        raise ValueError(f"--{flag}_strategy {strategy!r} is not supported here; use steps, epoch or no")
    if steps is None or steps <= 0:
        raise ValueError(f"--{flag}_strategy steps needs a positive --{flag}_steps, got {steps!r}")
    return max(1, math.ceil(steps * num_updates)) if steps < 1 else int(steps)


# ==========================================================================================
# Pure PPO arithmetic (tensors in, tensors out)
# ==========================================================================================
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    if count < 2:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    return masked_mean((values - mean) ** 2, mask) * count / (count - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back. Masked-out
    entries come back as zero."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 when the value model predicts the
    returns exactly, 0 when it does no better than their mean, below 0 when worse; nan when the returns do
    not vary (nothing to explain)."""
    returns_var = masked_var(returns, mask)
    if returns_var == 0:
        return math.nan
    return float(1 - masked_var(returns - values, mask) / returns_var)


def stop_mask(responses: torch.Tensor, stop_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of tokens up to and including the first stop token, whether each row has a stop token)."""
    is_stop = torch.isin(responses, torch.tensor(stop_token_ids, device=responses.device))
    # a position is valid when no stop token came strictly before it
    before = torch.cumsum(is_stop.int(), dim=1) - is_stop.int()
    return before == 0, is_stop.any(dim=1)


def kl_shaped_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -kl_coef * (logprob - ref_logprob), plus each score on its row's last valid token.

    Returns (rewards, kl), both zero outside the mask. Rows with an empty mask get no score."""
    maskf = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * maskf
    rewards = -kl_coef * kl
    lengths = mask.sum(dim=1)
    rows = torch.nonzero(lengths > 0).squeeze(1)
    rewards[rows, lengths[rows] - 1] += scores[rows].to(rewards.dtype)
    return rewards, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked (response) tokens; the value after the last token is 0.

    Returns (advantages, returns = advantages + values), zero outside the mask."""
    maskf = mask.to(values.dtype)
    rewards, values = rewards * maskf, values * maskf
    advantages = torch.zeros_like(values)
    last = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    length = values.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * maskf[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * maskf


def clipped_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's pessimistic clipped surrogate, averaged over masked tokens, plus its diagnostics."""
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def clipped_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2), averaged over masked tokens."""
    clipped_values = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (new_values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask)}
    return loss, stats


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def right_pad(sequences: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    width = max(int(s.shape[-1]) for s in sequences)
    out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : seq.shape[-1]] = seq
    return out


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
