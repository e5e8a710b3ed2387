"""The real-model RL bench's own steps, offline: its data split and curve summaries."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_rl_real as bench
from huatuo.items import MCQ, VERIFIABLE, check_items, load_eval_file, load_items
from huatuo.problems import check_disjoint
from tests.test_problems import MEDMCQA, MEDQA, MMLU_PRO, PUBMEDQA

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_rl_real.py"


def test_help_runs_as_a_script():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--sft_model" in out.stdout and "--rollout_backend" in out.stdout


def test_quick_and_full_sizes_and_the_group_check():
    quick = bench.parse_args(["--eval_dir", "x", "--quick"])
    full = bench.parse_args(["--eval_dir", "x", "--ppo_updates", "9"])
    assert (quick.per_source, quick.ppo_updates, quick.grpo_updates, quick.response_length) == (3, 2, 2, 32)
    assert (full.per_source, full.ppo_updates, full.grpo_updates, full.response_length) == (50, 9, 30, 256)
    assert full.grpo_learning_rate > full.ppo_learning_rate
    with pytest.raises(SystemExit):
        bench.parse_args(["--eval_dir", "x", "--episodes_per_update", "6", "--group_size", "4"])
    with pytest.raises(SystemExit):  # 16 episodes do not split into groups of 3
        bench.parse_args(["--eval_dir", "x", "--group_size", "3"])


def test_build_data_splits_training_from_held_out(tmp_path):
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    for name, items in (("medmcqa.json", MEDMCQA), ("medqa.json", MEDQA), ("mmlu_pro_medical.json", MMLU_PRO),
                        ("pubmedqa.json", PUBMEDQA)):  # fmt: skip
        (eval_dir / name).write_text(json.dumps(items))
    args = bench.parse_args(["--eval_dir", str(eval_dir), "--per_source", "1", "--train_medmcqa", "2"])
    train_path, heldout_path, summary = bench.build_data(args, tmp_path)
    training = check_items(json.loads(train_path.read_text()), VERIFIABLE)
    heldout = load_eval_file(heldout_path, MCQ)
    assert set(heldout) == {
        "MedQA_USLME_test",
        "MMLU-Pro_Medical_test",
        "PubMedQA_test",
        "MedMCQA_validation",
    }
    assert summary["held-out questions"] == 4 and all(len(v) == 1 for v in heldout.values())
    demo = load_items(bench.DEMO_DATA, MCQ)
    assert summary["training problems"] == len(training) == len(demo) + 2
    for items in heldout.values():
        check_disjoint(training, items)


def test_training_summary_of_ppo_and_grpo_metrics():
    ppo = [{"update": u, "objective/scores": 0.1 * u, "objective/kl": 0.02, "val/response_length": 100.0}
           for u in range(1, 5)]  # fmt: skip
    summary = bench.training_summary(ppo)
    assert summary["reward_key"] == "objective/scores"
    assert summary["slope"].value == pytest.approx(0.1) and summary["slope"].above_zero
    assert (summary["kl"], summary["response_length"]) == (pytest.approx(0.02), 100.0)
    grpo = [
        {"step": 1, "reward": 0.3, "kl": 0.0, "completions/mean_length": 30.0},
        {"step": 1, "train_loss": 0},
    ]
    summary = bench.training_summary(grpo)
    assert summary["reward_key"] == "reward" and summary["slope"] is None
    with pytest.raises(ValueError, match="no training reward"):
        bench.training_summary([{"step": 1, "loss": 0.3}])


def test_a_rerun_reuses_an_arm_that_finished_training(tmp_path, monkeypatch):
    args = bench.parse_args(["--eval_dir", "x", "--quick", "--out_dir", str(tmp_path)])
    runner = bench.Bench(args)
    commands = []
    monkeypatch.setattr(runner, "run", lambda cmd, stage: commands.append((stage, cmd)))
    assert bench.train_arm(runner, "ppo", tmp_path / "sft", tmp_path / "train.json") == tmp_path / "ppo"
    assert [stage for stage, _ in commands] == ["ppo"]  # nothing there yet: it trains
    (tmp_path / "ppo" / "model.safetensors").parent.mkdir()
    (tmp_path / "ppo" / "model.safetensors").write_bytes(b"")
    bench.train_arm(runner, "ppo", tmp_path / "sft", tmp_path / "train.json")
    bench.train_arm(runner, "grpo", tmp_path / "sft", tmp_path / "train.json")
    assert [stage for stage, _ in commands] == ["ppo", "grpo"]  # the finished PPO arm is not trained again
    ppo_cmd, grpo_cmd = (cmd for _, cmd in commands)

    def flag(cmd, name):
        return cmd[cmd.index(f"--{name}") + 1]

    # each arm trains at its own learning rate for its own number of updates
    assert flag(ppo_cmd, "learning_rate") == str(args.ppo_learning_rate)
    assert flag(grpo_cmd, "learning_rate") == str(args.grpo_learning_rate)
    assert flag(grpo_cmd, "total_episodes") == str(args.grpo_updates * args.episodes_per_update)
    assert flag(grpo_cmd, "num_generations") == str(args.group_size)
    # GRPO trains on the engine's samples unweighted unless asked; PPO has no such flag
    assert flag(grpo_cmd, "vllm_importance_sampling_correction") == "False"
    assert "--vllm_importance_sampling_correction" not in ppo_cmd
    args.grpo_importance_sampling = True
    bench.train_arm(runner, "grpo", tmp_path / "sft", tmp_path / "train.json")
    assert flag(commands[-1][1], "vllm_importance_sampling_correction") == "True"


def test_the_tiny_models_never_get_vllm():
    # vLLM's CPU attention refuses the tiny models' head size of 16
    tiny = bench.parse_args(["--eval_dir", "x", "--quick", "--model", "tiny"])
    assert (tiny.rollout_backend, tiny.server) == ("hf", "transformers")
    chosen = bench.parse_args(["--eval_dir", "x", "--rollout_backend", "hf", "--server", "transformers"])
    assert (chosen.rollout_backend, chosen.server) == ("hf", "transformers")
