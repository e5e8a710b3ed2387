"""The shared LLM client against a real loopback server: protocol, retries, limits, secrets, structured
outputs."""

import asyncio
import json
import socket

import openai
import pytest

from huatuo.llm import (
    LLMClient,
    LLMError,
    StructuredOutputUnsupported,
    health,
    json_object_schema,
    json_schema_format,
    normalize_api_url,
    resolve_api_key,
    track_usage,
    wait_for_server,
)
from huatuo.prompts import PromptError, load_prompt
from huatuo.store import GIVEN_UP, ItemStore, run_all, save_args, write_json_atomic
from tests.stub_server import Fault, StubServer, strict_format_problems

KEY = "sk-test-4f1d2c9e-never-written"
FAST = dict(backoff_base=0.01, backoff_max=0.05)


def run(coro):
    return asyncio.run(coro)


def flaky(fault, failures):
    """A responder that returns `fault` for its first `failures` calls, then echoes the prompt."""
    calls = {"n": 0}

    def respond(body):
        calls["n"] += 1
        if calls["n"] <= failures:
            return fault
        return "answer: " + body["messages"][-1]["content"] if "messages" in body else "done"

    return respond


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
        ("https://api.openai.com/v1/chat/completions", "https://api.openai.com/v1"),
        ("http://host:9/v1/completions", "http://host:9/v1"),
        ("http://host:9", "http://host:9/v1"),
    ],
)
def test_normalize_api_url(url, expected):
    assert normalize_api_url(url) == expected


def test_normalize_api_url_rejects_non_http():
    with pytest.raises(ValueError, match="http"):
        normalize_api_url("127.0.0.1:8000")


def test_resolve_api_key_prefers_flag_then_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert resolve_api_key("from-flag") == "from-flag"
    assert resolve_api_key(None) == "from-env"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert resolve_api_key(None) is None
    assert resolve_api_key(None, "http://127.0.0.1:8000/v1") is None
    with pytest.raises(ValueError, match="needs a key"):
        resolve_api_key(None, "https://api.openai.com/v1")


def test_chat_and_complete_speak_the_protocol():
    with StubServer(flaky(None, 0)) as server:

        async def go():
            async with LLMClient(
                server.base_url + "/chat/completions", "m1", api_key=KEY, temperature=0.3
            ) as llm:
                chat = await llm.chat("why?", top_p=0.9)
                text = await llm.complete("plain prompt", max_tokens=5)
                return chat, text, llm.stats

        chat, text, stats = run(go())
    assert chat.text == "answer: why?"
    assert (chat.prompt_tokens, chat.completion_tokens, chat.calls, chat.retries) == (1, 2, 1, 0)
    assert chat.finish_reason == "stop"
    assert text.text == "done"
    chat_body = server.bodies()[0]
    assert chat_body == {
        "model": "m1",
        "messages": [{"role": "user", "content": "why?"}],
        "max_tokens": 8192,
        "temperature": 0.3,
        "top_p": 0.9,
    }
    completion_body = server.bodies("/v1/completions")[0]
    assert completion_body["prompt"] == "plain prompt" and completion_body["max_tokens"] == 5
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert stats.calls == 2 and stats.prompt_tokens == 3 and stats.retries == 0


def test_stub_server_speaks_the_protocol_of_the_openai_sdk():
    with StubServer(flaky(None, 0)) as server:

        async def go():
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
            async with client:
                chat = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi there"}], max_tokens=4
                )
                text = await client.completions.create(model="m", prompt="p", max_tokens=4)
            return chat, text

        chat, text = run(go())
    assert chat.choices[0].message.content == "answer: hi there"
    assert chat.usage.prompt_tokens == 2 and chat.usage.completion_tokens == 3
    assert text.choices[0].text == "done"


def test_no_authorization_header_without_key():
    with StubServer() as server:

        async def go():
            async with LLMClient(server.base_url, "m") as llm:
                await llm.chat("hi")

        run(go())
    assert "Authorization" not in server.requests[0]["headers"]


@pytest.mark.parametrize(
    "fault",
    [
        Fault("status", status=429, retry_after=0),
        Fault("status", status=500),
        Fault("status", status=503),
        Fault("malformed"),
        Fault("drop"),
        Fault("hang", seconds=30),
    ],
    ids=["429", "500", "503", "malformed-json", "dropped-connection", "timeout"],
)
def test_transient_faults_are_retried(fault):
    with StubServer(flaky(fault, 2)) as server:

        async def go():
            async with LLMClient(server.base_url, "m", timeout=0.5, **FAST) as llm:
                reply = await llm.chat("q")
                return reply, llm.stats

        reply, stats = run(go())
    assert reply.text == "answer: q"
    assert (reply.calls, reply.retries) == (3, 2)
    assert (stats.calls, stats.retries, stats.failures) == (3, 2, 0)
    assert len(server.requests) == 3


def test_retry_after_sets_the_minimum_wait():
    llm = LLMClient("http://127.0.0.1:1/v1", "m", backoff_base=0.01, backoff_max=0.02)
    assert llm._backoff(0, retry_after=7.0) >= 7.0
    assert llm._backoff(10, retry_after=None) <= 0.02


def test_gives_up_with_reason_after_max_retries():
    with StubServer(flaky(Fault("status", status=502), 100)) as server:

        async def go():
            async with LLMClient(server.base_url, "m", max_retries=3, **FAST) as llm:
                with pytest.raises(LLMError, match=r"after 4 attempts: HTTP 502"):
                    await llm.chat("q")
                return llm.stats

        stats = run(go())
    assert len(server.requests) == 4
    assert (stats.calls, stats.retries, stats.failures) == (4, 3, 1)


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_fail_fast_and_hide_the_key(status):
    echo = Fault("status", status=status, message=f"invalid key {KEY}")
    with StubServer(flaky(echo, 100)) as server:

        async def go():
            async with LLMClient(server.base_url, "m", api_key=KEY, **FAST) as llm:
                with pytest.raises(LLMError) as err:
                    await llm.chat("q")
                return err.value, llm

        err, llm = run(go())
    assert len(server.requests) == 1
    assert f"HTTP {status}" in str(err) and KEY not in str(err)
    assert KEY not in repr(llm)


ANSWER_FORMAT = json_schema_format(
    "answer",
    {
        "answer": {"type": "string"},
        "steps": {"type": "array", "items": json_object_schema({"n": {"type": "integer"}})},
    },
)


def test_json_schema_format_is_the_strict_form():
    assert ANSWER_FORMAT == {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": ANSWER_FORMAT["json_schema"]["schema"]["properties"],
                "required": ["answer", "steps"],
                "additionalProperties": False,
            },
        },
    }
    assert strict_format_problems(ANSWER_FORMAT) == []
    loose = json.loads(json.dumps(ANSWER_FORMAT))
    del loose["json_schema"]["schema"]["properties"]["steps"]["items"]["additionalProperties"]
    loose["json_schema"]["strict"] = False
    assert strict_format_problems(loose) == [
        "json_schema.strict must be true",
        "schema.steps[]: additionalProperties must be false",
    ]


def test_response_format_is_sent_unless_turned_off():
    with StubServer(lambda body: {"answer": "scurvy", "steps": []}, response_format="honour") as server:

        async def go():
            async with (
                LLMClient(server.base_url, "m") as on,
                LLMClient(server.base_url, "m", structured_output=False) as off,
            ):
                await on.chat("with", response_format=ANSWER_FORMAT)
                await on.chat("without")
                await off.chat("turned off", response_format=ANSWER_FORMAT)

        run(go())
        assert server.response_formats() == [ANSWER_FORMAT, None, None]
        assert server.schema_errors == []


def test_a_refused_response_format_fails_at_once_naming_the_flag():
    with StubServer(response_format="refuse") as server:

        async def go():
            async with LLMClient(server.base_url, "m", api_key=KEY, max_retries=3, **FAST) as llm:
                plain = await llm.chat("no schema")
                with pytest.raises(StructuredOutputUnsupported) as err:
                    await llm.chat("schema", response_format=ANSWER_FORMAT)
                return plain, err.value, llm.stats

        plain, err, stats = run(go())
    assert plain.text == "ok"
    assert "unsupported response_format" in str(err) and "--no_structured_output" in str(err)
    assert KEY not in str(err)
    assert len(server.requests) == 2 and (stats.retries, stats.failures) == (0, 1)


def test_run_all_stops_on_a_refused_response_format_and_gives_up_nothing(tmp_path):
    store = ItemStore(tmp_path / "items")
    with StubServer(response_format="refuse", latency=0.01) as server:

        async def go():
            async with LLMClient(server.base_url, "m") as llm:

                async def worker(item):
                    await llm.chat(item["q"], response_format=ANSWER_FORMAT)
                    return item

                items = [{"id": i, "q": f"q{i}"} for i in range(20)]
                await run_all(items, worker, store, key=lambda it: it["id"], concurrency=4)

        with pytest.raises(StructuredOutputUnsupported, match="--no_structured_output"):
            run(go())
    # Each of the 4 lanes stops at its first refusal; no item is recorded, all are left for the rerun.
    assert 1 <= len(server.requests) <= 4
    assert store.done_ids() == set()


def test_concurrency_is_bounded_by_the_client():
    with StubServer(latency=0.1) as server:

        async def go():
            async with LLMClient(server.base_url, "m", concurrency=3) as llm:
                await asyncio.gather(*(llm.chat(str(i)) for i in range(12)))

        run(go())
    assert server.max_in_flight == 3
    assert len(server.requests) == 12


def test_usage_is_tracked_per_task():
    with StubServer(flaky(Fault("status", status=500), 1)) as server:

        async def item(llm, n):
            with track_usage() as usage:
                for _ in range(n):
                    await llm.chat("one two three")
            return usage

        async def go():
            async with LLMClient(server.base_url, "m", **FAST) as llm:
                return await asyncio.gather(item(llm, 1), item(llm, 2)), llm.stats

        (first, second), stats = run(go())
    assert first.calls + second.calls == stats.calls == 4
    assert first.retries + second.retries == 1
    assert first.prompt_tokens + second.prompt_tokens == stats.prompt_tokens == 9


def test_health_and_wait_for_server():
    with StubServer() as server:
        assert run(health(server.base_url))
        run(wait_for_server(server.base_url, timeout=5))
    closed = f"http://127.0.0.1:{free_port()}/v1"
    assert not run(health(closed, timeout=1))
    with pytest.raises(LLMError, match="not ready"):
        run(wait_for_server(closed, timeout=0.3, interval=0.1))


def test_store_is_atomic_and_resumable(tmp_path):
    store = ItemStore(tmp_path / "items")
    (tmp_path / "items" / ".3.json.abc.tmp").write_text('{"trunc')
    store = ItemStore(tmp_path / "items")
    assert not list((tmp_path / "items").glob("*.tmp"))
    items = [{"id": i} for i in range(1, 6)]
    seen = []

    async def worker(item):
        seen.append(item["id"])
        if item["id"] == 4:
            raise RuntimeError("scripted failure")
        return {**item, "status": "dropped" if item["id"] == 2 else "kept"}

    counts = run(run_all(items, worker, store, key=lambda it: it["id"], concurrency=2))
    assert counts == {"kept": 3, "dropped": 1, "given_up": 1}
    assert store.load(4)["status"] == GIVEN_UP and "scripted failure" in store.load(4)["reason"]
    assert [r["id"] for r in store.all()] == [1, 2, 3, 4, 5]
    assert all("usage" in r for r in store.all())
    seen.clear()
    assert run(run_all(items, worker, store, key=lambda it: it["id"])) == {}
    assert seen == []
    run(run_all(items, worker, store, key=lambda it: it["id"], retry_given_up=True))
    assert seen == [4]
    with pytest.raises(ValueError, match="file name"):
        store.path("../escape")


def test_save_args_drops_secrets(tmp_path):
    path = tmp_path / "args.json"
    save_args(path, {"api_key": KEY, "model_name": "m", "out": tmp_path}, secret_keys=("api_key",))
    saved = json.loads(path.read_text())
    assert saved == {"model_name": "m", "out": str(tmp_path)}
    write_json_atomic(path, [1, 2])
    assert json.loads(path.read_text()) == [1, 2]


def test_prompt_contract_is_checked(tmp_path):
    assert "{question}" in load_prompt("construct_filter")
    (tmp_path / "construct_filter.txt").write_text("Judge {question} {options} {colour}")
    with pytest.raises(PromptError, match=r"construct_filter.txt: unknown field \{colour\}"):
        load_prompt("construct_filter", prompt_dir=tmp_path)
    (tmp_path / "construct_filter.txt").write_text("Judge {question} only")
    with pytest.raises(PromptError, match=r"missing field \{options\}"):
        load_prompt("construct_filter", prompt_dir=tmp_path)
    (tmp_path / "construct_filter.txt").write_text('Judge {question} {options} as {"verdict": 1}')
    with pytest.raises(PromptError, match="double literal braces"):
        load_prompt("construct_filter", prompt_dir=tmp_path)
    with pytest.raises(PromptError, match="unknown prompt"):
        load_prompt("no_such_prompt")


def test_missing_chinese_prompt_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    (tmp_path / "verify.txt").write_text("{response} {reference}")
    monkeypatch.setattr("huatuo.prompts.PROMPT_ROOT", tmp_path)
    assert load_prompt("verify") == "{response} {reference}"
    with pytest.raises(PromptError, match=r"zh/verify.txt not found"):
        load_prompt("verify", language="zh")
