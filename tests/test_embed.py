"""The embedding space and the LanceDB event table (issue #4).

- the towers: MiniLM offline (384-d, unit length), the visual tower, and the CLIP/SigLIP path
  with tiny randomly initialised checkpoints built here;
- embed-train is deterministic for a seed and reuses its checkpoint on an unchanged rerun;
- stage embed is per-video incremental: an unchanged rerun leaves the table version alone, one
  changed video changes only its rows, a vanished video loses its rows;
- search: exact within one video, through the ANN index (with refine) across videos.

Recall on unseen data is checked end to end in test_retrieve.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_contracts import schemas
from infra.presets import load_preset
from stages import ingest, sample_data
from stages.common.workspace import Workspace
from stages.embed import stage as embed
from stages.embed import train
from stages.embed.towers import ClipTowers, TextTower, VisualTower, load_towers, minilm_path

torch.set_num_threads(1)  # 2 cores shared with other test runs


def _config(**embed_over):
    config = load_preset("cpu-tiny")
    return config.model_copy(update={"embed": config.embed.model_copy(update=embed_over)})


def events_from_truth(data_dir, videos: pa.Table, fingerprint: str = "seg-v1") -> pa.Table:
    """An events table built from events.jsonl (what segment finds on EventQA), without running segment."""
    paths = {v["video_id"] for v in videos.to_pylist()}
    rows = []
    for vid, row in train.load_ground_truth(data_dir / "events.jsonl").items():
        if vid not in paths:
            continue
        for e in row["events"]:
            rows.append(dict(event_key=f"{vid}#{e['index']}", video_id=vid, event_index=e["index"],
                             start_frame=e["start_frame"], end_frame=e["end_frame"], start_time=e["start_time"],
                             end_time=e["end_time"], frame_count=e["end_frame"] - e["start_frame"],
                             fps=float(row["fps"]), keyframes=[], fingerprint=f"{fingerprint}:{vid}"))
    return pa.Table.from_pylist(rows, schema=schemas.EVENTS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    data_dir = root / "data"
    sample_data.generate(data_dir, videos=5, seed=11, width=64, height=64, fps=8, test_fraction=0.4)
    ws = Workspace(root / "home")
    ingested = ingest.run(load_preset("cpu-tiny"), data_dir, ws)
    return data_dir, ws, ingested


@pytest.fixture(scope="module")
def text_tower():
    return TextTower()


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return VisualTower(frames=4, size=64).save(tmp_path_factory.mktemp("tower")).parent


def test_text_tower_is_minilm_offline(text_tower):
    assert (minilm_path() / "model.safetensors").is_file()
    v = text_tower.encode_text(["a red circle moving left on a blue background",
                                "a red circle moving right on a blue background",
                                "quarterly revenue grew by four percent"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert text_tower.encode_text([]).shape == (0, 384)


def test_visual_tower_round_trip(tmp_path):
    torch.manual_seed(0)
    tower = VisualTower(frames=4, size=64).eval()
    frames = np.random.default_rng(0).integers(0, 256, (3, 4, 64, 64, 3), dtype=np.uint8)
    v = tower.encode_events(frames)
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    tower.save(tmp_path)
    np.testing.assert_array_equal(VisualTower.load(tmp_path).encode_events(frames), v)
    with pytest.raises(ValueError, match="4 frames"):
        tower.encode_events(frames[:, :3])


def _tiny_checkpoint(kind: str, folder):
    """A randomly initialised CLIP or SigLIP, with MiniLM's tokenizer (vocab sized to match)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=64, bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,dim", [("clip", 24), ("siglip", 32)])
def test_clip_like_towers(tmp_path, kind, dim):
    towers = ClipTowers(_tiny_checkpoint(kind, tmp_path / kind))
    assert (towers.kind, towers.dim, towers.size) == (kind, dim, 32)
    t = towers.encode_text(["Which shape moves on the red background?", "a blue square"])
    v = towers.encode_events(np.random.default_rng(0).integers(0, 256, (2, 4, 48, 48, 3), dtype=np.uint8))
    assert t.shape == (2, dim) and v.shape == (2, dim)
    np.testing.assert_allclose(np.linalg.norm(np.vstack([t, v]), axis=1), 1.0, atol=1e-5)


def test_embed_stage_with_a_clip_checkpoint(tmp_path, data):
    data_dir, _, ingested = data
    folder = _tiny_checkpoint("clip", tmp_path / "clip")
    config = _config(clip_checkpoint=str(folder))
    assert isinstance(load_towers(config.embed, None), ClipTowers)
    assert train.run(config, data_dir / "events.jsonl", ingested.videos, ingested.questions,
                     Workspace(tmp_path / "home")).checkpoint == folder  # nothing to train
    events = events_from_truth(data_dir, ingested.videos)
    result = embed.run(config, events, ingested.videos, Workspace(tmp_path / "home"), None)
    table = embed.open_table(Workspace(tmp_path / "home"))
    assert result.counts["rows"] == events.num_rows
    assert table.schema.field("vector").type.list_size == 24  # the checkpoint's projection width


def test_embed_train_is_deterministic_and_reused(tmp_path, data):
    data_dir, _, ingested = data
    config = _config(train_steps=15)
    runs = [train.run(config, data_dir / "events.jsonl", ingested.videos, ingested.questions,
                      Workspace(tmp_path / f"home{i}")) for i in range(2)]
    hashes = [train.checkpoint_hash(r.checkpoint) for r in runs]
    assert runs[0].trained and hashes[0] == hashes[1]
    m = runs[0].metrics
    assert len(m["loss_curve"]) == 3 and m["train_seconds"] > 0 and "heldout_recall@1" in m and "train_recall@3" in m
    # Questions of the single-event families are extra positives; `after` questions are not.
    pairs = train.make_pairs(train.load_ground_truth(data_dir / "events.jsonl"), ingested.questions, "train",
                             list(config.embed.train_question_families))
    assert not any(t.startswith("Which background comes right after") for t in pairs.texts)
    assert any(t.startswith("Which way does") for t in pairs.texts)
    again = train.run(config, data_dir / "events.jsonl", ingested.videos, ingested.questions,
                      Workspace(tmp_path / "home0"))
    assert not again.trained and again.checkpoint == runs[0].checkpoint


def _rows(ws) -> dict[str, dict]:
    table = embed.open_table(ws)
    return {r["event_key"]: r for r in table.to_arrow().to_pylist()}


def test_embed_is_incremental_per_video(tmp_path, data, random_checkpoint, capsys):
    data_dir, _, ingested = data
    ws = Workspace(tmp_path / "home")
    config = _config()
    events = events_from_truth(data_dir, ingested.videos)
    first = embed.run(config, events, ingested.videos, ws, random_checkpoint, data_dir / "events.jsonl")
    assert "events/s" in capsys.readouterr().out and first.metrics["events_per_second"] > 0
    table = embed.open_table(ws)
    assert first.wrote and table.count_rows() == events.num_rows == first.counts["inserted"]
    rows = _rows(ws)
    assert all(r["caption"] and r["caption"].startswith("a ") for r in rows.values())  # from events.jsonl
    version = table.version

    # Unchanged rerun: nothing computed, nothing written.
    again = embed.run(config, events, ingested.videos, ws, random_checkpoint, data_dir / "events.jsonl")
    assert not again.wrote and again.counts["computed"] == 0 and embed.open_table(ws).version == version

    # One video re-segmented (new segment fingerprint, its last event gone): only its rows change,
    # in one new version.
    vids = sorted({e["video_id"] for e in events.to_pylist()})
    changed = vids[1]
    mine = [e for e in events.to_pylist() if e["video_id"] == changed]
    edited = [dict(e, fingerprint="seg-v2") for e in mine[:-1]]
    rest = [e for e in events.to_pylist() if e["video_id"] != changed]
    events2 = pa.Table.from_pylist(rest + edited, schema=schemas.EVENTS)
    third = embed.run(config, events2, ingested.videos, ws, random_checkpoint, data_dir / "events.jsonl")
    table = embed.open_table(ws)
    assert third.counts["computed"] == 1 and third.counts["reused"] == len(vids) - 1
    assert table.version == version + 1 and table.count_rows() == events.num_rows - 1
    assert (third.counts["updated"], third.counts["deleted"], third.counts["inserted"]) == (len(mine) - 1, 1, 0)
    after = _rows(ws)
    for key, row in rows.items():
        if row["video_id"] != changed:
            assert after[key]["fingerprint"] == row["fingerprint"]
            np.testing.assert_array_equal(after[key]["vector"], row["vector"])
        elif key != mine[-1]["event_key"]:
            assert after[key]["fingerprint"] != row["fingerprint"]
    assert mine[-1]["event_key"] not in after

    # A vanished video loses its rows; the others stay as they were.
    gone = vids[0]
    events3 = pa.Table.from_pylist([e for e in events2.to_pylist() if e["video_id"] != gone], schema=schemas.EVENTS)
    fourth = embed.run(config, events3, ingested.videos, ws, random_checkpoint, data_dir / "events.jsonl")
    assert fourth.counts["removed"] == 1 and fourth.counts["computed"] == 0
    assert not any(r["video_id"] == gone for r in _rows(ws).values())
    assert embed.open_table(ws).count_rows() == events3.num_rows

    # A new tower checkpoint re-embeds everything.
    torch.manual_seed(1)
    other = VisualTower(frames=4, size=64).save(tmp_path / "other").parent
    fifth = embed.run(config, events3, ingested.videos, ws, other)
    assert fifth.counts["computed"] == len(vids) - 1


def test_search_is_exact_per_video_and_indexed_across(tmp_path):
    """Above index_min_rows the stage builds an ANN index; per-video queries stay exact."""
    config = _config(index_min_rows=256, nprobes=4)
    rng = np.random.default_rng(0)
    n = 600
    vectors = rng.normal(size=(n, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [dict(event_key=f"v{i // 5:03d}#{i % 5}", video_id=f"v{i // 5:03d}", event_index=i % 5,
                 start_time=float(i % 5), end_time=float(i % 5 + 1), vector=vectors[i], caption=None, fingerprint="x")
            for i in range(n)]
    ws = Workspace(tmp_path / "home")
    todo = embed.incremental.Plan(fingerprints={r["video_id"]: "x" for r in rows},
                                  compute=sorted({r["video_id"] for r in rows}))
    result = embed.commit(config, todo, [embed.VideoVectors("all", "x", rows)], ws)
    table = embed.open_table(ws)
    indexed = {tuple(i.columns) for i in table.list_indices()}
    assert result.wrote and ("vector",) in indexed and ("video_id",) in indexed
    for i in range(0, n, 37):
        q = vectors[i] + rng.normal(scale=0.02, size=384).astype(np.float32)
        q /= np.linalg.norm(q)
        vid = f"v{i // 5:03d}"
        hits = embed.search_events(table, q, 3, config, video_id=vid)
        base = (i // 5) * 5
        exact = [f"{vid}#{j}" for j in np.argsort(-(vectors[base:base + 5] @ q))[:3]]
        assert [h["event_key"] for h in hits] == exact
        assert hits[0]["score"] == pytest.approx(float(vectors[i] @ q), abs=1e-4)
        top = embed.search_events(table, q, 5, config)  # ANN + refine across all videos
        assert top[0]["event_key"] == f"{vid}#{i % 5}"

