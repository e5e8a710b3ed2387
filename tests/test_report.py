import pytest

from huatuo.report import first_last, markdown_table, plot_curve, read_jsonl, series

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
