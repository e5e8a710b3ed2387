"""The diagnostics an RL run logs and plots, so that a run that does not learn shows why."""

import json
import math

import pytest
import torch

from huatuo.ppo import explained_variance
from huatuo.ppo_trainer import PPOTrainer
from huatuo.report import plot_diagnostics, read_jsonl
from tests.test_ppo import RuleOnAnswer, read_metrics, toy_config, toy_models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_explained_variance_of_perfect_mean_and_masked_predictions():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 6.0, -99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    # the masked-out column is far off and must not count
    values = returns.clone()
    values[:, 3] = 0.0
    assert explained_variance(values, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 3.5), returns, mask) == pytest.approx(0.0)
    # residuals returns - values = [1, 0, -1, 1, 0, -1]: variance 0.8 of the returns' 3.5
    shifted = returns - torch.tensor([[1.0, 0.0, -1.0, 0.0], [1.0, 0.0, -1.0, 0.0]])
    assert explained_variance(shifted, returns, mask) == pytest.approx(1 - 0.8 / 3.5)
    assert explained_variance(-returns, returns, mask) < 0


def test_explained_variance_is_nan_when_returns_do_not_vary():
    returns = torch.ones(2, 3)
    assert math.isnan(explained_variance(torch.zeros(2, 3), returns, torch.ones(2, 3, dtype=torch.bool)))


def test_ppo_logs_the_explained_variance_of_its_values(tmp_path):
    tokenizer, policy, ref_policy, value, data = toy_models()
    PPOTrainer(toy_config(tmp_path, 2), tokenizer, policy, ref_policy, value, RuleOnAnswer(), data).train()
    records = read_metrics(tmp_path)
    assert len(records) == 2
    for record in records:
        ev = record["val/explained_variance"]
        assert math.isfinite(ev) and ev <= 1.0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_plot_diagnostics_draws_ppo_metrics(tmp_path):
    rows = [
        {"update": u, "objective/scores": 0.1 * u, "objective/format_rate": 0.9, "objective/correct_rate": 0.1,
         "objective/kl": 0.01 * u, "objective/entropy": 1.5, "val/response_length": 200 + u,
         "policy/clipfrac_avg": 0.05, "loss/value_avg": 0.3 / u, "val/explained_variance": -0.5 + 0.2 * u}
        for u in range(1, 6)
    ]  # fmt: skip
    metrics = write_jsonl(tmp_path / "metrics.jsonl", rows)
    out = tmp_path / "report" / "ppo.png"
    panels = plot_diagnostics(read_jsonl(metrics), out, title="PPO")
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert "explained variance of values" in panels and "value loss" in panels
    assert "groups with equal rewards" not in panels and len(panels) == 9


def test_plot_diagnostics_draws_grpo_metrics_by_step(tmp_path):
    rows = [
        {"step": s, "reward": 0.2, "kl": 0.001 * s, "entropy": 1.2, "completions/mean_length": 300.0,
         "correct_rate": 0.15, "format_rate": 0.8, "clip_ratio/region_mean": 0.0, "frac_reward_zero_std": 0.5,
         "loss": 0.01}
        for s in range(1, 4)
    ] + [{"step": 3, "eval_reward": 0.3, "eval_format_rate": 0.7}]  # fmt: skip
    out = tmp_path / "grpo.png"
    panels = plot_diagnostics(rows, out, title="GRPO")
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert "groups with equal rewards" in panels and "value loss" not in panels
    assert "response length (tokens)" in panels


def test_plot_diagnostics_names_the_keys_when_none_is_found(tmp_path):
    with pytest.raises(ValueError, match="objective/scores"):
        plot_diagnostics([{"step": 1, "loss": 0.5}], tmp_path / "x.png", title="SFT")
    assert not (tmp_path / "x.png").exists()
