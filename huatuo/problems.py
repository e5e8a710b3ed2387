"""Verifiable problems made from real MCQs without an LLM, and held-out question sets that no stage trains on.

    train = closed_form_problems(load_items("data/demo_data.json", MCQ), "demo_data")
    medmcqa_train, medmcqa_rest = split_by_question(load_items("medmcqa.json", MCQ), n_heldout=100, seed=0)
    train += closed_form_problems(medmcqa_train, "MedMCQA")
    heldout, left_out = heldout_set({"MedQA_USLME_test": medqa, "MedMCQA_validation": medmcqa_rest}, 50, train)

A problem keeps its MCQ in closed form: the `Open-ended Verifiable Question` is the question with its options
one per line (as construct_verifiable_medical_problems.py --keep_mcq_fraction keeps a share of them, the paper's
"unconverted" MCQs) and the `Ground-True Answer` is the text of the correct option. The options stay because
without an LLM to rewrite the question, many MCQs cannot be answered without them ("Which of the following is
not true ...", "All of the above"), and because the held-out questions are asked with their options too
(evaluation/eval.py), so training and evaluation ask for the same skill. The answer is the option's text, not
"B. text" as the construction stage writes: the rule verifier looks for the reference as a run of words in the
final response, and the held-out reward (huatuo.report.reply_scores) is scored against the option's text.

Held-out sets are disjoint from the training problems by question text (whitespace and case normalised,
checked by check_disjoint), and leave out any question sharing 64 consecutive characters with a training
question (the decontamination rule of the construction stage).
"""

from __future__ import annotations

import random
from collections import defaultdict

from huatuo.items import ANSWER, MCQ, QUESTION

DECONTAMINATION_CHARS = 64


def render_options(options: dict[str, str]) -> str:
    """The options one per line as `A. text`, as the stages show them to a model."""
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def closed_form_question(item: dict) -> str:
    """An MCQ as one closed-form problem: the question, then its options one per line."""
    return f"{item['question']}\n{render_options(item['options'])}"


def normalize_text(text: str) -> str:
    return " ".join(text.split()).casefold()


class Decontaminator:
    """Finds training questions sharing `n` consecutive characters with an eval question.

    Eval texts are indexed by aligned chunks of n // 2 characters: any common run of n characters
    covers one whole aligned chunk, so looking up every chunk-sized window of a training question
    finds each candidate, and extending the match both ways confirms it. The index stays small
    (one entry per n // 2 eval characters) however large the eval set is.
    """

    def __init__(self, texts, n=DECONTAMINATION_CHARS):
        self.n, self.k = n, n // 2
        self.texts = [normalize_text(t) for t in texts]
        self.chunks = defaultdict(list)
        for index, text in enumerate(self.texts):
            for offset in range(0, len(text) - self.k + 1, self.k):
                self.chunks[text[offset : offset + self.k]].append((index, offset))

    def match(self, question):
        """Index of an eval text sharing n characters with `question`, or None."""
        q = normalize_text(question)
        for i in range(len(q) - self.k + 1):
            for index, offset in self.chunks.get(q[i : i + self.k], ()):
                t = self.texts[index]
                left = 0
                while i - left > 0 and offset - left > 0 and q[i - left - 1] == t[offset - left - 1]:
                    left += 1
                right = self.k
                while i + right < len(q) and offset + right < len(t) and q[i + right] == t[offset + right]:
                    right += 1
                if left + right >= self.n:
                    return index
        return None


def closed_form_problems(items: list[dict], source: str) -> list[dict]:
    """Stage-2 problems from checked MCQs (huatuo.items.MCQ): the MCQ keys, `source`, the closed-form
    question with its options, and the correct option's text as the answer."""
    return [
        {
            **{key: item[key] for key in MCQ},
            "source": source,
            QUESTION: closed_form_question(item),
            ANSWER: item["options"][item["answer_idx"]],
            "closed_form": True,
        }
        for item in items
    ]


def split_by_question(items: list[dict], n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) parts of one MCQ set, disjoint by question text: the distinct questions are
    shuffled with `seed`, the first n_heldout go to the held-out part (one item each), and the training
    part keeps every item whose question is not among them, duplicates included."""
    by_question: dict[str, list[dict]] = {}
    for item in items:
        by_question.setdefault(normalize_text(item["question"]), []).append(item)
    keys = sorted(by_question)
    random.Random(seed).shuffle(keys)
    if n_heldout > len(keys):
        raise ValueError(f"{n_heldout} held-out questions asked for, but only {len(keys)} distinct questions")
    heldout_keys = set(keys[:n_heldout])
    heldout = [by_question[key][0] for key in keys[:n_heldout]]
    train = [item for item in items if normalize_text(item["question"]) not in heldout_keys]
    check_disjoint(train, heldout)
    return train, heldout


def check_disjoint(training: list[dict], heldout: list[dict]) -> None:
    """Raise ValueError naming a question found (whitespace and case normalised) on both sides."""
    trained = {normalize_text(item["question"]) for item in training}
    for item in heldout:
        if normalize_text(item["question"]) in trained:
            raise ValueError(f"held-out question is also a training question: {item['question'][:120]!r}")


def heldout_set(
    sources: dict[str, list[dict]], per_source: int, training: list[dict], seed: int = 0
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """({source: per_source MCQs}, {source: how many were left out}) for an eval file. Each source's
    items are shuffled with `seed` (so a source sorted by category, as MMLU-Pro's biology then health, is
    sampled across it), and an item is left out when its question shares 64 characters with a training
    question, matches one exactly, or repeats a question already taken. A source with too few items left
    is an error."""
    decontaminator = Decontaminator([item["question"] for item in training])
    trained = {normalize_text(item["question"]) for item in training}
    heldout, left_out = {}, {}
    for name, items in sources.items():
        order = list(range(len(items)))
        random.Random(f"{seed}:{name}").shuffle(order)
        chosen, seen, skipped = [], set(), 0
        for index in order:
            if len(chosen) == per_source:
                break
            item = items[index]
            key = normalize_text(item["question"])
            if key in trained or key in seen or decontaminator.match(item["question"]) is not None:
                skipped += 1
                continue
            seen.add(key)
            chosen.append({key: item[key] for key in MCQ})
        if len(chosen) < per_source:
            raise ValueError(
                f"{name}: only {len(chosen)} of {per_source} questions left after the overlap checks"
            )
        check_disjoint(training, chosen)
        heldout[name], left_out[name] = chosen, skipped
    return heldout, left_out
