"""evaluation/eval.py against the scripted OpenAI-compatible server, and prepare_eval_data.py on small
local files in each benchmark's own schema."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evaluation import eval as ev
from evaluation import prepare_eval_data as prep
from tests.stub_server import Fault, StubServer

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "evaluation" / "data" / "eval_sample.json"


def sample_items() -> dict:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


def prompt_of(body: dict) -> str:
    return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


def run_eval(server, tmp_path, *extra) -> dict:
    argv = ["--model_name", "stub-model", "--eval_file", str(SAMPLE), "--base_url", server.base_url]
    argv += ["--api", "chat", "--output_dir", str(tmp_path / "out"), "--concurrency", "8", *extra]
    return ev.main(ev.parse_args(argv))


# One scripted reply per sample question (matched by the question's opening words): the formats a
# scorer meets in practice, each with the letter it should be read as (None: no answer).
SCRIPT = {
    # MedMCQA: 2 of 3 right
    "Drug of choice for typical absence": ("答案是C", "C", "C"),
    "Which nerve is most commonly": ("The nerve at risk is the axillary nerve, so **B**.", "B", "B"),
    "Koplik spots": ("The answer is B.", "B", "B"),
    # MedQA: 2 of 3 right by last match, 1 by first match, one reply without an answer
    "A 24-year-old woman": (
        "At first the answer is A, thyroid peroxidase antibodies. On reflection, the answer is B.",
        "A",
        "B",
    ),
    "A 58-year-old man": ("## Thinking\n\nWernicke.\n\n## Final Response\n\nAnswer: (C)", "C", "C"),
    "A 6-year-old boy": ("I cannot decide without a biopsy.", None, None),
    # PubMedQA: 2 of 3 right
    "Shorter antibiotic courses": ("Yes. The shorter course was non-inferior.", "A", "A"),
    "Vitamin D supplements": ("## Thinking\n\nHR 1.03.\n\n## Final Response\n\nNo.", "B", "B"),
    "Mind-body programs": ("Yes, it works.", "A", "A"),
    # MMLU-Pro: 3 of 3 right
    "In eukaryotic cells": ("C. the inner mitochondrial membrane", "C", "C"),
    "Which of the following is the preferred": ("## Final Response\n\nThe answer is (D).", "D", "D"),
    "Scurvy": ("Scurvy is vitamin C deficiency. The answer is D.", "D", "D"),
    # GPQA: the first question always fails at the server, the others are right
    "A researcher introduces": (None, None, None),
    "Dihybrid": ("Recombinants are 170 of 1000. The answer is **B**", "B", "B"),
    "Cas9 guided": ("\\boxed{D}", "D", "D"),
}
EXPECTED = {  # source: (last-match correct, first-match correct, no answer, failed)
    "MedMCQA_validation": (2, 2, 0, 0),
    "MedQA_USLME_test": (2, 1, 1, 0),
    "PubMedQA_test": (2, 2, 0, 0),
    "MMLU-Pro_Medical_test": (3, 3, 0, 0),
    "GPQA_Medical_test": (2, 2, 0, 1),
}


def scripted(body: dict):
    text = prompt_of(body)
    for opening, (reply, _, _) in SCRIPT.items():
        if opening in text:
            return Fault("status", status=500) if reply is None else reply
    raise AssertionError(f"unscripted prompt: {text[:80]}")


def test_scripted_replies_give_exact_accuracies(tmp_path):
    with StubServer(scripted) as server:
        summary = run_eval(server, tmp_path, "--max_retries", "0", "--seed", "7")
        bodies = server.bodies()
    assert len(bodies) == 15
    assert {b["temperature"] for b in bodies} == {0.5} and {b["top_p"] for b in bodies} == {0.9}
    assert {b["seed"] for b in bodies} == {7} and {b["max_tokens"] for b in bodies} == {2000}

    out = tmp_path / "out"
    result = json.loads((out / "result_stub-modeleval_sample_api.json").read_text())
    outputs = json.loads((out / "stub-modeleval_sample_api.json").read_text())
    for source, (last, first, no_answer, failed) in EXPECTED.items():
        m = summary["sources"][source]
        assert (m["correct"], m["correct_first"], m["failed_items"]) == (last, first, failed), source
        assert m["accuracy"] == pytest.approx(last / 3) and m["accuracy_first"] == pytest.approx(first / 3)
        assert m["accuracy_max_first_last"] == pytest.approx(max(last, first) / 3)
        assert m["no_answer_rate"] == pytest.approx(no_answer / (3 - failed))
        assert result[source] == [pytest.approx(max(last, first) / 3), first, 3, last]
    for record in outputs:
        opening = next(o for o in SCRIPT if o in record["question"])
        assert (record["pred_first"], record["pred"]) == SCRIPT[opening][1:], opening

    settings = summary["settings"]
    assert settings["eval_file_sha256"] == ev.hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    assert settings["served_model"] == "stub" and settings["api"] == "chat"
    assert "| MedQA_USLME_test | 3 | 1 | 66.7 | 33.3 | 66.7 | 33.3% | 0 |" in summary["table"]

    # A rerun asks again only for the failed question; its empty reply stays in the denominator.
    with StubServer(lambda body: "") as server:
        summary = run_eval(server, tmp_path, "--max_retries", "0", "--seed", "7")
        assert len(server.bodies()) == 1
    m = summary["sources"]["GPQA_Medical_test"]
    assert (m["correct"], m["failed_items"], m["empty_replies"]) == (2, 0, 1)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["no_answer_rate"] == pytest.approx(1 / 3)


def test_changed_settings_do_not_reuse_replies(tmp_path):
    with StubServer(lambda body: "The answer is A.") as server:
        run_eval(server, tmp_path, "--limit", "1")
        with pytest.raises(SystemExit, match="temperature: 0.5 then, 0.9 now"):
            run_eval(server, tmp_path, "--limit", "1", "--temperature", "0.9")


def test_majority_vote_and_repeated_runs(tmp_path):
    # Seeds are 100 + run * 3 + sample: run 0 votes A, A, B -> A; run 1 votes B, B, A -> B.
    votes = {100: "A", 101: "A", 102: "B", 103: "B", 104: "B", 105: "A"}

    def by_seed(body):
        return f"The answer is {votes[body['seed']]}."

    with StubServer(by_seed) as server:
        summary = run_eval(
            server,
            tmp_path,
            "--sources",
            "MedMCQA_validation",
            "--n_samples",
            "3",
            "--n_runs",
            "2",
            "--seed",
            "100",
        )
        assert len(server.bodies()) == 3 * 3 * 2
    m = summary["sources"]["MedMCQA_validation"]
    # Golds are C, B, A: run 0 (all A) gets 1 of 3, run 1 (all B) gets 1 of 3.
    assert m["accuracy_per_run"] == [pytest.approx(1 / 3), pytest.approx(1 / 3)]
    assert m["accuracy_std"] == 0.0 and m["runs"] == 2
    assert ev.majority(["B", None, "A", "A", "B"]) == "B"
    assert ev.majority([None, None]) is None


def test_budget_forcing_with_client_side_template(tmp_path, tiny_models):
    def thinker(body):
        prompt = body["prompt"]
        if prompt.endswith("## Final Response\n\n"):
            return "The answer is C."
        if prompt.endswith("Wait"):
            return ", the drug for absence seizures is ethosuximide."
        return "## Thinking\n\nAbsence seizures respond to one drug."

    with StubServer(thinker) as server:
        argv = [
            "--model_name",
            str(tiny_models["policy"]),
            "--eval_file",
            str(SAMPLE),
            "--base_url",
            server.base_url,
        ]
        argv += ["--output_dir", str(tmp_path), "--sources", "MedMCQA_validation", "--limit", "1"]
        summary = ev.main(ev.parse_args(argv + ["--thinking_budget", "50"]))
        bodies = server.bodies("/v1/completions")
    assert summary["settings"]["api"] == "completions"
    assert len(bodies) == 3
    first, wait, answer = bodies
    assert first["prompt"].startswith("<|start_header_id|>user<|end_header_id|>")
    assert first["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert first["stop"] == ["## Final Response"] and first["max_tokens"] == 50
    # The stub counts words as tokens: what the first part spent is taken off the continuation's budget.
    spent = len(thinker(first).split())
    assert wait["max_tokens"] == 50 - spent and wait["prompt"].endswith("one drug.\n\nWait")
    assert answer["prompt"] == wait["prompt"] + thinker(wait) + "\n\n## Final Response\n\n"
    assert answer["max_tokens"] == 2000 and "stop" not in answer
    assert summary["sources"]["MedMCQA_validation"]["correct"] == 1


def test_prompt_truncation_keeps_question_and_options(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    item = sample_items()["PubMedQA_test"][0]
    full = ev.user_message(item, strict=False)
    cut = ev.user_message(item, strict=False, tokenizer=tokenizer, max_tokens=120)
    assert len(tokenizer.encode(cut, add_special_tokens=False)) <= 125 < len(tokenizer.encode(full))
    assert cut.endswith("A. yes\nB. no\nC. maybe") and "pneumonia?" in cut
    assert "Shorter antibiotic courses" not in cut
    strict = ev.user_message(item, strict=True)
    assert "The answer is X." in strict and "The answer is X." not in full


def test_sources_with_non_ascii_names_keep_their_own_replies(tmp_path):
    def item(question, answer_idx):
        return {
            "question": question,
            "options": {"A": "x", "B": "y"},
            "answer_idx": answer_idx,
            "answer": "x",
        }

    path = tmp_path / "zh.json"
    path.write_text(json.dumps({"医学": [item("q1", "A")], "药学": [item("q2", "B")]}, ensure_ascii=False))
    reply = {"q1": "答案是A", "q2": "答案是B"}
    with StubServer(lambda body: reply[prompt_of(body).split("\n\n")[1]]) as server:
        argv = ["--model_name", "m", "--eval_file", str(path), "--base_url", server.base_url, "--api", "chat"]
        summary = ev.main(ev.parse_args([*argv, "--output_dir", str(tmp_path / "out")]))
        assert len(server.bodies()) == 2
    assert [m["correct"] for m in summary["sources"].values()] == [1, 1]


def test_the_key_is_sent_but_written_nowhere(tmp_path):
    key = "sk-eval-5e0b-never-written"

    def reply(body):
        if "Koplik spots" in prompt_of(body):
            return Fault("status", status=400, message=f"bad request for key {key}")
        return "The answer is A."

    with StubServer(reply) as server:
        summary = run_eval(server, tmp_path, "--api_key", key, "--sources", "MedMCQA_validation")
        headers = {
            r["headers"].get("Authorization") for r in server.requests if r["path"].endswith("completions")
        }
    assert headers == {f"Bearer {key}"}
    assert summary["sources"]["MedMCQA_validation"]["failed_items"] == 1
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) > 3 and all(key not in p.read_text(encoding="utf-8") for p in files)


def test_lower_case_option_keys_are_scored():
    item = {
        "question": "q",
        "options": {"a": "aspirin", "b": "heparin"},
        "answer_idx": "b",
        "answer": "heparin",
    }
    replies = [{"id": "x", "output": "The answer is B."}]
    assert ev.score_item(item, replies)["correct"] and ev.score_item(item, replies)["correct_first"]


def test_bad_eval_files_name_the_item(tmp_path):
    good = sample_items()["MedQA_USLME_test"][0]
    cases = {
        "missing options": (
            {"S1": [good, {k: v for k, v in good.items() if k != "options"}]},
            "'S1'.*item 1.*'options'",
        ),
        "answer not an option": (
            {"S2": [good, good, {**good, "answer_idx": "E"}]},
            "'S2'.*item 2.*'answer_idx'.*'E'",
        ),
    }
    for name, (data, pattern) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(data))
        argv = ["--model_name", "m", "--eval_file", str(path), "--api", "chat", "--output_dir", str(tmp_path)]
        with pytest.raises(SystemExit, match=pattern):
            ev.main(ev.parse_args(argv))
    # An empty source would leave its accuracies without a denominator; it is refused before any request.
    path = tmp_path / "empty source.json"
    path.write_text(json.dumps({"S3": [good], "S4": []}))
    argv = ["--model_name", "m", "--eval_file", str(path), "--api", "chat", "--output_dir", str(tmp_path)]
    argv += ["--base_url", "http://127.0.0.1:9/v1", "--wait_timeout", "1"]
    with pytest.raises(SystemExit, match="'S4'.*has no items"):
        ev.main(ev.parse_args(argv))
    path.write_text("{}")
    with pytest.raises(SystemExit, match="holds no sources"):
        ev.main(ev.parse_args(argv))
    with pytest.raises(SystemExit, match="no source"):
        ev.main(
            ev.parse_args(
                ["--model_name", "m", "--eval_file", str(SAMPLE), "--api", "chat", "--sources", "Nope"]
            )
        )


def test_resume_after_kill(tmp_path):
    out = tmp_path / "out"
    replies = out / "stub-modeleval_sample_api_replies"
    with StubServer(lambda body: "The answer is A.", latency=0.3) as server:
        cmd = [sys.executable, str(ROOT / "evaluation" / "eval.py"), "--model_name", "stub-model"]
        cmd += ["--eval_file", str(SAMPLE), "--base_url", server.base_url, "--api", "chat"]
        cmd += ["--output_dir", str(out), "--concurrency", "2"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while len(list(replies.glob("*.r0.s0.json"))) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        saved = len(list(replies.glob("*.r0.s0.json")))
        assert 4 <= saved < 15
        before = len(server.bodies())
        summary = run_eval(server, tmp_path, "--concurrency", "2")
        assert len(server.bodies()) - before == 15 - saved
    assert sum(m["items"] for m in summary["sources"].values()) == 15
    assert summary["sources"]["MedMCQA_validation"]["correct"] == 1
    # Everything saved: scoring again needs no server at all.
    summary = ev.main(
        ev.parse_args(
            [
                "--model_name",
                "stub-model",
                "--eval_file",
                str(SAMPLE),
                "--api",
                "chat",
                "--base_url",
                "http://127.0.0.1:9/v1",
                "--output_dir",
                str(out),
            ]
        )
    )
    assert summary["sources"]["MMLU-Pro_Medical_test"]["items"] == 3


def test_eval_help_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluation" / "eval.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--thinking_budget" in result.stdout and "--n_runs" in result.stdout


# ==================================================================================================
# prepare_eval_data.py
# ==================================================================================================


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prepare_eval_data_from_each_schema(tmp_path, capsys):
    medqa = write_jsonl(
        tmp_path / "phrases_no_exclude_test.jsonl",
        [
            {
                "question": "Q1?",
                "answer": "Beta",
                "options": {"A": "Alpha", "B": "Beta", "C": "Gamma", "D": "Delta"},
                "meta_info": "step1",
                "answer_idx": "B",
                "metamap_phrases": [],
            },
        ],
    )
    # The official MedMCQA dev.json: JSON lines under a .json name, cop counting from 1.
    medmcqa = write_jsonl(
        tmp_path / "dev.json",
        [
            {
                "id": "x1",
                "question": "M1?",
                "opa": "a1",
                "opb": "b1",
                "opc": "c1",
                "opd": "d1",
                "cop": 1,
                "choice_type": "single",
            },
            {
                "id": "x2",
                "question": "M2?",
                "opa": "a2",
                "opb": "b2",
                "opc": "c2",
                "opd": "d2",
                "cop": 4,
                "choice_type": "single",
            },
        ],
    )
    pubmedqa = tmp_path / "ori_pqal.json"
    pubmedqa.write_text(
        json.dumps(
            {
                "111": {
                    "QUESTION": "Does X help?",
                    "CONTEXTS": ["Part one.", "Part two."],
                    "final_decision": "maybe",
                },
                "222": {"QUESTION": "Does Y help?", "CONTEXTS": ["Only part."], "final_decision": "no"},
            }
        )
    )
    test_ids = tmp_path / "test_ground_truth.json"
    test_ids.write_text(json.dumps({"222": "no"}))
    mmlu = write_jsonl(
        tmp_path / "mmlu_pro.jsonl",
        [
            {
                "question_id": 1,
                "question": "H1",
                "options": ["h0", "h1", "h2"],
                "answer": "C",
                "answer_index": 2,
                "category": "health",
            },
            {
                "question_id": 2,
                "question": "L1",
                "options": ["l0", "l1"],
                "answer": "A",
                "answer_index": 0,
                "category": "law",
            },
            {
                "question_id": 3,
                "question": "B1",
                "options": ["b0", "b1", "b2", "b3", "b4"],
                "answer": "E",
                "answer_index": 4,
                "category": "biology",
            },
        ],
    )
    gpqa = write_jsonl(
        tmp_path / "gpqa_main.jsonl",
        [
            {
                "Record ID": f"r{i}",
                "Question": f" G{i}?\n",
                "Correct Answer": f"right{i} ",
                "Incorrect Answer 1": "w1",
                "Incorrect Answer 2": "w2",
                "Incorrect Answer 3": "w3",
                "Subdomain": sub,
            }
            for i, sub in enumerate(
                ["Genetics", "Molecular Biology", "Organic Chemistry", "Molecular Biology"]
            )
        ],
    )
    out = tmp_path / "eval_data.json"
    argv = [
        "--output",
        str(out),
        "--medqa",
        str(medqa),
        "--medmcqa",
        str(medmcqa),
        "--pubmedqa",
        str(pubmedqa),
        "--mmlu_pro",
        str(mmlu),
        "--gpqa",
        str(gpqa),
    ]
    prep.main(prep.parse_args(argv))
    data = json.loads(out.read_text())
    assert list(data) == prep.SOURCES
    assert data["MedQA_USLME_test"] == [
        {
            "question": "Q1?",
            "options": {"A": "Alpha", "B": "Beta", "C": "Gamma", "D": "Delta"},
            "answer_idx": "B",
            "answer": "Beta",
        }
    ]
    assert [(m["answer_idx"], m["answer"]) for m in data["MedMCQA_validation"]] == [("A", "a1"), ("D", "d2")]
    first = data["PubMedQA_test"][0]
    assert first["question"] == "Part one. Part two." + prep.PUBMEDQA_JOIN + "Does X help?"
    assert first["options"] == {"A": "yes", "B": "no", "C": "maybe"} and first["answer_idx"] == "C"
    assert [m["question"] for m in data["MMLU-Pro_Medical_test"]] == ["B1", "H1"]
    assert (
        data["MMLU-Pro_Medical_test"][0]["options"]["E"] == "b4"
        and data["MMLU-Pro_Medical_test"][0]["answer_idx"] == "E"
    )
    gq = data["GPQA_Medical_test"]
    assert [g["question"] for g in gq] == ["G0?", "G1?", "G3?"]
    for g in gq:
        assert g["options"][g["answer_idx"]] == g["answer"] == f"right{g['question'][1]}"
    printed = capsys.readouterr().out
    assert "GPQA_Medical_test: 3 items" in printed and "MedMCQA_validation: 2 items" in printed
    # The same seed gives the same file; the built file is a valid eval file.
    again = tmp_path / "again.json"
    prep.main(prep.parse_args(argv[2:] + ["--output", str(again)]))
    assert again.read_bytes() == out.read_bytes()
    assert ev.load_eval_file(out)

    # The official 500-item test split, chosen by its PMIDs.
    prep.main(
        prep.parse_args(
            [
                "--output",
                str(out),
                "--sources",
                "PubMedQA_test",
                "--pubmedqa",
                str(pubmedqa),
                "--pubmedqa_split",
                "test",
                "--pubmedqa_test_ids",
                str(test_ids),
            ]
        )
    )
    assert [m["answer"] for m in json.loads(out.read_text())["PubMedQA_test"]] == ["no"]
    with pytest.raises(SystemExit, match="pubmedqa_test_ids"):
        prep.main(
            prep.parse_args(
                [
                    "--output",
                    str(out),
                    "--sources",
                    "PubMedQA_test",
                    "--pubmedqa",
                    str(pubmedqa),
                    "--pubmedqa_split",
                    "test",
                ]
            )
        )


def test_prepare_eval_data_explains_gpqa_access(tmp_path, monkeypatch):
    def gated(*args, **kwargs):
        raise ConnectionError("Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub")

    monkeypatch.setattr(prep, "load_records", gated)
    with pytest.raises(SystemExit, match="accept its terms"):
        prep.main(prep.parse_args(["--output", str(tmp_path / "x.json"), "--sources", "GPQA_Medical_test"]))
