"""Stage rollout (issue #6 item 1): the teacher's cached answers, per-question incremental, GPU requests.

A tiny teacher (tests/tiny_marc.py) on one generated EventQA training video (~12 questions), G_t = 4.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from data_contracts import schemas
from infra.stack import require_gpus
from stages import ingest
from stages.common.arrow_io import read_table
from stages.rollout import stage
from tiny_marc import format_teacher, tiny_config, tiny_workspace

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    ws, data = tiny_workspace(root)
    teacher = format_teacher(tiny_config(), ws, root / "teacher")
    return ws, data, teacher


def _by_question(table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        out.setdefault(row["question_id"], []).append(row)
    return out


def test_rollouts_rows_scores_and_incremental_reruns(setup):
    ws, data, teacher = setup
    config = tiny_config()
    G = config.rollout.samples_per_question
    train_ids = sorted(q["question_id"] for q in stage.load_questions(ws)[0])
    assert len(train_ids) >= 4

    first = stage.run(config, ws, teacher)
    assert first.wrote and first.counts["computed"] == len(train_ids) and first.counts["skipped_test"] > 0
    assert first.counts["questions_per_second"] > 0 and first.counts["num_gpus"] == 0
    table = read_table(first.path, schemas.ROLLOUTS)
    groups = _by_question(table)
    assert sorted(groups) == train_ids  # train split only
    for qid, rows in groups.items():
        assert [r["sample_index"] for r in rows] == list(range(G))  # G_t rows per question
        acc = [r["reward_accuracy"] for r in rows]
        assert all(r["a_full"] == pytest.approx(sum(acc) / G) for r in rows)  # a_full = mean accuracy
        for r in rows:
            assert r["reward_total"] == pytest.approx(r["reward_format"] + r["reward_accuracy"])
            assert 1 <= r["num_tokens"] <= config.rollout.max_new_tokens
        assert len({r["fingerprint"] for r in rows}) == 1
    assert sum(r["reward_format"] for r in table.to_pylist()) > 0  # the teacher knows the format
    assert 0 < first.counts["mean_a_full"] < 1  # ...and is right sometimes: a_full is not trivially 0

    # Unchanged rerun: a no-op that writes nothing.
    stamp = os.stat(first.path).st_mtime_ns
    again = stage.run(config, ws, teacher)
    assert not again.wrote and again.counts["computed"] == 0 and again.counts["reused"] == len(train_ids)
    assert os.stat(first.path).st_mtime_ns == stamp

    # One question changes in the data folder: only it is recomputed (after a crash left it half done).
    changed = train_ids[1]
    lines = (data / "questions.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    for r in rows:
        if r["problem_id"] == changed:
            r["problem"] = r["problem"].replace("?", " in this video?")
    (data / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest.run(config, data, ws)
    todo = stage.plan(config, ws, teacher)
    assert todo.compute == [changed]
    questions = [q for q in stage.load_questions(ws)[0] if q["question_id"] == changed]
    stage.compute(config, questions, todo.fingerprints, ws, teacher)  # a run that died before its commit
    assert len(list((ws.home / "cache" / "rollout").glob("*.json"))) == 1
    third = stage.run(config, ws, teacher)
    assert third.wrote and third.counts["computed"] == 1 and third.counts["resumed"] == 1
    assert not list((ws.home / "cache" / "rollout").glob("*.json"))  # scratch removed once committed
    after = _by_question(read_table(third.path, schemas.ROLLOUTS))
    assert {q: r for q, r in after.items() if q != changed} == {q: r for q, r in groups.items() if q != changed}
    assert after[changed][0]["fingerprint"] != groups[changed][0]["fingerprint"]

    # Sampling is seeded per question: force recomputes everything and draws the same completions.
    forced = stage.run(config, ws, teacher, force=True)
    assert forced.counts["computed"] == len(train_ids)
    assert _by_question(read_table(forced.path, schemas.ROLLOUTS)) == after

    # A different teacher (or sampling config) invalidates every question.
    other = shutil.copytree(teacher, teacher.parent / "teacher2")
    (other / "generation_config.json").write_text((other / "generation_config.json").read_text() + "\n")
    assert len(stage.plan(config, ws, other).compute) == len(train_ids)
    hotter = config.model_copy(update={"rollout": config.rollout.model_copy(update={"temperature": 0.7})})
    assert len(stage.plan(hotter, ws, teacher).compute) == len(train_ids)


def test_asking_for_a_missing_gpu_fails_at_once(setup):
    ws, _, teacher = setup
    no_gpu = {"CPU": 2.0, "memory": 1e9}
    assert stage.resolve_gpus("auto", no_gpu) == require_gpus("auto", no_gpu) == 0
    assert stage.resolve_gpus("auto", {"GPU": 4.0}) == require_gpus("auto", {"GPU": 4.0}) == 1
    for check in (stage.resolve_gpus, require_gpus):
        with pytest.raises(RuntimeError, match="1 GPU.*cluster has 0"):
            check(1, no_gpu)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the in-process refusal needs one without")
    config = tiny_config().model_copy(update={"compute": tiny_config().compute.model_copy(update={"gpus_per_task": 1})})
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="asks for 1 GPU.*compute.gpus_per_task"):
        stage.run(config, ws, teacher)
    assert time.perf_counter() - t0 < 5  # at once: before any model is loaded


@pytest.mark.integration
def test_rollout_as_ray_tasks(setup, local_ray):
    ws, _, teacher = setup
    config = tiny_config()
    local = _by_question(read_table(stage.run(config, ws, teacher).path, schemas.ROLLOUTS))
    on_ray = stage.run(config, ws, teacher, force=True, use_ray=True)  # 2 shards, one Ray task each
    assert on_ray.counts["computed"] == len(local) and on_ray.counts["num_gpus"] == 0
    assert _by_question(read_table(on_ray.path, schemas.ROLLOUTS)) == local  # same draws, whatever the sharding
    gpu = config.model_copy(update={"compute": config.compute.model_copy(update={"gpus_per_task": 1})})
    with pytest.raises(RuntimeError, match="asks for 1 GPU.*cluster has 0"):
        stage.run(gpu, ws, teacher, use_ray=True)
