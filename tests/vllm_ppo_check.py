"""Runs stage 2 through RL_stage2.py with --rollout_backend vllm, then records what the engine holds afterwards.

    python tests/vllm_ppo_check.py RESULT.json -- <RL_stage2.py flags>

The tests run it in a child process of its own: a colocated vLLM engine sets up torch.distributed and process-wide
environment in the process that builds it. RESULT.json receives a few held-out prompts with the engine's greedy
continuation of each (to be checked against the saved policy) and, for a LoRA policy, whether every frozen base
weight still equals the one on disk bit for bit after the weight syncs. Under `accelerate launch` with several
processes each writes RESULT.rank<N>.json for its own engine.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_file
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


def main(result_path: str, flags: list[str]) -> None:
    args = RL_stage2.parse_args(flags)
    trainer = RL_stage2.main(args)
    prompts = [row["input_ids"] for row in (trainer.eval_dataset or trainer.train_dataset)[:3]]
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS)
    outputs = trainer.vllm.llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts], sampling_params=params, use_tqdm=False
    )
    result = {"prompts": prompts, "engine": [list(out.outputs[0].token_ids) for out in outputs]}
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    if is_peft_model(policy) and not trainer.is_zero3:
        result["base_untouched"] = base_weights_untouched(policy, Path(args[1].model_name_or_path))
    acc = trainer.accelerator
    path = Path(result_path)
    if acc.num_processes > 1:  # every process has an engine of its own
        path = path.with_suffix(f".rank{acc.process_index}.json")
    path.write_text(json.dumps(result))


if __name__ == "__main__":
    separator = sys.argv.index("--")
    main(sys.argv[1], sys.argv[separator + 1 :])
