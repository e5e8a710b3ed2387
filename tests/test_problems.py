"""Offline training problems from real MCQs and held-out sets disjoint from them, on small hand-written
items in each benchmark's schema."""

from pathlib import Path

import pytest

from huatuo.items import ANSWER, MCQ, QUESTION, VERIFIABLE, check_items, load_items
from huatuo.problems import check_disjoint, closed_form_problems, heldout_set, split_by_question
from huatuo.reward import RewardFunction

ROOT = Path(__file__).resolve().parents[1]


def mcq(question, options, answer_idx):
    letters = "ABCDEFGHIJ"
    options = dict(zip(letters, options, strict=False))
    return {"question": question, "options": options, "answer_idx": answer_idx, "answer": options[answer_idx]}


MEDMCQA = [
    mcq("Drug of choice in absence seizures:", ["Phenytoin", "Ethosuximide", "Carbamazepine", "Phenobarbitone"], "B"),
    mcq("Which of the following is not a branch of the external carotid artery?",
        ["Superior thyroid", "Lingual", "Ophthalmic", "Facial"], "C"),
    mcq("Koplik spots are seen in", ["Mumps", "Rubella", "Measles", "Chickenpox"], "C"),
    mcq("KOPLIK spots   are seen in", ["Measles", "Mumps", "Rubella", "Roseola"], "A"),  # the same question
    mcq("Vitamin deficiency causing scurvy:", ["Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K"], "B"),
    mcq("All of the following cause microcytic anaemia except:",
        ["Iron deficiency", "Thalassaemia", "Anaemia of chronic disease", "Folate deficiency"], "D"),
]  # fmt: skip
MEDQA = [
    mcq("A 24-year-old woman has heat intolerance, weight loss, a diffuse goitre and proptosis. Serum TSH is "
        "undetectable. Which of the following is the most likely cause?",
        ["Antibodies against thyroid peroxidase", "Antibodies that stimulate the TSH receptor",
         "A TSH-secreting adenoma", "Subacute granulomatous thyroiditis"], "B"),
    mcq("A 58-year-old man who drinks heavily is confused, with nystagmus and a wide-based gait. Deficiency of "
        "which vitamin is the most likely cause?", ["Cobalamin", "Niacin", "Thiamine", "Pyridoxine"], "C"),
]  # fmt: skip
MMLU_PRO = [
    mcq("Oxidative phosphorylation in eukaryotes takes place mainly at which site?",
        ["cytosol", "nucleus", "inner mitochondrial membrane", "outer mitochondrial membrane", "lysosome",
         "Golgi apparatus", "ribosome", "endoplasmic reticulum", "peroxisome", "plasma membrane"], "C"),
    mcq("Which enzyme unwinds the DNA double helix at the replication fork?",
        ["primase", "ligase", "helicase", "topoisomerase I", "DNA polymerase I", "telomerase"], "C"),
]  # fmt: skip
PUBMEDQA = [
    mcq("In a randomized trial of 240 adults with pneumonia, 5 days of amoxicillin cured 89% and 10 days 90%."
        "\n\nUsing the above document as a reference, please review the following question and choose the "
        "option you find most appropriate.\nIs a 5-day course as effective as a 10-day course?",
        ["yes", "no", "maybe"], "A"),
]  # fmt: skip


def test_closed_form_problems_keep_the_options_and_answer_with_the_option_text():
    problems = closed_form_problems(MEDMCQA[:2], "MedMCQA")
    check_items(problems, VERIFIABLE)
    first = problems[1]
    assert first[QUESTION] == (
        "Which of the following is not a branch of the external carotid artery?\n"
        "A. Superior thyroid\nB. Lingual\nC. Ophthalmic\nD. Facial"
    )
    assert first[ANSWER] == "Ophthalmic" and first["source"] == "MedMCQA" and first["answer_idx"] == "C"
    # the rule verifier rewards a final response that names the option's text, as on held-out questions
    reward = RewardFunction("rule")
    reply = "## Thinking\n\nThe ophthalmic artery comes off the internal carotid.\n\n## Final Response\n\nC. Ophthalmic"
    assert reward([reply], [first[ANSWER]]) == [1.0]


def test_the_bundled_demo_data_converts_in_closed_form():
    items = load_items(ROOT / "data" / "demo_data.json", MCQ)
    problems = closed_form_problems(items, "demo_data")
    assert len(problems) == len(items) == 32
    for item, problem in zip(items, problems, strict=True):
        assert problem[ANSWER] == item["answer"]
        assert problem[QUESTION].startswith(item["question"]) and problem[QUESTION] != item[QUESTION]
        assert set(problem) == {*MCQ, "source", QUESTION, ANSWER, "closed_form"}


def test_split_by_question_keeps_each_question_on_one_side():
    for seed in range(6):
        train, heldout = split_by_question(MEDMCQA, n_heldout=2, seed=seed)
        assert len(heldout) == 2
        check_disjoint(train, heldout)
        # the two Koplik items differ only in case and spacing: both train, or one held out and none trained
        koplik_train = sum("koplik" in item["question"].lower() for item in train)
        koplik_heldout = sum("koplik" in item["question"].lower() for item in heldout)
        assert (koplik_train, koplik_heldout) in ((2, 0), (0, 1))
        assert len(train) + len(heldout) + (koplik_heldout == 1) == len(MEDMCQA)
    assert split_by_question(MEDMCQA, 2, seed=1) == split_by_question(MEDMCQA, 2, seed=1)
    with pytest.raises(ValueError, match="only 5 distinct"):
        split_by_question(MEDMCQA, n_heldout=6, seed=0)


def test_check_disjoint_names_a_shared_question():
    with pytest.raises(ValueError, match="KOPLIK spots"):
        check_disjoint(MEDMCQA[2:3], MEDMCQA[3:4])


def test_heldout_set_leaves_out_what_overlaps_training():
    medmcqa_train, medmcqa_rest = split_by_question(MEDMCQA, n_heldout=3, seed=0)
    # a training item sharing a long run of text with the first MedQA question, but not equal to it
    near_copy = mcq("Case: " + MEDQA[0]["question"][:70] + " What next?", ["a", "b"], "A")
    training = closed_form_problems([*medmcqa_train, near_copy], "train")
    sources = {"MedMCQA_validation": medmcqa_rest, "MedQA_USLME_test": MEDQA, "MMLU-Pro_Medical_test": MMLU_PRO,
               "PubMedQA_test": PUBMEDQA}  # fmt: skip
    heldout, left_out = heldout_set(
        {name: items for name, items in sources.items() if name != "MedQA_USLME_test"}, 1, training
    )
    assert {name: len(items) for name, items in heldout.items()} == {
        "MedMCQA_validation": 1,
        "MMLU-Pro_Medical_test": 1,
        "PubMedQA_test": 1,
    }
    for items in heldout.values():
        check_disjoint(training, items)
        check_items(items, MCQ)
    with pytest.raises(ValueError, match="MedQA_USLME_test: only 1 of 2"):
        heldout_set(sources, 2, training)
    for seed in range(4):
        heldout, left_out = heldout_set({"MedQA_USLME_test": MEDQA * 2}, 1, training, seed=seed)
        assert heldout["MedQA_USLME_test"] == [MEDQA[1]]
        assert 0 <= left_out["MedQA_USLME_test"] <= 2
    # without the near copy in training, the first MedQA question is fair game
    assert len(heldout_set({"MedQA_USLME_test": MEDQA}, 2, training[:-1])[0]["MedQA_USLME_test"]) == 2


def test_heldout_set_is_seeded_and_drops_repeats():
    repeated = {"MMLU-Pro_Medical_test": [MMLU_PRO[0], MMLU_PRO[0], MMLU_PRO[1]]}
    picked = [heldout_set(repeated, 2, [], seed=s) for s in range(5)]
    for items, left_out in picked:
        assert sorted(i["question"] for i in items["MMLU-Pro_Medical_test"]) == sorted(
            i["question"] for i in MMLU_PRO
        )
        assert left_out["MMLU-Pro_Medical_test"] <= 1
    assert {tuple(i["question"] for i in items["MMLU-Pro_Medical_test"]) for items, _ in picked} == {
        (MMLU_PRO[0]["question"], MMLU_PRO[1]["question"]),
        (MMLU_PRO[1]["question"], MMLU_PRO[0]["question"]),
    }
    assert heldout_set(repeated, 2, [], seed=3) == heldout_set(repeated, 2, [], seed=3)
