"""How long evaluation.scorer.score takes per reply, on replies with no answer and on answered ones.

A reply with no recognisable answer runs every rule, so it is the slow case; an eval where a model
often runs out of tokens mid-thinking has many of them. Two sets of replies, built on the options of
real questions (each reply on its own question where there are enough, as in an eval run, so patterns
that depend on the options are built cold):

* no-answer: reasoning cut off before it names an option, as when a reply hits the token limit, in the
  `## Thinking` layout, an unclosed `<think>` block, or plain text, from a few sentences to thousands
  of characters. Letter-like terms (vitamin C, B cells, E. coli) make every rule work.
* answered: the agreement benchmark's synthetic replies (bench/bench_scorer_agreement.py).

Each reply is scored once, then the whole set again (as when replies are rescored for several runs or
samples of the same questions). Replies are split by what score() returned, and the mean and 99th
percentile milliseconds per call are printed for each kind.

    python bench/bench_scorer_speed.py
    python bench/bench_scorer_speed.py --n_replies 1000 --questions evaluation/data/eval_sample.json

Target: a mean of at most 7 ms per call on first scoring of no-answer replies, so that scoring the
full eval set (about 8,500 questions) takes under a minute even when no reply states an answer.
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_scorer_agreement import (  # noqa: E402
    FALLBACK_QUESTIONS,
    NOISE_EN,
    REFERENCE_EVAL,
    load_questions,
    synthetic_sets,
)

from evaluation.scorer import score  # noqa: E402

TARGET_MS = 7.0

REASONING = NOISE_EN + [
    "The vital signs are stable, and the laboratory results are still pending.",
    "Let me go back to the history before deciding anything.",
    "The timing of the symptoms is the most useful clue so far.",
    "Imaging would help, but the question gives only the examination findings.",
    "The family history adds little to the picture.",
    "Now consider the mechanism behind the main finding.",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = parser.add_argument_group("replies")
    data.add_argument(
        "--questions",
        nargs="*",
        default=[str(REFERENCE_EVAL / n) for n in ("medqa.json", "mmlu_pro_medical.json")]
        + [str(ROOT / "evaluation" / "data" / "eval_sample.json")],
        help="MCQ files whose options the replies are built on; missing files are skipped, and built-in "
        "questions are used when none is found",
    )
    data.add_argument("--n_replies", type=int, default=500, help="replies of each kind")
    data.add_argument(
        "--max_sentences", type=int, default=150, help="longest cut-off reasoning, in sentences"
    )
    data.add_argument("--seed", type=int, default=0, help="seed for the replies")
    return parser.parse_args(argv)


def cut_off_replies(questions, n, max_sentences, seed):
    """[{output, options}]: reasoning that stops before naming an option, each on the next question."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        thinking = " ".join(rng.choice(REASONING) for _ in range(rng.randint(2, max_sentences)))
        layout = rng.choice(["## Thinking\n\n{}", "<think>\n{}", "{}"])
        items.append({"output": layout.format(thinking), "options": questions[i % len(questions)]["options"]})
    return items


def timed_scores(items):
    """[(milliseconds, answered)] for one score() call per item, in order."""
    timings = []
    for item in items:
        start = time.perf_counter()
        result = score(item["output"], item["options"])
        timings.append(((time.perf_counter() - start) * 1000, result.last is not None))
    return timings


def summary(timings, answered):
    ms = [t for t, a in timings if a == answered]
    if len(ms) < 2:
        return f"n={len(ms):>5}"
    p99 = statistics.quantiles(ms, n=100)[-1]
    return f"n={len(ms):>5} mean {statistics.fmean(ms):6.2f} ms p99 {p99:6.2f} ms"


def main(args):
    # ---------------------------------------------------------------------------------------------- load
    questions = load_questions(args.questions)
    if not questions:
        print("questions: none found, using built-in option sets")
        questions = FALLBACK_QUESTIONS
    random.Random(args.seed).shuffle(questions)
    cut_off = cut_off_replies(questions, args.n_replies, args.max_sentences, args.seed)
    per_format = -(-args.n_replies // 5)
    answered = [x for v in synthetic_sets(questions, per_format, args.seed).values() for x in v]
    items = cut_off + answered
    mean_chars = statistics.fmean(len(x["output"]) for x in cut_off)
    print(
        f"{len(cut_off)} cut-off replies (mean {mean_chars:.0f} characters), {len(answered)} stated answers"
    )

    # ---------------------------------------------------------------------------------------------- run
    first = timed_scores(items)
    again = timed_scores(items)
    no_answer_mean = statistics.fmean(t for t, a in first if not a)

    # ---------------------------------------------------------------------------------------------- report
    for name, timings in (("first scoring", first), ("scored again", again)):
        print(f"score() {name:<13} | no-answer {summary(timings, False)} | answered {summary(timings, True)}")
    verdict = "ok" if no_answer_mean <= TARGET_MS else "ABOVE TARGET"
    print(
        f"no-answer mean on first scoring {no_answer_mean:.2f} ms, target <= {TARGET_MS} ms: "
        f"ratio {no_answer_mean / TARGET_MS:.3f} {verdict}"
    )


if __name__ == "__main__":
    main(parse_args())
