import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from huatuo.models import (
    LLAMA3_CHAT_TEMPLATE,
    ensure_chat_template,
    ensure_pad_token,
    format_thinking_response,
    load_records,
    stop_on_eos,
)


def test_tiny_policy_chats_and_generates(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    assert tok.pad_token == "<|end_of_text|>" and tok.eos_token == "<|eot_id|>"
    assert tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template(
        [{"role": "user", "content": "胸痛 and fever?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n胸痛 and fever?<|eot_id|>"
    )
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text
    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or tok.eos_token_id in out[0, ids.shape[1] :]


def test_tiny_classifiers_have_their_label_counts(tiny_models):
    value = AutoModelForSequenceClassification.from_pretrained(tiny_models["value"])
    verifier = AutoModelForSequenceClassification.from_pretrained(tiny_models["verifier"])
    vtok = AutoTokenizer.from_pretrained(tiny_models["verifier"])
    assert value.config.num_labels == 1 and verifier.config.num_labels == 2
    assert len(vtok) != len(AutoTokenizer.from_pretrained(tiny_models["policy"]))
    logits = verifier(**vtok(["a reply"], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_format_and_local_loading(tmp_path):
    assert (
        format_thinking_response("think", "answer") == "## Thinking\n\nthink\n\n## Final Response\n\nanswer"
    )
    path = tmp_path / "items.jsonl"
    path.write_text('{"Question": "q1", "extra": {"a": 1}}\n{"Question": "q2", "extra": [1]}\n')
    ds = load_records(str(path), columns=["Question", "Response"])
    assert ds["Question"] == ["q1", "q2"] and ds["Response"] == [None, None]


def test_local_parquet_keeps_its_rows_when_columns_are_absent(tmp_path):
    import datasets

    path = tmp_path / "items.parquet"
    datasets.Dataset.from_list([{"Question": "q1", "other": 1}, {"Question": "q2", "other": 2}]).to_parquet(
        str(path)
    )
    ds = load_records(str(path), columns=["Question", "Response"])
    assert ds.column_names == ["Question", "Response"] and ds["Response"] == [None, None]
    assert load_records(str(path), columns=["Response"])["Response"] == [None, None]


def test_malformed_local_json_names_the_file_and_line(tmp_path):
    import pytest

    path = tmp_path / "items.jsonl"
    path.write_text('{"Question": "q1"}\n{"Question": \n{"Question": "q3"}\n')
    with pytest.raises(ValueError, match=r"items\.jsonl:2: not a JSON line"):
        load_records(str(path))
    path = tmp_path / "items.json"
    path.write_text('[{"Question": "q1"},')
    with pytest.raises(ValueError, match=r"items\.json: not valid JSON"):
        load_records(str(path))


def test_a_base_llama3_tokenizer_ends_turns_with_eot_and_pads_apart(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token = None, "<|end_of_text|>", None
    ensure_pad_token(ensure_chat_template(tokenizer))
    assert tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.pad_token == "<|end_of_text|>"

    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    end_of_text = tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    model.generation_config.eos_token_id = end_of_text
    stop_on_eos(model, tokenizer)
    assert model.generation_config.eos_token_id == [end_of_text, tokenizer.eos_token_id]


def test_a_model_template_and_eos_are_left_alone(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    tokenizer.chat_template, tokenizer.eos_token = "{{ messages[0]['content'] }}", "<|end_of_text|>"
    tokenizer.pad_token = "<|begin_of_text|>"
    ensure_pad_token(ensure_chat_template(tokenizer))
    assert (
        tokenizer.chat_template == "{{ messages[0]['content'] }}" and tokenizer.eos_token == "<|end_of_text|>"
    )
    assert tokenizer.pad_token == "<|begin_of_text|>"
