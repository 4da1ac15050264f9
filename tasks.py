"""
The evaluation tasks, each one entry (Task): where its problems come from, how a record of a local file is read,
how long an answer may be, the gold answer and the verdicts. eval.py and train.py's --eval-data work from TASKS, and
the per-example files record what each entry reads; a fork adds a task by appending one (docs/extending.md).

    gsm8k   GSM8K's 1,319 test problems (the hub's openai/gsm8k), question / answer ending in "#### N"
    math    MATH's 5,000 test problems (the hub's EleutherAI/hendrycks_math, seven subjects), problem / solution with
            its \\boxed answer; MetaMath's MATH_test.jsonl spells them instruction / output

Every problem is prompted with data.eval_prompt and decoded to the official stop strings, as the released
math_infer/ scripts do; scoring.py holds both built-in tasks' rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import scoring
from bases import is_main_process
from data import _hub_file, _normalise, _read_records, _text


def judged(check: Callable[[str, str], bool]) -> Callable[[str, str, str], tuple[bool, str | None]]:
    """A task's verdicts from a plain checker check(completion, reference) -> bool, the same for both scorers: an
    answer it cannot judge (it raises) is wrong, with the reason in the per-example file."""
    def judge(completion: str, reference: str, scorer: str) -> tuple[bool, str | None]:
        try:
            return bool(check(completion, reference)), None
        except Exception as e:  # noqa: BLE001 -- one answer never ends an evaluation
            return False, f"{type(e).__name__}: {e}"[:200]
    return judge


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    name        --eval-data's name, the key of results.json, the per-example file's suffix (eval-new-<name>.jsonl)
    title       what the final table calls its accuracy
    reference   the field of an example holding its reference solution
    read        read(record, where) -> the example {question, <reference>} if the record is this task's, else None
    judge       judge(completion, reference, scorer) -> (correct, why it could not be judged or None)
    max_new_tokens   the longest answer decoded (the released evaluation's max_tokens for the built-in tasks)
    hub         hub(limit) -> the records of `--eval-data <name>`, fetched; None: local files only
    gold        gold(reference) -> the gold answer the per-example file shows
    predictions predictions(completion) -> what each scorer reads ({"official": ..., "lenient": ...}, and more)
    fields      the fields a local record needs, for the message that names a record no task reads
    check       check(examples, wheres) after loading: warnings about the data (MATH's solutions without \\boxed)"""

    name: str
    title: str
    reference: str
    read: Callable[[dict, str], dict | None]
    judge: Callable[[str, str, str], tuple[bool, str | None]]
    max_new_tokens: int = 512
    hub: Callable[[int | None], list] | None = None
    gold: Callable[[str], object] = lambda reference: reference
    predictions: Callable[[str], dict] = lambda completion: {}
    fields: str = ""
    check: Callable[[list[dict], list[str]], None] = lambda examples, wheres: None


# -----------------------------------------------------------------------------------------------------------
# GSM8K and MATH


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")  # EleutherAI/hendrycks_math's configs: the 5,000 test problems together


def _gsm8k_hub(limit: int | None) -> list:
    path = _hub_file("openai/gsm8k", "main/test-00000-of-00001.parquet", "GSM8K's test split")
    return _read_records(path)[:limit]


def _math_hub(limit: int | None) -> list:
    records = []
    for subject in MATH_SUBJECTS:  # (stops early: --eval-limit 8 reads one subject's file)
        path = _hub_file("EleutherAI/hendrycks_math", f"{subject}/test-00000-of-00001.parquet",
                         f"MATH's {subject} test problems")
        records += _read_records(path)
        if limit is not None and len(records) >= limit:
            break
    return records[:limit]


def _gsm8k_read(record: dict, where: str) -> dict | None:
    return _normalise(record, where) if "question" in record and "answer" in record else None


def _math_read(record: dict, where: str) -> dict | None:
    for problem, solution in (("problem", "solution"), ("instruction", "output")):  # the hub's / MetaMath's names
        if problem in record and solution in record:
            return {"question": _text(record, problem, where), "solution": _text(record, solution, where)}
    return None


def _math_check(examples: list[dict], wheres: list[str]) -> None:
    """A MATH solution without a \\boxed answer is named in one warning and kept: the official code scores it wrong,
    and so does this one."""
    missing = [where for where, e in zip(wheres, examples) if scoring.math_gold(e["solution"]) is None]
    if missing and is_main_process():
        print(f"warning: {len(missing)} MATH solution(s) without a \\boxed answer ({', '.join(missing[:3])}"
              f"{', ...' if len(missing) > 3 else ''}): scored wrong, as the official code scores them")


GSM8K = Task("gsm8k", "GSM8K exact match", "answer", _gsm8k_read,
             lambda completion, reference, scorer: scoring.judge(completion, reference, scorer, "gsm8k"),
             max_new_tokens=1024, hub=_gsm8k_hub, gold=scoring.gold_answer,
             predictions=lambda completion: scoring.predictions(completion, "gsm8k"),
             fields="GSM8K's question/answer")
MATH = Task("math", "MATH accuracy", "solution", _math_read,
            lambda completion, reference, scorer: scoring.judge(completion, reference, scorer, "math"),
            max_new_tokens=2048, hub=_math_hub, gold=scoring.math_gold,
            predictions=lambda completion: scoring.predictions(completion, "math"),
            fields="MATH's problem/solution (MetaMath's copy: instruction/output)", check=_math_check)
TASKS = {task.name: task for task in (GSM8K, MATH)}  # a fork's: TASKS[task.name] = task


# -----------------------------------------------------------------------------------------------------------
# Loading the evaluation sets


def _records(source: str, limit: int | None) -> list[tuple[str, object]]:
    if source in TASKS and TASKS[source].hub is not None:
        return TASKS[source].hub(limit)
    path = Path(source).expanduser()
    if not path.is_file():
        hubs = ", ".join(name for name, task in TASKS.items() if task.hub is not None)
        raise FileNotFoundError(f"--eval-data {source}: not {hubs.replace(', ', ' or ')}, and no such file: give "
                                f"{hubs}, or a local .jsonl/.json/.parquet file.")
    return _read_records(path)[:limit]


def _example(record, where: str) -> tuple[Task, dict]:
    """The task that reads a record, and its example."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not a record (an object with the fields of a "
                         "task).")
    for task in TASKS.values():
        example = task.read(record, where)
        if example is not None:
            return task, example
    raise ValueError(f"{where} has fields {sorted(record)}; an evaluation record needs "
                     f"{', or '.join(task.fields or task.name for task in TASKS.values())}.")


def load_eval_sets(sources: list[str], limit: int | None = None) -> dict[str, list[dict]]:
    """The evaluation sets named (a task's name for its hub set, or local files of any task), checked before any
    compute: task name -> its first `limit` examples (GSM8K {question, answer}, MATH {question, solution}, a fork's
    task {question, <its reference>})."""
    if not sources:
        raise ValueError("--eval-data names no task: give gsm8k, math or the path of a file (commas between several).")
    sets, origin = {}, {}
    for source in sources:
        records = _records(source, limit)
        if not records:
            raise ValueError(f"--eval-data {source} holds no examples: nothing to evaluate on.")
        read = [_example(r, where) for where, r in records]
        task = read[0][0]
        if other := next((where for (where, _), (t, _) in zip(records, read) if t is not task), None):
            raise ValueError(f"{other} is not a {task.name} record like the ones before it: keep one task per file.")
        if task.name in sets:
            raise ValueError(f"--eval-data names two {task.name} sets ({origin[task.name]} and {source}): give each "
                             "task once.")
        sets[task.name], origin[task.name] = [example for _, example in read], source
        task.check(sets[task.name], [where for where, _ in records])
    return sets
