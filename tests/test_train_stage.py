"""Stage train (issue #6 item 4): C-GRPO on the real tiny Qwen2.5-VL student, from the teacher.

Single process (world size 1, DeepSpeed ZeRO-2) for the stage's bookkeeping: crash -> resume with the
same numbers as an uninterrupted run, completed rerun is a no-op, more steps continue the run. One
integration test runs 2 Ray Train workers under ZeRO-2 and ZeRO-3. The engine itself (ZeRO-3, killed workers)
is covered on the toy policy by tests/test_train_engine.py.
"""

from __future__ import annotations

import shutil
import time

import pyarrow as pa
import pytest
import torch

from stages.common.arrow_io import write_table
from stages.model.inputs import Memory
from stages.model.qwen import load_model
from stages.rollout import stage as rollout
from stages.train import stage as train
from stages.train.engine import complete_checkpoints, read_metrics
from stages.train.memory import load_memories, student_memory
from stages.train.qwen_policy import QwenPolicy
from tiny_marc import format_teacher, tiny_config, tiny_workspace

torch.set_num_threads(1)

TRL_NAMES = {"reward", "reward_std", "reward/format/mean", "reward/accuracy/mean", "reward/retention/mean",
             "eta/mean", "kl", "loss", "clip_ratio", "frac_reward_zero_std", "completion_length", "step_time",
             "samples_per_second", "lr"}
TIMING = {"step_time", "samples_per_second"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ws, data = tiny_workspace(root)
    teacher = format_teacher(tiny_config(), ws, root / "teacher")
    rollout.run(tiny_config(), ws, teacher)
    return ws, teacher


def _differs(student_dir, teacher_dir) -> bool:
    s, t = load_model(student_dir).model.state_dict(), load_model(teacher_dir).model.state_dict()
    assert s.keys() == t.keys()
    return any(not torch.equal(s[k], t[k]) for k in s)


def test_student_trains_resumes_and_reruns_as_no_op(setup, monkeypatch):
    ws, teacher = setup
    config = tiny_config(steps=4, checkpoint_every=2)

    # A run that dies at step 3 (after the step-2 checkpoint) ...
    make_batch = QwenPolicy.make_batch

    def dies_at_step_3(self, model, ref_model, ctx):
        if ctx.step == 3:
            raise RuntimeError("worker lost")
        return make_batch(self, model, ref_model, ctx)

    monkeypatch.setattr(QwenPolicy, "make_batch", dies_at_step_3)
    with pytest.raises(RuntimeError, match="worker lost"):
        train.run(config, ws, teacher, use_ray=False)
    monkeypatch.undo()
    run_dirs = list((ws.home / "runs" / "train").iterdir())
    assert len(run_dirs) == 1 and [s for s, _ in complete_checkpoints(run_dirs[0])] == [2]

    # ... is resumed by the rerun from its last checkpoint; the step counter continues.
    seen = []
    res = train.run(config, ws, teacher, use_ray=False, on_metrics=lambda s, m: seen.append((s, m)))
    assert res.resumed_from == 2 and res.steps == 4 and [s for s, _ in seen] == [3, 4] and not res.cached
    assert res.run_dir == run_dirs[0] and res.counts["memory_source"] == "ground_truth"
    assert TRL_NAMES <= set(seen[0][1]) and set(res.metrics) == set(seen[-1][1])
    resumed = read_metrics(res.run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert any(r["reward_std"] > 0 for r in resumed)  # rewards had spread: there was something to learn

    # The student is a save_pretrained folder that loads, and training moved it off the teacher.
    assert (res.student_dir / "model.safetensors").is_file() and _differs(res.student_dir, teacher)
    student = load_model(res.student_dir)
    assert student.tokenizer.get_vocab() == load_model(teacher).tokenizer.get_vocab()

    # An unchanged completed run is a no-op returning the saved student.
    t0 = time.perf_counter()
    again = train.run(config, ws, teacher, use_ray=False)
    assert again.cached and again.student_dir == res.student_dir and again.steps == 4
    assert again.metrics == pytest.approx({k: v for k, v in resumed[-1].items() if k != "step"}, nan_ok=True)
    assert time.perf_counter() - t0 < 10

    # From scratch (force), the same seed gives the same numbers as the crashed-and-resumed run.
    fresh = train.run(config, ws, teacher, use_ray=False, force=True)
    assert fresh.resumed_from == 0 and fresh.steps == 4
    for a, b in zip(resumed, read_metrics(fresh.run_dir)):
        for k in set(a) - TIMING:
            assert b[k] == pytest.approx(a[k], abs=1e-5, nan_ok=True), (a["step"], k)

    # More steps continue the same run; a changed teacher needs new rollouts first.
    more = train.run(tiny_config(steps=5, checkpoint_every=2), ws, teacher, use_ray=False)
    assert more.resumed_from == 4 and more.steps == 5 and more.run_dir == res.run_dir
    other = shutil.copytree(teacher, teacher.parent / "teacher-b")
    (other / "generation_config.json").write_text((other / "generation_config.json").read_text() + "\n")
    with pytest.raises(RuntimeError, match="run stage rollout first"):
        train.run(config, ws, other, use_ray=False)


def test_memories_table_replaces_ground_truth(setup, tmp_path):
    ws, _ = setup
    config = tiny_config()
    gt = load_memories(ws, config.retrieve)
    question = rollout.load_questions(ws)[0][0]
    assert gt.source == "ground_truth" and student_memory(question, gt).event_frames
    table = pa.table({"question_id": [question["question_id"]], "video_id": [question["video_id"]],
                      "event_keys": [["a#0", "a#1"]], "timestamps": [[0.5, 1.5, 2.5]], "event_frames": [[1, 2]]})
    write_table(table, ws.table("memories"))
    try:
        retrieved = load_memories(ws, config.retrieve)
        assert retrieved.source == "retrieved" and retrieved.fingerprint != gt.fingerprint
        assert student_memory(question, retrieved) == Memory([0.5, 1.5, 2.5], [1, 2])
    finally:
        ws.table("memories").unlink()


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ray_train_workers(setup, local_ray, zero_stage):
    """ZeRO-3 partitions even this tiny model (persistence threshold 0), and generation runs with
    synced_gpus on both ranks (`qwen_policy.SyncedGenerate`)."""
    ws, teacher = setup
    config = tiny_config(steps=3, checkpoint_every=2, workers=2, zero_stage=zero_stage,
                         deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    res = train.run(config, ws, teacher, use_ray=True)
    assert res.steps == 3 and res.resumed_from == 0 and res.counts["workers"] == 2
    rows = read_metrics(res.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and TRL_NAMES <= set(rows[0])
    assert rows[0]["samples_per_second"] > 0  # counts both workers' samples
    assert [s for s, _ in complete_checkpoints(res.run_dir)] == [2, 3]
    assert _differs(res.student_dir, teacher)
    assert train.run(config, ws, teacher, use_ray=True).cached  # no Ray work on an unchanged rerun
