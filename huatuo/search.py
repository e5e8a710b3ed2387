"""Pure pieces of the reasoning-path search: parsing the LLM's JSON replies (each parser next to the
response_format schema sent for that reply), choosing refinement strategies, and rendering a chain of
thought as a stream of search. No I/O, so each is testable alone.

The parsers accept what the schema asks for and, as fallback, what the prompts ask for in free text
(a JSON object wrapped in prose or a fence; a bare True/False), so servers run with
--no_structured_output, or that ignore response_format, give the same results."""

import json
import random
import re

from huatuo.llm import json_object_schema, json_schema_format

# Refinement strategies and the prompt file each one uses.
STRATEGIES = {
    "Backtracking": "search_backtracking",
    "Exploring New Paths": "search_exploring_new_paths",
    "Verification": "search_verification",
    "Correction": "search_correction",
}
# Backtracking needs an earlier refinement to go back to, so it is never the first one.
FIRST_STRATEGIES = tuple(s for s in STRATEGIES if s != "Backtracking")
# Every CoT reply, initial or refined, must end with these actions in this order.
COT_TAIL = ("Inner Thinking", "Final Conclusion", "Verification")

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


class ParseError(ValueError):
    """An LLM reply that does not have the asked-for shape; the message says what is wrong."""


def extract_json_object(text):
    """The first JSON object in `text`: the whole reply, a ```json fenced block, or the span from the
    first "{" to the last "}" (models often wrap the object in a sentence). Raw line breaks inside
    strings are accepted: models asked for multi-paragraph text often write them unescaped."""
    candidates = [text.strip()]
    candidates += [m.strip() for m in _FENCE.findall(text)]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            obj = json.loads(candidate, strict=False)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise ParseError("no JSON object found in the reply")


# A strict schema cannot leave "title" out of the steps that have none, so there it is null.
COT_FORMAT = json_schema_format(
    "chain_of_thought",
    {
        "CoT": {
            "type": "array",
            "items": json_object_schema(
                {
                    "action": {"type": "string", "enum": list(COT_TAIL)},  # each action once
                    "title": {"type": ["string", "null"]},
                    "content": {"type": "string"},
                }
            ),
        }
    },
)
NATURAL_REASONING_FORMAT = json_schema_format("natural_reasoning", {"NaturalReasoning": {"type": "string"}})
VERDICT_FORMAT = json_schema_format("verdict", {"agrees": {"type": "boolean"}})


def parse_cot(text):
    """The step list of a `{"CoT": [...]}` reply; raises ParseError unless every step has a string
    `action` and `content` and the last three actions are Inner Thinking, Final Conclusion,
    Verification. A null title (see COT_FORMAT) is dropped, so the steps read as without a schema."""
    obj = extract_json_object(text)
    steps = obj.get("CoT")
    if not isinstance(steps, list) or not steps:
        raise ParseError('the reply has no non-empty "CoT" list')
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            raise ParseError(f"CoT step {i} is not an object")
        for key in ("action", "content"):
            if not isinstance(step.get(key), str):
                raise ParseError(f'CoT step {i} has no string "{key}"')
    tail = tuple(step["action"] for step in steps[-3:])
    if tail != COT_TAIL:
        raise ParseError(f"the last three actions are {list(tail)}, expected {list(COT_TAIL)}")
    return [{k: v for k, v in step.items() if not (k == "title" and v is None)} for step in steps]


def parse_natural_reasoning(text):
    """The text of a `{"NaturalReasoning": "..."}` reply; raises ParseError if missing or empty."""
    value = extract_json_object(text).get("NaturalReasoning")
    if not isinstance(value, str) or not value.strip():
        raise ParseError('the reply has no non-empty "NaturalReasoning" string')
    return value


def parse_final_response(text):
    """The final answer as written; only an empty reply is rejected."""
    if not text.strip():
        raise ParseError("the reply is empty")
    return text.strip()


def verdict(text):
    """The verifier's judgement: `agrees` of a VERDICT_FORMAT reply, else (the plain reply the prompt
    asks for) True when "true" appears anywhere in the lower-cased reply."""
    try:
        agrees = extract_json_object(text).get("agrees")
    except ParseError:
        agrees = None
    return agrees if isinstance(agrees, bool) else "true" in text.lower()


def final_conclusion(long_cot):
    """The content of the Final Conclusion step (the one before the closing Verification)."""
    return long_cot[-2]["content"]


def previous_reasoning(long_cot):
    """The reasoning shown to a refinement prompt: every step but the closing Verification, as JSON."""
    return json.dumps(long_cot[:-1], ensure_ascii=False, indent=2)


def extend_cot(long_cot, new_steps):
    """A refinement's steps replace the old closing Verification."""
    return long_cot[:-1] + new_steps


def item_rng(seed, process_id):
    """A generator per item, so strategy choices do not depend on scheduling order or on resuming."""
    return random.Random(f"{seed}:{process_id}")


def pick_strategy(rng, depth_index):
    """A refinement strategy chosen at random; Backtracking is excluded at depth 0."""
    pool = FIRST_STRATEGIES if depth_index == 0 else tuple(STRATEGIES)
    return rng.choice(pool)


def render_stream(long_cot):
    """The steps as a stream of search: `### {title or action}` then the content, Final Conclusion
    headed as Conclusion."""
    blocks = []
    for step in long_cot:
        heading = step.get("title") or step["action"].replace("Final Conclusion", "Conclusion")
        blocks.append(f"### {heading}\n{step['content']}\n")
    return "\n".join(blocks).strip()
