"""Stage 1a: search for a complex reasoning path to each verifiable problem, guided by a verifier.

Per problem (question x, ground-truth answer y*):
  1. the LLM reasons about x as JSON steps {"CoT": [...Inner Thinking, Final Conclusion, Verification]};
  2. an LLM verifier compares the Final Conclusion with y* (True/False);
  3. while wrong, up to --max_search_depth times: refine with a strategy drawn at random from
     Backtracking, Exploring New Paths, Verification, Correction (never Backtracking first), then verify;
  4. up to --max_search_attempts attempts, each from a fresh initial chain of thought;
  5. with --efficient_search, a problem every attempt failed gets one last refinement that is shown y*
     (and asked not to let on); it counts as verified (Label_CoT);
  6. the verified chain, rendered as a stream of search, is rewritten as natural first-person thinking
     (Complex_CoT), and the LLM answers x from that thinking (Response).
Every call but the final answer's (free text) sends a json_schema response_format, defined in
huatuo/search.py: the CoT steps (initial, refinements, Label_CoT), the verdict {"agrees": bool} and
{"NaturalReasoning": str}. --no_structured_output leaves it out; the parsers accept both the schema's
JSON and the free-text forms the prompts ask for.

    export OPENAI_API_KEY=...
    python search_for_complex_reasoning_path.py --data_path data/demo_data.json --efficient_search True \\
        --max_search_attempts 1 --max_search_depth 2 --model_name gpt-4o
    # the paper's setting (T=3, N=3) on a local OpenAI-compatible server, Chinese prompts
    python search_for_complex_reasoning_path.py --data_path data/demo_data.json --max_search_attempts 3 \\
        --max_search_depth 3 --model_name Qwen2.5-72B-Instruct --api_url http://127.0.0.1:8000/v1 \\
        --num_process 64 --language zh
    # through the OpenAI Batch API at half the price: one batch per search round; rerun the same
    # command after any interruption and it follows the batches already submitted
    python search_for_complex_reasoning_path.py --data_path data/demo_data.json --max_search_attempts 3 \\
        --max_search_depth 3 --model_name gpt-4o --batch_api --num_process 50000

Input: a JSON list with `Open-ended Verifiable Question` and `Ground-True Answer` per item (the output of
construct_verifiable_medical_problems.py; items it marked dropped or given up are passed over). Other keys
are carried along.

Output, under --output_dir (default output_data), for an input file <name>.json:
  <name>_CoT_search/<process_id>.json      one record per item, saved as it finishes; a rerun resumes
  <name>_CoT_search_<N>.json               the N items with a verified path (SFT data)
  <name>_CoT_search_given_up_<M>.json      the M items given up, each with its `reason` (if any)
  <name>_CoT_search_summary.json, <name>_CoT_search_args.json (no API key)
  <name>_CoT_search_batches/               with --batch_api: the submitted batches and their results
Record: the input keys plus `process_id` (1-based position in the input file), `status` (kept or
given_up), `reason`, `Long_CoT` (steps of the last attempt), `verify` (one bool per verifier call of that
attempt), `response_type` (its trail: Init_CoT, Re_CoT_<strategy>..., Label_CoT), `failed_attempts`
(earlier attempts, same three keys), `llm_log` (every query and raw reply, with its step), `usage` (calls,
retries and tokens) and, when kept, `Question`, `Complex_CoT`, `Response`.
"""

import argparse
import asyncio
import re
import sys
import time
from collections import Counter
from pathlib import Path

from huatuo.batch import add_batch_args, batch_queue_for, check_batch_args
from huatuo.items import ANSWER, QUESTION, VERIFIABLE, InputError, check_items, read_json
from huatuo.llm import (
    LLMClient,
    LLMError,
    StructuredOutputUnsupported,
    Usage,
    add_api_args,
    normalize_api_url,
    resolve_api_key,
)
from huatuo.prompts import PromptError, add_prompt_args, load_prompt
from huatuo.search import (
    COT_FORMAT,
    NATURAL_REASONING_FORMAT,
    STRATEGIES,
    VERDICT_FORMAT,
    ParseError,
    extend_cot,
    final_conclusion,
    item_rng,
    parse_cot,
    parse_final_response,
    parse_natural_reasoning,
    pick_strategy,
    previous_reasoning,
    render_stream,
    verdict,
)
from huatuo.store import DROPPED, GIVEN_UP, KEPT, ItemStore, run_all, save_args, write_json_atomic

PROMPTS = (
    "search_init",
    *STRATEGIES.values(),
    "search_label",
    "verify",
    "reformat_natural",
    "final_response",
)


def str2bool(value):
    """A real boolean flag: True/False/true/false/1/0 (argparse's type=bool makes "False" true)."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/true/false/1/0, got {value!r}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Search verifier-checked complex reasoning paths for verifiable medical problems.",
        epilog="The API key is read from --api_key or OPENAI_API_KEY and is never written to any file.",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data_path",
        required=True,
        help="JSON list of verifiable problems: 'Open-ended Verifiable Question', 'Ground-True Answer'",
    )
    data.add_argument("--limit_num", type=int, default=None, help="process only the first N items")
    data.add_argument(
        "--output_dir", default="output_data", help="per-item files and merged output (default: output_data)"
    )
    data.add_argument(
        "--retry_given_up", action="store_true", help="on resume, redo items that were given up"
    )

    search = parser.add_argument_group("search")
    search.add_argument(
        "--max_search_attempts",
        type=int,
        default=1,
        help="attempts per problem, each from a fresh initial CoT (default: 1; the paper used 3)",
    )
    search.add_argument(
        "--max_search_depth",
        type=int,
        default=2,
        help="refinements per attempt (default: 2; the paper used 3)",
    )
    search.add_argument(
        "--efficient_search",
        type=str2bool,
        default=True,
        metavar="BOOL",
        help="rescue problems all attempts failed with a refinement that is shown the answer (default: True)",
    )
    search.add_argument("--seed", type=int, default=42, help="seed of the strategy choice (default: 42)")
    search.add_argument(
        "--max_parse_retries",
        type=int,
        default=2,
        help="asks again when a reply does not have the asked-for JSON shape, then gives up the item (default: 2)",
    )

    add_api_args(parser, "reasons and verifies", num_process=5)
    add_batch_args(parser)
    add_prompt_args(parser)
    return parser.parse_args(argv)


class GiveUp(Exception):
    """The item cannot be finished; the message is its recorded reason."""


def load_problems(path, limit_num):
    """The items to search, each with its 1-based `process_id`. Items an earlier stage marked dropped or
    given up are passed over; the others must hold both verifiable keys (checked before any API call)."""
    items = check_items(read_json(path), {}, path)
    for index, item in enumerate(items):
        item["process_id"] = index + 1
    if limit_num is not None:
        items = items[:limit_num]
    problems = []
    for index, item in enumerate(items):
        if item.get("status") in (DROPPED, GIVEN_UP):
            continue
        for key, check in VERIFIABLE.items():
            problem = "is missing" if key not in item else check(item[key])
            if problem:
                raise InputError(f"{path}: item {index}, key {key!r} {problem}")
        problems.append(item)
    return problems, len(items) - len(problems)


async def search(llm, prompts, item, args):
    """Run the search on one problem; returns its record, kept or given up with the reason."""
    question, answer = item[QUESTION], item[ANSWER]
    rng = item_rng(args.seed, item["process_id"])
    record = {**item, "Long_CoT": [], "verify": [], "response_type": [], "failed_attempts": [], "llm_log": []}

    async def ask(step, prompt, parse, response_format, **fields):
        query = prompts[prompt].format(**fields)
        for _ in range(args.max_parse_retries + 1):
            reply = (await llm.chat(query, response_format=response_format)).text
            record["llm_log"].append({"step": step, "query": query, "response": reply})
            try:
                return parse(reply)
            except ParseError as err:
                problem = err
        raise GiveUp(f"{step}: no valid reply in {args.max_parse_retries + 1} tries ({problem})")

    async def verified():
        conclusion = final_conclusion(record["Long_CoT"])
        ok = await ask("verify", "verify", verdict, VERDICT_FORMAT, response=conclusion, reference=answer)
        record["verify"].append(ok)
        return ok

    async def refine(step, prompt, **fields):
        reasoning = previous_reasoning(record["Long_CoT"])
        new_steps = await ask(
            step, prompt, parse_cot, COT_FORMAT, question=question, previous_reasoning=reasoning, **fields
        )
        record["Long_CoT"] = extend_cot(record["Long_CoT"], new_steps)
        record["response_type"].append(step)

    try:
        for attempt in range(args.max_search_attempts):
            if attempt > 0:
                record["failed_attempts"].append(
                    {k: record[k] for k in ("Long_CoT", "verify", "response_type")}
                )
                record.update(Long_CoT=[], verify=[], response_type=[])
            record["Long_CoT"] = await ask(
                "Init_CoT", "search_init", parse_cot, COT_FORMAT, question=question
            )
            record["response_type"].append("Init_CoT")
            ok = await verified()
            for depth in range(args.max_search_depth):
                if ok:
                    break
                strategy = pick_strategy(rng, depth)
                await refine(f"Re_CoT_{strategy}", STRATEGIES[strategy])
                ok = await verified()
            if ok:
                break
        if not ok:
            if not args.efficient_search:
                raise GiveUp(
                    f"not verified in {args.max_search_attempts} attempt(s) of depth {args.max_search_depth}"
                    " and --efficient_search is off"
                )
            await refine("Label_CoT", "search_label", answer=answer)
            # The answer was shown to the LLM, so this chain counts as verified without asking.
            record["verify"].append(True)

        thinking = render_stream(record["Long_CoT"])
        natural = await ask(
            "reformat_natural",
            "reformat_natural",
            parse_natural_reasoning,
            NATURAL_REASONING_FORMAT,
            thought_process=thinking,
            question=question,
        )
        # Free text: the answer a reader sees, with nothing to parse out of it.
        response = await ask(
            "final_response",
            "final_response",
            parse_final_response,
            None,
            thinking=natural,
            question=question,
        )
    except (GiveUp, LLMError) as err:
        return {**record, "status": GIVEN_UP, "reason": str(err)}
    return {**record, "status": KEPT, "Question": question, "Complex_CoT": natural, "Response": response}


def main(args):
    # ------------------------------------------------------------------ load (nothing written yet)
    try:
        items, passed_over = load_problems(args.data_path, args.limit_num)
        prompts = {name: load_prompt(name, args.language, args.prompt_dir) for name in PROMPTS}
        api_url = normalize_api_url(args.api_url)
        api_key = resolve_api_key(args.api_key, api_url)
        if args.max_search_attempts < 1 or args.max_search_depth < 0:
            raise ValueError("--max_search_attempts must be >= 1 and --max_search_depth >= 0")
        if args.max_parse_retries < 0 or args.num_process < 1:
            raise ValueError("--max_parse_retries must be >= 0 and --num_process >= 1")
        check_batch_args(args)
    except (InputError, PromptError, ValueError) as err:
        sys.exit(f"error: {err}")

    name = f"{Path(args.data_path).stem}_CoT_search"
    output_dir = Path(args.output_dir)
    store = ItemStore(output_dir / name)
    save_args(output_dir / f"{name}_args.json", args)
    print(
        f"{len(items)} problems from {args.data_path} ({passed_over} passed over as dropped earlier); "
        f"{len(store.done_ids())} already saved in {store.directory}"
    )

    # ------------------------------------------------------------------ run
    async def run():
        stats = Usage()
        llm = LLMClient(
            api_url,
            args.model_name,
            api_key,
            concurrency=args.num_process,
            max_retries=args.max_retries,
            timeout=args.timeout,
            stats=stats,
            structured_output=not args.no_structured_output,
            max_tokens=args.max_tokens,
            batch=batch_queue_for(args, api_url, api_key, output_dir / f"{name}_batches", args.timeout),
        )
        try:
            counts = await run_all(
                items,
                lambda item: search(llm, prompts, item, args),
                store,
                key=lambda item: item["process_id"],
                desc="search",
                concurrency=args.num_process,
                stats=stats,
                retry_given_up=args.retry_given_up,
            )
        finally:
            await llm.close()
        return counts, stats

    start = time.time()
    try:
        counts, stats = asyncio.run(run())
    except KeyboardInterrupt:
        sys.exit(f"interrupted; finished items are saved in {store.directory}, rerun to resume")
    except StructuredOutputUnsupported as err:
        sys.exit(f"error: {err}; finished items are saved in {store.directory}")
    seconds = time.time() - start

    # ------------------------------------------------------------------ save
    wanted = {item["process_id"] for item in items}
    records = [r for r in store.all() if r.get("process_id") in wanted]
    kept = [r for r in records if r["status"] == KEPT]
    given_up = [r for r in records if r["status"] == GIVEN_UP]
    total = Usage()
    for record in records:
        total.add(Usage(**record.get("usage", {})))
    found_by = Counter(
        "Label_CoT" if r["response_type"][-1] == "Label_CoT" else f"attempt {len(r['failed_attempts']) + 1}"
        for r in kept
    )
    summary = {
        "items": len(records),
        "kept": len(kept),
        "given_up": len(given_up),
        "passed_over": passed_over,
        "kept_by": dict(sorted(found_by.items())),
        "usage_this_run": stats.as_dict(),
        "usage_all_items": total.as_dict(),
        "seconds_this_run": round(seconds, 1),
    }
    # Merged files are rebuilt from the per-item store; older ones with other counts would mislead.
    merged = re.compile(rf"{re.escape(name)}_(given_up_)?\d+\.json")
    for stale in output_dir.glob(f"{name}_*.json"):
        if merged.fullmatch(stale.name):
            stale.unlink()
    kept_path = output_dir / f"{name}_{len(kept)}.json"
    write_json_atomic(kept_path, kept)
    if given_up:
        write_json_atomic(output_dir / f"{name}_given_up_{len(given_up)}.json", given_up)
    write_json_atomic(output_dir / f"{name}_summary.json", summary)
    print(f"this run: {dict(counts)} in {seconds:.1f} s; usage {stats.as_dict()}")
    print(f"all items: kept {len(kept)} {dict(found_by)}, given up {len(given_up)}; usage {total.as_dict()}")
    if given_up:
        print(f"{len(given_up)} given up (reasons in the output); rerun with --retry_given_up to try again")
    print(f"saved {kept_path}")


if __name__ == "__main__":
    main(parse_args())
