"""Built-in synthetic tasks whose answers can be checked, so the pipeline runs with no data or hub.

Every response ends with "The answer is N." and is judged by that final number (METHOD.md, stage 0):
``extract_answer`` / ``is_correct`` with the default ``ANSWER_PATTERN``; the same functions judge the
responses to a user's problems (``--problems_file``, ``--eval_problems_file``) with ``--answer_pattern``.
Two tasks need different skills, so a result on one is not an artefact of the other:

* ``arithmetic``: word problems with one addition or subtraction ("Ann has 17 pens. She gets 25
  more. How many pens now?");
* ``compare``: pick the largest of three numbers, reasoning by sorting them ("41, 17, 36").
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

ANSWER_PREFIX = "The answer is"
ANSWER_PATTERN = ANSWER_PREFIX + r"\s*(-?\d+)"  # (the prefix has no regex metacharacters)


@dataclass(frozen=True)
class Problem:
    prompt: str      # what the model is conditioned on, already formatted ("Q: ...\nA: ")
    answer: int      # the checkable final answer
    solution: str    # a correct response (used for SFT)


def format_prompt(question: str) -> str:
    # The same layout the built-in tokenizer's chat template produces for one user message.
    return f"Q: {question}\nA: "


def answer_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot pick answers out of responses, or None."""
    try:
        groups = re.compile(pattern).groups
    except re.error as e:
        return f"is not a regular expression ({e})"
    if groups != 1:
        return f"has {groups} groups; expected exactly one, around the answer (e.g. '#### (\\S+)')"
    return None


def extract_answer(response: str, pattern: str = ANSWER_PATTERN) -> str | int | None:
    """The answer the response gives: the group of the LAST match of ``pattern``, or None when there
    is none. With the default pattern, the integer after the last "The answer is"."""
    found = re.findall(pattern, response)
    if not found:
        return None
    return int(found[-1]) if pattern == ANSWER_PATTERN else found[-1]


def _normalized(answer) -> str | float:
    """Answers compare as numbers when both are numbers (1,000 == 1000.0), else as text without case,
    surrounding space or a final period."""
    text = str(answer).strip().rstrip(".").strip()
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text.casefold()


def is_correct(response: str, answer, pattern: str = ANSWER_PATTERN) -> bool:
    """Whether ``response`` gives ``answer`` (an int, or a string such as "B" or "yes")."""
    found = extract_answer(response, pattern)
    return found is not None and _normalized(found) == _normalized(answer)


_NAMES = [("Ann", "She"), ("Bob", "He"), ("Cid", "He"), ("Dee", "She"), ("Eve", "She"), ("Max", "He")]
_ITEMS = ["pens", "cups", "eggs", "toys", "hats", "keys"]


def _arithmetic(rng: random.Random) -> Problem:
    name, pron = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    if rng.random() < 0.5:
        a, b = rng.randint(2, 29), rng.randint(2, 19)
        q = f"{name} has {a} {item}. {pron} gets {b} more. How many {item} now?"
        ans, work = a + b, f"{a}+{b}={a + b}"
    else:
        a = rng.randint(10, 39)
        b = rng.randint(2, min(19, a - 1))
        q = f"{name} has {a} {item}. {pron} gives away {b}. How many {item} left?"
        ans, work = a - b, f"{a}-{b}={a - b}"
    return Problem(format_prompt(q), ans, f"{work}. {ANSWER_PREFIX} {ans}.")


def _compare(rng: random.Random) -> Problem:
    nums = rng.sample(range(10, 100), 3)
    q = f"Which is largest: {nums[0]}, {nums[1]}, {nums[2]}?"
    work = "<".join(str(n) for n in sorted(nums))
    return Problem(format_prompt(q), max(nums), f"{work}. {ANSWER_PREFIX} {max(nums)}.")


TASKS: dict[str, Callable[[random.Random], Problem]] = {"arithmetic": _arithmetic, "compare": _compare}


def get_task(name: str) -> Callable[[random.Random], Problem]:
    if name not in TASKS:
        raise ValueError(f"--task is {name!r}; built-in tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def make_problems(task: str, n: int, seed: int, *, exclude: set[str] = frozenset()) -> list[Problem]:
    """``n`` distinct problems of ``task`` drawn from ``seed``, none of whose prompts is in ``exclude``
    (so held-out problems never appear in training)."""
    gen, rng = get_task(task), random.Random(seed)
    seen, out = set(exclude), []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        p = gen(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    raise ValueError(f"task {task!r} has fewer than {n} distinct problems left; ask for fewer")
