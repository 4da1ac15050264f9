"""
Scoring a completion against a dataset's reference solution, per task (GSM8K, MATH), by two scorers:

    official  what the released evaluation computes (github gccnlp/Trans-PEFT, math_infer/), quirks included;
    lenient   this project's, without the quirks; both are always reported.

GSM8K (gold: the number after '#### ' of the reference answer)
    official  math_infer/gsm8k_infer.py + grader.py: the first number after the LAST "The answer is: ", rounded to an
              integer; correct iff equal to gold, or within rel_tol 1e-4 of gold/100, gold or gold*100;
    lenient   the number from the first of three rules that finds one: "The answer is: " (as above), "#### ", the last
              number in the completion; equal to gold. Numbers may carry a sign, a "$", thousands commas and
              decimals; "a/b" is a fraction; a comma not followed by three digits ends a number.

MATH (gold: the last \\boxed{...} of the reference solution, math_infer/util.py last_boxed_only_string + remove_boxed)
    official  math_infer/math_infer.py process_results: the text after the last "The answer is: ", cut before the first
              ".\\n", stripped, one trailing "." removed; then util.is_equiv: both normalised by the Hendrycks
              strip_string, correct iff grader.math_equal(a, b) or a == b. math_equal: numbers within rel_tol 1e-4 of
              gold/100, gold or gold*100; brackets and tuples compared part by part; else sympy: simplify(a - b) == 0
              or N(a) within rel_tol 1e-3 of N(b). The released quirk kept: where strip_string raises (a unit
              "\\text{ " twice, a bare "\\sqrt" or "\\frac" at the end, "x/y" of non-integers), is_equiv compares the
              prediction with ITSELF, so any non-empty prediction is scored correct;
    lenient   the same normalisation and comparison, but a string that strip_string cannot normalise is compared as
              it is, and without "The answer is: " the last \\boxed{...} of the completion is the prediction.

Where an answer cannot be judged, it is unequal, and judge() says why (the per-example files record it): a number
too large for a float (the released GSM8K script crashes there on negative numbers and fractions), a symbolic
comparison past its time limit, an answer that is not a plain formula (read_expression), anything that raises.

Three differences from the released grader (docs/differences.md): sympy's parse_latex is never tried (the released
environment has no antlr4, so there it always fails and parse_expr runs, as here); a symbolic comparison runs in a
worker process with a time limit (SYMBOLIC_SECONDS; the released one has none, and a pathological string can make
simplify run for minutes), a timed-out one counting as unequal; and no text is ever evaluated as Python: where the
released grader hands an answer to parse_expr, which runs the Python code it writes, read_expression builds the same
sympy objects from that code's syntax tree, admitting only numbers, operators, brackets, symbols and a named list of
sympy functions and constants (an answer holding anything else is unequal).
"""

from __future__ import annotations

import ast
import atexit
import math
import multiprocessing
import operator
import re
import unicodedata
from fractions import Fraction

SCORERS = ("official", "lenient")
TASKS = ("gsm8k", "math")
ANSWER_PHRASE = "The answer is: "  # how MetaMathQA's responses, and so trained models, end

# -----------------------------------------------------------------------------------------------------------
# GSM8K

# A minus sign only when it touches the digits and follows no word character ("-3", "= -3", "(-3)" are negative;
# "10-20" and "16 - 3" give no negative number), an optional "$", the integer part with proper thousands commas or
# plain digits, decimals, and an optional "/denominator".
NUMBER = re.compile(r"(?:(?<![\w)])(-))?\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)(?:\s?/\s?(\d+))?")


def _value(match: re.Match) -> float:
    sign, number, denominator = match.groups()
    value = float(number.replace(",", ""))
    if denominator is not None:
        value = value / float(denominator) if float(denominator) != 0 else value
    return -value if sign else value


def gold_answer(answer_text: str) -> float:
    """The number after the last "#### " of a GSM8K answer (commas removed)."""
    if "#### " not in answer_text:
        raise ValueError(f"not a GSM8K answer (no '#### ' before the final number): {answer_text[-80:]!r}")
    match = NUMBER.search(answer_text.rsplit("#### ", 1)[1])
    if match is None:
        raise ValueError(f"no number after '#### ' in the answer {answer_text[-80:]!r}")
    return _value(match)


def extract_answer_with_rule(completion: str) -> tuple[float | None, str | None]:
    """The lenient scorer's number: (number, rule) from the first rule that finds one: official, gsm8k, last;
    (None, None) if none does."""
    if ANSWER_PHRASE in completion:
        match = NUMBER.search(completion.rsplit(ANSWER_PHRASE, 1)[1])
        if match:
            return float(round(_value(match))), "official"
    if "#### " in completion:
        match = NUMBER.search(completion.rsplit("#### ", 1)[1])
        if match:
            return _value(match), "gsm8k"
    matches = list(NUMBER.finditer(completion))
    if matches:
        return _value(matches[-1]), "last"
    return None, None


def extract_answer(completion: str) -> float | None:
    """The number a completion answers with by the lenient scorer (see extract_answer_with_rule), or None."""
    return extract_answer_with_rule(completion)[0]


# Trans-PEFT's own number pattern (math_infer/gsm8k_infer.py): an optional sign, digits, at most ONE of ".", "," or
# "/", digits. So "1,234,567" reads as 1,234 and "1 / 2" as 1; a comma is a thousands separator wherever it stands.
OFFICIAL_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")


def _is_number(text: str) -> bool:  # the official is_number: float() or a single numeric unicode character
    try:
        float(text)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(text)
        return True
    except (TypeError, ValueError):
        return False


def official_prediction(completion: str) -> int | None:
    """The official scorer's number (math_infer/gsm8k_infer.py, extract_answer_number), rule for rule: the first
    OFFICIAL_NUMBER in the text after the LAST "The answer is: " (stripped), commas removed, rounded to an integer
    with Python's round (half to even, so ".5" is 0); "a/b" is round(a / b), or round(a) where b is "0". None (wrong)
    when the phrase or a number is missing. Differences (docs/differences.md): "a/00" ends the official script (its
    `fraction` package raises), here it is None; and its Fraction is the PyPI package `fraction`'s, here the standard
    library's."""
    parts = completion.split(ANSWER_PHRASE)
    if len(parts) < 2:
        return None
    match = OFFICIAL_NUMBER.search(parts[-1].strip())
    if match is None:
        return None
    text = match.group()
    if "/" in text:
        numerator, denominator = text.split("/")[:2]
        if not (_is_number(numerator) and _is_number(denominator)):
            return None
        if denominator == "0":
            return round(float(numerator.replace(",", "")))
        try:
            fraction = Fraction(text.replace(",", ""))
        except ZeroDivisionError:
            return None
        return round(float(fraction.numerator / fraction.denominator))
    value = float(text.replace(",", ""))
    return None if value == float("inf") else round(value)


def gsm8k_correct(completion: str, gold_text: str, scorer: str) -> bool:
    gold = gold_answer(gold_text)
    if scorer == "official":
        predicted = official_prediction(completion)
        return predicted is not None and (float(predicted) == float(gold) or any(
            math.isclose(x, predicted, rel_tol=1e-4) for x in (gold / 100, gold, gold * 100)))
    predicted = extract_answer(completion)
    return predicted is not None and abs(predicted - gold) < 1e-6


# -----------------------------------------------------------------------------------------------------------
# MATH: the gold answer and the prediction


def last_boxed(text: str) -> str | None:
    """The last "\\boxed" group of text ("\\fbox" where there is none), from the command to the brace that brings the
    count of open braces back to zero; None if there is no such group (util.last_boxed_only_string)."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def unbox(group: str | None) -> str | None:
    """"\\boxed{X}" -> "X"; anything else (an "\\fbox", "\\boxed 5", None) -> None (math_infer.py remove_boxed)."""
    if group is None or not group.startswith("\\boxed{") or not group.endswith("}"):
        return None
    return group[len("\\boxed{") : -1]


def math_gold(solution: str) -> str | None:
    """The gold answer of a MATH reference solution: its last \\boxed{...}, unboxed; None where it has none (the
    official code then scores every prediction wrong)."""
    return unbox(last_boxed(solution))


def math_prediction(completion: str) -> str | None:
    """The answer the official MATH scorer reads (math_infer.py process_results): the text after the last "The answer
    is: ", cut before the first ".\\n", stripped, one trailing "." removed, stripped; None without the phrase."""
    parts = completion.split(ANSWER_PHRASE)
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()


# -----------------------------------------------------------------------------------------------------------
# MATH: the Hendrycks normalisation (util.strip_string), each step as released, exceptions included


def _remove_right_units(s: str) -> str:
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:  # the released code asserts: a second unit raises
        raise ValueError(f"more than one '\\text{{ ' in {s!r}")
    return parts[0]


def _fix_sqrt(s: str) -> str:
    """\\sqrt3 -> \\sqrt{3} (one character); a "\\sqrt" at the very end raises IndexError, as released."""
    if "\\sqrt" not in s:
        return s
    head, *rest = s.split("\\sqrt")
    for part in rest:
        head += "\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:]
    return head


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72}; a "\\frac" at the very end raises IndexError, one
    followed by a single character leaves the string as it was, as released."""
    head, *rest = s.split("\\frac")
    for part in rest:
        head += "\\frac"
        if part[0] == "{":
            head += part
            continue
        if len(part) < 2:
            return s
        a, b, tail = part[0], part[1], part[2:]
        head += ("{" + a + "}{" + b + "}" if b != "{" else "{" + a + "}" + b) + tail
    return head


def _fix_a_slash_b(s: str) -> str:
    """"3/4" -> \\frac{3}{4}; "x/y" of non-integers raises ValueError (the released code catches only the assertion
    that guards "03/4"-style spellings, which stay as they are)."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    a, b = int(parts[0]), int(parts[1])
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def strip_string(s: str) -> str:
    """The Hendrycks MATH normalisation, step by step as util.strip_string does it."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")  # degrees, dollars
    s = _remove_right_units(s)  # a unit after "\text{ "
    s = s.replace("\\%", "").replace("\\%", "")  # percent: twice, as released ("\\\\%%" -> "\\%" -> "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 3" -> "3"
        s = sides[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


# -----------------------------------------------------------------------------------------------------------
# MATH: equality (grader.math_equal) and the verdicts

SYMBOLIC_SECONDS = 5.0  # per symbolic comparison (ours: the released grader has no limit)
_pool = None  # the worker process of symbolic comparisons, started on first use


def _is_digit(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def math_equal(prediction: str, reference: str) -> bool:
    """grader.math_equal(prediction, reference) with its defaults (percentages included, isclose, no timeout), step by
    step: numbers; the empty prediction; brackets removed; tuples and intervals part by part; sympy."""
    if _is_digit(prediction) and _is_digit(reference):
        p, r = float(prediction.replace(",", "")), float(reference.replace(",", ""))
        return any(math.isclose(x, p, rel_tol=1e-4) for x in (r / 100, r, r * 100))
    if prediction == "":
        return False
    prediction, reference = prediction.strip(), reference.strip()
    p, r = prediction, reference
    if ((p.startswith("[") and p.endswith("]") and not r.startswith("("))
            or (p.startswith("(") and p.endswith(")") and not r.startswith("["))):
        p, r = p.strip("[]()"), r.strip("[]()")
    for bracket in "{}()":
        p, r = p.replace(bracket, ""), r.replace(bracket, "")
    if p == r:
        return True
    p, r = prediction, reference
    if ((p[:1] == "[" and p[-1:] == "]" and r[:1] == "[" and r[-1:] == "]")
            or (p[:1] == "(" and p[-1:] == ")" and r[:1] == "(" and r[-1:] == ")")):
        pp, rp = p[1:-1].split(","), r[1:-1].split(",")
        if len(pp) == len(rp) and all([math_equal(a, b) for a, b in zip(pp, rp)]):
            return True
    return symbolic_equal(prediction, reference)


# -----------------------------------------------------------------------------------------------------------
# MATH: reading a formula as sympy's parse_expr does, without running it
#
# parse_expr(s) turns s into Python source (tokens, then the transformations: unknown names become Symbol('x'),
# numbers Integer(5) or Float('1.5'), "!" factorial) and eval()s that source in a namespace holding all of sympy and
# Python's builtin functions: an answer "exec(...)" or "open(...)" runs. read_expression makes the same source with
# sympy's own stringify_expr (text only), and then reads its syntax tree instead of eval()ing it: the same operators
# applied to the same objects give the same result, and a node outside the grammar below ends the reading.

class NotAdmitted(ValueError):
    """A formula holding something other than numbers, operators, brackets, symbols and ADMITTED names."""


_CONSTRUCTORS = ("Integer", "Float", "Rational", "Symbol", "Function")  # what the transformations write
ADMITTED = _CONSTRUCTORS + (
    "factorial", "factorial2", "pi", "E", "I", "oo", "zoo", "nan",  # "!", "!!", the constants
    "sqrt", "cbrt", "root", "exp", "log", "ln", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan",
    "acot", "atan2", "sinh", "cosh", "tanh", "Abs", "abs", "sign", "floor", "ceiling", "Min", "Max", "min", "max",
    "binomial", "gamma", "gcd", "lcm", "re", "im", "arg", "conjugate")
_NUMBER_TEXT = re.compile(r"[0-9_]*\.?[0-9_]*(?:[eE][+-]?[0-9_]+)?")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.BitXor: operator.xor,
           ast.BitAnd: operator.and_, ast.BitOr: operator.or_}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_namespace = None  # parse_expr's: what "from sympy import *" gives, Python's builtin functions, max/min as Max/Min


def _sympy_namespace() -> dict:
    global _namespace
    if _namespace is None:
        import builtins
        import types

        import sympy
        _namespace = {name: getattr(sympy, name) for name in sympy.__all__}
        _namespace.update({n: f for n, f in vars(builtins).items() if isinstance(f, types.BuiltinFunctionType)})
        _namespace.update(max=sympy.Max, min=sympy.Min)
    return _namespace


def read_expression(text: str, as_sympify: bool = False):
    """What sympy's parse_expr(text) returns (with as_sympify: sympify(text, rational=True), as N(text) reads a
    string: "^" is a power there, decimals exact), read from the syntax tree of the Python source parse_expr would
    evaluate. Raises NotAdmitted for a tree outside the grammar: numbers, + - * / // % ** ^ & |, comparisons, brackets,
    tuples, lists and sets, symbols, and calls of the ADMITTED names (a string only as the name of a Symbol or
    Function, or the digits of a number); other errors as parse_expr raises them."""
    from sympy import SympifyError
    from sympy.parsing.sympy_parser import (TokenError, convert_xor, rationalize, standard_transformations,
                                            stringify_expr)

    transformations = standard_transformations + ((rationalize, convert_xor) if as_sympify else ())
    try:
        code = stringify_expr(text.replace("\n", "") if as_sympify else text, {}, _sympy_namespace(),
                              transformations)  # text to text: nothing runs
        return _read(ast.parse(code.strip(), mode="eval").body)
    except (TokenError, SyntaxError) as e:
        if as_sympify:  # as sympify raises them
            raise SympifyError(f"could not parse {text!r}", e) from None
        raise


def _read(node):
    """The value Python's eval would give node, for the nodes of read_expression's grammar."""
    if isinstance(node, ast.Constant) and (node.value is None or type(node.value) in (int, float, complex, bool)):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in ADMITTED:
            raise NotAdmitted(f"the name {node.id!r}")
        return _sympy_namespace()[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_read(node.left), _read(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_read(node.operand))
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left = _read(node.left)  # a < b < c is (a < b) and (b < c), the second side read only if the first holds
        for i, (op, node_right) in enumerate(zip(node.ops, node.comparators)):
            right = _read(node_right)
            result = _COMPARE[type(op)](left, right)
            if i + 1 < len(node.ops) and not result:
                return result
            left = right
        return result
    if isinstance(node, ast.BoolOp):  # and / or, as Python: the first falsy (and) or truthy (or) operand
        value = _read(node.values[0])
        for operand in node.values[1:]:
            if bool(value) != isinstance(node.op, ast.And):
                return value
            value = _read(operand)
        return value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](_read(e) for e in node.elts)
    if isinstance(node, ast.Call) and not node.keywords:
        if isinstance(node.func, ast.Name) and node.func.id in _CONSTRUCTORS and node.args and all(
                isinstance(a, ast.Constant) and isinstance(a.value, str) for a in node.args):
            name = node.args[0].value  # Symbol('x'), Function('f'), Float('1.5'), Rational('0.25')
            fits = (name.isidentifier() and "__" not in name if node.func.id in ("Symbol", "Function")
                    else _NUMBER_TEXT.fullmatch(name) is not None and len(node.args) == 1)
            if not fits:
                raise NotAdmitted(f"{node.func.id}({name!r})")
            return _sympy_namespace()[node.func.id](name)
        return _read(node.func)(*[_read(a) for a in node.args])
    raise NotAdmitted(f"a {type(node).__name__} node")


# -----------------------------------------------------------------------------------------------------------
# MATH: the symbolic comparison, in a worker process


def _sympy_equal(a: str, b: str) -> tuple[bool, str | None]:
    """grader.symbolic_equal: each side parsed by parse_expr (kept as the string where that fails); equal if
    simplify(a - b) == 0, or if N(a) and N(b) are within rel_tol 1e-3; any error means unequal. parse_expr and the
    string N reads are read_expression here. Returns (equal, why a side could not be read) ."""
    from sympy import N, simplify

    refused = []

    def parse(s):
        try:
            return read_expression(s)
        except NotAdmitted as e:
            refused.append(f"{s[:60]!r} is not a plain formula ({e})")
            return s
        except Exception:
            return s

    def numeric(v):  # N(v) reads a string left by parse as sympify does
        return N(read_expression(v, as_sympify=True) if isinstance(v, str) else v)

    x, y = parse(a), parse(b)
    why = "; ".join(refused) or None
    try:
        if simplify(x - y) == 0:
            return True, why
    except Exception:
        pass
    try:
        return math.isclose(numeric(x), numeric(y), rel_tol=1e-3), why
    except Exception:
        return False, why


def _start_worker() -> None:
    """Import sympy, so that a comparison's time limit counts the comparison alone, then bound the worker's memory to
    what it holds now and WORKER_MEMORY more (a formula like 10**10**10 gets a MemoryError, not the machine's RAM)."""
    import os

    import sympy  # noqa: F401
    try:
        import resource

        with open("/proc/self/statm") as f:  # the address space in pages (what spawn re-imported: torch, maybe CUDA's)
            held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (held + WORKER_MEMORY, resource.RLIM_INFINITY))
    except (ImportError, OSError, ValueError):  # not Linux: no bound
        pass


WORKER_MEMORY = 4 << 30  # bytes of address space the symbolic worker may add to what it holds at its start
unjudged: list[str] = []  # why the comparisons since judge() began could not be decided (judge reads it)


def symbolic_equal(a: str, b: str, seconds: float = SYMBOLIC_SECONDS) -> bool:
    """_sympy_equal in a worker process, given `seconds`: a comparison that takes longer is unequal and the worker is
    replaced. Why a comparison could not be decided goes to `unjudged`."""
    global _pool
    if _pool is None:  # spawned, not forked: the parent may hold CUDA state and threads
        _pool = multiprocessing.get_context("spawn").Pool(1, initializer=_start_worker)
        _pool.apply(abs, (0,))  # waits until the worker has started
        atexit.register(_pool.terminate)  # before the interpreter's teardown, which the pool's own __del__ trips on
    try:
        equal, why = _pool.apply_async(_sympy_equal, (a, b)).get(seconds)
    except multiprocessing.TimeoutError:
        _pool.terminate()
        _pool = None
        equal, why = False, f"the symbolic comparison took over {seconds:g} s"
    if why:
        unjudged.append(why)
    return equal


def official_math_correct(prediction: str | None, gold: str | None) -> bool:
    """process_results + util.is_equiv(prediction, gold) as released: no prediction (no "The answer is: ") or no gold
    is wrong; else both normalised, then math_equal or equal strings. Where the normalisation raises, the except
    branch compares the prediction with ITSELF (math_equal(str1, str1)), so any non-empty prediction is correct
    there: the released quirk."""
    if prediction is None or gold is None:
        return False
    try:
        a, b = strip_string(prediction), strip_string(gold)
        return math_equal(a, b) or a == b
    except Exception:
        return math_equal(prediction, prediction) or prediction == gold


def lenient_math_prediction(completion: str) -> str | None:
    """The official reading, or, without "The answer is: ", the completion's last \\boxed{...}."""
    found = math_prediction(completion)
    return found if found is not None else unbox(last_boxed(completion))


def lenient_math_correct(prediction: str | None, gold: str | None) -> bool:
    """Both normalised where strip_string can (else compared as they are), then math_equal or equal strings."""
    if prediction is None or gold is None:
        return False

    def normal(s):
        try:
            return strip_string(s)
        except Exception:
            return s

    a, b = normal(prediction), normal(gold)
    return math_equal(a, b) or a == b


# -----------------------------------------------------------------------------------------------------------
# The one entry point


def predictions(completion: str, task: str) -> dict:
    """What each scorer reads in a completion: {"official": ..., "lenient": ...} (numbers for GSM8K, strings for
    MATH, None where nothing is found or a number is past a float's range), and GSM8K's "rule_lenient"."""
    if task != "gsm8k":
        return {"official": math_prediction(completion), "lenient": lenient_math_prediction(completion)}
    read = {"official": None, "lenient": None, "rule_lenient": None}
    try:
        read["lenient"], read["rule_lenient"] = extract_answer_with_rule(completion)
    except OverflowError:  # judge says why
        pass
    try:
        read["official"] = official_prediction(completion)
    except OverflowError:
        pass
    return read


def gold(reference: str, task: str):
    """The gold answer of a reference solution: GSM8K's number, MATH's unboxed string (None where it has none)."""
    return gold_answer(reference) if task == "gsm8k" else math_gold(reference)


def judge(completion: str, reference: str, scorer: str = "official", task: str = "gsm8k") -> tuple[bool, str | None]:
    """(whether a completion answers a problem whose reference solution is `reference`, why it could not be judged or
    None): by `scorer` (SCORERS) for `task` (TASKS); the reference is GSM8K's answer ending in '#### N' or MATH's
    solution with its \\boxed answer. An answer that cannot be judged (a number past a float's range, a symbolic
    comparison past its time limit, a formula that is not plain, anything that raises) is unequal: one answer never
    ends an evaluation."""
    if scorer not in SCORERS:
        raise ValueError(f"Unknown scorer {scorer!r}: choose from {', '.join(SCORERS)}.")
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}: choose from {', '.join(TASKS)}.")
    unjudged.clear()
    try:
        if task == "gsm8k":
            verdict = gsm8k_correct(completion, reference, scorer)
        elif scorer == "official":
            verdict = official_math_correct(math_prediction(completion), math_gold(reference))
        else:
            verdict = lenient_math_correct(lenient_math_prediction(completion), math_gold(reference))
    except OverflowError:
        return False, "a number too large for a float"
    except Exception as e:  # noqa: BLE001 -- whatever one answer does, the evaluation goes on
        return False, f"{type(e).__name__}: {e}"[:200]
    return verdict, ("; ".join(unjudged) if unjudged and not verdict else None)


def is_correct(completion: str, reference: str, scorer: str = "official", task: str = "gsm8k") -> bool:
    """judge's verdict alone."""
    return judge(completion, reference, scorer, task)[0]
