"""A real OpenAI-compatible HTTP server on 127.0.0.1 with scripted replies, for tests and benchmarks.

    def responder(body):                      # the request's JSON body
        if "Pass" in body["messages"][0]["content"]:
            return "Pass"
        return Fault("status", status=429, retry_after=0)

    with StubServer(responder, latency=0.05) as server:
        client = LLMClient(server.base_url, "stub")
        ...
        server.requests                       # every request: path, body, headers

A responder returns the reply text (a dict or list is sent as its JSON), or a Fault: an HTTP error
status (with Retry-After), a hang (the client times out), a malformed JSON body, or a connection
dropped before any reply. Serves /v1/chat/completions, /v1/completions, /v1/models and /health.

Structured outputs: a request's response_format is checked to be the strict json_schema form
(`strict_format_problems`); a malformed one gets HTTP 400, as from a real server, and its problems go
to `server.schema_errors`. `response_format=` says what the server then does with a well-formed one:
"ignore" it (the responder's reply goes back as it is), "refuse" it (HTTP 400 "unsupported
response_format", as from a server without structured outputs) or "honour" it (the reply must be JSON
matching the schema; each mismatch goes to `server.schema_errors`). `server.response_formats()` lists
what each chat request carried (None for none).

Run on its own (for the benchmark, so the client's CPU is measured alone):
    python -m tests.stub_server --latency 1.0 --port 0     # prints the base URL on its first line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Fault:
    """kind: "status" (HTTP `status`, optional Retry-After), "hang" (no reply for `seconds`),
    "malformed" (200 with a body that is not JSON), "drop" (connection closed without a reply)."""

    kind: str
    status: int = 500
    retry_after: float | None = None
    seconds: float = 3600.0
    message: str = "scripted fault"


Responder = Callable[[dict], "str | dict | list | Fault"]
REFUSAL = "unsupported response_format type 'json_schema': this server has no structured outputs"
JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def echo_responder(body: dict) -> str:
    """Default responder: "ok"."""
    return "ok"


def _count_tokens(text: str) -> int:
    return len(text.split())


def _types(schema: dict) -> list:
    kind = schema.get("type")
    return kind if isinstance(kind, list) else [kind]


def strict_format_problems(response_format) -> list[str]:
    """What keeps `response_format` from being the strict json_schema form that OpenAI, vLLM and SGLang
    all accept: a named, strict schema whose objects require every property and allow no other."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return ['response_format: type must be "json_schema"']
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        return ["response_format: json_schema must be an object"]
    problems = []
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(spec.get("name", ""))):
        problems.append("json_schema.name must be 1 to 64 letters, digits, _ or -")
    if spec.get("strict") is not True:
        problems.append("json_schema.strict must be true")
    schema = spec.get("schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return [*problems, "json_schema.schema must be an object schema"]
    return problems + _schema_problems(schema, "schema")


def _schema_problems(schema, where: str) -> list[str]:
    if not isinstance(schema, dict) or not _types(schema) or not set(_types(schema)) <= JSON_TYPES:
        return [f"{where}: no valid type"]
    problems = []
    if "object" in _types(schema):
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            return [f"{where}: an object needs properties"]
        if sorted(schema.get("required") or []) != sorted(properties):
            problems.append(f"{where}: required must list every property")
        if schema.get("additionalProperties") is not False:
            problems.append(f"{where}: additionalProperties must be false")
        for key, sub in properties.items():
            problems += _schema_problems(sub, f"{where}.{key}")
    if "array" in _types(schema):
        problems += _schema_problems(schema.get("items"), f"{where}[]")
    if "enum" in schema and not (isinstance(schema["enum"], list) and schema["enum"]):
        problems.append(f"{where}: enum must be a non-empty list")
    return problems


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    for kind, python in (("null", type(None)), ("integer", int), ("number", float), ("string", str)):
        if isinstance(value, python):
            return kind
    return "array" if isinstance(value, list) else "object"


def schema_mismatches(schema: dict, value, where: str = "$") -> list[str]:
    """Where `value` breaks `schema` (types, enums, required and extra keys, items), as a server that
    honours the schema never would."""
    kind = _json_type(value)
    if kind not in _types(schema) and not (kind == "integer" and "number" in _types(schema)):
        return [f"{where}: {kind} where {schema.get('type')} is due"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    problems = []
    if kind == "object":
        properties = schema.get("properties", {})
        problems += [f"{where}: no {key!r}" for key in schema.get("required", []) if key not in value]
        if schema.get("additionalProperties") is False:
            problems += [f"{where}: unexpected {key!r}" for key in value if key not in properties]
        for key, sub in properties.items():
            if key in value:
                problems += schema_mismatches(sub, value[key], f"{where}.{key}")
    if kind == "array":
        for i, element in enumerate(value):
            problems += schema_mismatches(schema["items"], element, f"{where}[{i}]")
    return problems


class StubServer:
    """Context manager running the server on a background thread; `base_url` ends in /v1."""

    def __init__(
        self,
        responder: Responder = echo_responder,
        latency: float | Callable[[dict], float] = 0.0,
        port: int = 0,
        record: bool = True,
        response_format: str = "ignore",
    ):
        if response_format not in ("ignore", "refuse", "honour"):
            raise ValueError(f"response_format must be ignore, refuse or honour, got {response_format!r}")
        self.responder = responder
        self.response_format = response_format
        self.schema_errors: list[str] = []
        self.latency = latency
        self.port = port
        self.record = record
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        return app

    async def start(self) -> None:
        """Start on the running loop (used directly by the standalone process)."""
        self._closing = asyncio.Event()
        # A client that gives up on a scripted hang ends its handler too, and a short shutdown keeps
        # hangs from holding up the end of a test.
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=4096)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def __enter__(self) -> StubServer:
        started = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self.start())
            except BaseException as err:  # reported to the caller of __enter__
                errors.append(err)
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self.stop())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="stub-openai-server", daemon=True)
        self._thread.start()
        started.wait()
        if errors:
            raise errors[0]
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def bodies(self, path: str = "/v1/chat/completions") -> list[dict]:
        with self._lock:
            return [r["body"] for r in self.requests if r["path"] == path]

    def response_formats(self) -> list[dict | None]:
        return [body.get("response_format") for body in self.bodies()]

    def reply_to(self, body: dict) -> str | Fault:
        """The reply text (or Fault) for a request body: the responder's, after the response_format checks."""
        response_format = body.get("response_format")
        if response_format is not None:
            problems = strict_format_problems(response_format)
            if problems:
                self.schema_errors += problems
                return Fault("status", status=400, message="invalid response_format: " + "; ".join(problems))
            if self.response_format == "refuse":
                return Fault("status", status=400, message=REFUSAL)
        outcome = self.responder(body)
        if isinstance(outcome, (dict, list)):
            outcome = json.dumps(outcome, ensure_ascii=False)
        if response_format is not None and self.response_format == "honour" and isinstance(outcome, str):
            try:
                value = json.loads(outcome)
            except ValueError:
                self.schema_errors.append(f"a reply that is not JSON: {outcome[:80]!r}")
            else:
                self.schema_errors += schema_mismatches(response_format["json_schema"]["schema"], value)
        return outcome

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        if self.record:
            with self._lock:
                self.requests.append({"path": request.path, "body": body, "headers": dict(request.headers)})
        latency = self.latency(body) if callable(self.latency) else self.latency
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if latency:
                await asyncio.sleep(latency)
        finally:
            self.in_flight -= 1
        outcome = self.reply_to(body)
        if isinstance(outcome, Fault):
            return await self._fault(request, outcome)
        return web.json_response(self.completion(body, outcome, chat))

    @staticmethod
    def completion(body: dict, outcome: str, chat: bool = True) -> dict:
        """The reply body of a (chat) completion answering `body` with the text `outcome`."""
        if chat:
            prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": outcome},
                "finish_reason": "stop",
            }
        else:
            prompt = str(body.get("prompt", ""))
            choice = {"index": 0, "text": outcome, "finish_reason": "stop"}
        prompt_tokens, completion_tokens = _count_tokens(prompt), _count_tokens(outcome)
        return {
            "id": "stub",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model", "stub"),
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _fault(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        if fault.kind == "status":
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            return web.json_response(
                {"error": {"message": fault.message}}, status=fault.status, headers=headers
            )
        if fault.kind == "hang":
            try:
                await asyncio.wait_for(self._closing.wait(), fault.seconds)
            except asyncio.TimeoutError:
                pass
            return web.Response(status=504)
        if fault.kind == "malformed":
            return web.Response(text='{"choices": [ this is not json', content_type="application/json")
        if fault.kind == "drop":
            request.transport.close()
            return web.Response(status=500)
        raise ValueError(f"unknown fault kind {fault.kind!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a stub OpenAI-compatible API that answers 'ok'.")
    parser.add_argument("--latency", type=float, default=1.0, help="seconds before each reply")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()

    serve_until_interrupted(StubServer(latency=args.latency, port=args.port, record=False))


def serve_until_interrupted(server) -> None:
    """Start `server`, print its base URL for the parent process to read, and serve until Ctrl-C or SIGTERM."""

    async def serve() -> None:
        await server.start()
        print(server.base_url, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
