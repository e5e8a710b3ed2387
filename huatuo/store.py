"""Resumable per-item results: one JSON file per item, written atomically, and the runner that fills them.

Layout (as the original scripts): `output_data/<input name>/<item id>.json`. Each file is written to a
temporary name in the same folder, fsynced, then renamed over the final name, so a kill -9 at any
moment leaves either the old state or the new one, never a truncated file. A rerun asks the store
which ids are done and processes only the rest.

Every record carries `status`: "kept", "dropped" (with `reason`) or "given_up" (with `reason`), and
`usage` (calls, retries, failures and tokens spent on the item).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from tqdm import tqdm

from huatuo.llm import StructuredOutputUnsupported, Usage, track_usage, worker_lane

KEPT, DROPPED, GIVEN_UP = "kept", "dropped", "given_up"
_TMP_SUFFIX = ".tmp"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """Write JSON to `path` so that readers (and crashes) see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_args(path: str | os.PathLike, args, secret_keys: Iterable[str] = ("api_key",)) -> None:
    """Save the resolved arguments (an argparse Namespace or a dict) as JSON, without secrets."""
    values = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    secrets = set(secret_keys)
    clean = {k: v for k, v in values.items() if k not in secrets}
    write_json_atomic(path, json.loads(json.dumps(clean, default=str)))


def _sort_key(item_id: str):
    return (0, int(item_id), "") if item_id.isdigit() else (1, 0, item_id)


class ItemStore:
    """A folder of `<item id>.json` files. Ids are strings made of letters, digits, '.', '_', '-'."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # Temporary files left by a killed run hold nothing that was ever complete.
        for leftover in self.directory.glob(f".*{_TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def path(self, item_id) -> Path:
        item_id = str(item_id)
        if not _SAFE_ID.match(item_id) or item_id.startswith("."):
            raise ValueError(f"item id {item_id!r} cannot be used as a file name")
        return self.directory / f"{item_id}.json"

    def done_ids(self) -> set[str]:
        return {p.stem for p in self.directory.glob("*.json") if not p.name.startswith(".")}

    def save(self, item_id, record: dict) -> None:
        write_json_atomic(self.path(item_id), record)

    def load(self, item_id) -> dict:
        path = self.path(item_id)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); delete it to redo that item") from None

    def all(self) -> list[dict]:
        """Every saved record, ordered by id (numeric ids numerically)."""
        return [self.load(i) for i in sorted(self.done_ids(), key=_sort_key)]


async def run_all(
    items: list[dict],
    worker: Callable[[dict], Awaitable[dict]],
    store: ItemStore,
    key: Callable[[dict], object],
    desc: str = "items",
    concurrency: int = 10,
    stats: Usage | None = None,
    retry_given_up: bool = False,
) -> Counter:
    """Run `worker` on every item not yet in `store`, `concurrency` items at a time.

    Each finished record is saved as soon as it is ready. A worker exception becomes a "given_up"
    record holding the reason; it never stops the run, except StructuredOutputUnsupported, which every
    item would meet: it is raised once the other lanes are stopped, leaving their items for the rerun.
    `stats` (the client's running totals) feeds the progress line. Returns the status counts of this
    run's records.
    """
    done = store.done_ids()
    if retry_given_up:
        done = {i for i in done if store.load(i).get("status") != GIVEN_UP}
    pending = [item for item in items if str(key(item)) not in done]
    counts: Counter = Counter()
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc=desc, dynamic_ncols=True)
    queue = iter(pending)

    def postfix() -> dict:
        line = {"kept": counts[KEPT], "dropped": counts[DROPPED], "given_up": counts[GIVEN_UP]}
        if stats is not None:
            line.update(calls=stats.calls, retries=stats.retries)
        return line

    async def one(item: dict) -> None:
        with track_usage(str(key(item))) as usage:
            try:
                record = await worker(item)
            except StructuredOutputUnsupported:
                raise
            except Exception as err:
                record = {**item, "status": GIVEN_UP, "reason": f"{type(err).__name__}: {err}"}
        record.setdefault("status", KEPT)
        record["usage"] = usage.as_dict()
        await asyncio.to_thread(store.save, key(item), record)
        counts[record["status"]] += 1
        bar.set_postfix(postfix(), refresh=False)
        bar.update(1)

    async def lane() -> None:
        with worker_lane():
            for item in queue:
                await one(item)

    lanes = [asyncio.ensure_future(lane()) for _ in range(max(1, min(concurrency, len(pending))))]
    try:
        await asyncio.gather(*lanes)
    finally:
        # Nothing to cancel after a normal end; after an error, the lanes still running stop here.
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        bar.close()
    return counts
