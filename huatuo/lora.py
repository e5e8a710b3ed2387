"""LoRA adapters (peft) for SFT and RL: the adapter settings from the flags, and checkpoints that stay servable.

A LoRA run trains small low-rank updates W + (alpha / r) * B @ A on frozen base weights. Every model folder it
writes is still a full Hugging Face model (the update merged into the weights, so AutoModelForCausalLM, SGLang,
vLLM and `transformers serve` load it as they load a full fine-tune), with the adapter alone saved beside it in
adapter/ for anyone who wants only that. The merge is done on a copy of the state dict, never on the live
weights: merging in place and unmerging would round the base weights on every save and break exact resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import is_peft_model

from huatuo.checkpoints import is_zero3, state_dict_on_main

ADAPTER_SUBDIR = "adapter"
ALL_LINEAR = "all-linear"
_PEFT_PREFIX = "base_model.model."
_ADAPTER = "default"

HELP = {
    "lora_r": "LoRA rank. 0 (the default) trains every weight, as the original; R > 0 trains a rank-R adapter "
    "on frozen base weights, and every saved model folder holds the merged weights plus the adapter in adapter/. "
    "LoRA usually wants a larger --learning_rate than full training (1e-4 is common).",
    "lora_alpha": "LoRA scale numerator: the update is (alpha / r) * B @ A. Default: 2 x --lora_r.",
    "lora_dropout": "Dropout on the adapter's input during training.",
    "lora_target_modules": "Module names that get an adapter (e.g. q_proj k_proj v_proj o_proj), or all-linear "
    "for every linear layer except the output head.",
}


@dataclass
class LoraArguments:
    """The LoRA flags of RL_stage2.py (SFT_stage1.py adds the same ones with add_lora_arguments)."""

    _argument_group_name = "LoRA (parameter-efficient training)"

    lora_r: int = field(default=0, metadata={"help": HELP["lora_r"]})
    lora_alpha: float | None = field(default=None, metadata={"help": HELP["lora_alpha"]})
    lora_dropout: float = field(default=0.05, metadata={"help": HELP["lora_dropout"]})
    lora_target_modules: list[str] = field(
        default_factory=lambda: [ALL_LINEAR], metadata={"help": HELP["lora_target_modules"]}
    )


def add_lora_arguments(parser) -> None:
    """The LoRA flags, for a plain argparse parser."""
    group = parser.add_argument_group(LoraArguments._argument_group_name)
    group.add_argument("--lora_r", type=int, default=0, help=HELP["lora_r"])
    group.add_argument("--lora_alpha", type=float, default=None, help=HELP["lora_alpha"])
    group.add_argument("--lora_dropout", type=float, default=0.05, help=HELP["lora_dropout"])
    group.add_argument(
        "--lora_target_modules", nargs="+", default=[ALL_LINEAR], help=HELP["lora_target_modules"]
    )


def check_lora_arguments(args) -> None:
    """Raise ValueError naming the flag when a LoRA setting cannot work."""
    if args.lora_r < 0:
        raise ValueError(f"--lora_r must be 0 (full training) or a positive rank, got {args.lora_r}")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise ValueError(f"--lora_alpha must be positive, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if not args.lora_target_modules:
        raise ValueError("--lora_target_modules needs at least one module name, or all-linear")


def lora_config(args, task_type: str = "CAUSAL_LM"):
    """The peft LoraConfig for the flags. task_type SEQ_CLS (the PPO value model) trains the score head in full."""
    from peft import LoraConfig

    check_lora_arguments(args)
    targets = list(args.lora_target_modules)
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        task_type=task_type,
    )


# ==========================================================================================
# Merge on save
# ==========================================================================================
def merged_state_dict(peft_model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with each LoRA update folded into its weight.

    `state_dict` is the full state dict of `peft_model` (as accelerate's get_state_dict gathers it, also under
    ZeRO-3). Merged weights are computed on their own device and kept on the CPU, so a save does not hold a
    second copy of the model on the GPU. Modules that peft trains in full (modules_to_save, such as the value
    model's score head) keep their trained copy.
    """
    base, lora = {}, {}
    for key, value in state_dict.items():
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"{key!r} is not a key of a peft model's state dict")
        key = key[len(_PEFT_PREFIX) :]
        if f".lora_A.{_ADAPTER}." in key or f".lora_B.{_ADAPTER}." in key:
            module, part = key.split(f".{_ADAPTER}.")[0].rsplit(".", 1)
            lora.setdefault(module, {})[part] = value
        elif ".original_module." in key:
            continue  # the frozen copy of a module trained in full
        elif f".modules_to_save.{_ADAPTER}." in key:
            base[key.replace(f".modules_to_save.{_ADAPTER}.", ".")] = value
        elif ".base_layer." in key:
            base[key.replace(".base_layer.", ".")] = value
        elif "lora_" in key or "trainable_tokens" in key:
            raise ValueError(f"cannot merge {key!r}: only LoRA on linear layers is supported here")
        else:
            base[key] = value
    model = peft_model.get_base_model()
    for module_name, parts in lora.items():
        layer = model.get_submodule(module_name)
        weight = base[f"{module_name}.weight"]
        delta = parts["lora_B"].to(weight.device, torch.float32) @ parts["lora_A"].to(
            weight.device, torch.float32
        )
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        merged = weight.float() + layer.scaling[_ADAPTER] * delta
        base[f"{module_name}.weight"] = merged.to(weight.dtype).cpu()
    return base


def save_merged(peft_model, state_dict: dict[str, torch.Tensor], model_dir, adapter_dir) -> None:
    """Write the merged model to model_dir and the adapter alone to adapter_dir (main process only)."""
    peft_model.get_base_model().save_pretrained(
        model_dir, state_dict=merged_state_dict(peft_model, state_dict)
    )
    peft_model.save_pretrained(adapter_dir, state_dict=state_dict)


class MergedLoraSaveMixin:
    """For transformers Trainer subclasses: with a peft model, every save (checkpoints and the final model)
    writes the merged model plus adapter/, and resuming reads the adapter back. Every save builds the full state
    dict on the main process only, except under ZeRO-3, where gathering it takes every process."""

    def adapter_dir(self, model_dir: Path) -> Path:
        return Path(model_dir) / ADAPTER_SUBDIR

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        peft = is_peft_model(self.model)
        # The stock save is right for a full model except under ZeRO-2, where it clones the weights on every
        # process and writes them from one.
        zero2 = self.is_deepspeed_enabled and not is_zero3(self.accelerator)
        if not peft and not zero2:
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = Path(output_dir or self.args.output_dir)
        # The full state dict: the stock save gathers only the adapter under ZeRO-3, too little to merge.
        state_dict = state_dict_on_main(
            self.accelerator, self.deepspeed if self.is_deepspeed_enabled else self.model
        )
        if not self.accelerator.is_main_process:
            return
        if not peft:
            self._save(str(output_dir), state_dict=state_dict)
            return
        save_merged(self.model, state_dict, output_dir, self.adapter_dir(output_dir))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if is_peft_model(model if model is not None else self.model):
            resume_from_checkpoint = os.fspath(self.adapter_dir(Path(resume_from_checkpoint)))
        super()._load_from_checkpoint(resume_from_checkpoint, model)
