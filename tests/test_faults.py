"""Faults caused for real (issue #8, item 1) against the stages that exist (ingest, segment).

One private stack for the module (`marc up` under a short MARC_HOME in /tmp on free ports, `marc
down` at the end), flows started exactly as a user does: `prefect deployment run marc/full-pipeline
--param data_dir=... --watch` with the env of `marc env`. Every process killed here is one this
module's stack started, found by PID (the stack's pid files, then /proc children) and checked
against its recorded start time; nothing is killed by name.

    a  a Ray worker SIGKILLed in the middle of a segment shard: the task runs again, the events
       table ends complete, with no duplicate (byte-identical to a clean run)
    b  the Prefect worker and its flow-run process SIGKILLed mid-segment: segment's tables keep
       their previous version (ingest, finished before the kill, committed whole), the shards of
       the dead run stop; after `marc up` restarts the worker, a rerun completes and reuses every
       item committed before (work of the killed shards is redone: it was never committed)
    c  the MLflow server down when a flow starts: the run fails within seconds with a message
       naming the tracking URI, touching no table; after `marc up` a rerun succeeds
    d  MARC_HOME on a full file system (a 2 MiB tmpfs): a clear DiskFullError naming the table
       and MARC_HOME, the previous version of every table still reads; with space again the rerun
       completes (no stack needed: plain stage functions)
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import imageio_ffmpeg
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import requests

from conftest import BIN, PrivateStack, cmdline, pid_alive, proc_stat, process_family
from data_contracts import schemas
from infra.presets import load_preset
from stages import ingest, sample_data
from stages.common.arrow_io import DiskFullError, read_table
from stages.common.workspace import Workspace
from stages.segment import stage as segment

pytestmark = pytest.mark.integration

CONFIG = load_preset("cpu-tiny")
RUN_TIMEOUT_S = 420


# ----------------------------------------------------------------------------------------------
# helpers


def _encode_slow(path: Path) -> None:
    """A video that keeps a segment shard busy for seconds: 600 s of 64x64 at 25 fps (15,000
    frames, one colour: a single scene, so its events do not depend on detector details)."""
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "color=c=navy:s=64x64:r=25:d=600", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt",
                    "yuv420p", str(path)], check=True)


def _deploy(stack: PrivateStack, data: Path, *params: str, deployment: str = "full-pipeline") -> subprocess.Popen:
    args = [str(BIN / "prefect"), "deployment", "run", f"marc/{deployment}", "--param", f"data_dir={data}"]
    if deployment == "full-pipeline":  # the faults here are about ingest and segment: skip model stages
        args += ["--param", 'stages=["ingest", "segment"]']
    for param in params:
        args += ["--param", param]
    return subprocess.Popen([*args, "--watch"], env=stack.env, cwd=stack.home, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"flow run still going after {timeout:.0f} s:\n{out[-4000:]}")
    return out


def _flow_run_id(out: str) -> str:
    match = re.search(r"flow-run/([0-9a-f-]{36})", out)
    assert match, out[-3000:]
    return match.group(1)


def _api(stack: PrivateStack) -> str:
    return stack.env["PREFECT_API_URL"]


def _flow_run(stack: PrivateStack, run_id: str) -> dict:
    return requests.get(f"{_api(stack)}/flow_runs/{run_id}", timeout=30).json()


def _task_histories(stack: PrivateStack, run_id: str) -> dict[str, list[str]]:
    """task run name -> its state names in order (a re-executed task shows Running twice)."""
    runs = requests.post(f"{_api(stack)}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}},
                         timeout=30).json()
    out = {}
    for run in runs:
        states = requests.get(f"{_api(stack)}/task_run_states/", params={"task_run_id": run["id"]}, timeout=30).json()
        out[run["name"]] = [s["name"] for s in sorted(states, key=lambda s: s["timestamp"])]
    return out


def _mlflow_runs(stack: PrivateStack) -> list[dict]:
    uri = stack.env["MLFLOW_TRACKING_URI"]
    exp = requests.get(f"{uri}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "marc"},
                       timeout=30).json()["experiment"]
    return requests.post(f"{uri}/api/2.0/mlflow/runs/search", json={"experiment_ids": [exp["experiment_id"]],
                                                                    "max_results": 1000}, timeout=30).json()["runs"]


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _stage_metrics(stack: PrivateStack, flow_run_id: str, stage: str) -> dict[str, float]:
    runs = _mlflow_runs(stack)
    parent = next(r for r in runs if _tags(r).get("prefect.flow_run_id") == flow_run_id
                  and _tags(r).get("marc.kind") == "pipeline")
    child = next(r for r in runs if _tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]
                 and _tags(r).get("marc.stage") == stage)
    return {m["key"]: m["value"] for m in child["data"].get("metrics", [])}


def _ray_family(stack: PrivateStack) -> set[int]:
    return process_family([stack.pids()["ray"]])


def _decoding(stack: PrivateStack, name: str) -> list[tuple[int, int]]:
    """(ffmpeg pid, its parent: the Ray worker running the shard) for each decoder of `name`."""
    found = []
    for pid in _ray_family(stack):
        line = cmdline(pid)
        if "ffmpeg" in line and f"/{name} " in line + " " and (stat := proc_stat(pid)):
            found.append((pid, int(stat[1])))
    return found


def _starttime(pid: int) -> int | None:
    stat = proc_stat(pid)
    return int(stat[19]) if stat else None


def _kill(pids: set[int] | list[int], sig: int = signal.SIGKILL, wait: float = 20.0) -> None:
    """Signal each pid (ours: found in this stack's process tree), then wait until all are gone."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if pid_alive(p)], {p: cmdline(p) for p in pids if pid_alive(p)}


def _stop_service(stack: PrivateStack, service: str) -> set[int]:
    """Stop one service of the stack the way `marc down` does: SIGTERM to its process group (it
    was started in its own session), then SIGKILL by PID for whatever of its tree is left."""
    record = stack.record(service)
    pid = record["pid"]
    assert _starttime(pid) == record["starttime"], f"{service} pid {pid} is not the recorded process"
    family = process_family([pid])
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(pid_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill({p for p in family if pid_alive(p)})
    return family


def _rows(raw: bytes) -> list[dict]:
    """The rows of an Arrow file's bytes (a table version kept in memory)."""
    return ipc.open_file(pa.BufferReader(raw)).read_all().to_pylist()


def _events(home: Path) -> list[dict]:
    return read_table(home / "tables" / "events.arrow", schemas.EVENTS).to_pylist()


def _assert_complete(home: Path, video_ids: set[str]) -> list[dict]:
    """Every video has events, indices 0..k-1 covering its frames without gap, no key twice."""
    events = _events(home)
    keys = [e["event_key"] for e in events]
    assert len(keys) == len(set(keys)), "duplicated rows"
    assert {e["video_id"] for e in events} == video_ids
    for vid in video_ids:
        mine = sorted((e for e in events if e["video_id"] == vid), key=lambda e: e["event_index"])
        assert [e["event_index"] for e in mine] == list(range(len(mine)))
        assert mine[0]["start_frame"] == 0
        assert all(a["end_frame"] == b["start_frame"] for a, b in zip(mine, mine[1:]))
    return events


# ----------------------------------------------------------------------------------------------
# fixtures


ZOMBIE_AFTER_S = 90


@pytest.fixture(scope="module")
def stack():
    private = PrivateStack("mf-")
    # the zombie automation's window (default 300 s), shortened so the killed flow run is marked in the test
    private.base_env["MARC_ZOMBIE_AFTER_S"] = str(ZOMBIE_AFTER_S)
    try:
        private.up()
        yield private
    finally:
        private.close()
        shutil.rmtree(private.home, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """4 EventQA videos + one slow video (segmenting it takes seconds)."""
    data = tmp_path_factory.mktemp("faults") / "data"
    sample_data.generate(data, videos=4, seed=3, width=64, height=64, fps=8)
    _encode_slow(data / "videos" / "slow.mp4")
    return data


def _video_ids(data: Path) -> set[str]:
    return {p.relative_to(data).as_posix() for p in (data / "videos").glob("*.mp4")}


@pytest.fixture(scope="module")
def baseline(stack, dataset) -> bytes:
    """A clean full run over the data set: the events table every fault must come back to."""
    out = _finish(_deploy(stack, dataset))
    assert "Completed" in out, out[-3000:]
    _assert_complete(stack.home, _video_ids(dataset))
    return (stack.home / "tables" / "events.arrow").read_bytes()


# ----------------------------------------------------------------------------------------------
# a: a Ray worker killed mid-task


def test_ray_worker_killed_mid_segment_shard_is_retried(stack, dataset, baseline):
    proc = _deploy(stack, dataset, "force=true")  # recompute every video: the shards do real work
    victim, decoder, retried_by = None, None, set()
    while proc.poll() is None:
        for ffmpeg_pid, worker in _decoding(stack, "slow.mp4"):
            if victim is None and cmdline(worker).startswith("ray::segment-shard"):
                time.sleep(0.5)  # well inside the task: it has been decoding for a while
                if pid_alive(worker) and pid_alive(ffmpeg_pid):
                    victim, decoder = worker, ffmpeg_pid
                    _kill([worker])
            elif victim is not None and worker != victim:
                retried_by.add(worker)
        time.sleep(0.1)
    out = _finish(proc)
    assert victim is not None, "never saw a segment shard decoding slow.mp4 to kill"
    assert "Completed" in out, out[-4000:]
    # The killed worker's decoder went with it (its pipe closed), nothing of it is left.
    deadline = time.monotonic() + 15
    while pid_alive(decoder) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(decoder), cmdline(decoder)
    # The task ran again: a second worker decoded slow.mp4, and Prefect saw the task run twice.
    histories = _task_histories(stack, _flow_run_id(out))
    shards = {name: states for name, states in histories.items() if name.startswith("segment-shard")}
    assert any(states.count("Running") >= 2 and states[-1] == "Completed" for states in shards.values()), shards
    assert retried_by or any(states.count("Running") >= 2 for states in shards.values())
    # Complete and without duplicates: byte-identical to the clean run.
    _assert_complete(stack.home, _video_ids(dataset))
    assert (stack.home / "tables" / "events.arrow").read_bytes() == baseline


# ----------------------------------------------------------------------------------------------
# b: the Prefect worker killed mid-flow, then the flow rerun


def test_prefect_worker_killed_mid_flow_then_rerun_reuses_finished_items(stack, dataset, baseline, tmp_path):
    # The same videos plus two new ones (one slow): a rerun must compute only those two.
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    template = tmp_path / "more"
    sample_data.generate(template, videos=1, seed=4, width=64, height=64, fps=8)
    shutil.copyfile(template / "videos" / "eq4_0000.mp4", data / "videos" / "eq4_0000.mp4")
    shutil.copyfile(dataset / "videos" / "slow.mp4", data / "videos" / "slow2.mp4")
    tables = {p: p.read_bytes() for p in (stack.home / "tables").rglob("*.arrow")}
    old_videos = read_table(stack.home / "tables" / "videos.arrow", schemas.VIDEOS)

    worker = stack.record("prefect-worker")
    assert _starttime(worker["pid"]) == worker["starttime"]
    others = {name: pid for name, pid in stack.pids().items() if name != "prefect-worker"}
    proc = _deploy(stack, data)
    killed: set[int] = set()
    try:
        while proc.poll() is None and not killed:
            if _decoding(stack, "slow2.mp4"):  # ingest is committed, segment is mid-shard
                killed = process_family([worker["pid"]])  # the worker and the flow-run process it started
                assert any("prefect.engine" in cmdline(p) or "workspace_supervisor" in cmdline(p) for p in killed), \
                    {p: cmdline(p) for p in killed}
                _kill(killed)
                killed_at = time.monotonic()
            time.sleep(0.1)
        assert killed, f"the flow ended before segment decoded slow2.mp4:\n{_finish(proc)[-3000:]}"
    finally:
        if proc.poll() is None:  # our `--watch` client: it would wait for a flow run nobody runs now
            proc.kill()
        out = proc.communicate()[0]
    run_id = _flow_run_id(out)

    # The segment work of the dead flow run stops too (Ray ends the tasks of a dead driver).
    deadline = time.monotonic() + 60
    while _decoding(stack, "slow2.mp4") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _decoding(stack, "slow2.mp4"), "a segment shard of the killed flow run kept running"
    # Nothing half-written: segment committed nothing, its tables are their previous versions.
    after = {p: p.read_bytes() for p in (stack.home / "tables").rglob("*.arrow")}
    assert after[stack.home / "tables" / "events.arrow"] == baseline
    assert after[stack.home / "tables" / "rejects" / "segment.arrow"] == tables[stack.home / "tables" / "rejects" / "segment.arrow"]
    for path in after:
        read_table(path, schemas.ALL[path.stem if path.parent.name == "tables" else "rejects"])
    assert not list((stack.home / "tables").rglob("*.tmp"))
    # ingest had finished before the kill: its tables are the new folder's, whole.
    new_videos = read_table(stack.home / "tables" / "videos.arrow", schemas.VIDEOS)
    assert new_videos.num_rows == old_videos.num_rows + 2

    # `marc up` starts what is missing (the worker) and nothing else; the rerun completes.
    stack.up("--no-deploy")
    assert {name: pid for name, pid in stack.pids().items() if name != "prefect-worker"} == others
    assert stack.pids()["prefect-worker"] != worker["pid"]
    out = _finish(_deploy(stack, data))
    assert "Completed" in out, out[-4000:]
    rerun = _flow_run_id(out)
    metrics = _stage_metrics(stack, rerun, "segment")
    assert (metrics["computed"], metrics["reused"], metrics["removed"]) == (2, len(_video_ids(dataset)), 0), metrics
    events = _assert_complete(stack.home, _video_ids(data))
    before = {e["event_key"]: e for e in _rows(baseline)}
    assert all(e == before[e["event_key"]] for e in events if e["event_key"] in before)  # reused rows untouched
    # What Prefect knows of the killed run: no heartbeat came after the kill, so the automation `marc up`
    # created (infra/prefect_setup.py) marks it Crashed; the completed rerun, which sent heartbeats too, stays
    # Completed. Heartbeats come every 30 s: Crashed within ZOMBIE_AFTER_S + 30 s + the server's evaluation.
    deadline = killed_at + ZOMBIE_AFTER_S + 30 + 60
    while (state := _flow_run(stack, run_id)["state"])["type"] != "CRASHED" and time.monotonic() < deadline:
        time.sleep(2)
    print(f"\nkilled flow run {run_id}: {state['type']} {time.monotonic() - killed_at:.0f} s after the kill: "
          f"{state.get('message')}")
    assert state["type"] == "CRASHED" and "No heartbeat" in (state.get("message") or ""), state
    # Runs that ended normally keep their state, however long ago their last heartbeat was.
    states = {r["id"]: r["state_type"] for r in requests.post(f"{_api(stack)}/flow_runs/filter", json={},
                                                               timeout=30).json()}
    assert states[rerun] == "COMPLETED" and len(states) > 2, states
    assert [i for i, s in states.items() if s == "CRASHED"] == [run_id], states


# ----------------------------------------------------------------------------------------------
# c: MLflow down when a flow starts


def test_mlflow_down_fails_fast_naming_the_uri_then_rerun_succeeds(stack, dataset, baseline):
    uri = stack.env["MLFLOW_TRACKING_URI"]
    tables = {p: p.read_bytes() for p in (stack.home / "tables").rglob("*.arrow")}
    _stop_service(stack, "mlflow")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{uri}/health", timeout=5)

    started = time.monotonic()
    proc = _deploy(stack, dataset, deployment="ingest")
    out = _finish(proc, timeout=240)
    wall = time.monotonic() - started
    assert proc.returncode != 0, out[-3000:]
    run = _flow_run(stack, _flow_run_id(out))
    message = run["state"]["message"] or ""
    assert run["state"]["type"] == "FAILED", run["state"]
    assert uri in message and "not reachable" in message, message
    # Fast: it failed on its first MLflow call, before any stage (no retries, no waiting).
    assert run["total_run_time"] < 30, run["total_run_time"]
    print(f"\nMLflow down: flow run failed in {run['total_run_time']:.1f} s of run time ({wall:.0f} s wall "
          f"incl. scheduling): {message[:200]}")
    assert not _task_histories(stack, run["id"]), "a stage task ran without tracking"
    assert {p: p.read_bytes() for p in (stack.home / "tables").rglob("*.arrow")} == tables

    # MLflow up again (same port, same SQLite store): the same deployment succeeds.
    mlflow_before = stack.record("mlflow")["pid"]
    stack.up("--no-deploy")
    assert stack.record("mlflow")["pid"] != mlflow_before
    assert requests.get(f"{uri}/health", timeout=10).status_code == 200
    out = _finish(_deploy(stack, dataset, deployment="ingest"))
    assert "Completed" in out, out[-3000:]
    rerun = _flow_run_id(out)
    parents = [r for r in _mlflow_runs(stack) if _tags(r).get("prefect.flow_run_id") == rerun]
    assert [r["info"]["status"] for r in parents if _tags(r).get("marc.kind") == "pipeline"] == ["FINISHED"]


# ----------------------------------------------------------------------------------------------
# d: disk full under MARC_HOME


@pytest.fixture()
def tiny_home():
    """A 2 MiB tmpfs as MARC_HOME (root only); always unmounted again."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    home = Path(tempfile.mkdtemp(prefix="mq-", dir="/tmp"))
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(home)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        home.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield home
    finally:
        for _ in range(10):
            if subprocess.run(["umount", str(home)], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(home)], check=True)
        home.rmdir()


def _fill(home: Path, leave: int) -> Path:
    """Fill the file system of `home`, then give back `leave` bytes."""
    filler = home / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _ingest_and_segment(data: Path, home: Path):
    workspace = Workspace(home)
    return segment.run(CONFIG, ingest.run(CONFIG, data, workspace).videos, workspace)


TABLES = {"videos": "tables/videos.arrow", "questions": "tables/questions.arrow",
          "rejects-ingest": "tables/rejects/ingest.arrow", "events": "tables/events.arrow",
          "rejects-segment": "tables/rejects/segment.arrow"}
SCHEMAS = {"videos": schemas.VIDEOS, "questions": schemas.QUESTIONS, "rejects-ingest": schemas.REJECTS,
           "events": schemas.EVENTS, "rejects-segment": schemas.REJECTS}


def test_disk_full_gives_a_clear_error_and_keeps_every_table(tiny_home, tmp_path):
    data = tmp_path / "data"
    sample_data.generate(data, videos=3, seed=1, width=64, height=64, fps=8)
    _ingest_and_segment(data, tiny_home)
    previous = {name: (tiny_home / rel).read_bytes() for name, rel in TABLES.items()}
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tiny_home, snapshot)

    # New input: two more videos with their questions (more rows, more keyframes to write).
    more = tmp_path / "more"
    sample_data.generate(more, videos=2, seed=2, width=64, height=64, fps=8)
    for video in (more / "videos").glob("*.mp4"):
        shutil.copyfile(video, data / "videos" / video.name)
    with open(data / "questions.jsonl", "ab") as out:
        out.write((more / "questions.jsonl").read_bytes())

    failed_at = set()
    for leave in (0, 4096, 16384, 49152, 131072):  # each runs out of space at another write
        for entry in tiny_home.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        shutil.copytree(snapshot, tiny_home, dirs_exist_ok=True)
        filler = _fill(tiny_home, leave)
        with pytest.raises(DiskFullError) as caught:
            _ingest_and_segment(data, tiny_home)
        message = str(caught.value)
        assert "No space left on device" in message and str(tiny_home) in message and "previous version" in message
        failed_at.add(re.search(r"writing (\S+):", message).group(1))
        filler.unlink()
        # Every table reads and validates; ingest's three are one commit (all previous or all new);
        # events are the previous version, and every keyframe they name is there and decodes.
        now = {name: (tiny_home / rel).read_bytes() for name, rel in TABLES.items()}
        for name, rel in TABLES.items():
            read_table(tiny_home / rel, SCHEMAS[name])
        ingest_kept = [now[n] == previous[n] for n in ("videos", "questions")]
        assert ingest_kept in ([True, True], [False, False]), (leave, message)
        assert now["events"] == previous["events"], (leave, message)
        for event in read_table(tiny_home / TABLES["events"], schemas.EVENTS).to_pylist():
            for keyframe in event["keyframes"]:
                assert cv2.imread(keyframe) is not None, keyframe
        assert not list(tiny_home.rglob("*.tmp")), "a temp file was left behind"
    assert len(failed_at) >= 3, failed_at  # ingest's and segment's writes were both hit

    # Space again: the rerun completes, reusing the 3 videos the previous events table holds.
    result = _ingest_and_segment(data, tiny_home)
    assert (result.counts["computed"], result.counts["reused"]) == (2, 3), result.counts
    events = _assert_complete(tiny_home, {f"videos/{p.name}" for p in (data / "videos").glob("*.mp4")})
    # The same events as one undisturbed run on a roomy disk.
    _ingest_and_segment(data, tmp_path / "roomy")
    spans = lambda rows: sorted((e["event_key"], e["start_frame"], e["end_frame"], e["fingerprint"]) for e in rows)
    assert spans(events) == spans(_events(tmp_path / "roomy"))
