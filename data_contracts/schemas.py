"""Arrow schemas of every table that crosses a stage boundary.

Each schema carries its name and version in the schema metadata (`marc.table`,
`marc.schema_version`), so a reader can tell what a file holds and refuse a file
written by an incompatible version. Bump a version when a column changes meaning
or type; adding a nullable column at the end is compatible and bumps the minor part.

This module imports nothing of ours: stages and flows depend on it, never the reverse.
"""

from __future__ import annotations

import pyarrow as pa


def _schema(name: str, version: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"marc.table": name, "marc.schema_version": version})


VIDEOS = _schema(
    "videos",
    "1.0",
    [
        pa.field("video_id", pa.string(), nullable=False),  # relative posix path inside the data folder
        pa.field("path", pa.string(), nullable=False),  # absolute path of the input file (never modified)
        pa.field("media_type", pa.string(), nullable=False),  # "video" or "image"
        pa.field("content_sha256", pa.string(), nullable=False),  # fingerprint of the file's bytes
        pa.field("size_bytes", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("rotation", pa.int32(), nullable=False),  # display rotation in degrees from container metadata
        pa.field("fps", pa.float64()),  # average frame rate (frames / duration); null for images
        pa.field("frame_count", pa.int64(), nullable=False),  # video packets with a timestamp
        pa.field("start_time", pa.float64()),  # first presentation timestamp, seconds
        pa.field("duration", pa.float64()),  # last PTS + last frame duration - first PTS, seconds
        pa.field("variable_frame_rate", pa.bool_()),  # frame intervals differ by more than 1%
        pa.field("codec", pa.string()),
    ],
)

QUESTIONS = _schema(
    "questions",
    "1.0",
    [
        pa.field("question_id", pa.string(), nullable=False),  # Video-R1 `problem_id`, as text
        pa.field("video_id", pa.string(), nullable=False),  # key into the videos table
        pa.field("problem", pa.string(), nullable=False),  # the question text
        pa.field("options", pa.list_(pa.string()), nullable=False),  # ["A. red", ...]; empty if none
        pa.field("solution", pa.string(), nullable=False),  # as given, e.g. "<answer>B</answer>"
        pa.field("answer", pa.string(), nullable=False),  # the text inside <answer>...</answer>
        pa.field("problem_type", pa.string(), nullable=False),  # multiple choice | numerical | free-form | OCR | regression
        pa.field("data_type", pa.string(), nullable=False),  # video | image
        pa.field("split", pa.string(), nullable=False),  # train | test
        pa.field("family", pa.string()),  # EventQA family (shape, colour, direction, after) if known
        pa.field("answer_event", pa.int32()),  # index of the event holding the answer, if known
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),  # 1-based line (JSONL) or list index + 1 (JSON)
    ],
)

EVENTS = _schema(
    "events",
    "1.0",
    [
        pa.field("event_key", pa.string(), nullable=False),  # "{video_id}#{event_index}"
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("event_index", pa.int32(), nullable=False),  # 0-based, chronological
        pa.field("start_frame", pa.int64(), nullable=False),  # first frame, decode order
        pa.field("end_frame", pa.int64(), nullable=False),  # one past the last frame
        pa.field("start_time", pa.float64(), nullable=False),  # PTS of the first frame, seconds
        pa.field("end_time", pa.float64(), nullable=False),  # PTS just after the last frame, seconds
        pa.field("frame_count", pa.int64(), nullable=False),
        pa.field("fps", pa.float64(), nullable=False),
        pa.field("keyframes", pa.list_(pa.string()), nullable=False),  # paths under MARC_HOME
        pa.field("fingerprint", pa.string(), nullable=False),  # of the video item that produced this row
    ],
)

REJECTS = _schema(
    "rejects",
    "1.0",
    [
        pa.field("stage", pa.string(), nullable=False),  # stage that refused the input
        pa.field("severity", pa.string(), nullable=False),  # "error" (dropped) or "warning" (kept, with caveat)
        pa.field("item_kind", pa.string(), nullable=False),  # video | question | file
        pa.field("item_id", pa.string()),  # video id or question id when one could be read
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64()),  # 1-based row/line in source_file, null for whole files
        pa.field("column", pa.string()),  # offending field, null when the whole item is bad
        pa.field("reason", pa.string(), nullable=False),  # human-readable, names what and where
        pa.field("quarantine_path", pa.string()),  # copy of the bad input under MARC_HOME/quarantine
    ],
)

ROLLOUTS = _schema(
    "rollouts",
    "1.0",
    [  # one row per teacher completion: G_t rows per question, all sharing the question's a_full
        pa.field("question_id", pa.string(), nullable=False),  # key into the questions table
        pa.field("fingerprint", pa.string(), nullable=False),  # of the item: teacher weights, question, sampling config
        pa.field("sample_index", pa.int32(), nullable=False),  # 0 .. G_t - 1 within the question
        pa.field("completion", pa.string(), nullable=False),  # decoded text, special tokens removed
        pa.field("num_tokens", pa.int32(), nullable=False),  # generated tokens, through the end-of-sequence token
        pa.field("reward_format", pa.float64()),  # `format` plug-in (0/1); null when the run did not use it
        pa.field("reward_accuracy", pa.float64(), nullable=False),  # `accuracy` plug-in, in [0, 1]
        pa.field("reward_total", pa.float64(), nullable=False),  # sum of the plug-in sub-scores (no retention bonus)
        pa.field("a_full", pa.float64(), nullable=False),  # mean reward_accuracy of the question's G_t rows
    ],
)

EMBED_DIM = 384  # all-MiniLM-L6-v2's width; a CLIP/SigLIP checkpoint may bring another (event_vectors_schema)


def event_vectors_schema(dim: int = EMBED_DIM) -> pa.Schema:
    """The LanceDB table `event_vectors` for vectors of width `dim`."""
    return _schema(
        "event_vectors",
        "1.0",
        [
            pa.field("event_key", pa.string(), nullable=False),  # "{video_id}#{event_index}", the merge key
            pa.field("video_id", pa.string(), nullable=False),
            pa.field("event_index", pa.int32(), nullable=False),  # 0-based, chronological
            pa.field("start_time", pa.float64(), nullable=False),  # PTS seconds, as in the events table
            pa.field("end_time", pa.float64(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),  # unit length: cosine = dot
            pa.field("caption", pa.string()),  # ground-truth caption of the overlapping event, if known
            pa.field("fingerprint", pa.string(), nullable=False),  # embed's fingerprint of the video
        ],
    )


EVENT_VECTORS = event_vectors_schema()  # lives in LanceDB (MARC_HOME/lancedb), not in an Arrow file

MEMORIES = _schema(
    "memories",
    "1.0",
    [  # one row per video question: its episodic memory clip
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),  # absolute path of the video to read frames from
        pa.field("video_sha256", pa.string(), nullable=False),  # the frame cache's key for this video
        pa.field("query", pa.string(), nullable=False),  # the text that was embedded (question, no option letters)
        # The retrieved events in chronological order; each list below has one entry per event:
        pa.field("event_keys", pa.list_(pa.string()), nullable=False),
        pa.field("event_indices", pa.list_(pa.int32()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),  # cosine similarity to the query
        pa.field("ranks", pa.list_(pa.int32()), nullable=False),  # 0 = most similar
        pa.field("event_start_times", pa.list_(pa.float64()), nullable=False),
        pa.field("event_end_times", pa.list_(pa.float64()), nullable=False),
        pa.field("event_frame_counts", pa.list_(pa.int32()), nullable=False),  # frames per event; sum = N
        # The clip: N frames (N even, N <= max_frames), event after event:
        pa.field("frame_timestamps", pa.list_(pa.float64()), nullable=False),  # PTS seconds, for decode_frames
        pa.field("frame_size", pa.int32(), nullable=False),  # side in px at which the frames are cached
        pa.field("padded", pa.bool_(), nullable=False),  # the last frame was repeated to make N even
        pa.field("fingerprint", pa.string(), nullable=False),  # retrieve's fingerprint of the question
    ],
)

ALL: dict[str, pa.Schema] = {
    s.metadata[b"marc.table"].decode(): s
    for s in (VIDEOS, QUESTIONS, EVENTS, REJECTS, ROLLOUTS, EVENT_VECTORS, MEMORIES)
}


def schema_version(schema: pa.Schema) -> str:
    return (schema.metadata or {}).get(b"marc.schema_version", b"?").decode()
