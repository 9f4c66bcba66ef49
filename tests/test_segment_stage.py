"""Stage segment as a whole: EventQA cuts, per-video incremental reruns, crash safety, bad content."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio_ffmpeg
import pytest

from data_contracts import schemas
from infra.presets import load_preset
from stages import ingest, sample_data
from stages.common.arrow_io import read_table
from stages.common.workspace import Workspace
from stages.segment import stage as segment

CONFIG = load_preset("cpu-tiny")


def _ingest_and_segment(data: Path, workspace: Workspace, force: bool = False):
    videos = ingest.run(CONFIG, data, workspace).videos
    return segment.run(CONFIG, videos, workspace, force=force)


@pytest.fixture()
def eventqa(tmp_path):
    data = tmp_path / "data"
    sample_data.generate(data, videos=6, seed=21)
    return data, Workspace(tmp_path / "home")


def test_every_generated_cut_is_found_and_no_other(tmp_path):
    data = tmp_path / "data"
    sample_data.generate(data, videos=12, seed=5)
    workspace = Workspace(tmp_path / "home")
    result = _ingest_and_segment(data, workspace)
    events = read_table(workspace.table("events"), schemas.EVENTS).to_pylist()
    truth = [json.loads(line) for line in (data / "events.jsonl").read_text().splitlines()]
    assert result.counts["events"] == sum(len(v["events"]) for v in truth)
    for video in truth:
        found = [(e["start_frame"], e["end_frame"]) for e in events if e["video_id"] == video["path"]]
        assert found == [(e["start_frame"], e["end_frame"]) for e in video["events"]], video["path"]
        times = [t for e in events if e["video_id"] == video["path"] for t in (e["start_time"], e["end_time"])]
        assert times == pytest.approx([t for e in video["events"] for t in (e["start_time"], e["end_time"])], abs=1e-6)
    assert all(len(e["keyframes"]) == CONFIG.segment.keyframes_per_event and Path(e["keyframes"][0]).is_file()
               for e in events)


def test_unchanged_rerun_is_a_noop_and_changes_touch_only_their_videos(eventqa, tmp_path):
    data, workspace = eventqa
    first = _ingest_and_segment(data, workspace)
    assert first.counts["computed"] == 6 and first.wrote
    events_path = workspace.table("events")
    before = events_path.read_bytes()
    mtime = events_path.stat().st_mtime_ns

    again = _ingest_and_segment(data, workspace)
    assert again.counts == {**first.counts, "computed": 0, "reused": 6}
    assert not again.wrote and events_path.read_bytes() == before and events_path.stat().st_mtime_ns == mtime

    # Replace one video (with another seed's), add one, delete one.
    other = tmp_path / "other"
    sample_data.generate(other, videos=2, seed=99)
    videos = sorted((data / "videos").glob("*.mp4"))
    replaced, deleted = videos[1], videos[4]
    shutil.copyfile(other / "videos" / "eq99_0000.mp4", replaced)
    shutil.copyfile(other / "videos" / "eq99_0001.mp4", data / "videos" / "added.mp4")
    deleted.unlink()
    old = {e["event_key"]: e for e in read_table(events_path, schemas.EVENTS).to_pylist()}

    rerun = _ingest_and_segment(data, workspace)
    assert (rerun.counts["computed"], rerun.counts["reused"], rerun.counts["removed"]) == (2, 4, 1)
    new = read_table(events_path, schemas.EVENTS).to_pylist()
    keys = [e["event_key"] for e in new]
    assert len(keys) == len(set(keys)), "duplicated rows"
    rel = lambda p: p.relative_to(data).as_posix()
    changed = {rel(replaced), "videos/added.mp4", rel(deleted)}
    for key, row in old.items():  # untouched videos keep identical rows
        if row["video_id"] not in changed:
            assert next(e for e in new if e["event_key"] == key) == row
    assert not any(e["video_id"] == rel(deleted) for e in new)
    assert any(e["video_id"] == "videos/added.mp4" for e in new)
    assert {e["fingerprint"] for e in new if e["video_id"] == rel(replaced)} != {old[f"{rel(replaced)}#0"]["fingerprint"]}
    # Keyframes of the deleted video and of the replaced video's old version are gone.
    assert not Path(old[f"{rel(deleted)}#0"]["keyframes"][0]).exists()
    assert not Path(old[f"{rel(replaced)}#0"]["keyframes"][0]).exists()

    forced = _ingest_and_segment(data, workspace, force=True)
    assert forced.counts["computed"] == 6 and forced.counts["reused"] == 0


def test_killed_mid_write_leaves_the_old_table_and_the_rerun_completes(eventqa):
    data, workspace = eventqa
    _ingest_and_segment(data, workspace)
    before = workspace.table("events").read_bytes()
    (data / "videos" / "eq21_0002.mp4").unlink()  # something to recompute
    # A real process, killed (SIGKILL) after the new file is fully written but before the rename.
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from infra.presets import load_preset
        from stages import ingest
        from stages.common.workspace import Workspace
        from stages.segment import stage as segment
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith("events.arrow"):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        os.replace = replace
        config = load_preset("cpu-tiny")
        workspace = Workspace(Path({str(workspace.home)!r}))
        segment.run(config, ingest.run(config, Path({str(data)!r}), workspace).videos, workspace)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert workspace.table("events").read_bytes() == before  # old version, whole and readable
    read_table(workspace.table("events"), schemas.EVENTS)
    assert list(workspace.tables.glob(".events.arrow.*.tmp")), "the killed writer's temp file should be there"

    rerun = _ingest_and_segment(data, workspace)
    assert rerun.counts["removed"] == 1 and rerun.wrote
    assert not list(workspace.tables.glob(".events.arrow.*.tmp"))
    keys = read_table(workspace.table("events"), schemas.EVENTS).column("event_key").to_pylist()
    assert len(keys) == len(set(keys)) and not any(k.startswith("videos/eq21_0002.mp4#") for k in keys)


def test_truncated_video_keeps_what_decoded_and_warns(eventqa):
    data, workspace = eventqa
    path = data / "videos" / "eq21_0001.mp4"
    # Move the index (moov) to the front, as streaming MP4s have it, then cut the file short:
    # the header survives, the tail of the frames does not.
    faststart = path.with_suffix(".tmp.mp4")
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-c", "copy",
                    "-movflags", "+faststart", str(faststart)], check=True)
    blob = faststart.read_bytes()
    faststart.unlink()
    path.write_bytes(blob[: int(len(blob) * 0.6)])
    videos = ingest.run(CONFIG, data, workspace).videos
    if "videos/eq21_0001.mp4" not in videos.column("video_id").to_pylist():
        pytest.fail("a truncated MP4 whose header survives must still ingest")
    result = segment.run(CONFIG, videos, workspace)
    rejects = read_table(workspace.rejects("segment"), schemas.REJECTS).to_pylist()
    warning = [r for r in rejects if r["item_id"] == "videos/eq21_0001.mp4"]
    assert warning and warning[0]["severity"] == "warning", rejects
    events = [e for e in read_table(workspace.table("events"), schemas.EVENTS).to_pylist()
              if e["video_id"] == "videos/eq21_0001.mp4"]
    assert events and events[0]["start_frame"] == 0
    assert result.counts["warnings"] == 1 and result.counts["videos"] == 6
