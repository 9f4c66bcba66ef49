"""The evaluation report: report.json (for scripts), report.md and its plots (for people).

    write(payload, reports_root, report_id, curves) -> (report_dir, latest_dir, markdown)

Files of one report: report.json, report.md, accuracy_vs_tokens.png, latency.png and, when the
C-GRPO run's metrics are known, training.png (reward and eta against steps). `reports/latest/` is
replaced by a copy of the newest report as a whole (written aside, then renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

LATENCY_PARTS = ("vision", "prefill", "generation", "end_to_end")


def training_curves(train_run: str | Path | None) -> list[dict]:
    """The C-GRPO run's per-step metrics (metrics.jsonl), [] when unknown."""
    if not train_run:
        return []
    from stages.train.engine import read_metrics

    return read_metrics(Path(train_run))


def _pct(x) -> str:
    return "–" if x is None else f"{x:.1%}"


def _num(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cost_table(payload: dict) -> list[str]:
    lines = ["", f"## Cost per question (batch 1, {payload['profile_questions']} questions, "
              f"{payload['decoding']['latency_new_tokens']} new tokens for every arm, "
              f"{payload.get('threads')} torch threads)", "",
              "| arm | peak forward memory (MB) | vision (ms) | prefill (ms) | generation (ms) | end to end (ms) |",
              "|---|---|---|---|---|---|"]
    for name, a in payload["arms"].items():
        lat, peak = a["latency_s"], a["peak_forward_bytes"]
        lines.append(f"| `{name}` | {_num(peak / 2**20 if peak is not None else None)} | "
                     + " | ".join(_num(1000 * lat[k] if k in lat else None, 1) for k in LATENCY_PARTS) + " |")
    return lines


def markdown(payload: dict, images: list[str]) -> str:
    arms = payload["arms"]
    families = sorted({f for a in arms.values() for f in a["accuracy"] if f != "overall"})
    lines = [
        f"# MARC evaluation: preset `{payload['preset']}`",
        "",
        f"{payload['questions']} test questions ({payload.get('data') or 'the pipeline data set'}); "
        f"decoding: temperature {payload['decoding']['temperature']}, at most {payload['decoding']['max_new_tokens']} "
        f"new tokens; device {payload['device']}. Baseline: `{payload['baseline']}`. "
        f"Left out: {payload['left_out']}.",
        "",
        "## Accuracy and visual tokens",
        "",
        "| arm | " + " | ".join(families) + " | overall | format | visual tokens | tokens vs baseline | retention |",
        "|---|" + "---|" * len(families) + "---|---|---|---|---|",
    ]
    for name, a in arms.items():
        lines.append(f"| {a['label']} (`{name}`) | " + " | ".join(_num(a["accuracy"].get(f)) for f in families)
                     + f" | {_num(a['accuracy']['overall'])} | {_pct(a['format_rate'])} | {a['visual_tokens']:.1f}"
                     + f" | {_pct(a['visual_token_ratio'])} | {_pct(a['retention'].get('overall'))} |")
    lines += ["", "Retention per family (accuracy / baseline accuracy):", "",
              "| arm | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for name, a in arms.items():
        lines.append(f"| `{name}` | " + " | ".join(_pct(a["retention"].get(f)) for f in families) + " |")
    if payload["profile_questions"]:
        lines += _cost_table(payload)
    if payload["goals"]:
        lines += ["", "## Goals (issue #7, C-GRPO student)", ""]
        for g in payload["goals"]:
            lines.append(f"- {'MET' if g['met'] else 'MISSED'}: {g['goal']} (measured {_num(g['value'], 3)})")
    if images:
        lines += ["", "## Plots", ""] + [f"![{Path(i).stem}]({i})" for i in images]
    return "\n".join(lines) + "\n"


def plot(payload: dict, curves: list[dict], out_dir: Path) -> list[str]:
    """PNG plots into out_dir; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # no display; never opens a window
    import matplotlib.pyplot as plt

    arms, names = payload["arms"], []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points: dict[tuple[float, float], list[str]] = {}
    for name, a in arms.items():  # arms at the same point share one label, one name per line
        points.setdefault((a["visual_tokens"], round(a["accuracy"]["overall"], 3)), []).append(name)
    for (x, y), group in points.items():
        ax.scatter(x, y, s=40)
        ax.annotate("\n".join(group), (x, y), fontsize=8, xytext=(5, 3), textcoords="offset points", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens per question (log)")
    ax.set_ylabel("accuracy (overall)")
    ax.set_title("Accuracy against visual tokens")
    ax.grid(alpha=0.3)
    names.append(_save(fig, out_dir, "accuracy_vs_tokens.png"))

    profiled = [n for n, a in arms.items() if a["latency_s"]]
    if profiled:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        bottom = [0.0] * len(profiled)
        # generation = vision + prefill + decode: stack the three disjoint parts, then the frame decoding
        parts = {"vision": lambda l: l["vision"], "prefill": lambda l: l["prefill"],
                 "decode": lambda l: max(l["generation"] - l["vision"] - l["prefill"], 0.0),
                 "frames + inputs": lambda l: max(l["end_to_end"] - l["generation"], 0.0)}
        for label, part in parts.items():
            values = [1000 * part(arms[n]["latency_s"]) for n in profiled]
            ax.barh(profiled, values, left=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xlabel("ms per question (batch 1)")
        ax.set_title("Latency, end to end, by part")
        ax.legend(fontsize=8)
        names.append(_save(fig, out_dir, "latency.png"))

    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in curves]
        for key in ("reward", "eta/mean", "reward/accuracy/mean"):
            values = [r.get(key) for r in curves]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], label=key)
        ax.set_xlabel("C-GRPO step")
        ax.set_title("Training: reward and eta")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        names.append(_save(fig, out_dir, "training.png"))
    return names


def _save(fig, out_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)  # 7 in wide: 770 px (the browser test looks for that width)
    plt.close(fig)
    return name


def write(payload: dict, reports_root: Path, report_id: str | None, curves: list[dict]
          ) -> tuple[Path, Path, str]:
    """Write one report folder and replace `latest/` with a copy of it."""
    reports_root = Path(reports_root)
    report_id = report_id or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = reports_root / report_id
    tmp = reports_root / f".{report_id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    images = plot(payload, curves, tmp)
    payload = {**payload, "report_id": report_id, "plots": images}
    (tmp / "report.json").write_text(json.dumps(payload, indent=1))
    text = markdown(payload, images)
    (tmp / "report.md").write_text(text)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    latest, staged, old = reports_root / "latest", reports_root / f".latest.new-{os.getpid()}", \
        reports_root / f".latest.old-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(out, staged)
    if latest.exists():
        os.replace(latest, old)
    os.replace(staged, latest)
    shutil.rmtree(old, ignore_errors=True)
    return out, latest, text
