"""The report as one self-contained HTML page: the figures embedded (base64 PNG), the main columns of the
table, and links to the full CSV / parquet beside it."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Dict, List

from megatron_gndpo.scaling.runs import LEADING

CAPTIONS = {
    "curves.png": "Reward of the training rollouts and greedy validation accuracy against step, one line per arm "
                  "(the mean of its seeds).",
    "throughput.png": "Tokens per second against the number of GPUs (processes); hollow markers: the plan.",
    "step_time.png": "Mean seconds per step by phase, per layout.",
    "accuracy_vs_size.png": "Final validation accuracy against student size, per estimator.",
}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def page(title: str, rows: List[Dict[str, Any]], figures: List[Path], tables: List[str]) -> str:
    shown = [c for c in LEADING if any(r.get(c) is not None for r in rows)]
    axes = sorted({k for r in rows for k in r if k.startswith("axis/")})
    shown = shown[:3] + axes + shown[3:]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = "\n".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in shown) + "</tr>" for r in rows)
    images = "\n".join(
        f'<figure><img alt="{f.name}" src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(CAPTIONS.get(f.name, f.name))}</figcaption></figure>" for f in figures)
    links = ", ".join(f'<a href="{t}">{t}</a>' for t in tables)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}} figure{{display:inline-block;margin:1em}}
img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(rows)} runs. All columns: {links} (defined in <code>docs/scaling.md</code>);
<code>error/*</code> = planned / measured - 1.</p>
<table><tr>{head}</tr>
{body}
</table>
{images}
</body></html>
"""
