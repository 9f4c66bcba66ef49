"""Stage warmup (issue #5 item 4): training examples, the SFT loop, evaluation, the stage.

Fast: a very small model (2 layers, width 64) on 56 px frames and 16-frame teacher clips; the full
warm-up and its accuracy bar are measured by bench/warmup_experiment.py, not here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_contracts.config import ModelConfig, PipelineConfig, WarmupConfig
from stages import sample_data as eq
from stages.common.workspace import Workspace
from stages.model import runner
from stages.model.inputs import build_student_inputs, build_teacher_inputs, ground_truth_memory
from stages.model.qwen import build_model, load_model
from stages.warmup import stage
from stages.warmup.data import (
    ExampleStream,
    build_batch,
    dataset_videos,
    examples_of,
    frame_groups,
    render_at,
    synthetic_video,
    textqa_prompt,
    think_text,
    with_window,
)
from stages.warmup.evaluate import EvalResult, evaluate, parse, questions_of
from stages.warmup.train import train

torch.set_num_threads(1)  # 1 thread: far faster than 2 when the 2 cores are shared

SMALL = dict(frame_size=56, teacher_frames=16, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             intermediate_size=128, vision_hidden_size=32, vision_depth=1, vision_num_heads=4,
             vision_intermediate_size=64, prompt_style="compact")
FAST = dict(vision_steps=2, vision_batch_size=4, vision_textqa_weight=0.5, caption_steps=6, clip_steps=2,
            qa_steps=6, student_steps=3, batch_size=4, text_batch_size=4, learning_rate=3e-3,
            lr_warmup_steps=2, eval_every=0, eval_per_family=2, eval_captions=2, eval_batch_size=8,
            eval_max_new_tokens=12, log_every=3, story_weight=0.5, qa_textqa_weight=0.5, threads=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eventqa")
    eq.generate(d, videos=3, seed=11, test_fraction=0.34)
    return d


def test_render_at_matches_the_generator():
    v = synthetic_video(5, 2)
    stamps = v.teacher_stamps(64)
    frames = render_at(v.plan, stamps, v.fps, 128, 128, 128)  # source size: no resize, exact masks
    full = eq.render_video_frames(v.plan, 128, 128)
    idx = [int(np.floor(t * v.fps + 1e-6)) for t in stamps]
    assert np.array_equal(frames, full[idx])
    small = render_at(v.plan, stamps, v.fps, 128, 128, 56)
    assert small.shape == (64, 56, 56, 3) and small.dtype == np.uint8


def test_synthetic_video_is_what_generate_writes(data_dir):
    rows = [json.loads(line) for line in (data_dir / "events.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (data_dir / "questions.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        v = synthetic_video(11, i)
        assert v.events == row["events"] and v.frame_count == row["frame_count"]
        mine = [{k: q[k] for k in ("problem", "options", "solution", "family", "answer_event")} for q in v.questions]
        theirs = [{k: q[k] for k in mine[0]} for q in questions if q["path"] == row["path"]]
        assert mine == theirs
    # The rendered frames are close to the decoded MP4 (H.264 + 4:2:0 chroma are the difference).
    v, d = synthetic_video(11, 0), dataset_videos(data_dir, None)[0]
    stamps = v.teacher_stamps(64)
    diff = np.abs(v.frames(stamps, 56).astype(int) - d.frames(stamps, 56))
    assert diff.mean() < 4


def test_examples_and_qa_batch_match_the_pipeline_builders():
    bundle = build_model(ModelConfig(**SMALL))
    v = synthetic_video(5, 0)
    ex = examples_of(v, {"caption", "qa", "textqa", "story"})
    by_task = {t: [e for e in ex if e.task == t] for t in ("caption", "qa", "textqa", "story")}
    assert len(by_task["caption"]) == len(v.events) and len(by_task["story"]) == 1
    assert len(by_task["qa"]) == len(by_task["textqa"]) == len(v.questions)
    q = by_task["qa"][0]
    assert q.target == f"<think>{v.events[q.question['answer_event']]['caption']}</think>" \
                       f"<answer>{q.question['solution'][8:9]}</answer>"
    # qa micro-batches are exactly the pipeline's teacher / student inputs.
    qa = by_task["qa"][:3]
    inputs, _, completions = build_batch(bundle, qa, "teacher")
    stamps = v.teacher_stamps(16)
    ref = build_teacher_inputs(bundle, [e.question for e in qa], [v.frames(stamps, 56)] * 3, [stamps] * 3)
    assert torch.equal(inputs.input_ids, ref.input_ids) and torch.equal(inputs.pixel_values_videos, ref.pixel_values_videos)
    assert torch.equal(inputs.mm_token_type_ids, ref.mm_token_type_ids)
    assert bundle.tokenizer.decode(completions[0]) == qa[0].target + "<|im_end|>"
    s_inputs, _, _ = build_batch(bundle, qa, "student")
    mems = [ground_truth_memory(v.events, e.question["answer_event"]) for e in qa]
    s_ref = build_student_inputs(bundle, [e.question for e in qa], [v.frames(m.timestamps, 56) for m in mems], mems)
    assert torch.equal(s_inputs.input_ids, s_ref.input_ids) and s_inputs.visual_tokens == [4] * 3
    assert s_inputs.event_groups == s_ref.event_groups
    # The compact prompt is short; the Video-R1 prompt is the default.
    assert "Think, then answer" in bundle.tokenizer.decode(inputs.input_ids[0])
    # Streams are deterministic and mix data-set videos in.
    a = [e.video.video_id for e in ExampleStream("qa", [v], 77, 1, dataset_share=0.5).take(40)]
    b = [e.video.video_id for e in ExampleStream("qa", [v], 77, 1, dataset_share=0.5).take(40)]
    assert a == b and v.video_id in a and any(x.startswith("eq77_") for x in a)


def test_evaluation_counts_and_parsing():
    assert parse("<think>a red circle moving left on a blue background</think><answer>B</answer>") == \
        (True, "B", "a red circle moving left on a blue background")
    assert parse("<answer>C</answer>") == (False, "C", None)
    assert parse("garbage") == (False, None, None)
    bundle = build_model(ModelConfig(**SMALL))
    videos = [synthetic_video(9, i) for i in range(2)]
    items = questions_of(videos, per_family=2)
    fams = [q["family"] for _, q in items]
    assert all(fams.count(f) == 2 for f in eq.FAMILIES)
    res = evaluate(bundle, items, "teacher", batch_size=5, max_new_tokens=4)
    assert res.total == 8 and res.counts == {f: 2 for f in eq.FAMILIES}
    assert all(0 <= res.correct[f] <= 2 for f in eq.FAMILIES) and res.formatted == 0  # 4 tokens: no full format
    r = EvalResult(counts={"shape": 4}, correct={"shape": 3}, total=4, formatted=2)
    assert r.accuracy == {"shape": 0.75} and r.metrics()["format"] == 0.5


def test_train_loss_falls_checkpoint_round_trips_and_student_runs(data_dir, tmp_path):
    config = PipelineConfig(name="test", model=ModelConfig(**SMALL), warmup=WarmupConfig(**FAST))
    ws = Workspace(tmp_path / "home")
    result = stage.run(config, data_dir, ws, mode="teacher")
    assert not result.skipped and (result.checkpoint_dir / "marc_model.json").is_file()
    losses = [r for r in result.curves if "loss/caption" in r]
    assert losses[-1]["loss/caption"] < losses[0]["loss/caption"] - 0.5  # the loss falls
    assert {"loss/qa", "loss/story", "loss/textqa"} <= set(losses[-1])
    assert set(f"acc/{f}" for f in eq.FAMILIES) <= set(result.metrics) and result.metrics["steps"] == 16
    tasks = {k for r in result.curves for k in r if k.startswith("loss/")}
    assert {"loss/frames", "loss/clipqa", "loss/probe_caption", "loss/probe_qa"} <= tasks
    assert {"step", "minutes"} <= set(result.curves[-1])
    # The checkpoint round-trips (architecture, prompt style, identical logits).
    loaded = load_model(result.checkpoint_dir)
    assert loaded.config.prompt_style == "compact" and loaded.config.hidden_size == 64
    ex = examples_of(synthetic_video(5, 1), {"qa"})[:2]
    inputs, _, _ = build_batch(loaded, ex, "teacher")
    again = load_model(result.checkpoint_dir)
    with torch.no_grad():
        assert torch.equal(runner.forward(loaded, inputs).logits, runner.forward(again, inputs).logits)
    # Unchanged rerun: read back, no training.
    assert stage.run(config, data_dir, ws, mode="teacher").cached
    # The SFT student baseline: same code on 1-group compressed memories, from the teacher.
    student = stage.run(config, data_dir, ws, mode="student")
    assert student.checkpoint_dir.name == "warmup-student" and student.metrics["steps"] == 3
    assert "loss/qa" in student.curves[0]
    # A pretrained checkpoint skips the teacher warm-up.
    pre = config.model_copy(update={"model": ModelConfig(checkpoint=str(tmp_path))})
    assert stage.run(pre, data_dir, ws).skipped


def test_training_is_deterministic():
    cfg = WarmupConfig(**{**FAST, "caption_steps": 2, "qa_steps": 1, "eval_captions": 0, "eval_per_family": 1})
    runs = []
    for _ in range(2):
        bundle = build_model(ModelConfig(**SMALL))
        out = train(bundle, cfg, [], "teacher", heldout=[synthetic_video(9, 0)])
        runs.append(([r.get("loss/caption") for r in out.curves], next(bundle.model.parameters()).detach().clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_keyed_think_names_the_key_the_event_and_the_answer_word():
    v = synthetic_video(5, 0)
    for q in v.questions:
        e = v.events[q["answer_event"]]
        think = think_text(q, v.events, "keyed")
        word = next(op[3:] for op in q["options"] if op.startswith(q["solution"][8] + "."))
        assert e["caption"] in think and think.endswith(f", then {word}")
        key = think[:think.index(":")]
        if q["family"] in ("shape", "colour"):
            assert key == f"on the {e['background']} background" and e["background"] in q["problem"]
        elif q["family"] == "direction":
            assert key == f"the {e['colour']} {e['shape']}" and word == e["direction"]
        else:
            assert key == f"after the {v.events[q['answer_event'] - 1]['background']} background"
            assert word == e["background"]
        assert think_text(q, v.events) == e["caption"]  # the default: the caption alone
    ex = examples_of(v, {"qa"}, "keyed")[0]
    assert ex.target == f"<think>{think_text(ex.question, v.events, 'keyed')}</think><answer>{ex.question['solution'][8]}</answer>"


def test_windows_hold_the_answer_and_clips_show_only_their_events():
    bundle = build_model(ModelConfig(**{**SMALL, "teacher_frames": 64}))
    rng = __import__("random").Random(0)
    v = synthetic_video(5, 3)
    assert len(v.events) >= 3
    for ex in examples_of(v, {"clipqa", "textqa"}, "keyed"):
        w = with_window(ex, 2, rng)
        first, last = w.window
        assert last - first == 1 and first <= w.question["answer_event"] <= last
        if w.family == "after":
            assert first == w.question["answer_event"] - 1
        if w.task == "textqa":
            prompt = textqa_prompt(bundle, w)
            assert prompt.count(" background: ") == 2 and v.events[w.question["answer_event"]]["caption"] in prompt
    clip = [with_window(e, 2, rng) for e in examples_of(v, {"clipqa"})][:2]
    inputs, text, _ = build_batch(bundle, clip, "teacher")
    full = v.teacher_stamps(64)
    for ex, groups in zip(clip, text["group_events"]):
        shown = {e["index"] for e in groups}
        assert shown <= set(range(ex.window[0], ex.window[1] + 1))
    assert inputs.video_grid_thw[:, 0].max() < len(full) // 2  # fewer groups than the whole video
    # Vision-task groups: two frames of one event, labelled with it.
    frames, labels = frame_groups(rng, 3, 5, 56)
    assert len(frames) == 3 and frames[0].shape == (2, 56, 56, 3) and all("shape" in e for e in labels)


def test_clip_schedule_splits_clip_steps_into_stages_and_one_event_after_keeps_its_scene_before():
    from stages.warmup.train import phases_for

    plain = [p.name for p in phases_for(WarmupConfig(clip_steps=10), "teacher")]
    assert plain.count("clipqa") == 1
    staged = [p for p in phases_for(WarmupConfig(clip_steps=10, clip_schedule=[1, 2, 3]), "teacher")
              if p.name.startswith("clipqa")]
    assert [(p.name, p.steps, p.clip_events) for p in staged] == [("clipqa1", 3, 1), ("clipqa2", 3, 2),
                                                                  ("clipqa3", 4, 3)]
    rng = __import__("random").Random(0)
    v = synthetic_video(5, 3)
    for ex in examples_of(v, {"clipqa"}, "keyed"):
        first, last = with_window(ex, 1, rng).window
        want = 2 if ex.family == "after" else 1  # `after` asks about the scene before the answer too
        assert last - first + 1 == want and last == ex.question["answer_event"], (ex.family, first, last)
