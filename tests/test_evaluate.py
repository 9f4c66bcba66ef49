"""Stage evaluate (issue #7): arms, scoring, goals, and the report files, on a tiny real workspace."""

from __future__ import annotations

import json

import pytest
import torch

from stages.evaluate import stage as evaluate
from stages.evaluate.arms import BASELINE, arms_for, build_inputs
from stages.model.qwen import load_model
from tiny_marc import format_teacher, tiny_config, tiny_workspace

torch.set_num_threads(1)


def _config(**evaluate_cfg):
    config = tiny_config()
    return config.model_copy(update={"evaluate": config.evaluate.model_copy(update={
        "max_new_tokens": 12, "profile_questions": 2, "latency_new_tokens": 4, "latency_repeats": 1,
        **evaluate_cfg})})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    ws, data = tiny_workspace(root)
    teacher = format_teacher(tiny_config(), ws, root / "teacher")
    return ws, teacher


def test_each_arm_feeds_the_language_model_what_it_claims(setup):
    ws, teacher = setup
    config = _config()
    bundle = load_model(teacher, config.model)
    items, left_out = evaluate.test_items(config, ws)
    assert items and left_out["train"] > 0  # the training split is never evaluated
    arms = {a.name: a for a in arms_for(config)}
    assert list(arms) == [BASELINE, "teacher_quarter", "teacher_1group", "teacher_vmr", "merge_uniform",
                          "vmr_compress", "sft_student", "cgrpo_student"]
    item = items[0]
    P = bundle.geometry.tokens_per_group(56, 56)
    tokens = {name: build_inputs(arm, bundle, [item], None).visual_tokens[0] for name, arm in arms.items()}
    full = config.model.teacher_frames
    assert tokens[BASELINE] == full // 2 * P
    assert tokens["teacher_quarter"] == max(2, full // 4) // 2 * P
    assert tokens["teacher_1group"] == P
    groups = sum((n + 1) // 2 for n in item.memory.event_frames)  # each event padded to whole groups alone
    assert tokens["teacher_vmr"] == groups * P
    for compressed in ("merge_uniform", "vmr_compress", "sft_student", "cgrpo_student"):
        assert tokens[compressed] == config.model.target_frames * P


def test_summary_retention_and_goals_from_hand_made_answers():
    config = _config()
    arms = arms_for(config)

    def rows(acc_by_family: dict[str, list[float]], tokens: int):
        return [{"question_id": f"{f}{i}", "family": f, "completion": "", "accuracy": a, "format": 1.0,
                 "visual_tokens": tokens} for f, accs in acc_by_family.items() for i, a in enumerate(accs)]

    answers = {a.name: rows({"colour": [1, 1, 0, 0], "shape": [1, 0, 0, 0]}, 16) for a in arms}
    answers[BASELINE] = rows({"colour": [1, 1, 1, 1], "shape": [1, 1, 0, 0]}, 512)
    answers["cgrpo_student"] = rows({"colour": [1, 1, 1, 1], "shape": [1, 1, 0, 0]}, 16)
    summary = evaluate.summarize(arms, answers, {})
    assert summary[BASELINE]["retention"]["overall"] == 1.0
    assert summary["cgrpo_student"]["visual_token_ratio"] == 16 / 512
    assert summary["sft_student"]["retention"]["colour"] == 0.5
    assert summary["sft_student"]["accuracy"]["overall"] == 3 / 8
    goals = {g["goal"]: g for g in evaluate.check_goals(summary)}
    assert all(g["met"] for g in goals.values()), goals
    # One family below 95% of the baseline, and a tie with the SFT student, are misses.
    answers["cgrpo_student"] = rows({"colour": [1, 1, 1, 0], "shape": [1, 1, 0, 0]}, 16)
    answers["sft_student"] = answers["cgrpo_student"]
    goals = {g["goal"]: g for g in evaluate.check_goals(evaluate.summarize(arms, answers, {}))}
    missed = {k for k, g in goals.items() if not g["met"]}
    assert missed == {"colour: accuracy >= 95% of the baseline's", "overall accuracy above sft_student"}, goals


def test_run_writes_every_arm_into_the_report_and_latest(setup):
    ws, teacher = setup
    config = _config()
    ckpt = evaluate.Checkpoints(teacher=str(teacher), sft=str(teacher), cgrpo=str(teacher))
    result = evaluate.run(config, ws, ckpt, report_id="r1")
    report = json.loads((result.report_dir / "report.json").read_text())
    assert set(report["arms"]) == {a.name for a in arms_for(config)}
    for name, arm in report["arms"].items():
        assert arm["questions"] == report["questions"] > 0
        assert set(arm["accuracy"]) >= {"overall"} and 0.0 <= arm["accuracy"]["overall"] <= 1.0
        assert arm["peak_forward_bytes"] > 0, name
        assert set(arm["latency_s"]) == {"vision", "prefill", "generation", "end_to_end"}
        assert arm["latency_s"]["generation"] >= arm["latency_s"]["vision"] > 0
    # Same weights and same inputs give the same answers: the student arms equal vmr_compress here.
    assert report["arms"]["cgrpo_student"]["accuracy"] == report["arms"]["vmr_compress"]["accuracy"]
    # The 64-frame teacher pays more memory than the compressed arm.
    arms = report["arms"]
    assert arms[BASELINE]["peak_forward_bytes"] > arms["vmr_compress"]["peak_forward_bytes"]
    for name in ("report.md", "accuracy_vs_tokens.png", "latency.png"):
        assert (result.report_dir / name).stat().st_size > 0
        assert (result.latest_dir / name).read_bytes() == (result.report_dir / name).read_bytes()
    assert "| arm |" in result.markdown and "cgrpo_student" in result.markdown
    assert evaluate.read_latest(ws.home)["report_id"] == "r1"
    # A second report replaces latest/ as a whole.
    evaluate.run(_config(arms=[BASELINE, "cgrpo_student"], profile_questions=0), ws, ckpt, report_id="r2")
    latest = evaluate.read_latest(ws.home)
    assert latest["report_id"] == "r2" and set(latest["arms"]) == {BASELINE, "cgrpo_student"}
    assert not (result.latest_dir / "latency.png").exists()  # r2 profiled nothing


def test_a_missing_student_fails_before_any_answering(setup):
    ws, teacher = setup
    with pytest.raises(FileNotFoundError, match="run stage train first"):
        evaluate.run(_config(), ws, evaluate.Checkpoints(teacher=str(teacher), sft=str(teacher)))
