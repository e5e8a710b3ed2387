"""Small readers and writers for run reports: metrics.jsonl files, curves as PNG, markdown tables.

rows = read_jsonl("train_logs/sft_stage1/metrics.jsonl")
plot_curve(rows, "step", "loss", "report/sft_loss.png", title="SFT loss")
plot_diagnostics(read_jsonl("ckpts/ppo/metrics.jsonl"), "report/ppo_diagnostics.png", title="PPO")
plot_fitted({"ppo": (updates, rewards, slope(updates, rewards))}, "report/reward.png", "Reward", "update", "reward")
print(markdown_table(["stage", "wall time"], [["sft", "12.3 s"]]))
"""

import json
import math
from pathlib import Path


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a JSON-lines file, one per non-blank line.

    A writer killed mid-line leaves a truncated last line; that one line is dropped, while a bad line
    anywhere else is an error naming the file and line number.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def series(rows: list[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """The (x, y) points of the rows holding a finite number under both keys, in file order."""
    xs, ys = [], []
    for row in rows:
        x, y = row.get(x_key), row.get(y_key)
        if _is_number(x) and _is_number(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def first_last(rows: list[dict], key: str) -> tuple[float, float] | None:
    """The first and last finite values of `key` in the rows, or None when no row has one."""
    values = [float(row[key]) for row in rows if _is_number(row.get(key))]
    return (values[0], values[-1]) if values else None


def plot_curve(rows: list[dict], x_key: str, y_keys, path, title: str, ylabel: str | None = None) -> int:
    """Draw each of y_keys (a key or a list of keys) against x_key as one PNG at `path`.

    Returns the number of points drawn. Raises ValueError when a key has no point, so a renamed metric
    shows up as an error rather than as an empty plot.
    """
    y_keys = [y_keys] if isinstance(y_keys, str) else list(y_keys)
    curves = {}
    for y_key in y_keys:
        xs, ys = series(rows, x_key, y_key)
        if not xs:
            raise ValueError(f"no row has numbers under both {x_key!r} and {y_key!r}")
        curves[y_key] = (xs, ys)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for y_key, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=y_key)
    ax.set_title(title)
    ax.set_xlabel(x_key)
    ax.set_ylabel(ylabel or y_keys[0])
    if len(curves) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return sum(len(xs) for xs, _ in curves.values())


def plot_fitted(curves: dict, path, title: str, xlabel: str, ylabel: str) -> None:
    """One PNG at `path` with each curve's points and its least-squares line: curves maps a label to
    (xs, ys, fit), fit a huatuo.stats.slope Estimate (or None: points only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, (xs, ys, fit) in curves.items():
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if fit is not None:
            x0, y0 = sum(xs) / len(xs), sum(ys) / len(ys)
            ends = [min(xs), max(xs)]
            ax.plot(
                ends,
                [y0 + fit.value * (x - x0) for x in ends],
                linestyle="--",
                color=line.get_color(),
                label=f"fit: {fit.value:+.4f} per {xlabel}",
            )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


# What to look at when an RL run does not learn, each under the key our PPO logs and the key TRL's GRPO logs.
DIAGNOSTICS = {
    "reward": ("objective/scores", "reward"),
    "format rate": ("objective/format_rate", "format_rate"),
    "correct rate": ("objective/correct_rate", "correct_rate"),
    "KL to the reference": ("objective/kl", "kl"),
    "entropy": ("objective/entropy", "entropy"),
    "response length (tokens)": ("val/response_length", "completions/mean_length"),
    "clip fraction": ("policy/clipfrac_avg", "clip_ratio/region_mean"),
    "value loss": ("loss/value_avg",),
    "explained variance of values": ("val/explained_variance",),
    "groups with equal rewards": ("frac_reward_zero_std",),
}


def progress_key(rows: list[dict]) -> str:
    """What a metrics file counts its rows by: "update" for our PPO, "step" for TRL's trainers."""
    return "update" if any("update" in row for row in rows) else "step"


def diagnostic(rows: list[dict], label: str) -> tuple[str, list[float], list[float]] | None:
    """(key, xs, ys) of the DIAGNOSTICS entry `label` under the first of its keys the rows hold, against
    progress_key; None when the rows hold none of them."""
    x_key = progress_key(rows)
    for key in DIAGNOSTICS[label]:
        xs, ys = series(rows, x_key, key)
        if xs:
            return key, xs, ys
    return None


def plot_diagnostics(rows: list[dict], path, title: str) -> list[str]:
    """One PNG at `path` with a panel per diagnostic found in the rows of a metrics.jsonl (our PPO's, by
    "update", or TRL's GRPO/RLOO, by "step"): reward, format and correct rates, KL, entropy, response length,
    clip fraction, and for PPO value loss and explained variance, for GRPO the share of groups whose rewards
    are all equal (no advantage to learn from). Returns the panels drawn; raises ValueError when none is."""
    x_key = progress_key(rows)
    panels = {label: found for label in DIAGNOSTICS if (found := diagnostic(rows, label))}
    if not panels:
        raise ValueError(
            f"no diagnostic key ({', '.join(k for keys in DIAGNOSTICS.values() for k in keys)}) found"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows_of_panels = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(
        rows_of_panels, columns, figsize=(4 * columns, 2.8 * rows_of_panels), dpi=100, squeeze=False
    )
    # the grid's spare cells, past the last panel, are left blank
    for ax, (label, (key, xs, ys)) in zip(axes.flat, panels.items(), strict=False):
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(f"{label}\n{key}", fontsize=9)
        ax.set_xlabel(x_key, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return list(panels)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table; cells are converted with str() and pipes escaped."""

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def question_rewards(records: list[dict]) -> dict[tuple[str, str], float]:
    """The RL reward (rule verifier against the correct option's text) of each eval reply, keyed by (source,
    question). `records` are eval.py's items ("source", "question", "answer", "output")."""
    from huatuo.reward import RewardFunction

    reward = RewardFunction("rule")
    judgements = reward.judge([r.get("output") or "" for r in records], [str(r["answer"]) for r in records])
    return {
        (r["source"], r["question"]): value
        for r, value in zip(records, reward.rewards(judgements), strict=True)
    }


def paired_gain(baseline: list[dict], treatment: list[dict], seed: int = 0):
    """Mean reward of `treatment`'s replies minus `baseline`'s on the same eval questions, with its 95% bootstrap
    interval over questions (huatuo.stats.paired_difference). Both are eval.py replies to one eval file."""
    from huatuo.stats import paired_difference

    before, after = question_rewards(baseline), question_rewards(treatment)
    if set(before) != set(after):
        raise ValueError(
            f"the two runs answered different questions ({len(set(before) ^ set(after))} not in both)"
        )
    keys = sorted(before)
    return paired_difference([before[k] for k in keys], [after[k] for k in keys], seed=seed)


def reply_scores(records: list[dict]) -> dict[str, dict]:
    """The RL reward applied to eval replies: per source, and over all of them under "all", the share of
    replies in the trained layout (the reward's own format check), the share the rule verifier finds the
    correct option's text in, and the mean reward. `records` are eval.py's items ("source", "answer", "output")."""
    from huatuo.reward import RewardFunction, reward_stats

    reward = RewardFunction("rule")
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["source"], []).append(record)
    groups["all"] = list(records)
    scores = {}
    for source, rows in groups.items():
        judgements = reward.judge([r.get("output") or "" for r in rows], [str(r["answer"]) for r in rows])
        stats = reward_stats(judgements, reward.rewards(judgements))
        scores[source] = {
            "items": len(rows),
            "format_rate": stats["format_rate"],
            "correct_rate": stats["correct_rate"],
            "mean_reward": stats["reward"],
        }
    return scores


def comparison_markdown(
    rewards: dict[str, dict], summaries: dict[str, dict], max_new_tokens: int, gain=None, trend=None
) -> str:
    """Models side by side on held-out questions (`rewards`: reply_scores per model, `summaries`: eval.py's
    summary per model), with the demo's targets: format rate after SFT at least 0.8, and PPO no lower than
    SFT in format rate and mean reward. `gain` (paired_gain of PPO over SFT) and `trend` (the slope of PPO's
    training reward per update), huatuo.stats Estimates, are reported with their intervals and whether those
    exclude 0."""
    overall = {label: r["all"] for label, r in rewards.items()}
    rows = [
        [
            label,
            f"{o['format_rate']:.2f}",
            f"{o['mean_reward']:.3f}",
            f"{overall_accuracy(summaries[label]):.1%}",
        ]
        for label, o in overall.items()
    ]
    checks = []
    if {"sft", "ppo"} <= set(overall):
        sft, ppo = overall["sft"], overall["ppo"]
        checks = [
            target_line("format rate after SFT", sft["format_rate"], 0.8),
            target_line("format rate after PPO, against SFT", ppo["format_rate"], sft["format_rate"]),
            target_line("mean reward after PPO, against SFT", ppo["mean_reward"], sft["mean_reward"]),
        ]
    if trend is not None:
        checks.append(
            f"PPO training reward per update: slope {trend.text(4)}: "
            + ("rising beyond noise" if trend.above_zero else "not distinguishable from a flat line")
        )
    if gain is not None:
        checks.append(
            f"PPO - SFT in held-out mean reward, paired over the questions: {gain.text()}: "
            + (
                "a gain beyond chance"
                if gain.above_zero
                else "not distinguishable from chance at this size (the interval holds 0); "
                "bench/bench_rl_real.py measures it on 200 questions (figures in the README)"
            )
        )
    items = next(iter(overall.values()))["items"]
    return (
        f"## Learning, on {items} held-out questions ({max_new_tokens}-token replies, greedy)\n\n"
        + markdown_table(["model", "format rate", "mean reward", "accuracy (last match)"], rows)
        + "\n\n"
        + "".join(f"- {line}\n" for line in checks)
        + "\nFormat rate: replies with one `## Thinking` and one `## Final Response` (the RL reward's check). "
        "Mean reward: the RL reward with the rule verifier against the correct option's text (1 correct, "
        "0.1 well formed, 0 otherwise). Models this small are near chance on these exams (20-25% with 4-5 "
        "options, 33% on PubMedQA's yes/no/maybe), and a few questions per source are a small sample.\n"
    )


def target_line(what: str, value: float, target: float) -> str:
    verdict = "met" if value >= target else f"missed by {target - value:.2f}"
    return f"{what}: {value:.2f} (target >= {target:.2f}): {verdict}"


def overall_accuracy(summary: dict) -> float:
    sources = summary["sources"].values()
    return sum(s["correct"] for s in sources) / max(sum(s["items"] for s in sources), 1)


def per_source_markdown(rewards: dict[str, dict], summaries: dict[str, dict]) -> str:
    rows = []
    for label, summary in summaries.items():
        for source, m in summary["sources"].items():
            r = rewards[label][source]
            rows.append(
                [
                    label,
                    source,
                    m["items"],
                    f"{m['accuracy']:.1%}",
                    f"{m['no_answer_rate']:.0%}",
                    f"{r['format_rate']:.2f}",
                    f"{r['mean_reward']:.3f}",
                    m["failed_items"],
                ]
            )
    headers = [
        "model",
        "source",
        "items",
        "accuracy (last match)",
        "no answer",
        "format rate",
        "mean reward",
        "failed",
    ]
    return "## Per source\n\n" + markdown_table(headers, rows) + "\n"
