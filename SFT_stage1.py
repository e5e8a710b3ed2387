"""Stage 1b: supervised fine-tuning on complex chains of thought.

Each example is one chat: the user asks `Question`, the assistant answers
`## Thinking\\n\\n{Complex_CoT}\\n\\n## Final Response\\n\\n{Response}`, rendered with the tokenizer's chat template
(a Llama-3 template when the tokenizer has none). The loss falls on the assistant's tokens only, its
end-of-turn token included; a sequence longer than --max_seq_len keeps its last tokens.

8 GPUs, ZeRO-3 without offload (global batch 8 x 2 x 8 = 128; the original offloaded optimizer and parameters
to CPU memory, which configs/deepspeed_zero3_offload.yaml still does for smaller GPUs):
    accelerate launch --config_file configs/deepspeed_zero3.yaml --num_processes 8 SFT_stage1.py \\
        --model_path meta-llama/Llama-3.1-8B-Instruct \\
        --data_path FreedomIntelligence/medical-o1-reasoning-SFT --data_config en --gradient_checkpointing
Two nodes: configs/multi_node.yaml (set machine_rank and main_process_ip on each node). Smaller models:
configs/deepspeed_zero2.yaml. ZeRO-3 with 2 processes on a CPU (the multi-process path, tiny model):
configs/cpu_zero3_2proc.yaml. One GPU or a CPU (tiny offline model: python -m huatuo.tiny --out_dir tiny_models):
    python SFT_stage1.py --model_path tiny_models/policy --data_path data/demo_data.json --packing
    accelerate launch --config_file configs/cpu.yaml SFT_stage1.py --model_path tiny_models/policy
Under ZeRO-3 the model is created already partitioned (the SFTConfig exists before from_pretrained); each
checkpoint gathers the full weights into tfmr/ (the config must set zero3_save_16bit_model) and keeps the ZeRO
shards (global_step*/) beside it for --resume. CPU offload of the optimizer (deepspeed_zero3_offload.yaml,
multi_node.yaml) compiles DeepSpeed's CPUAdam op on first use (a minute or more); a build killed midway leaves a
`lock` file in ~/.cache/torch_extensions/*/cpu_adam/ that makes every later run wait for it: delete that folder to
rebuild.
Resume an interrupted run (same flags plus --resume):
    python SFT_stage1.py --model_path ... --data_path ... --resume
LoRA instead of full training (an 8B model on two 24 GB GPUs, with CPU offload; LoRA wants a larger learning
rate):
    accelerate launch --config_file configs/deepspeed_zero3_offload.yaml --num_processes 2 SFT_stage1.py \\
        --model_path meta-llama/Llama-3.1-8B-Instruct --data_path data/medical_o1_sft_en.json \\
        --gradient_checkpointing --packing --lora_r 16 --learning_rate 1e-4

Outputs: <output_dir>/<experiment_name>/checkpoint-<epoch>-<global_step>/tfmr (model + tokenizer, loadable by
AutoModelForCausalLM and servable; with --lora_r the adapter merged in, and the adapter alone in adapter/ beside
it), with the training position beside tfmr/; <log_dir>/<experiment_name>/:
metrics.jsonl (one line per logging step), args.json, examples.json (--dump_examples), wandb/ (offline).
"""

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from huatuo.lora import add_lora_arguments, check_lora_arguments, lora_config
from huatuo.models import (
    attn_implementation,
    bf16_by_default,
    ensure_chat_template,
    ensure_pad_token,
    format_thinking_response,
    load_records,
    stop_on_eos,
)
from huatuo.sft import (
    IGNORE_INDEX,
    MetricsFileCallback,
    SaveEveryStepsCallback,
    SFTStage1Trainer,
    latest_checkpoint,
    list_checkpoints,
    truncate_metrics,
)
from huatuo.store import save_args, write_json_atomic

SFT_KEYS = ("Question", "Complex_CoT", "Response")
logger = logging.getLogger("sft_stage1")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    data = parser.add_argument_group("model and data")
    data.add_argument(
        "--model_path", required=True, help="Base model: a local folder or a Hugging Face model id."
    )
    data.add_argument(
        "--data_path",
        default="data/demo_data.json",
        help="SFT data with Question, Complex_CoT, Response: a .json/.jsonl/.parquet file, a folder "
        "written by `datasets`, or a Hugging Face dataset id.",
    )
    data.add_argument(
        "--data_config",
        default=None,
        help="Dataset config of a hub id (en, zh, en_mix, zh_mix for the released data).",
    )
    data.add_argument("--data_split", default="train", help="Split to train on.")
    data.add_argument("--max_seq_len", type=int, default=8192, help="Longer examples keep their last tokens.")
    data.add_argument(
        "--dump_examples",
        type=int,
        default=0,
        help="Write the first N tokenized examples to <log_dir>/<experiment_name>/examples.json.",
    )

    out = parser.add_argument_group("outputs and logging")
    out.add_argument(
        "--experiment_name", default="sft_stage1", help="Subfolder of --output_dir and --log_dir."
    )
    out.add_argument(
        "--output_dir", default="./ckpts", help="Checkpoints go to <output_dir>/<experiment_name>."
    )
    out.add_argument("--log_dir", default="./train_logs", help="Logs go to <log_dir>/<experiment_name>.")
    out.add_argument("--max_ckpts", type=int, default=2, help="Keep only the newest N checkpoints.")
    out.add_argument(
        "--save_steps",
        type=int,
        default=0,
        help="Also save every N optimizer steps (0: only at the end of each epoch).",
    )
    out.add_argument(
        "--resume",
        action="store_true",
        help="Continue from the newest checkpoint of this experiment (starts fresh if there is none).",
    )
    out.add_argument("--logging_steps", type=int, default=1, help="Log every N optimizer steps.")
    out.add_argument(
        "--report_to",
        choices=["wandb", "none"],
        default="wandb",
        help="wandb runs offline unless WANDB_MODE says otherwise; metrics.jsonl is always written.",
    )

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--n_epochs", type=int, default=3, help="Passes over the data.")
    opt.add_argument("--train_bsz_per_gpu", type=int, default=2, help="Examples per process per micro-batch.")
    opt.add_argument(
        "--gradient_accumulation_steps", type=int, default=8, help="Micro-batches per optimizer step."
    )
    opt.add_argument("--learning_rate", type=float, default=5e-6, help="Peak learning rate (AdamW).")
    opt.add_argument(
        "--weight_decay", type=float, default=0.1, help="AdamW decay; biases and norm weights get none."
    )
    opt.add_argument(
        "--warmup_rates",
        type=float,
        default=0.05,
        help="Fraction of steps warming up before the cosine decay.",
    )
    opt.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 disables it).")
    opt.add_argument(
        "--gradient_checkpointing", action="store_true", help="Recompute activations to save memory."
    )
    opt.add_argument(
        "--packing",
        action="store_true",
        help="Padding-free batches: each micro-batch is one row, examples separated by position ids, with no "
        "attention across examples (flash-attention's varlen kernels where installed, else sdpa run per example). "
        "Same batches and loss as without it, fewer wasted tokens.",
    )
    opt.add_argument("--seed", type=int, default=42, help="Seed for data order and initialisation.")
    add_lora_arguments(parser)
    args = parser.parse_args(argv)
    try:
        check_lora_arguments(args)
    except ValueError as err:
        parser.error(str(err))
    for name in (
        "max_seq_len",
        "max_ckpts",
        "n_epochs",
        "train_bsz_per_gpu",
        "gradient_accumulation_steps",
        "logging_steps",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0 <= args.warmup_rates < 1:
        parser.error("--warmup_rates is a fraction of the training steps, in [0, 1)")
    return args


def check_zero3_saves_full_weights(deepspeed_config: dict | None) -> None:
    """Refuse a ZeRO-3 run whose checkpoints would hold only weight partitions.

    Under ZeRO-3 each process keeps a slice of every weight; only stage3_gather_16bit_weights_on_model_save
    makes the save gather them, so that each tfmr/ is a full model AutoModelForCausalLM and a server can load.
    """
    zero = (deepspeed_config or {}).get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ValueError(
            "ZeRO-3 without gathered saves would leave every checkpoint's tfmr/ without weights: set "
            "zero3_save_16bit_model: true in the accelerate config (as configs/deepspeed_zero3.yaml does), or "
            "stage3_gather_16bit_weights_on_model_save: true in a DeepSpeed JSON config"
        )


def select_valid(dataset, source: str):
    """Keep items whose Question, Complex_CoT and Response are non-empty strings; warn once about the rest."""
    if not len(dataset):
        raise ValueError(f"{source}: no items to train on")
    columns = {
        key: dataset[key] if key in dataset.column_names else [None] * len(dataset) for key in SFT_KEYS
    }
    if all(all(columns[k][i] is None for k in SFT_KEYS) for i in range(len(dataset))):
        raise ValueError(
            f"{source}: none of its {len(dataset)} items has any of the SFT keys {', '.join(SFT_KEYS)}; "
            "point --data_path at the output of the search stage or at medical-o1-reasoning-SFT"
        )
    keep, problems = [], []
    for i in range(len(dataset)):
        bad = next(
            (k for k in SFT_KEYS if not isinstance(columns[k][i], str) or not columns[k][i].strip()), None
        )
        if bad is None:
            keep.append(i)
        else:
            problems.append(f"item {i} field {bad!r}")
    if not keep:
        raise ValueError(
            f"{source}: none of the {len(dataset)} items has non-empty {', '.join(SFT_KEYS)} (first: {problems[0]})"
        )
    if problems:
        logger.warning(
            "skipped %d of %d items with a missing or empty field (%s%s)",
            len(problems),
            len(dataset),
            "; ".join(problems[:3]),
            "; ..." if len(problems) > 3 else "",
        )
    return dataset.select(keep) if problems else dataset


def tokenize_batch(batch, tokenizer, max_seq_len: int) -> dict:
    """Render each chat, mask the prompt with IGNORE_INDEX and keep the last max_seq_len tokens.

    The prompt and the assistant part are tokenized separately so the mask boundary is exact whatever
    the tokenizer merges across it.
    """
    prompts, answers = [], []
    for question, cot, response in zip(
        batch["Question"], batch["Complex_CoT"], batch["Response"], strict=True
    ):
        user = [{"role": "user", "content": question}]
        chat = user + [{"role": "assistant", "content": format_thinking_response(cot, response)}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(chat, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template renders the user turn differently with and without the assistant "
                "turn, so the prompt cannot be masked; use a template whose generation prompt is a prefix"
            )
        prompts.append(prompt)
        answers.append(full[len(prompt) :])
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    input_ids, labels = [], []
    for p, a in zip(prompt_ids, answer_ids, strict=True):
        input_ids.append((p + a)[-max_seq_len:])
        labels.append(([IGNORE_INDEX] * len(p) + a)[-max_seq_len:])
    return {"input_ids": input_ids, "labels": labels}


def dump_examples(dataset, tokenizer, n: int, path: Path) -> None:
    rows = []
    for example in dataset.select(range(min(n, len(dataset)))):
        supervised = [t for t in example["labels"] if t != IGNORE_INDEX]
        rows.append(
            {
                "input_ids": example["input_ids"],
                "labels": example["labels"],
                "text": tokenizer.decode(example["input_ids"]),
                "supervised_text": tokenizer.decode(supervised),
            }
        )
    write_json_atomic(path, rows)


def main(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_dir = Path(args.output_dir) / args.experiment_name
    log_dir = Path(args.log_dir) / args.experiment_name
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(log_dir))
    os.environ.setdefault("WANDB_PROJECT", "huatuo-o1")

    # ------------------------------------------------------------------ load
    records = load_records(args.data_path, args.data_config, args.data_split, columns=list(SFT_KEYS))
    records = select_valid(records, args.data_path)
    if not args.resume and list_checkpoints(run_dir, complete_only=False):
        raise ValueError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose "
            "another --experiment_name or --output_dir (nothing is overwritten)"
        )

    config = SFTConfig(  # created before the model so that ZeRO-3 can partition it while loading
        output_dir=str(run_dir),
        run_name=args.experiment_name,
        num_train_epochs=args.n_epochs,
        per_device_train_batch_size=args.train_bsz_per_gpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_rates,
        max_grad_norm=args.max_grad_norm,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=bf16_by_default(),
        use_cpu=not torch.cuda.is_available(),  # also makes processes started by torchrun join over gloo
        seed=args.seed,
        data_seed=args.seed,
        padding_free=args.packing,
        max_length=None,  # examples are truncated above, keeping their ends
        dataset_kwargs={"skip_prepare_dataset": True},
        save_strategy="epoch",
        save_total_limit=None,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        report_to=[] if args.report_to == "none" else ["wandb"],
    )
    if config.deepspeed_plugin is not None:
        check_zero3_saves_full_weights(config.deepspeed_plugin.deepspeed_config)

    tokenizer = ensure_pad_token(ensure_chat_template(AutoTokenizer.from_pretrained(args.model_path)))
    with config.main_process_first(desc="tokenizing"):
        dataset = records.map(
            tokenize_batch,
            batched=True,
            remove_columns=records.column_names,
            fn_kwargs={"tokenizer": tokenizer, "max_seq_len": args.max_seq_len},
            desc="tokenizing",
        )
    if config.process_index == 0:
        save_args(run_dir / "args.json", args)
        save_args(log_dir / "args.json", args)
        if args.dump_examples:
            dump_examples(dataset, tokenizer, args.dump_examples, log_dir / "examples.json")
    logger.info("%d examples from %s", len(dataset), args.data_path)

    attention = attn_implementation()
    if args.packing and attention == "sdpa":
        attention = "sdpa_varlen"  # per-example causal sdpa on the packed row (huatuo/sft.py)
    # fp32 master weights; bf16 compute comes from autocast or DeepSpeed's bf16 mode.
    model = AutoModelForCausalLM.from_pretrained(
        args.model_path, dtype=torch.float32, attn_implementation=attention
    )
    stop_on_eos(model, tokenizer)
    callbacks = [MetricsFileCallback(log_dir / "metrics.jsonl")]
    if args.save_steps:
        callbacks.append(SaveEveryStepsCallback(args.save_steps))
    trainer = SFTStage1Trainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        max_ckpts=args.max_ckpts,
        peft_config=lora_config(args) if args.lora_r else None,
    )

    # ------------------------------------------------------------------ train
    checkpoint = latest_checkpoint(run_dir) if args.resume else None
    if args.resume and checkpoint is None:
        logger.info("no complete checkpoint in %s; starting from scratch", run_dir)
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
        if trainer.is_world_process_zero():
            step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
            truncate_metrics(log_dir / "metrics.jsonl", step)
    elif trainer.is_world_process_zero() and (log_dir / "metrics.jsonl").exists():
        (log_dir / "metrics.jsonl").unlink()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    # ------------------------------------------------------------------ report
    result.metrics["supervised_tokens_per_second"] = round(
        trainer.supervised_tokens_seen() / result.metrics["train_runtime"], 1
    )
    if trainer.is_world_process_zero():
        final = latest_checkpoint(run_dir)
        logger.info("done: %s", json.dumps(result.metrics))
        logger.info("final model: %s", final / "tfmr" if final else "none saved")
    return result


if __name__ == "__main__":
    main(parse_args())
