"""Stage ingest: a data folder -> the videos and questions tables (and ingest's rejects).

The data folder holds media files and a questions file in Video-R1's format (a JSON
list or JSON Lines). Bad input never stops the stage and is never lost: every bad
file, line or field becomes a rejects row naming the file, row and column, and a copy
of what could be read goes to the quarantine folder. Inputs are only ever read.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import pyarrow as pa

from data_contracts import schemas
from data_contracts.config import PipelineConfig
from data_contracts.validate import validate_rows
from stages.common.arrow_io import write_bytes_atomic, write_tables
from stages.common.media import ProbeError, probe_image, probe_video, sha256_of
from stages.common.workspace import Workspace

STAGE = "ingest"
CODE_VERSION = "1"
PROBLEM_TYPES = ("multiple choice", "numerical", "free-form", "OCR", "regression")
SPLITS = ("train", "test")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPTION = re.compile(r"^\s*([A-Z])[.)]\s*")
_BAD_ID = re.compile(r"[/\\\x00]|^\.\.?$|^\s*$")


@dataclass
class IngestResult:
    videos: pa.Table
    questions: pa.Table
    rejects: pa.Table
    counts: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)


class _Rejects:
    """Collects rejects rows; each names what was refused, where, and why."""

    def __init__(self, quarantine: Path):
        self.rows: list[dict] = []
        self.quarantine = quarantine

    def add(self, reason, *, kind, source, row=None, column=None, item=None, severity="error", keep=None):
        # Every text goes through _printable: a reject must never fail to be written.
        self.rows.append(
            dict(stage=STAGE, severity=severity, item_kind=kind, item_id=_text(item), source_file=_text(source),
                 source_row=row, column=_text(column), reason=_text(reason), quarantine_path=_text(keep))
        )

    def keep_file(self, path: Path, rel: str) -> Path:
        target = self.quarantine / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return target

    def keep_text(self, raw: bytes, name: str) -> Path:
        return write_bytes_atomic(raw, self.quarantine / name)


def run(config: PipelineConfig, data_dir: Path, workspace: Workspace,
        progress: Callable[[int, int], None] | None = None) -> IngestResult:
    cfg = config.ingest
    data_dir = Path(data_dir).resolve()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist or is not a folder")
    rejects = _Rejects(workspace.quarantine / STAGE)
    question_rows = _read_questions(data_dir, cfg.questions_file, rejects)

    # Every media file a question names, plus every video file lying in the folder.
    wanted: dict[str, str] = {}  # relative path -> "video" | "image"
    for q in question_rows:
        wanted.setdefault(q["video_id"], q["data_type"])
    for path in sorted(data_dir.rglob("*")):
        if path.suffix.lower() in cfg.video_extensions and not path.name.startswith("."):
            rel = path.relative_to(data_dir).as_posix()
            if _printable(rel) != rel:  # undecodable bytes in the name: no table could hold its id
                rejects.add(f"{_printable(rel)}: the file name is not valid UTF-8; rename it to be read",
                            kind="video", source=path, item=rel)
                continue
            problem = _unusable(path, data_dir)
            if problem is None:
                wanted.setdefault(rel, "video")
            elif rel not in wanted:
                rejects.add(f"{rel} {problem}; not read", kind="video", source=path, item=rel)

    video_rows, bad_media = [], {}
    for i, (rel, media_type) in enumerate(sorted(wanted.items()), start=1):
        path = data_dir / rel
        try:
            row, missing = media_row(path, rel, media_type, cfg.max_decode_probe_frames)
            video_rows.append(row)
            if missing:  # kept: segment uses what is there; the user learns what is not
                rejects.add(f"video {rel}: truncated: the container lists {row['frame_count'] + missing} frames "
                            f"but holds {row['frame_count']}; the rest is missing", kind=media_type, source=path,
                            item=rel, severity="warning")
        except ProbeError as exc:
            bad_media[rel] = str(exc)
            kept = rejects.keep_file(path, f"media/{rel}") if path.is_file() else None
            rejects.add(f"{media_type} {rel}: {exc}", kind=media_type, source=path, item=rel, keep=kept)
        except OSError as exc:  # unreadable (permissions, I/O error, gone since the scan): no copy
            bad_media[rel] = f"cannot be read ({exc.strerror or exc})"
            rejects.add(f"{media_type} {rel}: {bad_media[rel]}", kind=media_type, source=path, item=rel)
        if progress:
            progress(i, len(wanted))

    kept_questions = []
    for q in question_rows:
        if q["video_id"] in bad_media:
            rejects.add(f"question {q['question_id']}: its {q['data_type']} {q['video_id']} was rejected "
                        f"({bad_media[q['video_id']]})", kind="question", source=q["source_file"],
                        row=q["source_row"], column="path", item=q["question_id"])
        else:
            kept_questions.append(q)

    videos = validate_rows(video_rows, schemas.VIDEOS, "videos table")
    questions = validate_rows(kept_questions, schemas.QUESTIONS, "questions table")
    rejects_table = validate_rows(rejects.rows, schemas.REJECTS, "rejects table")
    # One commit: a failed write (a full disk) keeps the previous version of all three tables.
    names = ("videos", "questions", "rejects")
    paths = write_tables([(videos, workspace.table("videos")), (questions, workspace.table("questions")),
                          (rejects_table, workspace.rejects(STAGE))])
    outputs = dict(zip(names, paths))
    counts = {
        "videos": sum(r["media_type"] == "video" for r in video_rows),
        "images": sum(r["media_type"] == "image" for r in video_rows),
        "questions": len(kept_questions),
        "train_questions": sum(q["split"] == "train" for q in kept_questions),
        "test_questions": sum(q["split"] == "test" for q in kept_questions),
        "rejects": sum(r["severity"] == "error" for r in rejects.rows),
        "warnings": sum(r["severity"] == "warning" for r in rejects.rows),
    }
    return IngestResult(videos, questions, rejects_table, counts, outputs)


def media_row(path: Path, rel: str, media_type: str, decode_frames: int) -> tuple[dict, int]:
    """The videos-table row of one media file, and how many frames its index lists beyond its end."""
    row = dict(video_id=rel, path=str(path), media_type=media_type, content_sha256=sha256_of(path),
               size_bytes=path.stat().st_size, rotation=0, fps=None, start_time=None, duration=None,
               variable_frame_rate=None, codec=None)
    if media_type == "image":
        row["width"], row["height"] = probe_image(path)
        row["frame_count"] = 1
        return row, 0
    probe = probe_video(path, decode_frames)
    row.update(width=probe.width, height=probe.height, rotation=probe.rotation, fps=probe.fps,
               frame_count=probe.frame_count, start_time=probe.start_time, duration=probe.duration,
               variable_frame_rate=probe.variable_frame_rate, codec=probe.codec)
    return row, probe.missing_frames


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


_MISSING = "does not exist"


def _unusable(path: Path, data_dir: Path) -> str | None:
    """Why `path` must not be opened as an input file, or None for a regular file whose real
    location is inside the data folder. Never opens the file (a named pipe would block)."""
    try:
        resolved = path.resolve()
        if not _inside(resolved, data_dir):
            how = "is a link to" if os.path.islink(path) else "leads to"
            return f"{how} {resolved}, outside the data folder"
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if os.path.islink(path) else _MISSING
    except RuntimeError:  # Python 3.11's Path.resolve reports a symlink loop this way
        return "is a symbolic link loop"
    except (OSError, ValueError) as exc:
        if getattr(exc, "errno", None) == errno.ELOOP:
            return "is a symbolic link loop"
        return f"cannot be examined ({getattr(exc, 'strerror', None) or exc})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a pipe, socket or device)"
    return None


def _printable(text: str) -> str:
    """`text` as valid UTF-8: lone surrogates (from JSON escapes or undecodable file-name bytes)
    become backslash escapes, so the text can go into an Arrow table."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _text(value: object) -> str | None:
    return None if value is None else _printable(str(value))


def _valid_text(value: object) -> bool:
    """No lone surrogate anywhere in a parsed JSON value (Python's json accepts a '\\ud800' escape)."""
    if isinstance(value, str):
        return _printable(value) == value
    if isinstance(value, list):
        return all(_valid_text(v) for v in value)
    if isinstance(value, dict):
        return all(_valid_text(k) and _valid_text(v) for k, v in value.items())
    return True


def _show(value: str, limit: int = 200) -> str:
    """repr() of a value from an input file, shortened so a huge value cannot flood the rejects."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit // 2]!r}... ({len(value)} characters)"


def _find_questions_file(data_dir: Path, name: str | None) -> Path | None:
    candidates = [name] if name else ["questions.jsonl", "questions.json"]
    for candidate in candidates:
        if os.path.lexists(data_dir / candidate):  # links too: _read_questions checks where they lead
            return data_dir / candidate
    return None


def _read_questions(data_dir: Path, name: str | None, rejects: _Rejects) -> list[dict]:
    """Parse the questions file into rows of the questions contract; bad records go to rejects."""
    path = _find_questions_file(data_dir, name)
    if path is None:
        rejects.add(f"no questions file in {data_dir} (looked for {name or 'questions.jsonl, questions.json'})",
                    kind="file", source=data_dir)
        return []
    problem = _unusable(path, data_dir)
    if problem is not None:
        rejects.add(f"questions file {path.name} {problem}; not read", kind="file", source=path)
        return []
    raw = path.read_bytes()
    records: list[tuple[int, object]] = []  # (1-based row, parsed record)
    if raw.lstrip().startswith(b"["):
        try:
            listed = json.loads(raw.decode("utf-8"))
            records = [(i, rec) for i, rec in enumerate(listed, start=1)]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            kept = rejects.keep_file(path, f"questions/{path.name}")
            rejects.add(f"{path.name} is not a valid JSON list: {exc}", kind="file", source=path, keep=kept)
            return []
    else:
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as exc:
                kept = rejects.keep_text(line, f"questions/{path.name}.line{lineno}")
                rejects.add(f"{path.name} line {lineno} is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                            kind="question", source=path, row=lineno, keep=kept)
            except json.JSONDecodeError as exc:
                kept = rejects.keep_text(line, f"questions/{path.name}.line{lineno}")
                rejects.add(f"{path.name} line {lineno} is not valid JSON: {exc.msg} (column {exc.colno})",
                            kind="question", source=path, row=lineno, keep=kept)
    if not records and not rejects.rows:
        rejects.add(f"{path.name} holds no questions", kind="file", source=path)

    rows, first_seen = [], {}
    for row_no, record in records:
        try:
            q = _question_row(record, data_dir, path, row_no)
        except _BadField as bad:
            item = str(record.get("problem_id")) if isinstance(record, dict) and "problem_id" in record else None
            raw_record = json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace")
            kept = rejects.keep_text(raw_record, f"questions/{path.name}.row{row_no}")
            rejects.add(f"{path.name} row {row_no}: {bad.message}", kind="question", source=path, row=row_no,
                        column=bad.column, item=item, keep=kept)
            continue
        if q["question_id"] in first_seen:
            rejects.add(f"{path.name} row {row_no}: duplicate problem_id {_show(q['question_id'])} "
                        f"(first at row {first_seen[q['question_id']]}; the first is kept)",
                        kind="question", source=path, row=row_no, column="problem_id", item=q["question_id"])
            continue
        first_seen[q["question_id"]] = row_no
        rows.append(q)
    return rows


class _BadField(Exception):
    def __init__(self, column: str | None, message: str):
        self.column, self.message = column, message


def _question_row(record: object, data_dir: Path, source: Path, row_no: int) -> dict:
    if not isinstance(record, dict):
        raise _BadField(None, f"expected a JSON object, got {type(record).__name__}")
    for key, value in record.items():
        if not (_valid_text(key) and _valid_text(value)):
            raise _BadField(_printable(key), f"field '{_printable(key)}' holds text that is not valid Unicode "
                                             "(an unpaired surrogate such as \\ud800)")
    for key in ("problem_id", "problem", "solution", "path"):
        if record.get(key) in (None, ""):
            raise _BadField(key, f"required field '{key}' is missing or empty")
    qid = str(record["problem_id"])
    if _BAD_ID.search(qid) or ".." in qid:
        raise _BadField("problem_id", f"problem_id {_show(qid)} contains path characters")
    problem_type = str(record.get("problem_type", "multiple choice"))
    if problem_type not in PROBLEM_TYPES:
        raise _BadField("problem_type", f"unknown problem_type {problem_type!r} (expected one of {', '.join(PROBLEM_TYPES)})")
    data_type = str(record.get("data_type", "video"))
    if data_type not in ("video", "image"):
        raise _BadField("data_type", f"unknown data_type {data_type!r} (expected video or image)")
    split = str(record.get("split", "train"))
    if split not in SPLITS:
        raise _BadField("split", f"unknown split {split!r} (expected train or test)")
    options = record.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise _BadField("options", "options must be a list of strings")
    match = _ANSWER.search(str(record["solution"]))
    if not match or len(_ANSWER.findall(str(record["solution"]))) != 1:
        raise _BadField("solution", "solution must hold exactly one <answer>...</answer>")
    answer = match.group(1).strip()
    if problem_type == "multiple choice":
        letters = [m.group(1) for o in options if (m := _OPTION.match(o))]
        if len(options) < 2 or len(letters) != len(options):
            raise _BadField("options", f"multiple choice needs >= 2 options like 'A. ...', got {options!r}")
        if len(set(letters)) != len(letters) or letters != [chr(ord("A") + i) for i in range(len(letters))]:
            raise _BadField("options", f"option letters must run A, B, C, ... in order, got {letters}")
        if answer not in letters:
            raise _BadField("solution", f"answer {answer!r} is not one of the option letters {letters}")
    rel = _safe_relative(str(record["path"]), data_dir)
    return dict(
        question_id=qid, video_id=rel, problem=str(record["problem"]), options=options,
        solution=str(record["solution"]), answer=answer, problem_type=problem_type, data_type=data_type,
        split=split, family=record.get("family") if isinstance(record.get("family"), str) else None,
        answer_event=record.get("answer_event") if isinstance(record.get("answer_event"), int) else None,
        source_file=str(source), source_row=row_no,
    )


def _safe_relative(raw: str, data_dir: Path) -> str:
    """The media path relative to the data folder, refusing anything that leaves it."""
    if "\x00" in raw:
        raise _BadField("path", f"path {_show(raw)} contains a NUL byte")
    posix = PurePosixPath(raw.replace("\\", "/"))
    if posix.is_absolute():
        raise _BadField("path", f"path {_show(raw)} is absolute; paths must be relative to the data folder")
    if ".." in posix.parts:
        raise _BadField("path", f"path {_show(raw)} leaves the data folder ('..')")
    rel = PurePosixPath(*[p for p in posix.parts if p != "."]).as_posix()
    problem = _unusable(data_dir / rel, data_dir)
    if problem == _MISSING:
        shown = rel if len(rel) <= 200 else f"{rel[:100]}... ({len(rel)} characters)"
        raise _BadField("path", f"media file {shown} not found in {data_dir}")
    if problem is not None:
        raise _BadField("path", f"path {_show(raw)} {problem}")
    return rel
