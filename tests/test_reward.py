"""The stage-2 reward: format check, rule verifier, classifier verifier (tiny model) and LLM judge (stub
server on loopback)."""

import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from huatuo.reward import (
    RewardFunction,
    classifier_logits,
    extract_final_response,
    load_reward_prompt,
    pad_batch,
    reward_stats,
    rule_judge,
    score_response,
    verifier_input_ids,
)
from tests.stub_server import StubServer


def respond(thinking: str, final: str) -> str:
    return f"## Thinking\n\n{thinking}\n\n## Final Response\n\n{final}"


GOOD = respond(
    "Bleeding gums and poor wound healing point to a vitamin deficiency.", "Vitamin C deficiency (scurvy)."
)
WRONG = respond("Night blindness fits a vitamin deficiency.", "Vitamin A deficiency.")
CHINESE = respond("牙龈出血、伤口愈合差，提示维生素缺乏。", "答案是维生素C缺乏症。")


# ----------------------------------------------------------------------------------------------------
# Format check
# ----------------------------------------------------------------------------------------------------


def test_extract_final_response_well_formed():
    assert extract_final_response(GOOD) == "Vitamin C deficiency (scurvy)."
    assert extract_final_response(CHINESE) == "答案是维生素C缺乏症。"


@pytest.mark.parametrize(
    "text",
    [
        GOOD + "\n\n## Final Response\n\nVitamin A deficiency.",  # two final responses
        "## Final Response\n\nVitamin C deficiency.",  # no thinking
        "## Thinking\n\na\n\n## Thinking\n\nb\n\n## Final Response\n\nC",  # two thinking headers
        "## Final Response\n\nC\n\n## Thinking\n\nwhy",  # answer before the thinking
        "## Thinking\n\nwhy\n\n## Final Response C",  # header not followed by a blank line
        "## Thinking\n\nwhy\n\n## Final Response\n\n   ",  # empty answer
        "Vitamin C deficiency.",
        "",
        None,
    ],
)
def test_extract_final_response_malformed(text):
    assert extract_final_response(text) is None


def test_score_response_uses_judge_only_on_the_final_response():
    seen = []

    def judge(final, reference):
        seen.append((final, reference))
        return final.startswith("Vitamin C")

    assert score_response(GOOD, "scurvy", judge) == 1.0
    assert score_response(WRONG, "scurvy", judge) == 0.1
    assert score_response("## Final Response\n\nVitamin C", "scurvy", judge) == 0.0
    assert seen == [("Vitamin C deficiency (scurvy).", "scurvy"), ("Vitamin A deficiency.", "scurvy")]
    custom = dict(correct_reward=2.0, wrong_reward=-1.0, malformed_reward=-2.0)
    assert [score_response(t, "x", judge, **custom) for t in (GOOD, WRONG, "bad")] == [2.0, -1.0, -2.0]


# ----------------------------------------------------------------------------------------------------
# Rule verifier
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "final, reference, expected",
    [
        ("Vitamin C deficiency (scurvy).", "vitamin c deficiency", True),
        ("The cause is vitamin-C   deficiency!", "Vitamin C deficiency.", True),  # punctuation, spaces, case
        ("It is an adenocarcinoma.", "the adenocarcinoma", True),  # articles
        ("Give vitamin CD.", "vitamin C", False),  # whole tokens only
        ("Vitamin A deficiency.", "Vitamin C deficiency", False),
        ("答案是维生素C缺乏症。", "维生素C缺乏症", True),
        ("答案是维生素D缺乏症。", "维生素C缺乏症", False),
        ("ＡＴＰ", "ATP", True),  # full-width letters
        ("anything", "...", False),  # nothing left to match
    ],
)
def test_rule_judge(final, reference, expected):
    assert rule_judge(final, reference) is expected


def test_rule_reward_function_batch():
    rf = RewardFunction("rule")
    responses = [GOOD, WRONG, "no headers at all", CHINESE, respond("x", "维生素D")]
    references = ["vitamin C deficiency", "vitamin C deficiency", "vitamin C", "维生素C缺乏症", "维生素C"]
    judgements = rf.judge(responses, references)
    assert judgements == [True, False, None, True, False]
    rewards = rf(responses, references)
    assert rewards == [1.0, 0.1, 0.0, 1.0, 0.1]
    assert reward_stats(judgements, rewards) == pytest.approx(
        {"reward": 2.2 / 5, "correct_rate": 2 / 5, "format_rate": 4 / 5}
    )


def test_reward_function_rejects_bad_input():
    rf = RewardFunction("rule")
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        rf([GOOD, WRONG], ["scurvy"])
    with pytest.raises(ValueError, match="reference 1 is empty"):
        rf([GOOD, WRONG], ["scurvy", "  "])


# ----------------------------------------------------------------------------------------------------
# Classifier verifier
# ----------------------------------------------------------------------------------------------------


def test_reward_prompt_has_the_fields_and_asks_true_false():
    template = load_reward_prompt()
    filled = template.format(response="RESPONSE", reference="REFERENCE")
    assert "RESPONSE" in filled and "REFERENCE" in filled
    assert "True" in template and "False" in template
    assert filled.index("RESPONSE") < filled.index("REFERENCE")


@pytest.fixture(scope="module")
def zero_head_verifier(tiny_models, tmp_path_factory):
    """The tiny verifier with its classification head zeroed: both logits are 0, so P(label 1) = 0.5."""
    path = tmp_path_factory.mktemp("verifier") / "zero_head"
    shutil.copytree(tiny_models["verifier"], path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.score.weight.zero_()
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("threshold, expected", [(0.4, 1.0), (0.5, 0.1), (0.6, 0.1)])
def test_classifier_threshold(zero_head_verifier, threshold, expected):
    rf = RewardFunction(str(zero_head_verifier), threshold=threshold, device="cpu")
    assert rf.verifier.probabilities(["Vitamin C deficiency."], ["scurvy"]) == pytest.approx([0.5])
    assert rf([GOOD, WRONG, "malformed"], ["scurvy"] * 3) == [expected, expected, 0.0]


def test_classifier_batches_match_single_rows(tiny_models):
    rf = RewardFunction(str(tiny_models["verifier"]), device="cpu", batch_size=3)
    finals = [
        "short",
        "a much longer final response " * 20,
        "medium length answer here",
        "x" * 300,
        "维生素C",
    ]
    references = ["a", "b", "c", "d", "e"]
    batched = rf.verifier.probabilities(finals, references)
    singles = [rf.verifier.probabilities([f], [r])[0] for f, r in zip(finals, references, strict=True)]
    assert batched == pytest.approx(singles, abs=1e-5)
    # A random head gives different scores to different inputs, so the rows were not mixed up.
    assert len({round(p, 6) for p in batched}) == len(batched)


def test_classifier_pools_at_the_appended_eos(tiny_models):
    """With pad == eos the model's own pooling would skip the eos the prompt ends with; ours must take the
    last attended token of each right-padded row."""
    path = tiny_models["verifier"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    template = load_reward_prompt()
    rows = [
        verifier_input_ids(tokenizer, template, r, "ref", 4000) for r in ("yes", "a longer reply than that")
    ]
    assert all(row[-1] == tokenizer.eos_token_id for row in rows)
    input_ids, attention_mask = pad_batch(rows, tokenizer.eos_token_id, "cpu")
    with torch.no_grad():
        pooled = classifier_logits(model, input_ids, attention_mask)
        model.config.pad_token_id = None  # batch of one: the model pools at the very last token
        expected = torch.cat([model(input_ids=torch.tensor([row])).logits for row in rows])
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_verifier_input_truncation_keeps_reference_and_eos(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["verifier"])
    template = load_reward_prompt()
    reference = "vitamin C deficiency"
    ids = verifier_input_ids(tokenizer, template, "blah " * 3000, reference, max_length=512)
    assert len(ids) == 512
    assert ids[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(ids)
    assert reference in text and text.count("blah") > 10
    short = verifier_input_ids(tokenizer, template, "Scurvy.", reference, max_length=512)
    assert tokenizer.decode(short) == tokenizer.decode(
        tokenizer(template.format(response="Scurvy.", reference=reference) + tokenizer.eos_token)["input_ids"]
    )


def test_classifier_rejects_a_value_model(tiny_models):
    with pytest.raises(ValueError, match="1 labels; a 2-label classifier"):
        RewardFunction(str(tiny_models["value"]), device="cpu")


# ----------------------------------------------------------------------------------------------------
# LLM judge
# ----------------------------------------------------------------------------------------------------


def test_llm_judge_against_stub_server(monkeypatch):
    def responder(body):
        prompt = body["messages"][-1]["content"]
        return "TRUE." if "Vitamin C" in prompt else "false"

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
    with StubServer(responder) as server:
        rf = RewardFunction(f"llm:{server.base_url}", llm_model="judge-model")
        rewards = rf([GOOD, WRONG, "no headers"], ["scurvy", "scurvy", "scurvy"])
        bodies = server.bodies()
        headers = [r["headers"] for r in server.requests]
    assert rewards == [1.0, 0.1, 0.0]
    assert len(bodies) == 2  # the malformed response never reaches the judge
    assert {b["model"] for b in bodies} == {"judge-model"}
    prompts = sorted(b["messages"][-1]["content"] for b in bodies)
    assert "Vitamin A deficiency." in prompts[0] and "scurvy" in prompts[0]
    assert all(h.get("Authorization") == "Bearer sk-test-key" for h in headers)


@pytest.mark.parametrize("structured_output", [True, False])
def test_llm_judge_asks_for_the_verdict_schema_unless_turned_off(monkeypatch, structured_output):
    def responder(body):
        agrees = "Vitamin C" in body["messages"][-1]["content"]
        return {"agrees": agrees} if "response_format" in body else str(agrees)

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    mode = "honour" if structured_output else "refuse"
    with StubServer(responder, response_format=mode) as server:
        rf = RewardFunction(f"llm:{server.base_url}", structured_output=structured_output)
        rewards = rf([GOOD, WRONG], ["scurvy", "scurvy"])
        formats = server.response_formats()
        assert server.schema_errors == []
    assert rewards == [1.0, 0.1]
    if structured_output:
        assert [f["json_schema"]["name"] for f in formats] == ["verdict", "verdict"]
    else:
        assert formats == [None, None]


def test_llm_judge_failure_names_the_response(monkeypatch):
    from huatuo.llm import LLMError
    from tests.stub_server import Fault

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with StubServer(lambda body: Fault("status", status=400)) as server:
        rf = RewardFunction(f"llm:{server.base_url}")
        with pytest.raises(LLMError, match="verifier call for response 0 failed"):
            rf([GOOD], ["scurvy"])
