"""train_verifier.py: pairs from search records and labelled JSON, metrics, and a run on a separable toy set
whose output works as --reward_model_path, interrupted and resumed."""

import json
import random
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

import train_verifier
from huatuo.models import format_thinking_response
from huatuo.prompts import load_prompt
from huatuo.reward import RewardFunction
from train_verifier import binary_metrics, load_pairs, main, pairs_from_record, parse_args, query_pattern

PATTERNS = [query_pattern(load_prompt("verify", lang)) for lang in ("en", "zh")]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def verify_call(conclusion, reference, reply, language="en"):
    query = load_prompt("verify", language).format(response=conclusion, reference=reference)
    return {"step": "verify", "query": query, "response": reply}


def test_help_explains_the_inputs(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "llm_log" in text and "--reward_model_path ckpts/verifier" in text  # inputs and the next step
    assert "--threshold THRESHOLD" in text and "(default:" in text


def test_pairs_from_a_search_record():
    record = {
        "process_id": 3,
        "Ground-True Answer": "Scurvy",
        "llm_log": [
            {"step": "Init_CoT", "query": "think about it", "response": '{"CoT": []}'},
            verify_call("The patient has {rickets}.", "Scurvy", "False"),
            {"step": "Re_CoT_Correction", "query": "try again", "response": '{"CoT": []}'},
            verify_call("Vitamin C deficiency, i.e. scurvy.\nSecond line.", "Scurvy", " TRUE."),
            verify_call("维生素C缺乏症", "坏血病", "True", language="zh"),
        ],
        "verify": [False, True, True],
    }
    assert pairs_from_record(record, "records.json item 0", PATTERNS) == [
        {"response": "The patient has {rickets}.", "reference": "Scurvy", "label": 0},
        {"response": "Vitamin C deficiency, i.e. scurvy.\nSecond line.", "reference": "Scurvy", "label": 1},
        {"response": "维生素C缺乏症", "reference": "坏血病", "label": 1},
    ]
    record["llm_log"].append({"step": "verify", "query": "a prompt from elsewhere", "response": "True"})
    with pytest.raises(ValueError, match=r"records.json item 0: llm_log\[5\].query does not match"):
        pairs_from_record(record, "records.json item 0", PATTERNS)


def test_load_pairs_from_files_and_folders(tmp_path):
    labelled = [
        {"response": "Scurvy.", "reference": "scurvy", "label": True},
        {"response": "Rickets.", "reference": "scurvy", "label": "False"},
        {"response": "Vitamin C deficiency.", "reference": "scurvy", "label": 1},
    ]
    (tmp_path / "pairs.json").write_text(json.dumps(labelled))
    folder = tmp_path / "demo_CoT_search"
    folder.mkdir()
    (folder / "1.json").write_text(json.dumps({"llm_log": [verify_call("Rickets", "Scurvy", "false")]}))
    (folder / "2.json").write_text(json.dumps({"llm_log": [verify_call("Scurvy", "Scurvy", "true")]}))
    pairs = load_pairs([str(tmp_path / "pairs.json"), str(folder)])
    assert [p["label"] for p in pairs] == [1, 0, 1, 0, 1]
    assert pairs[3] == {"response": "Rickets", "reference": "Scurvy", "label": 0}

    bad = [labelled[0], {"response": "x", "reference": "y", "label": "maybe"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad.json item 1: label must be"):
        load_pairs([str(tmp_path / "bad.json")])
    (tmp_path / "missing.json").write_text(json.dumps([{"response": "x", "label": 1}]))
    with pytest.raises(ValueError, match=r"missing.json item 0: missing field 'reference'"):
        load_pairs([str(tmp_path / "missing.json")])


def test_binary_metrics_by_hand():
    probs = [0.9, 0.45, 0.3, 0.8, 0.1]
    labels = [1, 1, 1, 0, 0]
    # threshold 0.4: predictions 1, 1, 0, 1, 0 -> tp 2, fp 1, fn 1, tn 1
    metrics = binary_metrics(probs, labels, 0.4)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["positive_rate"] == pytest.approx(3 / 5)
    assert binary_metrics(probs, labels, 0.95)["precision"] == 0.0


CORRECT = ["Vitamin C deficiency", "scurvy from low vitamin C", "ascorbic acid deficiency"]
WRONG = ["iron overload", "a broken femur", "acute appendicitis"]


def toy_pairs(n, seed):
    rng = random.Random(seed)
    return [
        {
            "response": f"{rng.choice(CORRECT if i % 2 else WRONG)} (case {seed}-{i})",
            "reference": "vitamin C deficiency",
            "label": bool(i % 2),
        }
        for i in range(n)
    ]


def toy_run(tiny_models, tmp_path):
    """(argv, output folder, prompt folder) of a 2-epoch run on the separable toy pairs."""
    # A short verifier prompt keeps the tiny model's sequences short; --prompt_dir is how users swap it too.
    prompt_dir = tmp_path / "prompts"
    prompt_dir.mkdir()
    (prompt_dir / "reward_verifier.txt").write_text("Answer: {response}\nReference: {reference}\nCorrect?")
    (tmp_path / "pairs.json").write_text(json.dumps(toy_pairs(80, seed=0)))
    out = tmp_path / "verifier"
    argv = [
        "--data_path", str(tmp_path / "pairs.json"),
        "--model_name_or_path", str(tiny_models["verifier"]),
        "--output_dir", str(out),
        "--prompt_dir", str(prompt_dir),
        "--num_epochs", "2",
        "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "8",
        "--gradient_accumulation_steps", "1",
        "--eval_fraction", "0.25",
    ]  # fmt: skip
    return argv, out, prompt_dir


def test_training_beats_chance_resumes_and_serves_as_reward_model(tiny_models, tmp_path, monkeypatch, capsys):
    argv, out, prompt_dir = toy_run(tiny_models, tmp_path)

    # Kill the first run right after its first epoch is recorded as done.
    write_json_atomic = train_verifier.write_json_atomic

    def write_then_die(*args, **kwargs):
        write_json_atomic(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_verifier, "write_json_atomic", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(parse_args(argv))
    monkeypatch.setattr(train_verifier, "write_json_atomic", write_json_atomic)
    assert not (out / "config.json").exists()

    AcceleratorState._reset_state(reset_partial_state=True)
    main(parse_args(argv))
    assert "resuming from" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "verifier_metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["eval_n"] == 20
    assert metrics[-1]["eval_accuracy"] > 0.8 > metrics[0]["eval_accuracy"]
    assert not (out / train_verifier.STATE_DIR).exists()
    saved_args = json.loads((out / "train_verifier_args.json").read_text())
    assert saved_args["num_epochs"] == 2

    # The folder is a --reward_model_path: fresh pairs, scored through the RL reward.
    rf = RewardFunction(str(out), device="cpu", prompt_dir=str(prompt_dir))
    fresh = toy_pairs(40, seed=1)
    responses = [format_thinking_response("hmm", p["response"]) for p in fresh]
    rewards = rf(responses, [p["reference"] for p in fresh])
    hits = sum((r == 1.0) == p["label"] for r, p in zip(rewards, fresh, strict=True))
    assert hits / len(fresh) > 0.8


def test_a_kill_while_saving_an_epoch_keeps_the_previous_one(tiny_models, tmp_path, monkeypatch, capsys):
    argv, out, _ = toy_run(tiny_models, tmp_path)
    save_state = train_verifier.Accelerator.save_state
    calls = []

    def torn_second_save(self, output_dir, *args, **kwargs):
        """The second epoch's save is killed half way: its files are left empty."""
        save_state(self, output_dir, *args, **kwargs)
        calls.append(output_dir)
        if len(calls) == 2:
            for path in Path(output_dir).iterdir():
                path.write_bytes(b"")
            raise KeyboardInterrupt

    monkeypatch.setattr(train_verifier.Accelerator, "save_state", torn_second_save)
    with pytest.raises(KeyboardInterrupt):
        main(parse_args(argv))
    monkeypatch.setattr(train_verifier.Accelerator, "save_state", save_state)

    AcceleratorState._reset_state(reset_partial_state=True)
    main(parse_args(argv))
    assert "after epoch 1" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "verifier_metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2]  # epoch 2, logged before the kill, is not doubled
    assert (out / "config.json").exists() and not (out / train_verifier.STATE_DIR).exists()
