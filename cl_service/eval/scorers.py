"""Per-task scoring rules of MLLM-CL, reproduced from the reference evaluation scripts, and ``score_predictions``.

A scorer is ``(prediction, answers, question, metadata) -> float`` in ``[0, 1]``. Rules follow the reference
scripts (``llava/eval/CoIN/eval_{ai2d,pvqa,sci,finvis,ocr,sat}.py``) character for character, quirks included;
where the reference needs an external service (Math: an LLM judge; GUI: a closed server) the rule is ours
and rule-based. Each scorer's docstring quotes its rule.

Shared conventions:
- ``answers`` is a list; single-reference rules return the best score over the references (the official
  test sets have exactly one, except OCR whose rule itself is "any reference").
- The DCL scorers (``rs``, ``ad``, ``med``, ``sci``, ``fin``) score a prediction containing ``"Unanswerable"``
  (case-sensitive) as wrong, because their reference scripts skip it while still counting it in the total.
  The ACL scripts (OCR, counting) have no such check, so ``ocr``/``count`` do not apply it either.

Metadata keys read (all optional, the extra fields of a test.json record):
- ``sci``: ``source`` (``"MapQA"`` selects the MapQA rules); without it, the reference's rule: the image file
  name's prefix before ``_`` (``image``) in AI2D/TQA/VQA/SciVerse means exact match, anything else MapQA.
- ``ocr``: ``answer_type`` (``"Handwritten Mathematical Expression Recognition"`` or ``"HME100k"``) or
  ``dataset_name == "HME100k"`` select the handwritten-math rule.
- ``math``: ``question_type``, ``answer_type``, ``precision``, ``choices``, ``answer_option`` (MathVista).
- ``gui``: ``choices`` / ``options`` (list, dict letter->text, or its Python repr) or keys ``"A"``, ``"B"``...
"""

from __future__ import annotations

import ast
import functools
import math
import re
from typing import Any, Callable, Protocol

from cl_service.registry import Registry


class Scorer(Protocol):
    """``(prediction, answers, question, metadata) -> score in [0, 1]``."""

    def __call__(self, prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float: ...


SCORERS: Registry[Scorer] = Registry("scorer")

#: DCL reference scripts skip (count as wrong) any prediction containing this string.
UNANSWERABLE = "Unanswerable"


def _best(answers: list[str], rule: Callable[[str], float]) -> float:
    return max((float(rule(a)) for a in answers), default=0.0)


def _dcl(fn: Scorer) -> Scorer:
    """Apply the DCL scripts' ``if 'Unanswerable' in result['text']: continue`` (counted as wrong)."""

    @functools.wraps(fn)
    def scorer(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
        if UNANSWERABLE in prediction:
            return 0.0
        return fn(prediction, answers, question, metadata)

    return scorer


# ------------------------------------------------------------------------------------------- DCL tasks
def _rs_ad_rule(pred: str, gt: str) -> bool:
    pred, gt = pred.lower(), gt.lower()
    if " " in gt:
        return gt in pred
    gt = gt.replace(".", "")
    if " " in pred:
        # Plain substring tests, not true word boundaries: "yes" hits "eyes are" via "yes ".
        return (" " + gt) in pred or (gt + " ") in pred or (gt + ".") in pred or (gt + ",") in pred
    return gt in pred


@_dcl
def score_rs_ad(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
    """RS and AD (reference ``eval_ai2d.py``), all lower-cased:

    "if the reference answer has spaces, correct when it occurs in the prediction; if one word (its '.'
    removed), it must occur followed by space, '.', ',' or preceded by space in a multi-word prediction,
    or as a substring of a one-word prediction." A prediction containing "Unanswerable" is wrong.
    """
    return _best(answers, lambda gt: _rs_ad_rule(prediction, gt))


SCORERS.register("rs", score_rs_ad)
SCORERS.register("ad", score_rs_ad)


@SCORERS.register("med")
@_dcl
def score_med(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
    """Med (reference ``eval_pvqa.py``): "correct when the reference occurs in the prediction (substring)",
    both lower-cased. A prediction containing "Unanswerable" is wrong."""
    return _best(answers, lambda gt: gt.lower() in prediction.lower())


_SCI_EXACT_PREFIXES = frozenset({"AI2D", "TQA", "VQA", "SciVerse"})


def _is_mapqa(metadata: dict[str, Any]) -> bool:
    source = metadata.get("source")
    if isinstance(source, str) and source:
        return source.lower() == "mapqa"
    image = metadata.get("image")
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    if isinstance(image, str) and image:
        # The reference decides by file name: "<prefix>_..." with prefix AI2D/TQA/VQA/SciVerse is exact-match.
        return image.split("/")[-1].split("_")[0] not in _SCI_EXACT_PREFIXES
    return False


def _mapqa_rule(pred: str, gt: str, question: str) -> float:
    if "Which states" in question:
        gt_list = gt.split(",")  # no strip, as the reference: "a, b" only matches a prediction spaced alike
        pred_list = pred.split(",")
        return sum(1 for g in gt_list if g in pred_list) / len(gt_list)
    return float(gt in pred)


@SCORERS.register("sci")
@_dcl
def score_sci(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
    """Sci (reference ``eval_sci.py``), all lower-cased:

    "exact match for AI2D/TQA/SciVerse/VQA items; MapQA 'Which states…' questions get partial credit =
    share of reference states found in the comma-split prediction, other MapQA questions substring."
    The comma split keeps surrounding spaces (no strip), and "Which states" is matched case-sensitively in
    the question. MapQA-ness: ``metadata["source"] == "MapQA"``, else the image file-name prefix (module doc).
    A prediction containing "Unanswerable" is wrong.
    """
    pred = prediction.lower()
    if _is_mapqa(metadata):
        return _best(answers, lambda gt: _mapqa_rule(pred, gt.lower(), question))
    return _best(answers, lambda gt: gt.lower() == pred)


@SCORERS.register("fin")
@_dcl
def score_fin(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
    """Fin (reference ``eval_finvis.py``): "exact match after removing spaces and '.' from the prediction",
    both lower-cased; the reference answer itself is only lower-cased. "Unanswerable" is wrong."""
    pred = prediction.lower().replace(" ", "").replace(".", "")
    return _best(answers, lambda gt: gt.lower() == pred)


# ------------------------------------------------------------------------------------------- ACL tasks
_HME_TYPES = frozenset({"Handwritten Mathematical Expression Recognition", "HME100k"})


@SCORERS.register("ocr")
def score_ocr(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
    """OCR (reference ``eval_ocr.py``, the OCRBench rule): "a hit when any reference in the list occurs in the
    prediction (case-insensitive)", both stripped and with newlines removed; "handwritten math expressions:
    whitespace removed, case-sensitive" (spaces and newlines removed from both, no lower-casing)."""
    hme = metadata.get("answer_type") in _HME_TYPES or metadata.get("dataset_name") == "HME100k"
    if hme:
        pred = prediction.strip().replace(" ", "").replace("\n", "")
        return float(any(gt.strip().replace(" ", "").replace("\n", "") in pred for gt in answers))
    pred = prediction.lower().strip().replace("\n", "")
    return float(any(gt.lower().strip().replace("\n", "") in pred for gt in answers))


def _count_norm(s: str) -> str:
    return s.lower().strip().replace(" ", "").replace("\n", "").replace(".", "")


@SCORERS.register("count")
def score_count(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
    """Counting / visual perception (reference ``eval_sat.py``, CV-Bench): "remove spaces, newlines and '.',
    then substring": both lower-cased, stripped and so cleaned; correct when the reference occurs in the
    prediction (so "2" also hits "12": the reference's quirk)."""
    pred = _count_norm(prediction)
    return _best(answers, lambda gt: _count_norm(gt) in pred)


# -------------------------------------------------------------------------------- options and numbers
_OPTION_PUNCT = ".()[],:;!*#{}"
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


def _choices(metadata: dict[str, Any]) -> dict[str, str]:
    """Letter -> option text from ``choices``/``options`` (list, dict or its repr) or ``"A"``.. keys."""
    raw = metadata.get("choices", metadata.get("options"))
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)  # VLMEvalKit/MathVista TSVs store the list as its Python repr
        except (ValueError, SyntaxError):
            raw = None
    if isinstance(raw, (list, tuple)):
        return {chr(65 + i): str(v) for i, v in enumerate(raw)}
    if isinstance(raw, dict):
        return {str(k).strip().upper(): str(v) for k, v in raw.items()}
    return {k: str(v) for k, v in metadata.items() if len(k) == 1 and k.isupper() and isinstance(v, str)}


def _pick_option(response: str, choices: dict[str, str], letters: list[str]) -> str | None:
    """The option letter a response names, or None. Rules in order:

    1. the stripped response equals an option's text (MathVista's quick path);
    2. VLMEvalKit ``can_infer_option``: replace ``.()[],:;!*#{}`` by spaces, split; exactly one of the letters
       appears as a token;
    3. VLMEvalKit ``can_infer_text``: exactly one option text occurs in the lower-cased response;
    4. ``(X)`` anywhere, then "answer is X"/"answer: X" (what the reference's LLM judge would read).
    """
    stripped = response.strip()
    exact = [k for k, v in choices.items() if v.strip() == stripped]
    if len(exact) == 1:
        return exact[0]
    mod = response
    for c in _OPTION_PUNCT:
        mod = mod.replace(c, " ")
    tokens = set(mod.split())
    found = [c for c in letters if c in tokens]
    if len(found) == 1:
        return found[0]
    low = response.lower()
    texts = [k for k, v in choices.items() if v.lower() in low]
    if len(texts) == 1:
        return texts[0]
    # "(b)" counts in any case (MathVista's normalizer); after "answer is" only a capital, so "a dog" is no "A".
    for pat in (r"\(([A-Za-z])\)", r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\b"):
        for m in re.finditer(pat, response):
            if m.group(1).upper() in letters:
                return m.group(1).upper()
    return None


def _gold_letters(answers: list[str], choices: dict[str, str], letters: list[str], option: Any) -> set[str]:
    gold = {str(option).strip().upper()} if option not in (None, "") else set()
    for a in answers:
        a = a.strip()
        gold |= {k for k, v in choices.items() if v.strip() == a}
        cleaned = a.strip("()[]. ").upper()
        if len(cleaned) == 1 and cleaned in letters:
            gold.add(cleaned)
    return gold


def _letters(choices: dict[str, str], answers: list[str]) -> list[str]:
    if choices:
        return sorted(choices)
    # Without options, A-H plus any gold letter: a wider default would turn words like "I" into options.
    extra = {a.strip("()[]. ").upper() for a in answers if len(a.strip("()[]. ")) == 1}
    return sorted(set("ABCDEFGH") | {e for e in extra if e.isalpha()})


def _to_number(text: str) -> float | None:
    """The response itself if it parses as a number (the reference's prefetch), else its last number."""
    try:
        return float(text.strip())
    except ValueError:
        pass
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _infer_answer_type(answer: str) -> str:
    try:
        int(answer.strip())
        return "integer"
    except ValueError:
        pass
    try:
        float(answer.strip())
        return "float"
    except ValueError:
        return "text"


def _str_field(metadata: dict[str, Any], key: str) -> str:
    """A string field, or "" when absent or not a string (a TSV's missing cell arrives as NaN)."""
    v = metadata.get(key)
    return v.strip() if isinstance(v, str) else ""


def _precision(value: Any) -> int | None:
    try:
        p = float(value)
    except (TypeError, ValueError):
        return None
    return int(p) if math.isfinite(p) and p >= 0 else None


def _math_free_form(prediction: str, answer: str, answer_type: str, precision: Any) -> bool:
    if answer_type == "integer":
        value = _to_number(prediction)
        try:
            # MathVista normalizes with str(int(float(x))): truncation, so 14.7 reads as 14 (its quirk).
            return value is not None and math.isfinite(value) and int(value) == int(float(answer))
        except ValueError:
            return False
    if answer_type == "float":
        value = _to_number(prediction)
        try:
            gold = float(answer)
        except ValueError:
            return False
        if value is None or not math.isfinite(value):
            return False
        digits = _precision(precision)
        if digits is None:  # missing (None, "", NaN from a TSV): the answer's own decimals
            digits = len(answer.strip().split(".")[1]) if "." in answer else 0
        return round(value, digits) == round(gold, digits)
    if answer_type == "list":
        return re.sub(r"\s+", "", prediction) == re.sub(r"\s+", "", answer)
    return prediction.strip() == answer.strip()


@SCORERS.register("math")
def score_math(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
    """Math (MathVista testmini). The reference asks an LLM judge; this is the rule-based replacement.

    - ``question_type == "multi_choice"`` (default when ``choices`` exist): the option letter is read from the
      prediction (exact option text; a lone option letter token; a unique option text inside it; ``(X)`` or
      "answer is X") and must be the gold option (``answer_option``, or the option whose text equals the
      answer, or an answer that is itself a letter).
    - free form: the prediction itself if numeric, else its last number; ``answer_type`` ``integer``:
      ``int(x) == int(answer)`` (MathVista's truncating ``int(float(x))``); ``float``: equal after rounding
      both to ``precision`` decimals (default: the answer's own decimals); ``list``: equal ignoring spaces;
      ``text``: exact after strip. Without ``answer_type`` it is inferred from the answer.
    """
    choices = _choices(metadata)
    qtype = _str_field(metadata, "question_type") or ("multi_choice" if choices else "free_form")
    if qtype == "multi_choice":
        letters = _letters(choices, answers)
        picked = _pick_option(prediction, choices, letters)
        return float(picked is not None and picked in _gold_letters(answers, choices, letters,
                                                                     metadata.get("answer_option")))
    return _best(answers, lambda gt: _math_free_form(
        prediction, gt, _str_field(metadata, "answer_type") or _infer_answer_type(gt), metadata.get("precision")))


@SCORERS.register("gui")
def score_gui(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
    """GUI agent (MMT-Bench GUI subset; the reference scores on a closed server): "option letter match".

    The letter is read from the prediction as for ``math`` multiple choice (letters: the options in metadata,
    else A-H plus the gold letter) and compared with the gold letter (the answer, or the option whose text
    equals the answer)."""
    choices = _choices(metadata)
    letters = _letters(choices, answers)
    picked = _pick_option(prediction, choices, letters)
    return float(picked is not None and picked in _gold_letters(answers, choices, letters,
                                                                 metadata.get("answer_option")))


# ---------------------------------------------------------------------------------------------- generic
@SCORERS.register("exact")
def score_exact(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
    """Generic: "correct when the stripped, lower-cased prediction equals a stripped, lower-cased reference"."""
    pred = prediction.strip().lower()
    return _best(answers, lambda gt: gt.strip().lower() == pred)


@SCORERS.register("contains")
def score_contains(prediction: str, answers: list[str], question: str, metadata: dict[str, Any]) -> float:
    """Generic: "correct when a stripped, lower-cased reference occurs in the lower-cased prediction"."""
    pred = prediction.lower()
    return _best(answers, lambda gt: gt.strip().lower() in pred)


# ---------------------------------------------------------------------------------------------- files
def _as_answers(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def score_predictions(scorer_name: str, annotations: list[dict[str, Any]],
                      predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """Score reference-format predictions against test.json annotations.

    ``annotations``: ``{question_id, image, text, answer, ...}`` records (``answer`` a string or a list);
    their fields other than ``question_id``, ``text`` and ``answer`` reach the scorer as metadata.
    ``predictions``: JSONL records ``{question_id, prompt, text, answer_id, model_id, metadata}``; record k
    is called "line k" (1-based) in errors. Question ids match after ``str()`` (1 and "1" are the same).
    A missing prediction scores 0 and is counted in ``missing``; a malformed record, a duplicate, or a
    prediction for an unknown question id raises ``ValueError``. Returns
    ``{"accuracy": percent, "n": len(annotations), "scorer": name, "missing": k}``.
    """
    scorer = SCORERS.get(scorer_name)
    index: dict[str, dict[str, Any]] = {}
    for n, ann in enumerate(annotations, 1):
        if not isinstance(ann, dict) or "question_id" not in ann or ann.get("answer") in (None, []):
            raise ValueError(f"annotation record {n}: needs 'question_id' and a non-empty 'answer': {ann!r:.200}")
        qid = str(ann["question_id"])
        if qid in index:
            raise ValueError(f"annotation record {n}: duplicate question_id {qid!r}")
        index[qid] = ann
    if not index:
        raise ValueError("no annotations to score")
    by_qid: dict[str, dict[str, Any]] = {}
    for n, rec in enumerate(predictions, 1):
        if not isinstance(rec, dict) or "question_id" not in rec or not isinstance(rec.get("text"), str):
            raise ValueError(f"prediction line {n}: needs 'question_id' and a string 'text': {rec!r:.200}")
        qid = str(rec["question_id"])
        if qid not in index:
            raise ValueError(f"prediction line {n}: question_id {qid!r} is not in the annotations")
        if qid in by_qid:
            raise ValueError(f"prediction line {n}: duplicate prediction for question_id {qid!r}")
        by_qid[qid] = rec
    total, missing = 0.0, 0
    for qid, ann in index.items():
        rec = by_qid.get(qid)
        if rec is None:
            missing += 1
            continue
        question = ann.get("text") if isinstance(ann.get("text"), str) else str(rec.get("prompt", ""))
        metadata = {k: v for k, v in ann.items() if k not in ("question_id", "text", "answer")}
        score = float(scorer(rec["text"], _as_answers(ann["answer"]), question, metadata))
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"scorer {scorer_name!r} returned {score} for question_id {qid!r}; expected [0, 1]")
        total += score
    return {"accuracy": 100.0 * total / len(index), "n": len(index), "scorer": scorer_name, "missing": missing}
