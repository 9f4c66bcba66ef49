"""Real browser: headless Debian chromium opens the MLflow and Prefect UIs of a finished run (issue #8, part 4).

The run is the ci-tiny `marc/full-pipeline` run of tests/two_node.py (shared with test_scale_out.py).
Both UIs are JavaScript single-page apps: the test drives chromium over the Chrome DevTools Protocol
(`--remote-debugging-port` on 127.0.0.1, a websocket), waits until the rendered page text shows what
a user looks for, and saves screenshots under the test's tmp dir and under MARC_TEST_ARTIFACTS
(default /tmp/marc-test-artifacts/browser).

Chromium comes from Debian: the `chromium_bin` fixture installs it with apt-get when it is missing
(as root, or with passwordless sudo) and skips, saying why, only where that is impossible.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import free_port, listeners_of, pid_alive, process_family
from two_node import mlflow_api

pytestmark = pytest.mark.integration

ARTIFACTS = Path(os.environ.get("MARC_TEST_ARTIFACTS", "/tmp/marc-test-artifacts")) / "browser"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
STAGES = ("ingest", "segment", "embed-train", "embed", "retrieve", "warmup", "rollout", "train", "warmup-student",
          "evaluate")
PREFECT_TASKS = ("sample-data", "ingest", "segment-plan", "segment-shard", "segment-commit", "embed-train", "embed",
                 "retrieve", "warmup", "rollout", "train", "evaluate")


# ----------------------------------------------------------------------------------------------
# Chromium from Debian


def _find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def install_chromium(timeout: float = 1200) -> tuple[str | None, str]:
    """`apt-get install -y --no-install-recommends chromium` (with `apt-get update` when the first try
    fails); returns (path or None, why not)."""
    found = _find_chromium()
    if found:
        return found, ""
    if shutil.which("apt-get") is None:
        return None, "no apt-get on this machine (not Debian/Ubuntu): install chromium yourself"
    if os.geteuid() == 0:
        sudo: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        sudo = ["sudo", "-n"]
    else:
        return None, "not root and no passwordless sudo: run `apt-get install chromium` as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    log = ""
    for step in ([install], [[*sudo, "apt-get", "update"], install]):
        for cmd in step:
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return None, f"{' '.join(cmd)} did not finish within {timeout:.0f} s"
            log = f"{' '.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"
            if proc.returncode != 0:
                break
        found = _find_chromium()
        if found:
            return found, ""
    return None, f"chromium could not be installed from the Debian mirrors: {log}"


@pytest.fixture(scope="session")
def chromium_bin() -> str:
    path, why = install_chromium()
    if path is None:
        pytest.skip(f"real-browser test skipped: {why}")
    return path


# ----------------------------------------------------------------------------------------------
# A headless chromium driven over the DevTools protocol


class Browser:
    """Headless chromium (no sandbox, no background networking, no proxy, DevTools on 127.0.0.1 only)."""

    def __init__(self, binary: str, profile: Path, width: int = 1600, height: int = 1200):
        from websockets.sync.client import connect

        self.profile = profile
        port = free_port()
        argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                "--disable-extensions", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                "--no-proxy-server", "--metrics-recording-only", "--mute-audio", "--hide-scrollbars",
                f"--window-size={width},{height}", "--remote-debugging-address=127.0.0.1",
                f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"]
        self.log = open(profile.parent / "chromium.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.http = requests.Session()
        self.http.trust_env = False
        deadline, targets = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited {self.proc.returncode}: {self._log_tail()}")
            try:
                targets = [t for t in self.http.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                           if t.get("type") == "page"]
            except (requests.RequestException, ValueError):
                targets = []
            if targets:
                break
            time.sleep(0.5)
        if not targets:
            self.close()
            raise RuntimeError(f"chromium's DevTools did not answer on 127.0.0.1:{port}: {self._log_tail()}")
        self.port = port
        self.ws = connect(targets[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _log_tail(self) -> str:
        try:
            return (self.profile.parent / "chromium.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method} within {timeout} s")
            message = json.loads(self.ws.recv(timeout=left))
            if message.get("id") == msg_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, needles: list[str], timeout: float = 120) -> str:
        """Poll the rendered text until every needle shows; fail listing what is missing."""
        deadline, text = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            try:
                text = self.text()
            except RuntimeError:  # navigating: the context is being replaced
                text = ""
            if all(n in text for n in needles):
                return text
            time.sleep(1)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"not visible after {timeout:.0f} s: {missing}\n--- page text ---\n{text[:4000]}")

    def screenshot(self, path: Path) -> Path:
        time.sleep(1)  # let the last render settle
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        family = process_family({self.proc.pid})
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for pid in family | process_family({self.proc.pid}):
            if pid_alive(pid):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=10)
        self.http.close()
        self.log.close()


@pytest.fixture
def browser(chromium_bin, tmp_path):
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path))
    b = Browser(chromium_bin, profile)
    try:
        off = [(pid, addr, port) for pid, addr, port in listeners_of({b.proc.pid}) if addr != "127.0.0.1"]
        assert not off, f"chromium listens off loopback: {off}"
        yield b
    finally:
        b.close()


def _keep(path: Path) -> Path:
    """Copy a screenshot to the artifacts folder, where it outlives pytest's tmp dirs."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kept = ARTIFACTS / path.name
    shutil.copy2(path, kept)
    print(f"screenshot: {kept}")
    return kept


# ----------------------------------------------------------------------------------------------
# The checks


def _links(browser: Browser, fragment: str) -> dict[str, str]:
    """Rendered links whose href contains `fragment`: href -> visible text."""
    return browser.eval(
        "Object.fromEntries(Array.from(document.querySelectorAll('a[href]'))"
        f".filter(a => a.getAttribute('href').includes({json.dumps(fragment)}))"
        ".map(a => [a.getAttribute('href'), a.innerText.trim()]))") or {}


def _wait_links(browser: Browser, fragment: str, want: dict[str, str], timeout: float = 60) -> dict[str, str]:
    """Wait until a link to every run id in `want` (run id -> name) shows with that name."""
    deadline, found = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        found = {m.group(1): text for href, text in _links(browser, fragment).items()
                 if (m := re.search(r"/runs/([0-9a-f]{32})", href))}
        if all(found.get(run_id) == name for run_id, name in want.items()):
            return found
        time.sleep(1)
    missing = {run_id: name for run_id, name in want.items() if found.get(run_id) != name}
    raise AssertionError(f"links not shown: {missing}\nshown: {found}\n--- page text ---\n{browser.text()[:3000]}")


def _finished(run) -> None:
    assert run.watch.returncode == 0 and run.parent, (run.watch.stdout + run.watch.stderr)[-3000:]


def test_mlflow_ui_shows_the_run_its_stage_runs_metrics_and_the_registered_model(two_node_run, browser, tmp_path):
    run = two_node_run
    _finished(run)
    ui, eid = run.mlflow_uri, run.experiment_id
    parent_id, parent_name = run.parent["info"]["run_id"], run.parent["info"]["run_name"]
    children = {r["info"]["run_id"]: stage for stage, r in run.children.items()}
    assert sorted(children.values()) == sorted(STAGES)
    train_id = run.children["train"]["info"]["run_id"]
    shots = []

    # The experiment's runs table: the parent run, expanded to its nested stage runs.
    browser.goto(f"{ui}/#/experiments/{eid}/runs")
    browser.wait_for_text(["Training runs", parent_name, f"{1 + len(STAGES)} matching runs"])
    _wait_links(browser, "/runs/", {parent_id: parent_name})
    assert browser.eval("(() => { const b = document.querySelector("
                        "'button[data-component-id*=\"runnamecellrenderer\"]'); if (b) b.click(); return !!b; })()"), \
        "no expander on the parent run's row"
    _wait_links(browser, "/runs/", {parent_id: parent_name, **children})
    shots.append(browser.screenshot(tmp_path / "mlflow-runs.png"))

    # The parent run's page: finished, with a link to every stage run.
    browser.goto(f"{ui}/#/experiments/{eid}/runs/{parent_id}")
    browser.wait_for_text([parent_name, "Finished", "Child runs", "marc.kind", "pipeline"])
    _wait_links(browser, "/runs/", children)
    shots.append(browser.screenshot(tmp_path / "mlflow-parent-run.png"))

    # The train stage run: its metrics (TRL's names) and the model it registered.
    metrics = {m["key"] for m in run.children["train"]["data"]["metrics"]}
    assert {"loss", "kl", "reward", "clip_ratio", "frac_reward_zero_std"} <= metrics
    browser.goto(f"{ui}/#/experiments/{eid}/runs/{train_id}")
    browser.wait_for_text(["train", "Finished", f"Metrics ({len(metrics)})", "loss", "kl", "reward", "clip_ratio",
                           "frac_reward_zero_std", "Parent run", parent_name, "Registered models", "marc-student"])
    shots.append(browser.screenshot(tmp_path / "mlflow-train-run.png"))

    # The registered model `marc-student`, its version made from the train run.
    model = mlflow_api(ui, "registered-models/get", params={"name": "marc-student"})["registered_model"]
    version = model["latest_versions"][0]
    assert version["run_id"] == train_id
    browser.goto(f"{ui}/#/models/marc-student")
    browser.wait_for_text(["Registered Models", "marc-student", f"Version {version['version']}"])
    shots.append(browser.screenshot(tmp_path / "mlflow-model.png"))
    browser.goto(f"{ui}/#/models/marc-student/versions/{version['version']}")
    browser.wait_for_text(["marc-student", f"Version {version['version']}", "Source Run", "train"])
    _wait_links(browser, train_id, {train_id: "train"})
    shots.append(browser.screenshot(tmp_path / "mlflow-model-version.png"))

    for shot in shots:
        assert shot.stat().st_size > 10_000, shot  # a rendered page, not a blank one
        _keep(shot)


def test_prefect_ui_lists_the_stage_tasks_of_the_flow_run(two_node_run, browser, tmp_path):
    run = two_node_run
    _finished(run)
    api, ui = run.prefect_api, run.prefect_api.removesuffix("/api")
    http = requests.Session()
    http.trust_env = False
    flow_run = http.get(f"{api}/flow_runs/{run.flow_run_id}", timeout=30).json()
    deployment = http.get(f"{api}/deployments/{flow_run['deployment_id']}", timeout=30).json()
    assert deployment["name"] == "full-pipeline"
    task_runs = http.post(f"{api}/task_runs/filter", timeout=30,
                          json={"flow_runs": {"id": {"any_": [run.flow_run_id]}}}).json()
    http.close()
    names = sorted(t["name"] for t in task_runs)
    assert {n.rsplit("-", 1)[0] for n in names} == set(PREFECT_TASKS), names

    browser.goto(f"{ui}/runs/flow-run/{run.flow_run_id}")
    browser.wait_for_text([flow_run["name"], "Completed", "full-pipeline", f"{len(names)} Task runs", "Task Runs"])
    assert browser.eval("(() => { const t = document.getElementById('task-runs'); if (t) t.click(); return !!t; })()")
    browser.wait_for_text(names)
    shot = browser.screenshot(tmp_path / "prefect-flow-run.png")
    assert shot.stat().st_size > 10_000
    _keep(shot)


def test_mlflow_ui_shows_the_evaluation_plots_on_the_evaluate_run(two_node_run, browser, tmp_path):
    run = two_node_run
    _finished(run)
    ui, eid = run.mlflow_uri, run.experiment_id
    eval_id = run.children["evaluate"]["info"]["run_id"]
    files = {f["path"] for f in mlflow_api(ui, "artifacts/list", params={"run_id": eval_id, "path": "report"})["files"]}
    assert {"report/report.md", "report/accuracy_vs_tokens.png", "report/latency.png", "report/training.png"} <= files
    for plot in ("accuracy_vs_tokens.png", "latency.png", "training.png"):
        browser.goto(f"{ui}/#/experiments/{eid}/runs/{eval_id}/artifacts/report/{plot}")
        browser.wait_for_text(["evaluate", "report", plot])
        # The artifact viewer renders the PNG itself (an <img>, its src a blob: URL of the downloaded file):
        # wait for a loaded image of the plot's pixel size (matplotlib 7 in wide at 110 dpi = 770 px).
        deadline, images = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            images = browser.eval("Array.from(document.images).map(i => [i.src.slice(0, 120), i.complete,"
                                  " i.naturalWidth, i.naturalHeight])") or []
            if any(done and w == 770 and h > 300 for _, done, w, h in images):
                break
            time.sleep(1)
        assert any(done and w == 770 and h > 300 for _, done, w, h in images), \
            f"{plot} not rendered; images {images}\n{browser.text()[:1500]}"
        shot = browser.screenshot(tmp_path / f"mlflow-evaluate-{plot}")
        assert shot.stat().st_size > 10_000
        _keep(shot)
