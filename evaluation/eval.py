r"""Evaluate a model on the medical multiple-choice benchmarks through an OpenAI-compatible server.

Serve the model (SGLang on a GPU; `--backend vllm` or `--backend transformers` use the same script),
evaluate it, then stop the server:

    bash evaluation/launch_sglang_server.sh FreedomIntelligence/HuatuoGPT-o1-8B 30000
    python evaluation/eval.py --model_name FreedomIntelligence/HuatuoGPT-o1-8B \
        --eval_file evaluation/data/eval_data.json --port 30000
    bash evaluation/kill_sglang_server.sh

The paper averaged GPQA over five runs:
    python evaluation/eval.py --model_name M --eval_file evaluation/data/eval_data.json \
        --sources GPQA_Medical_test --n_runs 5
Test-time scaling: `--n_samples 5` (majority vote over the extracted answers), `--thinking_budget 4096`
(budget forcing). Any OpenAI-compatible service: `--base_url https://host/v1 --api chat` (the key is
read from --api_key or OPENAI_API_KEY and never written anywhere). `--batch_api` asks an OpenAI model
through the Batch API (chat only), all questions in one batch at half the price:
    python evaluation/eval.py --model_name gpt-4o --eval_file evaluation/data/eval_data.json \
        --base_url https://api.openai.com/v1 --batch_api

Outputs in --output_dir, named as the original names them (NAME = <model name><eval file name>_<task>
[_strict-prompt], plus _n<K>/_budget<T> when those are set):
    NAME.json            every item with its reply, the extracted letters (last and first match), correct
    result_NAME.json     per source [max(first, last) accuracy, first-match correct, count, last-match
                         correct], the original's layout; its score is the optimistic max of the two
    NAME_summary.json    the settings (eval file sha256 included) and per source: accuracy by last match
                         (primary), by first match, max(first, last), no-answer share, counts, failures
    NAME_replies/        one file per reply, saved as it arrives: a rerun asks only for what is missing
A markdown table of the results is printed at the end. Every question stays in the denominator: an
empty reply (which the original dropped) or a request that failed after its retries counts as wrong,
and is reported in its own column.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.scorer import score  # noqa: E402
from huatuo.batch import add_batch_args, batch_queue_for, check_batch_args  # noqa: E402
from huatuo.items import InputError, load_eval_file  # noqa: E402
from huatuo.llm import LLMClient, LLMError, normalize_api_url, resolve_api_key, wait_for_server  # noqa: E402
from huatuo.store import GIVEN_UP, ItemStore, run_all, write_json_atomic  # noqa: E402

PROMPT = "Answer the following multiple-choice question.\n\n{question}\n\n{options}"
STRICT_PROMPT = (
    "Answer the following multiple-choice question. End your reply with one sentence of the form "
    '"The answer is X." where X is the letter of the option you choose.\n\n{question}\n\n{options}'
)
# Appended when a thinking phase that stopped early is pushed to go on (budget forcing).
WAIT = "\n\nWait"


def str2bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate a model served by an OpenAI-compatible server on multiple-choice benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = parser.add_argument_group("model and data (the original's flags)")
    g.add_argument(
        "--model_name",
        required=True,
        help="model path or hub id: names the output and gives the tokenizer for the chat template",
    )
    g.add_argument(
        "--eval_file",
        required=True,
        help="JSON {source: [{question, options, answer_idx, answer}]}; a plain list is one source 'normal'",
    )
    g.add_argument(
        "--max_new_tokens",
        type=int,
        default=2000,
        help="tokens to generate per reply (per answer with --thinking_budget)",
    )
    g.add_argument(
        "--max_tokens",
        type=int,
        default=-1,
        help="cap on prompt tokens; longer questions lose their beginning (-1: no cap; needs a tokenizer)",
    )
    g.add_argument(
        "--use_chat_template",
        type=str2bool,
        default=True,
        help="with the completions API, wrap the prompt in the model's chat template",
    )
    g.add_argument(
        "--strict_prompt", action="store_true", help="ask the reply to end with 'The answer is X.'"
    )
    g.add_argument(
        "--task",
        default="api",
        choices=["api"],
        help="generation backend: an HTTP server (part of the output name)",
    )
    g.add_argument(
        "--port", type=int, default=30000, help="port of the local server (ignored with --base_url)"
    )
    g.add_argument(
        "--batch_size", type=int, default=1024, help="requests in flight when --concurrency is not set"
    )

    g = parser.add_argument_group("server")
    g.add_argument(
        "--base_url", default=None, help="OpenAI-compatible base URL (default http://127.0.0.1:PORT/v1)"
    )
    g.add_argument(
        "--api",
        default="auto",
        choices=["auto", "chat", "completions"],
        help="auto: completions with the chat template applied here (as the original) when --model_name has a tokenizer, else chat",
    )
    g.add_argument(
        "--api_key", default=None, help="API key (default: OPENAI_API_KEY; local servers need none)"
    )
    g.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="requests in flight, one prompt each (default: --batch_size)",
    )
    g.add_argument(
        "--max_retries",
        type=int,
        default=5,
        help="retries with backoff per request before the question is recorded as failed",
    )
    g.add_argument(
        "--request_timeout",
        type=float,
        default=3600.0,
        help="seconds to wait for one reply (queued requests wait too)",
    )
    g.add_argument(
        "--wait_timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the server's /health before giving up",
    )

    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.5, help="sampling temperature")
    g.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling")
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed sent with each request (offset per run and sample)",
    )

    g = parser.add_argument_group("selection and repeats")
    g.add_argument("--sources", nargs="+", default=None, help="evaluate only these sources (default: all)")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each source")
    g.add_argument(
        "--n_runs",
        type=int,
        default=1,
        help="repeat the whole evaluation K times; report mean and std per source",
    )
    g.add_argument(
        "--n_samples", type=int, default=1, help="sample K replies per question and take the majority answer"
    )

    g = parser.add_argument_group("budget forcing (completions API with a chat template)")
    g.add_argument(
        "--thinking_budget",
        type=int,
        default=None,
        help="thinking tokens T: cut thinking at T, or push it on with 'Wait' when it ends early, then ask for the final response",
    )
    g.add_argument(
        "--budget_waits",
        type=int,
        default=1,
        help="how many times thinking that ends before T is pushed on with 'Wait' (0: only cap it)",
    )
    g.add_argument(
        "--thinking_end",
        default="## Final Response",
        help="the heading that ends the thinking ('</think>' for R1-style models)",
    )

    add_batch_args(parser)

    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", default="evaluation/results", help="where outputs and saved replies go")

    args = parser.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = args.batch_size
    for name in ("concurrency", "n_runs", "n_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.thinking_budget is not None and args.thinking_budget < 1:
        parser.error("--thinking_budget must be at least 1")
    if args.thinking_budget is not None and args.api == "chat":
        parser.error("--thinking_budget continues the model's own text, which needs --api completions")
    try:
        check_batch_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.batch_api:
        if args.api == "completions" or args.thinking_budget is not None:
            parser.error("--batch_api sends chat completions: use --api chat, without --thinking_budget")
        args.api = "chat"
    return args


# ==================================================================================================
# Prompts
# ==================================================================================================


def load_tokenizer(model_name: str):
    """The model's tokenizer, or None when --model_name names no tokenizer this machine can load."""
    # Imported here: transformers and torch take seconds to import, and the chat API needs neither.
    from transformers import AutoTokenizer

    from huatuo.models import ensure_chat_template

    # Loading fails in many ways (an API model name, no copy offline, a gated repo); all of them mean
    # the same thing here: no client-side chat template. The local cache is tried first because the
    # server launched on this machine has usually downloaded the model there already.
    for local_only in (True, False):
        try:
            return ensure_chat_template(
                AutoTokenizer.from_pretrained(model_name, local_files_only=local_only)
            )
        except Exception:
            if Path(model_name).exists():
                return None
    return None


def user_message(item: dict, strict: bool, tokenizer=None, max_tokens: int = -1) -> str:
    template = STRICT_PROMPT if strict else PROMPT
    options = "\n".join(f"{letter}. {text}" for letter, text in item["options"].items())
    question = item["question"]
    text = template.format(question=question, options=options)
    if max_tokens > 0:
        over = len(tokenizer.encode(text, add_special_tokens=False)) - max_tokens
        if over > 0:
            # Drop the start of the question (for PubMedQA, the start of the abstract) and keep the
            # question itself and the options, without which the item cannot be answered.
            ids = tokenizer.encode(question, add_special_tokens=False)
            question = tokenizer.decode(ids[min(over, len(ids)) :])
            text = template.format(question=question, options=options)
    return text


def build_prompt(item: dict, args: argparse.Namespace, tokenizer) -> str:
    text = user_message(item, args.strict_prompt, tokenizer, args.max_tokens)
    if args.api == "chat" or not args.use_chat_template:
        return text
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    # Servers tokenize completion prompts with special tokens on, which would add a second BOS.
    if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
        prompt = prompt[len(tokenizer.bos_token) :]
    return prompt


# ==================================================================================================
# Asking the server
# ==================================================================================================


async def served_model(base_url: str, wanted: str, api_key: str | None) -> str:
    """The name the server knows the model by: --model_name when it lists it, else its only model."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(normalize_api_url(base_url) + "/models") as resp:
                ids = [m["id"] for m in (await resp.json(content_type=None)).get("data", [])]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, AttributeError):
        return wanted
    if wanted in ids or len(ids) != 1:
        return wanted
    return ids[0]


async def budget_forced(llm: LLMClient, prompt: str, args: argparse.Namespace, sampling: dict):
    """Think for at most T tokens, pushed on with 'Wait' when it stops early, then answer.

    Returns the whole reply (thinking, the final-response heading, the answer), the tokens generated
    and the answer's finish reason.
    """
    thinking, used, waits = "", 0, args.budget_waits
    while used < args.thinking_budget:
        budget = {**sampling, "max_tokens": args.thinking_budget - used, "stop": [args.thinking_end]}
        part = await llm.complete(prompt + thinking, **budget)
        # Servers leave the stop string out of the text; strip it in case one keeps it.
        text = part.text.rstrip()
        if text.endswith(args.thinking_end):
            text = text[: -len(args.thinking_end)].rstrip()
        thinking += text
        used += part.completion_tokens or len(text.split())
        if part.finish_reason == "length" or used >= args.thinking_budget or waits == 0:
            break
        thinking += WAIT
        waits -= 1
    heading = f"\n\n{args.thinking_end}\n\n"
    answer = await llm.complete(prompt + thinking + heading, **sampling)
    return thinking + heading + answer.text, used + answer.completion_tokens, answer.finish_reason


def make_worker(
    llm: LLMClient, prompts: dict, args: argparse.Namespace, data: dict, fresh: dict, scores: dict
):
    """The per-question coroutine. Each reply is kept in `fresh` and scored into `scores` as it
    arrives, while other requests are still in flight, so that little is left to do at the end."""

    async def ask(job: dict) -> dict:
        prompt = prompts[job["source"], job["index"]]
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_new_tokens}
        if args.seed is not None:
            sampling["seed"] = args.seed + job["run"] * args.n_samples + job["sample"]
        if args.thinking_budget is not None:
            text, tokens, finish = await budget_forced(llm, prompt, args, sampling)
        else:
            reply = await (
                llm.chat(prompt, **sampling) if args.api == "chat" else llm.complete(prompt, **sampling)
            )
            text, tokens, finish = reply.text, reply.completion_tokens, reply.finish_reason
        fresh[job["id"]] = {**job, "output": text, "completion_tokens": tokens, "finish_reason": finish}
        scores[job["id"]] = score(text, data[job["source"]][job["index"]]["options"])
        return fresh[job["id"]]

    return ask


# ==================================================================================================
# Scoring
# ==================================================================================================


def majority(letters: list[str | None]) -> str | None:
    """The most frequent letter; a tie goes to the one sampled first."""
    counts = Counter(letter for letter in letters if letter is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(letter for letter in letters if letter is not None and counts[letter] == best)


def score_item(item: dict, replies: list[dict], known: dict | None = None) -> dict:
    """Letters and correctness of one question from its replies (several with --n_samples);
    `known` holds replies already scored, by id."""
    known = known or {}
    valid = [r for r in replies if r.get("status") != GIVEN_UP]
    texts = [r["output"] for r in valid]
    results = [known.get(r.get("id")) or score(r["output"], item["options"]) for r in valid]
    last = majority([r.last for r in results])
    first = majority([r.first for r in results])
    rules = Counter(r.rule for r in results if r.rule is not None)
    # The scorer names options by upper-case letter whatever the case of the file's keys.
    key = item["answer_idx"].strip().upper()
    return {
        "pred": last,
        "pred_first": first,
        "rule": rules.most_common(1)[0][0] if rules else None,
        "correct": last == key,
        "correct_first": first == key,
        "failed": not texts,
        "failures": len(replies) - len(texts),
        "empty": sum(not t.strip() for t in texts),
        "reply_chars": [len(t) for t in texts],
        "completion_tokens": [r.get("completion_tokens", 0) for r in valid],
    }


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def source_metrics(scored_runs: list[list[dict]]) -> dict:
    """Per-source metrics from one list of scored items per run."""
    per_run = []
    for items in scored_runs:
        n = len(items)
        last = sum(s["correct"] for s in items)
        first = sum(s["correct_first"] for s in items)
        per_run.append({"last": last / n, "first": first / n, "max": max(last, first) / n})
    everything = [s for items in scored_runs for s in items]
    return {
        "accuracy": mean(r["last"] for r in per_run),
        "accuracy_std": spread([r["last"] for r in per_run]),
        "accuracy_first": mean(r["first"] for r in per_run),
        "accuracy_first_std": spread([r["first"] for r in per_run]),
        "accuracy_max_first_last": mean(r["max"] for r in per_run),
        "accuracy_per_run": [r["last"] for r in per_run],
        # Among questions that got a reply: failures are counted on their own.
        "no_answer_rate": mean(s["pred"] is None for s in everything if not s["failed"]),
        "items": len(scored_runs[0]),
        "runs": len(scored_runs),
        "correct": sum(s["correct"] for s in everything),
        "correct_first": sum(s["correct_first"] for s in everything),
        "failed_items": sum(s["failed"] for s in everything),
        "failed_requests": sum(s["failures"] for s in everything),
        "empty_replies": sum(s["empty"] for s in everything),
        "mean_reply_chars": mean(c for s in everything for c in s["reply_chars"]),
        "mean_completion_tokens": mean(c for s in everything for c in s["completion_tokens"]),
        "rules": dict(Counter(s["rule"] for s in everything)),
    }


def markdown_table(metrics: dict[str, dict]) -> str:
    def pct(m: dict, key: str) -> str:
        value = f"{100 * m[key]:.1f}"
        return value + (f" ± {100 * m[key + '_std']:.1f}" if m["runs"] > 1 and key + "_std" in m else "")

    lines = [
        "| source | items | runs | accuracy (last match) | first match | max(first, last) | no answer | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for source, m in metrics.items():
        lines.append(
            f"| {source} | {m['items']} | {m['runs']} | {pct(m, 'accuracy')} | {pct(m, 'accuracy_first')} | "
            f"{100 * m['accuracy_max_first_last']:.1f} | {100 * m['no_answer_rate']:.1f}% | {m['failed_items']} |"
        )
    if len(metrics) > 1:
        avg = {
            key: mean(m[key] for m in metrics.values())
            for key in ("accuracy", "accuracy_first", "accuracy_max_first_last")
        }
        lines.append(
            f"| average | {sum(m['items'] for m in metrics.values())} | | {100 * avg['accuracy']:.1f} | "
            f"{100 * avg['accuracy_first']:.1f} | {100 * avg['accuracy_max_first_last']:.1f} | | |"
        )
    return "\n".join(lines)


# ==================================================================================================
# Main
# ==================================================================================================


def output_name(args: argparse.Namespace) -> str:
    name = Path(args.model_name.rstrip("/")).name + Path(args.eval_file).stem + f"_{args.task}"
    if args.strict_prompt:
        name += "_strict-prompt"
    if args.n_samples > 1:
        name += f"_n{args.n_samples}"
    if args.thinking_budget is not None:
        name += f"_budget{args.thinking_budget}"
    return name


def safe_id(source: str) -> str:
    """The source's name as part of a reply's file name; names that had to change get a digest, so
    that two sources ("医学" and "药学") never share their replies' files."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", source)
    if safe != source:
        safe += "-" + hashlib.sha256(source.encode()).hexdigest()[:8]
    return safe


def check_settings(replies_dir: Path, settings: dict) -> None:
    """Saved replies are reused only when they were generated the same way."""
    path = replies_dir / "settings.json"
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in settings if saved.get(k) != settings[k]]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} then, {settings[k]!r} now" for k in changed)
            raise SystemExit(
                f"error: the replies saved in {replies_dir} were generated with other settings ({diffs}); "
                "use another --output_dir or delete that folder"
            )
    write_json_atomic(path, settings)


def main(args: argparse.Namespace) -> dict:
    # ---------------------------------------------------------------------------------------------
    # Load: eval file, sources, tokenizer, prompts
    # ---------------------------------------------------------------------------------------------
    try:
        data = load_eval_file(args.eval_file)
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    sha256 = hashlib.sha256(Path(args.eval_file).read_bytes()).hexdigest()
    if args.sources:
        unknown = [s for s in args.sources if s not in data]
        if unknown:
            raise SystemExit(f"error: no source {unknown} in {args.eval_file}; it has {list(data)}")
        data = {s: data[s] for s in args.sources}
    if args.limit:
        data = {s: items[: args.limit] for s, items in data.items()}
    if not data:
        raise SystemExit(f"error: {args.eval_file} holds no sources")
    empty = [s for s, items in data.items() if not items]
    if empty:
        raise SystemExit(
            f"error: {args.eval_file}: source {empty[0]!r} has no items; leave it out with --sources"
        )

    # The chat API needs no tokenizer here unless prompts are cut to --max_tokens.
    tokenizer = load_tokenizer(args.model_name) if args.api != "chat" or args.max_tokens > 0 else None
    if args.api == "auto":
        args.api = "completions" if tokenizer is not None or not args.use_chat_template else "chat"
        print(
            f"using the {args.api} API"
            + ("" if tokenizer else f" (no tokenizer found for {args.model_name!r})")
        )
    if tokenizer is None and args.max_tokens > 0:
        raise SystemExit(
            f"error: --max_tokens needs the tokenizer of {args.model_name!r}, which did not load"
        )
    if tokenizer is None and args.api == "completions" and args.use_chat_template:
        raise SystemExit(
            f"error: the completions API applies the chat template here, which needs the tokenizer of "
            f"{args.model_name!r}; use --api chat, or --use_chat_template False for raw prompts"
        )
    if args.thinking_budget is not None and args.api != "completions":
        raise SystemExit(
            "error: --thinking_budget needs the completions API, and so a tokenizer for --model_name"
        )
    prompts = {
        (s, i): build_prompt(item, args, tokenizer)
        for s, items in data.items()
        for i, item in enumerate(items)
    }

    base_url = normalize_api_url(args.base_url or f"http://127.0.0.1:{args.port}/v1")
    output_dir = Path(args.output_dir)
    name = output_name(args)
    store = ItemStore(output_dir / f"{name}_replies")
    jobs = [
        {"id": f"{safe_id(s)}.{i}.r{run}.s{sample}", "source": s, "index": i, "run": run, "sample": sample}
        for run in range(args.n_runs)
        for sample in range(args.n_samples)
        for s, items in data.items()
        for i in range(len(items))
    ]

    # ---------------------------------------------------------------------------------------------
    # Run: ask for every reply not saved yet
    # ---------------------------------------------------------------------------------------------
    generation = {
        "model": args.model_name,
        "api": args.api,
        "prompt": STRICT_PROMPT if args.strict_prompt else PROMPT,
        "use_chat_template": args.use_chat_template,
        "eval_file_sha256": sha256,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "max_tokens": args.max_tokens,
        "thinking_budget": args.thinking_budget,
        "budget_waits": args.budget_waits if args.thinking_budget else None,
        "thinking_end": args.thinking_end if args.thinking_budget else None,
    }
    check_settings(store.directory, generation)
    saved = {i: store.load(i) for i in store.done_ids() & {job["id"] for job in jobs}}
    done = {i for i, record in saved.items() if record.get("status") != GIVEN_UP}
    fresh: dict[str, dict] = {}
    scores: dict = {}
    missing = sum(job["id"] not in done for job in jobs)
    served = args.model_name
    if missing:
        try:
            api_key = resolve_api_key(args.api_key, base_url)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        print(f"{missing} of {len(jobs)} replies to ask for from {base_url} ({args.api} API)")

        async def ask_all():
            await wait_for_server(base_url, timeout=args.wait_timeout, api_key=api_key)
            nonlocal served
            served = await served_model(base_url, args.model_name, api_key)
            batch = batch_queue_for(
                args, base_url, api_key, output_dir / f"{name}_batches", args.request_timeout
            )
            async with LLMClient(
                base_url,
                served,
                api_key=api_key,
                concurrency=args.concurrency,
                max_retries=args.max_retries,
                timeout=args.request_timeout,
                batch=batch,
            ) as llm:
                await run_all(
                    jobs,
                    make_worker(llm, prompts, args, data, fresh, scores),
                    store,
                    key=lambda job: job["id"],
                    desc=name,
                    concurrency=args.concurrency,
                    stats=llm.stats,
                    retry_given_up=True,
                )

        try:
            asyncio.run(ask_all())
        except LLMError as err:
            raise SystemExit(f"error: {err}") from None
    else:
        print(f"all {len(jobs)} replies already saved in {store.directory}; scoring them")

    # ---------------------------------------------------------------------------------------------
    # Score and save
    # ---------------------------------------------------------------------------------------------
    # Replies of this run are in memory and earlier ones were read above; only failures are reread.
    replies = {
        j["id"]: fresh.get(j["id"]) or (saved[j["id"]] if j["id"] in done else store.load(j["id"]))
        for j in jobs
    }
    samples = defaultdict(list)
    for job in jobs:
        samples[job["run"], job["source"], job["index"]].append(replies[job["id"]])

    outputs, metrics, original = [], {}, {}
    for source, items in data.items():
        scored_runs = []
        for run in range(args.n_runs):
            scored = []
            for index, item in enumerate(items):
                reps = samples[run, source, index]
                s = score_item(item, reps, scores)
                scored.append(s)
                record = {**item, "source": source, "run": run, "output": reps[0].get("output", "")}
                if args.n_samples > 1:
                    record["outputs"] = [r.get("output", "") for r in reps]
                record.update({k: s[k] for k in ("pred", "pred_first", "rule", "correct", "failed")})
                outputs.append(record)
            scored_runs.append(scored)
        m = source_metrics(scored_runs)
        metrics[source] = m
        count = m["items"] * m["runs"]
        original[source] = [
            max(m["correct"], m["correct_first"]) / count,
            m["correct_first"],
            count,
            m["correct"],
        ]

    settings = {
        **generation,
        "served_model": served,
        "base_url": base_url,
        "eval_file": args.eval_file,
        "sources": list(data),
        "limit": args.limit,
        "n_runs": args.n_runs,
        "n_samples": args.n_samples,
        "strict_prompt": args.strict_prompt,
        "concurrency": args.concurrency,
        "args": {k: v for k, v in vars(args).items() if k != "api_key"},
    }
    table = markdown_table(metrics)
    summary = {"settings": settings, "sources": metrics, "table": table}
    write_json_atomic(output_dir / f"{name}.json", outputs)
    write_json_atomic(output_dir / f"result_{name}.json", original)
    write_json_atomic(output_dir / f"{name}_summary.json", summary)

    print(table)
    failed = sum(m["failed_items"] for m in metrics.values())
    if failed:
        print(
            f"warning: {failed} question(s) got no reply and count as wrong; rerun the same command to retry them"
        )
        reasons = sorted({r["reason"] for r in replies.values() if r.get("status") == GIVEN_UP})
        print("failure reasons:\n  " + "\n  ".join(reasons[:5]))
    print(f"saved {output_dir / name}.json, result_{name}.json and {name}_summary.json in {output_dir}")
    return summary


if __name__ == "__main__":
    main(parse_args())
