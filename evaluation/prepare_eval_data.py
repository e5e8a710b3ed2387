r"""Build the evaluation file (evaluation/data/eval_data.json) from the public benchmark datasets.

    python evaluation/prepare_eval_data.py --output evaluation/data/eval_data.json
    python evaluation/prepare_eval_data.py --sources MedQA_USLME_test PubMedQA_test --pubmedqa_split test \
        --pubmedqa_test_ids test_ground_truth.json

The output has the layout of the original's file, {source: [{question, options, answer_idx, answer}]}
with sources in its order:
    MedMCQA_validation     MedMCQA validation split (4183), options A-D from opa..opd, cop the answer
    MedQA_USLME_test       MedQA USMLE 4-option test split (1273)
    PubMedQA_test          PubMedQA expert-labelled PQA-L, all 1000 as the original (or, with
                           --pubmedqa_split test, the 500 of the official test split); the question is
                           the abstract's sections, then the question; options A yes, B no, C maybe
    MMLU-Pro_Medical_test  MMLU-Pro test, biology then health (717 + 818), up to 10 options
    GPQA_Medical_test      GPQA genetics and molecular biology (78 in gpqa_main), options shuffled
                           with --seed. GPQA is gated: accept its terms at
                           https://huggingface.co/datasets/Idavidrein/gpqa, then `hf auth login`
                           (or set HF_TOKEN) before running. Its authors ask that the questions not be
                           posted in plain text, so keep the built file out of public repositories.
The original file repeats the 78 GPQA questions 5 times to average 5 runs; here --gpqa_repeats stays
at 1 and `eval.py --n_runs 5` repeats the runs instead, which also gives their spread.

Each --medqa/--medmcqa/... flag takes a hub id (the default), a local file (.json, .jsonl, .parquet)
or a `datasets` folder in that dataset's own schema, e.g. the official MedMCQA dev.json (cop 1-4) or
PubMedQA ori_pqal.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from huatuo.models import load_records  # noqa: E402
from huatuo.store import write_json_atomic  # noqa: E402

SOURCES = [
    "MedMCQA_validation",
    "MedQA_USLME_test",
    "PubMedQA_test",
    "MMLU-Pro_Medical_test",
    "GPQA_Medical_test",
]
LETTERS = "ABCDEFGHIJKLMNOP"
# How the original file joins a PubMedQA abstract and its question; kept so that scores stay comparable.
PUBMEDQA_JOIN = (
    "\n\nUsing the above document as a reference, please review the following question and choose the "
    "option you find most appropriate.\n"
)
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
MMLU_PRO_CATEGORIES = ["biology", "health"]
GPQA_SUBDOMAINS = {"Genetics", "Molecular Biology"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build eval_data.json from MedQA, MedMCQA, PubMedQA, MMLU-Pro and GPQA.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("output")
    g.add_argument("--output", default="evaluation/data/eval_data.json", help="where to write the eval file")
    g.add_argument(
        "--sources",
        nargs="+",
        default=SOURCES,
        choices=SOURCES,
        metavar="SOURCE",
        help="which sources to build",
    )

    g = parser.add_argument_group("dataset locations (hub id, local file or datasets folder)")
    g.add_argument(
        "--medqa",
        default="GBaker/MedQA-USMLE-4-options",
        help="MedQA USMLE 4 options: question, options, answer_idx",
    )
    g.add_argument("--medqa_split", default="test", help="MedQA split")
    g.add_argument("--medmcqa", default="openlifescienceai/medmcqa", help="MedMCQA: question, opa..opd, cop")
    g.add_argument("--medmcqa_split", default="validation", help="MedMCQA split")
    g.add_argument(
        "--medmcqa_cop_base",
        default="auto",
        choices=["auto", "0", "1"],
        help="whether cop counts options from 0 (hub) or 1 (official dev.json); auto tells from the values",
    )
    g.add_argument(
        "--pubmedqa",
        default="qiaojin/PubMedQA",
        help="PubMedQA PQA-L: pubid, question, context.contexts, final_decision (or ori_pqal.json)",
    )
    g.add_argument("--pubmedqa_config", default="pqa_labeled", help="PubMedQA hub config")
    g.add_argument(
        "--pubmedqa_split",
        default="all",
        choices=["all", "test"],
        help="all 1000 expert-labelled items (as the original) or the official 500-item test split",
    )
    g.add_argument(
        "--pubmedqa_test_ids",
        default=None,
        help="test_ground_truth.json of github.com/pubmedqa/pubmedqa (its keys are the test PMIDs), for --pubmedqa_split test",
    )
    g.add_argument(
        "--mmlu_pro",
        default="TIGER-Lab/MMLU-Pro",
        help="MMLU-Pro: question, options (list), answer, category",
    )
    g.add_argument(
        "--gpqa",
        default="Idavidrein/gpqa",
        help="GPQA (gated): Question, Correct Answer, Incorrect Answer 1-3, Subdomain",
    )
    g.add_argument("--gpqa_config", default="gpqa_main", help="GPQA hub config")

    g = parser.add_argument_group("GPQA options")
    g.add_argument("--seed", type=int, default=0, help="seed of the GPQA option shuffle")
    g.add_argument(
        "--gpqa_repeats", type=int, default=1, help="copies of the GPQA block (the original file has 5)"
    )
    return parser.parse_args(argv)


def mcq(question: str, options: list[str], answer: int) -> dict:
    letters = {LETTERS[i]: text for i, text in enumerate(options)}
    return {
        "question": question,
        "options": letters,
        "answer_idx": LETTERS[answer],
        "answer": options[answer],
    }


def rows(location: str, config: str | None = None, split: str = "train") -> list[dict]:
    local = Path(location)
    if local.is_file() and local.suffix in (".json", ".jsonl"):
        text = local.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            # Official releases (MedMCQA's dev.json among them) are JSON Lines under a .json name.
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        return data if isinstance(data, list) else [data]
    return load_records(location, config, split=split).to_list()


def fail(source: str, index: int, problem: str):
    raise SystemExit(f"error: {source} item {index}: {problem}")


# ==================================================================================================
# One converter per benchmark, from its own schema
# ==================================================================================================


def medqa(args) -> list[dict]:
    out = []
    for i, r in enumerate(rows(args.medqa, split=args.medqa_split)):
        options = {k: v for k, v in (r.get("options") or {}).items() if v is not None}
        if r.get("answer_idx") not in options:
            fail(
                "MedQA", i, f"answer_idx {r.get('answer_idx')!r} is not one of the options {sorted(options)}"
            )
        out.append(
            {
                "question": r["question"],
                "options": options,
                "answer_idx": r["answer_idx"],
                "answer": options[r["answer_idx"]],
            }
        )
    return out


def medmcqa(args) -> list[dict]:
    records = rows(args.medmcqa, split=args.medmcqa_split)
    cops = {int(r["cop"]) for r in records}
    base = args.medmcqa_cop_base
    if base == "auto":
        if 0 in cops and 4 in cops or not cops <= {0, 1, 2, 3, 4}:
            raise SystemExit(f"error: MedMCQA cop values {sorted(cops)} fit neither 0-3 nor 1-4")
        if 0 not in cops and 4 not in cops:
            raise SystemExit(
                "error: cannot tell whether MedMCQA cop counts from 0 or 1; pass --medmcqa_cop_base"
            )
        base = "0" if 0 in cops else "1"
    out = []
    for i, r in enumerate(records):
        answer = int(r["cop"]) - int(base)
        if not 0 <= answer < 4:
            fail("MedMCQA", i, f"cop {r['cop']!r} is out of range for --medmcqa_cop_base {base}")
        out.append(mcq(r["question"], [r["opa"], r["opb"], r["opc"], r["opd"]], answer))
    return out


def pubmedqa(args) -> list[dict]:
    local = Path(args.pubmedqa)
    if (
        local.is_file()
        and local.suffix == ".json"
        and isinstance(data := json.loads(local.read_text(encoding="utf-8")), dict)
    ):
        # The official ori_pqal.json: {pmid: {QUESTION, CONTEXTS, final_decision, ...}}.
        records = [
            {
                "pubid": pmid,
                "question": r["QUESTION"],
                "contexts": r["CONTEXTS"],
                "final_decision": r["final_decision"],
            }
            for pmid, r in data.items()
        ]
    else:
        records = [
            {
                "pubid": r["pubid"],
                "question": r["question"],
                "contexts": r["context"]["contexts"],
                "final_decision": r["final_decision"],
            }
            for r in rows(args.pubmedqa, args.pubmedqa_config)
        ]
    if args.pubmedqa_split == "test":
        if not args.pubmedqa_test_ids:
            raise SystemExit(
                "error: --pubmedqa_split test needs --pubmedqa_test_ids: the file data/test_ground_truth.json "
                "of https://github.com/pubmedqa/pubmedqa, whose keys are the 500 test PMIDs"
            )
        test_ids = set(json.loads(Path(args.pubmedqa_test_ids).read_text(encoding="utf-8")))
        records = [r for r in records if str(r["pubid"]) in test_ids]
        if len(records) != len(test_ids):
            raise SystemExit(
                f"error: only {len(records)} of the {len(test_ids)} test PMIDs are in {args.pubmedqa}"
            )
    letter = {text: key for key, text in PUBMEDQA_OPTIONS.items()}
    out = []
    for i, r in enumerate(records):
        if r["final_decision"] not in letter:
            fail("PubMedQA", i, f"final_decision {r['final_decision']!r} is not yes, no or maybe")
        question = " ".join(r["contexts"]) + PUBMEDQA_JOIN + r["question"]
        idx = letter[r["final_decision"]]
        out.append(
            {
                "question": question,
                "options": dict(PUBMEDQA_OPTIONS),
                "answer_idx": idx,
                "answer": PUBMEDQA_OPTIONS[idx],
            }
        )
    return out


def mmlu_pro(args) -> list[dict]:
    records = rows(args.mmlu_pro, split="test")
    out = []
    for category in MMLU_PRO_CATEGORIES:
        for i, r in enumerate(records):
            if r["category"] != category:
                continue
            answer = LETTERS.index(r["answer"]) if r.get("answer") in LETTERS else -1
            if not 0 <= answer < len(r["options"]):
                fail(
                    "MMLU-Pro", i, f"answer {r.get('answer')!r} is not one of its {len(r['options'])} options"
                )
            out.append(mcq(r["question"], list(r["options"]), answer))
    return out


def gpqa(args) -> list[dict]:
    local = Path(args.gpqa).exists()
    try:
        records = rows(args.gpqa, None if local else args.gpqa_config)
    except Exception as err:
        if local:
            raise
        # The hub answers a missing token, unaccepted terms and a bad config in different ways.
        raise SystemExit(
            f"error: could not load GPQA from {args.gpqa!r} ({type(err).__name__}: {err}).\n"
            "GPQA is gated: sign in at https://huggingface.co/datasets/Idavidrein/gpqa, accept its terms, then "
            "run `hf auth login` (or set HF_TOKEN) and retry; or pass --gpqa with a local copy, or leave "
            "GPQA_Medical_test out of --sources."
        ) from None
    out = []
    for r in records:
        if r["Subdomain"].strip() not in GPQA_SUBDOMAINS:
            continue
        correct = r["Correct Answer"].strip()
        options = [correct] + [r[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)]
        # A fixed shuffle per question: the same letters on every build, and no letter favoured.
        key = f"{args.seed}:{r.get('Record ID') or r['Question']}"
        random.Random(hashlib.sha256(key.encode()).hexdigest()).shuffle(options)
        out.append(mcq(r["Question"].strip(), options, options.index(correct)))
    return out * args.gpqa_repeats


BUILDERS = {
    "MedMCQA_validation": medmcqa,
    "MedQA_USLME_test": medqa,
    "PubMedQA_test": pubmedqa,
    "MMLU-Pro_Medical_test": mmlu_pro,
    "GPQA_Medical_test": gpqa,
}


def main(args: argparse.Namespace) -> dict:
    # ---------------------------------------------------------------------------------------------
    # Load and convert each benchmark
    # ---------------------------------------------------------------------------------------------
    data = {}
    for source in SOURCES:
        if source in args.sources:
            data[source] = BUILDERS[source](args)
            print(f"{source}: {len(data[source])} items")

    # ---------------------------------------------------------------------------------------------
    # Save, in the original file's serialisation
    # ---------------------------------------------------------------------------------------------
    output = Path(args.output)
    write_json_atomic(output, data, indent=2)
    digest = hashlib.sha256(output.read_bytes()).hexdigest()
    print(f"wrote {output}: {sum(len(v) for v in data.values())} items, sha256 {digest}")
    return data


if __name__ == "__main__":
    main(parse_args())
