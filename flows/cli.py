"""`marc`: the command line of the pipeline.

    marc up | down | status | env        the local stack (Prefect, MLflow, Ray on 127.0.0.1)
    marc deploy                          register the deployments of prefect.yaml
    marc run [--stage S] [--data DIR]    trigger a deployment, watch it, exit non-zero on failure
    marc sample-data DIR                 generate the EventQA sample set
    marc show TABLE                      print a pipeline table from MARC_HOME
    marc answer VIDEO "QUESTION"         answer a question about a video with the trained student
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from infra import stack
from infra.home import PROJECT_ROOT, marc_home, sample_data_dir

SHOWABLE = ("videos", "questions", "events", "rejects")


def _use_stack_env() -> dict[str, str]:
    """Point this process's Prefect/MLflow clients at the running stack (explicit env vars win)."""
    env = stack.client_env()
    for key, value in env.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("DO_NOT_TRACK", "1")  # no telemetry notice (and nothing to send it to here)
    return env


def cmd_up(args) -> int:
    status = stack.up()
    _print_status(status)
    if not args.no_deploy:
        return cmd_deploy(args)
    return 0


def cmd_down(args) -> int:
    _print_status(stack.down())
    return 0


def cmd_status(args) -> int:
    status = stack.status()
    _print_status(status)
    return 0 if all(s.running for s in status.services) else 3


def cmd_env(args) -> int:
    for key, value in stack.client_env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_deploy(args) -> int:
    env = {**os.environ, **stack.client_env(), "MARC_PROJECT_DIR": str(PROJECT_ROOT)}
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.run([str(prefect), "--no-prompt", "deploy", "--all"], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        print(f"marc deploy: `prefect deploy --all` failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode
    print("deployments registered from prefect.yaml: run `prefect deployment ls` to list them")
    return 0


def cmd_run(args) -> int:
    _use_stack_env()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
    from prefect.deployments import run_deployment

    from flows.progress import terminal_bar

    deployment = f"marc/{args.stage or 'full-pipeline'}"
    parameters = {"preset": args.preset, "force": args.force}
    if args.data:
        parameters["data_dir"] = str(Path(args.data).resolve())
    run = run_deployment(name=deployment, parameters=parameters, timeout=0)
    print(f"{deployment}: flow run {run.name} ({run.id})")
    if args.no_wait:
        return 0
    last_state, drew_bar = None, False
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run.id)
            state = run.state.name if run.state else "Unknown"
            if state != last_state:
                if drew_bar:
                    sys.stderr.write("\n")
                    drew_bar = False
                print(f"{time.strftime('%H:%M:%S')} {deployment}: {state}")
                last_state = state
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), type=ArtifactFilterType(any_=["progress"])))
            if artifacts and sys.stderr.isatty():
                latest = max(artifacts, key=lambda a: a.updated or a.created)
                terminal_bar(latest.description or latest.key or "progress", float(latest.data or 0) / 100)
                drew_bar = True
            if run.state and run.state.is_final():
                break
            time.sleep(1.0)
    if drew_bar:
        sys.stderr.write("\n")
    ok = run.state.is_completed()
    print(f"{deployment}: {'completed' if ok else 'FAILED: ' + (run.state.message or state)}")
    return 0 if ok else 1


def cmd_sample_data(args) -> int:
    from stages import sample_data

    from infra.presets import load_preset

    preset = load_preset(args.preset).sample_data
    for name in ("videos", "seed", "width", "height", "fps", "test_fraction"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    out = Path(args.dir) if args.dir else sample_data_dir()

    def progress(done: int, total: int) -> None:
        print(f"\rsample-data: {done}/{total} videos", end="" if done < total else "\n", file=sys.stderr, flush=True)

    summary = sample_data.generate(out, videos=args.videos, seed=args.seed, width=args.width, height=args.height,
                                   fps=args.fps, test_fraction=args.test_fraction, progress=progress)
    print(f"EventQA sample set in {summary.out_dir}: {summary.videos} videos, {summary.events} events, "
          f"{summary.questions} questions ({summary.train_questions} train, {summary.test_questions} test)")
    return 0


def cmd_show(args) -> int:
    from data_contracts import schemas
    from stages.common.arrow_io import read_table
    from stages.common.workspace import Workspace

    import pyarrow as pa

    workspace = Workspace(marc_home())
    if args.table == "rejects":
        parts = [read_table(p, schemas.REJECTS) for p in sorted((workspace.tables / "rejects").glob("*.arrow"))]
        table = pa.concat_tables(parts) if parts else schemas.REJECTS.empty_table()
    else:
        path = workspace.table(args.table)
        if not path.is_file():
            print(f"marc show: no {args.table} table yet ({path} does not exist); run the pipeline first", file=sys.stderr)
            return 2
        table = read_table(path, schemas.ALL.get(args.table))
    rows = table.to_pylist()
    for condition in args.where or []:
        column, _, value = condition.partition("=")
        if column not in table.column_names:
            print(f"marc show: no column {column!r} in {args.table} (columns: {', '.join(table.column_names)})",
                  file=sys.stderr)
            return 2
        rows = [r for r in rows if str(r[column]) == value]
    if args.format == "jsonl":
        for row in rows:
            print(json.dumps(row, default=str, ensure_ascii=False))
    else:
        _print_table(table.column_names, rows)
    return 0


def resolve_student(model: str | None) -> tuple[Path, str]:
    """(student folder, where it came from): --model, else the registered `marc-student` (MLflow),
    else the last student trained in MARC_HOME."""
    from stages.common.workspace import Workspace
    from stages.train.stage import latest_student

    if model:
        return Path(model).expanduser().resolve(), "--model"
    from infra import tracking

    try:
        _use_stack_env()
        found = tracking.download_registered_model("marc-student", marc_home() / "cache" / "models")
        if found:
            return found[0], f"registered model marc-student version {found[1]}"
    except tracking.TrackingUnavailable:
        pass  # no tracking server: the local run folder is as good
    trained = latest_student(Workspace(marc_home()))
    if trained:
        return trained[0], f"last trained student in {marc_home()}"
    raise FileNotFoundError("no trained student: model marc-student is not registered and MARC_HOME "
                            f"({marc_home()}) holds no trained student; run the pipeline first (`marc run`) "
                            "or pass --model DIR")


def cmd_answer(args) -> int:
    from infra.presets import load_preset
    from stages import answer as answering
    from stages.common.workspace import Workspace
    from stages.embed.train import latest_checkpoint

    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    config = load_preset(args.preset)
    try:
        student, source = resolve_student(args.model)
        with contextlib.redirect_stdout(sys.stderr):  # stage chatter (embed's throughput) off the answer's stdout
            result = answering.answer(config, marc_home(), Path(args.video), args.question, args.options, student,
                                      latest_checkpoint(Workspace(marc_home())))
    except answering.AnswerError as exc:
        print(f"marc answer: {exc}", file=sys.stderr)
        return 2
    print(f"answer: {result.answer}" + (f"  ({result.option})" if result.option else ""))
    print(f"student: {student} ({source})")
    print(f"completion: {result.completion}")
    print(f"retrieved events ({'memory built now' if result.new_video else 'memory reused'}; "
          f"{result.cached_events}/{len(result.events)} events' features cached):")
    for e in result.events:
        print(f"  event {e['event_index']:>3}  {e['start_time']:8.2f}s - {e['end_time']:8.2f}s  "
              f"score {e['score']:.3f}  rank {e['rank'] + 1}")
    print(f"visual tokens: {result.visual_tokens}")
    print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))
    return 0


def _print_table(columns: list[str], rows: list[dict], width: int = 40) -> None:
    def cell(value) -> str:
        text = "" if value is None else str(value)
        return text if len(text) <= width else text[: width - 1] + "…"

    widths = [max([len(c)] + [len(cell(r[c])) for r in rows]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(cell(row[c]).ljust(w) for c, w in zip(columns, widths)))
    print(f"({len(rows)} rows)")


def _print_status(status) -> None:
    for s in status.services:
        where = s.url or ""
        state = "running" if s.running else "stopped"
        origin = " (external)" if s.external else (f" pid {s.pid}" if s.pid else "")
        print(f"{s.name:<16} {state:<8} {where}{origin}{('  ' + s.detail) if s.detail else ''}")
    env = status.env
    running = {s.name for s in status.services if s.running}
    if "PREFECT_API_URL" in env and "prefect-server" in running:
        print(f"Prefect UI: {env['PREFECT_API_URL'].removesuffix('/api')}")
    if "MLFLOW_TRACKING_URI" in env and "mlflow" in running:
        print(f"MLflow UI:  {env['MLFLOW_TRACKING_URI']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local stack and register the deployments")
    up.add_argument("--no-deploy", action="store_true", help="do not register deployments")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop what `marc up` started (by PID)").set_defaults(func=cmd_down)
    sub.add_parser("status", help="what runs and where").set_defaults(func=cmd_status)
    sub.add_parser("env", help="print export lines for clients of the stack").set_defaults(func=cmd_env)
    sub.add_parser("deploy", help="register the deployments of prefect.yaml").set_defaults(func=cmd_deploy)

    run = sub.add_parser("run", help="trigger a deployment of flow marc and watch it")
    run.add_argument("--stage", help="run one stage (deployment marc/STAGE) instead of the full pipeline")
    run.add_argument("--data", help="data folder (default: the EventQA sample set under MARC_HOME)")
    run.add_argument("--preset", default="cpu-tiny", help="preset name or YAML path")
    run.add_argument("--force", action="store_true", help="recompute every item")
    run.add_argument("--no-wait", action="store_true", help="trigger and return")
    run.set_defaults(func=cmd_run)

    sample = sub.add_parser("sample-data", help="generate the EventQA sample data set")
    sample.add_argument("dir", nargs="?", help="output folder (default: MARC_HOME/sample-data)")
    sample.add_argument("--preset", default="cpu-tiny", help="preset whose sample_data section gives the defaults")
    sample.add_argument("--videos", type=int)
    sample.add_argument("--seed", type=int)
    sample.add_argument("--width", type=int)
    sample.add_argument("--height", type=int)
    sample.add_argument("--fps", type=int)
    sample.add_argument("--test-fraction", type=float)
    sample.set_defaults(func=cmd_sample_data)

    show = sub.add_parser("show", help="print a pipeline table")
    show.add_argument("table", choices=SHOWABLE)
    show.add_argument("--format", choices=("table", "jsonl"), default="table")
    show.add_argument("--where", action="append", metavar="COL=VALUE", help="keep rows whose COL equals VALUE")
    show.set_defaults(func=cmd_show)

    ans = sub.add_parser("answer", help="answer a question about a video with the trained student")
    ans.add_argument("video", help="a video file")
    ans.add_argument("question", help="the question, e.g. \"What colour is the shape on the blue background?\"")
    ans.add_argument("--options", nargs="+", metavar="OPTION", help='multiple-choice options: "A. red" "B. blue" ...')
    ans.add_argument("--model", help="a student folder (default: registered marc-student, else the last trained)")
    ans.add_argument("--preset", default="cpu-tiny", help="preset for segmentation, retrieval and decoding")
    ans.set_defaults(func=cmd_answer)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (stack.PortInUseError, FileNotFoundError, ValueError) as exc:
        print(f"marc {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
