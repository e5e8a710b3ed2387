"""SFT stage on the tiny policy and the demo data, on a CPU."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import SFT_stage1
from huatuo.models import ensure_pad_token, format_thinking_response
from huatuo.sft import (
    IGNORE_INDEX,
    latest_checkpoint,
    list_checkpoints,
    rotate_checkpoints,
    truncate_metrics,
)
from tests.conftest import ZERO3_CPU_CONFIG

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo_data.json"


def _run_args(tiny_models, data, tmp_path, *extra):
    return SFT_stage1.parse_args(
        [
            "--model_path",
            str(tiny_models["policy"]),
            "--data_path",
            str(data),
            "--output_dir",
            str(tmp_path / "ckpts"),
            "--log_dir",
            str(tmp_path / "logs"),
            "--max_seq_len",
            "256",
            "--train_bsz_per_gpu",
            "4",
            "--gradient_accumulation_steps",
            "1",
            "--n_epochs",
            "2",
            "--learning_rate",
            "3e-3",
            "--report_to",
            "none",
            *extra,
        ]
    )


def _metrics(log_root):
    path = Path(log_root) / "sft_stage1" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _collate(tokenized, tokenizer, padding_free=False):
    examples = [
        {"input_ids": i, "labels": la}
        for i, la in zip(tokenized["input_ids"], tokenized["labels"], strict=True)
    ]
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(
        examples
    )


def _state_dict(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft_data") / "sft.json"
    path.write_text(json.dumps(json.loads(DEMO.read_text())[:8]))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["policy"])


@pytest.fixture(scope="module")
def trained(tiny_models, small_data, tmp_path_factory):
    """One uninterrupted run: 8 items, batch 4, 2 epochs = 4 steps, a checkpoint after every step."""
    tmp = tmp_path_factory.mktemp("sft_run")
    args = _run_args(
        tiny_models, small_data, tmp, "--save_steps", "1", "--max_ckpts", "10", "--dump_examples", "2"
    )
    SFT_stage1.main(args)
    return tmp


def test_help_lists_the_original_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        SFT_stage1.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--experiment_name",
        "--max_ckpts",
        "--warmup_rates",
        "--train_bsz_per_gpu",
        "--packing",
        "--resume",
        "--lora_r",
        "--lora_alpha",
        "--lora_dropout",
        "--lora_target_modules",
    ):
        assert flag in text


def test_bad_lora_flags_are_refused_by_name(capsys):
    for flags, message in (
        (["--lora_r", "-1"], "--lora_r must be 0"),
        (["--lora_r", "8", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
        (["--lora_r", "8", "--lora_alpha", "0"], "--lora_alpha must be positive"),
    ):
        with pytest.raises(SystemExit):
            SFT_stage1.parse_args(["--model_path", "m", *flags])
        assert message in capsys.readouterr().err


def test_labels_mask_exactly_the_prompt_and_the_padding(tokenizer):
    batch = {
        "Question": ["Why does aspirin help?", "Q2?"],
        "Complex_CoT": ["It blocks COX.", "Hmm."],
        "Response": ["Less platelet aggregation.", "Yes, a longer answer here."],
    }
    out = SFT_stage1.tokenize_batch(batch, tokenizer, max_seq_len=4096)
    for i in range(2):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": batch["Question"][i]}], tokenize=False, add_generation_prompt=True
        )
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids, labels = out["input_ids"][i], out["labels"][i]
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        # The assistant's text and its end-of-turn token are supervised, nothing else.
        expected = (
            format_thinking_response(batch["Complex_CoT"][i], batch["Response"][i]) + tokenizer.eos_token
        )
        assert tokenizer.decode(labels[n_prompt:]) == expected
        assert ids[-1] == tokenizer.eos_token_id

    padded = _collate(out, tokenizer)
    short = 0 if len(out["input_ids"][0]) < len(out["input_ids"][1]) else 1
    n = len(out["input_ids"][short])
    assert (padded["labels"][short, n:] == IGNORE_INDEX).all()
    assert (padded["attention_mask"][short, n:] == 0).all()
    assert padded["labels"][short, :n].tolist() == out["labels"][short]


def test_a_pad_less_tokenizer_gets_a_pad_apart_from_eos(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|end_of_text|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_truncation_keeps_the_last_tokens(tokenizer):
    batch = {
        "Question": ["A long question " * 20],
        "Complex_CoT": ["reasoning " * 20],
        "Response": ["the end"],
    }
    full = SFT_stage1.tokenize_batch(batch, tokenizer, max_seq_len=10_000)
    cut = SFT_stage1.tokenize_batch(batch, tokenizer, max_seq_len=32)
    assert len(full["input_ids"][0]) > 32
    assert cut["input_ids"][0] == full["input_ids"][0][-32:]
    assert cut["labels"][0] == full["labels"][0][-32:]
    assert tokenizer.decode(cut["input_ids"][0]).endswith("the end" + tokenizer.eos_token)


def test_file_without_sft_keys_fails_before_the_model_loads(tmp_path, tiny_models):
    data = tmp_path / "mcq.json"
    data.write_text(json.dumps([{"question": "q", "answer": "a"}, {"question": "q2", "answer": "b"}]))
    args = _run_args(tiny_models, data, tmp_path)
    args.model_path = str(tmp_path / "no_such_model")  # would raise OSError if it were loaded
    with pytest.raises(ValueError, match="Question, Complex_CoT, Response"):
        SFT_stage1.main(args)


def test_parquet_without_sft_keys_fails_before_the_model_loads(tmp_path, tiny_models):
    import datasets

    data = tmp_path / "mcq.parquet"
    datasets.Dataset.from_list([{"question": "q", "answer": "a"}]).to_parquet(str(data))
    args = _run_args(tiny_models, data, tmp_path)
    args.model_path = str(tmp_path / "no_such_model")
    with pytest.raises(ValueError, match="none of its 1 items has any of the SFT keys"):
        SFT_stage1.main(args)


def test_empty_data_fails_clearly(tmp_path, tiny_models):
    data = tmp_path / "empty.json"
    data.write_text("[]")
    with pytest.raises(ValueError, match="no items"):
        SFT_stage1.main(_run_args(tiny_models, data, tmp_path))


def test_bad_items_are_counted_and_skipped_with_one_warning(tmp_path, caplog):
    from huatuo.models import load_records

    good = {"Question": "q", "Complex_CoT": "c", "Response": "r"}
    items = [
        good,
        {**good, "Response": "  "},
        {"Question": "q", "Complex_CoT": "c"},
        {**good, "Complex_CoT": None},
        good,
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(i) for i in items))
    records = load_records(str(data), columns=list(SFT_stage1.SFT_KEYS))
    with caplog.at_level(logging.WARNING, logger="sft_stage1"):
        kept = SFT_stage1.select_valid(records, str(data))
    assert len(kept) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 3 of 5" in warnings[0] and "item 1 field 'Response'" in warnings[0]


def test_non_text_field_fails_clearly(tmp_path, tiny_models):
    data = tmp_path / "numbers.json"
    data.write_text(
        json.dumps(
            [
                {"Question": "q", "Complex_CoT": "c", "Response": "r"},
                {"Question": "q", "Complex_CoT": "c", "Response": 42},
            ]
        )
    )
    with pytest.raises(ValueError, match="item 1 field 'Response' holds number where item 0 holds str"):
        SFT_stage1.main(_run_args(tiny_models, data, tmp_path))


def test_training_lowers_the_loss_and_writes_the_original_layout(trained, tiny_models, small_data, tokenizer):
    run = trained / "ckpts" / "sft_stage1"
    names = [p.name for p in list_checkpoints(run)]
    assert names == ["checkpoint-0-1", "checkpoint-0-2", "checkpoint-1-3", "checkpoint-1-4"]
    final = latest_checkpoint(run) / "tfmr"
    reloaded_tok = AutoTokenizer.from_pretrained(final)
    assert reloaded_tok.chat_template and reloaded_tok.eos_token == tokenizer.eos_token

    records = SFT_stage1.load_records(str(small_data), columns=list(SFT_stage1.SFT_KEYS))
    examples = SFT_stage1.tokenize_batch(records.to_dict(), tokenizer, max_seq_len=256)
    batch = _collate(examples, tokenizer)
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])(**batch).loss.item()
        after = AutoModelForCausalLM.from_pretrained(final)(**batch).loss.item()
    assert after < before - 0.05

    rows = _metrics(trained / "logs")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(
        0 <= r["token_accuracy"] <= 1 and r["supervised_tokens_per_second"] > 0 and r["lr"] is not None
        for r in rows
    )
    saved = json.loads((trained / "logs" / "sft_stage1" / "args.json").read_text())
    assert saved["max_seq_len"] == 256 and (run / "args.json").is_file()
    dumped = json.loads((trained / "logs" / "sft_stage1" / "examples.json").read_text())
    assert len(dumped) == 2 and dumped[0]["supervised_text"].endswith("<|eot_id|>")


def test_resume_ends_where_an_uninterrupted_run_ends(trained, tiny_models, small_data, tmp_path):
    shutil.copytree(trained / "ckpts", tmp_path / "ckpts")
    shutil.copytree(trained / "logs", tmp_path / "logs")
    run = tmp_path / "ckpts" / "sft_stage1"
    for name in ("checkpoint-0-2", "checkpoint-1-3", "checkpoint-1-4"):
        shutil.rmtree(run / name)
    # A checkpoint cut short by a kill has no trainer_state.json and must be ignored.
    (run / "checkpoint-0-2" / "tfmr").mkdir(parents=True)
    assert latest_checkpoint(run).name == "checkpoint-0-1"

    SFT_stage1.main(
        _run_args(tiny_models, small_data, tmp_path, "--save_steps", "1", "--max_ckpts", "10", "--resume")
    )

    expected = _state_dict(trained / "ckpts" / "sft_stage1" / "checkpoint-1-4" / "tfmr")
    resumed = _state_dict(run / "checkpoint-1-4" / "tfmr")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    rows, original = _metrics(tmp_path / "logs"), _metrics(trained / "logs")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in original], rel=1e-5)


LORA_FLAGS = (
    "--save_steps",
    "1",
    "--max_ckpts",
    "10",
    "--lora_r",
    "8",
    "--learning_rate",
    "2e-2",
    "--packing",
)


@pytest.fixture(scope="module")
def trained_lora(tiny_models, small_data, tmp_path_factory):
    """The uninterrupted run of `trained`, training a rank-8 adapter instead of every weight, on packed rows."""
    tmp = tmp_path_factory.mktemp("sft_lora_run")
    SFT_stage1.main(_run_args(tiny_models, small_data, tmp, *LORA_FLAGS))
    return tmp


def test_lora_lowers_the_loss_and_tfmr_is_the_merged_adapter(
    trained_lora, tiny_models, small_data, tokenizer
):
    from peft import PeftModel

    run = trained_lora / "ckpts" / "sft_stage1"
    assert [p.name for p in list_checkpoints(run)] == [
        "checkpoint-0-1", "checkpoint-0-2", "checkpoint-1-3", "checkpoint-1-4",
    ]  # fmt: skip
    final = latest_checkpoint(run)
    assert not (final / "tfmr" / "adapter_config.json").exists()  # a plain model folder, servable as is
    records = SFT_stage1.load_records(str(small_data), columns=list(SFT_stage1.SFT_KEYS))
    batch = _collate(SFT_stage1.tokenize_batch(records.to_dict(), tokenizer, max_seq_len=256), tokenizer)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    merged = AutoModelForCausalLM.from_pretrained(final / "tfmr")
    with torch.no_grad():
        before = base(**batch).loss.item()
        merged_out = merged(**batch)
        with_adapter = PeftModel.from_pretrained(base, final / "adapter")(**batch)
    assert merged_out.loss.item() < before - 0.05
    torch.testing.assert_close(merged_out.logits, with_adapter.logits, rtol=1e-5, atol=1e-5)
    # only the adapted linear layers changed: embeddings, output head and norms are the base model's
    base_weights, merged_weights = _state_dict(tiny_models["policy"]), merged.state_dict()
    for name, tensor in base_weights.items():
        changed = not torch.equal(merged_weights[name], tensor)
        assert changed == name.endswith("proj.weight"), name
    assert AutoTokenizer.from_pretrained(final / "tfmr").chat_template


def test_lora_resume_ends_where_an_uninterrupted_run_ends(trained_lora, tiny_models, small_data, tmp_path):
    from safetensors.torch import load_file

    shutil.copytree(trained_lora / "ckpts", tmp_path / "ckpts")
    run = tmp_path / "ckpts" / "sft_stage1"
    for name in ("checkpoint-0-2", "checkpoint-1-3", "checkpoint-1-4"):
        shutil.rmtree(run / name)
    SFT_stage1.main(_run_args(tiny_models, small_data, tmp_path, *LORA_FLAGS, "--resume"))

    straight = trained_lora / "ckpts" / "sft_stage1" / "checkpoint-1-4"
    expected, resumed = _state_dict(straight / "tfmr"), _state_dict(run / "checkpoint-1-4" / "tfmr")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    adapter = "adapter/adapter_model.safetensors"
    expected, resumed = load_file(straight / adapter), load_file(run / "checkpoint-1-4" / adapter)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_biases_and_norm_weights_get_no_weight_decay(tiny_models):
    from huatuo.sft import SFTStage1Trainer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    decayed = set(SFTStage1Trainer.get_decay_parameter_names(None, model))
    for name, _ in model.named_parameters():
        assert (name in decayed) == ("norm" not in name and "bias" not in name), name


def test_a_fresh_run_refuses_to_overwrite_checkpoints(trained, tiny_models, small_data):
    with pytest.raises(ValueError, match="--resume"):
        SFT_stage1.main(_run_args(tiny_models, small_data, trained))


def test_zero3_without_gathered_saves_is_refused():
    zero3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}
    with pytest.raises(ValueError, match="zero3_save_16bit_model: true"):
        SFT_stage1.check_zero3_saves_full_weights(zero3)
    zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    SFT_stage1.check_zero3_saves_full_weights(zero3)
    SFT_stage1.check_zero3_saves_full_weights({"zero_optimization": {"stage": 2}})
    SFT_stage1.check_zero3_saves_full_weights(None)


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for name, complete in [
        ("checkpoint-0-5", True),
        ("checkpoint-0-10", True),
        ("checkpoint-1-12", False),
        ("checkpoint-1-20", True),
        ("checkpoint-2-30", True),
    ]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    rotate_checkpoints(tmp_path, max_ckpts=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1-20", "checkpoint-2-30"]


def test_resume_truncates_metrics_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.')
    truncate_metrics(path, last_step=1)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1, "loss": 2.0}]


def test_packed_rows_give_the_padded_loss_without_cross_example_attention(tiny_models, tokenizer):
    import huatuo.sft  # noqa: F401  (registers sdpa_varlen)

    batch = {
        "Question": ["First question?", "Second, different question?"],
        "Complex_CoT": ["c1 " * 30, "c2"],
        "Response": ["r1", "r2 " * 10],
    }
    out = SFT_stage1.tokenize_batch(batch, tokenizer, max_seq_len=512)
    padded = _collate(out, tokenizer)
    packed = _collate(out, tokenizer, padding_free=True)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed

    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], attn_implementation="sdpa_varlen")
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss, rtol=1e-5, atol=1e-5)
        # The second example's logits in the packed row equal those of the example run alone.
        n0 = len(out["input_ids"][0])
        alone = model(input_ids=torch.tensor([out["input_ids"][1]])).logits[0]
        in_row = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0, n0:]
        torch.testing.assert_close(in_row, alone, rtol=1e-4, atol=1e-4)


def test_two_cpu_processes_through_accelerate_match_one_process(trained, tiny_models, small_data, tmp_path):
    """Batch 2 on each of 2 gloo processes trains like batch 4 on one."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "cpu.yaml"),
        str(ROOT / "SFT_stage1.py"),
        "--model_path",
        str(tiny_models["policy"]),
        "--data_path",
        str(small_data),
        "--output_dir",
        str(tmp_path / "ckpts"),
        "--log_dir",
        str(tmp_path / "logs"),
        "--max_seq_len",
        "256",
        "--train_bsz_per_gpu",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--n_epochs",
        "2",
        "--learning_rate",
        "3e-3",
        "--report_to",
        "none",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = latest_checkpoint(tmp_path / "ckpts" / "sft_stage1")
    assert final.name == "checkpoint-1-4"
    assert {p.name for p in final.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    rows, single = _metrics(tmp_path / "logs"), _metrics(trained / "logs")
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in single], rel=1e-4)


# Runs the stage script with a trainer that first records whether the model it is handed arrived as empty
# ZeRO-3 partitions (created that way by from_pretrained under zero.Init) holding the saved weights.
PARTITION_PROBE = """\
import json, sys
sys.path.insert(0, {root!r})
import deepspeed
import torch
from safetensors.torch import load_file
import SFT_stage1

class RecordingTrainer(SFT_stage1.SFTStage1Trainer):
    def __init__(self, *args, model, **kwargs):
        saved = load_file(f"{{model.name_or_path}}/model.safetensors")
        params = dict(model.named_parameters())
        partitioned = all(
            p.numel() == 0 and p.ds_numel == saved[k].numel() and p.ds_status.name == "NOT_AVAILABLE"
            for k, p in params.items()
        )
        with deepspeed.zero.GatheredParameters(list(params.values())):
            same = set(params) == set(saved) and all(torch.equal(params[k], v) for k, v in saved.items())
        with open({report!r}, "w") as f:
            json.dump({{"partitioned": partitioned, "weights_as_saved": same}}, f)
        super().__init__(*args, model=model, **kwargs)

SFT_stage1.SFTStage1Trainer = RecordingTrainer
SFT_stage1.main(SFT_stage1.parse_args())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_launch_loads_partitioned_trains_saves_full_weights_and_resumes(
    trained, tiny_models, small_data, tmp_path
):
    """accelerate launch with a ZeRO-3 config (1 CPU process, no offload): the model is created partitioned,
    trains like the plain run, writes full-weight tfmr/ folders plus ZeRO shards, and resumes from them."""
    (tmp_path / "zero3.yaml").write_text(ZERO3_CPU_CONFIG)
    report = tmp_path / "loaded.json"
    probe = tmp_path / "probe.py"
    probe.write_text(PARTITION_PROBE.format(root=str(ROOT), report=str(report)))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "zero3.yaml"),
        "--main_process_port", str(free_port()), str(probe),
        "--model_path", str(tiny_models["policy"]), "--data_path", str(small_data),
        "--output_dir", str(tmp_path / "ckpts"), "--log_dir", str(tmp_path / "logs"), "--max_seq_len", "256",
        "--train_bsz_per_gpu", "4", "--gradient_accumulation_steps", "1", "--n_epochs", "2",
        "--learning_rate", "3e-3", "--report_to", "none", "--save_steps", "1", "--max_ckpts", "10",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "ckpts" / "sft_stage1"

    def launch(*extra):
        report.unlink(missing_ok=True)
        proc = subprocess.run(
            [*command, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(report.read_text()) == {"partitioned": True, "weights_as_saved": True}

    launch()
    names = [p.name for p in list_checkpoints(run)]
    assert names == ["checkpoint-0-1", "checkpoint-0-2", "checkpoint-1-3", "checkpoint-1-4"]
    assert (run / "checkpoint-1-4" / "global_step4").is_dir()  # the ZeRO shards that --resume reads
    # Same data, batches and optimiser as the plain one-process run, so the same losses.
    rows, single = _metrics(tmp_path / "logs"), _metrics(trained / "logs")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    uninterrupted = _state_dict(run / "checkpoint-1-4" / "tfmr")
    original = _state_dict(tiny_models["policy"])
    assert uninterrupted.keys() == original.keys()
    assert all(uninterrupted[k].shape == v.shape for k, v in original.items())  # gathered, not partitions
    assert any(not torch.equal(uninterrupted[k], v) for k, v in original.items()), "the weights never changed"

    for name in ("checkpoint-0-2", "checkpoint-1-3", "checkpoint-1-4"):
        shutil.rmtree(run / name)
    launch("--resume")
    resumed = _state_dict(run / "checkpoint-1-4" / "tfmr")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["step"] for r in _metrics(tmp_path / "logs")] == [1, 2, 3, 4]


def test_zero3_lora_checkpoints_hold_the_full_merged_model(tiny_models, small_data, tmp_path):
    """Under ZeRO-3 the stock save gathers only the adapter; tfmr/ must still get every weight, merged."""
    from peft import PeftModel

    (tmp_path / "zero3.yaml").write_text(ZERO3_CPU_CONFIG)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "zero3.yaml"),
        "--main_process_port", str(free_port()), str(ROOT / "SFT_stage1.py"),
        "--model_path", str(tiny_models["policy"]), "--data_path", str(small_data),
        "--output_dir", str(tmp_path / "ckpts"), "--log_dir", str(tmp_path / "logs"), "--max_seq_len", "256",
        "--train_bsz_per_gpu", "4", "--gradient_accumulation_steps", "1", "--n_epochs", "1",
        "--report_to", "none", "--lora_r", "8", "--learning_rate", "2e-2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = latest_checkpoint(tmp_path / "ckpts" / "sft_stage1")
    assert final.name == "checkpoint-0-2" and (final / "global_step2").is_dir()
    merged = AutoModelForCausalLM.from_pretrained(final / "tfmr")
    base = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    assert merged.state_dict().keys() == base.state_dict().keys()
    ids = torch.tensor([list(range(5, 60))])
    with torch.no_grad():
        merged_logits, base_logits = merged(input_ids=ids).logits, base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, final / "adapter")(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapted, rtol=1e-5, atol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter learned something
