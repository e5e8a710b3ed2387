import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A one-process DeepSpeed ZeRO-3 accelerate config that runs on a CPU, for the stages' ZeRO-3 tests.
ZERO3_CPU_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
  zero_stage: 3
mixed_precision: 'no'
num_machines: 1
num_processes: 1
use_cpu: true
"""


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of the tiny policy, value model and verifier, built once per test session."""
    from huatuo.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


def question(i):
    return [{"role": "user", "content": f"Which colour, case {i}?"}]


@pytest.fixture(scope="session")
def warm_policy(tiny_models, tmp_path_factory):
    """The tiny policy taught the output format in a few supervised steps, so that its responses reach the
    verifier. The headers and the two answers become single tokens, so a 2-layer model learns the layout
    quickly; the decoded text is the real format. It says red or blue at random whatever the question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from huatuo.models import format_thinking_response

    headers, answers = format_thinking_response("hmm", ""), (" red", " blue")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["policy"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"])
    tokenizer.add_tokens([headers, *answers])
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = []
    for i in range(32):
        prompt = tokenizer.apply_chat_template(question(i), tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for answer in answers:
            answer_ids = tokenizer(headers + answer + tokenizer.eos_token, add_special_tokens=False)[
                "input_ids"
            ]
            rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(80):
        batch = [rows[(step * 8 + j) % len(rows)] for j in range(8)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        loss = model(
            input_ids=input_ids, attention_mask=input_ids != tokenizer.pad_token_id, labels=labels
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path_factory.mktemp("warm_policy")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real model's converted folder: in the repository's cache, so that reruns (and the demo) reuse it."""
    from huatuo import pretrained

    return pretrained.smollm2_instruct()
