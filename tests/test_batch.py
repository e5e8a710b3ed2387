"""Batch mode (--batch_api) against the scripted Files and Batches endpoints on loopback: the protocol,
limits and failures of huatuo.batch, the stages giving the same outputs as in synchronous mode, and a
kill -9 mid-batch that pays for nothing twice."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import construct_verifiable_medical_problems as construct
import search_for_complex_reasoning_path as search
from evaluation import eval as ev
from huatuo.batch import BatchQueue
from huatuo.llm import LLMClient, LLMError
from huatuo.store import GIVEN_UP, KEPT, ItemStore, run_all
from tests.batch_stub_server import BatchStubServer
from tests.stub_server import Fault, StubServer
from tests.test_construct import Script as ConstructScript
from tests.test_construct import mcq
from tests.test_eval import SAMPLE, scripted
from tests.test_search import NAME, Script, write_problems

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-batch-5e0a-never-written"
# Batches end after a few status checks; a wide window means a batch is sent once every worker waits.
FAST = ["--batch_window", "300", "--poll_interval", "0.01"]


def ask_each(server, folder, prompts, key=None, **queue_options):
    """One chat call per prompt, each prompt an item of run_all with its own worker lane."""
    options = dict(poll_interval=0.01, window=300, backoff_base=0.01, max_retries=2) | queue_options
    store = ItemStore(folder / "items")

    async def go():
        queue = BatchQueue(server.base_url, key, folder / "batches", **options)
        async with LLMClient(server.base_url, "gpt-test", key, batch=queue, temperature=0.3) as llm:

            async def worker(item):
                reply = await llm.chat(item["prompt"])
                return {**item, "text": reply.text}

            items = [{"id": i, "prompt": p} for i, p in enumerate(prompts)]
            await run_all(items, worker, store, key=lambda it: it["id"], concurrency=len(items))
            return queue.submitted, llm.stats

    submitted, stats = asyncio.run(go())
    return {int(r["id"]): r for r in store.all()}, submitted, stats


def uploaded_lines(server):
    inputs = {b["info"]["input_file_id"] for b in server.batches.values()}
    return [json.loads(line) for f in sorted(inputs) for line in server.files[f].splitlines()]


# ---------------------------------------------------------------- the client's batch mode


def test_a_round_is_one_batch_of_well_formed_lines_and_each_call_gets_its_reply(tmp_path):
    with BatchStubServer(lambda body: "re: " + body["messages"][-1]["content"]) as server:
        records, submitted, stats = ask_each(server, tmp_path, ["alpha", "beta", "gamma"], key=KEY)
        lines = uploaded_lines(server)
        creates = [r["body"] for r in server.requests if r["path"] == "/v1/batches" and r["body"]]
        purposes = [r["body"]["purpose"] for r in server.requests if r["path"] == "/v1/files"]
        auth = {r["headers"].get("Authorization") for r in server.requests}
    assert submitted == [3] and len(server.batches) == 1
    assert {r["text"] for r in records.values()} == {"re: alpha", "re: beta", "re: gamma"}
    assert all(r["text"] == "re: " + r["prompt"] for r in records.values())
    assert purposes == ["batch"]
    assert creates == [
        {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    ]
    for line in lines:
        assert set(line) == {"custom_id", "method", "url", "body"}
        assert (line["method"], line["url"], line["body"]["model"]) == (
            "POST",
            "/v1/chat/completions",
            "gpt-test",
        )
        assert line["body"]["temperature"] == 0.3 and line["body"]["max_tokens"] == 8192
    assert len({line["custom_id"] for line in lines}) == 3
    # Usage is summed from the batch output: per item and for the run.
    assert stats.calls == 3 and stats.completion_tokens == 6 and stats.prompt_tokens == 3
    assert all(r["usage"]["completion_tokens"] == 2 for r in records.values())
    assert auth == {f"Bearer {KEY}"}
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(encoding="utf-8"), path
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "batches").glob("batch_*[0-9].json")]
    assert (
        record["file_id"] == "file-1" and record["batch_id"] == "batch-1" and record["status"] == "completed"
    )
    assert {v["item"] for v in record["requests"].values()} == {"0", "1", "2"}


def test_rounds_over_the_service_limits_are_split(tmp_path):
    with BatchStubServer() as server:
        records, submitted, _ = ask_each(server, tmp_path / "n", [f"p{i}" for i in range(5)], max_requests=2)
    assert submitted == [2, 2, 1] and len(server.batches) == 3
    assert len(server.answered) == len(set(server.answered)) == 5
    assert all(r["text"] == "ok" for r in records.values())
    with BatchStubServer() as server:
        ask_each(server, tmp_path / "probe", ["a", "b", "c"])
        longest = max(len(line) + 1 for line in server.files["file-1"].splitlines())
        _, submitted, _ = ask_each(server, tmp_path / "bytes", ["a", "b", "c"], max_bytes=2 * longest)
    assert submitted == [2, 1]


def test_a_request_over_the_file_limit_fails_before_any_upload(tmp_path):
    with BatchStubServer() as server:
        records, submitted, _ = ask_each(server, tmp_path, ["y" * 500], max_bytes=200)
        assert server.requests == []
    (record,) = records.values()
    assert record["status"] == GIVEN_UP and "request 0.0." in record["reason"]
    assert "over the 200-byte limit" in record["reason"]
    assert (record["usage"]["calls"], record["usage"]["retries"], record["usage"]["failures"]) == (0, 0, 1)


def test_line_errors_go_into_the_next_batch_a_bounded_number_of_times(tmp_path):
    seen = Counter()

    def responder(body):
        prompt = body["messages"][-1]["content"]
        seen[prompt] += 1
        if prompt == "flaky" and seen[prompt] == 1:
            return Fault("status", status=500)
        if prompt == "broken":
            return Fault("status", status=503, message="overloaded")
        if prompt == "invalid":
            return Fault("status", status=400, message="bad model")
        return "fine"

    with BatchStubServer(responder) as server:
        records, submitted, stats = ask_each(
            server, tmp_path, ["flaky", "broken", "invalid", "ok"], max_retries=2
        )
        sent = Counter(server.submitted)
    by_prompt = {r["prompt"]: r for r in records.values()}
    assert by_prompt["flaky"]["status"] == KEPT and by_prompt["flaky"]["text"] == "fine"
    assert by_prompt["flaky"]["usage"]["calls"] == 2 and by_prompt["flaky"]["usage"]["retries"] == 1
    broken = by_prompt["broken"]
    assert broken["status"] == GIVEN_UP and "HTTP 503: overloaded" in broken["reason"]
    assert "submitted in 3 batch(es)" in broken["reason"] and broken["reason"].startswith(
        "BatchRequestFailed"
    )
    # A client error is not retried, as in synchronous mode.
    assert (
        by_prompt["invalid"]["status"] == GIVEN_UP
        and "submitted in 1 batch(es)" in by_prompt["invalid"]["reason"]
    )
    assert sorted(sent.values()) == [1, 1, 2, 3] and submitted == [4, 2, 1]
    assert stats.failures == 2 and stats.calls == 7


def test_expired_batch_resubmits_only_what_it_left_undone(tmp_path):
    with BatchStubServer(expire={0}) as server:
        records, submitted, _ = ask_each(server, tmp_path, [f"p{i}" for i in range(4)])
    assert submitted == [4, 2]
    assert all(r["status"] == KEPT for r in records.values())
    assert len(server.answered) == len(set(server.answered)) == 4


def test_failed_upload_and_lost_create_reply_still_make_one_batch(tmp_path):
    with BatchStubServer(fail_uploads=1, lose_create_reply=True) as server:
        records, submitted, _ = ask_each(server, tmp_path, ["a", "b"])
        uploads = sum(r["path"] == "/v1/files" for r in server.requests)
    assert uploads == 2 and len(server.batches) == 1 and submitted == [2]
    assert all(r["status"] == KEPT for r in records.values())


def test_a_failed_upload_after_its_retries_gives_the_items_up_with_the_reason(tmp_path):
    with BatchStubServer(fail_uploads=10) as server:
        records, _, _ = ask_each(server, tmp_path, ["a"], max_retries=1)
        assert server.batches == {}
    (record,) = records.values()
    assert record["status"] == GIVEN_UP and "POST /files: HTTP 500" in record["reason"]


def test_outside_run_all_the_window_sends_the_batch(tmp_path):
    async def go(server):
        queue = BatchQueue(server.base_url, None, tmp_path, window=0.05, poll_interval=0.01)
        async with LLMClient(server.base_url, "m", batch=queue) as llm:
            replies = await asyncio.gather(llm.chat("one"), llm.chat("two"))
            return [r.text for r in replies], queue.submitted

    with BatchStubServer(lambda body: body["messages"][0]["content"].upper()) as server:
        texts, submitted = asyncio.run(go(server))
    assert texts == ["ONE", "TWO"] and submitted == [2]


def test_completions_are_refused_in_batch_mode(tmp_path):
    async def go():
        queue = BatchQueue("http://127.0.0.1:9/v1", None, tmp_path)
        async with LLMClient("http://127.0.0.1:9/v1", "m", batch=queue) as llm:
            await llm.complete("raw prompt")

    with pytest.raises(LLMError, match="chat completions only"):
        asyncio.run(go())


# ---------------------------------------------------------------- the stages, batch against synchronous


def search_run(server, out, data, *flags):
    argv = ["--data_path", str(data), "--output_dir", str(out), "--api_url", server.base_url]
    search.main(search.parse_args([*argv, "--model_name", "stub", "--num_process", "16", *flags]))
    (path,) = out.glob(f"{NAME}_[0-9]*.json")
    return json.loads(path.read_text(encoding="utf-8"))


OUTCOMES = {1: [False, False, True], 2: [True], 3: [False, True], 4: [False, False, False]}


def test_search_in_batch_mode_matches_synchronous_mode_one_batch_per_round(tmp_path):
    data = write_problems(tmp_path / "problems.json", 5)
    flags = ["--max_search_depth", "2", "--max_search_attempts", "1"]
    with StubServer(Script(outcomes=OUTCOMES)) as server:
        sync = search_run(server, tmp_path / "sync", data, *flags)
        sync_calls = len(server.requests)
    with BatchStubServer(Script(outcomes=OUTCOMES)) as server:
        batched = search_run(server, tmp_path / "batch", data, *flags, "--batch_api", *FAST)
        sizes = [b["info"]["request_counts"]["total"] for b in server.batches.values()]
    assert batched == sync
    assert [len(r["llm_log"]) for r in sync] == [8, 4, 6, 9, 4] and sum(sizes) == sync_calls == 31
    # Every round of the search is one batch: as many batches as calls of the longest item.
    assert sizes == [5, 5, 5, 5, 3, 3, 2, 2, 1]
    summary = json.loads((tmp_path / "batch" / f"{NAME}_summary.json").read_text())
    assert summary["usage_this_run"]["calls"] == 31 and summary["usage_this_run"]["completion_tokens"] > 0


def test_construct_in_batch_mode_matches_synchronous_mode(tmp_path):
    items = [mcq(1), mcq(2, "[simple]"), mcq(3, "[flaky]"), mcq(4, "[badjson]"), mcq(5)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(items))

    def run(server, out, *flags):
        argv = ["--data_path", data, "--output_dir", out, "--filter_data", "--api_url", server.base_url]
        construct.main(construct.parse_args([str(a) for a in [*argv, "--model_name", "big", *flags]]))
        (path,) = out.glob("data_final_*.json")
        return json.loads(path.read_text())

    with StubServer(ConstructScript()) as server:
        sync = run(server, tmp_path / "sync")
        sync_calls = len(server.requests)
    with BatchStubServer(ConstructScript()) as server:
        batched = run(server, tmp_path / "batch", "--batch_api", *FAST)
        sizes = [b["info"]["request_counts"]["total"] for b in server.batches.values()]
    assert batched == sync
    assert [r["status"] for r in sync] == [KEPT, "dropped", KEPT, GIVEN_UP, KEPT]
    # Filter round, rewrite round, then the two asked again after unparseable JSON.
    assert sum(sizes) == sync_calls == 11 and sizes == [5, 4, 2]


def test_batch_lines_carry_the_response_format_and_a_refusal_stops_the_run(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([mcq(1), mcq(2), mcq(3)]))

    def run(server, out):
        argv = ["--data_path", data, "--output_dir", out, "--filter_data", "--api_url", server.base_url]
        construct.main(construct.parse_args([str(a) for a in [*argv, "--batch_api", *FAST]]))

    with BatchStubServer(ConstructScript()) as server:
        run(server, tmp_path / "ok")
        names = [line["body"]["response_format"]["json_schema"]["name"] for line in uploaded_lines(server)]
        assert server.schema_errors == []
    assert names == ["question_filter"] * 3 + ["verifiable_problem"] * 3
    with BatchStubServer(ConstructScript(), response_format="refuse") as server:
        with pytest.raises(SystemExit) as exit_info:
            run(server, tmp_path / "refused")
        batches = len(server.batches)
    assert "rerun with --no_structured_output" in str(exit_info.value.code)
    # The first round's refusals stop the run: no second batch, and no item given up.
    assert batches == 1
    assert list((tmp_path / "refused" / "data").iterdir()) == []


def test_eval_in_batch_mode_gives_the_same_result_file(tmp_path):
    def run(server, out, *flags):
        argv = ["--model_name", "stub-model", "--eval_file", str(SAMPLE), "--base_url", server.base_url]
        ev.main(ev.parse_args([*argv, "--output_dir", str(out), "--max_retries", "0", "--seed", "7", *flags]))
        name = "stub-modeleval_sample_api"
        return [json.loads((out / f).read_text()) for f in (f"result_{name}.json", f"{name}.json")]

    with StubServer(scripted) as server:
        sync = run(server, tmp_path / "sync", "--api", "chat")
    with BatchStubServer(scripted) as server:
        batched = run(server, tmp_path / "batch", "--batch_api", *FAST)
        assert len(server.batches) == 1 and server.bodies() == []
    assert batched == sync
    assert sync[0]["GPQA_Medical_test"][1:] == [2, 3, 2]


# ---------------------------------------------------------------- kill -9 mid-batch, then the same command


def test_kill_9_mid_batch_then_rerun_pays_for_nothing_twice(tmp_path):
    n = 6
    data = write_problems(tmp_path / "problems.json", n)
    out = tmp_path / "out"
    batches = out / f"{NAME}_batches"
    argv = [
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--num_process",
        str(n),
        "--model_name",
        "stub",
    ]
    argv += ["--batch_api", *FAST]
    script = Script(outcomes={1: [False, True], 4: [False, True]})
    with BatchStubServer(script) as server:
        server.hold_from = 1  # the second batch stays in progress until the rerun
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "search_for_complex_reasoning_path.py"),
                *argv,
                "--api_url",
                server.base_url,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                second = batches / "batch_00002.json"
                if second.exists() and json.loads(second.read_text())["status"] == "in_progress":
                    break
                time.sleep(0.05)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert json.loads((batches / "batch_00001.json").read_text())["status"] == "completed"
        assert len(server.batches) == 2 and list((out / NAME).glob("*.json")) == []
        server.hold_from = None
        search.main(search.parse_args([*argv, "--api_url", server.base_url]))
        submitted, answered = Counter(server.submitted), Counter(server.answered)
    (path,) = out.glob(f"{NAME}_[0-9]*.json")
    records = json.loads(path.read_text())
    assert sorted(r["process_id"] for r in records) == list(range(1, n + 1))
    assert all(r["status"] == KEPT for r in records)
    # No request was submitted twice: the rerun took round 1 from disk and followed batch 2 to its end.
    assert max(submitted.values()) == 1 and max(answered.values()) == 1
    assert sum(submitted.values()) == sum(len(r["llm_log"]) for r in records) == 4 * n + 2 * 2
    assert len(server.batches) == 6


# ---------------------------------------------------------------- flags and bad input


@pytest.mark.parametrize(
    "script",
    [
        "construct_verifiable_medical_problems.py",
        "search_for_complex_reasoning_path.py",
        "evaluation/eval.py",
    ],
)
def test_help_explains_the_batch_flags(script):
    result = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for flag in ("--batch_api", "--batch_window", "--poll_interval"):
        assert flag in result.stdout


def test_bad_input_is_refused_before_any_upload(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"Open-ended Verifiable Question": "Why?"}]))
    good = write_problems(tmp_path / "good.json", 2)
    with BatchStubServer() as server:
        base = ["--output_dir", str(tmp_path / "out"), "--api_url", server.base_url, "--batch_api"]
        with pytest.raises(SystemExit, match="item 0, key 'Ground-True Answer' is missing"):
            search.main(search.parse_args(["--data_path", str(bad), *base]))
        with pytest.raises(SystemExit, match="--poll_interval must be positive"):
            search.main(search.parse_args(["--data_path", str(good), *base, "--poll_interval", "0"]))
        with pytest.raises(SystemExit, match="item 0 is missing key .question."):
            construct.main(construct.parse_args(["--data_path", str(bad), *base]))
        with pytest.raises(SystemExit):
            ev.parse_args(
                ["--model_name", "m", "--eval_file", str(SAMPLE), "--batch_api", "--api", "completions"]
            )
        assert server.requests == []
    assert not (tmp_path / "out").exists()
