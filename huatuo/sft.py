"""Training mechanics of the SFT stage, on top of TRL's SFTTrainer.

What this adds to the stock trainer:
- the original checkpoint layout, `<run dir>/checkpoint-<epoch>-<global_step>/`, with the servable model and
  tokenizer in `tfmr/` and the training position (optimizer, scheduler, RNG, trainer state) beside it;
  `<epoch>` is the 0-based epoch the step belongs to; only the newest `max_ckpts` complete checkpoints are kept;
- a checkpoint every `save_steps` optimizer steps on top of the one at each epoch end;
- supervised and total tokens per second, and a plain `metrics.jsonl` with one line per logging step;
- on a CPU, the loss from the model's own head over the full logits (TRL's fused, tiled head is made for
  Triton GPUs and halves the step's speed without them), token accuracy logged as TRL logs it;
- with a LoRA adapter (peft_config), tfmr/ holds the merged model and the adapter alone goes to adapter/ beside it;
- `sdpa_varlen`, an attention for padding-free batches without flash-attn (CPU): PyTorch's causal sdpa kernel
  run on each example of the packed row, so no example attends to another and no masked kernel spans the row.

A checkpoint is complete once its `trainer_state.json` exists: it is written last, so a run killed while
saving leaves an incomplete folder that resuming ignores and the next rotation removes.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import AttentionInterface, Trainer, TrainerCallback
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.trainer_callback import ExportableState
from trl import SFTTrainer

from huatuo.lora import ADAPTER_SUBDIR, MergedLoraSaveMixin
from huatuo.report import read_jsonl

IGNORE_INDEX = -100
STATE_FILE = "trainer_state.json"
MODEL_SUBDIR = "tfmr"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)-(\d+)$")
# Devices where TRL's fused LM head runs its Triton kernels (see SFTStage1Trainer._full_logits_loss).
FUSED_HEAD_DEVICES = ("cuda", "xpu")


def varlen_sdpa_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """Causal sdpa per example of a padding-free row (sequence bounds from the collator's cu_seq_lens_q)."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    outputs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register("sdpa_varlen", varlen_sdpa_attention)
AttentionMaskInterface.register("sdpa_varlen", sdpa_mask)


def list_checkpoints(run_dir, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders under run_dir, oldest first (by global step)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (not complete_only or (path / STATE_FILE).is_file()):
            found.append((int(match.group(2)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def rotate_checkpoints(run_dir, max_ckpts: int) -> None:
    """Keep the newest max_ckpts complete checkpoints; drop older ones and incomplete leftovers before them."""
    complete = list_checkpoints(run_dir)
    keep = set(complete[-max_ckpts:])
    newest_step = int(_CHECKPOINT_RE.match(complete[-1].name).group(2)) if complete else -1
    for path in list_checkpoints(run_dir, complete_only=False):
        step = int(_CHECKPOINT_RE.match(path.name).group(2))
        if path not in keep and step <= newest_step:
            shutil.rmtree(path, ignore_errors=True)


def truncate_metrics(path, last_step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint so the file reads as one run."""
    path = Path(path)
    if not path.is_file():
        return
    # read_jsonl drops a last line cut short by the kill that interrupted the run
    kept = [row for row in read_jsonl(path) if row["step"] <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    os.replace(tmp, path)


class SaveEveryStepsCallback(TrainerCallback):
    """Ask for a checkpoint every `save_steps` optimizer steps; the epoch-end ones come from save_strategy."""

    def __init__(self, save_steps: int):
        self.save_steps = save_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.save_steps == 0:
            control.should_save = True
        return control


class MetricsFileCallback(TrainerCallback):
    """Append one JSON line per training log to `path`, on the main process only."""

    def __init__(self, path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {
            "step": state.global_step,
            "epoch": round(logs.get("epoch", state.epoch or 0.0), 4),
            "loss": logs["loss"],
            "token_accuracy": logs.get("mean_token_accuracy"),
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_per_second": logs.get("tokens_per_second"),
            "supervised_tokens_per_second": logs.get("supervised_tokens_per_second"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class SFTStage1Trainer(MergedLoraSaveMixin, SFTTrainer):
    """SFTTrainer with the stage's checkpoint layout and throughput logging (see the module docstring)."""

    def __init__(self, *args, max_ckpts: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_ckpts = max_ckpts
        self._last_saved_step = None
        # Supervised and total tokens of this process since the last log, and supervised tokens of this
        # session; kept on the device so that counting adds no host sync to a step.
        self._token_counts = torch.zeros(2, dtype=torch.long, device=self.args.device)
        self._supervised_total = torch.zeros((), dtype=torch.long, device=self.args.device)
        self._last_log_time = None

    # ---- throughput ----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            if self._last_log_time is None:
                self._last_log_time = time.perf_counter()
            # Position 0 of a row predicts nothing, so only later labels count as supervised tokens.
            supervised = (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()
            mask = inputs.get("attention_mask")
            total = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
            self._token_counts += torch.stack([supervised, total.to(supervised.device)]).to(
                self._token_counts.device
            )
            self._supervised_total += supervised.to(self._supervised_total.device)
        if self.args.device.type in FUSED_HEAD_DEVICES:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        return self._full_logits_loss(model, inputs, return_outputs, num_items_in_batch)

    def _full_logits_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The model's own head and cross-entropy, with token accuracy logged as TRL logs it.

        TRL's fused LM head scores the vocabulary in tiles so that long GPU batches never hold the full logits;
        without its Triton kernels (on a CPU) each tile is folded by a dozen small fp32 torch ops, twice, and
        the step ran at half the speed of a plain forward and backward here. On a CPU the full logits fit."""
        mode = "train" if model.training else "eval"
        loss, outputs = Trainer.compute_loss(
            self,
            model,
            {**inputs, "use_cache": False},
            return_outputs=True,
            num_items_in_batch=num_items_in_batch,
        )
        labels = inputs["labels"][..., 1:]
        mask = labels != IGNORE_INDEX
        correct = (outputs.logits[..., :-1, :].argmax(dim=-1) == labels) & mask
        counts = self.accelerator.gather_for_metrics(torch.stack([correct.sum(), mask.sum()])[None]).sum(
            dim=0
        )
        self._metrics[mode]["mean_token_accuracy"].append((counts[0] / counts[1].clamp(min=1)).item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._last_log_time is not None:
            counts = self.accelerator.reduce(self._token_counts.clone(), reduction="sum").cpu()
            now = time.perf_counter()
            elapsed = max(now - self._last_log_time, 1e-9)
            logs["supervised_tokens_per_second"] = round(counts[0].item() / elapsed, 1)
            logs["tokens_per_second"] = round(counts[1].item() / elapsed, 1)
            self._token_counts.zero_()
            self._last_log_time = now
        super().log(logs, start_time)

    def supervised_tokens_seen(self) -> int:
        """Supervised tokens trained on by all processes in this session (a collective call)."""
        return int(self.accelerator.reduce(self._supervised_total.clone(), reduction="sum").item())

    # ---- checkpoints ----
    def adapter_dir(self, model_dir: Path) -> Path:
        return Path(model_dir).parent / ADAPTER_SUBDIR  # checkpoint-*/adapter beside checkpoint-*/tfmr

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        if step == self._last_saved_step:  # a --save_steps save that fell on an epoch end
            return
        steps_per_epoch = max(self.state.max_steps // max(int(self.args.num_train_epochs), 1), 1)
        folder = Path(self.args.output_dir) / f"checkpoint-{(step - 1) // steps_per_epoch}-{step}"
        self.store_flos()
        self.save_model(str(folder / MODEL_SUBDIR), _internal_call=True)
        self._save_optimizer_and_scheduler(str(folder))
        self._save_scaler(str(folder))
        self._save_rng_state(str(folder))
        # Every process writes its RNG state (and ZeRO shards) here; mark the folder complete after all have.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            for cb in self.callback_handler.callbacks + [self.control]:
                if isinstance(cb, ExportableState):
                    self.state.stateful_callbacks[cb.__class__.__name__] = cb.state()
            self.state.save_to_json(str(folder / STATE_FILE))
            rotate_checkpoints(self.args.output_dir, self.max_ckpts)
        self._last_saved_step = step

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # The weights live in tfmr/; optimizer, scheduler and RNG state are read from the folder itself.
        super()._load_from_checkpoint(os.path.join(resume_from_checkpoint, MODEL_SUBDIR), model)
