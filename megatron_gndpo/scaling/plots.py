"""The report's figures (matplotlib, headless Agg), each a PNG written only when the runs hold its data:

- ``curves.png``: training reward and validation accuracy against step, one line per arm (its seeds averaged);
- ``throughput.png``: tokens/s against GPUs (measured filled, the plan's hollow), one point per run;
- ``step_time.png``: the step-time breakdown (mean seconds per phase) per layout, stacked bars;
- ``accuracy_vs_size.png``: final validation accuracy against student parameters, one line per estimator.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on a cluster or in CI
import matplotlib.pyplot as plt  # noqa: E402

DPI = 90  # small files: the checked-in example report keeps its PNGs in tens of KB


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def mean_by_step(runs: List[List[Dict[str, Any]]], key: str) -> List[tuple]:
    """(step, mean of ``key`` over the runs that logged it at that step), by step."""
    values: Dict[int, List[float]] = defaultdict(list)
    for rows in runs:
        for r in rows:
            if isinstance(r.get(key), (int, float)):
                values[r["step"]].append(r[key])
    return [(step, sum(v) / len(v)) for step, v in sorted(values.items())]


def curves(series: Dict[str, List[List[Dict[str, Any]]]], path: Path) -> Optional[Path]:
    """``series``: arm -> the metrics.jsonl rows of each of its runs (seeds), averaged per step."""
    if not series:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, runs in series.items():
        label = arm if len(runs) == 1 else f"{arm} ({len(runs)} seeds)"
        train = mean_by_step(runs, "reward")
        val = mean_by_step(runs, "val/acc")
        line, = left.plot(*zip(*train), label=label, lw=1.2) if train else (None,)
        if val:
            right.plot(*zip(*val), marker="o", ms=3, lw=1.2, label=label, color=line.get_color() if line else None)
    left.set(xlabel="step", ylabel="reward (training rollouts)", title="reward")
    right.set(xlabel="step", ylabel="val/acc (greedy)", title="validation accuracy")
    left.legend(fontsize=7)
    return _save(fig, path)


def throughput(rows: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    points = [r for r in rows if r.get("gpus") and r.get("tokens_per_s")]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in points:
        dots = ax.plot(r["gpus"], r["tokens_per_s"], "o")[0]
        ax.annotate(r["cell"], (r["gpus"], r["tokens_per_s"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
        if r.get("plan/tokens_per_s_per_gpu"):
            ax.plot(r["gpus"], r["plan/tokens_per_s_per_gpu"] * r["gpus"], "o", mfc="none",
                    color=dots.get_color())
    gpu = next((r["plan/gpu"] for r in points if r.get("plan/gpu")), None)
    ax.set(xlabel="GPUs (processes)", ylabel="tokens/s (prompt + response)", yscale="log",
           title="throughput" + (f"; hollow: the plan on {gpu}" if gpu else ""))
    ax.set_xticks(sorted({r["gpus"] for r in points}))
    return _save(fig, path)


def layout_name(row: Dict[str, Any]) -> str:
    return f"TP{row.get('tp')} PP{row.get('pp')} DP{row.get('dp') if row.get('dp') is not None else '?'}"


def step_time(rows: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Mean over the runs of each layout; the phases are the trainer's ``time/*_s`` other than the step."""
    phases = sorted({k for r in rows for k in r if k.startswith("time/") and k != "time/step_s"})
    if not phases:
        return None
    by_layout: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_layout[layout_name(r)].append(r)
    names = sorted(by_layout)
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) + 3), 4))
    bottom = [0.0] * len(names)
    for phase in phases:
        heights = [sum(r.get(phase, 0.0) for r in by_layout[n]) / len(by_layout[n]) for n in names]
        ax.bar(names, heights, bottom=bottom, label=phase[len("time/"):-len("_s")])
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set(ylabel="seconds per step (mean)", title="step time by phase, per layout")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    return _save(fig, path)


def accuracy_vs_size(rows: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    metric = "final/val/acc" if any(r.get("final/val/acc") is not None for r in rows) else "final/acc"
    points = [r for r in rows if r.get("student_parameters") and r.get(metric) is not None]
    if not points:
        return None
    groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for r in points:
        groups[str(r.get("estimator"))].append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    for estimator, group in sorted(groups.items()):
        sizes = sorted({r["student_parameters"] for r in group})
        # runs of one size (other layouts, seeds) are averaged: the layout should not change the result
        means = [sum(r[metric] for r in group if r["student_parameters"] == s)
                 / sum(1 for r in group if r["student_parameters"] == s) for s in sizes]
        ax.plot(sizes, means, "o-", label=estimator)
        ax.plot([r["student_parameters"] for r in group], [r[metric] for r in group], ".", color="gray", ms=4)
    ax.set(xscale="log", xlabel="student parameters", ylabel=metric,
           title="final accuracy against student size (grey: single runs)")
    ax.legend()
    return _save(fig, path)
