"""Reward plug-ins addressed by name, and the C-GRPO retention bonus of one question's group.

A plug-in is a function `fn(completion, *, solution, problem_type, data_type) -> dict[str, float]`
returning named sub-scores (EasyR1 style); the sub-scores of all plug-ins named in a run are summed
into r_i. Register a new one with `@register("name")`.

Accuracy follows Video-R1's `accuracy_reward` (src/r1-v/src/open_r1/grpo.py), by problem type:

- multiple choice: the text inside the first `<answer>…</answer>` equals the solution's (stripped).
- numerical: both numbers must agree on having a decimal separator ('.' or ',') or not; then ','
  is removed (thousands separator) and round(float, 2) must be equal.
- OCR: 1 - word error rate (word-level Levenshtein / reference words), clipped to [0, 1].
- free-form: mean of ROUGE-1, ROUGE-2 and ROUGE-L F-measures. Tokenised like `rouge_score`
  (lower-case, runs of [a-z0-9] are tokens) but without its Porter stemmer (no new package).
- regression: 1 - |out - gt| / |gt|, clipped to [0, 1]. Video-R1 adds 1e-9 to both sides of the
  fraction, which scores an exact answer of 0 as 0; here an exact answer scores 1 (and any other
  answer to a 0 scores 0).

Format is a whole-string match of `<think>…</think>` then `<answer>…</answer>` (Video-R1's
`re.fullmatch(r"<think>.*?</think>\\s*<answer>.*?</answer>", s, re.DOTALL)`), with one deliberate
difference: Video-R1's pattern also accepts a second `<answer>` (or `<think>`) block inside the first,
because `.*?` stretches under fullmatch; here a tag inside a block fails the format. Accuracy still
reads the first answer block, as Video-R1 does.

C-GRPO (DESIGN.md §1): eta = a_comp / a_full with a_comp the mean accuracy of the student's group
and a_full the mean accuracy of the teacher's cached rollouts; r_c = alpha * max(0, eta - tau),
added to the correct answers only (accuracy > `correct_threshold`, Video-R1's T-GRPO uses 0.1, which
for multiple choice and numerical means exactly "right"). No bonus when a_full = 0 or is unknown,
and none for image samples.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

RewardFn = Callable[..., dict[str, float]]
REGISTRY: dict[str, RewardFn] = {}

PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    def deco(fn: RewardFn) -> RewardFn:
        if name in REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        REGISTRY[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; registered: {sorted(REGISTRY)}") from None


# ---------------------------------------------------------------------------------------- parsing

_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_FORMAT = re.compile(r"<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_TAG = re.compile(r"</?(?:think|answer)>")


def extract_answer(text: str) -> str:
    """Text inside the first <answer>…</answer>, stripped; '' when there is none (Video-R1)."""
    m = _ANSWER.search(text)
    return m.group(1).strip() if m else ""


def solution_answer(solution: str) -> str:
    """The reference answer: inside <answer> tags if the solution has them, else the whole string."""
    return extract_answer(solution) if "<answer>" in solution else solution.strip()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = reference.split(), hypothesis.split()
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1] / max(1, len(ref))


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _f(overlap: int, n_hyp: int, n_ref: int) -> float:
    p = overlap / n_hyp if n_hyp else 0.0
    r = overlap / n_ref if n_ref else 0.0
    return 2 * p * r / (p + r) if p + r else 0.0


def _rouge_n(ref: list[str], hyp: list[str], n: int) -> float:
    grams = lambda t: Counter(tuple(t[i : i + n]) for i in range(len(t) - n + 1))  # noqa: E731
    r, h = grams(ref), grams(hyp)
    return _f(sum((r & h).values()), sum(h.values()), sum(r.values()))


def _rouge_l(ref: list[str], hyp: list[str]) -> float:
    prev = [0] * (len(hyp) + 1)
    for a in ref:
        cur = [0]
        for j, b in enumerate(hyp, 1):
            cur.append(prev[j - 1] + 1 if a == b else max(prev[j], cur[j - 1]))
        prev = cur
    return _f(prev[-1], len(hyp), len(ref))


def rouge_mean_f(reference: str, hypothesis: str) -> float:
    """Mean F-measure of ROUGE-1, ROUGE-2, ROUGE-L."""
    ref, hyp = _tokens(reference), _tokens(hypothesis)
    return (_rouge_n(ref, hyp, 1) + _rouge_n(ref, hyp, 2) + _rouge_l(ref, hyp)) / 3


def answer_accuracy(out: str, gt: str, problem_type: str) -> float:
    """Score of an extracted answer against the reference answer, by problem type (Video-R1)."""
    if problem_type == "multiple choice":
        return float(out.strip() == gt.strip())
    if problem_type == "numerical":
        if (("." in gt) or ("," in gt)) != (("." in out) or ("," in out)):
            return 0.0
        g, o = _number(gt), _number(out)
        return float(g is not None and o is not None and round(g, 2) == round(o, 2))
    if problem_type == "OCR":
        return min(1.0, max(0.0, 1.0 - word_error_rate(gt, out)))
    if problem_type == "free-form":
        return min(1.0, max(0.0, rouge_mean_f(gt, out)))
    if problem_type == "regression":
        g, o = _number(gt), _number(out)
        if g is None or o is None:
            return 0.0
        rel = abs(o - g) / abs(g) if g != 0 else float(o != 0)
        return 1.0 - min(1.0, max(0.0, rel))
    raise ValueError(f"unknown problem_type {problem_type!r}; expected one of {PROBLEM_TYPES}")


# ---------------------------------------------------------------------------------------- plug-ins


@register("format")
def format_reward(completion: str, **_: object) -> dict[str, float]:
    m = _FORMAT.fullmatch(completion)
    ok = m is not None and not _TAG.search(m.group(1)) and not _TAG.search(m.group(2))
    return {"format": float(ok)}


@register("accuracy")
def accuracy_reward(completion: str, *, solution: str, problem_type: str, **_: object) -> dict[str, float]:
    return {"accuracy": answer_accuracy(extract_answer(completion), solution_answer(solution), problem_type)}


# ---------------------------------------------------------------------------------------- a group


@dataclass
class GroupScores:
    """Scores of one question's group of G completions."""

    totals: list[float]  # [G] R_i = sum of plug-in sub-scores + retention bonus
    components: dict[str, list[float]]  # name -> [G], every sub-score plus "retention" (r_c or 0)
    correct: list[bool]  # [G] accuracy > correct_threshold
    a_comp: float  # mean accuracy of the group
    eta: float | None  # a_comp / a_full; None where undefined (a_full 0 or unknown, image sample)
    r_c: float = 0.0  # the bonus a correct answer got


def retention_bonus(a_comp: float, a_full: float | None, alpha: float, tau: float) -> tuple[float | None, float]:
    """(eta, r_c): eta = a_comp / a_full, r_c = alpha * max(0, eta - tau); (None, 0) when a_full is 0/None."""
    if a_full is None or a_full <= 0:
        return None, 0.0
    eta = a_comp / a_full
    return eta, alpha * max(0.0, eta - tau)


def score_group(
    completions: Sequence[str],
    solution: str,
    problem_type: str,
    data_type: str,
    a_full: float | None,
    alpha: float,
    tau: float,
    reward_names: Sequence[str] = ("format", "accuracy"),
    correct_threshold: float = 0.1,
) -> GroupScores:
    """Score the G completions of one question and add the C-GRPO retention bonus to the correct ones.

    Accuracy is always computed (a_comp needs it) even if "accuracy" is not in `reward_names`;
    it then only decides correctness and eta, and is not part of the totals.
    """
    kw = dict(solution=solution, problem_type=problem_type, data_type=data_type)
    components: dict[str, list[float]] = {}
    for name in reward_names:
        for i, c in enumerate(completions):
            for sub, v in get_reward(name)(c, **kw).items():
                components.setdefault(sub, [0.0] * len(completions))[i] = float(v)
    acc = components.get("accuracy") or [accuracy_reward(c, **kw)["accuracy"] for c in completions]
    totals = [sum(vals[i] for vals in components.values()) for i in range(len(completions))]
    a_comp = sum(acc) / len(acc) if acc else 0.0
    eta, r_c = (None, 0.0) if data_type == "image" else retention_bonus(a_comp, a_full, alpha, tau)
    correct = [a > correct_threshold for a in acc]
    components["retention"] = [r_c if ok else 0.0 for ok in correct]
    totals = [t + b for t, b in zip(totals, components["retention"])]
    return GroupScores(totals=totals, components=components, correct=correct, a_comp=a_comp, eta=eta, r_c=r_c)
