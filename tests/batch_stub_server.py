"""The scripted OpenAI-compatible server of tests/stub_server.py, plus the Files and Batches endpoints.

    with BatchStubServer(responder, fail_uploads=1, expire={0}) as server:
        queue = BatchQueue(server.base_url, None, tmp_path / "batches", poll_interval=0.01)
        ...
        server.submitted        # custom_ids in the order batches received them
        server.answered         # custom_ids answered successfully (billed), in order

A batch moves validating -> in_progress -> finalizing -> completed, one step per status check, so
tests follow it without a clock; the batches whose creation index is `hold_from` or later stay in_progress
(while it is not None). Its requests are then answered as the synchronous endpoints answer them (the
responder, after the same response_format checks); a Fault becomes an error-file line with that HTTP
status. Scripted trouble: the first `fail_uploads` uploads get HTTP 500; the batches whose 0-based
creation index is in `expire` expire with only the first half of their requests done;
`lose_create_reply` closes the connection of the first creation after making the batch.

Run on its own (for the benchmark, so the client's CPU is measured alone):
    python -m tests.batch_stub_server --port 0 --responder bench.bench_batch_api:respond
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

from aiohttp import web

from tests.stub_server import Fault, Responder, StubServer, echo_responder, serve_until_interrupted

STEPS = ("validating", "in_progress", "finalizing", "completed")


class BatchStubServer(StubServer):
    def __init__(
        self,
        responder: Responder = echo_responder,
        fail_uploads: int = 0,
        expire: set[int] | frozenset[int] = frozenset(),
        lose_create_reply: bool = False,
        **kwargs,
    ):
        super().__init__(responder, **kwargs)
        self.fail_uploads = fail_uploads
        self.expire = set(expire)
        self.lose_create_reply = lose_create_reply
        self.hold_from: int | None = None
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.submitted: list[str] = []
        self.answered: list[str] = []
        self.uploads = 0

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{file_id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches", self._list)
        app.router.add_get("/v1/batches/{batch_id}", self._retrieve)
        return app

    def _log(self, request: web.Request, body=None) -> None:
        if self.record:
            with self._lock:
                self.requests.append({"path": request.path, "body": body, "headers": dict(request.headers)})

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        self._log(request, {"purpose": form.get("purpose")})
        self.uploads += 1
        if self.uploads <= self.fail_uploads:
            return web.json_response({"error": {"message": "scripted upload failure"}}, status=500)
        if form.get("purpose") != "batch":
            return web.json_response({"error": {"message": "purpose must be batch"}}, status=400)
        file_id = f"file-{len(self.files) + 1}"
        self.files[file_id] = form["file"].file.read()
        return web.json_response({"id": file_id, "object": "file", "purpose": "batch"})

    async def _content(self, request: web.Request) -> web.Response:
        self._log(request)
        content = self.files.get(request.match_info["file_id"])
        if content is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=content, content_type="application/octet-stream")

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._log(request, body)
        if body.get("input_file_id") not in self.files or body.get("completion_window") != "24h":
            return web.json_response({"error": {"message": "bad batch request"}}, status=400)
        lines = [json.loads(line) for line in self.files[body["input_file_id"]].splitlines() if line.strip()]
        if any(line["url"] != body.get("endpoint") or line["method"] != "POST" for line in lines):
            return web.json_response({"error": {"message": "line url or method mismatch"}}, status=400)
        index = len(self.batches)
        batch = {
            "id": f"batch-{index + 1}",
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": body["input_file_id"],
            "completion_window": "24h",
            "status": "validating",
            "created_at": int(time.time()),
            "output_file_id": None,
            "error_file_id": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
        }
        self.batches[batch["id"]] = {
            "info": batch,
            "lines": lines,
            "index": index,
            "expire": index in self.expire,
        }
        self.submitted += [line["custom_id"] for line in lines]
        if self.lose_create_reply:
            self.lose_create_reply = False
            request.transport.close()
            return web.Response(status=500)
        return web.json_response(batch)

    async def _list(self, request: web.Request) -> web.Response:
        self._log(request)
        newest_first = [b["info"] for b in reversed(self.batches.values())]
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", 20))
        page = newest_first[:limit]
        return web.json_response({"object": "list", "data": page, "has_more": len(newest_first) > limit})

    async def _retrieve(self, request: web.Request) -> web.Response:
        self._log(request)
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        info = batch["info"]
        held = self.hold_from is not None and batch["index"] >= self.hold_from
        if info["status"] in STEPS[:-1] and not (held and info["status"] == "in_progress"):
            info["status"] = STEPS[STEPS.index(info["status"]) + 1]
            if info["status"] == "completed":
                self._run(batch)
        return web.json_response(info)

    def _run(self, batch: dict) -> None:
        """Answer the batch's lines into an output and an error file, as the service does."""
        lines = batch["lines"]
        done = lines[: len(lines) // 2] if batch["expire"] else lines
        output, errors = [], []
        for n, line in enumerate(lines):
            result = {"id": f"req-{n}", "custom_id": line["custom_id"], "response": None, "error": None}
            if n >= len(done):
                result["error"] = {"code": "batch_expired", "message": "not run before the batch expired"}
                errors.append(result)
                continue
            reply = self.reply_to(line["body"])
            if isinstance(reply, Fault):
                status = reply.status if reply.kind == "status" else 500
                body = {"error": {"message": reply.message}}
                result["response"] = {"status_code": status, "body": body}
                errors.append(result)
            else:
                result["response"] = {"status_code": 200, "body": self.completion(line["body"], reply)}
                output.append(result)
                self.answered.append(line["custom_id"])
        info = batch["info"]
        if batch["expire"]:
            info["status"] = "expired"
        for key, results in (("output_file_id", output), ("error_file_id", errors)):
            if results:
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = "".join(json.dumps(r) + "\n" for r in results).encode()
                info[key] = file_id
        info["request_counts"] = {"total": len(lines), "completed": len(output), "failed": len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the stub API with the Files and Batches endpoints.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--responder",
        default=None,
        metavar="MODULE:FUNCTION",
        help="function answering each request body (default: 'ok' to everything)",
    )
    args = parser.parse_args()
    responder = echo_responder
    if args.responder:
        module, _, name = args.responder.partition(":")
        responder = getattr(importlib.import_module(module), name)

    serve_until_interrupted(BatchStubServer(responder, port=args.port, record=False))


if __name__ == "__main__":
    main()
