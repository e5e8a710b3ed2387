"""Stage 0: turn medical multiple-choice questions into open-ended problems with a verifiable answer.

Per question (options shown as one `A. text` line each), cheapest checks first:
  1. --min_question_chars N      drop questions shorter than N characters
  2. --decontaminate EVAL_FILE   drop questions sharing 64 consecutive characters (whitespace-normalised,
                                 case-folded) with any eval question
  3. --difficulty_models M@URL   drop questions that every listed small model answers correctly
  4. --filter_data               an LLM judges Pass / Too Simple / Ambiguous Answer / Not Reformulatable;
                                 a reply without "pass" drops the question
  5. --keep_mcq_fraction F       keep a share F of the passing questions in closed form (question with
                                 its options as the problem, the correct option as the answer)
  6. the LLM rewrites the rest as {"Open-ended Verifiable Question", "Ground-True Answer"}
                                 (asked again on unparseable JSON, --max_parse_retries times)
Steps 4 and 6 send a json_schema response_format (FILTER_FORMAT: {"category": one of the four};
REFORMAT_FORMAT: the two keys). --no_structured_output leaves it out; the parsers accept both the
schema's JSON and the free-text forms the prompts ask for. The difficulty models answer in free text.

    python construct_verifiable_medical_problems.py --data_path data/demo_data.json --filter_data \\
        --model_name gpt-4o                              # key from OPENAI_API_KEY
    python construct_verifiable_medical_problems.py --data_path data/demo_data.json --filter_data \\
        --api_url http://127.0.0.1:8000/v1 --model_name Qwen2.5-72B-Instruct --num_process 64 \\
        --min_question_chars 100 --decontaminate evaluation/data/eval_data.json \\
        --difficulty_models gemma-2-9b-it@http://127.0.0.1:8001/v1 Llama-3.1-8B-Instruct@http://127.0.0.1:8002/v1
    python construct_verifiable_medical_problems.py --data_path data/demo_data.json --filter_data \\
        --model_name gpt-4o --batch_api --num_process 50000   # OpenAI Batch API: half the price, within 24 h

Each item is saved as it finishes in output_data/<input name>/<process_id>.json (process_id = 1-based
position in the input file); a rerun with the same arguments does only the unfinished items. The merged
file output_data/<input name>_final_<N>.json holds every item once, each with `status` ("kept",
"dropped" or "given_up"), `reason` when not kept, and `usage` (calls and tokens spent on it). Kept items
carry `Open-ended Verifiable Question` and `Ground-True Answer`, ready for
search_for_complex_reasoning_path.py and RL_stage2.py. With --batch_api the main model's requests go
through the Batch API, recorded in output_data/<input name>_batches/ (the difficulty models, local
servers, are still asked directly).
"""

import argparse
import asyncio
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

from huatuo.batch import add_batch_args, batch_queue_for, check_batch_args
from huatuo.items import ANSWER, MCQ, QUESTION, InputError, load_eval_file, load_items
from huatuo.llm import (
    LLMClient,
    StructuredOutputUnsupported,
    Usage,
    add_api_args,
    json_schema_format,
    normalize_api_url,
    resolve_api_key,
)
from huatuo.problems import DECONTAMINATION_CHARS, Decontaminator, closed_form_question, render_options
from huatuo.prompts import PromptError, add_prompt_args, load_prompt
from huatuo.search import ParseError, extract_json_object
from huatuo.store import DROPPED, GIVEN_UP, KEPT, ItemStore, run_all, save_args, write_json_atomic


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Build open-ended verifiable medical problems from multiple-choice questions.",
        epilog="The API key is read from --api_key or OPENAI_API_KEY and is never written to any file.",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data_path", required=True, help="JSON list of MCQs: question, options, answer_idx, answer"
    )
    data.add_argument("--limit_num", type=int, default=None, help="process only the first N items")
    data.add_argument(
        "--output_dir", default="output_data", help="per-item files and merged output (default: output_data)"
    )
    data.add_argument(
        "--retry_given_up", action="store_true", help="on resume, redo items that were given up"
    )

    api = add_api_args(parser, "filters and rewrites", num_process=10)
    api.add_argument(
        "--backoff_base",
        type=float,
        default=1.0,
        help="first retry waits about this many seconds, then doubles (default: 1)",
    )
    api.add_argument(
        "--max_parse_retries",
        type=int,
        default=1,
        help="asks again when the rewrite is not valid JSON (default: 1)",
    )

    add_batch_args(parser)

    steps = parser.add_argument_group("filtering steps")
    steps.add_argument(
        "--filter_data",
        action="store_true",
        help="let the LLM drop simple, ambiguous or option-bound questions",
    )
    steps.add_argument(
        "--min_question_chars", type=int, default=0, help="drop questions shorter than this (default: 0, off)"
    )
    steps.add_argument(
        "--decontaminate",
        metavar="EVAL_FILE",
        default=None,
        help=f"drop questions sharing {DECONTAMINATION_CHARS} consecutive characters with a question of this eval file",
    )
    steps.add_argument(
        "--difficulty_models",
        nargs="+",
        metavar="MODEL@URL",
        default=[],
        help="small models (name@base URL) that answer each MCQ; a question all of them get right is dropped",
    )
    steps.add_argument(
        "--difficulty_api_key", default=None, help="key for the difficulty model servers (default: none)"
    )
    steps.add_argument(
        "--keep_mcq_fraction",
        type=float,
        default=0.0,
        help="share of passing questions kept in closed form instead of rewritten (default: 0)",
    )
    steps.add_argument("--seed", type=int, default=42, help="seed of the closed-form selection (default: 42)")
    add_prompt_args(parser)
    return parser.parse_args(argv)


def parse_difficulty_models(specs):
    models = []
    for spec in specs:
        name, sep, url = spec.partition("@")
        if not sep or not name or not url:
            raise ValueError(f"--difficulty_models entry {spec!r} must look like MODEL@URL")
        models.append((name, normalize_api_url(url)))
    return models


_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\(?\**([A-Z])\b", re.IGNORECASE)


def chosen_letter(reply, letters):
    """The option letter a reply commits to ("The answer is X."), or None."""
    found = [m.upper() for m in _ANSWER_IS.findall(reply) if m.upper() in letters]
    if found:
        return found[-1]
    bare = reply.strip().strip(".()*").upper()
    return bare if bare in letters else None


FILTER_CATEGORIES = ("Pass", "Too Simple", "Ambiguous Answer", "Not Reformulatable")
FILTER_FORMAT = json_schema_format(
    "question_filter", {"category": {"type": "string", "enum": list(FILTER_CATEGORIES)}}
)
REFORMAT_FORMAT = json_schema_format(
    "verifiable_problem", {QUESTION: {"type": "string"}, ANSWER: {"type": "string"}}
)


def filter_category(reply):
    """The filter's verdict: `category` of a FILTER_FORMAT reply, else the reply itself (the bare
    category name the prompt asks for)."""
    try:
        category = extract_json_object(reply).get("category")
    except ParseError:
        return reply
    return category if isinstance(category, str) else reply


def parse_reformat(reply):
    obj = extract_json_object(reply)
    if set(obj) != {QUESTION, ANSWER}:
        raise ParseError(f"expected exactly the keys {QUESTION!r} and {ANSWER!r}, got {sorted(obj)}")
    if not all(isinstance(obj[k], str) and obj[k].strip() for k in (QUESTION, ANSWER)):
        raise ParseError("both values must be non-empty strings")
    return obj[QUESTION].strip(), obj[ANSWER].strip()


def closed_form(item):
    return closed_form_question(item), f"{item['answer_idx']}. {item['options'][item['answer_idx']]}"


def keep_closed(process_id, fraction, seed):
    # Seeded per item, so a resumed run picks the same items as an uninterrupted one.
    return fraction > 0 and random.Random(f"{seed}:{process_id}").random() < fraction


def dropped(item, by, reason, **details):
    return {**item, "status": DROPPED, "dropped_by": by, "reason": reason, **details}


def main(args):
    # ------------------------------------------------------------------ load (nothing written yet)
    try:
        items = load_items(args.data_path, MCQ)
        prompts = {
            name: load_prompt(name, args.language, args.prompt_dir)
            for name in ("construct_filter", "construct_reformat", "construct_difficulty")
        }
        api_url = normalize_api_url(args.api_url)
        small_models = parse_difficulty_models(args.difficulty_models)
        decontaminator = None
        if args.decontaminate:
            sources = load_eval_file(args.decontaminate, {"question": MCQ["question"]})
            eval_questions = [it["question"] for its in sources.values() for it in its]
            decontaminator = Decontaminator(eval_questions)
        api_key = resolve_api_key(args.api_key, api_url)
        if args.max_parse_retries < 0 or args.num_process < 1:
            raise ValueError("--max_parse_retries must be >= 0 and --num_process >= 1")
        if not 0.0 <= args.keep_mcq_fraction <= 1.0:
            raise ValueError(f"--keep_mcq_fraction must be in [0, 1], got {args.keep_mcq_fraction}")
        check_batch_args(args)
    except (InputError, PromptError, ValueError) as err:
        sys.exit(f"error: {err}")
    for index, item in enumerate(items):
        item["process_id"] = index + 1
    if args.limit_num is not None:
        items = items[: args.limit_num]

    name = Path(args.data_path).stem
    output_dir = Path(args.output_dir)
    store = ItemStore(output_dir / name)
    save_args(output_dir / f"{name}_args.json", args, secret_keys=("api_key", "difficulty_api_key"))
    print(
        f"{len(items)} items from {args.data_path}; {len(store.done_ids())} already saved in {store.directory}"
    )

    # ------------------------------------------------------------------ run
    async def run():
        stats = Usage()
        common = dict(
            concurrency=args.num_process,
            max_retries=args.max_retries,
            timeout=args.timeout,
            backoff_base=args.backoff_base,
            stats=stats,
        )
        # Only the main model goes through batches: the difficulty models are local servers.
        batch = batch_queue_for(args, api_url, api_key, output_dir / f"{name}_batches", args.timeout)
        llm = LLMClient(
            api_url,
            args.model_name,
            api_key,
            max_tokens=args.max_tokens,
            batch=batch,
            structured_output=not args.no_structured_output,
            **common,
        )
        small = [
            LLMClient(
                url, model, args.difficulty_api_key, max_tokens=args.max_tokens, temperature=0.0, **common
            )
            for model, url in small_models
        ]

        async def answer_mcq(client, item):
            prompt = prompts["construct_difficulty"].format(
                question=item["question"], options=render_options(item["options"])
            )
            reply = await client.chat(prompt)
            letter = chosen_letter(reply.text, set(item["options"]))
            return {"model": client.model, "letter": letter, "correct": letter == item["answer_idx"]}

        async def process(item):
            if len(item["question"].strip()) < args.min_question_chars:
                return dropped(item, "length", f"question shorter than {args.min_question_chars} characters")
            if decontaminator is not None:
                hit = decontaminator.match(item["question"])
                if hit is not None:
                    return dropped(
                        item,
                        "decontamination",
                        f"shares {DECONTAMINATION_CHARS} characters with eval question {hit}",
                        eval_match=eval_questions[hit],
                    )
            fields = dict(
                question=item["question"],
                options=render_options(item["options"]),
                answer=item["answer"],
                answer_idx=item["answer_idx"],
            )
            record = dict(item)
            if small:
                answers = await asyncio.gather(*(answer_mcq(client, item) for client in small))
                record["difficulty"] = answers
                if all(a["correct"] for a in answers):
                    return dropped(record, "difficulty", "every difficulty model answered correctly")
            if args.filter_data:
                reply = await llm.chat(
                    prompts["construct_filter"].format(**fields), response_format=FILTER_FORMAT
                )
                verdict = filter_category(reply.text)
                record["filter_reply"] = verdict
                if "pass" not in verdict.lower():
                    first_line = verdict.strip().splitlines()[0] if verdict.strip() else "(empty reply)"
                    return dropped(record, "filter", f"filter: {first_line[:200]}")
            if keep_closed(item["process_id"], args.keep_mcq_fraction, args.seed):
                question, answer = closed_form(item)
                return {**record, QUESTION: question, ANSWER: answer, "closed_form": True, "status": KEPT}
            replies = []
            for _ in range(args.max_parse_retries + 1):
                prompt = prompts["construct_reformat"].format(**fields)
                reply = (await llm.chat(prompt, response_format=REFORMAT_FORMAT)).text
                replies.append(reply)
                try:
                    question, answer = parse_reformat(reply)
                except ParseError as err:
                    problem = str(err)
                    continue
                return {**record, QUESTION: question, ANSWER: answer, "closed_form": False, "status": KEPT}
            return {
                **record,
                "status": GIVEN_UP,
                "reason": f"rewrite not valid after {len(replies)} tries: {problem}",
                "reformat_replies": replies,
            }

        start = time.time()
        try:
            counts = await run_all(
                items,
                process,
                store,
                key=lambda it: it["process_id"],
                desc="construct",
                concurrency=args.num_process,
                stats=stats,
                retry_given_up=args.retry_given_up,
            )
        finally:
            for client in [llm, *small]:
                await client.close()
        return counts, stats, time.time() - start

    try:
        counts, stats, seconds = asyncio.run(run())
    except KeyboardInterrupt:
        sys.exit(f"interrupted; finished items are saved in {store.directory}, rerun to resume")
    except StructuredOutputUnsupported as err:
        sys.exit(f"error: {err}; finished items are saved in {store.directory}")

    # ------------------------------------------------------------------ save
    wanted = {str(it["process_id"]) for it in items}
    records = [r for r in store.all() if str(r.get("process_id")) in wanted]
    total = Usage()
    for record in records:
        total.add(Usage(**record.get("usage", {})))
    by_status = Counter(r["status"] for r in records)
    dropped_by = Counter(r["dropped_by"] for r in records if r["status"] == DROPPED)
    summary = {
        "items": len(records),
        "status": dict(by_status),
        "dropped_by": dict(dropped_by),
        "closed_form": sum(1 for r in records if r.get("closed_form")),
        "usage_this_run": stats.as_dict(),
        "usage_all_items": total.as_dict(),
        "seconds_this_run": round(seconds, 1),
    }
    final_path = output_dir / f"{name}_final_{len(records)}.json"
    write_json_atomic(final_path, records)
    write_json_atomic(output_dir / f"{name}_summary.json", summary)
    print(f"this run: {dict(counts)} in {seconds:.1f} s; usage {stats.as_dict()}")
    print(f"all items: {dict(by_status)}; dropped by {dict(dropped_by)}; usage {total.as_dict()}")
    if by_status[GIVEN_UP]:
        print(
            f"{by_status[GIVEN_UP]} given up (reasons in the output); rerun with --retry_given_up to try again"
        )
    print(f"saved {final_path}")


if __name__ == "__main__":
    main(parse_args())
