"""Download the released HuatuoGPT-o1 datasets (and, on request, models) and convert them to the stage formats.

    python download_data.py                               # both datasets, English SFT config
    python download_data.py --sft_configs en zh en_mix zh_mix
    python download_data.py --models FreedomIntelligence/medical_o1_verifier_3B FreedomIntelligence/HuatuoGPT-o1-8B
    python download_data.py --mirror /data/hf_mirror      # offline: read owner/name[/config] folders instead of the hub

Writes JSON lists that the stage scripts read directly:
  data/medical_o1_verifiable_problem.json  ("Open-ended Verifiable Question", "Ground-True Answer")  -> RL_stage2.py
  data/medical_o1_sft_<config>.json        ("Question", "Complex_CoT", "Response")                   -> SFT_stage1.py
  data/models/<name>/                      Hugging Face model folders                               -> any stage
"""

import argparse
import json
import os
import shutil
from pathlib import Path

from tqdm import tqdm

from huatuo.models import load_records

VERIFIABLE_ID = "FreedomIntelligence/medical-o1-verifiable-problem"
SFT_ID = "FreedomIntelligence/medical-o1-reasoning-SFT"
VERIFIABLE_KEYS = ["Open-ended Verifiable Question", "Ground-True Answer"]
SFT_KEYS = ["Question", "Complex_CoT", "Response"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out_dir", default="data", help="Where the converted JSON files and models go.")
    parser.add_argument(
        "--sft_configs", nargs="*", default=["en"], help="SFT dataset configs: en, zh, en_mix, zh_mix."
    )
    parser.add_argument(
        "--skip_verifiable", action="store_true", help="Do not fetch the verifiable problems."
    )
    parser.add_argument(
        "--models", nargs="*", default=[], help="Model repo ids to download into <out_dir>/models/."
    )
    parser.add_argument(
        "--mirror",
        default=None,
        help="Local folder standing in for the hub: repo id owner/name is read from MIRROR/owner/name[/config].",
    )
    return parser.parse_args(argv)


def resolve(repo_id: str, config: str | None, mirror: str | None) -> tuple[str, str | None]:
    """Where to load a dataset from: the hub id with its config, or the mirror's folder (config in the path)."""
    if mirror is None:
        return repo_id, config
    path = Path(mirror, repo_id, config) if config else Path(mirror, repo_id)
    if not path.exists():
        raise FileNotFoundError(f"{repo_id} (config {config}) is not in the mirror: {path} does not exist")
    return str(path), None


def convert(repo_id, config, keys, out_path, mirror) -> int:
    """Keep the stage's keys, drop items where any is empty, and write the JSON list atomically."""
    source, source_config = resolve(repo_id, config, mirror)
    dataset = load_records(source, source_config)
    missing = [k for k in keys if k not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{repo_id} ({config or 'default'}): missing columns {missing}; found {dataset.column_names}"
        )
    records = [
        {k: row[k] for k in keys}
        for row in tqdm(dataset, desc=f"{repo_id} {config or ''}".strip())
        if all(isinstance(row[k], str) and row[k].strip() for k in keys)
    ]
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, out_path)
    return len(records)


def fetch_model(repo_id: str, out_dir: Path, mirror: str | None) -> Path:
    target = out_dir / "models" / repo_id.split("/")[-1]
    if mirror is not None:
        source, _ = resolve(repo_id, None, mirror)
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_dir=target)
    return target


def main(args):
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    # ---------------------------------------------------------------- datasets
    if not args.skip_verifiable:
        path = out_dir / "medical_o1_verifiable_problem.json"
        written.append((path, convert(VERIFIABLE_ID, None, VERIFIABLE_KEYS, path, args.mirror)))
    for config in args.sft_configs:
        path = out_dir / f"medical_o1_sft_{config}.json"
        written.append((path, convert(SFT_ID, config, SFT_KEYS, path, args.mirror)))

    # ---------------------------------------------------------------- models
    for repo_id in args.models:
        written.append((fetch_model(repo_id, out_dir, args.mirror), None))

    for path, count in written:
        print(f"{path}" + (f": {count} items" if count is not None else ""))


if __name__ == "__main__":
    main(parse_args())
