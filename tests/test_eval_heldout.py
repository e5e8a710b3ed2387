"""evaluation/data/eval_heldout.json: held-out questions written for this project, across the sources of
eval_sample.json, that no stage trains on."""

import json
from collections import Counter
from pathlib import Path

from evaluation.prepare_eval_data import PUBMEDQA_JOIN
from huatuo.items import MCQ, load_eval_file
from huatuo.problems import Decontaminator, normalize_text

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "evaluation" / "data" / "eval_heldout.json"
SAMPLE = ROOT / "evaluation" / "data" / "eval_sample.json"
TRAINING = ROOT / "data" / "demo_data.json"
TRAINING_TEXTS = ("question", "Open-ended Verifiable Question", "Question")


def load():
    return load_eval_file(HELDOUT, MCQ)


def test_schema_size_and_sources():
    data = load()
    sample = json.loads(SAMPLE.read_text(encoding="utf-8"))
    assert list(data) == list(sample)
    assert sum(len(items) for items in data.values()) >= 63
    for source, items in data.items():
        assert len(items) >= 12, source
        for item in items:
            assert set(item) == set(MCQ), item["question"][:60]
            assert item["answer"] == item["options"][item["answer_idx"]]
            assert 3 <= len(item["options"]) <= 10
            assert list(item["options"]) == list("ABCDEFGHIJ"[: len(item["options"])])
            assert len(set(item["options"].values())) == len(item["options"]), item["question"][:60]
    for item in data["PubMedQA_test"]:
        assert item["options"] == {"A": "yes", "B": "no", "C": "maybe"}


def test_no_question_twice():
    questions = [normalize_text(item["question"]) for items in load().values() for item in items]
    assert len(questions) == len(set(questions))
    # PubMedQA questions share the fixed sentence joining abstract and question; compare what surrounds it
    texts = [q.replace(normalize_text(PUBMEDQA_JOIN), " | ") for q in questions]
    for index, text in enumerate(texts):
        assert Decontaminator(texts[:index] + texts[index + 1 :]).match(text) is None, text[:80]


def test_no_overlap_with_the_training_data():
    training = json.loads(TRAINING.read_text(encoding="utf-8"))
    texts = [item[key] for item in training for key in TRAINING_TEXTS]
    questions = [item["question"] for items in load().values() for item in items]
    finder = Decontaminator(questions)
    for text in texts:
        assert finder.match(text) is None, text[:80]
    assert not {normalize_text(t) for t in texts} & {normalize_text(q) for q in questions}


def test_correct_letters_are_spread():
    for source, items in load().items():
        letters = Counter(item["answer_idx"] for item in items)
        assert max(letters.values()) <= len(items) / 2, (source, letters)
