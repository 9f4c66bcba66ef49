"""Benchmark: event search in LanceDB, exact and through the ANN index, against exact NumPy search.

For each table size (10k and 100k by default): random unit 384-d vectors around cluster centres
(one centre per 100 vectors), 5 "events" per "video", in a fresh LanceDB table written the way
stage embed writes it. Queries are drawn the same way but are not stored. Truth is the exact
top-10 by cosine similarity computed with NumPy. Printed per size:

- exact:  LanceDB flat search (what every search is below `embed.index_min_rows`);
- index:  the configured ANN index (`embed.index_type`, `nprobes`, `refine_factor`; `--index-types`
          compares others), built and queried by the stage's own `create_vector_index` / `search_events`;
- video:  a query restricted to one video, as stage retrieve asks it (exact, BTREE on video_id);
- numpy:  the brute-force reference itself.

Latency is per query (p50/p99 over `--queries` queries, one at a time); recall@10 is the share
of NumPy's top-10 found. Goal (issue #4): index p50 <= 10 ms at 100k with recall@10 >= 0.95.

    python bench/bench_retrieve.py [--sizes 10000 100000] [--queries 100] [--preset cpu-tiny]
                                   [--index-types IVF_SQ IVF_PQ]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_contracts import schemas  # noqa: E402
from infra.presets import load_preset  # noqa: E402
from stages.embed.stage import _btree, create_vector_index, search_events  # noqa: E402

DIM = 384


def make_vectors(n: int, rng: np.random.Generator, per_centre: int = 100) -> np.ndarray:
    centres = rng.normal(size=(max(10, n // per_centre), DIM)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.6, size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_table(db, n: int, vectors: np.ndarray):
    videos = [f"v{i // 5:06d}" for i in range(n)]
    data = pa.table({
        "event_key": [f"{v}#{i % 5}" for i, v in enumerate(videos)], "video_id": videos,
        "event_index": pa.array([i % 5 for i in range(n)], pa.int32()),
        "start_time": np.arange(n) % 5 * 3.0, "end_time": np.arange(n) % 5 * 3.0 + 3.0,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
        "caption": pa.nulls(n, pa.string()), "fingerprint": ["bench"] * n,
    }, schema=schemas.EVENT_VECTORS)
    return db.create_table(f"bench_{n}", data)


def timed(fn, queries) -> tuple[list, np.ndarray]:
    out, lat = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q))
        lat.append(time.perf_counter() - t0)
    return out, np.array(lat) * 1e3


def line(size: int, name: str, lat_ms: np.ndarray, recall: float | None, extra: str = "") -> str:
    r = f"recall@10={recall:.3f}" if recall is not None else "recall@10=  -  "
    return (f"n={size:>6}  {name:<24} p50={np.percentile(lat_ms, 50):7.2f} ms  "
            f"p99={np.percentile(lat_ms, 99):7.2f} ms  {r}  {extra}").rstrip()


def bench_size(db, n: int, queries: int, config, index_types: list[str], rng: np.random.Generator) -> list[str]:
    everything = make_vectors(n + queries, rng)
    # Queries are drawn like the data (a centre plus noise) but are not in the table: their top-10
    # are cluster mates at similar distances, which is what makes quantised indexes lose recall.
    vectors, qs = everything[:n], everything[n:]
    t0 = time.perf_counter()
    table = make_table(db, n, vectors)
    add_s = time.perf_counter() - t0
    picks = rng.integers(0, n, queries)  # videos for the one-video queries
    keys = np.array([f"v{i // 5:06d}#{i % 5}" for i in range(n)])

    top, np_lat = timed(lambda q: keys[np.argpartition(-(vectors @ q), 10)[:10]], qs)
    truth = [set(t) for t in top]

    def recall(results) -> float:
        return float(np.mean([len({h["event_key"] for h in r} & t) / 10 for r, t in zip(results, truth)]))

    out = [line(n, "numpy exact", np_lat, 1.0, f"(table written in {add_s:.2f} s)")]
    res, lat = timed(lambda q: search_events(table, q, 10, config), qs)
    out.append(line(n, "lancedb exact", lat, recall(res)))

    table.create_index("video_id", config=_btree())
    for kind in index_types:
        cfg = config.embed.model_copy(update={"index_type": kind})
        t0 = time.perf_counter()
        create_vector_index(table, cfg)
        build_s = time.perf_counter() - t0
        with_kind = config.model_copy(update={"embed": cfg})
        res, lat = timed(lambda q: search_events(table, q, 10, with_kind), qs)
        name = f"index {cfg.index_type} np{cfg.nprobes} rf{cfg.refine_factor}"
        out.append(line(n, name, lat, recall(res), f"(built in {build_s:.1f} s)"))

    # As stage retrieve asks: the top-3 of one video's 5 events (exact, BTREE-filtered).
    vids = [f"v{p // 5:06d}" for p in picks]
    res, lat = timed(lambda qv: search_events(table, qv[0], 3, config, video_id=qv[1]), list(zip(qs, vids)))
    firsts = [p // 5 * 5 for p in picks]
    same = sum([h["event_key"] for h in r] == [keys[f + j] for j in np.argsort(-(vectors[f:f + 5] @ q))[:3]]
               for r, q, f in zip(res, qs, firsts))
    out.append(line(n, "one video, top-3 exact", lat, None, f"(same as NumPy: {same}/{len(res)})"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--index-types", nargs="+", default=None,
                        help="ANN index kinds to compare (default: the preset's embed.index_type), e.g. IVF_SQ IVF_PQ")
    args = parser.parse_args()
    os.environ.setdefault("LANCE_LOG", "error")  # k-means warns about empty clusters on random data
    import lancedb

    config = load_preset(args.preset)
    index_types = args.index_types or [config.embed.index_type]
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_retrieve_"))
    try:
        db = lancedb.connect(str(tmp))
        lines = []
        for n in args.sizes:
            lines += bench_size(db, n, args.queries, config, index_types, rng)
        print("\n".join(lines))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
