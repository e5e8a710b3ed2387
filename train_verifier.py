"""Train the stage-2 verifier: a 2-label sequence classifier that reads (final response, reference answer)
and says whether they agree, replacing the LLM judge during RL (the paper's fine-tuned verifier reached
94% agreement with hand checks).

Training pairs come from the search stage, whose records keep every verifier call in `llm_log` (step
"verify": the query filled from prompts/verify.txt, and the judge's True/False reply), or from any JSON
list of {"response", "reference", "label"} (label true/false, 1/0 or "True"/"False"):

    # pairs from the search stage's per-item records (given-up items included) on one process
    python train_verifier.py --data_path output_data/demo_data_CoT_search \\
        --model_name_or_path meta-llama/Llama-3.2-3B-Instruct --output_dir ckpts/verifier
    # 8 GPUs, ZeRO-3, your own labelled pairs plus the search records
    accelerate launch --config_file configs/deepspeed_zero3.yaml train_verifier.py \\
        --data_path pairs.json output_data/medical_o1_CoT_search --model_name_or_path Qwen/Qwen2.5-3B-Instruct \\
        --per_device_train_batch_size 4 --learning_rate 1e-5 --num_epochs 2 --output_dir ckpts/verifier
    # then
    python RL_stage2.py --reward_model_path ckpts/verifier ...

Each pair is rendered exactly as the RL reward renders it (prompts/reward_verifier.txt, the tokenizer's eos,
at most --max_length tokens); label 1 means correct. Held-out accuracy, precision and recall (label 1 is the
positive class, at --threshold as in RL) are printed before training and after each epoch and appended to
<output_dir>/verifier_metrics.jsonl. The output folder (model with tokenizer) is what --reward_model_path
accepts. A rerun of an interrupted run with the same --output_dir resumes after its last finished epoch.
"""

import argparse
import json
import math
import random
import re
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_cosine_schedule_with_warmup

from huatuo.checkpoints import drop_logged_after
from huatuo.models import attn_implementation, bf16_supported
from huatuo.prompts import LANGUAGES, PromptError, load_prompt
from huatuo.reward import load_reward_prompt, pad_batch, verifier_input_ids
from huatuo.search import verdict
from huatuo.store import save_args, write_json_atomic

STATE_DIR = "train_state"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the commands above as written, and every flag's default."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data_path",
        nargs="+",
        required=True,
        help="search outputs (a merged .json, a .jsonl, or the per-item record folder) and/or JSON lists of "
        "{response, reference, label}",
    )
    data.add_argument(
        "--eval_fraction", type=float, default=0.1, help="share of pairs held out for evaluation"
    )
    data.add_argument("--max_eval", type=int, default=1000, help="cap on the number of held-out pairs")
    data.add_argument(
        "--prompt_dir",
        default=None,
        help="the --prompt_dir the search ran with, to read its verify queries; also overrides "
        "reward_verifier.txt",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        required=True,
        help="base model (folder or hub id); a causal LM gets a fresh 2-label head",
    )
    model.add_argument("--output_dir", default="ckpts/verifier", help="where the trained verifier is saved")
    model.add_argument(
        "--max_length", type=int, default=4000, help="token limit per pair, as in the RL reward"
    )
    model.add_argument(
        "--threshold", type=float, default=0.4, help="P(correct) above which a pair counts as True"
    )
    model.add_argument(
        "--gradient_checkpointing", action="store_true", help="trade compute for memory on long pairs"
    )
    train = parser.add_argument_group("training")
    train.add_argument("--num_epochs", type=int, default=2, help="passes over the training pairs")
    train.add_argument("--per_device_train_batch_size", type=int, default=4, help="pairs per device per step")
    train.add_argument(
        "--per_device_eval_batch_size", type=int, default=8, help="pairs per device in evaluation"
    )
    train.add_argument("--gradient_accumulation_steps", type=int, default=4, help="micro-batches per update")
    train.add_argument("--learning_rate", type=float, default=1e-5, help="peak AdamW learning rate")
    train.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    train.add_argument("--warmup_ratio", type=float, default=0.05, help="share of updates spent warming up")
    train.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 where supported"
    )
    train.add_argument("--seed", type=int, default=42, help="seed of the split, shuffling and head init")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


def query_pattern(template: str) -> re.Pattern:
    """A regex that recovers {response} and {reference} from a query made with `template`."""
    parts = re.split(r"(\{response\}|\{reference\})", template)
    regex = "".join(
        f"(?P<{p[1:-1]}>.*)"
        if p in ("{response}", "{reference}")
        else re.escape(p.replace("{{", "{").replace("}}", "}"))
        for p in parts
    )
    return re.compile(regex, re.DOTALL)


def parse_label(value, where: str) -> int:
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    raise ValueError(f"{where}: label must be true/false, 1/0 or 'True'/'False', got {value!r}")


def pairs_from_record(record, where: str, patterns: list[re.Pattern]) -> list[dict]:
    """Training pairs of one input record: a labelled pair, or every verifier call of a search record."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    if "llm_log" in record:
        pairs = []
        for j, call in enumerate(record["llm_log"]):
            if call.get("step") != "verify":
                continue
            match = next((m for p in patterns if (m := p.fullmatch(call.get("query", "")))), None)
            if match is None:
                raise ValueError(
                    f"{where}: llm_log[{j}].query does not match prompts/verify.txt (en or zh); pass the "
                    "--prompt_dir the search ran with"
                )
            pairs.append({**match.groupdict(), "label": int(verdict(call.get("response", "")))})
        return pairs
    for key in ("response", "reference", "label"):
        if key not in record:
            raise ValueError(f"{where}: missing field {key!r} (and no llm_log, so not a search record)")
    for key in ("response", "reference"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    return [
        {
            "response": record["response"],
            "reference": record["reference"],
            "label": parse_label(record["label"], where),
        }
    ]


def read_records(path: Path) -> list[tuple[str, object]]:
    """(location, record) for every record in a .json list, a .jsonl file, or a folder of .json records."""
    if path.is_dir():
        return [(str(f), json.loads(f.read_text(encoding="utf-8"))) for f in sorted(path.glob("*.json"))]
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [
            (f"{path} line {i + 1}", json.loads(line))
            for i, line in enumerate(text.splitlines())
            if line.strip()
        ]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return [(f"{path} item {i}", record) for i, record in enumerate(data)]


def load_pairs(paths: list[str], prompt_dir=None) -> list[dict]:
    patterns = [query_pattern(load_prompt("verify", lang, prompt_dir)) for lang in LANGUAGES]
    pairs = []
    for path in paths:
        for where, record in read_records(Path(path)):
            pairs.extend(pairs_from_record(record, where, patterns))
    return pairs


def binary_metrics(probs: list[float], labels: list[int], threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall and F1 with label 1 (correct) as the positive class."""
    preds = [int(p > threshold) for p in probs]
    tp = sum(1 for p, y in zip(preds, labels, strict=True) if p and y)
    fp = sum(1 for p, y in zip(preds, labels, strict=True) if p and not y)
    fn = sum(1 for p, y in zip(preds, labels, strict=True) if not p and y)
    n = max(len(labels), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(1 for p, y in zip(preds, labels, strict=True) if p == y) / n,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "positive_rate": sum(labels) / n,
        "n": len(labels),
    }


def distinct_pad_id(tokenizer) -> int:
    """The classifier pools at the last token that is not the pad id, and every pair ends with eos, so
    the pad id the model is told about must differ from eos."""
    for token_id in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id):
        if token_id is not None and token_id != tokenizer.eos_token_id:
            return token_id
    raise ValueError("the tokenizer has no pad, bos or unk token distinct from eos to pad with")


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, loader, accelerator, threshold: float) -> dict[str, float]:
    model.eval()
    probs, labels = [], []
    for input_ids, attention_mask, batch_labels in loader:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        p, y = accelerator.gather_for_metrics((torch.softmax(logits, dim=-1)[:, 1], batch_labels))
        probs += p.tolist()
        labels += y.tolist()
    model.train()
    return binary_metrics(probs, labels, threshold)


def main(args):
    # ------------------------------------------------------------------ load
    try:
        pairs = load_pairs(args.data_path, args.prompt_dir)
        template = load_reward_prompt(args.prompt_dir)
    except (ValueError, PromptError, json.JSONDecodeError) as err:
        sys.exit(f"error: {err}")
    if len(pairs) < 2:
        sys.exit(f"error: {len(pairs)} training pair(s) in {args.data_path}; need at least 2")

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision="bf16" if args.bf16 and bf16_supported() else "no",
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    random.Random(args.seed).shuffle(pairs)
    n_eval = min(args.max_eval, math.ceil(args.eval_fraction * len(pairs))) if args.eval_fraction > 0 else 0
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    accelerator.print(
        f"{len(pairs)} pairs ({sum(p['label'] for p in pairs)} labelled correct): "
        f"{len(train_pairs)} train, {len(eval_pairs)} held out"
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    pad_id = distinct_pad_id(tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_name_or_path, num_labels=2, attn_implementation=attn_implementation()
    )
    model.config.pad_token_id = pad_id
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    def encode(subset):
        return [
            (
                verifier_input_ids(tokenizer, template, p["response"], p["reference"], args.max_length),
                p["label"],
            )
            for p in subset
        ]

    def collate(batch):
        input_ids, attention_mask = pad_batch([ids for ids, _ in batch], pad_id, "cpu")
        return input_ids, attention_mask, torch.tensor([label for _, label in batch])

    train_loader = DataLoader(
        encode(train_pairs), args.per_device_train_batch_size, shuffle=True, collate_fn=collate
    )
    eval_loader = DataLoader(encode(eval_pairs), args.per_device_eval_batch_size, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    # Counted over the whole data set: accelerate steps a prepared scheduler once per process per update.
    updates = args.num_epochs * math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * updates), updates)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )

    output_dir = Path(args.output_dir)
    state_dir, metrics_path = output_dir / STATE_DIR, output_dir / "verifier_metrics.jsonl"
    start_epoch = 0
    if (state_dir / "epoch.json").is_file():
        start_epoch = json.loads((state_dir / "epoch.json").read_text())["epochs_done"]
        accelerator.load_state(state_dir / f"epoch-{start_epoch}")
        accelerator.print(f"resuming from {state_dir} after epoch {start_epoch}")
        if accelerator.is_main_process:
            drop_logged_after(metrics_path, "epoch", start_epoch)
    if accelerator.is_main_process:
        save_args(output_dir / "train_verifier_args.json", args)

    def log(epoch, metrics):
        accelerator.print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if accelerator.is_main_process:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")

    # ------------------------------------------------------------------ train
    if eval_pairs and start_epoch == 0:
        log(0, {f"eval_{k}": v for k, v in evaluate(model, eval_loader, accelerator, args.threshold).items()})
    model.train()
    for epoch in range(start_epoch, args.num_epochs):
        train_loader.set_epoch(epoch)
        losses = []
        for input_ids, attention_mask, labels in tqdm(
            train_loader, desc=f"epoch {epoch + 1}/{args.num_epochs}", disable=not accelerator.is_main_process
        ):
            with accelerator.accumulate(model):
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.item())
        metrics = {"train_loss": sum(losses) / max(len(losses), 1), "lr": scheduler.get_last_lr()[0]}
        if eval_pairs:
            metrics |= {
                f"eval_{k}": v for k, v in evaluate(model, eval_loader, accelerator, args.threshold).items()
            }
        log(epoch + 1, metrics)
        # Each epoch's state goes to a folder of its own, named in epoch.json only once every process has
        # written its part: a kill during the save leaves the previous epoch's state whole.
        accelerator.save_state(state_dir / f"epoch-{epoch + 1}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(state_dir / "epoch.json", {"epochs_done": epoch + 1})
            shutil.rmtree(state_dir / f"epoch-{epoch}", ignore_errors=True)

    # ------------------------------------------------------------------ save
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, state_dict=accelerator.get_state_dict(model)
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(output_dir)
        # The optimizer state is only for resuming an interrupted run, and is several times the model's size.
        shutil.rmtree(state_dir, ignore_errors=True)
        accelerator.print(f"saved the verifier to {output_dir}; use --reward_model_path {output_dir}")


if __name__ == "__main__":
    main(parse_args())
