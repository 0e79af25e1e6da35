"""Every scorer's rule and quirk on concrete examples, and ``score_predictions``' bookkeeping and errors."""

from __future__ import annotations

import random

import pytest

from cl_service.eval.scorers import SCORERS, score_predictions
from cl_service.registry import UnknownName

pytestmark = pytest.mark.timeout(60)


def s(name: str, pred: str, answers, question: str = "", **metadata) -> float:
    return SCORERS.get(name)(pred, [answers] if isinstance(answers, str) else answers, question, metadata)


def test_registry_holds_exactly_the_documented_scorers_with_docstrings():
    assert SCORERS.names() == ["ad", "contains", "count", "exact", "fin", "gui", "math", "med", "ocr", "rs", "sci"]
    assert SCORERS.get("rs") is SCORERS.get("ad")
    for name in SCORERS:
        assert (SCORERS.get(name).__doc__ or "").strip(), name


@pytest.mark.parametrize("name", ["rs", "ad"])
@pytest.mark.parametrize("pred,gt,expected", [
    ("There is a Parking Lot here", "parking lot", 1.0),   # multi-word reference: substring
    ("a parking area", "parking lot", 0.0),
    ("Yes.", "yes", 1.0),                                   # one-word prediction: substring
    ("noyes", "yes", 1.0),
    ("yes, it is", "yes", 1.0),                             # "yes," in a multi-word prediction
    ("the answer is no", "no", 1.0),                        # " no"
    ("i know it", "no", 0.0),                               # "no" only inside a word
    ("yesterday it rained", "yes", 0.0),
    ("eyes are open", "yes", 1.0),                          # quirk: "yes " is a plain substring test
    ("3 buildings", "3.", 1.0),                             # '.' removed from a one-word reference
    ("rural", "Rural", 1.0),
])
def test_rs_ad_rule(name, pred, gt, expected):
    assert s(name, pred, gt) == expected


@pytest.mark.parametrize("name", ["rs", "ad", "med", "sci", "fin"])
def test_dcl_scorers_count_unanswerable_as_wrong_case_sensitively(name):
    assert s(name, "yes", "yes") == 1.0
    assert s(name, "Unanswerable", "unanswerable") == 0.0   # would be a hit under every DCL rule otherwise
    # the reference tests 'Unanswerable' in text, so the lower-case word does not trigger it
    assert s(name, "unanswerable", "unanswerable") == 1.0


def test_acl_scorers_do_not_apply_the_unanswerable_rule():
    # eval_ocr.py / eval_sat.py have no such check
    assert s("ocr", "Unanswerable hello", "hello") == 1.0
    assert s("count", "Unanswerable 3", "3") == 1.0


def test_med_is_case_insensitive_substring():
    assert s("med", "Yes, definitely", "yes") == 1.0
    assert s("med", "FIBROSIS of the liver", "fibrosis") == 1.0
    assert s("med", "no", "yes") == 0.0


def test_sci_exact_match_items_by_image_prefix():
    for prefix in ("AI2D", "TQA", "VQA", "SciVerse"):
        meta = {"image": f"Sci/images/{prefix}_0001.png"}
        assert s("sci", "B", "b", **meta) == 1.0       # lower-cased
        assert s("sci", "B.", "b", **meta) == 0.0      # exact, no cleaning
        assert s("sci", "b ", "b", **meta) == 0.0      # no strip either
        assert s("sci", "the answer is b", "b", **meta) == 0.0


def test_sci_mapqa_partial_credit_splits_on_comma_without_strip():
    q = "Which states have the highest value in the USA?"
    meta = {"image": "images/MapQA_17.png"}
    assert s("sci", "alabama, texas", "Alabama, Texas, Ohio", q, **meta) == pytest.approx(2 / 3)
    assert s("sci", "Alabama, Texas, Ohio", "alabama, texas, ohio", q, **meta) == 1.0
    # quirk: " texas" (with its space) is not an element of ["alabama", "texas"]
    assert s("sci", "alabama,texas", "Alabama, Texas, Ohio", q, **meta) == pytest.approx(1 / 3)
    assert s("sci", "maine", "Alabama, Texas", q, **meta) == 0.0


def test_sci_other_mapqa_questions_are_substring_and_which_states_is_case_sensitive():
    meta = {"image": "MapQA_3.png"}
    assert s("sci", "The value is Low", "low", "What is the value of Ohio?", **meta) == 1.0
    assert s("sci", "high", "low", "What is the value of Ohio?", **meta) == 0.0
    # lower-case "which states": not the partial-credit rule, so plain substring of the whole list
    assert s("sci", "alabama, texas, ohio", "alabama, texas", "which states are red?", **meta) == 1.0
    assert s("sci", "alabama", "alabama, texas", "which states are red?", **meta) == 0.0


def test_sci_source_metadata_overrides_image_and_default_is_exact():
    q = "Which states are blue?"
    assert s("sci", "ohio", "ohio, iowa", q, source="MapQA", image="AI2D_1.png") == 0.5
    assert s("sci", "ohio", "ohio, iowa", q, source="AI2D", image="MapQA_1.png") == 0.0
    assert s("sci", "the answer is ohio", "ohio", "What state?") == 0.0   # no metadata: exact
    assert s("sci", "Ohio", "ohio", "What state?") == 1.0


def test_fin_removes_spaces_and_dots_from_prediction_only():
    assert s("fin", "A.", "a") == 1.0
    assert s("fin", " A . ", "A") == 1.0
    assert s("fin", "Ri se", "rise") == 1.0
    assert s("fin", "the answer is a", "a") == 0.0
    # quirk: the reference answer keeps its '.', the prediction loses it
    assert s("fin", "1.5", "1.5") == 0.0
    assert s("fin", "1.5", "15") == 1.0


def test_ocr_any_reference_case_insensitive():
    assert s("ocr", "It says HELLO world", ["Hello World", "bye"]) == 1.0
    assert s("ocr", "It says bye", ["Hello World", "bye"]) == 1.0
    assert s("ocr", "It says nothing", ["Hello World", "bye"]) == 0.0
    # newlines are removed (not replaced by spaces), spaces are kept
    assert s("ocr", "hello\nworld", ["hello world"]) == 0.0
    assert s("ocr", "hello\nworld", ["helloworld"]) == 1.0
    assert s("ocr", "  STOP  ", ["stop "]) == 1.0


@pytest.mark.parametrize("meta", [{"answer_type": "Handwritten Mathematical Expression Recognition"},
                                  {"answer_type": "HME100k"}, {"dataset_name": "HME100k"}])
def test_ocr_handwritten_math_removes_whitespace_and_is_case_sensitive(meta):
    assert s("ocr", "x^{2}", ["x ^ { 2 }"], **meta) == 1.0
    assert s("ocr", "X^{2}", ["x ^ { 2 }"], **meta) == 0.0
    assert s("ocr", "a\n+ b", ["a+b"], **meta) == 1.0
    assert s("ocr", "X", ["x"], answer_type="Regular Text Recognition") == 1.0


def test_count_cleans_both_sides_then_substring():
    assert s("count", "There are 3.", "3") == 1.0
    assert s("count", "Two.", "two") == 1.0
    assert s("count", "three", "3") == 0.0
    assert s("count", "12", "2") == 1.0             # quirk: substring, so "2" hits "12"
    assert s("count", "2\n1", "21") == 1.0          # newlines and spaces vanish
    assert s("count", "4", "4.") == 1.0


MC = {"question_type": "multi_choice", "choices": ["3/11", "8/11", "6/11", "3/5"]}


@pytest.mark.parametrize("pred,expected", [
    ("B", 1.0),
    ("The correct answer is (B) 8/11.", 1.0),
    ("8/11", 1.0),                                   # exact option text
    ("I think it is 8/11 of the shape", 1.0),        # unique option text inside
    ("(b)", 1.0),                                    # MathVista reads "(b)" as B
    ("The answer is B", 1.0),
    ("C", 0.0),
    ("A or B", 0.0),                                 # two letters: ambiguous, no credit
    ("the answer is a dog", 0.0),                    # a lower-case article is not option A
    ("no idea", 0.0),
])
def test_math_multi_choice(pred, expected):
    assert s("math", pred, "8/11", **MC) == expected


def test_math_multi_choice_metadata_forms():
    assert s("math", "B", "anything", answer_option="B", **MC) == 1.0
    assert s("math", "B", "8/11", question_type="multi_choice", choices="['3/11', '8/11', '6/11']") == 1.0
    assert s("math", "B", "B", choices=["x", "y"]) == 1.0         # question_type inferred from choices
    assert s("math", "y", "B", choices=["x", "y"]) == 1.0


@pytest.mark.parametrize("pred,answer,meta,expected", [
    ("14", "14", {"answer_type": "integer"}, 1.0),
    ("The missing number is 14.", "14", {"answer_type": "integer"}, 1.0),
    ("14.7", "14", {"answer_type": "integer"}, 1.0),           # MathVista's int(float(x)) truncates
    ("15", "14", {"answer_type": "integer"}, 0.0),
    ("no idea", "14", {"answer_type": "integer"}, 0.0),
    ("It is 1,000 dollars", "1000", {"answer_type": "integer"}, 1.0),
    ("x = -3", "-3", {"answer_type": "integer"}, 1.0),
    ("first 2 then 5", "5", {"answer_type": "integer"}, 1.0),   # last number wins
    ("Luca needs $1.45 to buy", "1.45", {"answer_type": "float", "precision": 2}, 1.0),
    ("1.4500001", "1.45", {"answer_type": "float", "precision": 2.0}, 1.0),
    ("1.46", "1.45", {"answer_type": "float", "precision": 2}, 0.0),
    ("0.61", "0.6", {"answer_type": "float", "precision": 1}, 1.0),
    ("0.64", "0.6", {"answer_type": "float"}, 1.0),            # precision defaults to the answer's decimals
    ("0.66", "0.6", {"answer_type": "float"}, 0.0),
    ("[2007,2008]", "[2007, 2008]", {"answer_type": "list"}, 1.0),
    (" blue ", "blue", {"answer_type": "text", "question_type": "free_form"}, 1.0),
    ("Blue", "blue", {"answer_type": "text"}, 0.0),
    ("7 apples", "7", {}, 1.0),                                  # type inferred from the answer
    ("2.50", "2.5", {}, 1.0),
    ("1.5", "1.50", {"answer_type": "float", "precision": float("nan")}, 1.0),   # TSV's missing cell
    ("9", "9", {"answer_type": float("nan"), "question_type": None}, 1.0),
])
def test_math_free_form(pred, answer, meta, expected):
    assert s("math", pred, answer, **meta) == expected


def test_gui_option_letter_match():
    assert s("gui", "C", "C") == 1.0
    assert s("gui", "(C)", "C") == 1.0
    assert s("gui", "The answer is C.", "C") == 1.0
    assert s("gui", "C. tap the back button", "C") == 1.0
    assert s("gui", "B", "C") == 0.0
    assert s("gui", "A B", "A") == 0.0
    opts = {"choices": {"A": "tap the back button", "B": "scroll down"}}
    assert s("gui", "scroll down", "B", **opts) == 1.0
    assert s("gui", "B", "scroll down", **opts) == 1.0
    assert s("gui", "A", "B", A="tap the back button", B="scroll down") == 0.0   # options as "A", "B" keys
    assert s("gui", "scroll down", "B", A="tap the back button", B="scroll down") == 1.0


def test_generic_exact_and_contains():
    assert s("exact", " Paris ", "paris") == 1.0
    assert s("exact", "Paris, France", "paris") == 0.0
    assert s("contains", "It is PARIS.", " paris") == 1.0
    assert s("contains", "London", ["paris", "london"]) == 1.0
    assert s("contains", "Rome", ["paris", "london"]) == 0.0


def test_every_scorer_returns_a_score_in_unit_interval_on_random_text():
    rng = random.Random(0)
    alphabet = "abcABC 0123.,\n()Which states"
    for name in SCORERS:
        for _ in range(50):
            pred = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
            gt = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
            v = SCORERS.get(name)(pred, [gt], "Which states?", {"image": "MapQA_1.png"})
            assert 0.0 <= v <= 1.0, (name, pred, gt)


# ------------------------------------------------------------------------------------- score_predictions
ANN = [
    {"question_id": "q1", "image": "a.png", "text": "Is it?", "answer": "yes"},
    {"question_id": "q2", "image": "b.png", "text": "Is it?", "answer": "no"},
    {"question_id": 3, "image": "c.png", "text": "What?", "answer": "fibrosis"},
]


def pred(qid, text, n=0):
    return {"question_id": qid, "prompt": "p", "text": text, "answer_id": f"x{n}", "model_id": "m", "metadata": {}}


def test_score_predictions_counts_missing_as_wrong_and_matches_ids_as_strings():
    r = score_predictions("med", ANN, [pred("q1", "Yes"), pred("3", "Fibrosis here")])
    assert r == {"accuracy": pytest.approx(200 / 3), "n": 3, "scorer": "med", "missing": 1}
    r = score_predictions("med", ANN, [pred("q1", "Yes"), pred("q2", "yes"), pred(3, "x")])
    assert r["accuracy"] == pytest.approx(100 / 3) and r["missing"] == 0


def test_score_predictions_passes_extra_fields_as_metadata_and_question_text():
    ann = [{"question_id": 1, "image": "Sci/MapQA_1.png", "text": "Which states are red?", "answer": "ohio, iowa"},
           {"question_id": 2, "image": "Sci/AI2D_2.png", "text": "Pick one", "answer": "B"}]
    r = score_predictions("sci", ann, [pred(1, "Ohio"), pred(2, "b")])
    assert r["accuracy"] == pytest.approx(75.0)
    ocr = [{"question_id": 1, "text": "Read", "answer": ["x ^ 2", "x2"],
            "answer_type": "Handwritten Mathematical Expression Recognition"}]
    assert score_predictions("ocr", ocr, [pred(1, "x^2")])["accuracy"] == 100.0
    counting = [{"question_id": 1, "text": "How many?", "answer": 3, "type": "2D", "task": "Count"}]
    assert score_predictions("count", counting, [pred(1, "3.")])["accuracy"] == 100.0


def test_score_predictions_rejects_unknown_question_id_naming_the_line():
    with pytest.raises(ValueError, match=r"line 2: question_id 'q9' is not in the annotations"):
        score_predictions("med", ANN, [pred("q1", "yes"), pred("q9", "no")])


@pytest.mark.parametrize("bad,line", [
    ([{"question_id": "q1"}], 1),                                   # no text
    ([pred("q1", "yes"), {"question_id": "q2", "text": 7}], 2),    # text not a string
    ([pred("q1", "yes"), ["q2", "no"]], 2),                         # not an object
    ([pred("q1", "yes"), pred("q2", "no"), {"text": "no"}], 3),     # no question_id
])
def test_score_predictions_rejects_malformed_predictions(bad, line):
    with pytest.raises(ValueError, match=f"prediction line {line}:"):
        score_predictions("med", ANN, bad)


def test_score_predictions_rejects_duplicates_bad_annotations_and_unknown_scorer():
    with pytest.raises(ValueError, match="line 2: duplicate prediction"):
        score_predictions("med", ANN, [pred("q1", "yes"), pred("q1", "no")])
    with pytest.raises(ValueError, match="annotation record 2: duplicate question_id"):
        score_predictions("med", [ANN[0], ANN[0]], [])
    with pytest.raises(ValueError, match="annotation record 1"):
        score_predictions("med", [{"question_id": "q1", "text": "t"}], [])
    with pytest.raises(ValueError, match="no annotations"):
        score_predictions("med", [], [])
    with pytest.raises(UnknownName, match="known: ad, contains"):
        score_predictions("nope", ANN, [])
