"""Tiny offline models for tests and the demo.

No machine here can download weights, so every test and the demo runs on models this module builds in
seconds: a Llama-architecture causal LM with a byte-level BPE tokenizer and a Llama-3-style chat template,
a 1-label sequence classifier (the PPO value model) and a 2-label sequence classifier (the verifier), which
gets a tokenizer of its own as the released 3B verifier does.

    python -m huatuo.tiny --out_dir tiny_models
"""

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from huatuo.models import LLAMA3_CHAT_TEMPLATE

CORPUS = Path(__file__).with_name("tiny_corpus.txt")
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the bundled corpus: every string encodes, with no unknown token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS.read_text(encoding="utf-8")], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        model_max_length=4096,
    )
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer, **overrides) -> LlamaConfig:
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_models(out_dir, seed: int = 0) -> dict[str, Path]:
    """Write policy/, value/ and verifier/ under out_dir and return their paths."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    paths = {name: out_dir / name for name in ("policy", "value", "verifier")}

    policy = LlamaForCausalLM(tiny_config(tokenizer))
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    value = LlamaForSequenceClassification(tiny_config(tokenizer, num_labels=1))
    verifier_tokenizer = build_tokenizer(vocab_size=384)
    verifier = LlamaForSequenceClassification(tiny_config(verifier_tokenizer, num_labels=2))

    saved = [(policy, tokenizer), (value, tokenizer), (verifier, verifier_tokenizer)]
    for name, (model, tok) in zip(paths, saved, strict=True):
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def main():
    parser = argparse.ArgumentParser(description="Build the tiny offline policy, value model and verifier.")
    parser.add_argument(
        "--out_dir", default="tiny_models", help="Folder that receives policy/, value/, verifier/."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights.")
    args = parser.parse_args()
    for name, path in build_tiny_models(args.out_dir, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
