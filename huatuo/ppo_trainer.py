"""The PPO trainer of stage 2 on accelerate (DeepSpeed ZeRO-3 capable): rollout, scoring, updates, evaluation,
logging and checkpoints. The algorithm's arithmetic lives in huatuo.ppo; this file runs it on real models.

With a LoRA policy (a peft model) the trainer takes no reference model: the frozen reference is the policy with its
adapter switched off, which saves a full copy of the weights. Saved policy and value folders then hold the merged
weights, with the adapters alone in adapter/ inside them."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate.utils import is_peft_model
from torch import nn
from transformers import GenerationConfig, get_scheduler

from huatuo.checkpoints import checkpoint_dirs, drop_logged_after, state_dict_on_main
from huatuo.lora import ADAPTER_SUBDIR, save_merged
from huatuo.ppo import (
    PPOConfig,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    explained_variance,
    interval_in_updates,
    kl_shaped_rewards,
    left_pad,
    masked_mean,
    masked_whiten,
    plan_for,
    position_ids_for,
    right_pad,
    stop_mask,
)
from huatuo.reward import reward_stats


# ==========================================================================================
# Models
# ==========================================================================================
class PolicyAndValue(nn.Module):
    """Policy and value model behind one forward, so one optimizer and one DeepSpeed engine hold both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        if not hasattr(value_model, "score"):
            raise ValueError(
                f"the value model ({type(value_model).__name__}) has no `score` head; load it with "
                "AutoModelForSequenceClassification and num_labels=1"
            )

    def forward(self, input_ids, attention_mask, position_ids, response_length: int):
        logits = response_logits(self.policy, input_ids, attention_mask, position_ids, response_length)
        values = token_values(self.value_model, input_ids, attention_mask, position_ids, response_length)
        return logits, values


def response_logits(policy, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
    """Logits that predict each of the last `response_length` tokens (only those are projected to the vocab)."""
    out = policy(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=response_length + 1,
    )
    return out.logits[:, :-1].float()


def token_values(value_model, input_ids, attention_mask, position_ids, response_length: int) -> torch.Tensor:
    """The value head on the state before each response token: values[:, t] estimates the return from token t."""
    if is_peft_model(value_model):  # its adapter layers sit inside the base model, which holds the backbone
        value_model = value_model.get_base_model()
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return value_model.score(hidden[:, -response_length - 1 : -1]).squeeze(-1).float()


# ==========================================================================================
# Trainer
# ==========================================================================================
@dataclass
class Rollout:
    queries: torch.Tensor  # [B, Lq] left padded
    query_mask: torch.Tensor  # [B, Lq]
    responses: torch.Tensor  # [B, R], pad after the first stop token
    response_mask: torch.Tensor  # [B, R] tokens up to and including the first stop token
    has_stop: torch.Tensor  # [B]
    texts: list[str]


class Reward(Protocol):
    """What the trainer needs from huatuo.reward.RewardFunction."""

    def judge(self, responses: list[str], references: list[str]) -> list[bool | None]: ...

    def rewards(self, judgements: list[bool | None]) -> list[float]: ...


class PPOTrainer:
    """Runs PPO updates, evaluates, logs and checkpoints.

    ref_policy: the frozen reference, or None when the policy is a peft (LoRA) model, whose reference is then
    itself with the adapter disabled.
    train_dataset / eval_dataset: lists of {"input_ids": prompt token ids, "reference": answer text}.
    reward_fn: judge(responses, references) gives True / False / None (malformed) per response and
    rewards(judgements) the scores, so correct and format rates come with every score.
    """

    def __init__(
        self,
        config: PPOConfig,
        tokenizer,
        policy,
        ref_policy,
        value_model,
        reward_fn: Reward,
        train_dataset: list[dict],
        eval_dataset: list[dict] | None = None,
        run_config: dict | None = None,
    ):
        from accelerate import Accelerator

        self.args = config
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset or []
        self.run_config = run_config or {}
        if not train_dataset:
            raise ValueError("the training set is empty")
        if ref_policy is None and not is_peft_model(policy):
            raise ValueError(
                "no reference model given and the policy has no adapter to switch off: pass the reference "
                "policy, or train a LoRA adapter (--lora_r) so that the base weights serve as the reference"
            )

        self.accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision="bf16" if config.bf16 else "no",
        )
        acc = self.accelerator
        self.plan = plan_for(config, len(train_dataset), acc.num_processes)
        updates_per_epoch = math.ceil(len(train_dataset) / self.plan.global_batch_size)
        self.eval_every = interval_in_updates(
            config.eval_strategy, config.eval_steps, self.plan.num_updates, updates_per_epoch, "eval"
        )
        self.save_every = interval_in_updates(
            config.save_strategy, config.save_steps, self.plan.num_updates, updates_per_epoch, "save"
        )
        if self.eval_every and not self.eval_dataset:
            warnings.warn("evaluation asked for, but the held-out split is empty: skipping it", stacklevel=2)
            self.eval_every = None

        self.stop_token_ids = stop_token_ids(tokenizer, policy)
        self.pad_id = tokenizer.pad_token_id
        self.output_dir = Path(config.output_dir)
        self.is_zero3 = self._configure_deepspeed()

        if config.gradient_checkpointing:
            kwargs = config.gradient_checkpointing_kwargs or {"use_reentrant": False}
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            value_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        from trl.trainer.utils import disable_dropout_in_model

        for module in (policy, ref_policy, value_model):
            if module is not None:
                disable_dropout_in_model(module)
        if ref_policy is not None:
            ref_policy.requires_grad_(False)

        model = PolicyAndValue(policy, value_model)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # The schedule is built on the prepared optimizer (under ZeRO-Offload accelerate swaps in DeepSpeed's CPU
        # Adam) and stepped by hand once per optimizer step: accelerate's scheduler wrapper would step it once per
        # process, and DeepSpeed only steps schedulers of its own kinds.
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=config.get_warmup_steps(self.plan.optimizer_steps),
            num_training_steps=self.plan.optimizer_steps,
            scheduler_specific_kwargs=config.lr_scheduler_kwargs or None,
        )
        acc.register_for_checkpointing(self.scheduler)
        if ref_policy is None:
            self.ref_policy = None
        elif acc.distributed_type == "DEEPSPEED":
            from trl.models.utils import prepare_deepspeed

            self.ref_policy = prepare_deepspeed(ref_policy, acc)
        else:
            self.ref_policy = ref_policy.to(acc.device).eval()

        self.vllm = None
        self._sampler = None  # the bf16 copy the CPU samples from (see _policy_for_generation)
        if config.rollout_backend == "vllm":
            from huatuo.vllm_rollout import make_vllm_rollout

            longest_prompt = max(len(r["input_ids"]) for r in self.train_dataset + self.eval_dataset)
            self.vllm = make_vllm_rollout(
                acc.unwrap_model(self.model).policy,
                acc,
                tokenizer,
                config,
                max_model_length=longest_prompt + config.response_length,
                stop_token_ids=self.stop_token_ids,
            )
        self.update = 0
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._wandb = None

    # ------------------------------------------------------------------ setup helpers
    def _configure_deepspeed(self) -> bool:
        """Fill DeepSpeed's 'auto' batch fields from the flags (there is no dataloader to infer them from) and
        refuse a config file whose fixed values disagree with them."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return False
        ds = plugin.deepspeed_config
        args = self.args
        wanted = {
            "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "gradient_clipping": args.max_grad_norm,
        }
        flags = {
            "train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
            "gradient_accumulation_steps": "--gradient_accumulation_steps",
            "gradient_clipping": "--max_grad_norm",
        }
        for key, value in wanted.items():
            current = ds.get(key, "auto")
            if current == "auto":
                ds[key] = value
            elif current != value:
                raise ValueError(
                    f"the DeepSpeed config sets {key}={current} but {flags[key]} is {value}: make them agree"
                )
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ValueError(
                    f"the DeepSpeed config defines a {key}; remove it: AdamW and the schedule come from the flags "
                    "(--learning_rate, --lr_scheduler_type, --warmup_ratio, --weight_decay)"
                )
        ds.pop("train_batch_size", None)
        if ds.get("bf16", {}).get("enabled") == "auto":
            ds["bf16"]["enabled"] = bool(args.bf16)
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            # full-weight Hugging Face checkpoints need the 16-bit weights gathered at save time
            ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        return stage == 3

    # ------------------------------------------------------------------ data
    def _local_prompts(self, update: int) -> list[dict]:
        """This process's share of update `update` (0-based): the training set is walked in a fresh seeded
        permutation each epoch, so the prompts of any update follow from its index alone (resume needs no
        dataloader state)."""
        n, size = len(self.train_dataset), self.plan.global_batch_size
        start = update * size
        rows, orders = [], {}
        for position in range(start, start + size):
            epoch, offset = divmod(position, n)
            if epoch not in orders:
                orders[epoch] = torch.randperm(
                    n, generator=torch.Generator().manual_seed(self.args.seed + epoch)
                )
            rows.append(int(orders[epoch][offset]))
        rank, local = self.accelerator.process_index, self.plan.local_batch_size
        return [self.train_dataset[i] for i in rows[rank * local : (rank + 1) * local]]

    # ------------------------------------------------------------------ rollout
    @contextmanager
    def _policy_for_generation(self):
        """The bare policy, with ZeRO-3 shards gathered so generate() does not gather per token (unless
        --ds3_gather_for_generation False, for a policy too large to gather on one device). On a CPU in bf16,
        a bf16 copy of it instead, refreshed from the fp32 weights before each rollout: under autocast every
        weight is cast again for each sampled token, and the copy sampled 1.15x faster than autocast here
        (1.67x fp32). The log-probabilities PPO trains on are still computed by the policy itself."""
        policy = self.accelerator.unwrap_model(self.model).policy
        on_cpu = self.accelerator.device.type == "cpu" and not self.is_zero3
        if self.args.bf16 and on_cpu and not is_peft_model(policy):
            yield self._bf16_copy(policy)
            return
        if not self.is_zero3 or not self.args.ds3_gather_for_generation:
            yield policy
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(policy.parameters())):
            remove_hooks(self.model)
            yield policy
            add_hooks(self.model)

    @torch.no_grad()
    def _bf16_copy(self, policy):
        if self._sampler is None:
            self._sampler = copy.deepcopy(policy).to(torch.bfloat16)
        else:
            for sampled, trained in zip(self._sampler.parameters(), policy.parameters(), strict=True):
                sampled.copy_(trained)
        return self._sampler

    def _sample(self, prompts: list[list[int]], temperature: float) -> Rollout:
        """Sample one response per prompt, cut after the first stop token."""
        args, acc = self.args, self.accelerator
        queries, query_mask = left_pad(prompts, self.pad_id)
        chunks = []
        if self.vllm is not None:
            _, completions, _, _ = self.vllm.generate(prompts, images=None, num_generations=1)
            chunks = [torch.tensor(c or [self.pad_id], dtype=torch.long) for c in completions]
        else:
            generation_config = GenerationConfig(
                max_new_tokens=args.response_length,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=self.stop_token_ids,
                pad_token_id=self.pad_id,
            )
            step = args.local_rollout_forward_batch_size
            with self._policy_for_generation() as policy, acc.autocast():
                policy.eval()
                for i in range(0, len(prompts), step):
                    q = queries[i : i + step].to(acc.device)
                    out = policy.generate(
                        input_ids=q,
                        attention_mask=query_mask[i : i + step].to(acc.device),
                        generation_config=generation_config,
                        # sharded weights: every forward gathers collectively, so a process whose responses all
                        # stopped keeps stepping until every process is done
                        synced_gpus=self.is_zero3 and not args.ds3_gather_for_generation,
                    )
                    chunks.extend(out[:, q.shape[1] :].cpu())
        responses = right_pad(chunks, self.pad_id)
        response_mask, has_stop = stop_mask(responses, self.stop_token_ids)
        responses = responses.masked_fill(~response_mask, self.pad_id)
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        return Rollout(queries, query_mask, responses, response_mask, has_stop, texts)

    @contextmanager
    def _reference_policy(self, policy):
        """The frozen reference: its own model, or the LoRA policy with its adapter switched off."""
        if self.ref_policy is not None:
            yield self.ref_policy
            return
        with policy.disable_adapter():
            yield policy

    @staticmethod
    def _joined(rollout: Rollout, rows, device):
        """Query+response ids, attention mask and positions for `rows`, trimmed to the columns they use."""
        queries, query_mask = rollout.queries[rows], rollout.query_mask[rows]
        responses, response_mask = rollout.responses[rows], rollout.response_mask[rows]
        first = int(query_mask.any(dim=0).int().argmax())  # left padding shared by every row
        width = max(1, int(response_mask.sum(dim=1).max()))
        ids = torch.cat([queries[:, first:], responses[:, :width]], dim=1).to(device)
        mask = torch.cat([query_mask[:, first:], response_mask[:, :width].long()], dim=1).to(device)
        return ids, mask, position_ids_for(mask), width

    @torch.no_grad()
    def _score_rollout(self, rollout: Rollout, references: list[str]) -> dict[str, torch.Tensor]:
        """Old log-probabilities, reference log-probabilities, values and scores of a rollout."""
        from trl.trainer.utils import selective_log_softmax

        acc, args = self.accelerator, self.args
        size, length = rollout.responses.shape
        logprobs = torch.zeros(size, length)
        ref_logprobs = torch.zeros(size, length)
        values = torch.zeros(size, length)
        wrapper = acc.unwrap_model(self.model)
        wrapper.eval()
        step = args.local_rollout_forward_batch_size
        with acc.autocast():
            for i in range(0, size, step):
                rows = torch.arange(i, min(i + step, size))
                ids, mask, pos, width = self._joined(rollout, rows, acc.device)
                target = ids[:, -width:]
                logits = response_logits(wrapper.policy, ids, mask, pos, width)
                logprobs[rows, :width] = selective_log_softmax(
                    logits, target, temperature=args.temperature
                ).cpu()
                del logits
                with self._reference_policy(wrapper.policy) as reference:
                    ref_logits = response_logits(reference, ids, mask, pos, width)
                ref_logprobs[rows, :width] = selective_log_softmax(
                    ref_logits, target, temperature=args.temperature
                ).cpu()
                del ref_logits
                values[rows, :width] = token_values(wrapper.value_model, ids, mask, pos, width).cpu()
        start = time.perf_counter()
        judgements = self.reward_fn.judge(rollout.texts, references)
        scores = torch.tensor(self.reward_fn.rewards(judgements), dtype=torch.float)
        reward_seconds = time.perf_counter() - start
        outcome = reward_stats(judgements, scores.tolist())
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~rollout.has_stop).float()
        return {
            "logprobs": logprobs,
            "ref_logprobs": ref_logprobs,
            "values": values,
            "scores": scores,
            "reward_seconds": torch.tensor(reward_seconds),
            "correct_rate": torch.tensor(outcome["correct_rate"]),
            "format_rate": torch.tensor(outcome["format_rate"]),
        }

    # ------------------------------------------------------------------ one update
    def ppo_update(self, rollout: Rollout, old: dict[str, torch.Tensor]) -> dict[str, float]:
        """Shape rewards, compute advantages, and run the PPO epochs on one rollout batch."""
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        args, acc, plan = self.args, self.accelerator, self.plan
        mask = rollout.response_mask
        rewards, kl = kl_shaped_rewards(
            old["logprobs"], old["ref_logprobs"], old["scores"], mask, args.kl_coef
        )
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        values = old["values"] * mask
        advantages, returns = compute_gae(rewards, values, mask, args.gamma, args.lam)
        advantages = masked_whiten(advantages, mask)

        stats = {
            k: []
            for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "entropy", "ratio")
        }
        self.model.train()
        generator = torch.Generator().manual_seed(args.seed + self.update)
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(plan.local_batch_size, generator=generator)
            for start in range(0, plan.local_batch_size, plan.local_mini_batch_size):
                mini = order[start : start + plan.local_mini_batch_size]
                for micro_start in range(0, len(mini), args.per_device_train_batch_size):
                    rows = mini[micro_start : micro_start + args.per_device_train_batch_size]
                    ids, attn, pos, width = self._joined(rollout, rows, acc.device)
                    m = mask[rows, :width].to(acc.device)
                    with acc.accumulate(self.model), acc.autocast():
                        logits, new_values = self.model(ids, attn, pos, width)
                        new_logprobs = selective_log_softmax(
                            logits, ids[:, -width:], temperature=args.temperature
                        )
                        pg_loss, pg_stats = clipped_policy_loss(
                            new_logprobs,
                            old["logprobs"][rows, :width].to(acc.device),
                            advantages[rows, :width].to(acc.device),
                            m,
                            args.cliprange,
                        )
                        vf_loss, vf_stats = clipped_value_loss(
                            new_values,
                            values[rows, :width].to(acc.device),
                            returns[rows, :width].to(acc.device),
                            m,
                            args.cliprange_value,
                        )
                        loss = pg_loss + args.vf_coef * vf_loss
                        acc.backward(loss)
                        if acc.sync_gradients and args.max_grad_norm and acc.distributed_type != "DEEPSPEED":
                            acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                        self.optimizer.step()
                        if acc.sync_gradients:
                            self.scheduler.step()
                        self.optimizer.zero_grad()
                    with torch.no_grad():
                        entropy = masked_mean(entropy_from_logits(logits.detach() / args.temperature), m)
                    for key, value in (
                        ("pg_loss", pg_loss),
                        ("vf_loss", vf_loss),
                        ("pg_clipfrac", pg_stats["clipfrac"]),
                        ("vf_clipfrac", vf_stats["clipfrac"]),
                        ("approxkl", pg_stats["approxkl"]),
                        ("entropy", entropy),
                        ("ratio", pg_stats["ratio"]),
                    ):
                        stats[key].append(float(value.detach()))
                    del logits, new_values, loss

        def mean(values):
            return sum(values) / len(values)

        non_score = (-args.kl_coef * kl).sum(dim=1)
        local = {
            "objective/kl": float(kl.sum(dim=1).mean()),
            "objective/entropy": mean(stats["entropy"]),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((old["scores"] + non_score).mean()),
            "objective/scores": float(old["scores"].mean()),
            "objective/correct_rate": float(old["correct_rate"]),
            "objective/format_rate": float(old["format_rate"]),
            "policy/approxkl_avg": mean(stats["approxkl"]),
            "policy/clipfrac_avg": mean(stats["pg_clipfrac"]),
            "loss/policy_avg": mean(stats["pg_loss"]),
            "loss/value_avg": mean(stats["vf_loss"]),
            "val/clipfrac_avg": mean(stats["vf_clipfrac"]),
            "val/ratio": mean(stats["ratio"]),
            "val/num_eos_tokens": float(rollout.has_stop.float().sum()),
            "val/response_length": float(mask.sum(dim=1).float().mean()),
            "val/explained_variance": explained_variance(values, returns, mask),
        }
        return self._mean_over_processes(local)

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist(), strict=True))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward, correct rate and format rate on the held-out split, sampled at the training temperature."""
        acc = self.accelerator
        shard = self.eval_dataset[acc.process_index :: acc.num_processes]
        own = len(shard)
        # every process samples as many prompts, so as many chunks: under ZeRO-3 without the gather for
        # generation each forward is collective
        shard += self.eval_dataset[:1] * (math.ceil(len(self.eval_dataset) / acc.num_processes) - own)
        # one call, so ZeRO-3 gathers the policy once for the whole split rather than once per chunk
        texts = self._sample([r["input_ids"] for r in shard], self.args.temperature).texts[:own]
        references = [r["reference"] for r in shard[:own]]
        judgements = self.reward_fn.judge(texts, references) if texts else []
        scores = self.reward_fn.rewards(judgements)
        totals = torch.tensor(
            [
                sum(scores),
                sum(1.0 for j in judgements if j),
                sum(1.0 for j in judgements if j is not None),
                float(len(scores)),
            ],
            device=acc.device,
        )
        totals = acc.reduce(totals, reduction="sum") if acc.num_processes > 1 else totals
        count = max(float(totals[3]), 1.0)
        metrics = {
            "eval/mean_reward": float(totals[0]) / count,
            "eval/correct_rate": float(totals[1]) / count,
            "eval/format_rate": float(totals[2]) / count,
            "eval/count": float(totals[3]),
        }
        self._write_samples(texts, references, scores)
        return metrics

    def _write_samples(self, texts, references, scores):
        keep = self.args.num_sample_generations
        if keep == 0:
            return
        rows = [
            {"response": t, "reference": r, "score": s}
            for t, r, s in zip(texts, references, scores, strict=True)
        ]
        gathered = rows
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            gathered = gather_object(rows)
        if not self.accelerator.is_main_process:
            return
        if keep > 0:
            gathered = gathered[:keep]
        path = self.output_dir / "samples" / f"update-{self.update}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in gathered:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------ logging
    def _log(self, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"update": self.update, **metrics}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=self.update)

    def _start_wandb(self) -> None:
        if not self.accelerator.is_main_process or "wandb" not in (self.args.report_to or []):
            return
        os.environ.setdefault("WANDB_MODE", "offline")
        import wandb

        self._wandb = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "huatuo-o1"),
            name=self.args.run_name,
            dir=str(self.output_dir),
            config=self.run_config,
            resume="allow",
        )

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, directory: Path) -> None:
        """Write the policy (with tokenizer) as a Hugging Face folder, and the value model under value/. A LoRA
        model is written merged, with its adapter in adapter/ inside its folder."""
        acc = self.accelerator
        state = state_dict_on_main(acc, self.model)
        if acc.is_main_process:
            wrapper = acc.unwrap_model(self.model)
            for model, prefix, folder in (
                (wrapper.policy, "policy.", directory),
                (wrapper.value_model, "value_model.", directory / "value"),
            ):
                own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                if is_peft_model(model):
                    save_merged(model, own, folder, folder / ADAPTER_SUBDIR)
                else:
                    model.save_pretrained(folder, state_dict=own)
                self.tokenizer.save_pretrained(folder)
        acc.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        """checkpoint-<update>/: the policy folder, value/, and (unless --save_only_model) the optimizer,
        scheduler and RNG state under state/. Written to a temporary name first, so a crash never leaves a
        half checkpoint that resume would pick up."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{self.update}"
        tmp = self.output_dir / f"tmp-checkpoint-{self.update}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        self.save_model(tmp)
        if not self.args.save_only_model:
            acc.save_state(str(tmp / "state"))
            # every process writes its own RNG state (and ZeRO shards) there: all must finish before the rename
            acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(
                json.dumps(
                    {"update": self.update, "episode": self.update * self.plan.global_batch_size}, indent=2
                )
            )
            stale = self.output_dir / f"stale-checkpoint-{self.update}"
            shutil.rmtree(stale, ignore_errors=True)
            if (
                final.exists()
            ):  # a rerun reaching a saved update: the old copy goes once the new one is in place
                final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale, ignore_errors=True)
            self._rotate_checkpoints()
        acc.wait_for_everyone()
        return final

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        checkpoints = sorted(checkpoint_dirs(self.output_dir), key=lambda p: int(p.name.split("-")[-1]))
        for old in checkpoints[: max(0, len(checkpoints) - limit)]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if not (checkpoint / "state").is_dir():
            raise ValueError(
                f"{checkpoint} holds no optimizer state (saved with --save_only_model): cannot resume"
            )
        self.accelerator.load_state(str(checkpoint / "state"))
        self.update = int(state["update"])
        if self.accelerator.is_main_process:
            drop_logged_after(self.metrics_path, "update", self.update)

    # ------------------------------------------------------------------ main loop
    def train(self, resume_from: Path | None = None) -> dict[str, float]:
        from tqdm.auto import tqdm

        args, acc, plan = self.args, self.accelerator, self.plan
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            self.resume(resume_from)
            if self.vllm is not None:
                self.vllm.sync_weights()
        self._start_wandb()
        acc.print(
            f"PPO: {plan.num_updates} updates x {plan.global_batch_size} prompts ({plan.episodes} episodes), "
            f"{plan.local_batch_size} per process, {plan.optimizer_steps} optimizer steps"
        )
        bar = tqdm(
            total=plan.num_updates,
            initial=self.update,
            desc="PPO updates",
            disable=not acc.is_local_main_process,
        )
        last = {}
        while self.update < plan.num_updates:
            start = time.perf_counter()
            batch = self._local_prompts(self.update)
            rollout = self._sample([r["input_ids"] for r in batch], args.temperature)
            rollout_done = time.perf_counter()
            old = self._score_rollout(rollout, [r["reference"] for r in batch])
            scored = time.perf_counter()
            metrics = self.ppo_update(rollout, old)
            if self.vllm is not None:
                self.vllm.sync_weights()
            done = time.perf_counter()
            self.update += 1
            reward_seconds = float(old["reward_seconds"])
            metrics.update(
                {
                    "episode": self.update * plan.global_batch_size,
                    "lr": self.scheduler.get_last_lr()[0],
                    "eps": plan.global_batch_size / (done - start),
                    "time/rollout": rollout_done - start + (scored - rollout_done - reward_seconds),
                    "time/generate": rollout_done - start,  # the sampling part of the rollout
                    "time/reward": reward_seconds,
                    "time/update": done - scored,
                }
            )
            if self.eval_every and self.update % self.eval_every == 0:
                metrics.update(self.evaluate())
            self._log(metrics)
            last = metrics
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            if self.save_every and self.update % self.save_every == 0 and self.update < plan.num_updates:
                self.save_checkpoint()
        bar.close()
        if self.save_every:
            self.save_checkpoint()
        self.save_model(self.output_dir)
        if self._wandb is not None:
            self._wandb.finish()
        return last


# ==========================================================================================
# Helpers for the stage script
# ==========================================================================================
def stop_token_ids(tokenizer, policy=None) -> list[int]:
    """The tokenizer's eos plus any eos ids the model's generation config lists (Llama-3.1 stops on several)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids += configured if isinstance(configured, list) else [configured]
    if not ids:
        raise ValueError("the tokenizer has no eos token and the model's generation config names none")
    return sorted(set(ids))
