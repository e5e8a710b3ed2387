"""The stage-2 reward, shared by PPO, GRPO and RLOO: a format check, then a verifier.

A response earns `correct_reward` (1.0) when it holds exactly one "## Thinking" and exactly one
"## Final Response" header, in that order, and the verifier judges the text after the latter to agree
with the reference answer; `wrong_reward` (0.1) when well formed but judged wrong; `malformed_reward`
(0.0) otherwise. The verifier is one of

  - a folder or hub id of a 2-label sequence classifier with its own tokenizer (the released
    medical_o1_verifier_3B, or one made by train_verifier.py): it reads prompts/reward_verifier.txt
    filled with the final response and the reference, plus its tokenizer's eos, at most `max_length`
    tokens; the response is judged correct when softmax P(label 1) > threshold (0.4);
  - "rule": a normalised match of the reference inside the final response (the paper's exact-match
    baseline), for cheap runs and tests;
  - "llm:<base_url>": an OpenAI-compatible judge reading prompts/verify.txt, asked for the verdict
    {"agrees": bool} as a json_schema response_format (unless structured_output=False), correct when it
    agrees or, for a plain reply, when the lower-cased reply contains "true"; the key comes from
    OPENAI_API_KEY.

    reward_fn = RewardFunction("rule")
    reward_fn(["## Thinking\\n\\n...\\n\\n## Final Response\\n\\nScurvy."], ["scurvy"])   # [1.0]
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from huatuo.llm import LLMClient, LLMError, resolve_api_key
from huatuo.models import attn_implementation
from huatuo.prompts import load_prompt
from huatuo.search import VERDICT_FORMAT, verdict

THINKING_HEADER = "## Thinking"
FINAL_HEADER = "## Final Response"
FINAL_MARKER = FINAL_HEADER + "\n\n"
REWARD_PROMPT = "reward_verifier"
RULE = "rule"
LLM_PREFIX = "llm:"

Judge = Callable[[str, str], bool]


# ----------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------


def extract_final_response(text: str | None) -> str | None:
    """The text after "## Final Response\\n\\n", stripped; None unless the response holds exactly one
    "## Thinking", exactly one "## Final Response" (followed by a blank line), the thinking first, and a
    non-empty answer."""
    if not isinstance(text, str):
        return None
    if text.count(THINKING_HEADER) != 1 or text.count(FINAL_HEADER) != 1 or text.count(FINAL_MARKER) != 1:
        return None
    if text.index(THINKING_HEADER) > text.index(FINAL_MARKER):
        return None
    final = text.split(FINAL_MARKER, 1)[1].strip()
    return final or None


def score_response(
    response: str,
    reference: str,
    judge: Judge,
    correct_reward: float = 1.0,
    wrong_reward: float = 0.1,
    malformed_reward: float = 0.0,
) -> float:
    """Reward of one response: malformed_reward if the format check fails, else correct_reward or
    wrong_reward as judge(final_response, reference) says."""
    final = extract_final_response(response)
    judgement = None if final is None else bool(judge(final, reference))
    return reward_for(judgement, correct_reward, wrong_reward, malformed_reward)


def reward_for(
    judgement: bool | None, correct_reward: float, wrong_reward: float, malformed_reward: float
) -> float:
    """The number for a verdict: None (malformed), True (correct) or False (wrong)."""
    if judgement is None:
        return malformed_reward
    return correct_reward if judgement else wrong_reward


_ARTICLES = {"a", "an", "the"}


def _is_cjk(char: str) -> bool:
    return "CJK" in unicodedata.name(char, "") or "HIRAGANA" in unicodedata.name(char, "")


def normalize_answer(text: str) -> list[str]:
    """Tokens of `text` for answer matching: NFKC, lower case, punctuation and symbols dropped, English
    articles dropped, and every CJK character its own token (Chinese has no spaces between words)."""
    text = unicodedata.normalize("NFKC", text).lower()
    chars = []
    for char in text:
        category = unicodedata.category(char)
        if category[0] in "PS":
            chars.append(" ")
        elif _is_cjk(char):
            chars.append(f" {char} ")
        else:
            chars.append(char)
    return [token for token in "".join(chars).split() if token not in _ARTICLES]


def rule_judge(final_response: str, reference: str) -> bool:
    """True when the normalised reference appears as a whole run of tokens in the normalised response
    ("Vitamin C deficiency." matches "the cause is vitamin-C deficiency", not "vitamin CD")."""
    ref = normalize_answer(reference)
    if not ref:
        return False
    got = normalize_answer(final_response)
    n = len(ref)
    return any(got[i : i + n] == ref for i in range(len(got) - n + 1))


def reward_stats(judgements: Sequence[bool | None], rewards: Sequence[float]) -> dict[str, float]:
    """Mean reward, correct rate and format rate of a batch (judgement None = malformed)."""
    n = max(len(judgements), 1)
    return {
        "reward": sum(rewards) / n,
        "correct_rate": sum(1 for j in judgements if j) / n,
        "format_rate": sum(1 for j in judgements if j is not None) / n,
    }


# ----------------------------------------------------------------------------------------------------
# Classifier verifier
# ----------------------------------------------------------------------------------------------------


def load_reward_prompt(prompt_dir: str | Path | None = None) -> str:
    """prompts/reward_verifier.txt (or its override in prompt_dir). The classifier verifier is
    English-only, as the released one is."""
    return load_prompt(REWARD_PROMPT, "en", prompt_dir)


def verifier_input_ids(tokenizer, template: str, response: str, reference: str, max_length: int) -> list[int]:
    """Token ids of the verifier prompt plus the tokenizer's eos. When that exceeds max_length, the
    response is cut (keeping its start, where answers are stated) so the reference and eos survive."""
    eos = tokenizer.eos_token or ""
    ids = tokenizer(template.format(response=response, reference=reference) + eos, verbose=False)["input_ids"]
    if len(ids) <= max_length:
        return ids
    head, tail = template.split("{response}", 1)
    head_ids = tokenizer(head.format(reference=reference))["input_ids"]
    tail_ids = tokenizer(tail.format(reference=reference) + eos, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"]
    budget = max(0, max_length - len(head_ids) - len(tail_ids))
    return (head_ids + response_ids[:budget] + tail_ids)[:max_length]


def classifier_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last attended token (rows right-padded).

    Decoder classifiers pool at the last token that is not the pad id; when a tokenizer's pad equals
    its eos (common for Llama and Qwen), that would skip the eos this prompt ends with. So for those
    models the head is applied here at the position the attention mask says is last.
    """
    head = getattr(model, "score", None)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(dim=1) - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(pooled)


def pad_batch(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (input_ids, attention_mask) tensors."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return input_ids.to(device), attention_mask.to(device)


@contextmanager
def outside_zero3_init():
    """Load models whole even where a ZeRO-3 config is registered with transformers.

    Parsing a TrainingArguments (PPOConfig, GRPOConfig) under `accelerate launch` with a ZeRO-3 config registers
    that config with transformers, and from then on every from_pretrained creates its model as empty ZeRO-3
    partitions (deepspeed.zero.Init). The verifier is never passed to deepspeed.initialize, which would make each
    of its forwards a collective that every process must join, while processes judge different numbers of
    well-formed responses; so it must hold its own full weights.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


class ClassifierVerifier:
    """A 2-label sequence classifier judging (final response, reference) pairs in batches, each process holding a
    full copy (never ZeRO-3 partitions: see outside_zero3_init)."""

    def __init__(
        self,
        path: str,
        threshold: float = 0.4,
        device=None,
        batch_size: int = 8,
        max_length: int = 4000,
        prompt_dir: str | Path | None = None,
        dtype: torch.dtype | None = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            use_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if use_bf16 else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # flash-attention kernels take half precision only; fp32 (CPU, older GPUs) goes through sdpa.
        attn = attn_implementation() if dtype in (torch.bfloat16, torch.float16) else "sdpa"
        with outside_zero3_init():
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, attn_implementation=attn
            ).to(self.device)
        self.model.eval()
        if self.model.config.num_labels != 2:
            raise ValueError(
                f"verifier {path} has {self.model.config.num_labels} labels; a 2-label classifier is needed"
            )
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id or 0
        self.template = load_reward_prompt(prompt_dir)
        self.threshold = threshold
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def probabilities(self, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        """P(label 1), i.e. P(correct), for each pair."""
        rows = [
            verifier_input_ids(self.tokenizer, self.template, r, ref, self.max_length)
            for r, ref in zip(responses, references, strict=True)
        ]
        # Longest first, so batches hold rows of similar length and the first batch shows any OOM at once.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        probs = [0.0] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            input_ids, attention_mask = pad_batch([rows[i] for i in chunk], self.pad_id, self.device)
            logits = classifier_logits(self.model, input_ids, attention_mask).float()
            p_correct = torch.softmax(logits, dim=-1)[:, 1].tolist()
            for i, p in zip(chunk, p_correct, strict=True):
                probs[i] = p
        return probs

    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> list[bool]:
        return [p > self.threshold for p in self.probabilities(responses, references)]


# ----------------------------------------------------------------------------------------------------
# LLM judge
# ----------------------------------------------------------------------------------------------------


class LLMVerifier:
    """An OpenAI-compatible judge reading the search's verifier prompt, with its verdict schema and parser."""

    def __init__(
        self,
        base_url: str,
        model: str = "gpt-4o",
        concurrency: int = 16,
        language: str = "en",
        prompt_dir: str | Path | None = None,
        max_tokens: int = 16,
        structured_output: bool = True,
    ):
        self.base_url = base_url
        self.model = model
        self.concurrency = concurrency
        self.template = load_prompt("verify", language, prompt_dir)
        self.max_tokens = max_tokens
        self.structured_output = structured_output

    async def _judge_all(self, responses: Sequence[str], references: Sequence[str]) -> list[bool]:
        async with LLMClient(
            self.base_url,
            self.model,
            api_key=resolve_api_key(None),
            concurrency=self.concurrency,
            structured_output=self.structured_output,
        ) as llm:

            async def one(index: int, response: str, reference: str) -> bool:
                prompt = self.template.format(response=response, reference=reference)
                try:
                    reply = await llm.chat(
                        prompt, response_format=VERDICT_FORMAT, temperature=0.0, max_tokens=self.max_tokens
                    )
                except LLMError as err:
                    raise LLMError(f"verifier call for response {index} failed: {err}") from None
                return verdict(reply.text)

            return await asyncio.gather(
                *(one(i, r, ref) for i, (r, ref) in enumerate(zip(responses, references, strict=True)))
            )

    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> list[bool]:
        return asyncio.run(self._judge_all(responses, references))


# ----------------------------------------------------------------------------------------------------
# The reward function
# ----------------------------------------------------------------------------------------------------


class RewardFunction:
    """rf(responses, references) -> rewards, with the verifier named by reward_model_path ("rule",
    "llm:<base_url>", or a classifier folder / hub id). `judge()` returns the judgements behind the
    rewards (True, False, or None for malformed) for correct and format rates."""

    def __init__(
        self,
        reward_model_path: str,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.1,
        malformed_reward: float = 0.0,
        threshold: float = 0.4,
        device=None,
        batch_size: int = 8,
        max_length: int = 4000,
        llm_model: str = "gpt-4o",
        llm_concurrency: int = 16,
        language: str = "en",
        prompt_dir: str | Path | None = None,
        dtype: torch.dtype | None = None,
        structured_output: bool = True,
    ):
        self.reward_model_path = reward_model_path
        self.correct_reward = correct_reward
        self.wrong_reward = wrong_reward
        self.malformed_reward = malformed_reward
        if reward_model_path == RULE:
            self.verifier = self._rule_batch
        elif reward_model_path.startswith(LLM_PREFIX):
            self.verifier = LLMVerifier(
                reward_model_path[len(LLM_PREFIX) :],
                llm_model,
                llm_concurrency,
                language,
                prompt_dir,
                structured_output=structured_output,
            )
        else:
            self.verifier = ClassifierVerifier(
                reward_model_path, threshold, device, batch_size, max_length, prompt_dir, dtype
            )

    @staticmethod
    def _rule_batch(responses: Sequence[str], references: Sequence[str]) -> list[bool]:
        return [rule_judge(r, ref) for r, ref in zip(responses, references, strict=True)]

    def judge(self, responses: Sequence[str], references: Sequence[str]) -> list[bool | None]:
        """Per response: None if malformed, else the verifier's verdict on its final response. Only the
        well-formed responses reach the verifier, in one batched call."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        for i, reference in enumerate(references):
            if not isinstance(reference, str) or not reference.strip():
                raise ValueError(f"reference {i} is empty or not a string: {reference!r}")
        finals = [extract_final_response(r) for r in responses]
        wellformed = [i for i, f in enumerate(finals) if f is not None]
        judgements: list[bool | None] = [None] * len(responses)
        if wellformed:
            verdicts = self.verifier([finals[i] for i in wellformed], [references[i] for i in wellformed])
            for i, verdict in zip(wellformed, verdicts, strict=True):
                judgements[i] = bool(verdict)
        return judgements

    def rewards(self, judgements: Sequence[bool | None]) -> list[float]:
        return [
            reward_for(j, self.correct_reward, self.wrong_reward, self.malformed_reward) for j in judgements
        ]

    def __call__(self, responses: Sequence[str], references: Sequence[str]) -> list[float]:
        return self.rewards(self.judge(responses, references))
