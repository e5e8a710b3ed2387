"""The Files and Batches endpoints of the OpenAI API, as huatuo.batch uses them.

    api = BatchAPI("https://api.openai.com/v1", key)
    file_id = await api.upload(jsonl_bytes)                 # POST /files, purpose "batch"
    batch = await api.create(file_id, since=uploaded_at)    # POST /batches, window 24h (at most once)
    batch = await api.retrieve(batch["id"])                 # GET /batches/{id}: status, request_counts
    lines = await api.content(batch["output_file_id"])      # GET /files/{id}/content

Retries follow huatuo.llm: exponential backoff with jitter on 408/409/429 (honouring Retry-After), 5xx,
timeouts and dropped connections; other 4xx fail at once. The key is sent only in the Authorization
header and is redacted from every error message.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable

import aiohttp

from huatuo.llm import RETRYABLE_STATUS, LLMError, retry_after_seconds

ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
# How far before our upload a batch made from it may appear to start: the server's clock is not ours.
CLOCK_SLACK_S = 3600


class TransientError(LLMError):
    """A request that kept failing with a retryable error; trying again later may succeed."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class BatchAPI:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        max_retries: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        timeout: float = 600.0,
    ):
        self.base_url = base_url
        self._api_key = api_key
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"BatchAPI(base_url={self.base_url!r})"

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No default Content-Type: uploads are multipart, the rest JSON, each set by its payload.
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        return self._session

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    async def _backoff(self, attempt: int, retry_after: float | None) -> None:
        cap = min(self.backoff_max, self.backoff_base * 2**attempt)
        delay = cap / 2 + random.uniform(0, cap / 2)
        await asyncio.sleep(delay if retry_after is None else max(delay, retry_after))

    async def _once(self, method: str, path: str, raw: bool = False, **kwargs):
        """One HTTP request: the parsed JSON (or the bytes), LLMError for a client error, TransientError
        for what a retry may fix."""
        try:
            async with self._ensure_session().request(method, self.base_url + path, **kwargs) as resp:
                body = await resp.read()
                status = resp.status
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            raise TransientError(f"{method} {path}: no reply within {self.timeout:g} s") from None
        except aiohttp.ClientError as err:
            raise TransientError(f"{method} {path}: connection error ({type(err).__name__})") from None
        if status != 200:
            snippet = self._redact(body[:300].decode("utf-8", "replace").strip())
            reason = f"{method} {path}: HTTP {status} {snippet}".strip()
            if status in RETRYABLE_STATUS or status >= 500:
                raise TransientError(reason, retry_after)
            raise LLMError(reason)
        if raw:
            return body
        try:
            return json.loads(body)
        except ValueError:
            raise TransientError(f"{method} {path}: reply is not JSON") from None

    async def _call(self, method: str, path: str, raw: bool = False, form: Callable | None = None, **kwargs):
        """`_once` with retries; `form` builds a fresh multipart body per attempt (aiohttp consumes it)."""
        for attempt in range(self.max_retries + 1):
            if form is not None:
                kwargs["data"] = form()
            try:
                return await self._once(method, path, raw=raw, **kwargs)
            except TransientError as err:
                if attempt == self.max_retries:
                    raise TransientError(f"{err} (after {attempt + 1} attempts)") from None
                await self._backoff(attempt, err.retry_after)

    async def upload(self, content: bytes) -> str:
        """Upload a JSONL input file; its file id."""

        def form() -> aiohttp.FormData:
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            data.add_field("file", content, filename="batch_input.jsonl", content_type="application/jsonl")
            return data

        return (await self._call("POST", "/files", form=form))["id"]

    async def create(self, file_id: str, since: float) -> dict:
        """The batch of an uploaded file, created at most once. A creation whose reply was lost (or a
        run killed right after it) may still have made the batch, so before each try the batches made
        since `since` (our upload time) are searched for one reading this file."""
        body = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": COMPLETION_WINDOW}
        for attempt in range(self.max_retries + 1):
            found = await self.find(file_id, since)
            if found is not None:
                return found
            try:
                return await self._once("POST", "/batches", json=body)
            except TransientError as err:
                if attempt == self.max_retries:
                    raise TransientError(f"{err} (after {attempt + 1} attempts)") from None
                await self._backoff(attempt, err.retry_after)

    async def find(self, file_id: str, since: float) -> dict | None:
        """The batch reading `file_id`, if one was created after `since` (the list is newest first)."""
        params = {"limit": "100"}
        while True:
            page = await self._call("GET", "/batches", params=params)
            for batch in page.get("data", []):
                if batch.get("input_file_id") == file_id:
                    return batch
                if batch.get("created_at", since) < since - CLOCK_SLACK_S:
                    return None
            if not page.get("has_more") or not page.get("data"):
                return None
            params = {"limit": "100", "after": page["data"][-1]["id"]}

    async def retrieve(self, batch_id: str) -> dict:
        return await self._call("GET", f"/batches/{batch_id}")

    async def content(self, file_id: str) -> bytes:
        return await self._call("GET", f"/files/{file_id}/content", raw=True)
