"""Stage 2 PPO: the arithmetic against hand-computed values, a learning run on a toy verifiable task,
resume, and the seed's command line scaled down on the tiny policy, value model and verifier."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import RL_stage2
from huatuo.checkpoints import find_checkpoint
from huatuo.items import InputError
from huatuo.lora import lora_config
from huatuo.models import check_vllm_installed, ensure_pad_token
from huatuo.ppo import (
    PPOConfig,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    interval_in_updates,
    kl_shaped_rewards,
    masked_whiten,
    plan_batches,
    stop_mask,
)
from huatuo.ppo_trainer import PPOTrainer, response_logits
from huatuo.reward import RewardFunction, rule_judge
from tests.conftest import ZERO3_CPU_CONFIG

ROOT = Path(__file__).resolve().parents[1]
QUESTION, ANSWER = "Open-ended Verifiable Question", "Ground-True Answer"


def close(actual, expected, tol=1e-5):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float), torch.tensor(expected), atol=tol)


# ------------------------------------------------------------------------------------------------
# Batch arithmetic
# ------------------------------------------------------------------------------------------------
def test_batch_plan_of_the_seed_command():
    # 8 processes x 1 x 16 x 1 = 128 prompts per update; 20000 episodes -> ceil(156.25) = 157 updates
    plan = plan_batches(1, 16, 1, 3, 8, 1300, 20000, world_size=8)
    assert (plan.local_batch_size, plan.local_mini_batch_size, plan.global_batch_size) == (16, 16, 128)
    assert plan.num_updates == 157
    assert plan.optimizer_steps == 157 * 3 * 1
    assert plan.episodes == 157 * 128


def test_batch_plan_with_mini_batches_and_processes():
    plan = plan_batches(2, 2, 3, 4, 1, 16, 100, world_size=4)
    assert (plan.local_mini_batch_size, plan.local_batch_size, plan.global_batch_size) == (4, 12, 48)
    assert plan.num_updates == 3
    assert plan.optimizer_steps == 3 * 4 * 3


def test_batch_plan_names_the_flags_to_change():
    with pytest.raises(ValueError, match=r"--total_episodes 100 is smaller than one PPO batch of 128") as err:
        plan_batches(1, 16, 1, 3, 8, 1300, 100, world_size=8)
    assert "per_device_train_batch_size 1 x gradient_accumulation_steps 16" in str(err.value)
    assert "raise --total_episodes or lower those flags" in str(err.value)
    with pytest.raises(ValueError, match="--num_mini_batches must be a positive integer, got 0"):
        plan_batches(1, 16, 0, 3, 8, 1300, 20000)
    with pytest.raises(ValueError, match="--local_rollout_forward_batch_size must be a positive integer"):
        plan_batches(1, 16, 1, 3, 0, 1300, 20000)


def test_save_and_eval_intervals():
    assert interval_in_updates("steps", 20, 157, 10, "save") == 20
    assert interval_in_updates("steps", 0.25, 10, 5, "eval") == 3  # a fraction of the run, rounded up
    assert interval_in_updates("epoch", None, 10, 4, "save") == 4
    assert interval_in_updates("no", None, 10, 4, "save") is None
    with pytest.raises(ValueError, match="--eval_strategy steps needs a positive --eval_steps"):
        interval_in_updates("steps", None, 10, 4, "eval")
    with pytest.raises(ValueError, match="--save_strategy 'best' is not supported"):
        interval_in_updates("best", 5, 10, 4, "save")


# ------------------------------------------------------------------------------------------------
# PPO arithmetic, checked against values worked out by hand
# ------------------------------------------------------------------------------------------------
def test_stop_mask_keeps_tokens_through_the_first_stop():
    responses = torch.tensor([[5, 7, 9, 7], [5, 5, 5, 5], [8, 5, 6, 6]])
    mask, has_stop = stop_mask(responses, [7, 8])
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert has_stop.tolist() == [True, False, True]


def test_kl_shaped_rewards_put_the_score_on_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -0.25, 4.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    rewards, kl = kl_shaped_rewards(logprobs, ref_logprobs, torch.tensor([1.0, 0.1]), mask, kl_coef=0.1)
    # kl = logprob - ref; reward = -0.1 * kl, plus the score on the last valid token; padding stays 0
    assert close(kl, [[0.5, 0.0, -1.0], [0.5, -0.25, 0.0]])
    assert close(rewards, [[-0.05, 0.0, 0.1 + 1.0], [-0.05, 0.025 + 0.1, 0.0]])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = compute_gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=0.5)
    # delta_2 = 1 - 0.5 = 0.5; delta_1 = delta_0 = 0; A_t = delta_t + 0.5 * A_{t+1}
    assert close(advantages, [[0.125, 0.25, 0.5]])
    assert close(returns, [[0.625, 0.75, 1.0]])


def test_gae_ignores_padding_and_discounts():
    rewards = torch.tensor([[0.2, 1.0, 9.0]])
    values = torch.tensor([[0.1, 0.3, 7.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # the padded position counts for nothing: delta_1 = 1 - 0.3 = 0.7;
    # delta_0 = 0.2 + 0.9 * 0.3 - 0.1 = 0.37; A_0 = 0.37 + 0.9 * 0.8 * 0.7 = 0.874
    assert close(advantages, [[0.874, 0.7, 0.0]])
    assert close(returns, [[0.974, 1.0, 0.0]])


def test_whitening_over_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # mean 2, unbiased variance 1
    assert close(masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-4)
    assert close(masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], tol=1e-4)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5, 3.0]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = clipped_policy_loss(new, old, advantages, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(0.5, 0.8) = 0.8
    # (clipped); token 3 is padding
    assert close(loss, (-1.2 - 0.5 + 0.8) / 3)
    assert close(stats["clipfrac"], 2 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 3
    assert close(stats["approxkl"], expected_kl)
    assert close(stats["ratio"], (1.5 + 0.5 + 0.5) / 3)


def test_clipped_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[0.5, -0.1, 4.0]])
    returns = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, stats = clipped_value_loss(new, old, returns, mask, cliprange_value=0.2)
    # token 0: clipped prediction 0.2 -> max(0.25, 0.64) = 0.64; token 1: 0.01 either way
    assert close(loss, 0.5 * (0.64 + 0.01) / 2)
    assert close(stats["clipfrac"], 0.5)


def test_losses_give_gradients_only_through_valid_tokens():
    new = torch.zeros(1, 3, requires_grad=True)
    loss, _ = clipped_policy_loss(
        new, torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([[1, 0, 1]]).bool(), 0.2
    )
    loss.backward()
    assert new.grad[0, 1] == 0 and new.grad[0, 0] != 0


# ------------------------------------------------------------------------------------------------
# Configuration and the command line
# ------------------------------------------------------------------------------------------------
SEED_FLAGS = (
    "--response_length 1300 --temperature 0.5 --local_rollout_forward_batch_size 8 --num_ppo_epochs 3 "
    "--num_mini_batches 1 --total_episodes 20000 --per_device_train_batch_size 1 --gradient_accumulation_steps 16 "
    "--bf16 True --output_dir {out} --save_strategy steps --save_step 20 --save_total_limit 1 "
    "--eval_strategy steps --eval_steps 20 --kl_coef 0.03 --learning_rate 5e-7 --warmup_ratio 0.05 "
    "--gradient_checkpointing True --dataloader_num_workers 4 --run_name ppo_medical_o1_8B "
    "--num_sample_generations -1 --report_to wandb"
).split()


def device_bf16(monkeypatch, supported: bool) -> None:
    for where in ("huatuo.models.bf16_supported", "huatuo.ppo.bf16_supported"):
        monkeypatch.setattr(where, lambda: supported)


def test_bf16_follows_the_device_and_accelerate_unless_opted_out(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    base = ["--model_name_or_path", "p", "--dataset_name", "d.json", "--output_dir", str(tmp_path)]
    for supported in (True, False):
        device_bf16(monkeypatch, supported)
        assert RL_stage2.parse_args(base)[-1].bf16 is supported
    device_bf16(monkeypatch, True)
    assert RL_stage2.parse_args(base + ["--bf16", "False"])[-1].bf16 is False
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch --mixed_precision no
    assert RL_stage2.parse_args(base)[-1].bf16 is False


def test_seed_command_parses(tmp_path, monkeypatch):
    device_bf16(monkeypatch, False)
    argv = [
        "--model_name_or_path", "policy", "--reward_model_path", "verifier", "--value_model_path", "value",
        "--dataset_name", "problems.json",
    ] + [flag.format(out=tmp_path) for flag in SEED_FLAGS]  # fmt: skip
    with pytest.warns(UserWarning, match="no bf16 support"):
        script_args, model_args, _, config = RL_stage2.parse_args(argv)
    assert model_args.value_model_path == "value" and script_args.algorithm == "ppo"
    assert config.save_steps == 20  # --save_step is argparse's abbreviation of --save_steps
    assert config.bf16 is False  # no bf16 on the device: warned and trained in fp32
    assert config.gradient_checkpointing is True
    assert config.num_sample_generations == -1 and config.report_to == ["wandb"]
    assert config.warmup_steps == 0.05 and config.get_warmup_steps(471) == 24
    assert (config.response_length, config.kl_coef, config.temperature, config.total_episodes) == (
        1300,
        0.03,
        0.5,
        20000,
    )
    assert (config.cliprange, config.cliprange_value, config.vf_coef, config.gamma, config.lam) == (
        0.2,
        0.2,
        0.1,
        1.0,
        0.95,
    )


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="--rollout_backend must be 'hf' or 'vllm'"):
        PPOConfig(output_dir=str(tmp_path), rollout_backend="sglang", report_to="none")
    with pytest.raises(ValueError, match="--temperature must be > 0"):
        PPOConfig(output_dir=str(tmp_path), temperature=0.0, report_to="none")
    with pytest.raises(SystemExit):
        RL_stage2.parse_args(["--algorithm", "dpo"])
    with pytest.raises(SystemExit):  # PPO recomputes its log-probabilities and weighs no sample
        RL_stage2.parse_args(["--vllm_importance_sampling_correction", "False"])


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setattr("huatuo.models.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ImportError, match="make install.*--rollout_backend hf"):
        check_vllm_installed()


def test_pad_token_differs_from_eos_when_the_vocabulary_allows(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    tokenizer.pad_token = tokenizer.eos_token
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|end_of_text|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def write_problems(path: Path, items) -> Path:
    path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return path


def test_problem_loading_drops_empty_items_and_holds_out_ten_percent(tmp_path):
    items = [{QUESTION: f"Which vitamin {i}?", ANSWER: f"vitamin {i}", "other": i} for i in range(30)]
    items += [{QUESTION: "  ", ANSWER: "x"}, {QUESTION: "q", ANSWER: ""}, {QUESTION: "q"}]
    path = write_problems(tmp_path / "problems.json", items)
    script_args = RL_stage2.ScriptArguments(dataset_name=str(path))
    train, held_out, dropped = RL_stage2.load_problems(script_args, seed=0)
    assert dropped == 3 and len(held_out) == 3 and len(train) == 27
    assert {p["reference"] for p in train + held_out} == {f"vitamin {i}" for i in range(30)}
    again, _, _ = RL_stage2.load_problems(script_args, seed=0)
    assert [p["index"] for p in again] == [p["index"] for p in train]  # the shuffle is seeded
    assert [p["index"] for p in train] != sorted(p["index"] for p in train)


def test_problem_loading_errors_name_item_and_field(tmp_path):
    path = write_problems(tmp_path / "bad.json", [{QUESTION: "q", ANSWER: "a"}, {QUESTION: 7, ANSWER: "a"}])
    with pytest.raises(InputError, match=r"item 1, key 'Open-ended Verifiable Question' must be a string"):
        RL_stage2.load_problems(RL_stage2.ScriptArguments(dataset_name=str(path)), seed=0)
    path = write_problems(tmp_path / "mcq.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(InputError, match="no item has both"):
        RL_stage2.load_problems(RL_stage2.ScriptArguments(dataset_name=str(path)), seed=0)


def test_find_checkpoint(tmp_path):
    assert find_checkpoint(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint-"):
        find_checkpoint("latest", str(tmp_path))
    for n in (2, 10):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    assert find_checkpoint("latest", str(tmp_path)).name == "checkpoint-10"
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        find_checkpoint(str(tmp_path), str(tmp_path))


# ------------------------------------------------------------------------------------------------
# A toy verifiable task: name the colour of the thing in the prompt
# ------------------------------------------------------------------------------------------------
TOY_WORDS = [
    "sky",
    "grass",
    "colour",
    "answer",
    "blue",
    "green",
    "red",
    "black",
    "white",
    "tree",
    "cloud",
    "stone",
]
TOY_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]


def toy_models(seed: int = 0):
    """A one-word-per-token vocabulary of 15, so a random 1-layer policy names the right colour in a
    2-token response about 1 time in 7 and PPO has a signal to climb from."""
    vocab = {w: i for i, w in enumerate(TOY_SPECIAL + TOY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|end_of_text|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    fields = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, bos_token_id=0, pad_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(LlamaConfig(**fields))
    ref_policy = LlamaForCausalLM(LlamaConfig(**fields))
    ref_policy.load_state_dict(policy.state_dict())
    value = LlamaForSequenceClassification(LlamaConfig(num_labels=1, **fields))
    data = [
        {"input_ids": tokenizer(f"<|begin_of_text|> {thing} colour answer")["input_ids"], "reference": colour}
        for thing, colour in (("sky", "blue"), ("grass", "green"))
    ]
    return tokenizer, policy, ref_policy, value, data


class RuleOnAnswer:
    """The rule verifier applied to the bare response: the toy policy answers without the
    Thinking/Final Response layout, which the real reward checks first."""

    def __init__(self):
        self.levels = RewardFunction("rule")

    def judge(self, responses, references):
        return [rule_judge(r, ref) for r, ref in zip(responses, references, strict=True)]

    def rewards(self, judgements):
        return self.levels.rewards(judgements)


def toy_config(output_dir, updates: int, **overrides) -> PPOConfig:
    fields = dict(
        output_dir=str(output_dir), report_to="none", save_strategy="no", eval_strategy="no", seed=0,
        learning_rate=3e-3, lr_scheduler_type="constant", warmup_ratio=0.0, per_device_train_batch_size=8,
        gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=4, response_length=2, temperature=1.0,
        kl_coef=0.01, local_rollout_forward_batch_size=16, total_episodes=16 * updates,
    )  # fmt: skip
    fields.update(overrides)
    return PPOConfig(**fields)


def read_metrics(output_dir) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_ppo_learns_a_toy_verifiable_task(tmp_path):
    tokenizer, policy, ref_policy, value, data = toy_models()
    trainer = PPOTrainer(toy_config(tmp_path, 12), tokenizer, policy, ref_policy, value, RuleOnAnswer(), data)
    trainer.train()
    scores = [m["objective/scores"] for m in read_metrics(tmp_path)]
    assert len(scores) == 12
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    # 0.1 for a wrong answer, 1.0 for the right colour: from about 0.2 to nearly always right
    assert first < 0.45 and last > 0.8, scores
    record = read_metrics(tmp_path)[-1]
    for key in ("objective/kl", "objective/entropy", "objective/rlhf_reward", "policy/approxkl_avg",
                "policy/clipfrac_avg", "loss/value_avg", "val/clipfrac_avg", "eps", "time/rollout", "time/reward",
                "time/update", "lr", "episode"):  # fmt: skip
        assert math.isfinite(record[key]), key
    assert record["episode"] == 12 * 16


def final_weights(output_dir) -> dict:
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


def run_toy(output_dir, updates: int, models, resume: bool = False, **overrides) -> None:
    tokenizer, policy, ref_policy, value, data = models
    trainer = PPOTrainer(
        toy_config(output_dir, updates, **overrides),
        tokenizer,
        policy,
        ref_policy,
        value,
        RuleOnAnswer(),
        data,
    )
    trainer.train(resume_from=find_checkpoint("latest", str(output_dir)) if resume else None)


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_toy(straight, 3, toy_models(), num_ppo_epochs=1)

    # the same run stopped after 2 updates (a checkpoint each update, only the newest kept) ...
    checkpointing = dict(save_strategy="steps", save_steps=1, save_total_limit=1, num_ppo_epochs=1)
    run_toy(interrupted, 2, toy_models(), **checkpointing)
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == ["checkpoint-2"]
    # ... whose log holds an update the checkpoint never saw, as after a crash, and a line torn by the kill
    with open(interrupted / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"update": 3, "objective/scores": -1}) + "\n")
        f.write('{"update": 4, "objective/sco')

    # ... resumed to 3 updates with the policy and value model starting from other weights (the checkpoint
    # replaces them) and the reference from the original ones: the same weights as the straight run
    tokenizer, _, ref_policy, _, data = toy_models()
    _, policy, _, value, _ = toy_models(seed=1)
    run_toy(interrupted, 3, (tokenizer, policy, ref_policy, value, data), resume=True, **checkpointing)
    assert [m["update"] for m in read_metrics(interrupted)] == [1, 2, 3]
    assert read_metrics(interrupted)[2]["objective/scores"] != -1
    expected, got = final_weights(straight), final_weights(interrupted)
    for name, tensor in expected.items():
        assert torch.allclose(tensor, got[name], atol=1e-6), name


def test_a_kill_while_replacing_a_checkpoint_leaves_one_to_resume_from(tmp_path, monkeypatch):
    checkpointing = dict(save_strategy="steps", save_steps=1, save_total_limit=1, num_ppo_epochs=1)
    run_toy(tmp_path, 2, toy_models(), **checkpointing)
    # A rerun of the finished run saves checkpoint-2 again and is killed while an old copy is being deleted.
    rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        path = Path(path)
        if path.name.endswith("checkpoint-2") and path.is_dir():
            rmtree(path / "state")
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        run_toy(tmp_path, 2, toy_models(), resume=True, **checkpointing)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    run_toy(tmp_path, 3, toy_models(), resume=True, **checkpointing)
    assert [m["update"] for m in read_metrics(tmp_path)] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# LoRA: the reference is the policy with its adapter switched off
# ------------------------------------------------------------------------------------------------
def lora_toy_models(adapter_seed: int = 0):
    """The toy models with a rank-4 adapter on the policy and one on the value model; no reference model."""
    tokenizer, policy, _, value, data = toy_models()
    lora = SimpleNamespace(lora_r=4, lora_alpha=None, lora_dropout=0.0, lora_target_modules=["all-linear"])
    torch.manual_seed(adapter_seed)
    policy = get_peft_model(policy, lora_config(lora))
    value = get_peft_model(value, lora_config(lora, task_type="SEQ_CLS"))
    return tokenizer, policy, None, value, data


def test_lora_reference_is_the_base_model_and_resume_is_exact(tmp_path):
    from safetensors.torch import load_file
    from trl.trainer.utils import selective_log_softmax

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    checkpointing = dict(save_strategy="steps", save_steps=1, save_total_limit=1, num_ppo_epochs=1)
    tokenizer, policy, _, value, data = lora_toy_models()
    trainer = PPOTrainer(
        toy_config(straight, 3, num_ppo_epochs=1), tokenizer, policy, None, value, RuleOnAnswer(), data
    )
    trainer.train()
    run_toy(interrupted, 2, lora_toy_models(), **checkpointing)
    # resumed with other initial adapters, which the checkpoint replaces
    run_toy(interrupted, 3, lora_toy_models(adapter_seed=1), resume=True, **checkpointing)
    assert [m["update"] for m in read_metrics(interrupted)] == [1, 2, 3]
    expected, got = final_weights(straight), final_weights(interrupted)
    for name, tensor in expected.items():
        assert torch.allclose(tensor, got[name], atol=1e-6), name
    for folder in ("adapter", "value/adapter"):
        expected = load_file(straight / folder / "adapter_model.safetensors")
        got = load_file(interrupted / folder / "adapter_model.safetensors")
        assert expected.keys() == got.keys() and expected, folder
        assert all(torch.allclose(tensor, got[k], atol=1e-6) for k, tensor in expected.items()), folder
    assert (interrupted / "checkpoint-3" / "adapter" / "adapter_config.json").is_file()

    # After training, the reference log-probabilities are still the untouched base model's, while the
    # policy's own (adapter on) have moved away from them.
    _, base, _, _, _ = toy_models()
    rollout = trainer._sample([row["input_ids"] for row in data * 4], temperature=1.0)
    scored = trainer._score_rollout(rollout, [row["reference"] for row in data * 4])
    ids, mask, positions, width = PPOTrainer._joined(rollout, torch.arange(len(data) * 4), "cpu")
    with torch.no_grad(), trainer.accelerator.autocast():  # the precision the trainer scores in
        base_logits = response_logits(base.eval(), ids, mask, positions, width)
    base_logprobs = selective_log_softmax(base_logits, ids[:, -width:], temperature=1.0)
    valid = rollout.response_mask[:, :width]
    assert torch.allclose(scored["ref_logprobs"][:, :width][valid], base_logprobs[valid], atol=1e-5)
    assert (scored["logprobs"][:, :width][valid] - base_logprobs[valid]).abs().max() > 1e-3


def test_a_missing_reference_needs_a_lora_policy(tmp_path):
    tokenizer, policy, _, value, data = toy_models()
    with pytest.raises(ValueError, match="no reference model given"):
        PPOTrainer(toy_config(tmp_path, 1), tokenizer, policy, None, value, RuleOnAnswer(), data)


# ------------------------------------------------------------------------------------------------
# The seed command, scaled down, end to end on the tiny policy, value model and verifier
# ------------------------------------------------------------------------------------------------
def test_seed_command_end_to_end_on_tiny_models(tiny_models, tmp_path):
    items = [
        {QUESTION: f"Which vitamin deficiency causes sign {i}?", ANSWER: f"vitamin {i}"} for i in range(20)
    ]
    data = write_problems(tmp_path / "problems.json", items)
    out = tmp_path / "ckpts"
    scaled = {"--response_length": "8", "--total_episodes": "8", "--gradient_accumulation_steps": "2",
              "--local_rollout_forward_batch_size": "2", "--save_step": "1", "--eval_steps": "1",
              "--learning_rate": "1e-5", "--dataloader_num_workers": "0"}  # fmt: skip
    flags = [flag.format(out=out) for flag in SEED_FLAGS]
    for i in range(0, len(flags), 2):
        flags[i + 1] = scaled.get(flags[i], flags[i + 1])
    command = [
        sys.executable, str(ROOT / "RL_stage2.py"),
        "--model_name_or_path", str(tiny_models["policy"]), "--reward_model_path", str(tiny_models["verifier"]),
        "--value_model_path", str(tiny_models["value"]), "--dataset_name", str(data), *flags,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    # 8 episodes / (1 x 2 x 1) = 4 updates; a checkpoint each update, save_total_limit 1 keeps the last
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    metrics = read_metrics(out)
    assert [m["update"] for m in metrics] == [1, 2, 3, 4]
    assert all(0 <= m["eval/format_rate"] <= 1 and m["eval/count"] == 2 for m in metrics)
    assert len((out / "samples" / "update-4.jsonl").read_text().splitlines()) == 2  # -1: every sample
    assert list((out / "wandb").glob("offline-run-*")), "wandb should default to offline"
    saved = json.loads((out / "run_args.json").read_text())
    assert saved["save_steps"] == 1 and "hub_token" not in saved

    for folder in (out / "checkpoint-4", out):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        messages = [{"role": "user", "content": "Which vitamin?"}]
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        generated = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert generated.shape[1] == prompt["input_ids"].shape[1] + 3
    value = AutoModelForSequenceClassification.from_pretrained(out / "checkpoint-4" / "value")
    assert value.config.num_labels == 1


def test_two_processes_split_each_update_and_resume(tiny_models, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rolls out half of every update, evaluation covers the
    held-out split once across both, and a checkpoint holds both processes' RNG state for resume."""
    items = [
        {QUESTION: f"Which vitamin deficiency causes sign {i}?", ANSWER: f"vitamin {i}"} for i in range(30)
    ]
    data = write_problems(tmp_path / "problems.json", items)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "RL_stage2.py"), "--model_name_or_path", str(tiny_models["policy"]),
        "--value_model_path", str(tiny_models["value"]), "--reward_model_path", "rule", "--dataset_name", str(data),
        "--output_dir", str(out), "--response_length", "6", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--local_rollout_forward_batch_size", "4", "--save_strategy", "steps",
        "--save_steps", "1", "--save_total_limit", "1", "--eval_strategy", "steps", "--eval_steps", "1",
        "--num_sample_generations", "-1", "--report_to", "none",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    for episodes in ("16", "32"):
        resume = ["--resume_from_checkpoint", "latest"] if episodes == "32" else []
        result = subprocess.run(
            [*command, "--total_episodes", episodes, *resume],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        if episodes == "16":
            state = out / "checkpoint-2" / "state"
            assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in state.iterdir()}

    # 2 processes x 2 x 2 = 8 prompts per update; 3 held-out problems (10% of 30) shared by the processes
    metrics = read_metrics(out)
    assert [(m["update"], m["episode"]) for m in metrics] == [(1, 8), (2, 16), (3, 24), (4, 32)]
    assert all(m["eval/count"] == 3 for m in metrics)
    assert len((out / "samples" / "update-4.jsonl").read_text().splitlines()) == 3


# Runs the stage script with a trainer that first records, for each model it is handed, whether every
# parameter arrived as an empty ZeRO-3 partition and whether the gathered weights are the saved ones.
PARTITION_PROBE = """\
import json, sys
sys.path.insert(0, {root!r})
import deepspeed
import torch
from safetensors.torch import load_file
import RL_stage2

class RecordingTrainer(RL_stage2.PPOTrainer):
    def __init__(self, config, tokenizer, policy, ref_policy, value_model, *args, **kwargs):
        report = {{}}
        for name, model in (("policy", policy), ("reference", ref_policy), ("value", value_model)):
            saved = load_file(f"{{model.name_or_path}}/model.safetensors")
            params = dict(model.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values())):
                same = all(torch.equal(params[k].float(), v.float()) for k, v in saved.items())
            report[name] = {{
                "partitioned": all(p.numel() == 0 and p.ds_numel == saved[k].numel() for k, p in params.items()),
                "weights_as_saved": same and set(params) == set(saved),
            }}
        with open({report!r}, "w") as f:
            json.dump(report, f)
        super().__init__(config, tokenizer, policy, ref_policy, value_model, *args, **kwargs)

RL_stage2.PPOTrainer = RecordingTrainer
RL_stage2.main(RL_stage2.parse_args())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_launch_loads_partitioned_models_trains_saves_and_resumes(tiny_models, tmp_path):
    """accelerate launch with a ZeRO-3 config (1 CPU process): the policy, reference and value model are
    created partitioned by from_pretrained (zero.Init), not materialised whole and split afterwards; the
    run trains, writes full-weight Hugging Face checkpoints with ZeRO shards for resume, and resumes."""
    items = [
        {QUESTION: f"Which vitamin deficiency causes sign {i}?", ANSWER: f"vitamin {i}"} for i in range(20)
    ]
    data = write_problems(tmp_path / "problems.json", items)
    (tmp_path / "zero3.yaml").write_text(ZERO3_CPU_CONFIG)
    report = tmp_path / "loaded.json"
    probe = tmp_path / "probe.py"
    probe.write_text(PARTITION_PROBE.format(root=str(ROOT), report=str(report)))
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "zero3.yaml"),
        "--main_process_port", str(free_port()), str(probe),
        "--model_name_or_path", str(tiny_models["policy"]), "--value_model_path", str(tiny_models["value"]),
        "--reward_model_path", "rule", "--dataset_name", str(data), "--output_dir", str(out),
        "--response_length", "6", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--local_rollout_forward_batch_size", "4", "--learning_rate", "1e-5", "--save_strategy", "steps",
        "--save_steps", "1", "--save_total_limit", "1", "--eval_strategy", "steps", "--eval_steps", "1",
        "--report_to", "none",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for episodes in ("8", "16"):
        resume = ["--resume_from_checkpoint", "latest"] if episodes == "16" else []
        report.unlink(missing_ok=True)
        result = subprocess.run(
            [*command, "--total_episodes", episodes, *resume],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = json.loads(report.read_text())
        assert loaded == {
            name: {"partitioned": True, "weights_as_saved": True} for name in ("policy", "reference", "value")
        }
        if episodes == "8":
            assert (out / "checkpoint-2" / "state" / "pytorch_model").is_dir()  # the ZeRO shards

    # 4 prompts per update: 2 updates, then 2 more after the resume (a fresh start would log 1 and 2 again)
    assert [m["update"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    tokenizer = AutoTokenizer.from_pretrained(out / "checkpoint-4")
    policy = AutoModelForCausalLM.from_pretrained(out / "checkpoint-4")
    original = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    trained, start = policy.state_dict(), original.state_dict()
    assert all(trained[k].shape == v.shape for k, v in start.items())
    assert any(not torch.equal(trained[k], v) for k, v in start.items()), "the policy never changed"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which vitamin?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )  # fmt: skip
    generated = policy.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3
    value = AutoModelForSequenceClassification.from_pretrained(out / "checkpoint-4" / "value")
    assert value.config.num_labels == 1


def test_grpo_batch_mismatch_is_reported_before_any_model_loads(tiny_models, tmp_path):
    data = write_problems(tmp_path / "problems.json", [{QUESTION: "Which vitamin?", ANSWER: "C"}] * 4)
    argv = [
        "--algorithm", "grpo", "--model_name_or_path", str(tiny_models["policy"]),
        "--reward_model_path", str(tmp_path / "verifier_not_downloaded_yet"), "--dataset_name", str(data),
        "--output_dir", str(tmp_path / "grpo"), "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "3", "--num_generations", "4", "--report_to", "none",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="must be a multiple of --num_generations 4"):
        RL_stage2.main(RL_stage2.parse_args(argv))


def test_grpo_runs_through_the_stage_script(tiny_models, tmp_path):
    items = [
        {QUESTION: f"Which vitamin deficiency causes sign {i}?", ANSWER: f"vitamin {i}"} for i in range(10)
    ]
    data = write_problems(tmp_path / "problems.json", items)
    out = tmp_path / "grpo"
    argv = [
        "--algorithm", "grpo", "--model_name_or_path", str(tiny_models["policy"]), "--reward_model_path", "rule",
        "--dataset_name", str(data), "--output_dir", str(out), "--response_length", "6", "--total_episodes", "8",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--num_generations", "4",
        "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
    ]  # fmt: skip
    RL_stage2.main(RL_stage2.parse_args(argv))
    logged = read_metrics(out)
    # the reward column reached TRL's reward function: its mean and the verifier's rates are logged
    assert any("rewards/medical_verifier/mean" in m and "correct_rate" in m for m in logged), logged
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 512


def test_lora_runs_through_the_stage_script_and_saves_servable_models(tiny_models, tmp_path):
    """PPO (value model trained in full) and GRPO with the Dr. GRPO loss, each with --lora_r: the final folder
    and every checkpoint hold a merged model that loads and generates, with the adapter in adapter/."""
    from safetensors.torch import load_file

    items = [
        {QUESTION: f"Which vitamin deficiency causes sign {i}?", ANSWER: f"vitamin {i}"} for i in range(10)
    ]
    data = write_problems(tmp_path / "problems.json", items)
    common = [
        "--model_name_or_path", str(tiny_models["policy"]), "--reward_model_path", "rule", "--dataset_name", str(data),
        "--response_length", "6", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no", "--report_to", "none",
        "--lora_r", "4", "--learning_rate", "1e-3",
    ]  # fmt: skip
    ppo, grpo = tmp_path / "ppo", tmp_path / "grpo"
    RL_stage2.main(RL_stage2.parse_args([
        *common, "--output_dir", str(ppo), "--total_episodes", "8", "--value_model_path", str(tiny_models["value"]),
        "--local_rollout_forward_batch_size", "4", "--no_lora_value_model",
    ]))  # fmt: skip
    grpo_flags = [*common, "--algorithm", "grpo", "--loss_type", "dr_grpo", "--num_generations", "4",
                  "--num_ppo_epochs", "1", "--logging_steps", "1"]  # fmt: skip
    RL_stage2.main(RL_stage2.parse_args([*grpo_flags, "--output_dir", str(grpo), "--total_episodes", "4"]))
    # a second GRPO run with a larger budget resumes from the adapter saved in checkpoint-1/adapter
    resumed = [
        *grpo_flags,
        "--output_dir",
        str(grpo),
        "--total_episodes",
        "8",
        "--resume_from_checkpoint",
        "latest",
    ]
    RL_stage2.main(RL_stage2.parse_args(resumed))
    assert [m["step"] for m in read_metrics(grpo) if "reward" in m] == [1, 2]

    for folder in (ppo, ppo / "checkpoint-1", grpo, grpo / "checkpoint-2"):
        assert not (folder / "adapter_config.json").exists(), folder  # loads as a full model, not an adapter
        config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_models["policy"])
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Which vitamin?"}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )  # fmt: skip
        generated = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert generated.shape[1] == prompt["input_ids"].shape[1] + 3
    # --no_lora_value_model: the value model trained every weight, its embeddings included, and has no adapter
    value = AutoModelForSequenceClassification.from_pretrained(ppo / "value").state_dict()
    start = load_file(tiny_models["value"] / "model.safetensors")
    assert not (ppo / "value" / "adapter").exists()
    assert not torch.equal(value["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    saved = json.loads((grpo / "run_args.json").read_text())
    assert saved["loss_type"] == "dr_grpo" and saved["lora_r"] == 4
    with pytest.raises(SystemExit):
        RL_stage2.parse_args([*common, "--output_dir", str(ppo), "--loss_type", "dr_grpo"])  # PPO has none


def test_evaluation_takes_the_policy_for_generation_once(tmp_path):
    """Under ZeRO-3 taking the policy for generation gathers all its weights: once for the held-out split, not once
    per chunk of --local_rollout_forward_batch_size prompts."""
    tokenizer, policy, ref_policy, value, data = toy_models()
    config = toy_config(tmp_path, 1, local_rollout_forward_batch_size=2)
    trainer = PPOTrainer(config, tokenizer, policy, ref_policy, value, RuleOnAnswer(), data, data * 3)
    taken = []
    original = trainer._policy_for_generation

    @contextmanager
    def counted():
        taken.append(1)
        with original() as model:
            yield model

    trainer._policy_for_generation = counted
    metrics = trainer.evaluate()
    assert metrics["eval/count"] == 6 and len(taken) == 1
