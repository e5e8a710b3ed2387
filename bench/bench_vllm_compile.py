"""vLLM on this CPU, compiled (its default) against uncompiled (--optimization-level 0), on the real model.

    python bench/bench_vllm_compile.py                     # 32 greedy replies of 256 tokens per mode (about 3 minutes)
    python bench/bench_vllm_compile.py --model_path demo_out/sft/ckpts/demo/checkpoint-4-40/tfmr

vLLM's compile cache is keyed by, among others, the model's path, so every new checkpoint folder compiles again.
Each mode therefore serves a fresh copy of the model in a folder of its own, in a child process (an engine holds
process-wide state), and reports the engine's start and the decoding speed of one batch of greedy replies that
always run to the token limit. The break-even is the number of generated tokens past which the compiled engine's
faster decoding repays its longer start; the demo's servers start uncompiled because each writes fewer.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from huatuo.pretrained import smollm2_instruct  # noqa: E402

MODES = {"compiled": 3, "uncompiled": 0}
QUESTIONS = (
    "Which nerve is most likely injured in a fracture of the surgical neck of the humerus?",
    "What is the first-line treatment for an uncomplicated urinary tract infection in a non-pregnant woman?",
    "Which vitamin deficiency causes Wernicke encephalopathy?",
    "What electrolyte disturbance is typical of the syndrome of inappropriate antidiuretic hormone secretion?",
)

CHILD = """
import json, sys, time
start = time.perf_counter()
from vllm import LLM, SamplingParams
model, level, prompts, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
questions = json.loads(sys.argv[5])
llm = LLM(model=model, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.15,
          compilation_config={"mode": 0} if level == 0 else None, seed=0)
ready = time.perf_counter() - start
tokenizer = llm.get_tokenizer()
texts = [tokenizer.apply_chat_template([{"role": "user", "content": questions[i % len(questions)]}],
                                       tokenize=False, add_generation_prompt=True) for i in range(prompts)]
params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
llm.generate(texts[:2], params, use_tqdm=False)
start = time.perf_counter()
outputs = llm.generate(texts, params, use_tqdm=False)
seconds = time.perf_counter() - start
generated = sum(len(o.outputs[0].token_ids) for o in outputs)
print("RESULT " + json.dumps({"ready_s": ready, "tokens": generated, "tokens_per_s": generated / seconds}))
"""


def measure(model: Path, level: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "model"
        shutil.copytree(model, copy)
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="2")
        argv = [sys.executable, "-c", CHILD, str(copy), str(level), str(args.prompts), str(args.tokens)]
        done = subprocess.run(
            [*argv, json.dumps(QUESTIONS)], env=env, capture_output=True, text=True, check=False
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"the engine at level {level} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_path", default=None, help="Model folder (default: SmolLM2-135M-Instruct).")
    parser.add_argument("--prompts", type=int, default=32, help="Replies generated in one batch.")
    parser.add_argument("--tokens", type=int, default=256, help="Tokens per reply.")
    args = parser.parse_args()
    model = Path(args.model_path) if args.model_path else smollm2_instruct()
    results = {name: measure(model, level, args) for name, level in MODES.items()}
    compiled, uncompiled = results["compiled"], results["uncompiled"]
    for name, r in results.items():
        print(f"{name:>10}: ready in {r['ready_s']:.1f} s, {r['tokens_per_s']:.1f} generated tokens/s")
    ratio = uncompiled["tokens_per_s"] / compiled["tokens_per_s"]
    saved = compiled["ready_s"] - uncompiled["ready_s"]
    per_token = 1 / uncompiled["tokens_per_s"] - 1 / compiled["tokens_per_s"]
    print(f"uncompiled decodes at {ratio:.2f}x and is ready {saved:.1f} s sooner")
    if per_token > 0:
        print(f"break-even: compiling pays off past {saved / per_token:,.0f} generated tokens per engine")


if __name__ == "__main__":
    main()
