"""scoring.py against the released protocols. GSM8K: gold answers (on the real files where ../shared/gsm8k exists),
both scorers on tricky hand-written completions. MATH (math_infer/math_infer.py, util.py and grader.py, the last as
REFERENCE.md 4 writes it out), step by step: the gold's extraction, the prediction's, the Hendrycks normalisation, math_equal,
the verdict with its quirk, and the lenient scorer. Every expected value was worked out by hand from those
definitions."""

import math
import random
import re
import time
from pathlib import Path

import pytest

from data import gsm8k_response, load_examples
import scoring
from scoring import (SCORERS, extract_answer, extract_answer_with_rule, gold_answer, is_correct, judge,
                     lenient_math_prediction, math_equal, math_gold, math_prediction, official_prediction, strip_string,
                     symbolic_equal)

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "gsm8k"


def openai_reference(answer: str) -> float:
    """grade-school-math's own parser (dataset.py): ANS_RE = '#### (\\-?[0-9\\.\\,]+)', commas removed."""
    return float(re.search(r"#### (\-?[0-9\.\,]+)", answer).group(1).strip().replace(",", ""))


@pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/gsm8k is absent")
def test_every_real_gold_answer_parses_and_scores():
    examples = load_examples(str(GSM8K / "train.jsonl")) + load_examples(str(GSM8K / "test.jsonl"))
    assert len(examples) == 7473 + 1319
    for e in examples:
        gold = gold_answer(e["answer"])
        assert gold == openai_reference(e["answer"])
        assert is_correct(e["answer"], e["answer"], "lenient")  # the reference solution itself, by the '#### ' rule
        assert not is_correct(e["answer"], e["answer"], "official")  # the official rule reads "The answer is: " only
        response = gsm8k_response(e["answer"])  # and restyled for training, by the official rule
        assert "<<" not in response and extract_answer_with_rule(response) == (gold, "official")


@pytest.mark.parametrize("completion,expected,rule", [
    ("18 + 54 = 72, altogether", 72, "last"),
    ("So she pays $1,234.50 in total.", 1234.5, "last"),
    ("He ends with -3 degrees.", -3, "last"),
    ("I do not know.", None, None),
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars", 18, "last"),  # subtraction is not a negative sign
    ("from 10-20 pages", 20, "last"),
    ("counts 1,2,3 then 45.", 45, "last"),  # a list is not glued into 123
    ("The answer is: 1,000", 1000, "official"),
    ("The answer is: 2.5 hours, or 150 minutes", 2, "official"),  # rounded as the official script does (round(2.5) = 2)
    ("The answer is: $18.\nInstruction", 18, "official"),
    ("Work: 3 + 4 = 7\n#### 7", 7, "gsm8k"),
    ("#### 18 eggs, 3 left over", 18, "gsm8k"),  # the first number after the last "#### ", not the last one
    ("The answer is: 5 apples. #### 6", 5, "official"),  # the official rule comes first
    ("The answer is: none. So 12 left", 12, "official"),  # official: the first number anywhere after the marker
    ("So 12 are left. The answer is: none", 12, "last"),  # no number after the marker: fall through
])
def test_tricky_completions(completion, expected, rule):
    assert extract_answer_with_rule(completion) == ((None if expected is None else float(expected)), rule)


def test_lenient_scorer_compares_numbers_against_the_gold_marker():
    gold = "She has 2 + 70 = <<2+70=72>>72 clips.\n#### 72"
    assert is_correct("... 72, altogether", gold, "lenient") and is_correct("The answer is: 72.00", gold, "lenient")
    assert not is_correct("The answer is: 27", gold, "lenient") and not is_correct("no idea", gold, "lenient")
    assert is_correct("a loss of -3", "#### -3", "lenient") and is_correct("it costs $1,234", "#### 1,234", "lenient")
    assert extract_answer("The answer is: 3/4") == 1.0  # fractions are divided, then rounded by the official rule


# The official scorer, from its definition (Trans-PEFT math_infer/gsm8k_infer.py extract_answer_number + grader.py
# math_equal): the text after the LAST "The answer is: ", stripped; the first match of [\-+]?\d*[\.,/]?\d+; "a/b"
# -> round(a/b) (b "0" -> round(a)); else round(float(match without commas)), Python's half-to-even round; correct
# iff pred == gold or isclose(x, pred, rel_tol=1e-4) for x in (gold/100, gold, gold*100).
@pytest.mark.parametrize("completion, gold, official, lenient", [
    ("The answer is: 72", 72, True, True),
    ("The answer is: 1,234,567", 1234567, False, True),  # one separator only: reads 1,234
    ("The answer is: 1,234,567", 1234, True, False),
    ("The answer is: 12,5", 125, True, False),  # a comma anywhere is a thousands separator
    ("The answer is: .5", 0, True, False),  # round(0.5) == 0 (half to even)
    ("The answer is: 2.5", 2, True, True),  # both round after "The answer is: "
    ("The answer is: 3.5", 4, True, True),
    ("The answer is: 1 / 2", 1, True, False),  # the spaces end the match at "1"
    ("The answer is: 3/4", 1, True, True),
    ("The answer is: 7/0", 7, True, True),  # a zero denominator: the numerator, rounded
    ("The answer is: 5000", 50, True, False),  # a percentage form: gold * 100
    ("The answer is: 3", 300, True, False),  # gold / 100
    ("The answer is: 0.5", 50, False, False),  # rounded to 0 first
    ("The answer is: 123460", 123456, True, False),  # within rel_tol 1e-4 of a large answer
    ("The answer is: 123470", 123456, False, False),
    ("The answer is: 73", 72, False, False),
    ("The answer is: 5. No wait. The answer is: 7", 7, True, True),  # the last phrase counts
    ("The answer is: -3", -3, True, True),
    ("The answer is: +4", 4, True, True),
    ("The answer is: $18", 18, True, True),
    ("So the total is 72.\n#### 72", 72, False, True),  # no "The answer is: ": wrong, officially
    ("The answer is: seventy-two", 72, False, False),
    ("The answer is:72", 72, False, True),  # the phrase needs its space
])
def test_official_and_lenient_scorers(completion, gold, official, lenient):
    gold_text = f"reasoning\n#### {gold:,}"
    assert is_correct(completion, gold_text, "official") == official
    assert is_correct(completion, gold_text, "lenient") == lenient


def test_official_prediction_is_an_integer_or_none():
    assert official_prediction("The answer is: 3/4") == 1 and isinstance(official_prediction("The answer is: 2.6"), int)
    assert official_prediction("no phrase 42") is None and official_prediction("The answer is: 5/00") is None
    with pytest.raises(ValueError, match="Unknown scorer"):
        is_correct("The answer is: 1", "#### 1", "strict")


# -----------------------------------------------------------------------------------------------------------
# MATH



def solution(answer: str) -> str:
    return f"We compute step by step, so the result is $\\boxed{{{answer}}}$."


@pytest.mark.parametrize("text,gold", [
    (solution("\\frac{1}{2}"), "\\frac{1}{2}"),
    (solution("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt{3}}{2}"),  # nested braces balanced
    ("First $\\boxed{3}$, then $\\boxed{4}$.", "4"),  # the last group
    ("The answer is $\\fbox{5}$.", None),  # found, but remove_boxed wants "\boxed{"
    ("No box at all: 5.", None),
    ("Unclosed $\\boxed{5$", None),
    ("$\\boxed{}$", ""),
])
def test_gold_is_the_last_boxed_group(text, gold):
    assert math_gold(text) == gold


@pytest.mark.parametrize("completion,prediction", [
    ("Adding, we get 3.\nThe answer is: \\frac{1}{2}", "\\frac{1}{2}"),
    ("The answer is: 4\nChecking again.\nThe answer is: 5", "5"),  # the last phrase
    ("The answer is: 5.\nBut wait, maybe 6", "5"),  # cut before the first ".\n"
    ("The answer is: 12.", "12"),  # one trailing "." removed
    ("The answer is: 3.5", "3.5"),
    ("The answer is:   7  ", "7"),
    ("So the answer is \\boxed{5}", None),  # no phrase: the official scorer reads nothing (wrong)
])
def test_prediction_is_read_after_the_last_phrase(completion, prediction):
    assert math_prediction(completion) == prediction


@pytest.mark.parametrize("raw,normal", [
    ("\\dfrac{3}{4}", "\\frac{3}{4}"), ("\\tfrac34", "\\frac{3}{4}"), ("\\frac34", "\\frac{3}{4}"),
    ("3/4", "\\frac{3}{4}"), ("\\frac1{72}", "\\frac{1}{72}"), ("0.5", "\\frac{1}{2}"), (".5", "\\frac{1}{2}"),
    ("03/4", "03/4"),  # int("03") is 3 and "3/4" != "03/4": left as it was
    ("2\\sqrt3", "2\\sqrt{3}"), ("\\sqrt{12}", "\\sqrt{12}"),
    ("10\\%", "10"), ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("\\$5", "5"),
    ("5\\text{ cm}", "5"), ("x = 3", "3"), ("k=\\frac12", "\\frac{1}{2}"), ("y + z = 3", "y+z=3"),
    ("\\left( 1, 2 \\right)", "(1,2)"), ("1\\!000", "1000"), ("\\frac{1}\n{2}", "\\frac{1}{2}"),
    ("\\text{(A)}", "\\text{(A)}"),
])
def test_hendrycks_normalisation(raw, normal):
    assert strip_string(raw) == normal


@pytest.mark.parametrize("raw", ["5\\text{ cm}\\text{ m}", "2\\sqrt", "1+\\frac", "x/y", "\\pi/2"])
def test_normalisation_raises_where_the_released_one_does(raw):
    # a second unit (an assert there), \sqrt or \frac at the very end (an index error), a/b of non-integers (int())
    with pytest.raises((ValueError, IndexError)):
        strip_string(raw)


@pytest.mark.parametrize("prediction,reference,equal", [
    ("1,000", "1000", True),  # numbers: commas removed
    ("12", "0.12", True),  # 12 = 0.12 * 100: the percentage allowance
    ("3.14159", "3.1416", True),  # within rel_tol 1e-4
    ("3.14", "3.1416", False),
    ("(1,2)", "(1,2)", True), ("[1,2)", "[1,2)", True),
    ("(2,1)", "(1,2)", False),  # same bracket, parts compared in order: 2 vs 1
    ("(1,2.00001)", "(1,2)", True),  # part by part, each numeric within 1e-4
    ("[1,2]", "(1,2)", False),  # another bracket: no tuple rule, sympy cannot subtract them
    ("\\frac{2}{4}", "\\frac{1}{2}", False),  # LaTeX is not parsed (no parse_latex)
    ("2*(x+1)", "2*x+2", True),  # sympy: simplify(a - b) == 0
    ("sqrt(2)", "1.41421", True),  # sympy: N(a) within rel_tol 1e-3 of N(b)
    ("", "5", False),  # the empty prediction
])
def test_math_equal(prediction, reference, equal):
    assert math_equal(prediction, reference) is equal


def answer(text: str) -> str:
    return f"Let's see.\nThe answer is: {text}"


@pytest.mark.parametrize("predicted,gold,official,lenient", [
    ("\\frac{1}{2}", "\\frac{1}{2}", True, True),
    ("\\dfrac{1}{2}", "\\frac12", True, True),  # fractions in every spelling
    ("1/2", "\\frac{1}{2}", True, True),
    ("0.5", "\\frac{1}{2}", True, True),  # the "0.5" special case
    ("0.75", "\\frac{3}{4}", False, False),  # no other decimal becomes a fraction
    ("2\\sqrt2", "2\\sqrt{2}", True, True),  # roots
    ("(1, 2)", "(1,2)", True, True),  # tuples: spaces removed
    ("[0, 1)", "[0,1)", True, True),  # intervals
    ("5\\text{ inches}", "5", True, True),  # units
    ("25\\%", "25", True, True),  # percent
    ("45^\\circ", "45", True, True),  # degrees
    ("\\text{(A)}", "\\text{(A)}", True, True),
    ("(A)", "\\text{(A)}", False, False),
    # The released quirk: the prediction's normalisation raises, and is_equiv compares it with itself.
    ("5\\text{ cm}\\text{ m}", "7", True, False),
    ("2\\sqrt", "7", True, False),
    ("x/y", "7", True, False),
    # ... and where the gold's normalisation raises, every non-empty prediction is correct.
    ("7", "\\pi/2", True, False),
    ("", "5", False, False),  # "The answer is: " followed by nothing
])
def test_verdicts(predicted, gold, official, lenient):
    completion, reference = answer(predicted), solution(gold)
    assert is_correct(completion, reference, "official", task="math") is official
    assert is_correct(completion, reference, "lenient", task="math") is lenient


def test_without_the_phrase_or_the_gold():
    boxed = "So the total is $\\boxed{5}$."
    assert not is_correct(boxed, solution("5"), "official", task="math")  # the official reads nothing: wrong
    assert lenient_math_prediction(boxed) == "5" and is_correct(boxed, solution("5"), "lenient", task="math")
    no_gold = "The sum is 5."  # a reference solution with no \boxed: gold None, every prediction wrong
    assert not is_correct(answer("5"), no_gold, "official", task="math")
    assert not is_correct(answer("5"), no_gold, "lenient", task="math")


def test_unknown_task_or_scorer_is_one_sentence():
    with pytest.raises(ValueError, match="Unknown task 'gsm9k': choose from gsm8k, math"):
        is_correct("x", "y", task="gsm9k")
    with pytest.raises(ValueError, match="Unknown scorer"):
        is_correct("x", "y", scorer="strict", task="math")


def test_a_symbolic_comparison_past_its_time_limit_is_unequal_within_the_limit_and_the_next_one_runs():
    assert symbolic_equal("1", "1")  # the worker started (its start is not part of a comparison's limit)
    t0 = time.time()
    assert symbolic_equal("factorial(10**7)", "1", seconds=1.0) is False  # sympy would compute for minutes
    assert time.time() - t0 < 1.5  # the limit, and the time to stop the worker
    assert scoring.unjudged == ["the symbolic comparison took over 1 s"]
    assert symbolic_equal("2*(x+1)", "2*x+2") is True  # a fresh worker


# Formulas that run code where eval() reads them: each writes the sentinel file (name filled in per test).
PAYLOADS = [
    "exec(\"open({path!r},'w')\")", "open({path!r},'w')", "eval(\"open({path!r},'w')\")",
    "__import__('pathlib').Path({path!r}).touch()", "getattr(__builtins__,'open')({path!r},'w')",
    "(lambda: open({path!r},'w'))()", "Symbol('x').__class__.__init__.__globals__",
    "Function(\"__import__('os').system('touch {path}')\")", "[c for c in ().__class__.__base__.__subclasses__()]",
    "exec(compile(\"open({path!r},'w')\",'x','exec'))",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_no_text_of_a_gold_or_a_completion_is_ever_run(tmp_path, payload):
    sentinel = tmp_path / "ran"
    code = payload.format(path=str(sentinel))
    for scorer in SCORERS:
        # the completion's answer, the gold's \boxed answer, both, and the formula before strip_string (its quirk
        # branch), against an answer that differs as a string, so that the symbolic comparison runs
        for completion, reference in [(answer(code), solution("7")), (answer("7"), solution(code)),
                                      (answer(code), solution(code + "+0")), (answer(code + "\\sqrt"), solution("7"))]:
            judge(completion, reference, scorer, "math")  # the last is correct by the released quirk, unparsed
        assert judge(answer(code), solution("7"), scorer, "math")[0] is False
        assert not symbolic_equal(code, "7") and not symbolic_equal("7", code)
    verdict, why = judge(answer(code), solution("7"), "lenient", "math")
    assert "not a plain formula" in why
    assert not sentinel.exists()


def test_read_expression_refuses_what_is_not_a_plain_formula():
    for text in ["open('x')", "x.real", "(1).__class__", "lambda x: x", "x[0]", "{1: 2}", "Symbol('a b')",
                 "Float('nan; x')", "print(1)", "N(2)", "S(2)", "sympify('1')"]:
        with pytest.raises(scoring.NotAdmitted):
            scoring.read_expression(text)


# Answers as MATH's gold solutions and MetaMath-trained models write them, each as it is and after strip_string.
REALISTIC = [
    "5", "-2", "0", "1,000", "3.5", "-0.25", ".5", "1/2", "-3/4", "10/3", "\\frac{1}{2}", "-\\frac{1}{3}", "\\dfrac{5}{6}",
    "\\frac12", "2\\sqrt{3}", "3\\sqrt2", "\\frac{\\sqrt{3}}{2}", "\\pi", "\\frac{\\pi}{4}", "-\\infty", "(-\\infty, 2]",
    "[0,1)", "(1, 2)", "(2,-3)", "\\{1,2,3\\}", "\\text{(A)}", "A", "\\text{Monday}", "x^2+2x+1", "(x+1)^2", "2x+3",
    "a^2-b^2", "(x-2)(x-3)", "y=2x+1", "k = 3", "2*x+3", "2*(x+1)", "2*x+2", "x**2+1", "(x+1)**2", "x**2+2*x+1",
    "sqrt(2)", "sqrt(8)", "2*sqrt(2)", "1.41421", "3.14159", "pi", "pi/4", "E", "e", "I", "i", "2+3i", "2+3*I", "3!",
    "6", "5!", "120", "2^10", "1024", "2**10", "10^3", "1e3", "1.5e-3", "n(n+1)/2", "n*(n+1)/2", "abs(x)", "Abs(-3)",
    "log(8)/log(2)", "exp(1)", "sin(pi/6)", "cos(0)", "1/sqrt(2)", "sqrt(2)/2", "50\\%", "45^\\circ", "\\$5.00",
    "5\\text{ cm}", "ab", "2ab", "0.333", "1/3", "0.2[1]", "19/90", "max(1,2)", "min(3,4)", "f(x)", "x(x+1)",
    "x*(x+1)", "-x", "+5", "(5)", "[5]", "{5}", "5,7", "x<3", "1 < x < 3", "x == 1", "x >= 0", "True", "None",
    "\\frac{1+\\sqrt{5}}{2}", "(1+sqrt(5))/2", "1.618", "03/4", "binomial(5,2)", "gcd(12,18)", "lcm(4,6)",
    "floor(3.7)", "ceiling(3.2)", "x and y", "x or 1", "not x", "x ^ 2", "2 ^ 3", "x & y", "7 // 2", "7 % 3", "~x",
]


def normalised(texts):
    out = set(texts)
    for t in texts:
        try:
            out.add(strip_string(t))
        except Exception:
            pass
    return sorted(out)


def outcome(read, text):
    """("ok", the object's srepr) or ("error", the exception's class)."""
    from sympy import srepr
    try:
        value = read(text)
    except Exception as e:
        return "error", type(e).__name__
    return "ok", sorted(map(srepr, value)) if isinstance(value, set) else srepr(value)


def test_read_expression_builds_what_parse_expr_and_sympify_build_on_realistic_answers():
    from sympy import sympify
    from sympy.parsing.sympy_parser import parse_expr
    for text in normalised(REALISTIC):  # trusted text: the references may evaluate it
        assert outcome(scoring.read_expression, text) == outcome(parse_expr, text), text
        assert outcome(lambda t: scoring.read_expression(t, as_sympify=True), text) == outcome(
            lambda t: sympify(t, rational=True), text), text


def released_symbolic_equal(a, b):
    """grader.symbolic_equal as released (parse_latex always failing there, as without antlr4): parse_expr, simplify,
    N. Only for the trusted strings of this file."""
    from sympy import N, simplify
    from sympy.parsing.sympy_parser import parse_expr

    def parse(s):
        try:
            return parse_expr(s)
        except Exception:
            return s

    x, y = parse(a), parse(b)
    try:
        if simplify(x - y) == 0:
            return True
    except Exception:
        pass
    try:
        return math.isclose(N(x), N(y), rel_tol=1e-3)
    except Exception:
        return False


def test_symbolic_verdicts_agree_with_the_released_comparison_on_realistic_pairs():
    texts = normalised(REALISTIC)
    rng = random.Random(0)
    pairs = [(a, b) for a in texts for b in rng.sample(texts, 4)] + [
        ("2*(x+1)", "2*x+2"), ("x**2+2*x+1", "(x+1)**2"), ("sqrt(8)", "2*sqrt(2)"), ("1/sqrt(2)", "sqrt(2)/2"),
        ("n(n+1)/2", "n*(n+1)/2"), ("(1+sqrt(5))/2", "1.618"), ("2**10", "1024"), ("5!", "120"), ("pi/4", "0.7854")]
    verdicts = [(scoring._sympy_equal(a, b)[0], released_symbolic_equal(a, b)) for a, b in pairs]
    assert all(ours == theirs for ours, theirs in verdicts)
    assert sum(theirs for _, theirs in verdicts) >= 9  # the equal pairs are among them


@pytest.mark.parametrize("completion,gold,scorer", [
    ("The answer is: -" + "9" * 400, "#### 5", "official"),  # -inf: the released script crashes in round()
    ("The answer is: " + "9" * 400 + "/1", "#### 5", "official"),  # a fraction past a float: crashes there too
    ("The answer is: " + "9" * 400 + "/0", "#### 5", "official"),
    ("The answer is: " + "9" * 400, "#### 5", "lenient"),  # the lenient scorer rounds it
])
def test_a_number_past_a_float_is_unequal_and_says_why(completion, gold, scorer):
    assert judge(completion, gold, scorer, "gsm8k") == (False, "a number too large for a float")


def test_a_huge_positive_answer_is_wrong_as_released():
    # the released script returns None for +inf (its only guard): wrong, and nothing to explain
    assert judge("The answer is: " + "9" * 400, "#### 5", "official", "gsm8k") == (False, None)


def test_percent_is_removed_twice_as_released():
    assert strip_string("50\\\\\\%%") == "50"  # "\\\\" -> "\\", then "\\%" removed, then the "\\%" that leaves
    assert is_correct(answer("50\\\\\\%%"), solution("50"), "official", task="math")


@pytest.mark.parametrize("raw,normalised_text", [
    ("\\frac{.5}{2}", "\\frac{0.5}{2}"),  # "{." -> "{0."
    ("\\sqrt23", "\\sqrt{2}3"),  # fix_sqrt wraps one character only
    ("\\frac1", "\\frac1"),  # a \\frac followed by one character: the string is left as it was
    ("5\nmore", "5more"),  # a bare newline is removed, not an end
])
def test_released_normalisation_rules(raw, normalised_text):
    assert strip_string(raw) == normalised_text


def test_an_answer_followed_by_a_bare_newline_runs_on():
    completion = "The answer is: 5\nSo we are done"  # the official cut is ".\n", not a newline
    assert math_prediction(completion) == "5\nSo we are done"
    assert not is_correct(completion, solution("5"), "official", task="math")


@pytest.mark.parametrize("prediction,reference,equal", [
    ("1000000", "1000050", True),  # relative tolerance 1e-4: 50 of a million
    ("0.0001", "0.0002", False),  # an absolute tolerance would accept these
    ("0.25", "25", True),  # the gold / 100 percentage form
    ("(1,3)", "(1,2)", False),  # a tuple where only some parts match
    ("sqrt(2)", "1.4128", True),  # N within rel_tol 1e-3 of the larger: |1.41421 - 1.4128| = 0.00141 < 0.001414
    ("sqrt(2)", "1.4127", False),  # 0.00151 > 0.001414
])
def test_math_equal_tolerances_as_released(prediction, reference, equal):
    assert math_equal(prediction, reference) is equal


def test_gsm8k_minus_after_a_bracket_is_not_a_sign_and_lenient_does_not_round():
    assert extract_answer("(3 + 4)-2 = 5, so 2") == 2.0
    assert extract_answer_with_rule("(10 + 4)-2") == (2.0, "last")  # a minus after ")" is subtraction
    assert not is_correct("So 7.4 in all.", "#### 7", "lenient")  # the last-number rule keeps 7.4
    assert not is_correct("#### 7.4", "#### 7", "lenient")


def test_no_phrase_is_wrong_even_against_a_missing_gold():
    # process_results returns False before is_equiv when "The answer is: " is missing, whatever the gold
    assert not is_correct("no phrase here", "no box either", "official", task="math")


def test_one_unjudgeable_answer_never_ends_an_evaluation(tmp_path, monkeypatch):
    import json

    import eval as eval_lib

    completions = ["The answer is: -" + "9" * 400, "The answer is: " + "9" * 400 + "/1", "The answer is: 5"]

    def fake_generate(model, tokenizer, prompts, *args, progress=None, **kwargs):  # the decoder is not under test
        progress(list(range(len(prompts))), completions)
        return completions

    class Model:  # 300 positions: the third prompt is longer
        config = type("Config", (), {"max_position_embeddings": 300})

    class Tokenizer:  # a token per character
        encode = staticmethod(list)

    monkeypatch.setattr(eval_lib, "generate", fake_generate)
    examples = [{"question": f"q{i}", "answer": "#### 5"} for i in range(2)] + [{"question": "q" * 300,
                                                                                "answer": "#### 5"}]
    result = eval_lib.evaluate(Model(), Tokenizer(), examples, out_jsonl=tmp_path / "e.jsonl", task="gsm8k")
    assert (result["correct"], result["total"], result["unjudged_official"]) == (1, 3, 2)
    records = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r.get("unjudged_official") for r in records] == ["a number too large for a float"] * 2 + [None]
    assert [r.get("prompt_past_positions", False) for r in records] == [False, False, True]
    assert "2 by the official scorer" in eval_lib.unjudged_note(result)
    assert "1 prompt(s) longer than the model's positions" in eval_lib.unjudged_note(result)
