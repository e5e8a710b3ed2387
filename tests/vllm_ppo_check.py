"""Runs PPO through RL_stage2.py with --rollout_backend vllm, then compares the engine with the trained policy.

    python tests/vllm_ppo_check.py RESULT.json -- <RL_stage2.py flags>

The tests run it in a child process of its own: a colocated vLLM engine sets up torch.distributed and process-wide
environment in the process that builds it. RESULT.json receives, for a few held-out prompts, the engine's greedy
continuation and the policy's (transformers generate), and, for a LoRA policy, whether every frozen base weight
still equals the one on disk bit for bit.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from vllm import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import RL_stage2  # noqa: E402

GREEDY_TOKENS = 12


def base_weights_untouched(policy, model_dir: Path) -> bool:
    on_disk = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        on_disk.update(load_file(shard))
    for name, param in policy.named_parameters():
        if "lora_" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key in on_disk and not torch.equal(param.detach().cpu(), on_disk[key].to(param.dtype)):
            return False
    return True


@torch.no_grad()
def greedy(model, ids: list[int], trainer) -> list[int]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            eos_token_id=trainer.stop_token_ids,
            pad_token_id=trainer.pad_id,
        )
    return out[0, len(ids) :].tolist()


def main(result_path: str, flags: list[str]) -> None:
    args = RL_stage2.parse_args(flags)
    trainer = RL_stage2.main(args)
    policy = trainer.accelerator.unwrap_model(trainer.model).policy.eval()
    prompts = [row["input_ids"] for row in (trainer.eval_dataset or trainer.train_dataset)[:3]]
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS)
    outputs = trainer.vllm.llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts], sampling_params=params, use_tqdm=False
    )
    engine = [list(out.outputs[0].token_ids) for out in outputs]
    reference = [greedy(policy, ids, trainer) for ids in prompts]
    base = AutoModelForCausalLM.from_pretrained(args[1].model_name_or_path, dtype=torch.bfloat16).eval()
    result = {"engine": engine, "policy": reference, "base": [greedy(base, ids, trainer) for ids in prompts]}
    if is_peft_model(policy):
        result["base_untouched"] = base_weights_untouched(policy, Path(args[1].model_name_or_path))
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    separator = sys.argv.index("--")
    main(sys.argv[1], sys.argv[separator + 1 :])
