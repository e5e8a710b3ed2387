"""Prompt templates are text files: prompts/<name>.txt, and prompts/zh/<name>.txt for Chinese.

Templates use Python str.format fields ({question}); literal braces, as in a JSON example, are
doubled ({{"CoT": ...}}). `--prompt_dir DIR` overrides the defaults file by file, laid out the same
way (DIR/<name>.txt, DIR/zh/<name>.txt), so the paper's exact prompts can be dropped in.

Every template is checked against the field contract below when it is loaded: a field outside the
contract, or a required field left out, is an error naming the file.
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

PROMPT_ROOT = Path(__file__).resolve().parent.parent / "prompts"
LANGUAGES = ("en", "zh")

# name -> (fields a template may use, fields it must use)
_STEPS = {"question", "previous_reasoning"}
CONTRACT: dict[str, tuple[set[str], set[str]]] = {
    "construct_filter": ({"question", "options", "answer", "answer_idx"}, {"question", "options"}),
    "construct_reformat": ({"question", "options", "answer", "answer_idx"}, {"question", "options"}),
    "construct_difficulty": ({"question", "options"}, {"question", "options"}),
    "search_init": ({"question"}, {"question"}),
    "search_backtracking": (_STEPS, _STEPS),
    "search_exploring_new_paths": (_STEPS, _STEPS),
    "search_verification": (_STEPS, _STEPS),
    "search_correction": (_STEPS, _STEPS),
    "search_label": (_STEPS | {"answer"}, _STEPS | {"answer"}),
    "verify": ({"response", "reference"}, {"response", "reference"}),
    "reward_verifier": ({"response", "reference"}, {"response", "reference"}),
    "reformat_natural": ({"thought_process", "question"}, {"thought_process"}),
    "final_response": ({"thinking", "question"}, {"thinking", "question"}),
}


class PromptError(ValueError):
    """A prompt file that is missing or does not fit its field contract."""


def prompt_path(name: str, language: str = "en", prompt_dir: str | Path | None = None) -> Path:
    """The file that `load_prompt` reads: the override in prompt_dir if it exists, else the default."""
    if language not in LANGUAGES:
        raise PromptError(f"unknown prompt language {language!r}; choose from {', '.join(LANGUAGES)}")
    relative = Path(f"{name}.txt") if language == "en" else Path(language) / f"{name}.txt"
    if prompt_dir is not None:
        override = Path(prompt_dir) / relative
        if override.is_file():
            return override
    return PROMPT_ROOT / relative


def template_fields(template: str, path: Path | str = "<template>") -> set[str]:
    """The str.format field names a template uses; positional or attribute fields are errors."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise PromptError(f"{path}: not a valid format template ({err}); double literal braces") from None
    fields = set()
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise PromptError(f"{path}: field {{{field}}} is not a plain name; double literal braces")
        fields.add(field)
    return fields


def load_prompt(name: str, language: str = "en", prompt_dir: str | Path | None = None) -> str:
    """Read and check a template. Use it with `.format(**fields)`."""
    if name not in CONTRACT:
        raise PromptError(f"unknown prompt {name!r}; known: {', '.join(sorted(CONTRACT))}")
    path = prompt_path(name, language, prompt_dir)
    if not path.is_file():
        raise PromptError(f"prompt file {path} not found (language {language!r})")
    template = path.read_text(encoding="utf-8").rstrip("\n")
    allowed, required = CONTRACT[name]
    fields = template_fields(template, path)
    unknown = sorted(fields - allowed)
    if unknown:
        raise PromptError(
            f"{path}: unknown field {{{unknown[0]}}}; {name} may use {', '.join(sorted(allowed))}"
        )
    missing = sorted(required - fields)
    if missing:
        raise PromptError(
            f"{path}: missing field {{{missing[0]}}}; {name} needs {', '.join(sorted(required))}"
        )
    return template


def add_prompt_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add --language and --prompt_dir (shared by every script that prompts an LLM)."""
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--language",
        choices=LANGUAGES,
        default="en",
        help="prompt language: en uses prompts/*.txt, zh uses prompts/zh/*.txt (default: en)",
    )
    group.add_argument(
        "--prompt_dir",
        default=None,
        help="folder whose <name>.txt (zh/<name>.txt for zh) replace the default prompts file by file",
    )
    return group
