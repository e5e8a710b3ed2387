"""Input checks for the API stages: one clear error naming the file, item index and key, raised before
any API call and before anything is written.

    items = load_items("data/demo_data.json", MCQ)
    items = load_items("data/verifiable.json", VERIFIABLE)
    sources = load_eval_file("evaluation/data/eval_data.json")   # {source: [MCQ item, ...]}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

QUESTION, ANSWER = "Open-ended Verifiable Question", "Ground-True Answer"


class InputError(ValueError):
    """Bad input data: the message names the file, the item and the key."""


def _str(value) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _nonempty_str(value) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    return None if value.strip() else "must not be empty"


def _options(value) -> str | None:
    if not isinstance(value, dict) or not value:
        return "must be a non-empty object mapping option letters to option texts"
    for letter, text in value.items():
        if not isinstance(text, str):
            return f"option {letter!r} must be a string"
    return None


# A schema maps each required key to a check that returns None when the value is fine, else a reason.
Schema = dict[str, Callable[[object], "str | None"]]
MCQ: Schema = {"question": _nonempty_str, "options": _options, "answer_idx": _str, "answer": _str}
VERIFIABLE: Schema = {QUESTION: _nonempty_str, ANSWER: _nonempty_str}


def read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err})") from None


def check_items(items, schema: Schema, source: str | Path = "<input>") -> list[dict]:
    """Check a list of items against a schema; MCQ answers must name one of the options."""
    if not isinstance(items, list):
        raise InputError(f"{source}: expected a JSON list of items, got {type(items).__name__}")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"{source}: item {index} must be an object, got {type(item).__name__}")
        for key, check in schema.items():
            if key not in item:
                raise InputError(f"{source}: item {index} is missing key {key!r}")
            problem = check(item[key])
            if problem:
                raise InputError(f"{source}: item {index}, key {key!r} {problem}")
        if "answer_idx" in schema and "options" in schema and item["answer_idx"] not in item["options"]:
            raise InputError(
                f"{source}: item {index}, key 'answer_idx' is {item['answer_idx']!r}, "
                f"not one of the options {sorted(item['options'])}"
            )
    return items


def load_items(path: str | Path, schema: Schema) -> list[dict]:
    """Read a JSON list of items and check every item against `schema`."""
    return check_items(read_json(path), schema, path)


def load_eval_file(path: str | Path, schema: Schema = MCQ) -> dict[str, list[dict]]:
    """Read an eval file: {source: [item, ...]}, or a plain list taken as the single source 'normal'."""
    data = read_json(path)
    if isinstance(data, list):
        data = {"normal": data}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of source -> items, or a list of items")
    for source, items in data.items():
        check_items(items, schema, f"{path} [source {source!r}]")
    return data
