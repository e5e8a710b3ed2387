"""Finding checkpoints of RL runs and trimming their metrics files on resume."""

from __future__ import annotations

import json
import os
from pathlib import Path


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    if not Path(output_dir).is_dir():
        return []
    return [
        p
        for p in Path(output_dir).iterdir()
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-")[-1].isdigit()
    ]


def find_checkpoint(resume_from: str | None, output_dir: str) -> Path | None:
    """--resume_from_checkpoint PATH, or 'latest' / 'true' for the newest checkpoint in output_dir."""
    if not resume_from:
        return None
    if str(resume_from).lower() in ("latest", "last", "true"):
        found = sorted(checkpoint_dirs(Path(output_dir)), key=lambda p: int(p.name.split("-")[-1]))
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume_from}: no checkpoint-* folder in {output_dir}"
            )
        return found[-1]
    path = Path(resume_from)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from}: not a checkpoint folder (no trainer_state.json)"
        )
    return path


def drop_logged_after(path: Path, key: str, last: int) -> None:
    """Keep the lines of a metrics .jsonl logged at `key` <= last. A run resumed from a checkpoint redoes what
    the crashed run logged after it; a kill during an append leaves a torn last line, dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get(key, 0) <= last:
            kept.append(line)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(partial, path)
