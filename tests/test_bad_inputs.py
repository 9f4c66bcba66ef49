"""The bad input catalogue (issue #8, item 2): one table, `CATALOGUE`, of bad inputs for the stages
that exist (ingest, segment), each with its expected outcome.

    accepted                 the item goes through; `check` says what is verified about it
    accepted with a warning  it goes through, and the stage adds a warning row to its rejects
    rejected                 `stage` drops it with an error row whose reason contains `reason`

All rows that can share a data folder are put into ONE folder next to three good EventQA videos
and their questions; ingest and segment run once over it as plain stage functions (no server).
Around the table: every good item of that folder still arrives, a rerun is a no-op, rejected
media are quarantined, and no input file is modified (nor anything outside the folder read).
Rows marked `own_folder` need a data folder of their own (an empty questions file; a video that
vanishes between ingest and segment); each gets one good EventQA video beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import av
import cv2
import imageio_ffmpeg
import pytest

from data_contracts import schemas
from infra.presets import load_preset
from stages import ingest, sample_data
from stages.common.arrow_io import read_table
from stages.common.workspace import Workspace
from stages.segment import stage as segment

from conftest import REAL_VIDEOS

CONFIG = load_preset("cpu-tiny")
ACCEPTED, WARNED, REJECTED = "accepted", "accepted with a warning", "rejected"
GOOD_SEED = 7


# ----------------------------------------------------------------------------------------------
# Building a data folder


def ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error", *args], check=True)


def _x264(*lavfi: str, out: Path, extra: tuple[str, ...] = ()) -> None:
    inputs = [a for spec in lavfi for a in ("-f", "lavfi", "-i", spec)]
    ffmpeg(*inputs, *extra, "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(out))


@dataclass
class Folder:
    """A data folder under construction: files, question lines, and which items belong to which row."""

    data: Path
    outside: Path  # a sibling folder: the target of links that leave the data folder
    template: Path  # a generated EventQA folder to copy good videos from
    lines: list[bytes] = field(default_factory=list)
    items: dict[str, set[str]] = field(default_factory=dict)  # case id -> item ids its rows carry
    rows: dict[str, set[int]] = field(default_factory=dict)  # case id -> its question lines (1-based)
    media: dict[str, set[str]] = field(default_factory=dict)  # case id -> video ids it put in the folder
    case: str = ""

    def path(self, rel: str) -> Path:
        target = self.data / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def add_media(self, rel: str) -> Path:
        """Register `rel` as this row's media file; returns where to write it."""
        self.items.setdefault(self.case, set()).add(rel)
        self.media.setdefault(self.case, set()).add(rel)
        return self.path(rel)

    def good_video(self) -> Path:
        return self.template / "videos" / f"eq{GOOD_SEED}_0000.mp4"

    def line(self, raw: bytes, item: str | None = None) -> int:
        self.lines.append(raw)
        row = len(self.lines)
        self.rows.setdefault(self.case, set()).add(row)
        if item is not None:
            self.items.setdefault(self.case, set()).add(item)
        return row

    def question(self, path: str, qid: str | None = None, **over) -> int:
        """A well-formed multiple-choice question about `path`, with fields replaced by `over`."""
        qid = qid or f"q-{self.case}"
        record = {"problem_id": qid, "problem": "Which shape moves on the red background?",
                  "options": ["A. circle", "B. square", "C. triangle", "D. diamond"],
                  "solution": "<answer>B</answer>", "problem_type": "multiple choice", "data_type": "video",
                  "path": path, "split": "train"}
        record.update(over)
        return self.line(json.dumps(record, ensure_ascii=False).encode(), item=qid)


# ----------------------------------------------------------------------------------------------
# The rows' inputs (each writes into the folder and registers what belongs to it)


def truncated_moov_at_end(f: Folder) -> None:
    blob = f.good_video().read_bytes()  # the index (moov) is written last: cut it off
    f.add_media("bad/truncated_tail.mp4").write_bytes(blob[: int(len(blob) * 0.6)])
    f.question("bad/truncated_tail.mp4")


def _faststart_packets(f: Folder) -> tuple[bytes, list[tuple[int, int]]]:
    """A good video rewritten with its index first (streaming layout), and (offset, size) of its packets."""
    fast = f.data.parent / "faststart.mp4"
    ffmpeg("-i", str(f.good_video()), "-c", "copy", "-movflags", "+faststart", str(fast))
    with av.open(str(fast)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    blob = fast.read_bytes()
    fast.unlink()
    return blob, sorted(packets)


def truncated_on_packet(f: Folder) -> None:
    """Cut right after the middle packet: every frame left is whole, the decoder has nothing to say."""
    blob, packets = _faststart_packets(f)
    pos, size = packets[len(packets) // 2]
    f.add_media("media/truncated_on_packet.mp4").write_bytes(blob[: pos + size])
    f.question("media/truncated_on_packet.mp4")


def truncated_mid_packet(f: Folder) -> None:
    """Cut inside the middle packet: the decoder reports a partial file."""
    blob, packets = _faststart_packets(f)
    pos, size = packets[len(packets) // 2]
    f.add_media("media/truncated_mid_packet.mp4").write_bytes(blob[: pos + size // 2])
    f.question("media/truncated_mid_packet.mp4")


def zero_bytes(f: Folder) -> None:
    f.add_media("bad/empty.mp4").write_bytes(b"")
    f.question("bad/empty.mp4")


def audio_only(f: Folder) -> None:
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(f.add_media("bad/audio.mp4")))
    f.question("bad/audio.mp4")


def text_named_mp4(f: Folder) -> None:
    f.add_media("bad/notes.mp4").write_text("this is a text file with a video suffix\n")


def zero_frames(f: Folder) -> None:
    _x264("color=c=red:s=64x64:r=10", out=f.add_media("bad/zero_frames.mp4"), extra=("-frames:v", "0"))


def undecodable_frames(f: Folder) -> None:
    """A valid container whose frame data (the mdat payload) is all zeros."""
    blob = bytearray(f.good_video().read_bytes())
    at = blob.find(b"mdat")
    size = int.from_bytes(blob[at - 4:at], "big")
    blob[at + 4:at - 4 + size] = bytes(size - 8)
    f.add_media("bad/zeroed_frames.mp4").write_bytes(bytes(blob))
    f.question("bad/zeroed_frames.mp4")


def one_frame(f: Folder) -> None:
    _x264("color=c=green:s=64x64:r=5", out=f.add_media("media/one_frame.mp4"), extra=("-frames:v", "1"))
    f.question("media/one_frame.mp4")


def ten_minutes(f: Folder) -> None:
    """600 s at 64x64, 5 fps: blue for 300 s, a hard cut, red for 300 s (3000 frames, ~45 kB)."""
    _x264("color=c=blue:s=64x64:r=5:d=300", "color=c=red:s=64x64:r=5:d=300",
          out=f.add_media("media/ten_minutes.mp4"), extra=("-filter_complex", "[0][1]concat=n=2:v=1"))
    f.question("media/ten_minutes.mp4")


def eight_k(f: Folder) -> None:
    _x264("color=c=white:s=7680x4320:r=2", out=f.add_media("media/eight_k.mp4"), extra=("-frames:v", "2"))
    f.question("media/eight_k.mp4")


def real_copy(name: str, rel: str) -> Callable[[Folder], None]:
    def make(f: Folder) -> None:
        shutil.copyfile(REAL_VIDEOS / "pyscenedetect" / name, f.add_media(rel))
        f.question(rel)
    make.__name__ = f"copy_{name}"
    return make


def unicode_name(f: Folder) -> None:
    rel = "media/clip ünïcødé 视频 #1.mp4"
    shutil.copyfile(f.good_video(), f.add_media(rel))
    f.question(rel)


def long_name(f: Folder) -> None:
    rel = "media/" + "L" * 240 + ".mp4"  # 244 bytes: legal (255 is the limit), long for derived names
    shutil.copyfile(f.good_video(), f.add_media(rel))
    f.question(rel)


def non_utf8_question(f: Folder) -> None:
    f.line('{"problem_id": "q-latin1", "problem": "caf'.encode() + b"\xe9"
           + b' ?", "options": ["A. a", "B. b"], "solution": "<answer>A</answer>", "path": "videos/eq7_0000.mp4"}',
           item="q-latin1")


def lone_surrogate(f: Folder) -> None:
    """Valid JSON, invalid text: Python's json turns the escape \\ud800 into an unpaired surrogate."""
    f.line(b'{"problem_id": "q-surrogate", "problem": "half an emoji \\ud83d?", "options": ["A. a", "B. b"], '
           b'"solution": "<answer>A</answer>", "path": "videos/eq7_0000.mp4"}', item="q-surrogate")


def non_utf8_file_name(f: Folder) -> None:
    rel = os.fsdecode(b"media/caf\xe9.mp4")  # a Latin-1 name: not decodable as UTF-8
    shutil.copyfile(f.good_video(), f.add_media(rel))
    f.items[f.case].add(rel.encode("utf-8", "backslashreplace").decode())  # the id its reject carries


def single_option(f: Folder) -> None:
    f.question("videos/eq7_0000.mp4", options=["A. circle"], solution="<answer>A</answer>")


def no_options(f: Folder) -> None:
    f.question("videos/eq7_0000.mp4", options=[], solution="<answer>A</answer>")


def letters_skip(f: Folder) -> None:
    f.question("videos/eq7_0000.mp4", options=["A. circle", "B. square", "D. diamond"])


def letter_not_an_option(f: Folder) -> None:
    f.question("videos/eq7_0000.mp4", solution="<answer>E</answer>")


def dotdot_path(f: Folder) -> None:
    shutil.copyfile(f.good_video(), f.outside / "dotdot.mp4")
    f.question("videos/../../outside/dotdot.mp4")


def absolute_path(f: Folder) -> None:
    shutil.copyfile(f.good_video(), f.outside / "absolute.mp4")
    f.question(str(f.outside / "absolute.mp4"))


def symlink_outside(f: Folder) -> None:
    target = f.outside / "linked.mp4"
    shutil.copyfile(f.good_video(), target)
    os.symlink(target, f.add_media("bad/escape.mp4"))
    f.question("bad/escape.mp4")


def symlink_loop(f: Folder) -> None:
    os.symlink("loop.mp4", f.add_media("bad/loop.mp4"))
    f.question("bad/loop.mp4")


def broken_symlink(f: Folder) -> None:
    os.symlink("no-such-file.mp4", f.add_media("bad/dangling.mp4"))


def folder_named_mp4(f: Folder) -> None:
    f.add_media("bad/folder.mp4").mkdir()


def named_pipe(f: Folder) -> None:
    os.mkfifo(f.add_media("bad/pipe.mp4"))  # opening it to read would block forever
    f.question("bad/pipe.mp4")


def duplicate_id(f: Folder) -> None:
    first = json.loads((f.template / "questions.jsonl").read_text().splitlines()[0])
    f.line(json.dumps(first).encode())  # the id of a good question: the first occurrence wins


def missing_video(f: Folder) -> None:
    f.question("videos/no-such-video.mp4")


def malformed_json(f: Folder) -> None:
    f.line(b'{"problem_id": "q-broken", "problem": ')


def id_with_path_characters(f: Folder) -> None:
    f.question("videos/eq7_0000.mp4", qid="../../etc/passwd")


def empty_questions_file(f: Folder) -> None:
    (f.data / "questions.jsonl").write_bytes(b"")  # replaces the good questions: nothing to ask


def vanishes_after_ingest(f: Folder) -> None:
    shutil.copyfile(f.good_video(), f.add_media("media/vanishing.mp4"))


# ----------------------------------------------------------------------------------------------
# The rows' checks (accepted rows): `run` holds the tables, `rel` the row's video id


@dataclass
class Run:
    folder: Folder
    workspace: Workspace
    ingest: ingest.IngestResult
    segment: segment.SegmentResult
    videos: dict[str, dict]
    questions: dict[str, dict]
    events: dict[str, list[dict]]
    rejects: list[dict]


def _only(items: set[str]) -> str:
    (item,) = items
    return item


def check_one_frame(run: Run, rel: str) -> None:
    assert run.videos[rel]["frame_count"] == 1
    (event,) = run.events[rel]
    assert (event["start_frame"], event["end_frame"], event["frame_count"]) == (0, 1, 1)
    assert len(event["keyframes"]) == 1 and Path(event["keyframes"][0]).is_file()


def check_ten_minutes(run: Run, rel: str) -> None:
    video, events = run.videos[rel], run.events[rel]
    assert video["frame_count"] == 3000 and video["duration"] == pytest.approx(600.0)
    assert 1500 in [e["start_frame"] for e in events], "the hard cut at 300 s"
    longest = CONFIG.segment.max_event_seconds
    assert all(e["end_time"] - e["start_time"] <= longest + 1e-6 for e in events)
    # Two scenes of 300 s, each split into windows of at most 30 s: 10 + 10.
    assert len(events) == 20, f"{len(events)} events; shortest {min(e['frame_count'] for e in events)} frames"


def check_eight_k(run: Run, rel: str) -> None:
    assert (run.videos[rel]["width"], run.videos[rel]["height"]) == (7680, 4320)
    (event,) = run.events[rel]
    assert event["frame_count"] == 2 and event["keyframes"]
    for keyframe in event["keyframes"]:
        reduced = cv2.imread(keyframe, cv2.IMREAD_REDUCED_GRAYSCALE_8)  # 1/8 scale: cheap to read
        assert reduced.shape == (4320 // 8, 7680 // 8)


def check_rotated(run: Run, rel: str) -> None:
    video = run.videos[rel]
    assert abs(video["rotation"]) == 90 and (video["width"], video["height"]) == (1280, 544)  # coded size
    events = run.events[rel]
    assert len(events) >= 2 and events[-1]["end_frame"] == video["frame_count"] == 240
    # Keyframes are stored as displayed: upright, i.e. portrait.
    assert cv2.imread(events[0]["keyframes"][0]).shape[:2] == (1280, 544)


def check_vfr(run: Run, rel: str) -> None:
    video, events = run.videos[rel], run.events[rel]
    assert video["variable_frame_rate"] is True
    # Every decoded frame once: no frame padded or dropped to reach a constant rate.
    assert sum(e["frame_count"] for e in events) == video["frame_count"] == 160
    times = [t for e in events for t in (e["start_time"], e["end_time"])]
    assert times == sorted(times)
    assert events[-1]["end_time"] == pytest.approx(video["start_time"] + video["duration"], abs=0.05)


def check_delayed_start(run: Run, rel: str) -> None:
    video, events = run.videos[rel], run.events[rel]
    assert video["start_time"] == pytest.approx(1.075)
    assert events[0]["start_time"] == pytest.approx(1.075)  # the container's clock, not shifted to 0


def check_truncated(run: Run, rel: str) -> None:
    """What is there is kept (events from frame 0 on), what is not is reported by ingest."""
    events = run.events[rel]
    assert events and events[0]["start_frame"] == 0
    assert 0 < events[-1]["end_frame"] <= run.videos[rel]["frame_count"] < 152 // 2 + 2
    assert any(r["stage"] == "ingest" and r["severity"] == "warning" and "the container lists 152 frames" in r["reason"]
               for r in run.rejects if r["item_id"] == rel)


def check_keyframes_written(run: Run, rel: str) -> None:
    events = run.events[rel]
    assert len(events) == 6  # the EventQA video it copies
    missing = [e["event_index"] for e in events if len(e["keyframes"]) != CONFIG.segment.keyframes_per_event]
    assert not missing, f"events without their keyframes: {missing}"
    assert all(Path(k).is_file() for e in events for k in e["keyframes"])


def check_good_copy(run: Run, rel: str) -> None:
    assert len(run.events[rel]) == 6 and all(Path(k).is_file() for e in run.events[rel] for k in e["keyframes"])


def check_first_duplicate_kept(run: Run, rel: str | None) -> None:
    first = json.loads((run.folder.template / "questions.jsonl").read_text().splitlines()[0])
    kept = run.questions[first["problem_id"]]
    assert kept["source_row"] == 1  # the first occurrence, not the duplicate


# ----------------------------------------------------------------------------------------------
# THE CATALOGUE


@dataclass(frozen=True)
class Case:
    id: str
    bad_input: str  # what it is, in words
    make: Callable[[Folder], None]
    outcome: str  # ACCEPTED | WARNED | REJECTED
    stage: str | None = None  # the stage that rejects it (or warns)
    reason: str | None = None  # a substring of the reason in the rejects table
    check: Callable[[Run, str | None], None] | None = None  # what is verified about an accepted item
    own_folder: bool = False
    after_ingest: Callable[[Folder], None] | None = None
    xfail: str | None = None  # a known bug outside this test's reach (strict: fixing it turns this red)


CATALOGUE: list[Case] = [
    # --- media files ------------------------------------------------------------------------
    Case("truncated-mp4", "MP4 cut at 60% with its index (moov) at the end", truncated_moov_at_end,
         REJECTED, "ingest", "not a readable media container"),
    Case("truncated-mp4-on-packet", "MP4 with its index first, cut after the middle frame's packet",
         truncated_on_packet, WARNED, "ingest", "truncated: the container lists", check_truncated),
    Case("truncated-mp4-mid-packet", "MP4 with its index first, cut inside the middle frame's packet",
         truncated_mid_packet, WARNED, "segment", "decoding stopped at frame", check_truncated),
    Case("zero-byte-file", "a 0-byte .mp4", zero_bytes, REJECTED, "ingest", "empty file (0 bytes)"),
    Case("audio-only", "an AAC-only .mp4", audio_only, REJECTED, "ingest", "no video stream (streams: audio)"),
    Case("text-as-mp4", "a text file named .mp4", text_named_mp4, REJECTED, "ingest", "not a readable media container"),
    Case("zero-frames", "an H.264 .mp4 with 0 frames", zero_frames, REJECTED, "ingest", "no video stream"),
    Case("undecodable-frames", "a valid container whose frame data is zeros", undecodable_frames,
         REJECTED, "ingest", "no decodable frames"),
    Case("one-frame", "a video of 1 frame", one_frame, ACCEPTED, check=check_one_frame),
    Case("ten-minutes", "a 10-minute video (64x64, 5 fps, one cut at 300 s)", ten_minutes, ACCEPTED,
         check=check_ten_minutes),
    Case("8k", "an 8K frame size (7680x4320, 2 frames)", eight_k, ACCEPTED, check=check_eight_k),
    Case("rotated", "a rotated video (display matrix -90 deg, real: issue-134-rotate.mp4)",
         real_copy("issue-134-rotate.mp4", "media/rotated.mp4"), ACCEPTED, check=check_rotated),
    Case("variable-frame-rate", "variable frame rate (real: goldeneye-vfr-drop3.mp4)",
         real_copy("goldeneye-vfr-drop3.mp4", "media/vfr.mp4"), ACCEPTED, check=check_vfr),
    Case("delayed-start", "first timestamp at 1.075 s (real: delayed_start.mp4)",
         real_copy("delayed_start.mp4", "media/delayed_start.mp4"), ACCEPTED, check=check_delayed_start),
    Case("unicode-name", "a file name with spaces, '#' and non-ASCII letters", unicode_name, ACCEPTED,
         check=check_good_copy),
    Case("long-name", "a 244-byte file name (legal, near NAME_MAX)", long_name, ACCEPTED,
         check=check_keyframes_written),
    # --- the file system --------------------------------------------------------------------
    Case("symlink-outside", "a symlink to a video outside the data folder", symlink_outside,
         REJECTED, "ingest", "outside the data folder"),
    Case("symlink-loop", "a symlink that points at itself", symlink_loop, REJECTED, "ingest", "symbolic link loop"),
    Case("broken-symlink", "a symlink to a missing file", broken_symlink, REJECTED, "ingest", "broken symbolic link"),
    Case("folder-named-mp4", "a folder named clip.mp4", folder_named_mp4, REJECTED, "ingest", "is a folder"),
    Case("named-pipe", "a named pipe (FIFO) named .mp4", named_pipe, REJECTED, "ingest", "not a regular file"),
    # --- questions --------------------------------------------------------------------------
    Case("non-utf8-text", "question text in Latin-1 (byte 0xE9)", non_utf8_question,
         REJECTED, "ingest", "is not valid UTF-8"),
    Case("lone-surrogate", "question text with the JSON escape \\ud83d (half a surrogate pair)", lone_surrogate,
         REJECTED, "ingest", "not valid Unicode"),
    Case("non-utf8-file-name", "a video file whose name is Latin-1 bytes (caf\\xe9.mp4)", non_utf8_file_name,
         REJECTED, "ingest", "the file name is not valid UTF-8"),
    Case("single-option", "multiple choice with 1 option", single_option, REJECTED, "ingest", "needs >= 2 options"),
    Case("no-options", "multiple choice with an empty option list", no_options, REJECTED, "ingest", "needs >= 2 options"),
    Case("option-letters-skip", "3 options lettered A, B, D", letters_skip, REJECTED, "ingest",
         "option letters must run A, B, C"),
    Case("answer-not-an-option", "solution <answer>E</answer> with options A-D", letter_not_an_option,
         REJECTED, "ingest", "answer 'E' is not one of the option letters"),
    Case("dotdot-path", "path videos/../../outside/x.mp4", dotdot_path, REJECTED, "ingest", "leaves the data folder"),
    Case("absolute-path", "an absolute path to a real video outside", absolute_path, REJECTED, "ingest", "is absolute"),
    Case("missing-video", "a question about a video that is not there", missing_video, REJECTED, "ingest", "not found"),
    Case("duplicate-id", "a second question with a good question's problem_id", duplicate_id,
         REJECTED, "ingest", "duplicate problem_id", check=check_first_duplicate_kept),
    Case("malformed-json", "a JSON line cut in the middle", malformed_json, REJECTED, "ingest", "is not valid JSON"),
    Case("id-with-path", "problem_id '../../etc/passwd'", id_with_path_characters, REJECTED, "ingest",
         "contains path characters"),
    Case("empty-questions-file", "an empty questions.jsonl (0 bytes)", empty_questions_file,
         REJECTED, "ingest", "holds no questions", own_folder=True),
    Case("vanished-before-segment", "a video deleted after ingest, before segment", vanishes_after_ingest,
         REJECTED, "segment", "nothing decodable", own_folder=True,
         after_ingest=lambda f: (f.data / "media" / "vanishing.mp4").unlink()),
]

REQUIRED = {  # issue #8's list, each mapped to its row(s) above
    "truncated MP4": "truncated-mp4", "zero-byte file": "zero-byte-file", "audio-only file": "audio-only",
    "a 1-frame video": "one-frame", "a 10-minute video": "ten-minutes", "an 8K-resolution frame size": "8k",
    "a rotated video": "rotated", "variable frame rate": "variable-frame-rate",
    "non-UTF-8 question text": "non-utf8-text", "an option list of the wrong length": "single-option",
    "a solution letter not among the options": "answer-not-an-option", "a path with ..": "dotdot-path",
    "a symlink pointing outside the data folder": "symlink-outside", "duplicate problem ids": "duplicate-id",
    "an empty questions file": "empty-questions-file",
}


# ----------------------------------------------------------------------------------------------
# Running the stages


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under `roots` (links not followed): file digests, link targets, kinds."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_fifo():
                out[str(path)] = ("fifo",)
            elif path.is_dir():
                out[str(path)] = ("dir",)
            else:
                out[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def _new_folder(root: Path, template: Path) -> Folder:
    data, outside = root / "data", root / "outside"
    (data / "videos").mkdir(parents=True)
    outside.mkdir()
    return Folder(data=data, outside=outside, template=template)


def _add_good(folder: Folder, videos: int) -> None:
    for i in range(videos):
        name = f"eq{GOOD_SEED}_{i:04d}.mp4"
        shutil.copyfile(folder.template / "videos" / name, folder.data / "videos" / name)
    keep = {f"videos/eq{GOOD_SEED}_{i:04d}.mp4" for i in range(videos)}
    lines = [l for l in (folder.template / "questions.jsonl").read_bytes().splitlines() if json.loads(l)["path"] in keep]
    folder.case = ""
    for line in lines:
        folder.line(line)


def _write_questions(folder: Folder) -> None:
    target = folder.data / "questions.jsonl"
    if not target.exists():  # an own-folder row may have written its own
        target.write_bytes(b"\n".join(folder.lines) + b"\n")


def _run(folder: Folder, home: Path, after_ingest: Callable[[Folder], None] | None = None) -> Run:
    workspace = Workspace(home)
    ingested = ingest.run(CONFIG, folder.data, workspace)
    if after_ingest:
        after_ingest(folder)
    segmented = segment.run(CONFIG, ingested.videos, workspace)
    videos = read_table(workspace.table("videos"), schemas.VIDEOS).to_pylist()
    questions = read_table(workspace.table("questions"), schemas.QUESTIONS).to_pylist()
    events = read_table(workspace.table("events"), schemas.EVENTS).to_pylist()
    rejects = [r for stage in ("ingest", "segment")
               for r in read_table(workspace.rejects(stage), schemas.REJECTS).to_pylist()]
    by_video: dict[str, list[dict]] = {}
    for event in sorted(events, key=lambda e: (e["video_id"], e["event_index"])):
        by_video.setdefault(event["video_id"], []).append(event)
    return Run(folder, workspace, ingested, segmented, {v["video_id"]: v for v in videos},
               {q["question_id"]: q for q in questions}, by_video, rejects)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("template")
    sample_data.generate(out, videos=3, seed=GOOD_SEED, width=64, height=64, fps=8)
    return out


@pytest.fixture(scope="module")
def shared(tmp_path_factory, template):
    """One folder: 3 good EventQA videos + every shared row; ingest + segment once."""
    root = tmp_path_factory.mktemp("catalogue")
    folder = _new_folder(root, template)
    _add_good(folder, videos=3)
    for case in CATALOGUE:
        if not case.own_folder:
            folder.case = case.id
            case.make(folder)
    _write_questions(folder)
    before = _snapshot(folder.data, folder.outside)
    run = _run(folder, root / "home")
    return run, before


def _rejects_of(run: Run, case: Case, own: bool) -> list[dict]:
    if own:  # a folder of its own: every reject is this row's
        return run.rejects
    items, rows = run.folder.items.get(case.id, set()), run.folder.rows.get(case.id, set())
    return [r for r in run.rejects
            if r["item_id"] in items or (r["item_kind"] == "question" and r["source_row"] in rows
                                         and r["source_file"].endswith("questions.jsonl"))]


def _catalogue_params() -> list:
    return [pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [])
            for case in CATALOGUE]


# ----------------------------------------------------------------------------------------------
# Tests


def test_catalogue_covers_the_issue_list():
    ids = [c.id for c in CATALOGUE]
    assert len(ids) == len(set(ids)) and len(ids) >= 15
    assert set(REQUIRED.values()) <= set(ids)
    for case in CATALOGUE:
        assert (case.outcome == ACCEPTED) == (case.stage is None and case.reason is None), case.id
        assert case.outcome == ACCEPTED or (case.stage in ("ingest", "segment") and case.reason), case.id


@pytest.mark.parametrize("case", _catalogue_params())
def test_bad_input(case: Case, shared, template, tmp_path):
    if case.own_folder:
        folder = _new_folder(tmp_path, template)
        _add_good(folder, videos=1)
        folder.case = case.id
        case.make(folder)
        _write_questions(folder)
        run = _run(folder, tmp_path / "home", case.after_ingest)
        # The good video of the folder still arrives whole.
        truth = json.loads((template / "events.jsonl").read_text().splitlines()[0])
        assert [(e["start_frame"], e["end_frame"]) for e in run.events[truth["path"]]] == \
               [(e["start_frame"], e["end_frame"]) for e in truth["events"]]
    else:
        run = shared[0]
    mine = _rejects_of(run, case, case.own_folder)
    errors = [r for r in mine if r["severity"] == "error"]
    warnings = [r for r in mine if r["severity"] == "warning"]
    media = run.folder.media.get(case.id, set())
    rows = run.folder.rows.get(case.id, set())

    if case.outcome == REJECTED:
        hits = [r for r in errors if r["stage"] == case.stage and case.reason in r["reason"]]
        assert hits, f"{case.id}: no {case.stage} error containing {case.reason!r}; its rejects: {mine}"
        for reject in hits:
            assert reject["source_file"] and reject["item_kind"] in ("video", "question", "file")
            if reject["item_kind"] == "question":
                assert reject["source_row"] in rows or case.own_folder
        for rel in media:  # a rejected file: in no output table
            if case.stage == "ingest":
                assert rel not in run.videos
            assert rel not in run.events
        assert not any(q["source_row"] in rows for q in run.questions.values() if not case.own_folder)
        # A question about a rejected file is rejected too, saying why.
        for rel in media:
            asked = [r for r in errors if r["item_kind"] == "question" and r["item_id"] == f"q-{case.id}"]
            if case.stage == "ingest" and any(json.loads(run.folder.lines[n - 1]).get("path") == rel
                                               for n in rows):
                assert asked, f"{case.id}: the question about {rel} was not rejected"
    else:
        assert not errors, f"{case.id}: expected {case.outcome}, got errors {errors}"
        if case.outcome == WARNED:
            assert any(r["stage"] == case.stage and case.reason in r["reason"] for r in warnings), mine
        else:
            assert not warnings, f"{case.id}: unexpected warnings {warnings}"
        for rel in media:
            assert rel in run.videos and run.events.get(rel), f"{case.id}: {rel} did not arrive"
        for n in rows:
            qid = json.loads(run.folder.lines[n - 1])["problem_id"]
            assert run.questions[qid]["source_row"] == n
    if case.check:
        case.check(run, _only(media) if len(media) == 1 else None)


def test_every_good_item_arrives(shared, template):
    """Nothing good is lost: the 3 EventQA videos with exactly their events, all their questions,
    and every accepted row's video with events covering its frames without gap or overlap."""
    run, _ = shared
    truth = [json.loads(l) for l in (template / "events.jsonl").read_text().splitlines()]
    for video in truth:
        found = [(e["start_frame"], e["end_frame"]) for e in run.events[video["path"]]]
        assert found == [(e["start_frame"], e["end_frame"]) for e in video["events"]], video["path"]
    good_ids = {json.loads(l)["problem_id"] for l in (template / "questions.jsonl").read_text().splitlines()}
    assert good_ids <= set(run.questions)
    accepted = {rel for c in CATALOGUE if c.outcome != REJECTED and not c.own_folder
                for rel in run.folder.media.get(c.id, set())}
    good = {v["path"] for v in truth}
    assert set(run.videos) == good | accepted
    for rel in good | accepted:
        events = run.events[rel]
        assert [e["event_index"] for e in events] == list(range(len(events)))
        assert events[0]["start_frame"] == 0
        assert all(a["end_frame"] == b["start_frame"] for a, b in zip(events, events[1:])), rel
        assert len({e["event_key"] for e in events}) == len(events)
    # Counts agree with the tables.
    assert run.ingest.counts["videos"] == len(run.videos)
    assert run.segment.counts["videos"] == len(run.videos) and run.segment.counts["events"] == \
        sum(len(v) for v in run.events.values())


def test_inputs_are_unmodified_and_nothing_outside_is_read(shared):
    run, before = shared
    assert _snapshot(run.folder.data, run.folder.outside) == before
    # Nothing of the outside folder reached MARC_HOME (no quarantine copy of a link target).
    outside = {hashlib.sha256(p.read_bytes()).hexdigest() for p in run.folder.outside.glob("*.mp4")}
    copies = {hashlib.sha256(p.read_bytes()).hexdigest() for p in run.workspace.quarantine.rglob("*") if p.is_file()}
    assert not outside & copies
    for video in run.videos.values():
        assert Path(video["path"]).resolve().is_relative_to(run.folder.data)


def test_rejected_media_are_quarantined(shared):
    run, _ = shared
    rejected = [r for r in run.rejects if r["stage"] == "ingest" and r["item_kind"] == "video"
                and r["severity"] == "error"]
    assert rejected
    for reject in rejected:
        source = run.folder.data / reject["item_id"]
        if source.is_file() and not source.is_symlink():
            kept = Path(reject["quarantine_path"])
            assert kept.is_relative_to(run.workspace.quarantine) and kept.read_bytes() == source.read_bytes()
        else:  # links, pipes, folders: never opened, never copied
            assert reject["quarantine_path"] is None, reject


def test_rerun_over_bad_inputs_is_a_noop(shared):
    """Failed items are remembered too: a rerun recomputes nothing and rejects the same things."""
    run, _ = shared
    events_before = run.workspace.table("events").read_bytes()
    again = _run(run.folder, run.workspace.home)
    assert again.segment.counts["computed"] == 0 and not again.segment.wrote
    assert run.workspace.table("events").read_bytes() == events_before
    key = lambda r: (r["stage"], r["item_id"] or "", r["source_row"] or 0, r["reason"])
    assert sorted(map(key, again.rejects)) == sorted(map(key, run.rejects))
