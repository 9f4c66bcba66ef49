"""The model room: tokenizer, patchify, teacher/student inputs, forward, generate, save/load (issue #5)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from data_contracts.config import ModelConfig
from stages.model import runner
from stages.model import tokenizer as tok
from stages.model.inputs import (
    Memory,
    build_student_inputs,
    build_teacher_inputs,
    ground_truth_memory,
    load_frames,
    pad_events,
    patchify,
    teacher_timestamps,
)
from stages.model.qwen import build_model, load_model, save_model

torch.set_num_threads(2)

QUESTIONS = [
    {"problem": "Which shape moves on the red background?",
     "options": ["A. circle", "B. square", "C. triangle", "D. diamond"]},
    {"problem": "Which background comes right after the blue background?",
     "options": ["A. green", "B. white", "C. red", "D. gray"]},
]


@pytest.fixture(scope="module")
def bundle():
    return build_model(ModelConfig())


def _clips(seed: int = 0, sizes=(16, 10)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8) for n in sizes]


def _student(bundle, compression="memory", sizes=(16, 10), events=([5, 6, 5], [3, 7])):
    clips = _clips(sizes=sizes)
    memories = [Memory(teacher_timestamps(n / 2, 2, n), list(e)) for n, e in zip(sizes, events)]
    return build_student_inputs(bundle, QUESTIONS, clips, memories, compression)


# --------------------------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens_and_round_trip(bundle, tmp_path):
    t = bundle.tokenizer
    assert [t.convert_tokens_to_ids(s) for s in tok.SPECIAL_TOKENS] == list(range(len(tok.SPECIAL_TOKENS)))
    assert t.eos_token == "<|im_end|>" and t.pad_token == "<|endoftext|>" and t.padding_side == "left"
    assert len(t) <= ModelConfig().vocab_size + len(tok.FORMAT_TOKENS)
    completion = "<think>a red circle moving left on a blue background</think><answer>B</answer>"
    ids = t(completion, add_special_tokens=False)["input_ids"]
    for tag in tok.FORMAT_TOKENS:  # one token each, kept when special tokens are skipped
        assert t.convert_tokens_to_ids(tag) in ids
    assert t.decode(ids) == completion == t.decode(ids, skip_special_tokens=True)
    for text in ["Which way does the purple diamond move? 0 1 2 42 3.14", "xyz QWERTY ünï"]:
        assert t.decode(t(text)["input_ids"]) == text  # byte-level: any text round-trips
    prompt = t.apply_chat_template(tok.chat_messages(**QUESTIONS[0]), tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                             "<|vision_start|><|video_pad|><|vision_end|>Which shape")
    assert "D. diamond\n" in prompt and "<think> </think>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>" not in t.decode(t(prompt)["input_ids"], skip_special_tokens=True)
    # Deterministic, and saved files give back the same tokenizer.
    assert tok.build_tokenizer(ModelConfig().vocab_size).get_vocab() == t.get_vocab()
    tok.save_tokenizer(t, tmp_path)
    loaded = tok.load_tokenizer(tmp_path)
    assert loaded.get_vocab() == t.get_vocab() and loaded(prompt)["input_ids"] == t(prompt)["input_ids"]
    assert loaded.chat_template == t.chat_template


# --------------------------------------------------------------------------------------------
# Frames, patches and inputs.
# --------------------------------------------------------------------------------------------


def test_patchify_equals_qwen_image_processor(bundle):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(do_resize=False)
    a, b = _clips(seed=1, sizes=(2,))[0]

    def reference(image):  # the processor treats one image as a frame pair of itself
        out = processor(images=[image], return_tensors="np")
        return out["pixel_values"], out["image_grid_thw"][0]

    ref_a, grid = reference(a)
    ours, (t, gh, gw) = patchify(np.stack([a, a]), bundle.geometry)
    assert (t, gh, gw) == (1, *grid[1:]) and ours.dtype == torch.float32
    assert np.array_equal(ours.numpy(), ref_a)  # bit-exact
    # A pair of distinct frames: frame k of the pair is column block k of the temporal axis.
    pair, _ = patchify(np.stack([a, b]), bundle.geometry)
    pair = pair.numpy().reshape(-1, 3, 2, 14 * 14)
    assert np.array_equal(pair[:, :, 0], ref_a.reshape(-1, 3, 2, 196)[:, :, 0])
    assert np.array_equal(pair[:, :, 1], reference(b)[0].reshape(-1, 3, 2, 196)[:, :, 1])
    # An odd count repeats the last frame.
    odd, (t3, _, _) = patchify(np.stack([a, b, a]), bundle.geometry)
    assert t3 == 2 and torch.equal(odd[64:], ours)


def test_teacher_sampling_and_event_rule():
    ts = teacher_timestamps(20.0, 10, 64)
    assert len(ts) == 64 and ts == sorted(ts) and 0 < ts[0] and ts[-1] < 20.0
    assert len(teacher_timestamps(2.5, 10, 64)) == 24  # 25 frames in the video -> 24 (even)
    assert len(teacher_timestamps(0.1, 10, 64)) == 2
    frames = np.arange(7)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3).astype(np.uint8)
    padded, groups = pad_events(frames, [3, 1, 3])
    assert groups == [2, 1, 2] and padded[:, 0, 0, 0].tolist() == [0, 1, 2, 2, 3, 3, 4, 5, 6, 6]
    events = [{"start_time": 0.0, "end_time": 2.5}, {"start_time": 2.5, "end_time": 5.0},
              {"start_time": 5.0, "end_time": 8.0}, {"start_time": 8.0, "end_time": 10.0}]
    m = ground_truth_memory(events, answer_event=3, top_k=3, fps=1.0)
    assert m.event_frames == [2, 3, 2] and m.timestamps == sorted(m.timestamps) and 2.5 < m.timestamps[0]
    assert sum(ground_truth_memory(events, 0, top_k=4, fps=10.0, max_frames=64).event_frames) <= 64


def test_student_input_has_target_frames_times_P_tokens(bundle):
    s = _student(bundle)
    P = 16  # (112 / 28) ** 2
    assert s.visual_tokens == [bundle.config.target_frames * P] * 2
    assert s.llm_grid_thw.tolist() == [[1, 8, 8]] * 2 and s.video_grid_thw[:, 0].tolist() == [9, 6]
    assert s.event_groups == [[3, 3, 3], [2, 4]]  # odd events padded: ceil(n / 2) groups each
    embeds = runner.visual_embeds(bundle, s)
    assert [tuple(e.shape) for e in embeds] == [(P, bundle.config.hidden_size)] * 2
    teacher = build_teacher_inputs(bundle, QUESTIONS, _clips(), [teacher_timestamps(8, 2, 16)] * 2)
    assert teacher.visual_tokens == [8 * P, 5 * P]
    two = dataclasses.replace(bundle, config=bundle.config.model_copy(update={"target_frames": 2}))
    s2 = _student(two)
    assert s2.visual_tokens == [2 * P] * 2 and s2.llm_grid_thw[:, 0].tolist() == [2, 2]
    assert [e.shape[0] for e in runner.visual_embeds(two, s2)] == [2 * P] * 2


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------


def test_identity_student_reproduces_teacher_logits(bundle):
    clips = _clips(seed=2)
    stamps = [teacher_timestamps(n / 2, 2, n) for n in (16, 10)]
    teacher = build_teacher_inputs(bundle, QUESTIONS, clips, stamps)
    # Same frames as the student's memory, cut into even-length events (no padding needed).
    student = build_student_inputs(bundle, QUESTIONS, clips, [Memory(stamps[0], [6, 4, 6]), Memory(stamps[1], [10])],
                                   compression="identity")
    assert torch.equal(teacher.input_ids, student.input_ids)
    with torch.no_grad():
        lt = runner.forward(bundle, teacher).logits
        ls = runner.forward(bundle, student).logits
    mask = teacher.attention_mask.bool()
    assert torch.allclose(lt[mask], ls[mask], rtol=0, atol=1e-6)
    # And the compressed student is a different input (a real test, not the same tensors twice).
    with torch.no_grad():
        lc = runner.forward(bundle, _student(bundle), logits_to_keep=1).logits
    assert not torch.allclose(lc[:, -1], lt[:, -1], atol=1e-4)


def test_gradients_reach_vision_tower_through_compression(bundle):
    s = _student(bundle)
    completions = [bundle.tokenizer("<think>red</think><answer>A</answer>")["input_ids"],
                   bundle.tokenizer("<answer>C</answer>")["input_ids"]]
    bundle.model.zero_grad(set_to_none=True)
    logp, mask = runner.completion_logprobs(bundle, s, completions)
    assert logp.shape == mask.shape == (2, len(completions[0])) and mask.sum() == sum(map(len, completions))
    assert torch.all(logp[mask] < 0) and torch.all(logp[~mask] == 0)
    (-logp.sum()).backward()
    visual = bundle.model.model.visual
    for name, p in [("patch_embed", visual.patch_embed.proj.weight), ("block0.qkv", visual.blocks[0].attn.qkv.weight),
                    ("merger", visual.merger.mlp[0].weight)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(torch.isfinite(p.grad).all() for p in bundle.model.parameters() if p.grad is not None)
    bundle.model.zero_grad(set_to_none=True)


def test_generate_on_both_paths(bundle):
    teacher = build_teacher_inputs(bundle, QUESTIONS, _clips(), [teacher_timestamps(8, 2, 16)] * 2)
    g = runner.generate(bundle, teacher, max_new_tokens=4, min_new_tokens=4)
    assert g.num_tokens == [4, 4] and len(g.texts) == 2 and all(isinstance(t, str) for t in g.texts)
    torch.manual_seed(0)
    s = runner.generate(bundle, _student(bundle), max_new_tokens=3, temperature=1.0, num_samples=2)
    assert len(s.token_ids) == 4 and all(1 <= n <= 3 for n in s.num_tokens)
    # Greedy generate's first token = argmax of the training forward's last logits.
    greedy = runner.generate(bundle, _student(bundle), max_new_tokens=1)
    with torch.no_grad():
        last = runner.forward(bundle, _student(bundle), logits_to_keep=1).logits[:, -1]
    assert [t[0] for t in greedy.token_ids] == last.argmax(-1).tolist()


def test_saved_model_gives_identical_logits(bundle, tmp_path):
    path = save_model(bundle, tmp_path / "models" / "tiny")
    assert json.loads((path / "marc_model.json").read_text())["model_config"]["hidden_size"] == 128
    loaded = load_model(path)
    assert loaded.config == bundle.config and loaded.geometry == bundle.geometry
    # A caller's config changes the run-time fields only; the architecture comes from the files.
    other = load_model(path, ModelConfig(target_frames=2, hidden_size=256))
    assert other.config.target_frames == 2 and other.config.hidden_size == 128
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()
    s = _student(bundle)
    with torch.no_grad():
        assert torch.equal(runner.forward(bundle, s).logits, runner.forward(loaded, s).logits)


def test_frames_from_a_generated_video(bundle, tmp_path):
    from stages.sample_data import generate

    generate(tmp_path, videos=1, seed=3, width=112, height=112, fps=10, test_fraction=0.0)
    row = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[0])
    question = json.loads((tmp_path / "questions.jsonl").read_text().splitlines()[-1])
    memory = ground_truth_memory(row["events"], question["answer_event"], top_k=3, fps=1.0)
    frames = load_frames(bundle, tmp_path / row["path"], memory.timestamps)
    assert frames.shape == (len(memory.timestamps), 112, 112, 3)
    s = build_student_inputs(bundle, [question], [frames], [memory])
    assert s.visual_tokens == [16] and s.event_groups[0] == [(n + 1) // 2 for n in memory.event_frames]
    duration = row["frame_count"] / row["fps"]
    stamps = teacher_timestamps(duration, row["fps"], 64)
    teacher = build_teacher_inputs(bundle, [question], [load_frames(bundle, tmp_path / row["path"], stamps)], [stamps])
    assert teacher.visual_tokens == [len(stamps) // 2 * 16]
