"""GRPO and RLOO through TRL with the stage-2 reward: GRPO learns a toy verifiable task, RLOO runs end to
end with the classifier verifier, saves loadable checkpoints and resumes."""

import json
import shutil
from types import SimpleNamespace

import datasets
import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, AutoTokenizer

from huatuo.models import format_thinking_response
from huatuo.reward import RewardFunction
from huatuo.rl_trl import check_trl_batch, completion_text, make_trl_reward, trl_config
from tests.conftest import question

# The toy task: every question's reference answer is "red"; the warm-started policy (tests/conftest.py) says red or
# blue at random, so the rule verifier pays 1.0 or 0.1 and GRPO has to shift it towards red.


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Trainers share accelerate's process-wide state; start and leave each test with none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def toy_dataset(n, start=0):
    return datasets.Dataset.from_list([{"prompt": question(start + i), "reference": "red"} for i in range(n)])


def stage2_args(**overrides):
    """The stage-2 flags train_with_trl reads, scaled down for a CPU."""
    fields = dict(
        per_device_train_batch_size=8,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=1,
        num_generations=8,
        response_length=8,
        temperature=1.0,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        kl_coef=0.0,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def sampled_reward(model_path, n=64, seed=1):
    """Mean rule reward of n sampled answers to unseen questions."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    prompts = [
        tokenizer.apply_chat_template(question(1000 + i), tokenize=False, add_generation_prompt=True)
        for i in range(n)
    ]
    batch = tokenizer(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **batch, do_sample=True, temperature=1.0, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id
        )
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(RewardFunction("rule")(texts, ["red"] * n)) / n


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


LORA = dict(lora_r=8, lora_alpha=None, lora_dropout=0.0, lora_target_modules=["all-linear"])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_grpo_learns_the_toy_task(warm_policy, tmp_path, lora):
    from huatuo.rl_trl import train_with_trl

    before = sampled_reward(warm_policy)
    # The adapter cannot touch the output head, where full training shifts red against blue directly, so it
    # climbs more slowly: twice the steps at a similar step size.
    steps, extra = (32, dict(LORA, learning_rate=3e-3)) if lora else (16, {})
    args = stage2_args(
        model_name_or_path=str(warm_policy),
        output_dir=str(tmp_path / "grpo"),
        total_episodes=8 * steps,
        **extra,
    )
    train_with_trl("grpo", args, toy_dataset(64), None, RewardFunction("rule"))
    after = sampled_reward(tmp_path / "grpo")  # with LoRA the merged model, as a server would load it

    train_logs = [m for m in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if "reward" in m]
    assert len(train_logs) == steps  # ceil(total_episodes / (8 per device * 1 accumulation * 1 process))
    first, last = [sum(m["reward"] for m in logs) / 4 for logs in (train_logs[:4], train_logs[-4:])]
    assert 0.4 < before < 0.75  # well formed, red about half the time
    assert after > 0.9
    assert last > first + 0.2
    assert (tmp_path / "grpo" / "adapter" / "adapter_config.json").is_file() == lora
    assert all(0.0 <= m["correct_rate"] <= m["format_rate"] <= 1.0 for m in train_logs)


def test_rloo_end_to_end_with_classifier_verifier_and_resume(warm_policy, tiny_models, tmp_path):
    from huatuo.rl_trl import train_with_trl

    out = tmp_path / "rloo"
    reward_fn = RewardFunction(str(tiny_models["verifier"]), device="cpu")
    common = dict(
        model_name_or_path=str(warm_policy),
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=4,
        kl_coef=0.05,
        learning_rate=1e-4,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        eval_strategy="steps",
        eval_steps=2,
    )
    train_with_trl(
        "rloo", stage2_args(total_episodes=16, **common), toy_dataset(16), toy_dataset(4, 100), reward_fn
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # save_total_limit 1
    with open(
        out / "metrics.jsonl", "a"
    ) as f:  # as if a crash had come after logging a step past the checkpoint
        f.write(json.dumps({"step": 3, "reward": -1.0}) + "\n")
    # A second run with a larger budget picks up from checkpoint-2 instead of starting over.
    resumed = stage2_args(total_episodes=32, resume_from_checkpoint="latest", **common)
    train_with_trl("rloo", resumed, toy_dataset(16), toy_dataset(4, 100), reward_fn)

    logs = read_metrics(out / "metrics.jsonl")
    train_steps = [m["step"] for m in logs if "reward" in m]
    assert train_steps == [1, 2, 3, 4]
    assert all(m["reward"] != -1.0 for m in logs if "reward" in m)
    evals = [m for m in logs if "eval_reward" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(0.0 <= m["eval_correct_rate"] <= m["eval_format_rate"] <= 1.0 for m in evals)
    assert all(m["eval_format_rate"] > 0.5 for m in evals)  # the warm policy keeps its format
    for folder in (out, out / "checkpoint-4"):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.vocab_size >= len(tokenizer) and tokenizer.chat_template
    shutil.rmtree(out)


def test_flag_mapping_and_batch_checks():
    args = stage2_args(
        output_dir="unused",
        response_length=1300,
        temperature=0.5,
        kl_coef=0.03,
        num_ppo_epochs=3,
        cliprange=0.2,
        total_episodes=20000,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=16,
        save_steps=20,
        gradient_checkpointing=True,
        hub_token="hf_secret",
    )
    config = trl_config("grpo", args, world_size=8)
    assert (config.max_completion_length, config.temperature, config.beta) == (1300, 0.5, 0.03)
    assert (config.num_iterations, config.epsilon, config.num_generations) == (3, 0.2, 8)
    # TRL trains num_iterations (3) optimizer steps on each sampled batch: 20000 episodes sampled need
    # ceil(20000 * 3 / (1 * 16 * 8)) steps
    assert config.max_steps == 469
    assert config.save_steps == 20 and config.hub_token is None
    assert config.loss_type == "dapo"  # TRL's default when --loss_type is not given
    assert (
        trl_config("grpo", SimpleNamespace(**{**vars(args), "loss_type": "dr_grpo"}), 8).loss_type
        == "dr_grpo"
    )
    assert config.gradient_checkpointing
    assert config.vllm_importance_sampling_correction  # TRL's default where the flag is left unset
    unweighted = SimpleNamespace(**{**vars(args), "vllm_importance_sampling_correction": False})
    assert not trl_config("grpo", unweighted, 8).vllm_importance_sampling_correction
    assert (
        not config.use_vllm
        and trl_config("rloo", SimpleNamespace(**{**vars(args), "rollout_backend": "vllm"}), 8).use_vllm
    )

    with pytest.raises(ValueError, match="must be a multiple of --num_generations 6"):
        check_trl_batch(
            "grpo",
            stage2_args(num_generations=6, per_device_train_batch_size=1, gradient_accumulation_steps=16),
            1,
        )
    with pytest.raises(ValueError, match="at least 2"):
        check_trl_batch("rloo", stage2_args(num_generations=1), 1)
    with pytest.raises(ValueError, match="--loss_type must be one of grpo, dr_grpo"):
        trl_config("grpo", SimpleNamespace(**{**vars(args), "loss_type": "drgrpo"}), 8)
    with pytest.raises(ValueError, match="--loss_type selects a GRPO loss"):
        trl_config("rloo", SimpleNamespace(**{**vars(args), "loss_type": "dr_grpo"}), 8)
    with pytest.raises(ValueError, match="unknown algorithm 'dpo'"):
        trl_config("dpo", args)


def test_trl_reward_wrapper_reads_chat_completions_and_logs_rates():
    logged = {}
    reward = make_trl_reward(RewardFunction("rule"))
    good = format_thinking_response("hmm", "red")
    completions = [[{"role": "assistant", "content": good}], [{"role": "assistant", "content": "red"}]]
    rewards = reward(
        prompts=[question(0)] * 2,
        completions=completions,
        reference=["red", "red"],
        log_metric=logged.__setitem__,
    )
    assert rewards == [1.0, 0.0]
    assert logged == {"correct_rate": 0.5, "format_rate": 0.5}
    assert completion_text("plain text") == "plain text"
