import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.scorer import ScoreResult, answer_region, normalize, score, score_original

ROOT = Path(__file__).resolve().parents[1]
REGRESSION = json.loads((ROOT / "tests" / "data" / "scorer_regression.json").read_text(encoding="utf-8"))

ANTI = {"A": "Aspirin", "B": "Clopidogrel", "C": "Unfractionated heparin", "D": "Alteplase", "E": "Warfarin"}
VIT = {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}
PQA = {"A": "yes", "B": "no", "C": "maybe"}
TEN = {k: f"Choice number {i}" for i, k in enumerate("ABCDEFGHIJ")}


# (options, reply, first, last, rule): one or more cases per reply format the scorer must read.
FORMATS = {
    "answer_is": (ANTI, "Fibrinolysis is indicated. The answer is D.", "D", "D", "explicit"),
    "answer_is_parenthesised": (ANTI, "The answer is (D).", "D", "D", "explicit"),
    "answer_colon_parenthesised": (ANTI, "Answer: (C)", "C", "C", "explicit"),
    "answer_bold_label": (ANTI, "**Answer:** E", "E", "E", "explicit"),
    "answer_option_word": (ANTI, "The best answer is option (E) warfarin.", "E", "E", "explicit"),
    "boxed": (ANTI, "Final answer: $\\boxed{A}$", "A", "A", "explicit"),
    "letter_then_correct": (ANTI, "Option B is correct given the allergy.", "B", "B", "explicit"),
    "choose": (ANTI, "On balance I would go with D.", "D", "D", "explicit"),
    "answer_heading": (ANTI, "### Answer\n\nD", "D", "D", "explicit"),
    "answer_as_text": (PQA, "Weighing the evidence, the answer is yes.", "A", "A", "explicit"),
    "text_then_best_choice": (ANTI, "Therefore, clopidogrel is the best choice.", "B", "B", "explicit"),
    "zh_answer_is": (ANTI, "无法及时PCI，应溶栓治疗。答案是D", "D", "D", "explicit"),
    "zh_choose": (ANTI, "综上所述，本题选C。", "C", "C", "explicit"),
    "zh_correct_item": (ANTI, "A项阿司匹林过敏，排除。故B项正确。", "B", "B", "explicit"),
    "zh_full_width": (ANTI, "答案：（Ｅ）", "E", "E", "explicit"),
    "zh_option_noun_is_not_a_choice": (ANTI, "选项A错误，选项C也不对，所以选择D。", "D", "D", "explicit"),
    "bold_letter": (ANTI, "**C**", "C", "C", "explicit"),
    "bold_letter_and_text": (
        VIT,
        "**D. Vitamin D**\n\nThe bowed legs point to rickets.",
        "D",
        "D",
        "explicit",
    ),
    "letter_and_text": (ANTI, "C. Unfractionated heparin, started at once.", "C", "C", "letter"),
    "parenthesised_letter": (ANTI, "Best fit: (A), given the low risk.", "A", "A", "letter"),
    "option_text_other_case": (ANTI, "Start CLOPIDOGREL now.", "B", "B", "option_text"),
    "option_text_punctuation": (ANTI, "Start an unfractionated-heparin infusion.", "C", "C", "option_text"),
    "typo": (ANTI, "Clopidogrl", "B", "B", "similar"),
    "pubmedqa_yes": (PQA, "Yes, mortality fell, and no excess bleeding was seen.", "A", "A", "verdict"),
    "pubmedqa_no": (PQA, "No. The trial found no difference.", "B", "B", "verdict"),
    "pubmedqa_maybe_concluding": (PQA, "The data are mixed. In conclusion, maybe.", "C", "C", "verdict"),
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_reply_format(name):
    options, reply, first, last, rule = FORMATS[name]
    assert score(reply, options) == ScoreResult(first, last, rule)


def test_final_response_after_thinking_that_names_other_letters():
    reply = (
        "## Thinking\n\nAspirin first? The answer is A. But the patient is allergic, so not A. Option B, "
        "or even C. Hmm.\n\n## Final Response\n\nClopidogrel, since aspirin is contraindicated here."
    )
    assert score(reply, ANTI).last == "B"
    # The original rules read the same final response and settle on the last option text they find.
    assert score_original(reply, ANTI).last == "A"


def test_r1_think_block_is_skipped():
    reply = "<think>\nThe answer is A. No wait, allergy, so C? No: B.\n</think>\n\nThe answer is **B**"
    assert score(reply, ANTI) == ScoreResult("B", "B", "explicit")
    assert score_original(reply, ANTI).first == "A"


def test_plain_reasoning_ends_with_text_only_answer():
    reply = (
        "Option A, aspirin, seems plausible. Maybe the answer is A? The allergy rules it out.\n\n"
        "What about (D)? No, it is too late for that.\n\nClopidogrel."
    )
    assert score(reply, ANTI) == ScoreResult("B", "B", "verdict")


def test_hedged_and_questioning_statements_are_not_answers():
    assert score("Maybe the answer is A? The answer is C.", ANTI) == ScoreResult("C", "C", "explicit")
    assert score("答案可能是A？不，答案是C。", ANTI).first == "C"


def test_change_of_mind_gives_different_first_and_last():
    assert score("The answer is A. On reflection, the answer is B.", ANTI) == ScoreResult(
        "A", "B", "explicit"
    )


def test_letters_that_belong_to_terms_are_not_votes():
    reply = (
        "E. coli is unlikely. B cells are normal. A 45-year-old with vitamin C deficiency. I think it is D."
    )
    assert score(reply, ANTI).last == "D"
    assert score("Vitamin A toxicity is possible, but the neuropathy fits B.", VIT).last == "B"


def test_pronoun_i_with_ten_options():
    assert score("Answer: I think the right one is F.", TEN).last == "F"
    assert score("The answer is I.", TEN).last == "I"


def test_restated_option_list_is_not_a_choice():
    reply = "Options:\nA. Aspirin\nB. Clopidogrel\nC. Unfractionated heparin\n\nSo heparin, unfractionated heparin."
    assert score(reply, ANTI).last == "C"


def test_option_text_that_opens_with_a_capital_letter():
    options = {"A": "A stable genome", "B": "Frequent mutation", "C": "H+ ions across the membrane"}
    assert score("The most likely answer is A stable genome.", options).last == "A"
    assert score("The answer is H+ ions across the membrane.", options).last == "C"


def test_options_that_differ_only_in_case_or_symbols():
    genotypes = {"A": "TT x tt", "B": "Tt x tt", "C": "Tt x Tt"}
    assert score("The cross must be Tt x tt.", genotypes).last == "B"
    bmi = {"A": "BMI < 25 kg/m2", "B": "BMI = 25 kg/m2", "C": "BMI > 25 kg/m2"}
    assert score("Therefore, BMI=25 kg/m2 is the best choice.", bmi).last == "B"


def test_longest_option_wins_where_texts_overlap():
    options = {"A": "Hypertension", "B": "Pulmonary hypertension", "C": "Asthma"}
    assert score("The findings indicate pulmonary hypertension.", options) == ScoreResult(
        "B", "B", "option_text"
    )


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "I cannot determine this from the information given.",
        "<think>\nThe answer is A.\n</think>\n\n",
        "## Thinking\n\nThe answer is B.\n\n## Final Response\n\n",
        "Aspirin was tried. Heparin too.\n\nThe answer is none of the provided options.",
    ],
)
def test_no_answer(reply):
    assert score(reply, ANTI) == ScoreResult(None, None, None)


def test_answer_region():
    assert answer_region("<think>x</think>\n y ") == "y"
    assert answer_region("<think>cut off before closing") == "cut off before closing"
    assert answer_region("## Thinking\n\nt\n\n## Final Response\n\nr") == "r"
    assert answer_region("### Final Response:\nr") == "r"
    assert answer_region("答案：（Ｃ）") == "答案:(C)"


def test_normalize_keeps_distinguishing_symbols():
    assert normalize("Crohn's  **Disease**.") == "crohn s disease"
    assert normalize("BMI ≥ 25, K+") == "bmi ≥ 25 k +"


def test_score_is_pure():
    options = dict(ANTI)
    before = copy.deepcopy(options)
    reply = "The answer is (B)."
    assert score(reply, options) == score(reply, options)
    assert options == before
    first, last, rule = score(reply, options)
    assert (first, last, rule) == ("B", "B", "explicit")


def test_letters_outside_the_options_are_ignored():
    assert score("The answer is E.", {"A": "x", "B": "y", "C": "z", "D": "w"}) == ScoreResult(
        None, None, None
    )


@pytest.mark.parametrize("item", REGRESSION, ids=[f"{r['id']}-{r['format']}" for r in REGRESSION])
def test_regression_set(item):
    result = score(item["reply"], item["options"])
    assert result.last == item["last"], item["note"]
    if "first" in item:
        assert result.first == item["first"], item["note"]


def test_regression_set_covers_every_format():
    formats = {r["format"] for r in REGRESSION}
    assert formats >= {"answer_is", "zh", "letter", "option_text", "pubmedqa", "huatuo", "r1", "no_answer"}
    # The set is meant to separate the two scorers: the original rules miss a good share of it.
    misses = sum(score_original(r["reply"], r["options"]).last != r["last"] for r in REGRESSION)
    assert misses >= 5


def test_original_rules():
    # Only "answer is" directly followed by a capital counts in rule 1, even a letter beyond the options.
    assert score_original("so the answer is E", {"A": "x", "B": "y"}) == ScoreResult(
        "E", "E", "original_answer_is"
    )
    # Only the text after "## Final Response\n\n" is read.
    assert score_original("(A)\n\n## Final Response\n\n(B)", ANTI) == ScoreResult("B", "B", "original_letter")
    # A capital A followed by a space is skipped as the article.
    assert score_original("A patient. Then (C).", ANTI).first == "C"
    assert score_original("aspirin, then warfarin", ANTI) == ScoreResult("A", "E", "original_option_text")
    # It always answers something.
    assert score_original("no idea", ANTI).last in ANTI


def test_agreement_bench_runs_without_reference_files(tmp_path):
    missing = str(tmp_path / "absent.json")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_scorer_agreement.py"), "--outputs", missing,
         "--questions", missing, "--n_per_format", "40", "--save_synthetic", str(tmp_path / "synth.json")],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    assert f"outputs: {missing} not found, skipped" in out
    assert "using built-in option sets" in out
    assert "5/5 sets meet the target" in out
    synthetic = json.loads((tmp_path / "synth.json").read_text(encoding="utf-8"))
    assert len(synthetic) == 200
    assert {x["format"] for x in synthetic} == {"huatuo", "r1", "cot", "zh", "pubmedqa"}
