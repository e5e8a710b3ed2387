"""Download the released HuatuoGPT-o1 datasets (and, on request, models) and convert them to the stage formats.

    python download_data.py                               # verifiable problems, English SFT data, R1 SFT data
    python download_data.py --sft_configs en zh en_mix zh_mix
    python download_data.py --models FreedomIntelligence/medical_o1_verifier_3B FreedomIntelligence/HuatuoGPT-o1-8B
    python download_data.py --mirror /data/hf_mirror      # offline: read owner/name[/config] folders instead of the hub

Writes JSON lists that the stage scripts read directly:
  data/medical_o1_verifiable_problem.json  ("Open-ended Verifiable Question", "Ground-True Answer")  -> RL_stage2.py
  data/medical_o1_sft_<config>.json        ("Question", "Complex_CoT", "Response")                   -> SFT_stage1.py
  data/medical_r1_distill_sft.json         the same keys, from DeepSeek-R1's reasoning and answer    -> SFT_stage1.py
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
# DeepSeek-R1's reasoning and answers on the same verifiable problems (released February 2025). Its columns carry
# the API field they came from in parentheses; the plainer names are accepted too. SFT key <- accepted columns.
R1_DISTILL_ID = "FreedomIntelligence/Medical-R1-Distill-Data"
R1_COLUMNS = {
    "Question": ("question", "Question"),
    "Complex_CoT": ("reasoning (reasoning_content)", "reasoning_content", "reasoning", "Complex_CoT"),
    "Response": ("response (content)", "content", "response", "Response"),
}


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
        "--skip_r1_distill",
        action="store_true",
        help=f"Do not fetch {R1_DISTILL_ID} (DeepSeek-R1 reasoning on the same problems, as SFT data).",
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


def pick_columns(repo_id: str, found: list[str], wanted: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Stage key -> the first accepted column the dataset has; name every expected column if one is missing."""
    picked, missing = {}, []
    for key, accepted in wanted.items():
        column = next((c for c in accepted if c in found), None)
        if column is None:
            missing.append(f"{key} (one of {', '.join(repr(c) for c in accepted)})")
        picked[key] = column
    if missing:
        raise ValueError(f"{repo_id}: no column for {'; '.join(missing)}; found {found}")
    return picked


def convert(repo_id, config, keys, out_path, mirror) -> int:
    """Keep the stage's keys, drop items where any is empty, and write the JSON list atomically.

    keys: a list of column names kept as they are, or a dict stage key -> accepted source column names."""
    source, source_config = resolve(repo_id, config, mirror)
    dataset = load_records(source, source_config)
    wanted = keys if isinstance(keys, dict) else {k: (k,) for k in keys}
    columns = pick_columns(f"{repo_id} ({config or 'default'})", dataset.column_names, wanted)
    records = []
    for row in tqdm(dataset, desc=f"{repo_id} {config or ''}".strip()):
        record = {key: row[column] for key, column in columns.items()}
        if all(isinstance(v, str) and v.strip() for v in record.values()):
            records.append(record)
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
    if not args.skip_r1_distill:
        path = out_dir / "medical_r1_distill_sft.json"
        written.append((path, convert(R1_DISTILL_ID, None, R1_COLUMNS, path, args.mirror)))

    # ---------------------------------------------------------------- models
    for repo_id in args.models:
        written.append((fetch_model(repo_id, out_dir, args.mirror), None))

    for path, count in written:
        print(f"{path}" + (f": {count} items" if count is not None else ""))


if __name__ == "__main__":
    main(parse_args())
