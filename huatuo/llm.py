"""Async client for OpenAI-compatible servers (OpenAI, vLLM, SGLang, any gateway speaking the protocol).

A thin aiohttp client speaking the chat-completions and completions protocol. It was chosen over the
openai SDK by bench/bench_llm_client.py: at 1024 requests in flight on a 2-core machine the SDK's
per-request overhead, not the server, limited throughput.

    async with LLMClient("http://127.0.0.1:8000/v1", "gpt-4o", concurrency=10) as llm:
        reply = await llm.chat("What causes scurvy?", temperature=0.7)
        print(reply.text, llm.stats)

Retries use exponential backoff with jitter on 408/409/429 (honouring Retry-After), 5xx, timeouts,
dropped connections and unparseable replies; other 4xx fail at once. After the last retry `LLMError`
is raised with a readable reason. The API key is sent only in the Authorization header and never
appears in a repr, exception, log or saved file.

Structured outputs. A call whose answer is JSON passes `response_format=json_schema_format(name,
properties)`, the strict json_schema form that OpenAI, vLLM and SGLang accept; the server then constrains
the reply to that object. `LLMClient(..., structured_output=False)` (the stages' --no_structured_output)
leaves the field out for servers that refuse it. A server that does refuse it raises
StructuredOutputUnsupported, whose message names that flag: every request would fail the same way, so
huatuo.store.run_all stops the run on it instead of giving up each item in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import email.utils
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit, urlunsplit

import aiohttp

DEFAULT_MAX_TOKENS = 8192
RETRYABLE_STATUS = {408, 409, 429}
NO_STRUCTURED_OUTPUT_FLAG = "--no_structured_output"


class LLMError(Exception):
    """A request that failed for good (after its retries, or at once for a client error)."""


class BatchRequestFailed(LLMError):
    """A request of batch mode that failed for good, after being submitted in `calls` batches."""

    def __init__(self, message: str, calls: int):
        super().__init__(message)
        self.calls = calls


class StructuredOutputUnsupported(Exception):
    """The server refused the response_format field. Not an LLMError, which the stages record against
    one item: it concerns every request, so it stops the run."""

    def __init__(self, reason: str):
        super().__init__(
            f"the server refused response_format ({reason}); if it does not support json_schema "
            f"structured outputs, rerun with {NO_STRUCTURED_OUTPUT_FLAG}"
        )


def refuses_structured_output(message: str) -> bool:
    """Whether a client error (4xx) is about response_format: servers that refuse the field, or the
    schema, name it in their message."""
    text = message.lower()
    return "response_format" in text or "json_schema" in text


def json_object_schema(properties: dict) -> dict:
    """A JSON-schema object in the strict form: every property required, no other property allowed."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def json_schema_format(name: str, properties: dict) -> dict:
    """The response_format asking for one JSON object with exactly these properties (JSON-schema
    fragments by key). Strict mode needs every key required, so an optional one is typed with "null"."""
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "strict": True, "schema": json_object_schema(properties)},
    }


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 1
    retries: int = 0
    finish_reason: str | None = None


@dataclass
class Usage:
    """Running totals. `calls` counts HTTP requests sent, retries included; `failures` counts
    requests that were given up."""

    calls: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: Usage) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict:
        return asdict(self)


# The usage of the item being processed: run_all sets a fresh Usage per item task, so every call the
# item makes, however deep in the stage's code, is added to that item's totals as well as the run's.
_item_usage: contextvars.ContextVar[Usage | None] = contextvars.ContextVar("item_usage", default=None)
# The id of that item: batch mode names each request after its item and its place among the item's calls.
_item_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("item_id", default=None)
# Worker lanes of run_all still holding items: batch mode submits once every one of them waits on it.
_busy_lanes = 0


@contextlib.contextmanager
def track_usage(item_id: str | None = None):
    """Collect the usage of every call made inside this block (in this task) into the yielded Usage;
    `item_id` names the item those calls belong to."""
    usage = Usage()
    token = _item_usage.set(usage)
    id_token = _item_id.set(item_id)
    try:
        yield usage
    finally:
        _item_id.reset(id_token)
        _item_usage.reset(token)


def current_item() -> str | None:
    """The id given to the enclosing track_usage block, if any."""
    return _item_id.get()


@contextlib.contextmanager
def worker_lane():
    """Count this task as a worker lane until the block ends (see busy_lanes)."""
    global _busy_lanes
    _busy_lanes += 1
    try:
        yield
    finally:
        _busy_lanes -= 1


def busy_lanes() -> int:
    """Worker lanes that hold an item; 0 outside run_all."""
    return _busy_lanes


def normalize_api_url(url: str) -> str:
    """Base URL (ending in /v1 for the usual servers) from a base or a full endpoint URL."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--api_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {url!r}")
    path = parts.path.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if not path:
        path = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def server_root(base_url: str) -> str:
    """scheme://host:port of a base URL, where SGLang and vLLM serve /health."""
    parts = urlsplit(normalize_api_url(base_url))
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def resolve_api_key(flag_value: str | None, api_url: str | None = None) -> str | None:
    """The --api_key flag, else OPENAI_API_KEY, else None (local servers need no key). Without a key,
    OpenAI's own API is a ValueError, raised before any request rather than a 401 on every item."""
    key = flag_value or os.environ.get("OPENAI_API_KEY") or None
    if key is None and api_url is not None and "api.openai.com" in api_url:
        raise ValueError(f"{api_url} needs a key: set OPENAI_API_KEY or pass --api_key")
    return key


def add_api_args(parser: argparse.ArgumentParser, role: str, num_process: int) -> argparse._ArgumentGroup:
    """Add the flags of an API stage (the original's names and defaults); `role` says what the model does."""
    api = parser.add_argument_group("LLM API (any OpenAI-compatible server)")
    api.add_argument("--model_name", default="gpt-4", help=f"model that {role} (default: gpt-4)")
    api.add_argument(
        "--api_url",
        default="https://api.openai.com/v1/chat/completions",
        help="base URL (http://127.0.0.1:8000/v1) or full chat-completions URL",
    )
    api.add_argument(
        "--api_key", default=None, help="API key; defaults to OPENAI_API_KEY; local servers need none"
    )
    api.add_argument(
        "--num_process",
        type=int,
        default=num_process,
        help=f"items processed at once, as async tasks (default: {num_process})",
    )
    api.add_argument(
        "--max_tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="max_tokens of each request (default: 8192)",
    )
    api.add_argument(
        "--max_retries", type=int, default=5, help="retries of a failed request, with backoff (default: 5)"
    )
    api.add_argument(
        "--timeout", type=float, default=600.0, help="seconds before a request is retried (default: 600)"
    )
    api.add_argument(
        NO_STRUCTURED_OUTPUT_FLAG,
        action="store_true",
        help="do not send response_format (json_schema structured outputs) with the calls whose answer is "
        "JSON, for servers that refuse it; the replies are then parsed from free text",
    )
    return api


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class LLMClient:
    """Bounded-concurrency async client. Use as `async with LLMClient(...) as llm:`.

    `default_sampling` (temperature, top_p, max_tokens, stop, ...) is sent with every request;
    per-call keyword arguments override it. Clients given the same `stats` share one running total.
    With `structured_output=False` the response_format of chat calls is not sent.
    """

    def __init__(
        self,
        api_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 10,
        max_retries: int = 5,
        timeout: float = 600.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        stats: Usage | None = None,
        batch=None,
        structured_output: bool = True,
        **default_sampling,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.base_url = normalize_api_url(api_url)
        self.model = model
        self._api_key = api_key
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.default_sampling = default_sampling
        self.stats = stats if stats is not None else Usage()
        # A huatuo.batch.BatchQueue: chat requests then go through the Batch API instead of one by one.
        self.batch = batch
        self.structured_output = structured_output
        self._semaphore = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"LLMClient(api_url={self.base_url!r}, model={self.model!r}, concurrency={self.concurrency})"

    async def __aenter__(self) -> LLMClient:
        self._ensure_session()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self.batch is not None:
            await self.batch.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"Content-Type": "application/json"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                headers=headers,
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                # API servers set no cookies worth keeping; a dummy jar saves CPU on every reply.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def chat(
        self, messages: str | list[dict], response_format: dict | None = None, **sampling
    ) -> Reply:
        """One chat completion. A string becomes a single user message; `response_format` (see
        json_schema_format) is sent unless the client was made with structured_output=False."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"model": self.model, "messages": messages, "max_tokens": DEFAULT_MAX_TOKENS}
        body.update(self.default_sampling)
        body.update(sampling)
        if response_format is not None and self.structured_output:
            body["response_format"] = response_format
        return await self._request("/chat/completions", body, chat=True)

    async def complete(self, prompt: str, **sampling) -> Reply:
        """One plain completion (the /completions endpoint), for prompts already templated."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": DEFAULT_MAX_TOKENS}
        body.update(self.default_sampling)
        body.update(sampling)
        return await self._request("/completions", body, chat=False)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.backoff_max, self.backoff_base * 2**attempt)
        delay = cap / 2 + random.uniform(0, cap / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def _redact(self, text: str) -> str:
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "***")
        return text

    async def _request(self, path: str, body: dict, chat: bool) -> Reply:
        usage = _item_usage.get()
        if self.batch is not None:
            if not chat:
                raise LLMError("batch mode sends chat completions only; use the chat API")
            return await self._batch_request(body, usage)
        session = self._ensure_session()
        payload = json.dumps(body, ensure_ascii=False).encode()
        attempt = 0
        while True:
            try:
                async with self._semaphore:
                    self.stats.calls += 1
                    if usage is not None:
                        usage.calls += 1
                    reply = await self._send(session, path, payload, chat)
            except _Retryable as err:
                if attempt >= self.max_retries:
                    self._count_failure(usage)
                    raise LLMError(
                        self._redact(f"{path} failed after {attempt + 1} attempts: {err}")
                    ) from None
                await asyncio.sleep(self._backoff(attempt, err.retry_after))
                attempt += 1
                self.stats.retries += 1
                if usage is not None:
                    usage.retries += 1
                continue
            except (LLMError, StructuredOutputUnsupported):
                self._count_failure(usage)
                raise
            reply.calls = attempt + 1
            reply.retries = attempt
            self._count_tokens(reply, usage)
            return reply

    async def _batch_request(self, body: dict, usage: Usage | None) -> Reply:
        # Counted here, in the worker's task, so that the item's own usage is charged too.
        try:
            reply = await self.batch.request(body)
        except BatchRequestFailed as err:
            self._count_calls(err.calls, usage)
            self._count_failure(usage)
            raise
        self._count_calls(reply.calls, usage)
        self._count_tokens(reply, usage)
        return reply

    def _count_calls(self, calls: int, usage: Usage | None) -> None:
        for total in (self.stats, usage):
            if total is not None:
                total.calls += calls
                total.retries += max(calls - 1, 0)

    def _count_tokens(self, reply: Reply, usage: Usage | None) -> None:
        for total in (self.stats, usage):
            if total is not None:
                total.prompt_tokens += reply.prompt_tokens
                total.completion_tokens += reply.completion_tokens

    def _count_failure(self, usage: Usage | None) -> None:
        self.stats.failures += 1
        if usage is not None:
            usage.failures += 1

    async def _send(self, session: aiohttp.ClientSession, path: str, payload: bytes, chat: bool) -> Reply:
        try:
            async with session.post(self.base_url + path, data=payload) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            raise _Retryable(f"no reply within {self.timeout:g} s") from None
        except aiohttp.ClientError as err:
            raise _Retryable(f"connection error ({type(err).__name__}: {err})") from None
        if status != 200:
            text = raw.decode("utf-8", "replace")
            snippet = text[:300].strip()
            reason = f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"
            if status in RETRYABLE_STATUS or status >= 500:
                raise _Retryable(reason, retry_after)
            if refuses_structured_output(text):
                raise StructuredOutputUnsupported(self._redact(f"{path}: {reason}"))
            raise LLMError(self._redact(f"{path} rejected: {reason}"))
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = raw[:200].decode("utf-8", "replace")
            raise _Retryable(f"unparseable reply body: {snippet!r}") from None
        usage = data.get("usage") or {}
        return Reply(
            text=text or "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason"),
        )


async def health(base_url: str, timeout: float = 5.0, api_key: str | None = None) -> bool:
    """True when the server answers <root>/health (SGLang, vLLM) or <base>/models with 200."""
    base = normalize_api_url(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout), headers=headers
    ) as session:
        for url in (server_root(base) + "/health", base + "/models"):
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return True
            except (aiohttp.ClientError, asyncio.TimeoutError):
                continue
    return False


async def wait_for_server(
    base_url: str, timeout: float = 600.0, interval: float = 1.0, api_key: str | None = None
) -> None:
    """Poll health() until the server is up; raise LLMError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if await health(base_url, timeout=min(5.0, max(interval, 0.5)), api_key=api_key):
            return
        if time.monotonic() >= deadline:
            raise LLMError(f"server at {normalize_api_url(base_url)} not ready after {timeout:g} s")
        await asyncio.sleep(interval)
