"""construct_verifiable_medical_problems.py end to end through real HTTP against scripted servers."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from construct_verifiable_medical_problems import (
    FILTER_CATEGORIES,
    Decontaminator,
    chosen_letter,
    filter_category,
    keep_closed,
    main,
    parse_args,
)
from tests.stub_server import Fault, StubServer

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "construct_verifiable_medical_problems.py"
KEY = "sk-construct-91c0-never-written"
QUESTION, ANSWER = "Open-ended Verifiable Question", "Ground-True Answer"


def mcq(n, tag=""):
    return {
        "question": f"Case {n} {tag}: a patient presents with fatigue, pallor and a low reticulocyte count. Cause?",
        "options": {
            "A": f"Iron deficiency {n}",
            "B": f"Parvovirus B19 infection {n}",
            "C": "Folate deficiency",
        },
        "answer_idx": "B",
        "answer": f"Parvovirus B19 infection {n}",
        "source": "synthetic",
    }


class Script:
    """Scripted model behaviour keyed on tags in the question text.

    [simple]   the filter says Too Simple            [easy]    every small model answers correctly
    [flaky]    the first rewrite is not JSON         [badjson] every rewrite is not JSON
    [half]     only the first small model is right
    """

    def __init__(self, faults=()):
        self.faults = list(faults)

    def __call__(self, body):
        if self.faults:
            return self.faults.pop(0)
        prompt = body["messages"][-1]["content"]
        if body["model"].startswith("small"):
            right = "[easy]" in prompt or ("[half]" in prompt and body["model"] == "small-a")
            return f"Reasoning... The answer is {'B' if right else 'A'}."
        if QUESTION not in prompt:
            return "Too Simple" if "[simple]" in prompt else "Pass"
        if "[badjson]" in prompt or ("[flaky]" in prompt and not getattr(self, "flaked", False)):
            self.flaked = True
            return "Sure! Here is the rewrite: Open-ended question ..."
        case = prompt.split("Case ")[1].split(" ")[0]
        return json.dumps({QUESTION: f"Open version of case {case}?", ANSWER: f"Parvovirus B19 {case}"})


def write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False))
    return path


def run_main(*argv):
    main(parse_args([str(a) for a in argv]))


def final_records(out_dir, name="data"):
    (path,) = Path(out_dir).glob(f"{name}_final_*.json")
    return json.loads(path.read_text()), path


def test_end_to_end_cli_every_step(tmp_path):
    items = [mcq(1), mcq(2, "[simple]"), mcq(3, "[easy]"), mcq(4, "[half]"), mcq(5, "[flaky]")]
    items.append({**mcq(6), "question": "Too short?"})
    items.append(
        {
            **mcq(7),
            "question": "  The   ANSWER to this one was copied from the evaluation set word for word, sadly. Why?",
        }
    )
    eval_file = write(
        tmp_path / "eval.json",
        {
            "medqa": [
                {
                    **mcq(99),
                    "question": "the answer to this one was copied from the evaluation set word for word",
                }
            ]
        },
    )
    data = write(tmp_path / "data.json", items)
    out = tmp_path / "out"
    with StubServer(Script()) as server:
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        proc = subprocess.run(
            [sys.executable, SCRIPT, "--data_path", data, "--output_dir", out, "--filter_data",
             "--api_url", server.base_url + "/chat/completions", "--api_key", KEY, "--model_name", "big",
             "--min_question_chars", "40", "--decontaminate", eval_file,
             "--difficulty_models", f"small-a@{server.base_url}", f"small-b@{server.base_url}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records, path = final_records(out)
    assert path.name == "data_final_7.json"
    assert [r["process_id"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    status = {r["process_id"]: (r["status"], r.get("dropped_by")) for r in records}
    assert status == {
        1: ("kept", None),
        2: ("dropped", "filter"),
        3: ("dropped", "difficulty"),
        4: ("kept", None),
        5: ("kept", None),
        6: ("dropped", "length"),
        7: ("dropped", "decontamination"),
    }
    assert records[0][QUESTION] == "Open version of case 1?" and records[0][ANSWER] == "Parvovirus B19 1"
    assert records[0]["source"] == "synthetic" and records[0]["closed_form"] is False
    assert records[1]["reason"] == "filter: Too Simple"
    assert [a["correct"] for a in records[3]["difficulty"]] == [True, False]
    assert records[4]["usage"]["calls"] == 5  # two small models, the filter, two rewrites
    assert records[5]["usage"]["calls"] == 0
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["dropped_by"] == {"filter": 1, "difficulty": 1, "length": 1, "decontamination": 1}
    assert summary["usage_this_run"]["calls"] == len(server.requests) == 18
    assert summary["usage_all_items"]["calls"] == 18
    assert "dropped by" in proc.stdout
    main_model = [r for r in server.requests if r["body"]["model"] == "big"]
    small_model = [r for r in server.requests if r["body"]["model"] != "big"]
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in main_model)
    assert all("Authorization" not in r["headers"] for r in small_model)
    assert "api_key" not in json.loads((out / "data_args.json").read_text())
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert KEY not in file.read_text(errors="replace"), file
    assert KEY not in proc.stdout + proc.stderr


def test_faults_are_retried_and_bad_rewrites_given_up(tmp_path):
    data = write(tmp_path / "data.json", [mcq(1), mcq(2, "[badjson]")])
    faults = [Fault("status", status=429, retry_after=0), Fault("malformed"), Fault("status", status=500)]
    with StubServer(Script(faults)) as server:
        run_main(
            "--data_path",
            data,
            "--output_dir",
            tmp_path,
            "--api_url",
            server.base_url,
            "--num_process",
            1,
            "--backoff_base",
            0.05,
        )
    records, _ = final_records(tmp_path)
    assert records[0]["status"] == "kept" and records[0]["usage"]["retries"] == 3
    assert records[1]["status"] == "given_up"
    assert records[1]["reason"].startswith("rewrite not valid after 2 tries")
    assert len(records[1]["reformat_replies"]) == 2
    summary = json.loads((tmp_path / "data_summary.json").read_text())
    assert summary["status"] == {"kept": 1, "given_up": 1} and summary["usage_this_run"]["retries"] == 3


def test_unreachable_server_gives_up_items_without_stopping(tmp_path):
    data = write(tmp_path / "data.json", [mcq(1), mcq(2)])
    with StubServer(lambda body: Fault("status", status=401, message="bad key")) as server:
        run_main(
            "--data_path", data, "--output_dir", tmp_path, "--api_url", server.base_url, "--api_key", KEY
        )
    records, _ = final_records(tmp_path)
    assert [r["status"] for r in records] == ["given_up", "given_up"]
    assert "HTTP 401" in records[0]["reason"] and KEY not in records[0]["reason"]
    with StubServer(Script()) as server:
        run_main("--data_path", data, "--output_dir", tmp_path, "--api_url", server.base_url)
        assert server.requests == []
        run_main(
            "--data_path", data, "--output_dir", tmp_path, "--api_url", server.base_url, "--retry_given_up"
        )
    records, _ = final_records(tmp_path)
    assert [r["status"] for r in records] == ["kept", "kept"]


def test_kill_9_then_resume_processes_every_item_once(tmp_path):
    items = [mcq(n) for n in range(1, 13)]
    data = write(tmp_path / "data.json", items)
    store = tmp_path / "data"
    argv = [
        sys.executable,
        SCRIPT,
        "--data_path",
        data,
        "--output_dir",
        tmp_path,
        "--filter_data",
        "--num_process",
        "2",
    ]
    with StubServer(Script(), latency=0.2) as server:
        proc = subprocess.Popen(
            [*argv, "--api_url", server.base_url], cwd=tmp_path, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while len(list(store.glob("*.json"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        saved = {p.stem for p in store.glob("*.json")}
        assert 4 <= len(saved) < 12
        for file in store.iterdir():
            json.loads(file.read_text())  # nothing truncated, no temporary file left readable as a result
        before = len(server.requests)
        subprocess.run([*argv, "--api_url", server.base_url], cwd=tmp_path, check=True, capture_output=True)
        asked_again = {
            r["body"]["messages"][-1]["content"].split("Case ")[1].split(" ")[0]
            for r in server.requests[before:]
        }
    assert not asked_again & saved
    records, _ = final_records(tmp_path)
    assert sorted(r["process_id"] for r in records) == list(range(1, 13))
    assert all(r["status"] == "kept" for r in records)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        ("[{", "not valid JSON"),
        ({"question": "q"}, "expected a JSON list of items"),
        (
            [mcq(1), mcq(2), {k: v for k, v in mcq(3).items() if k != "answer_idx"}],
            "item 2 is missing key 'answer_idx'",
        ),
        ([mcq(1), {**mcq(2), "options": ["x", "y"]}], "item 1, key 'options' must be a non-empty object"),
        ([{**mcq(1), "answer_idx": "Z"}], "item 0, key 'answer_idx' is 'Z', not one of the options"),
        ([{**mcq(1), "question": 7}], "item 0, key 'question' must be a string"),
        ([mcq(1), "text"], "item 1 must be an object"),
    ],
)
def test_bad_input_fails_clearly_before_any_call_or_write(tmp_path, content, message):
    data = tmp_path / "data.json"
    if isinstance(content, str):
        data.write_text(content)
    elif content is not None:
        write(data, content)
    out = tmp_path / "out"
    with StubServer(Script()) as server:
        with pytest.raises(SystemExit) as exit_info:
            run_main("--data_path", data, "--output_dir", out, "--api_url", server.base_url)
    assert message in str(exit_info.value.code) and str(data) in str(exit_info.value.code)
    assert server.requests == [] and not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--difficulty_models", "no-url-here"], "must look like MODEL@URL"),
        (["--decontaminate", "missing_eval.json"], "missing_eval.json: file not found"),
        (["--keep_mcq_fraction", "1.5"], "--keep_mcq_fraction"),
        (["--api_url", "localhost:8000"], "--api_url must be an http(s) URL"),
        (["--api_url", "https://api.openai.com/v1"], "needs a key: set OPENAI_API_KEY"),
    ],
)
def test_bad_flags_fail_before_writing(tmp_path, monkeypatch, flags, message):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data = write(tmp_path / "data.json", [mcq(1)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(
            "--data_path",
            data,
            "--output_dir",
            tmp_path / "out",
            "--api_url",
            "http://127.0.0.1:9/v1",
            *flags,
        )
    assert message in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()


def test_chinese_prompts_and_prompt_dir_override(tmp_path):
    data = write(tmp_path / "data.json", [mcq(1)])
    with StubServer(Script()) as server:
        run_main("--data_path", data, "--output_dir", tmp_path / "zh", "--api_url", server.base_url,
                 "--filter_data", "--language", "zh")  # fmt: skip
        zh_prompts = [b["messages"][-1]["content"] for b in server.bodies()]
    assert len(zh_prompts) == 2 and all("选项" in p for p in zh_prompts)
    assert final_records(tmp_path / "zh")[0][0]["status"] == "kept"

    custom = tmp_path / "my_prompts"
    custom.mkdir()
    (custom / "construct_reformat.txt").write_text(
        'MY REWRITE of {question}\n{options}\nReply as {{"Open-ended Verifiable Question": "", "Ground-True Answer": ""}}'
    )
    with StubServer(Script()) as server:
        run_main("--data_path", data, "--output_dir", tmp_path / "custom", "--api_url", server.base_url,
                 "--filter_data", "--prompt_dir", custom)  # fmt: skip
        filter_prompt, rewrite_prompt = (b["messages"][-1]["content"] for b in server.bodies())
    assert (
        rewrite_prompt.startswith("MY REWRITE of Case 1")
        and "A. Iron deficiency 1\nB. Parvovirus" in rewrite_prompt
    )
    assert "MY REWRITE" not in filter_prompt and "Case 1" in filter_prompt
    assert final_records(tmp_path / "custom")[0][0]["status"] == "kept"


def test_closed_form_share_skips_the_rewrite(tmp_path):
    data = write(tmp_path / "data.json", [mcq(1), mcq(2)])
    with StubServer(Script()) as server:
        run_main(
            "--data_path",
            data,
            "--output_dir",
            tmp_path,
            "--api_url",
            server.base_url,
            "--keep_mcq_fraction",
            1,
        )
        assert server.requests == []
    records, _ = final_records(tmp_path)
    assert records[0]["closed_form"] is True
    assert records[0][QUESTION].endswith(
        "\nA. Iron deficiency 1\nB. Parvovirus B19 infection 1\nC. Folate deficiency"
    )
    assert records[0][ANSWER] == "B. Parvovirus B19 infection 1"
    picked = [pid for pid in range(1, 2001) if keep_closed(pid, 0.25, seed=42)]
    assert picked == [pid for pid in range(1, 2001) if keep_closed(pid, 0.25, seed=42)]
    assert 400 < len(picked) < 600
    assert picked != [pid for pid in range(1, 2001) if keep_closed(pid, 0.25, seed=7)]


def structured(script):
    """The script's answers as a server honouring response_format writes them: the filter's category
    inside {"category": ...} (the rewrite is JSON already)."""

    def respond(body):
        reply = script(body)
        fmt = body.get("response_format")
        return {"category": reply} if fmt and fmt["json_schema"]["name"] == "question_filter" else reply

    return respond


def run_steps(tmp_path, name, responder, *flags, response_format="ignore"):
    """Run the filter, rewrite and one difficulty model on two kept items, a filtered and an easy one; return
    the records without their usage (token counts follow the reply's form) and each request's format."""
    data = write(tmp_path / "data.json", [mcq(1), mcq(2, "[simple]"), mcq(3), mcq(4, "[easy]")])
    with StubServer(responder, response_format=response_format) as server:
        run_main("--data_path", data, "--output_dir", tmp_path / name, "--api_url", server.base_url,
                 "--filter_data", "--difficulty_models", f"small-a@{server.base_url}", *flags)  # fmt: skip
        assert server.schema_errors == []
        bodies = server.bodies()
    records, _ = final_records(tmp_path / name)
    for record in records:
        del record["usage"]
    steps = {}
    for body in bodies:
        prompt = body["messages"][-1]["content"]
        step = "difficulty" if body["model"] == "small-a" else "rewrite" if QUESTION in prompt else "filter"
        steps.setdefault(step, []).append(body.get("response_format"))
    return records, steps


def test_filter_and_rewrite_send_their_schemas_and_json_replies_give_the_same_records(tmp_path):
    plain, sent = run_steps(tmp_path, "plain", Script())
    honoured, sent_honoured = run_steps(tmp_path, "json", structured(Script()), response_format="honour")
    assert honoured == plain
    assert [r["status"] for r in plain] == ["kept", "dropped", "kept", "dropped"]
    assert plain[1]["filter_reply"] == "Too Simple" and plain[1]["reason"] == "filter: Too Simple"
    assert sent == sent_honoured
    assert sent["difficulty"] == [None] * 4  # free text: "The answer is X."
    assert len(sent["filter"]) == 3 and len(sent["rewrite"]) == 2
    for step, name, properties in [
        ("filter", "question_filter", ["category"]),
        ("rewrite", "verifiable_problem", [QUESTION, ANSWER]),
    ]:
        for fmt in sent[step]:
            assert fmt["json_schema"]["name"] == name and fmt["json_schema"]["strict"] is True
            assert fmt["json_schema"]["schema"]["required"] == properties
    assert sent["filter"][0]["json_schema"]["schema"]["properties"]["category"]["enum"] == list(
        FILTER_CATEGORIES
    )


def test_no_structured_output_sends_no_schema_and_gives_the_same_records(tmp_path):
    plain, _ = run_steps(tmp_path, "plain", Script())
    off, sent = run_steps(tmp_path, "off", Script(), "--no_structured_output", response_format="refuse")
    assert off == plain
    assert all(fmt is None for formats in sent.values() for fmt in formats)


def test_help_explains_the_structured_output_flag():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, check=True)
    assert "--no_structured_output" in result.stdout and "response_format" in result.stdout


def test_a_server_refusing_response_format_stops_the_run_naming_the_flag(tmp_path):
    data = write(tmp_path / "data.json", [mcq(n) for n in range(1, 41)])
    with StubServer(Script(), response_format="refuse") as server:
        with pytest.raises(SystemExit) as exit_info:
            run_main("--data_path", data, "--output_dir", tmp_path / "out", "--api_url", server.base_url,
                     "--filter_data", "--num_process", 4)  # fmt: skip
        sent = len(server.requests)
    message = str(exit_info.value.code)
    assert "unsupported response_format" in message and "rerun with --no_structured_output" in message
    # At most one request per worker: the run stops instead of giving up 40 items one by one.
    assert 1 <= sent <= 4
    assert list((tmp_path / "out" / "data").iterdir()) == []


@pytest.mark.parametrize(
    "reply, category",
    [
        ('{"category": "Not Reformulatable"}', "Not Reformulatable"),
        ("Pass", "Pass"),
        ("Too Simple: a recall question.", "Too Simple: a recall question."),
        ('{"verdict": "Pass"}', '{"verdict": "Pass"}'),
    ],
)
def test_filter_category_reads_json_and_falls_back_to_the_plain_reply(reply, category):
    assert filter_category(reply) == category


def test_decontamination_matches_64_normalised_characters_only():
    source = (
        "A 45-year-old man presents with crushing chest pain radiating to the left arm and jaw for two hours."
    )
    finder = Decontaminator(["unrelated text about the kidney", source])
    shared = source[10:74]
    assert finder.match("Preamble.  " + shared.upper().replace(" ", "\n  ") + " tail") == 1
    assert finder.match("Preamble. " + source[10:73] + "|tail") is None
    assert finder.match("short") is None


def test_decontamination_agrees_with_brute_force():
    rng = random.Random(0)

    def text(n):
        return "".join(rng.choice("ab ") for _ in range(n))

    evals = [text(rng.randint(50, 300)) for _ in range(20)]
    finder = Decontaminator(evals, n=16)
    normalized = [" ".join(e.split()) for e in evals]
    windows = {e[i : i + 16] for e in normalized for i in range(len(e) - 15)}
    for _ in range(300):
        q = " ".join(text(rng.randint(10, 80)).split())
        brute = any(q[i : i + 16] in windows for i in range(len(q) - 15))
        assert (finder.match(q) is not None) == brute, q


@pytest.mark.parametrize(
    "reply, letter",
    [
        ("Long reasoning. The answer is C.", "C"),
        ("the answer is (b)", "B"),
        ("The answer is: **D**", "D"),
        ("First I thought the answer is A, but the answer is B.", "B"),
        ("E", None),
        ("A.", "A"),
        ("No idea.", None),
    ],
)
def test_chosen_letter(reply, letter):
    assert chosen_letter(reply, {"A", "B", "C", "D"}) == letter
