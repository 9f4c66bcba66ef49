"""Retrieval quality against EventQA ground truth: recall@1 and recall@k per question family.

A question's answer lives in a ground-truth event (`answer_event` in questions.jsonl, spans in
events.jsonl); retrieval returns *detected* events. The ground-truth event is mapped to the
detected event of the same video that overlaps it most in time; a question counts as a hit at
k when that detected event is among its k best-scored retrieved events.
"""

from __future__ import annotations

from stages.embed.train import match_events


def answer_event_map(truth: dict[str, dict], detected: dict[str, list[dict]]) -> dict[tuple[str, int], int | None]:
    """(video_id, ground-truth event index) -> detected event_index overlapping it most (None: none)."""
    out: dict[tuple[str, int], int | None] = {}
    for vid, row in truth.items():
        events = sorted(detected.get(vid, []), key=lambda e: e["event_index"])
        best = match_events([(e["start_time"], e["end_time"]) for e in events],
                            [(g["start_time"], g["end_time"]) for g in row["events"]], per="truth")
        for g, j in zip(row["events"], best):
            out[(vid, g["index"])] = events[j]["event_index"] if j is not None else None
    return out


def recall_by_family(memories: list[dict], questions: list[dict], mapping: dict[tuple[str, int], int | None],
                     k: int, split: str | None = "test") -> dict[str, dict]:
    """{family: {questions, recall@1, recall@k}} over questions with a family and an answer_event."""
    memory = {m["question_id"]: m for m in memories}
    tally: dict[str, list[int]] = {}
    for q in questions:
        if (split and q["split"] != split) or q.get("family") is None or q.get("answer_event") is None:
            continue
        m = memory.get(q["question_id"])
        if m is None:
            continue
        target = mapping.get((q["video_id"], q["answer_event"]))
        by_rank = [i for _, i in sorted(zip(m["ranks"], m["event_indices"]))]
        t = tally.setdefault(q["family"], [0, 0, 0])
        t[0] += int(target is not None and by_rank[:1] == [target])
        t[1] += int(target is not None and target in by_rank[:k])
        t[2] += 1
    return {f: {"questions": n, "recall@1": round(h1 / n, 4), f"recall@{k}": round(hk / n, 4)}
            for f, (h1, hk, n) in sorted(tally.items())}
