"""How often the scorer reads the answer a model actually stated.

Two kinds of input, each reported as agreement of last match and of first match with the stated
letter, the share of replies where no rule found an answer, and the same figures for the original
release's rules (evaluation.scorer.score_original):

* Real model outputs: a JSON list of {"output", "options", "reference_pred"} items, where
  `reference_pred` is the letter the model stated as judged by someone else's extraction (null items
  are left out of the agreement and counted). By default, MMLU-Pro's published GPT-4o replies on its
  health and biology questions, when the reference copy sits next to the repository; absent files are
  skipped with a message. Items may carry `intended` instead of `reference_pred`.
* Synthetic replies with a known intended letter, built here on the options of real questions, in the
  formats a medical reasoning model writes: `## Thinking / ## Final Response`, R1-style `<think>`,
  chain of thought ending in a statement, Chinese, and PubMedQA yes/no/maybe. The thinking names other
  options, states tentative answers and uses letter-like terms (vitamin A, B cells, E. coli).

    python bench/bench_scorer_agreement.py
    python bench/bench_scorer_agreement.py --outputs my_model_outputs.json --n_per_format 1000
    python bench/bench_scorer_agreement.py --questions evaluation/data/eval_sample.json --save_synthetic synth.json

Target: at least 99.5% last-match agreement on every set.
"""

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.scorer import score, score_original  # noqa: E402

REFERENCE_EVAL = ROOT.parent / "shared" / "reference" / "eval"
TARGET = 0.995


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    real = parser.add_argument_group("real model outputs")
    real.add_argument(
        "--outputs",
        nargs="*",
        default=[str(REFERENCE_EVAL / "model_outputs_mmlupro_gpt4o.json")],
        help="JSON lists of {output, options, reference_pred or intended}; missing files are skipped",
    )
    synth = parser.add_argument_group("synthetic replies")
    synth.add_argument(
        "--questions",
        nargs="*",
        default=[str(REFERENCE_EVAL / n) for n in ("medqa.json", "mmlu_pro_medical.json")]
        + [str(ROOT / "evaluation" / "data" / "eval_sample.json")],
        help="MCQ files (a list, or the eval format {source: [items]}) whose options the replies are built on; "
        "missing files are skipped, and built-in questions are used when none is found",
    )
    synth.add_argument("--n_per_format", type=int, default=2000, help="synthetic replies per format")
    synth.add_argument("--seed", type=int, default=0, help="seed for the synthetic replies")
    synth.add_argument(
        "--save_synthetic", default=None, help="also write the synthetic replies to this JSON file"
    )
    out = parser.add_argument_group("output")
    out.add_argument("--show_misses", type=int, default=3, help="print this many disagreements per set")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Synthetic replies
# --------------------------------------------------------------------------------------------------

FALLBACK_QUESTIONS = [
    {"options": {"A": "Aspirin", "B": "Clopidogrel", "C": "Unfractionated heparin", "D": "Alteplase"}},
    {"options": {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D", "E": "Folate"}},
    {"options": {"A": "Essential hypertension", "B": "Pulmonary hypertension", "C": "Portal hypertension"}},
    {"options": {"A": "T cells", "B": "B cells", "C": "Natural killer cells", "D": "Neutrophils"}},
]
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}

NOISE_EN = [
    "A 54-year-old patient like this one often has several risk factors.",
    "I think the timeline matters more than the lab values here.",
    "E. coli would be more typical of a urinary source, so that does not fit.",
    "B cells and T cells are not the issue in this presentation.",
    "Vitamin C deficiency would show gum bleeding, which is absent.",
    "Hepatitis B serology was negative, which narrows things down.",
    "A key detail is the onset over hours rather than days.",
    "Group A streptococcus is a classic trap in questions like this.",
]
NOISE_ZH = [
    "患者为54岁男性，需要结合病史判断。",
    "维生素C缺乏会有牙龈出血，本例没有。",
    "B细胞和T细胞在这里不是关键。",
    "大肠杆菌(E. coli)多见于尿路感染。",
]


def _thinking_en(rng, options, intended, tentative):
    others = [k for k in options if k != intended] or [intended]
    lines = []
    for _ in range(rng.randint(2, 5)):
        d = rng.choice(others)
        lines.append(
            rng.choice(
                [
                    f"Option {d}, {_clause(options[d])}, seems plausible at first.",
                    f"Let me look at {d}: {_clause(options[d])} does not explain everything.",
                    f"Maybe the answer is {d}? Hmm, that does not fit the history.",
                    f"{_clause(options[d])} is possible, but less likely.",
                    f"What about ({d})? No, that is ruled out.",
                    f"{d}. {_clause(options[d])} - this would need a different presentation.",
                    f"So the answer might be **{d}**. Wait, let me check again.",
                ]
            )
        )
        if rng.random() < 0.5:
            lines.append(rng.choice(NOISE_EN))
    if tentative:
        lines.append(f"I was leaning towards {rng.choice(others)}, but the key finding changes my mind.")
    lines.append(
        rng.choice(
            [
                f"Putting it together, {_clause(options[intended])} fits best.",
                "Putting it together, only one option explains every finding.",
                f"Everything points to {intended}.",
            ]
        )
    )
    return "\n\n".join(lines)


def _clause(text):
    """An option's text as it sits inside a sentence."""
    return text.strip().rstrip(".;:!?\"' \n")


FINALS_EN = [
    "The answer is {L}.",
    "The answer is ({L}).",
    "The answer is **{L}**.",
    "The answer is {L}. {T}",
    "The correct answer is **{L}. {T}**.",
    "Answer: ({L})",
    "**Answer:** {L}",
    "**Final Answer:** {L}. {T}",
    "The correct option is {L}: {T}.",
    "**{L}. {T}**",
    "**{L}**",
    "Option {L} is correct.",
    "Final answer: $\\boxed{{{L}}}$",
    "I'd go with {L}, {T}.",
    "The most likely answer is {S}.",
    "Therefore, {T} is the best choice.",
    "{T}.",
    "Based on the findings, the best answer is option {L} ({T}).",
]


def _final_en(rng, options, intended):
    text = _clause(options[intended])
    # Only ordinary words change case: in "AaBb x aabb" the case is what tells options apart.
    shouted = text.upper() if len(text.split()) <= 4 and text[1:].islower() else text
    templates = FINALS_EN
    if len(text) <= 2:
        # An option whose text is itself a letter ("D") is named without ambiguity only by its own letter.
        templates = [t for t in FINALS_EN if "{T}" not in t and "{S}" not in t]
    return rng.choice(templates).format(L=intended, T=text, S=shouted)


def _thinking_zh(rng, options, intended):
    others = [k for k in options if k != intended] or [intended]
    lines = []
    for _ in range(rng.randint(2, 4)):
        d = rng.choice(others)
        lines.append(
            rng.choice(
                [
                    f"选项{d}（{_clause(options[d])}）看起来有可能，但不符合病史。",
                    f"{d}项不对，排除。",
                    f"会不会是{d}？再想想。",
                    f"答案可能是{d}？不，症状不支持。",
                ]
            )
        )
        if rng.random() < 0.5:
            lines.append(rng.choice(NOISE_ZH))
    return "\n".join(lines)


def _final_zh(rng, options, intended):
    text = _clause(options[intended])
    return rng.choice(
        [
            f"答案是{intended}",
            f"答案：{intended}. {text}",
            f"综上所述，选{intended}。",
            f"故选{intended}。",
            f"正确答案为（{intended}）{text}",
            f"{intended}项正确。",
            f"最终答案：{intended}",
            f"因此，正确选项是{intended}。",
            f"答案应为**{intended}**",
            f"所以选择{intended}。",
        ]
    )


def _pubmedqa(rng, intended):
    word = PUBMEDQA_OPTIONS[intended]
    thinking = rng.choice(
        [
            "The study is a retrospective cohort, so there is no randomisation. Is the answer yes? The effect size is small.",
            "There was no significant difference in the primary outcome, but the secondary outcomes improved. Maybe not.",
            "The abstract reports a reduced risk. No major confounders are mentioned. The answer could be yes or maybe.",
        ]
    )
    final = rng.choice(
        [
            f"{word.capitalize()}, the results support this conclusion within the limits of the study.",
            f"{word.capitalize()}. The data point that way, although no trial has confirmed it.",
            f"**{word.capitalize()}** - based on the reported outcomes.",
            f"The answer is {word}.",
            f"Answer: {word}",
            f"The evidence has limits, with no long-term follow-up. In conclusion, {word}.",
            f"Based on the abstract, the answer to the question is: **{word.capitalize()}**",
        ]
    )
    return thinking, final


def synthetic_sets(questions, n, seed):
    """{format: [{output, options, intended}]} with `n` replies per format."""
    rng = random.Random(seed)
    sets = {name: [] for name in ("huatuo", "r1", "cot", "zh", "pubmedqa")}
    for name, items in sets.items():
        for _ in range(n):
            if name == "pubmedqa":
                options = PUBMEDQA_OPTIONS
                intended = rng.choice(list(options))
                thinking, final = _pubmedqa(rng, intended)
                layout = rng.choice(["huatuo", "r1", "plain"])
            else:
                options = rng.choice(questions)["options"]
                intended = rng.choice(list(options))
                if name == "zh":
                    thinking, final = _thinking_zh(rng, options, intended), _final_zh(rng, options, intended)
                    layout = rng.choice(["huatuo", "r1", "plain"])
                else:
                    thinking = _thinking_en(rng, options, intended, tentative=name == "cot")
                    final, layout = _final_en(rng, options, intended), {"cot": "plain"}.get(name, name)
            if layout == "huatuo":
                output = f"## Thinking\n\n{thinking}\n\n## Final Response\n\n{final}"
            elif layout == "r1":
                output = f"<think>\n{thinking}\n</think>\n\n{final}"
            else:
                output = f"{thinking}\n\n{final}"
            items.append({"output": output, "options": options, "intended": intended})
    return sets


def load_questions(paths):
    questions = []
    for path in paths:
        if not Path(path).exists():
            print(f"questions: {path} not found, skipped")
            continue
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        items = [x for v in data.values() for x in v] if isinstance(data, dict) else data
        questions += [x for x in items if isinstance(x.get("options"), dict) and x["options"]]
    return questions


# --------------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------------


def agreement(items, scorer):
    """(last-match agreement, first-match agreement, compared items, no-answer share over all items)."""
    last = first = compared = none = 0
    for item in items:
        result = scorer(item["output"], item["options"])
        none += result.last is None
        stated = item.get("reference_pred", item.get("intended"))
        if stated is None:
            continue
        compared += 1
        last += result.last == stated
        first += result.first == stated
    return last / max(compared, 1), first / max(compared, 1), compared, none / max(len(items), 1)


def report(name, items, show_misses):
    new, old = agreement(items, score), agreement(items, score_original)
    verdict = "ok" if new[0] >= TARGET else "BELOW TARGET"
    print(
        f"{name:<34} n={len(items):>5} compared={new[2]:>5} | "
        f"last {new[0]:7.2%} first {new[1]:7.2%} no-answer {new[3]:6.2%} | "
        f"original last {old[0]:7.2%} first {old[1]:7.2%} | last/target {new[0] / TARGET:.4f} {verdict}"
    )
    misses = [
        x
        for x in items
        if x.get("reference_pred", x.get("intended")) not in (None, score(x["output"], x["options"]).last)
    ]
    for item in misses[:show_misses]:
        stated = item.get("reference_pred", item.get("intended"))
        print(
            f"    stated {stated}, scored {score(item['output'], item['options'])}: ...{item['output'][-160:]!r}"
        )
    return new[0] >= TARGET


def main(args):
    # ---------------------------------------------------------------------------------------------- load
    real = {}
    for path in args.outputs:
        if not Path(path).exists():
            print(f"outputs: {path} not found, skipped (pass --outputs to use other model outputs)")
            continue
        real[Path(path).stem] = json.loads(Path(path).read_text(encoding="utf-8"))
    questions = load_questions(args.questions)
    if not questions:
        print("questions: none found, using built-in option sets")
        questions = FALLBACK_QUESTIONS

    # ---------------------------------------------------------------------------------------------- run
    synthetic = synthetic_sets(questions, args.n_per_format, args.seed)
    print(f"scorer agreement with the stated answer (target last >= {TARGET:.1%})")
    ok = [report(name, items, args.show_misses) for name, items in real.items()]
    ok += [report(f"synthetic_{name}", items, args.show_misses) for name, items in synthetic.items()]
    print(f"{sum(ok)}/{len(ok)} sets meet the target")

    # ---------------------------------------------------------------------------------------------- save
    if args.save_synthetic:
        Path(args.save_synthetic).write_text(
            json.dumps(
                [dict(x, format=k) for k, v in synthetic.items() for x in v], ensure_ascii=False, indent=1
            ),
            encoding="utf-8",
        )
        print(f"synthetic replies written to {args.save_synthetic}")


if __name__ == "__main__":
    main(parse_args())
