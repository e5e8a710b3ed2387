"""Runs stage 2 through RL_stage2.py with --rollout_backend vllm, then records what the engine holds afterwards.

    python tests/vllm_ppo_check.py RESULT.json -- <RL_stage2.py flags>

The tests run it in a child process of its own: a colocated vLLM engine sets up torch.distributed and process-wide
environment in the process that builds it. RESULT.json receives a few held-out prompts with the engine's greedy
continuation of each, to be checked against the saved policy. Under `accelerate launch` with several
processes each writes RESULT.rank<N>.json for its own engine.
"""

import json
import sys
from pathlib import Path

from vllm import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import RL_stage2  # noqa: E402

GREEDY_TOKENS = 12


def main(result_path: str, flags: list[str]) -> None:
    args = RL_stage2.parse_args(flags)
    trainer = RL_stage2.main(args)
    prompts = [row["input_ids"] for row in (trainer.eval_dataset or trainer.train_dataset)[:3]]
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS)
    outputs = trainer.vllm.llm.generate(
        [{"prompt_token_ids": ids} for ids in prompts], sampling_params=params, use_tqdm=False
    )
    result = {"prompts": prompts, "engine": [list(out.outputs[0].token_ids) for out in outputs]}
    acc = trainer.accelerator
    path = Path(result_path)
    if acc.num_processes > 1:  # every process has an engine of its own
        path = path.with_suffix(f".rank{acc.process_index}.json")
    path.write_text(json.dumps(result))


if __name__ == "__main__":
    separator = sys.argv.index("--")
    main(sys.argv[1], sys.argv[separator + 1 :])
