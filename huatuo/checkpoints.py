"""Finding checkpoints of RL runs, trimming their metrics files on resume, and gathering weights to save."""

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


def is_zero3(accelerator) -> bool:
    return (
        accelerator.distributed_type == "DEEPSPEED"
        and accelerator.deepspeed_config["zero_optimization"].get("stage") == 3
    )


def state_dict_on_main(accelerator, model) -> dict | None:
    """The full state dict of a prepared model on the main process, None on the others.

    Under ZeRO-3 every process must take part, since gathering the partitions is collective (only the main process
    receives the weights). Elsewhere only the main process builds it: under ZeRO-2 accelerate clones every weight
    to the CPU for it, which each of 8 processes would otherwise do at every save for nothing."""
    if accelerator.is_main_process or is_zero3(accelerator):
        return accelerator.get_state_dict(model)
    return None
