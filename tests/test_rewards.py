"""Reward plug-ins and the C-GRPO retention bonus: table-driven, one row per problem type and edge case."""

import pytest

from stages.train.rewards import (
    REGISTRY,
    accuracy_reward,
    extract_answer,
    format_reward,
    get_reward,
    register,
    rouge_mean_f,
    score_group,
    word_error_rate,
)

T = "<think>let me think</think>"


@pytest.mark.parametrize(
    "completion, expected",
    [
        (f"{T}<answer>B</answer>", 1.0),
        (f"{T}\n  <answer>B</answer>", 1.0),  # whitespace between the blocks is allowed
        ("<think>line one\nline two</think><answer>B</answer>", 1.0),  # multi-line think (DOTALL)
        ("<think></think><answer></answer>", 1.0),  # empty blocks still have the format
        (f"{T}<answer></answer>", 1.0),
        ("B", 0.0),  # no tags
        ("<answer>B</answer>", 0.0),  # no think
        (f"{T}", 0.0),  # no answer
        (f" {T}<answer>B</answer>", 0.0),  # whole-string match: nothing before
        (f"{T}<answer>B</answer> so B", 0.0),  # ... nor after
        (f"<answer>B</answer>{T}", 0.0),  # wrong order
        (f"{T}<answer>A</answer><answer>B</answer>", 0.0),  # two answer tags (Video-R1's regex accepts this)
        (f"{T}<answer>A</answer>\n<answer>B</answer>", 0.0),
        ("<think>a<think>b</think><answer>B</answer>", 0.0),  # nested think
        (f"{T}{T}<answer>B</answer>", 0.0),  # two think blocks
    ],
)
def test_format(completion, expected):
    assert format_reward(completion) == {"format": expected}


@pytest.mark.parametrize(
    "completion, solution, problem_type, expected",
    [
        # multiple choice: exact letter inside the first answer block
        (f"{T}<answer>B</answer>", "<answer>B</answer>", "multiple choice", 1.0),
        (f"{T}<answer> B </answer>", "<answer>B</answer>", "multiple choice", 1.0),
        (f"{T}<answer>B</answer>", "B", "multiple choice", 1.0),  # bare solution without tags
        (f"{T}<answer>C</answer>", "<answer>B</answer>", "multiple choice", 0.0),
        (f"{T}<answer>B. red</answer>", "<answer>B</answer>", "multiple choice", 0.0),
        (f"{T}<answer>b</answer>", "<answer>B</answer>", "multiple choice", 0.0),
        ("B", "<answer>B</answer>", "multiple choice", 0.0),  # no tags: nothing extracted
        (f"{T}<answer></answer>", "<answer>B</answer>", "multiple choice", 0.0),  # empty answer
        (f"{T}<answer>B</answer><answer>C</answer>", "<answer>B</answer>", "multiple choice", 1.0),  # first block
        (f"{T}<answer>C</answer><answer>B</answer>", "<answer>B</answer>", "multiple choice", 0.0),
        ("<answer>B</answer>", "<answer>B</answer>", "multiple choice", 1.0),  # accuracy ignores the format
        # numerical: same decimal-separator presence, ',' dropped, round(., 2)
        (f"{T}<answer>3.14159</answer>", "<answer>3.14</answer>", "numerical", 1.0),
        (f"{T}<answer>3.149</answer>", "<answer>3.14</answer>", "numerical", 0.0),
        (f"{T}<answer>42</answer>", "<answer>42</answer>", "numerical", 1.0),
        (f"{T}<answer>3.0</answer>", "<answer>3</answer>", "numerical", 0.0),  # separator rule
        (f"{T}<answer>1,000</answer>", "<answer>1000</answer>", "numerical", 0.0),  # separator rule
        (f"{T}<answer>1,000.5</answer>", "<answer>1000.50</answer>", "numerical", 1.0),
        (f"{T}<answer>1,000</answer>", "<answer>1.000</answer>", "numerical", 0.0),  # 1000 vs 1.0
        (f"{T}<answer>seven</answer>", "<answer>7</answer>", "numerical", 0.0),
        (f"{T}<answer></answer>", "<answer>7</answer>", "numerical", 0.0),
        # OCR: 1 - word error rate, clipped
        (f"{T}<answer>hello world</answer>", "<answer>hello world</answer>", "OCR", 1.0),
        (f"{T}<answer>hello word</answer>", "<answer>hello world</answer>", "OCR", 0.5),
        (f"{T}<answer>hello</answer>", "<answer>hello big world</answer>", "OCR", 1 / 3),
        (f"{T}<answer>a b c d e</answer>", "<answer>x</answer>", "OCR", 0.0),  # WER 5 -> clipped
        (f"{T}<answer></answer>", "<answer>hello world</answer>", "OCR", 0.0),
        # free-form: mean ROUGE-1/2/L F
        (f"{T}<answer>the cat sat</answer>", "<answer>the cat sat</answer>", "free-form", 1.0),
        (f"{T}<answer>The Cat SAT!</answer>", "<answer>the cat sat</answer>", "free-form", 1.0),
        (f"{T}<answer>cat</answer>", "<answer>cat</answer>", "free-form", 2 / 3),  # no bigrams: ROUGE-2 = 0
        (f"{T}<answer>the cat on the mat</answer>", "<answer>the cat sat on the mat</answer>", "free-form",
         (10 / 11 + 2 / 3 + 10 / 11) / 3),  # R1 P=1 R=5/6; R2 P=3/4 R=3/5; RL LCS=5
        (f"{T}<answer>dog</answer>", "<answer>the cat</answer>", "free-form", 0.0),
        (f"{T}<answer></answer>", "<answer>the cat</answer>", "free-form", 0.0),
        # regression: 1 - relative error, clipped to [0, 1]
        (f"{T}<answer>9</answer>", "<answer>10</answer>", "regression", 0.9),
        (f"{T}<answer>12.5</answer>", "<answer>10</answer>", "regression", 0.75),
        (f"{T}<answer>10</answer>", "<answer>10</answer>", "regression", 1.0),
        (f"{T}<answer>30</answer>", "<answer>10</answer>", "regression", 0.0),  # relative error 2 -> clipped
        (f"{T}<answer>-10</answer>", "<answer>10</answer>", "regression", 0.0),
        (f"{T}<answer>0</answer>", "<answer>0</answer>", "regression", 1.0),
        (f"{T}<answer>0.1</answer>", "<answer>0</answer>", "regression", 0.0),
        (f"{T}<answer>1,500</answer>", "<answer>1500</answer>", "regression", 1.0),
        (f"{T}<answer>many</answer>", "<answer>10</answer>", "regression", 0.0),
    ],
)
def test_accuracy(completion, solution, problem_type, expected):
    got = accuracy_reward(completion, solution=solution, problem_type=problem_type, data_type="video")
    assert got == {"accuracy": pytest.approx(expected, abs=1e-9)}


def test_helpers():
    assert extract_answer("x <answer>\n A \n</answer> y") == "A"
    assert extract_answer("no tags") == ""
    assert word_error_rate("a b c", "a x c d") == pytest.approx(2 / 3)
    assert word_error_rate("", "") == 0.0
    assert rouge_mean_f("", "") == 0.0
    with pytest.raises(ValueError, match="unknown problem_type 'essay'"):
        accuracy_reward(f"{T}<answer>x</answer>", solution="x", problem_type="essay")


def test_registry():
    assert {"format", "accuracy"} <= set(REGISTRY)
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward("nope")
    with pytest.raises(ValueError, match="already registered"):
        register("format")(lambda c, **_: {"format": 0.0})


# -------------------------------------------------------------------------------- score_group

RIGHT, WRONG, BAD = f"{T}<answer>B</answer>", f"{T}<answer>C</answer>", "B"


def _group(completions, a_full, data_type="video", alpha=0.5, tau=0.6, **kw):
    return score_group(completions, "<answer>B</answer>", "multiple choice", data_type, a_full, alpha, tau, **kw)


@pytest.mark.parametrize(
    "completions, a_full, data_type, eta, r_c",
    [
        ([RIGHT, RIGHT, RIGHT, WRONG], 0.75, "video", 1.0, 0.5 * (1.0 - 0.6)),  # eta above tau
        ([RIGHT, RIGHT, RIGHT, WRONG], 0.5, "video", 1.5, 0.5 * (1.5 - 0.6)),  # student beats teacher
        ([RIGHT, WRONG, WRONG, WRONG], 1.0, "video", 0.25, 0.0),  # eta below tau
        ([RIGHT, RIGHT, RIGHT, WRONG], 1.25, "video", 0.6, 0.0),  # eta == tau: max(0, 0) = 0
        ([RIGHT, RIGHT, RIGHT, WRONG], 0.0, "video", None, 0.0),  # a_full = 0: no bonus
        ([RIGHT, RIGHT, RIGHT, WRONG], None, "video", None, 0.0),  # no teacher rollouts
        ([RIGHT, RIGHT, RIGHT, WRONG], 0.75, "image", None, 0.0),  # image sample: no bonus
        ([WRONG, WRONG, BAD, BAD], 0.5, "video", 0.0, 0.0),  # nothing right
    ],
)
def test_retention(completions, a_full, data_type, eta, r_c):
    s = _group(completions, a_full, data_type)
    assert s.eta == (None if eta is None else pytest.approx(eta))
    assert s.r_c == pytest.approx(r_c)
    acc = [1.0 if c == RIGHT else 0.0 for c in completions]
    fmt = [0.0 if c == BAD else 1.0 for c in completions]
    bonus = [r_c if a else 0.0 for a in acc]  # incorrect answers never get the bonus
    assert s.components == {"format": fmt, "accuracy": acc, "retention": pytest.approx(bonus)}
    assert s.totals == pytest.approx([f + a + b for f, a, b in zip(fmt, acc, bonus)])
    assert s.correct == [bool(a) for a in acc]
    assert s.a_comp == pytest.approx(sum(acc) / len(acc))


def test_retention_formula_by_hand():
    # G = 4, 3 right: a_comp = 0.75; teacher a_full = 0.6 -> eta = 1.25; alpha 0.8, tau 0.6 -> r_c = 0.52
    s = _group([RIGHT, RIGHT, BAD, RIGHT], 0.6, alpha=0.8)
    assert s.eta == pytest.approx(1.25) and s.r_c == pytest.approx(0.52)
    assert s.totals == pytest.approx([2.52, 2.52, 0.0, 2.52])


def test_graded_correctness_threshold():
    # free-form: a partial answer above the threshold is "correct" for the bonus, below it is not
    comps = [f"{T}<answer>the cat sat</answer>", f"{T}<answer>the dog ran</answer>", f"{T}<answer>xyz</answer>"]
    s = score_group(comps, "<answer>the cat sat</answer>", "free-form", "video", 0.5, 1.0, 0.6)
    acc = s.components["accuracy"]
    assert acc[0] == 1.0 and 0.1 < acc[1] < 1.0 and acc[2] == 0.0
    assert s.correct == [True, True, False]
    assert s.components["retention"] == pytest.approx([s.r_c, s.r_c, 0.0]) and s.r_c > 0
    strict = score_group(comps, "<answer>the cat sat</answer>", "free-form", "video", 0.5, 1.0, 0.6,
                         correct_threshold=0.99)
    assert strict.correct == [True, False, False]


def test_reward_names_select_plugins():
    s = _group([RIGHT, BAD], 0.25, reward_names=["format"])  # accuracy still decides correctness and eta
    assert set(s.components) == {"format", "retention"}
    assert s.eta == pytest.approx(2.0) and s.r_c == pytest.approx(0.5 * 1.4)
    assert s.totals == pytest.approx([1.0 + 0.7, 0.0])
    with pytest.raises(KeyError):
        _group([RIGHT], 1.0, reward_names=["format", "nope"])


def test_teacher_rollout_rows_fit_the_contract():
    """How the rollout stage turns one question's scored teacher completions into ROLLOUTS rows."""
    from data_contracts.schemas import ROLLOUTS
    from data_contracts.validate import validate_rows

    comps = [RIGHT, WRONG, BAD, RIGHT]
    s = _group(comps, None)  # teacher rollouts: no retention bonus (no a_full yet)
    a_full = sum(s.components["accuracy"]) / len(comps)
    rows = [dict(question_id="q1", fingerprint="f" * 16, sample_index=i, completion=c, num_tokens=len(c.split()) + 1,
                 reward_format=s.components["format"][i], reward_accuracy=s.components["accuracy"][i],
                 reward_total=s.totals[i], a_full=a_full) for i, c in enumerate(comps)]
    table = validate_rows(rows, ROLLOUTS, "rollouts.arrow")
    assert table.num_rows == 4 and table.column("a_full").to_pylist() == [0.5] * 4
    assert table.column("reward_total").to_pylist() == [2.0, 1.0, 0.0, 2.0]
