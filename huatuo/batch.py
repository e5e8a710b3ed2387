"""Batch mode of the shared client: the stages' chat requests through the OpenAI Batch API (half price,
answers within 24 h), resumable after any kill, never paying twice for an answer.

    queue = BatchQueue(api_url, api_key, "output_data/demo_CoT_search_batches")
    llm = LLMClient(api_url, "gpt-4o", api_key, batch=queue)     # the stage's code does not change

How it works. `LLMClient.chat` hands the request to the queue, which gathers the requests the workers
wait on until every worker lane of huatuo.store.run_all waits on it (or `window` seconds pass since
the first one), writes them as JSONL lines (custom_id, method, url, body), uploads the file, creates a
batch and polls it; when it ends, it downloads the output and error files and resolves each waiting
call with its own reply. A search round across all open problems thus becomes one batch. A round over
50,000 requests or 200 MB is split into several batches.

Nothing lost, nothing paid twice. A request's custom_id is `<item id>.<call number within the item>.
<first 12 hex of the sha256 of its body>`. An item makes the same calls in the same order when it is
run again (the stages seed their random choices per item, and the replies it saw come back from disk),
so a rerun after a kill asks for the same custom_ids, and each is then answered from a finished batch's
saved results, or by the batch still running it (polled, never resubmitted), or else submitted anew.
Files in `folder`:
    batch_<n>.json           written once the input file is uploaded, before the batch is created, and
                             updated as it moves: file id, batch id, status, and per custom_id its item
                             and body hash
    batch_<n>_results.json   written when the batch ends: per custom_id the reply text and usage, or the
                             error; a record without it is followed again on resume, which downloads them
Prompts are uploaded but not kept on disk, and the API key is written nowhere.

Failures. A request that fails with 408/409/429/5xx, whose reply cannot be parsed, or that an expired
or cancelled batch left undone goes into the next batch, up to `max_retries` times per run; then, as
any other error (a 400, a failed batch), it raises LLMError and the stage records the item as given up
with that reason. A request refused for its response_format (the body is sent as the stage wrote it,
structured-output schema included) raises StructuredOutputUnsupported instead, which stops the run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from huatuo.batch_api import ENDPOINT, BatchAPI, TransientError
from huatuo.llm import (
    RETRYABLE_STATUS,
    BatchRequestFailed,
    LLMError,
    Reply,
    StructuredOutputUnsupported,
    busy_lanes,
    current_item,
    normalize_api_url,
    refuses_structured_output,
)
from huatuo.store import write_json_atomic

# The service's limits on one input file.
MAX_REQUESTS = 50_000
MAX_BYTES = 200 * 1024 * 1024
ENDED = ("completed", "failed", "expired", "cancelled")
# How often the gatherer checks whether every worker waits: short next to any real batch.
GATHER_TICK_S = 0.02


def add_batch_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("OpenAI Batch API (half the price, answers within 24 hours)")
    group.add_argument(
        "--batch_api",
        action="store_true",
        help="send the chat requests as batches: each round of the workers' requests becomes one batch; "
        "failed requests go into the next one, up to --max_retries times; rerunning a killed run follows "
        "the batches it submitted instead of paying again. Raise --num_process so that a round holds every item",
    )
    group.add_argument(
        "--batch_window",
        type=float,
        default=60.0,
        help="seconds to gather requests before submitting a batch even if some workers are still busy "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--poll_interval",
        type=float,
        default=60.0,
        help="seconds between two status checks of a submitted batch (default: %(default)s)",
    )


def check_batch_args(args: argparse.Namespace) -> None:
    """ValueError for unusable batch flags, so that bad input stops the run before any upload."""
    if args.batch_window <= 0 or args.poll_interval <= 0:
        raise ValueError(
            f"--batch_window and --poll_interval must be positive, got {args.batch_window} and {args.poll_interval}"
        )


def batch_queue_for(
    args: argparse.Namespace, api_url: str, api_key: str | None, folder: Path, timeout: float
):
    """The BatchQueue that --batch_api asks for, from the flags add_batch_args defines; None without it."""
    if not args.batch_api:
        return None
    return BatchQueue(
        api_url,
        api_key,
        folder,
        window=args.batch_window,
        poll_interval=args.poll_interval,
        max_retries=args.max_retries,
        backoff_base=getattr(args, "backoff_base", 1.0),
        timeout=timeout,
    )


def custom_id(item: str, number: int, body_hash: str) -> str:
    return f"{item}.{number}.{body_hash[:12]}"


def reply_of(result: dict, calls: int = 1) -> Reply:
    return Reply(
        text=result["text"],
        prompt_tokens=result["prompt_tokens"],
        completion_tokens=result["completion_tokens"],
        finish_reason=result["finish_reason"],
        calls=calls,
        retries=calls - 1,
    )


def failure(error: str, retry: bool) -> dict:
    """A result that is an error; `refused_response_format` marks the server refusing structured outputs."""
    result = {"error": error, "retry": retry}
    if not retry and refuses_structured_output(error):
        result["refused_response_format"] = True
    return result


def outcome(line: dict) -> dict:
    """One line of an output or error file as a result: the reply and its usage, or `error` (the
    reason) with `retry` (whether the next batch may do better)."""
    response, error = line.get("response") or {}, line.get("error")
    status = response.get("status_code")
    body = response.get("body")
    if status == 200:
        try:
            choice = body["choices"][0]
            usage = body.get("usage") or {}
            return {
                "text": choice["message"]["content"] or "",
                "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                "completion_tokens": int(usage.get("completion_tokens") or 0),
                "finish_reason": choice.get("finish_reason"),
            }
        except (KeyError, IndexError, TypeError, ValueError):
            return {"error": f"unparseable reply body: {str(body)[:200]!r}", "retry": True}
    if status is not None:
        message = body.get("error", {}).get("message", "") if isinstance(body, dict) else str(body)
        retry = status in RETRYABLE_STATUS or status >= 500
        return failure(f"HTTP {status}: {message}".strip(), retry)
    if isinstance(error, dict):
        # Lines the batch itself failed (batch_expired, batch_cancelled, ...): no request was answered.
        return {"error": f"{error.get('code')}: {error.get('message', '')}", "retry": True}
    return {"error": f"malformed result line: {str(line)[:200]!r}", "retry": True}


@dataclass
class _Request:
    custom_id: str
    item: str
    body_hash: str
    line: bytes
    future: asyncio.Future
    submissions: int = 0
    settled: bool = False


@dataclass
class _Batch:
    number: int
    record: dict
    # The requests whose workers wait on this batch, by custom_id (on resume, only those asked again).
    waiting: dict[str, _Request] = field(default_factory=dict)


class BatchQueue:
    """Gathers chat requests into batches, submits and polls them, and resumes those a killed run left."""

    def __init__(
        self,
        api_url: str,
        api_key: str | None,
        folder: str | Path,
        window: float = 60.0,
        poll_interval: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        timeout: float = 600.0,
        max_requests: int = MAX_REQUESTS,
        max_bytes: int = MAX_BYTES,
    ):
        self.api = BatchAPI(
            normalize_api_url(api_url), api_key, max_retries, backoff_base=backoff_base, timeout=timeout
        )
        self.folder = Path(folder)
        self.window = window
        self.poll_interval = poll_interval
        self.max_retries = max_retries
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        # Requests per batch submitted by this run, in order (what bench/bench_batch_api.py reports).
        self.submitted: list[int] = []
        self._gathering: list[_Request] = []
        self._gathering_bytes = 0
        self._first_gathered = 0.0
        self._waiting = 0
        self._calls = Counter()
        self._saved: dict[str, dict] = {}
        self._running: dict[str, _Batch] = {}
        self._next_number = 1
        self._tasks: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"BatchQueue(folder={str(self.folder)!r}, api={self.api!r})"

    async def request(self, body: dict) -> Reply:
        """The reply to one chat request, through the current or a recorded batch."""
        if self._wake is None:
            self._start()
        item = current_item() or "call"
        number = self._calls[item]
        self._calls[item] += 1
        body_hash = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        cid = custom_id(item, number, body_hash)
        saved = self._saved.pop(cid, None)
        if saved is not None:
            return reply_of(saved)
        line = {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}
        request = _Request(
            cid,
            item,
            body_hash,
            (json.dumps(line, ensure_ascii=False) + "\n").encode(),
            asyncio.get_running_loop().create_future(),
        )
        if len(request.line) > self.max_bytes:
            raise BatchRequestFailed(
                f"request {cid} is {len(request.line)} bytes, over the {self.max_bytes}-byte limit of a batch file",
                calls=0,
            )
        running = self._running.get(cid)
        if running is not None:
            request.submissions = 1
            running.waiting[cid] = request
        else:
            self._gather(request)
        self._waiting += 1
        try:
            return await request.future
        finally:
            self._settle(request)  # only counts a worker that was cancelled while waiting

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.api.close()

    # ------------------------------------------------------------------ resume

    def _start(self) -> None:
        """Load what earlier runs recorded: results of ended batches, and batches still to follow."""
        self._wake = asyncio.Event()
        self._spawn(self._gatherer())
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.folder.glob("batch_*[0-9].json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            self._next_number = max(self._next_number, record["number"] + 1)
            results = self._results_path(record["number"])
            if results.exists():
                for cid, result in json.loads(results.read_text(encoding="utf-8")).items():
                    if "error" not in result:
                        self._saved[cid] = result
                continue
            batch = _Batch(record["number"], record)
            for cid in record["requests"]:
                self._running[cid] = batch
            tqdm.write(f"resuming batch {batch.number} ({record.get('batch_id') or record['file_id']})")
            self._spawn(self._follow(batch))

    def _record_path(self, number: int) -> Path:
        return self.folder / f"batch_{number:05d}.json"

    def _results_path(self, number: int) -> Path:
        return self.folder / f"batch_{number:05d}_results.json"

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ gathering

    def _gather(self, request: _Request) -> None:
        size = len(request.line)
        if self._gathering and (
            len(self._gathering) >= self.max_requests or self._gathering_bytes + size > self.max_bytes
        ):
            self._flush()
        if not self._gathering:
            self._first_gathered = time.monotonic()
        self._gathering.append(request)
        self._gathering_bytes += size
        self._wake.set()

    async def _gatherer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._gathering:
                # Outside run_all nobody says how many workers there are: the window alone decides.
                lanes = busy_lanes()
                everyone_waits = lanes > 0 and self._waiting >= lanes
                if everyone_waits or time.monotonic() - self._first_gathered >= self.window:
                    self._flush()
                    break
                await asyncio.sleep(GATHER_TICK_S)

    def _flush(self) -> None:
        requests, self._gathering, self._gathering_bytes = self._gathering, [], 0
        batch = _Batch(self._next_number, {}, {r.custom_id: r for r in requests})
        self._next_number += 1
        for request in requests:
            request.submissions += 1
            self._running[request.custom_id] = batch
        self.submitted.append(len(requests))
        self._spawn(self._follow(batch, requests))

    # ------------------------------------------------------------------ one batch, from upload to results

    async def _follow(self, batch: _Batch, requests: list[_Request] | None = None) -> None:
        try:
            if requests is not None:
                await self._upload(batch, requests)
            if not batch.record.get("batch_id"):
                info = await self.api.create(batch.record["file_id"], since=batch.record["uploaded_at"])
                self._save_record(batch, batch_id=info["id"], status=info.get("status"))
            info = await self._poll(batch)
            results = await self._results(batch, info)
        except LLMError as err:
            for cid in batch.record.get("requests", batch.waiting):
                self._running.pop(cid, None)
            where = f"; rerun to resume it from {self._record_path(batch.number)}" if batch.record else ""
            for request in batch.waiting.values():
                self._fail(request, f"batch {batch.number}: {err}{where}")
            return
        self._finish(batch, results)

    async def _upload(self, batch: _Batch, requests: list[_Request]) -> None:
        file_id = await self.api.upload(b"".join(r.line for r in requests))
        batch.record = {
            "number": batch.number,
            "file_id": file_id,
            "batch_id": None,
            "status": "uploaded",
            "uploaded_at": time.time(),
            "requests": {r.custom_id: {"item": r.item, "body_sha256": r.body_hash} for r in requests},
        }
        self._save_record(batch)

    def _save_record(self, batch: _Batch, **changes) -> None:
        batch.record.update(changes)
        write_json_atomic(self._record_path(batch.number), batch.record, indent=None)

    async def _poll(self, batch: _Batch) -> dict:
        shown = None
        while True:
            try:
                info = await self.api.retrieve(batch.record["batch_id"])
            except TransientError as err:
                # The batch goes on at the service whatever our connection does: keep following it.
                tqdm.write(f"batch {batch.number}: status check failed ({err}); trying again")
                await asyncio.sleep(self.poll_interval)
                continue
            counts = info.get("request_counts") or {}
            line = (
                f"batch {batch.number} ({info['id']}): {info['status']}, {counts.get('completed', 0)}"
                f"/{counts.get('total', len(batch.record['requests']))} done, {counts.get('failed', 0)} failed"
            )
            if line != shown:
                tqdm.write(line)
                shown = line
            if info["status"] != batch.record["status"]:
                self._save_record(batch, status=info["status"])
            if info["status"] in ENDED:
                return info
            await asyncio.sleep(self.poll_interval)

    async def _results(self, batch: _Batch, info: dict) -> dict[str, dict]:
        """Every request of the ended batch, answered or with its error; saved before anyone is told."""
        results = {}
        for key in ("output_file_id", "error_file_id"):
            if info.get(key):
                for raw in (await self.api.content(info[key])).splitlines():
                    if raw.strip():
                        line = json.loads(raw)
                        results[line["custom_id"]] = outcome(line)
        if info["status"] == "failed":
            errors = (info.get("errors") or {}).get("data") or [{}]
            message = errors[0].get("message", "no reason given")
            reason = failure(f"the batch failed: {message}", retry=False)
        else:
            reason = {"error": f"left undone by the {info['status']} batch", "retry": True}
        for cid in batch.record["requests"]:
            results.setdefault(cid, reason)
        write_json_atomic(self._results_path(batch.number), results, indent=None)
        self._save_record(batch, status=info["status"])
        return results

    def _finish(self, batch: _Batch, results: dict[str, dict]) -> None:
        for cid, result in results.items():
            self._running.pop(cid, None)
            request = batch.waiting.pop(cid, None)
            if request is None:
                # A resumed batch's answer to a call its item has not made again yet.
                if "error" not in result:
                    self._saved[cid] = result
            elif "error" not in result:
                self._settle(request, reply=reply_of(result, calls=request.submissions))
            elif result.get("refused_response_format"):
                error = StructuredOutputUnsupported(f"request {request.custom_id}: {result['error']}")
                self._settle(request, error=error)
            elif result["retry"] and request.submissions <= self.max_retries and not request.settled:
                self._gather(request)
            else:
                self._fail(request, f"{result['error']} (submitted in {request.submissions} batch(es))")

    def _fail(self, request: _Request, reason: str) -> None:
        error = BatchRequestFailed(f"request {request.custom_id}: {reason}", calls=request.submissions)
        self._settle(request, error=error)

    def _settle(self, request: _Request, reply: Reply | None = None, error: Exception | None = None) -> None:
        """Resolve a waiting call once. The waiting count drops at once, not when the worker resumes,
        so that the gatherer never mistakes a worker about to send its next request for one waiting."""
        if request.settled:
            return
        request.settled = True
        self._waiting -= 1
        if request.future.done():
            return
        if error is not None:
            request.future.set_exception(error)
        elif reply is not None:
            request.future.set_result(reply)
