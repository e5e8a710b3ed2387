import pytest

from huatuo.report import (
    first_last,
    markdown_table,
    paired_gain,
    plot_curve,
    question_rewards,
    read_jsonl,
    series,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_skips_blank_lines_and_a_truncated_last_line(tmp_path):
    path = write_lines(
        tmp_path / "m.jsonl", ['{"step": 1, "loss": 2.0}', "", '{"step": 2, "loss": 1.5}', '{"step": 3, "lo']
    )
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_read_jsonl_names_the_line_of_a_bad_row_before_the_end(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", ['{"step": 1}', "not json", '{"step": 3}'])
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not a JSON line"):
        read_jsonl(path)
    path = write_lines(tmp_path / "list.jsonl", ["[1, 2]", '{"step": 2}'])
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(path)


def test_series_and_first_last_keep_only_finite_numbers():
    rows = [
        {"step": 1, "loss": 3.0},
        {"step": 2},
        {"step": 3, "loss": None},
        {"step": 4, "loss": float("nan")},
        {"step": 5, "loss": True},
        {"step": 6, "loss": 1.0, "eval/reward": 0.5},
    ]
    assert series(rows, "step", "loss") == ([1.0, 6.0], [3.0, 1.0])
    assert first_last(rows, "loss") == (3.0, 1.0)
    assert first_last(rows, "eval/reward") == (0.5, 0.5)
    assert first_last(rows, "missing") is None


def test_plot_curve_writes_a_png_with_every_series(tmp_path):
    rows = [{"episode": 4 * i, "scores": i / 10, "rlhf_reward": i / 20} for i in range(1, 6)]
    out = tmp_path / "plots" / "ppo.png"
    assert plot_curve(rows, "episode", ["scores", "rlhf_reward"], out, "PPO") == 10
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert plot_curve(rows, "episode", "scores", tmp_path / "one.png", "PPO", "reward") == 5


def test_plot_curve_fails_on_a_metric_no_row_has(tmp_path):
    with pytest.raises(ValueError, match="'score'"):
        plot_curve([{"episode": 1, "scores": 0.1}], "episode", ["scores", "score"], tmp_path / "x.png", "PPO")
    assert not (tmp_path / "x.png").exists()


def test_markdown_table_escapes_pipes_and_newlines():
    table = markdown_table(["stage", "figure"], [["sft", "loss 6.2 -> 5.1"], ["a|b", "two\nlines"]])
    assert table.splitlines() == [
        "| stage | figure |",
        "|---|---|",
        "| sft | loss 6.2 -> 5.1 |",
        "| a\\|b | two lines |",
    ]


WELL_FORMED = "## Thinking\n\nIt is {}.\n\n## Final Response\n\n{}"


def reply(source, question, answer, output):
    return {"source": source, "question": question, "answer": answer, "output": output}


def test_question_rewards_key_each_reply_by_source_and_question():
    replies = [
        reply("s", "q1", "Measles", WELL_FORMED.format("measles", "Measles")),
        reply("s", "q2", "Mumps", WELL_FORMED.format("rubella", "Rubella")),
        reply("t", "q1", "yes", "yes"),
    ]
    assert question_rewards(replies) == {("s", "q1"): 1.0, ("s", "q2"): 0.1, ("t", "q1"): 0.0}


def test_paired_gain_pairs_by_question_whatever_the_order():
    right, wrong = WELL_FORMED.format("x", "Measles"), WELL_FORMED.format("x", "Mumps")
    before = [reply("s", f"q{i}", "Measles", wrong) for i in range(10)]
    # the second run answered in another order and got the first four right
    after = [reply("s", f"q{i}", "Measles", right if i < 4 else wrong) for i in reversed(range(10))]
    gain = paired_gain(before, after)
    assert gain.value == pytest.approx(0.4 * 0.9)
    assert 0 < gain.low < gain.value < gain.high <= 0.9
    assert paired_gain(before, before).value == 0


def test_paired_gain_refuses_runs_on_different_questions():
    first = [reply("s", "q1", "a", "a"), reply("s", "q2", "a", "a")]
    with pytest.raises(ValueError, match="different questions"):
        paired_gain(first, first[:1])


def test_plot_fitted_draws_points_and_fit_lines(tmp_path):
    from huatuo.report import plot_fitted
    from huatuo.stats import slope

    xs, ys = [1.0, 2.0, 3.0, 4.0], [0.1, 0.3, 0.2, 0.5]
    path = tmp_path / "fit.png"
    plot_fitted({"ppo": (xs, ys, slope(xs, ys)), "grpo": (xs, ys[::-1], None)}, path, "t", "update", "reward")
    assert path.read_bytes().startswith(PNG_MAGIC)
