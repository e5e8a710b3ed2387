"""Which option a multiple-choice reply commits to.

    from evaluation.scorer import score
    score("## Thinking\n\n...\n\n## Final Response\n\nThe answer is (C).", {"A": "...", "B": "...", "C": "..."})
    # ScoreResult(first='C', last='C', rule='explicit')

Only the answer part of a reply is read: the text after the last `</think>` (R1-style models) and then
after the last `## Final Response` heading (the HuatuoGPT-o1 format). Rules are tried in order and the
first one that finds anything decides; each yields every option it found, in reading order, so `first`
and `last` are the earliest and the latest mention. Last match is the honest reading of a reply that
changes its mind; first match is reported for comparison with the original evaluation.

1. explicit: a stated answer. "The answer is (C)", "Answer: **C**", "correct option is C", "I'd go
   with C", "\\boxed{C}", "Option C is correct", "Heparin is the best choice", "答案是C", "选C",
   "C项正确", a line holding only the answer ("**C**", "C. Heparin"), or a lead followed by an option's
   text instead of its letter ("The answer is yes"). Hedged or questioning statements ("Maybe the
   answer is B?") are thinking aloud and do not count.
Without a stated answer, rules 2-4 read the conclusion (the last paragraph) before the whole answer part:
2. letter: a bare option letter set off by punctuation, markdown or CJK ("(C)", "C. text"), skipping
   the article "A", the pronoun "I", letters that belong to a term (vitamin C, hepatitis B, B cells,
   E. coli, HLA-B) or to an option's own text ("Vitamin A"), and option lists restated line by line.
3. verdict: an option's whole text opens the answer or a concluding sentence ("Yes, ...", "Maybe.",
   "In conclusion, no.").
4. option_text: an option's text anywhere, ignoring case, punctuation and markdown, on word boundaries,
   preferring the longest option where one option's text contains another's.
5. similar: the answer part is a near copy of one option's text (a typo, a truncated reply).
When nothing matches, first, last and rule are None: the reply has no recognisable answer.

Case is ignored unless two options differ only in case (genotypes), and the symbols that tell options
apart (<, =, +, arrows) are kept.

`score_original` reimplements the rules of the original release, with which its published scores were
computed; it exists to show how the two differ (bench/bench_scorer_agreement.py) and to reproduce them.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import re
import unicodedata
from typing import NamedTuple


class ScoreResult(NamedTuple):
    first: str | None
    last: str | None
    rule: str | None


NO_ANSWER = ScoreResult(None, None, None)

# --------------------------------------------------------------------------------------------------
# Answer region
# --------------------------------------------------------------------------------------------------

FINAL_RESPONSE_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]*final[ \t]+response[ \t]*:?[ \t]*$", re.I | re.M)


def answer_region(reply: str) -> str:
    """The part of a reply that holds its answer: after the thinking, after a `## Final Response` heading.

    NFKC folds full-width letters and brackets (common in Chinese replies) into ASCII ones.
    """
    text = unicodedata.normalize("NFKC", reply or "")
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    else:
        # A thinking block cut off before it closed is all there is to read.
        text = text.replace("<think>", "", 1)
    headings = list(FINAL_RESPONSE_HEADING.finditer(text))
    if headings:
        text = text[headings[-1].end() :]
    return text.strip()


# --------------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------------

CJK = r"\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"


# Words, plus the symbols that tell options apart ("BMI < 25" vs "BMI = 25", "K+", "↑ ↓").
_TOKEN = re.compile(r"[^\W_]+|[<>=≤≥≠±+%↑↓→←]")


def normalize(text: str, fold: bool = True) -> str:
    """Words separated by single spaces, lower-cased unless `fold` is off: 'Crohn's  **Disease**.' -> "crohn s disease"."""
    text = unicodedata.normalize("NFKC", text)
    return " ".join(_TOKEN.findall(text.lower() if fold else text))


def _token_pattern(tokens: list[str]) -> str:
    """A regex for these tokens with any punctuation between words (none needed next to a symbol)."""
    pattern = re.escape(tokens[0])
    for prev, tok in itertools.pairwise(tokens):
        joint = r"[\W_]+" if prev[-1].isalnum() and tok[0].isalnum() else r"[\W_]*?"
        pattern += joint + re.escape(tok)
    return pattern


_CJK_CHAR = re.compile(f"[{CJK}]")


def _has_cjk(text: str) -> bool:
    return _CJK_CHAR.search(text) is not None


def _valid_letters(options: dict[str, str]) -> set[str]:
    return {str(k).strip().upper() for k in options}


class _Options(dict):
    """Option letter -> normalized text, longest first so a containing option wins over a contained one.

    Case is ignored unless two options differ only in case (genotypes: "Tt x tt" and "TT x tt").
    """

    def __init__(self, options: dict[str, str]):
        texts = {str(k).strip().upper(): str(v) for k, v in options.items()}
        folded = [normalize(v) for v in texts.values()]
        self.fold = len(set(folded)) == len(folded)
        norm = {k: normalize(v, self.fold) for k, v in texts.items()}
        super().__init__(sorted(((k, v) for k, v in norm.items() if v), key=lambda kv: -len(kv[1])))

    def norm(self, text: str) -> str:
        return normalize(text, self.fold)

    def only(self, letter: str) -> _Options:
        one = _Options({})
        one.fold, one[letter] = self.fold, self[letter]
        return one


def _option_at_start(text: str, norm_options: _Options) -> str | None:
    """The letter of the longest option whose text opens `text` and ends on a word boundary."""
    words = norm_options.norm(text[:400])
    for prefix in ("", "the ", "option ", "choice ", "The ", "Option ", "Choice "):
        for letter, opt in norm_options.items():
            candidate = prefix + opt
            if words == candidate or words.startswith(candidate + " "):
                return letter
    return None


def _outermost(spans: list[tuple[int, int, str]]) -> list[tuple[int, str]]:
    """(start, letter) of the option mentions that no longer mention covers ("pulmonary hypertension" over
    "hypertension", "Hard palate, upper lip" over "Hard palate")."""
    return [
        (s, letter)
        for s, e, letter in spans
        if not any(s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, _ in spans)
    ]


def _result(found: list[tuple[int, str]], rule: str) -> ScoreResult | None:
    if not found:
        return None
    found.sort(key=lambda x: x[0])
    return ScoreResult(found[0][1], found[-1][1], rule)


# --------------------------------------------------------------------------------------------------
# Rule 1: explicit answer statements
# --------------------------------------------------------------------------------------------------

_VERB = r"(?:is|was|would\s+be|should\s+be|will\s+be|must\s+be|=|[:：])"
_LEADS = [
    # "The (correct/final) answer (choice) is", "Answer:", "**Answer:**", "answer would be"
    rf"\banswer(?:\s+(?:choice|option|letter)|\s+to\s+(?:the|this)\s+question)?(?:\*\*|__)?\s*{_VERB}",
    rf"\bfinal\s+answer(?:\s*{_VERB})?",
    rf"\b(?:correct|best|right|final|most\s+appropriate|most\s+likely)\s+(?:option|choice|response|letter)\s*(?:\*\*)?\s*{_VERB}",
    r"\b(?:i\s+would|i'd|i\s+will|i'll|we\s+should|i\s+should|let's)?\s*(?:choose|chose|select|selected|pick|picked|go\s+with)\b",
    # A line that is only an "Answer" heading, with the answer on the following line.
    r"(?m:^[ \t#>*_]*(?:final\s+|correct\s+)?answer[ \t*_]*$)",
    # Chinese: 答案是 / 答案为 / 答案：/ 答案选 / 正确选项是 / 选C / 选择C (选项 alone is the noun "option").
    r"答案\s*(?:应该是|应为|應為|应是|就是|是|为|為|选|選|[:：])",
    r"(?:正确|正確|最佳|最合适的)(?:的)?(?:选项|選項|答案)\s*(?:是|为|為|[:：])",
    r"(?:选|選)(?!项|項)(?:择|擇)?",
]
_LEAD = re.compile("|".join(f"(?:{p})" for p in _LEADS), re.I)
# What may sit between a lead and the letter: punctuation, markdown, LaTeX wrappers, one hedge-free adverb
# or the word "option".
_MARKS = r"(?:[\s:：*_\"'“”‘’`(\[（【{}<>=-]|\$|\\boxed\{|\\text\{|\\textbf\{)*"
_FILLER = re.compile(
    _MARKS
    + r"(?:(?:most\s+)?likely|probably|clearly|therefore|thus|definitely|indeed|option|choice|letter|选项|選項|项|項)?"
    + _MARKS,
    re.I,
)
_LETTER_AFTER_LEAD = re.compile(r"([A-Z])(?![A-Za-z0-9_])|(?<=\()([a-z])\)")
_BOXED = re.compile(r"\\boxed\{\s*(?:\\text(?:bf)?\{\s*)?\(?([A-Z])\)?\s*\}")
# The letter stated first: "Option C is correct", "(C) is the right answer", "C项正确", "C是正确的".
_LETTER_THEN_VERDICT = re.compile(
    r"(?<![A-Za-z0-9])(?:(?:option|choice)\s*)?[(\[*]*([A-Z])[)\]*]*\s*"
    r"(?:is|would\s+be|seems)\s+(?:the\s+)?(?:most\s+)?(?:correct|right|best)(?:\s+(?:answer|option|choice))?\b"
    r"|(?<![A-Za-z0-9])([A-Z])\s*(?:选项|選項|项|項)?\s*(?:是|为|為)?\s*(?:正确|正確)(?!吗|嗎)",
    re.I,
)

# An option's text stated as the answer: "Clopidogrel is the best choice." (the text is checked in code).
_TEXT_THEN_VERDICT = re.compile(
    r"(?:\*\*|__)?\s+(?:is|would\s+be|remains)\s+(?:the\s+)?(?:best|correct|right|most\s+appropriate|most\s+likely)"
    r"\s+(?:answer|choice|option)\b",
    re.I,
)
# A line that is only the answer: "**C**", "(C)", "C. Heparin", "Option C". Checked against the option's text in code.
_ANSWER_LINE = re.compile(
    r"^[ \t>#*_-]*(?:(?i:option|choice)\s+)?[(\[]?([A-Z])[)\]]?(?:[.:)]?[ \t]+(.*?)|[.:)]?)[ \t*_.]*$", re.M
)


def _answer_lines(text: str, valid: set[str], norm_options: _Options) -> list[tuple[int, str]]:
    bare, labelled = [], []
    for m in _ANSWER_LINE.finditer(text):
        letter, rest = m.group(1), m.group(2)
        if letter not in valid:
            continue
        if not rest:
            bare.append((m.start(1), letter))
        elif norm_options.norm(rest) == norm_options.get(letter):
            labelled.append((m.start(1), letter))
    # Three or more options restated one per line are the question's list, not a choice.
    if len({letter for _, letter in labelled}) >= 3:
        labelled = []
    return bare + labelled


_QUESTION_MARK_AFTER = re.compile(r"[)\]*_\s]*[?？]")
_HEDGE = re.compile(
    r"\b(?:maybe|perhaps|if|whether|might|could|unless|wonder|not\s+sure)\b|会不会|是否|可能|如果", re.I
)


def _tentative(text: str, lead_start: int, answer_end: int) -> bool:
    """A hedged or questioning statement ("Maybe the answer is B?", "答案可能是B？") is thinking aloud."""
    sentence_start = max(text.rfind(c, 0, lead_start) for c in ".!?\n。！？")
    if _HEDGE.search(text[sentence_start + 1 : lead_start]):
        return True
    return _QUESTION_MARK_AFTER.match(text[answer_end : answer_end + 6]) is not None


# After "Answer: I", a lower-case word or an apostrophe makes the letter the pronoun ("I think", "I'd").
_PRONOUN_AFTER = re.compile(r"\s+[a-z]|['’]")
# Punctuation or the line's end right after the letter: it is the answer, not the capital of an option's text.
_LETTER_ENDS = re.compile(r"[ \t]*(?:[.):\]】）*_,;!?。，\n]|$)")


def _explicit(text: str, valid: set[str], norm_options: _Options):
    found = []
    for lead in _LEAD.finditer(text):
        start = _FILLER.match(text, lead.end()).end()
        line_end = text.find("\n", start + 1)
        # A lead followed by an option's text instead of its letter: "The answer is yes."
        opt = _option_at_start(text[start : line_end if line_end > 0 else None], norm_options)
        m = _LETTER_AFTER_LEAD.match(text, start)
        letter, after = ((m.group(1) or m.group(2).upper()), text[m.end() :]) if m else (None, "")
        if letter == "I" and _PRONOUN_AFTER.match(after):
            letter = None  # "Answer: I think ..." is the pronoun
        # A letter followed by a word is an option text that opens with a capital when some option's text
        # fits: "The answer is A stable genome.", "... is H+ ions".
        if letter in valid and (opt is None or _LETTER_ENDS.match(after)):
            if not _tentative(text, lead.start(), m.end()):
                found.append((m.start(), letter))
        elif opt is not None and not _tentative(text, lead.start(), start):
            found.append((start, opt))
    for m in _BOXED.finditer(text):
        if m.group(1) in valid:
            found.append((m.start(1), m.group(1)))
    for m in _LETTER_THEN_VERDICT.finditer(text):
        letter, pos = (m.group(1), m.start(1)) if m.group(1) else (m.group(2), m.start(2))
        if letter in valid and letter.isupper() and not _part_of_term(text, pos):
            found.append((pos, letter))
    for m in _TEXT_THEN_VERDICT.finditer(text):
        # Longest option first, across sentence marks: option texts may hold full stops of their own.
        words = norm_options.norm(text[max(0, m.start() - 600) : m.start()])
        for letter, opt in norm_options.items():
            if words == opt or words.endswith(" " + opt):
                found.append((m.start(), letter))
                break
    found += _answer_lines(text, valid, norm_options)
    # One statement can be seen by two patterns ("answer is \boxed{C}"): keep each position once.
    return _result(sorted(set(found)), "explicit")


# --------------------------------------------------------------------------------------------------
# Rule 2: bare option letters
# --------------------------------------------------------------------------------------------------

# Words after which a capital letter names a thing, not an option; a list ("vitamins A, D and E") continues it.
_TERM_WORDS = (
    r"vitamins?|hepatitis|type|types|group|groups|class|factor|factors|protein|proteins|phase|stage|grade|zone|"
    r"serotype|subtype|strain|lead|schedule|plan|part|section|appendix|table|figure|fig|step|level|category|"
    r"tier|complex|site|region|domain|chain|chains|fiber|fibers|fibre|fibres|band|bands|wave|waves|cell|cells|"
    r"compartment|ring|loop|segment|point|blood|immunoglobulin|botulinum|toxin|influenza|cluster|vaccine|"
    r"antigen|antigens|allele|gene|genes|locus|sample|patient|person|drug|compound|tube|well|line|pole|bundle"
)
_TERM_BEFORE = re.compile(rf"\b(?:{_TERM_WORDS})\s+(?:[A-Z]\s*(?:,|and|or|&|/)\s*)*$", re.I)
_OPTION_WORD_BEFORE = re.compile(
    r"(?:\b(?:option|choice|answer|letter|options|choices)|选项|選項|选|選)\s*[(\[*]*$", re.I
)
# After a letter and a space, these words make it a statement about an option ("B is correct", "C fits").
_VERB_AFTER = re.compile(
    r"\s+(?:is|was|seems|appears|would|could|fits|matches|remains|best|correctly|describes|represents|"
    r"explains|aligns|accounts|corresponds|answers)\b"
)
_BARE = re.compile(r"(?<![A-Za-z0-9_])([A-Z])(?![A-Za-z0-9_])")
_HYPHEN_AFTER = re.compile(r"[-'’][A-Za-z0-9]")
_HYPHEN_BEFORE = re.compile(r"[A-Za-z0-9][-'’]$")
_LIST_INDENT = re.compile(r"[ \t>*_#-]*")
_WORD_AFTER = re.compile(r" +[A-Za-z0-9]")
_GENUS_AFTER = re.compile(r"\.\s+[a-z]")


def _part_of_term(text: str, pos: int) -> bool:
    """Whether the capital letter at `pos` belongs to a term rather than naming an option."""
    before, after = text[max(0, pos - 80) : pos], text[pos + 1 : pos + 3]
    if _HYPHEN_AFTER.match(after) or _HYPHEN_BEFORE.search(before):
        return True  # B-cell, I'm, HLA-B, anti-D
    return _TERM_BEFORE.search(before) is not None


def _option_text_masks(option_texts: list[str], valid: set[str]) -> list[re.Pattern]:
    """Patterns for the option texts that contain a standalone option letter ("Vitamin A")."""
    masks = []
    for opt in option_texts:
        opt = unicodedata.normalize("NFKC", opt).strip()
        if len(opt) > 2 and any(m.group(1) in valid for m in _BARE.finditer(opt)):
            pattern = r"(?<![^\W_])" + _token_pattern(_TOKEN.findall(opt)) + r"(?![^\W_])"
            masks.append(re.compile(pattern, re.I))
    return masks


def _mask_option_texts(text: str, masks: list[re.Pattern]) -> str:
    """Blank out quoted option texts that contain a standalone option letter, so 'Vitamin A' is no vote for A."""
    for mask in masks:
        text = mask.sub(lambda m: " " * len(m.group(0)), text)
    return text


def _labelled(text: str, pos: int, letter: str, norm_options: _Options) -> bool:
    """Whether the letter at `pos` is followed by its own option text, as in "C. Hypertension"."""
    return letter in norm_options and _option_at_start(text[pos + 1 :], norm_options.only(letter)) == letter


def _letters(text: str, option_set: _OptionSet):
    valid, norm_options = option_set.valid, option_set.norm_options
    masked = _mask_option_texts(text, option_set.masks)
    labelled = {
        m.start(1): m.group(1)
        for m in _BARE.finditer(masked)
        if m.group(1) in valid and _labelled(text, m.start(1), m.group(1), norm_options)
    }
    # Three or more options restated one per line ("A. ...\nB. ...") are a list being discussed, not a choice.
    line_starts = {p for p in labelled if _LIST_INDENT.fullmatch(text[text.rfind("\n", 0, p) + 1 : p])}
    if len({labelled[p] for p in line_starts}) < 3:
        line_starts = set()
    found = [(p, letter) for p, letter in labelled.items() if p not in line_starts]
    for m in _BARE.finditer(masked):
        letter, pos = m.group(1), m.start(1)
        if letter not in valid or pos in labelled:
            continue
        if _part_of_term(masked, pos):
            continue
        after = masked[pos + 1 : pos + 40]
        named = _OPTION_WORD_BEFORE.search(masked[max(0, pos - 20) : pos]) is not None
        if _WORD_AFTER.match(after) and not named:
            # "A patient", "I think", "B cells", "A 45-year-old": a word follows, so only a verb
            # ("B is correct") makes it an option.
            if letter in "AI" or not _VERB_AFTER.match(after):
                continue
        if _GENUS_AFTER.match(after) and not named:
            continue  # E. coli, S. aureus: a genus, unless the option's own text follows (handled above)
        found.append((pos, letter))
    return _result(found, "letter")


# --------------------------------------------------------------------------------------------------
# Rules 3-5: option texts
# --------------------------------------------------------------------------------------------------


_CONCLUDING = r"(?:in\s+(?:conclusion|summary|short)|overall|therefore|thus|hence|so)[\s,:]+"
_VERDICT_OPENING = rf"(?:\A[\s#*_>\"'“]*|(?:^|(?<=[.!?]))[ \t*_]*(?i:{_CONCLUDING})[*_\"'“]*)"
_VERDICT_CLOSING = r"[\s*_\"'”]*(?:[.,;:!?)\n—]|(?<=\s)[–-]|$)"


def _verdict_patterns(norm_options: _Options) -> list[tuple[str, re.Pattern]]:
    flags = re.M | (re.I if norm_options.fold else 0)
    return [
        (
            letter,
            re.compile(rf"{_VERDICT_OPENING}({_token_pattern(opt.split(' '))}){_VERDICT_CLOSING}", flags),
        )
        for letter, opt in norm_options.items()
    ]


def _verdict(text: str, option_set: _OptionSet):
    """Option texts that open the answer or a concluding sentence as a whole clause: "Yes, ...",
    "In conclusion, maybe." (but not "No significant difference ...")."""
    found = []
    for letter, pattern in option_set.verdicts:
        found += [(m.start(1), m.end(1), letter) for m in pattern.finditer(text)]
    return _result(_outermost(found), "verdict")


def _option_texts(text: str, norm_options: _Options):
    words = f" {norm_options.norm(text)} "
    spans = []
    for letter, opt in norm_options.items():
        needle = opt if _has_cjk(opt) else f" {opt} "
        start = words.find(needle)
        while start >= 0:
            spans.append((start, start + len(needle), letter))
            start = words.find(needle, start + 1)
    return _result(_outermost(spans), "option_text")


SIMILARITY_THRESHOLD = 0.8


def _similar(text: str, norm_options: _Options):
    words = norm_options.norm(text)
    if not words:
        return None
    ratios = {}
    for k, v in norm_options.items():
        matcher = difflib.SequenceMatcher(None, words, v)
        # Both quick ratios bound ratio() from above, so an option they rule out could not reach the
        # threshold; ratio() itself is quadratic in the reply's length, and a long reply is never similar.
        if (
            matcher.real_quick_ratio() >= SIMILARITY_THRESHOLD
            and matcher.quick_ratio() >= SIMILARITY_THRESHOLD
        ):
            ratios[k] = matcher.ratio()
    best = max(ratios, key=ratios.get, default=None)
    if best is None or ratios[best] < SIMILARITY_THRESHOLD:
        return None
    return ScoreResult(best, best, "similar")


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


class _OptionSet:
    """One question's options with what the rules derive from them. Built once per distinct set of
    options (a question scored for several runs or samples); the patterns of rules 2-3 are compiled
    only when a reply first reaches those rules, since most replies state their answer."""

    def __init__(self, items: tuple[tuple[str, str], ...]):
        self.items = items
        self.valid = _valid_letters(dict(items))
        self.norm_options = _Options(dict(items))

    @functools.cached_property
    def masks(self) -> list[re.Pattern]:
        return _option_text_masks([text for _, text in self.items], self.valid)

    @functools.cached_property
    def verdicts(self) -> list[tuple[str, re.Pattern]]:
        return _verdict_patterns(self.norm_options)


# Room for a benchmark source of a few thousand questions, so rescoring finds them prepared; the compiled
# patterns take about 17 KB a question, so memory stays under 70 MB.
@functools.lru_cache(maxsize=4096)
def _option_set(items: tuple[tuple[str, str], ...]) -> _OptionSet:
    return _OptionSet(items)


_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def score(reply: str, options: dict[str, str]) -> ScoreResult:
    """The option letters a reply states first and last, and the rule that found them (all None if none)."""
    text = answer_region(reply)
    if not text or not options:
        return NO_ANSWER
    option_set = _option_set(tuple((str(k), str(v)) for k, v in options.items()))
    explicit = _explicit(text, option_set.valid, option_set.norm_options)
    if explicit:
        return explicit
    # Without a stated answer, the conclusion speaks for the reply: a closing "Yes." or "Naloxone." beats
    # letters and option texts the reasoning went through on the way. A conclusion that states an answer
    # outside the options ("The answer is none of the above.") is read alone, so the reasoning's mentions
    # of options do not stand in for it.
    conclusion = _PARAGRAPH_BREAK.split(text)[-1]
    regions = [conclusion] if _LEAD.search(conclusion) else [conclusion, text]
    for region in dict.fromkeys(regions):
        found = (
            _letters(region, option_set)
            or _verdict(region, option_set)
            or _option_texts(region, option_set.norm_options)
        )
        if found:
            return found
    return _similar(text, option_set.norm_options) or NO_ANSWER


def score_original(reply: str, options: dict[str, str]) -> ScoreResult:
    """The original release's rules, kept to compare against and to reproduce its published numbers.

    1) "answer is" directly followed by a capital A-N; 2) any capital among the first len(options)
    letters with a non-word character, CJK or a line edge on both sides (a capital A followed by a
    space excluded); 3) case-insensitive substring search for option texts; 4) the most similar
    option text, so it always answers something. Only the text after "## Final Response\\n\\n" is read.
    """
    text = (reply or "").split("## Final Response\n\n")[-1]
    found = [m.group(1) for m in re.finditer(r"answer is\s*?([A-N])", text, re.S)]
    if found:
        return ScoreResult(found[0], found[-1], "original_answer_is")
    letters = "ABCDEFGHIJKLMN"[: len(options)]
    pattern = rf"(?:^|[^\w]|[\u4e00-\u9fff])(?!A )([{letters}])(?:[^\w]|[\u4e00-\u9fff]|$)"
    found = [m.group(1) for m in re.finditer(pattern, text, re.S)]
    if found:
        return ScoreResult(found[0], found[-1], "original_letter")
    lower = text.lower()
    hits = [(lower.find(str(v).lower()), lower.rfind(str(v).lower()), k) for k, v in options.items()]
    hits = [h for h in hits if h[0] >= 0]
    if hits:
        return ScoreResult(min(hits)[2], max(hits, key=lambda h: h[1])[2], "original_option_text")
    letter, best = None, -1.0
    for k, v in options.items():
        ratio = difflib.SequenceMatcher(None, str(v).lower(), lower).ratio()
        if ratio >= best:
            letter, best = k, ratio
    return ScoreResult(letter, letter, "original_similar")
