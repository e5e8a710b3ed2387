"""search_for_complex_reasoning_path.py end to end against the scripted OpenAI-compatible server on
loopback, plus the pure parsing, strategy and rendering helpers it uses."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from huatuo.items import ANSWER, QUESTION
from huatuo.prompts import load_prompt
from huatuo.search import (
    FIRST_STRATEGIES,
    STRATEGIES,
    ParseError,
    parse_cot,
    parse_natural_reasoning,
    pick_strategy,
    render_stream,
    verdict,
)
from search_for_complex_reasoning_path import main, parse_args
from tests.stub_server import Fault, StubServer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "search_for_complex_reasoning_path.py"
NAME = "problems_CoT_search"

# Each prompt is recognised by the tags it wraps its fields in; a refinement by its strategy's wording.
STRATEGY_WORDS = {
    "**backtracking**": "Backtracking",
    "**exploring a new path**": "Exploring New Paths",
    "**verifying**": "Verification",
    "**correcting**": "Correction",
    "**回溯**": "Backtracking",
    "**探索新思路**": "Exploring New Paths",
    "**验证**": "Verification",
    "**纠正**": "Correction",
}


def cot(*steps):
    """A CoT reply from (action, content) or (action, title, content) tuples."""
    keys = {2: ("action", "content"), 3: ("action", "title", "content")}
    return json.dumps({"CoT": [dict(zip(keys[len(s)], s, strict=True)) for s in steps]})


class Script:
    """Scripted LLM: verifier outcomes per problem (default True), unparseable first replies, faults.
    Problems are numbered by the markers [qN] in the question and [aN] in the answer."""

    def __init__(self, outcomes=None, garbage=None, faults=None):
        self.outcomes = {k: list(v) for k, v in (outcomes or {}).items()}
        self.garbage = dict(garbage or {})
        self.faults = dict(faults or {})
        self.calls = defaultdict(Counter)

    def __call__(self, body):
        prompt = body["messages"][-1]["content"]
        if "<model_answer>" in prompt:
            pid = int(re.search(r"\[a(\d+)\]", prompt).group(1))
            outcomes = self.outcomes.get(pid, [])
            self.calls[pid]["verify"] += 1
            return "True" if not outcomes or outcomes.pop(0) else "False"
        pid = int(re.search(r"\[q(\d+)\]", prompt).group(1))
        if pid in self.faults:
            return self.faults[pid]
        if "<thought_process>" in prompt:
            return json.dumps({"NaturalReasoning": f"Hmm, natural thinking for [q{pid}].\n\nSo that's it."})
        if "<internal_thinking>" in prompt:
            return f"Final answer for [q{pid}]."
        if self.garbage.get(pid, 0) > 0:
            self.garbage[pid] -= 1
            return "I think the answer is obvious."
        if "<hidden_answer>" in prompt:
            kind, label = "label", "with hint"
        elif "<previous_reasoning>" in prompt:
            kind = label = next(s for w, s in STRATEGY_WORDS.items() if w in prompt)
        else:
            kind, label = "init", "init"
        self.calls[pid][kind] += 1
        n = self.calls[pid][kind]
        steps = [
            ("Inner Thinking", f"{label} {n}", f"thinking {label} {n}"),
            ("Final Conclusion", f"conclusion {label} {n}"),
            ("Verification", "checked"),
        ]
        if kind != "init":
            steps.insert(0, ("Verification", "the last conclusion was wrong"))
        return cot(*steps)


def write_problems(path, n):
    items = [
        {QUESTION: f"[q{i}] What is wrong with patient {i}?", ANSWER: f"[a{i}]"} for i in range(1, n + 1)
    ]
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def run_search(server, tmp_path, *flags, n=1, data=None):
    data = data or write_problems(tmp_path / "problems.json", n)
    out = tmp_path / "out"
    main(
        parse_args(
            [
                "--data_path",
                str(data),
                "--output_dir",
                str(out),
                "--api_url",
                server.base_url,
                "--model_name",
                "stub",
                *flags,
            ]
        )
    )
    return out


def kept_records(out):
    (path,) = out.glob(f"{NAME}_[0-9]*.json")
    return json.loads(path.read_text(encoding="utf-8"))


def given_up_records(out):
    paths = list(out.glob(f"{NAME}_given_up_*.json"))
    return json.loads(paths[0].read_text(encoding="utf-8")) if paths else []


def steps_of(record, step):
    return [e for e in record["llm_log"] if e["step"] == step]


# ---------------------------------------------------------------- pure helpers


def test_parse_cot_checks_the_closing_actions():
    good = cot(("Inner Thinking", "t", "a"), ("Final Conclusion", "b"), ("Verification", "c"))
    assert [s["action"] for s in parse_cot(f"Here it is:\n```json\n{good}\n```")][-1] == "Verification"
    wrong_order = cot(("Inner Thinking", "t", "a"), ("Verification", "c"), ("Final Conclusion", "b"))
    no_content = json.dumps({"CoT": [{"action": "Inner Thinking"}]})
    for bad in (wrong_order, no_content, '{"CoT": []}', '{"steps": []}', "not json"):
        with pytest.raises(ParseError):
            parse_cot(bad)
    assert parse_natural_reasoning('{"NaturalReasoning": "hmm\\nok"}') == "hmm\nok"
    # An unescaped line break inside the string, as models often write multi-paragraph text.
    assert parse_natural_reasoning('{"NaturalReasoning": "hmm.\n\nWait, ok"}') == "hmm.\n\nWait, ok"
    with pytest.raises(ParseError):
        parse_natural_reasoning('{"NaturalReasoning": ""}')


def test_schema_replies_parse_as_the_free_text_ones():
    steps = [
        {"action": "Inner Thinking", "title": "t", "content": "a"},
        {"action": "Final Conclusion", "title": None, "content": "b"},
        {"action": "Verification", "title": None, "content": "c"},
    ]
    assert (
        parse_cot(json.dumps({"CoT": steps}))
        == json.loads(cot(("Inner Thinking", "t", "a"), ("Final Conclusion", "b"), ("Verification", "c")))[
            "CoT"
        ]
    )


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('{"agrees": true}', True),
        ('{"agrees": false}', False),
        ('```json\n{"agrees": false}\n```', False),
        ("True", True),
        ("False.", False),
        ("The answer is true to the reference.", True),
        ('{"agrees": "maybe"}', False),
    ],
)
def test_verdict_reads_the_schema_then_the_plain_reply(reply, expected):
    assert verdict(reply) is expected


def test_vllms_grammar_backend_compiles_each_schema_and_accepts_what_the_parsers_read():
    xgr = pytest.importorskip("xgrammar")  # vLLM's default structured-output backend (requirements-gpu.txt)
    from xgrammar.testing import _is_grammar_accept_string as accepts

    from construct_verifiable_medical_problems import FILTER_FORMAT, REFORMAT_FORMAT
    from huatuo.search import COT_FORMAT, NATURAL_REASONING_FORMAT, VERDICT_FORMAT

    steps = [
        {"action": "Inner Thinking", "title": "t", "content": "a"},
        {"action": "Final Conclusion", "title": None, "content": "b"},
        {"action": "Verification", "title": None, "content": "c"},
    ]
    cases = [
        (COT_FORMAT, {"CoT": steps}, True),
        (COT_FORMAT, {"CoT": [{"action": "Inner Thinking", "content": "a"}]}, False),
        (NATURAL_REASONING_FORMAT, {"NaturalReasoning": "Hmm.\n\nOkay."}, True),
        (VERDICT_FORMAT, {"agrees": False}, True),
        (VERDICT_FORMAT, {"agrees": "False"}, False),
        (FILTER_FORMAT, {"category": "Too Simple"}, True),
        (FILTER_FORMAT, {"category": "Simple"}, False),
        (REFORMAT_FORMAT, {QUESTION: "Cause?", ANSWER: "Parvovirus B19"}, True),
        (REFORMAT_FORMAT, {QUESTION: "Cause?"}, False),
    ]
    for fmt, value, valid in cases:
        grammar = xgr.Grammar.from_json_schema(json.dumps(fmt["json_schema"]["schema"]), strict_mode=True)
        assert accepts(grammar, json.dumps(value)) is valid, (fmt["json_schema"]["name"], value)


def test_backtracking_is_never_the_first_strategy():
    rng = random.Random(0)
    first = Counter(pick_strategy(rng, 0) for _ in range(2000))
    later = Counter(pick_strategy(rng, 1) for _ in range(2000))
    assert set(first) == set(FIRST_STRATEGIES) and "Backtracking" not in first
    assert set(later) == set(STRATEGIES)


def test_render_stream_heads_blocks_by_title_or_action():
    steps = [
        {"action": "Inner Thinking", "title": "Anaemia type", "content": "Low reticulocytes."},
        {"action": "Final Conclusion", "content": "Parvovirus B19."},
        {"action": "Verification", "content": "Fits."},
    ]
    assert render_stream(steps) == (
        "### Anaemia type\nLow reticulocytes.\n\n### Conclusion\nParvovirus B19.\n\n### Verification\nFits."
    )


def test_efficient_search_is_a_real_boolean():
    for value, expected in (
        ("True", True),
        ("true", True),
        ("1", True),
        ("False", False),
        ("false", False),
        ("0", False),
    ):
        assert parse_args(["--data_path", "x.json", "--efficient_search", value]).efficient_search is expected
    with pytest.raises(SystemExit):
        parse_args(["--data_path", "x.json", "--efficient_search", "maybe"])


def test_help_explains_the_flags():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True
    )
    for flag in (
        "--max_search_attempts",
        "--max_search_depth",
        "--efficient_search",
        "--max_parse_retries",
        "--language",
        "--prompt_dir",
        "--no_structured_output",
    ):
        assert flag in result.stdout


# ---------------------------------------------------------------- the search trail over HTTP


def structured(script):
    """The script's answers as a server honouring response_format writes them: a verdict as
    {"agrees": bool}, and every CoT step with a title (null where there is none), keys in schema order."""

    def respond(body):
        reply = script(body)
        name = (body.get("response_format") or {}).get("json_schema", {}).get("name")
        if name == "verdict":
            return {"agrees": reply == "True"}
        if name == "chain_of_thought":
            steps = json.loads(reply)["CoT"]
            return {
                "CoT": [
                    {"action": s["action"], "title": s.get("title"), "content": s["content"]} for s in steps
                ]
            }
        return reply

    return respond


def search_steps(tmp_path, name, responder, *flags, response_format="ignore"):
    """Search two problems, the first through every step (fails, refinements, Label_CoT); return the
    records without usage and raw replies, and the response_format each step was sent with."""
    data = write_problems(tmp_path / "problems.json", 2)
    with StubServer(responder, response_format=response_format) as server:
        out = run_search(server, tmp_path / name, "--max_search_depth", "2", *flags, data=data)
        assert server.schema_errors == []
        bodies = server.bodies()
    records = kept_records(out)
    step_of = {entry["query"]: entry["step"] for r in records for entry in r["llm_log"]}
    sent = defaultdict(list)
    for body in bodies:
        step = step_of[body["messages"][-1]["content"]]
        sent[re.sub(r"Re_CoT_.*", "Re_CoT", step)].append(body.get("response_format"))
    for record in records:
        del record["usage"]
        record["llm_log"] = [(e["step"], e["query"]) for e in record["llm_log"]]
    return records, sent


def test_each_json_step_sends_its_schema_and_json_replies_give_the_same_records(tmp_path):
    outcomes = {1: [False, False, False]}
    plain, sent = search_steps(tmp_path, "plain", Script(outcomes=outcomes))
    honoured, sent_honoured = search_steps(
        tmp_path, "json", structured(Script(outcomes=outcomes)), response_format="honour"
    )
    assert honoured == plain
    assert plain[0]["response_type"][-1] == "Label_CoT" and plain[0]["verify"] == [False, False, False, True]
    assert "title" not in plain[0]["Long_CoT"][-1]
    assert sent == sent_honoured
    counts = {step: len(formats) for step, formats in sent.items()}
    assert counts == {
        "Init_CoT": 2, "verify": 4, "Re_CoT": 2, "Label_CoT": 1, "reformat_natural": 2, "final_response": 2
    }  # fmt: skip
    expected = {
        "Init_CoT": ("chain_of_thought", ["CoT"]),
        "Re_CoT": ("chain_of_thought", ["CoT"]),
        "Label_CoT": ("chain_of_thought", ["CoT"]),
        "verify": ("verdict", ["agrees"]),
        "reformat_natural": ("natural_reasoning", ["NaturalReasoning"]),
    }
    for step, (name, required) in expected.items():
        for fmt in sent[step]:
            assert fmt["json_schema"]["name"] == name and fmt["json_schema"]["strict"] is True
            assert fmt["json_schema"]["schema"]["required"] == required
    step_schema = sent["Init_CoT"][0]["json_schema"]["schema"]["properties"]["CoT"]["items"]
    assert step_schema["required"] == ["action", "title", "content"]
    assert sent["final_response"] == [None, None]  # the answer is free text


def test_no_structured_output_sends_no_schema_and_gives_the_same_records(tmp_path):
    plain, _ = search_steps(tmp_path, "plain", Script(outcomes={1: [False, True]}))
    off, sent = search_steps(
        tmp_path,
        "off",
        Script(outcomes={1: [False, True]}),
        "--no_structured_output",
        response_format="refuse",
    )
    assert off == plain
    assert all(fmt is None for formats in sent.values() for fmt in formats)


def test_a_server_refusing_response_format_stops_the_run_naming_the_flag(tmp_path):
    with StubServer(Script(), response_format="refuse") as server:
        with pytest.raises(SystemExit) as exit_info:
            run_search(server, tmp_path, "--num_process", "4", n=40)
        sent = len(server.requests)
    message = str(exit_info.value.code)
    assert "unsupported response_format" in message and "rerun with --no_structured_output" in message
    assert 1 <= sent <= 4
    assert list((tmp_path / "out" / NAME).iterdir()) == []


def test_fail_fail_pass_refines_twice_and_keeps_the_trail(tmp_path):
    script = Script(outcomes={1: [False, False, True]})
    with StubServer(script) as server:
        out = run_search(server, tmp_path, "--max_search_depth", "2", "--max_search_attempts", "1")
        n_requests = len(server.requests)
    (record,) = kept_records(out)
    assert record["status"] == "kept" and record["process_id"] == 1
    assert record["verify"] == [False, False, True]
    first, second = record["response_type"][1:]
    assert record["response_type"][0] == "Init_CoT" and first != "Re_CoT_Backtracking"
    assert first.startswith("Re_CoT_") and second.startswith("Re_CoT_")
    # Each refinement replaced the previous closing Verification; the final chain ends as required.
    assert [s["action"] for s in record["Long_CoT"]] == ["Inner Thinking", "Final Conclusion"] + [
        "Verification",
        "Inner Thinking",
        "Final Conclusion",
    ] * 2 + ["Verification"]
    assert record["Long_CoT"][0]["title"] == "init 1"
    # The refinement prompt saw the chain so far without its last Verification.
    second_query = steps_of(record, second)[0]["query"]
    assert json.dumps(record["Long_CoT"][:5], ensure_ascii=False, indent=2) in second_query
    # The verifier was shown each Final Conclusion in turn, with the reference answer.
    verify_queries = [e["query"] for e in steps_of(record, "verify")]
    assert "conclusion init 1" in verify_queries[0] and "[a1]" in verify_queries[0]
    assert (
        record["Long_CoT"][-2]["content"] in verify_queries[2]
        and "init" not in record["Long_CoT"][-2]["content"]
    )
    # The natural rewrite saw the stream of search; the final answer saw the natural thinking.
    natural_query = steps_of(record, "reformat_natural")[0]["query"]
    assert "### init 1\nthinking init 1" in natural_query and "### Conclusion\n" in natural_query
    final_query = steps_of(record, "final_response")[0]["query"]
    assert "Hmm, natural thinking for [q1]." in final_query
    assert (
        record["Complex_CoT"].startswith("Hmm, natural thinking")
        and record["Response"] == "Final answer for [q1]."
    )
    assert record["Question"] == record[QUESTION]
    assert len(record["llm_log"]) == n_requests == record["usage"]["calls"] == 8
    assert record["usage"]["prompt_tokens"] > 0 and record["usage"]["completion_tokens"] > 0
    summary = json.loads((out / f"{NAME}_summary.json").read_text())
    assert summary["kept"] == 1 and summary["usage_all_items"]["calls"] == 8


def test_all_attempts_fail_then_efficient_search_labels_from_fresh_attempts(tmp_path):
    script = Script(outcomes={1: [False] * 10})
    with StubServer(script) as server:
        out = run_search(server, tmp_path, "--max_search_depth", "1", "--max_search_attempts", "2")
    (record,) = kept_records(out)
    assert record["response_type"][0] == "Init_CoT" and record["response_type"][2] == "Label_CoT"
    assert record["verify"] == [False, False, True]
    (failed,) = record["failed_attempts"]
    assert failed["verify"] == [False, False] and len(failed["response_type"]) == 2
    # The second attempt started from a new initial chain, not the first one.
    assert script.calls[1]["init"] == 2
    assert failed["Long_CoT"][0]["title"] == "init 1" and record["Long_CoT"][0]["title"] == "init 2"
    second_refinement = steps_of(record, record["response_type"][1])[-1]["query"]
    assert "init 2" in second_refinement and "init 1" not in second_refinement
    label_query = steps_of(record, "Label_CoT")[0]["query"]
    assert "[a1]" in label_query
    assert record["Long_CoT"][-2]["content"] == "conclusion with hint 1"


def test_without_efficient_search_a_failed_problem_is_given_up_with_its_reason(tmp_path):
    script = Script(outcomes={1: [False] * 10})
    with StubServer(script) as server:
        out = run_search(server, tmp_path, "--efficient_search", "False", n=2)
    assert [r["process_id"] for r in kept_records(out)] == [2]
    (record,) = given_up_records(out)
    assert record["process_id"] == 1 and record["status"] == "given_up"
    assert "--efficient_search is off" in record["reason"] and record["verify"] == [False, False, False]
    assert script.calls[1]["label"] == 0


def test_strategies_follow_the_seed_and_use_their_own_prompts(tmp_path):
    outcomes = {i: [False] * 10 for i in range(1, 17)}
    with StubServer(Script(outcomes)) as server:
        out = run_search(server, tmp_path, "--max_search_depth", "3", "--num_process", "4", n=16)
    records = kept_records(out)
    trails = [r["response_type"] for r in records]
    assert all(t[1] != "Re_CoT_Backtracking" for t in trails)
    assert any("Re_CoT_Backtracking" in t[2:] for t in trails)
    for record in records:
        # The reply to a strategy's prompt (recognised by its wording) names that strategy.
        titles = [s["title"] for s in record["Long_CoT"] if s.get("title")]
        assert [f"Re_CoT_{t.rsplit(' ', 1)[0]}" for t in titles[1:4]] == record["response_type"][1:4]
    with StubServer(Script(outcomes)) as server:
        again = run_search(
            server,
            tmp_path / "again",
            "--max_search_depth",
            "3",
            "--num_process",
            "4",
            data=tmp_path / "problems.json",
        )
    assert [r["response_type"] for r in kept_records(again)] == trails


def test_unparseable_replies_are_asked_again_then_given_up(tmp_path):
    script = Script(garbage={1: 1, 2: 100})
    with StubServer(script) as server:
        out = run_search(server, tmp_path, n=2)
    (kept,) = kept_records(out)
    assert kept["process_id"] == 1 and len(steps_of(kept, "Init_CoT")) == 2
    (given_up,) = given_up_records(out)
    assert given_up["process_id"] == 2 and "Init_CoT: no valid reply in 3 tries" in given_up["reason"]
    assert len(steps_of(given_up, "Init_CoT")) == 3


def test_chinese_selects_the_zh_prompts(tmp_path):
    with StubServer(Script(outcomes={1: [False, True]})) as server:
        out = run_search(server, tmp_path, "--language", "zh")
        prompts = [b["messages"][-1]["content"] for b in server.bodies()]
    (record,) = kept_records(out)
    assert record["verify"] == [False, True]
    question = record[QUESTION]
    assert prompts[0] == load_prompt("search_init", "zh").format(question=question)
    assert prompts[1] == load_prompt("verify", "zh").format(response="conclusion init 1", reference="[a1]")
    assert "上面推理的 Final Conclusion 已经过核查" in prompts[2]
    assert prompts[-1] == load_prompt("final_response", "zh").format(
        thinking=record["Complex_CoT"], question=question
    )


def test_custom_prompt_dir_overrides_file_by_file(tmp_path):
    custom = tmp_path / "my_prompts"
    custom.mkdir()
    (custom / "search_init.txt").write_text("MY OWN INIT PROMPT\n{question}\n", encoding="utf-8")
    with StubServer(Script()) as server:
        out = run_search(server, tmp_path, "--prompt_dir", str(custom))
        prompts = [b["messages"][-1]["content"] for b in server.bodies()]
    assert prompts[0].startswith("MY OWN INIT PROMPT\n[q1]")
    assert "<model_answer>" in prompts[1]
    assert kept_records(out)[0]["status"] == "kept"


def test_earlier_stage_drops_are_passed_over_and_ids_follow_the_file(tmp_path):
    data = tmp_path / "problems.json"
    items = [
        {"question": "too easy", "status": "dropped", "reason": "filter: Too Simple"},
        {QUESTION: "[q2] Which nerve?", ANSWER: "[a2]", "status": "kept"},
    ]
    data.write_text(json.dumps(items), encoding="utf-8")
    with StubServer(Script()) as server:
        out = run_search(server, tmp_path, data=data)
    (record,) = kept_records(out)
    assert record["process_id"] == 2 and record["status"] == "kept"
    assert json.loads((out / f"{NAME}_summary.json").read_text())["passed_over"] == 1


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        ("[{", "not valid JSON"),
        (json.dumps({QUESTION: "q", ANSWER: "a"}), "expected a JSON list"),
        (json.dumps([{QUESTION: "q", ANSWER: "a"}, {QUESTION: "q"}]), f"item 1, key '{ANSWER}' is missing"),
        (json.dumps([{QUESTION: 7, ANSWER: "a"}]), f"item 0, key '{QUESTION}' must be a string"),
        (json.dumps([{QUESTION: "q", ANSWER: "  "}]), f"item 0, key '{ANSWER}' must not be empty"),
    ],
)
def test_bad_input_fails_clearly_before_any_call_and_writes_nothing(tmp_path, content, message):
    data = tmp_path / "problems.json"
    if content is not None:
        data.write_text(content, encoding="utf-8")
    with StubServer(Script()) as server, pytest.raises(SystemExit) as exit_info:
        run_search(server, tmp_path, data=data)
    assert message in str(exit_info.value.code)
    assert server.requests == []
    assert not (tmp_path / "out").exists()


def test_openai_without_a_key_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data = write_problems(tmp_path / "problems.json", 1)
    argv = ["--data_path", str(data), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="needs a key: set OPENAI_API_KEY"):
        main(parse_args([*argv, "--api_url", "https://api.openai.com/v1/chat/completions"]))
    assert not (tmp_path / "out").exists()


def test_failed_requests_are_recorded_and_the_key_is_written_nowhere(tmp_path):
    key = "sk-test-0123456789abcdef"
    faults = {2: Fault("status", status=400, message=f"invalid request for {key}")}
    with StubServer(Script(faults=faults)) as server:
        out = run_search(server, tmp_path, "--api_key", key, n=2)
        headers = [r["headers"].get("Authorization") for r in server.requests]
    assert set(headers) == {f"Bearer {key}"}
    assert [r["process_id"] for r in kept_records(out)] == [1]
    (given_up,) = given_up_records(out)
    assert given_up["process_id"] == 2 and "HTTP 400" in given_up["reason"] and "***" in given_up["reason"]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) >= 6
    for path in written:
        assert key not in path.read_text(encoding="utf-8"), path


def test_kill_9_then_resume_accounts_for_every_item_once(tmp_path):
    n = 12
    data = write_problems(tmp_path / "problems.json", n)
    out = tmp_path / "out"
    store = out / NAME
    script = Script()
    with StubServer(script, latency=0.03) as server:
        flags = [
            "--data_path",
            str(data),
            "--output_dir",
            str(out),
            "--api_url",
            server.base_url,
            "--num_process",
            "2",
        ]
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *flags],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while (
                len(list(store.glob("[0-9]*.json"))) < 3
                and time.monotonic() < deadline
                and proc.poll() is None
            ):
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        saved_before = {p.stem for p in store.glob("[0-9]*.json")}
        assert 3 <= len(saved_before) < n
        for path in store.glob("*.json"):
            json.loads(path.read_text(encoding="utf-8"))
        main(parse_args([*flags, "--model_name", "stub"]))
    records = kept_records(out)
    assert sorted(r["process_id"] for r in records) == list(range(1, n + 1))
    assert given_up_records(out) == []
    # Items saved before the kill were not searched again.
    for pid in saved_before:
        assert script.calls[int(pid)]["init"] == 1
    assert list(out.glob(f"{NAME}_[0-9]*.json")) == [out / f"{NAME}_{n}.json"]
