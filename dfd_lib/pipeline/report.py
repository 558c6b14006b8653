"""One page per run: ``reports/<run>/index.html`` (:data:`dfd_lib.core.runs.REPORT_PAGE`).

It gathers what the steps left in the run folder — parameters, environment, per-step times,
each step's key numbers (``metrics.json``), tables (``tables/NN_*.csv``) and figures
(``figures/NN_*.png``, grouped by their step number) — and links the executed notebooks, also
rendered to HTML with nbconvert, so a newcomer can read what the run found without opening a
notebook. Figures and tables are grouped by the ``NN_`` prefix of their file names.
"""
from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path

import pandas as pd

from dfd_lib.core import runs
from dfd_lib.core.atomic import atomic_write

log = logging.getLogger(__name__)

STEP_TITLES = {
    "01": "01 · Embeddings and the 2-D map",
    "02": "02 · Clusters and leave-one-cluster-out re-splits",
    "03": "03 · Data enrichment (editing and Stable Diffusion)",
    "04": "04 · Experts, mixture and the headline table",
    "05": "05 · Inference",
}
LEAD_ITEMS = ("04_ladder",)  # figure and table shown first in their step's section, before the key figures and detailed tables
DEMO_CAVEAT = ("This run used the embedded demo dataset: its fakes are made by dfd-kit's own generators over real "
               "photos. The figures show the method's mechanics, never accuracy on real deepfakes.")
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.caveat{background:#fff4e5;border-left:4px solid #f0a020;padding:.6em 1em}
.fail{color:#b00020;font-weight:bold} .ok{color:#1b7f3b}
figure{margin:1em 0} figure img{max-width:100%;border:1px solid #eee} figcaption{color:#555;font-size:.9em}
details{margin:.5em 0} pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.85em}
"""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _scalar_rows(values: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Flatten nested metrics into (name, value) rows; long tables are shown from CSV instead."""
    rows = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if len(value) <= 12 and all(not isinstance(v, (dict, list)) for v in value.values()):
                rows += _scalar_rows(value, prefix=f"{name} / ")
        elif isinstance(value, float):
            rows.append((name, f"{value:.4g}"))
        elif isinstance(value, (int, str, bool)) or value is None:
            rows.append((name, html.escape(str(value))))
    return rows


def _table_html(frame: pd.DataFrame, max_rows: int = 40) -> str:
    shown = frame.head(max_rows)
    text = shown.to_html(float_format=lambda v: f"{v:.4g}", border=0, na_rep="")
    if len(frame) > max_rows:
        text += f"<p>… {len(frame) - max_rows} more rows in the CSV.</p>"
    return text


def notebooks_to_html(run_dir: Path) -> list[Path]:
    """Render every executed notebook of the run to HTML beside it (errors are reported, not raised)."""
    from nbconvert import HTMLExporter  # deferred: nbconvert takes seconds to import

    exporter = HTMLExporter()
    written = []
    for notebook in sorted((run_dir / runs.NOTEBOOKS_DIR).glob("*.ipynb")):
        target = notebook.with_suffix(".html")
        try:
            body, _ = exporter.from_filename(str(notebook))
            target.write_text(body, encoding="utf-8")
            written.append(target)
        except Exception as exc:  # noqa: BLE001 - a report must still be written
            log.warning("report: could not render %s to HTML: %s", notebook.name, exc)
    return written


def _step_section(key: str, run_dir: Path, metrics: dict, timings: dict) -> str:
    figures = sorted((run_dir / runs.FIGURES_DIR).glob(f"{key}_*.png"))
    tables = sorted((run_dir / runs.TABLES_DIR).glob(f"{key}_*.csv"))
    step_metrics = {k: v for k, v in metrics.items() if k.startswith(key)}
    step_timing = {k: v for k, v in timings.items() if k.startswith(key)}
    notebooks = sorted((run_dir / runs.NOTEBOOKS_DIR).glob(f"{key}_*.ipynb"))
    if not (figures or tables or step_metrics or step_timing or notebooks):
        return ""
    parts = [f'<h2 id="step-{key}">{html.escape(STEP_TITLES.get(key, key))}</h2>']
    for name, timing in step_timing.items():
        status = timing.get("status", "?")
        css = "ok" if status in ("ok", "prepared") else "fail"
        parts.append(f'<p>{html.escape(name)}: <span class="{css}">{html.escape(status)}</span> in {timing.get("seconds", 0):.1f} s')
        for nb in notebooks:
            links = [f'<a href="{runs.NOTEBOOKS_DIR}/{nb.name}">notebook</a>']
            if nb.with_suffix(".html").is_file():
                links.append(f'<a href="{runs.NOTEBOOKS_DIR}/{nb.with_suffix(".html").name}">as HTML</a>')
            parts.append(" — executed " + ", ".join(links))
        parts.append("</p>")
    lead = [path for path in figures + tables if path.stem in LEAD_ITEMS]
    parts += [_figure_html(path) if path.suffix == ".png" else _csv_html(path) for path in lead]
    figures, tables = [f for f in figures if f not in lead], [t for t in tables if t not in lead]
    for values in step_metrics.values():
        rows = _scalar_rows(values)
        if rows:
            parts.append("<table><tr><th>key figure</th><th>value</th></tr>"
                         + "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in rows) + "</table>")
    parts += [_csv_html(table) for table in tables]
    parts += [_figure_html(figure) for figure in figures]
    return "\n".join(parts)


def _csv_html(table: Path) -> str:
    try:
        frame = pd.read_csv(table, index_col=0)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        return f"<p>could not read {table.name}: {html.escape(str(exc))}</p>"
    title = table.stem[3:].replace("_", " ")
    return (f'<h3>{html.escape(title)}</h3>{_table_html(frame)}'
            f'<p><a href="{runs.TABLES_DIR}/{table.name}">{table.name}</a></p>')


def _figure_html(figure: Path) -> str:
    caption = figure.stem[3:].replace("_", " ")
    return (f'<figure><img src="{runs.FIGURES_DIR}/{figure.name}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _weights_table(weights: dict) -> str:
    """Where every model of the run started from: step, model, source (file, package, hub repo@revision)."""
    rows = "".join(f"<tr><td>{html.escape(step)}</td><td>{html.escape(name)}</td><td>{html.escape(str(source))}</td></tr>"
                   for step, models in sorted(weights.items()) for name, source in models.items())
    if not rows:
        return ""
    return f"<h3>Starting weights</h3><table><tr><th>step</th><th>model</th><th>weights from</th></tr>{rows}</table>"


def _environment_table(environment: dict, params: dict) -> str:
    """What the run ran on, and how to run it again: the versions that decide results, the code's
    commit, the input data's digests, the profile and the overrides (the full ``pip freeze`` is below)."""
    rows = [("python", environment.get("python")),
            ("torch", f"{environment.get('torch') or environment.get('packages', {}).get('torch')} (CUDA "
                      f"{environment.get('cuda') or 'none'}, cuDNN {environment.get('cudnn') or 'none'})"),
            ("device", f"{environment.get('device')}, {environment.get('torch_threads')} torch threads"),
            ("code", f"git {environment.get('git_commit') or '?'}" + (" with uncommitted changes" if environment.get("git_dirty") else "")),
            ("profile and overrides", f"{params.get('profile', '?')} {json.dumps(params.get('overrides', {}))}"),
            *((f"input data {name}", f"sha256 {digest}") for name, digest in sorted(environment.get("inputs", {}).items())),
            ("packages", f"{len(environment.get('pip_freeze', []))} installed (pip freeze below)")]
    body = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(str(v))}</code></td></tr>" for k, v in rows)
    run = params.get("run", "RUN")
    return (f"<h3>Environment</h3><table>{body}</table><p>Run it again with <code>dfd rerun reports/{html.escape(run)} "
            f"--run NEW</code>, then <code>dfd compare reports/{html.escape(run)} reports/NEW</code>.</p>")


def write_report(run_dir: str | os.PathLike, render_notebooks: bool = True) -> Path:
    """Write ``run_dir/index.html`` from the run folder's contents and return its path."""
    run_dir = Path(run_dir)
    params = _read_json(run_dir / runs.PARAMS)
    environment = _read_json(run_dir / runs.ENVIRONMENT)
    timings = _read_json(run_dir / runs.TIMINGS)
    metrics = _read_json(run_dir / runs.METRICS)
    if render_notebooks:
        notebooks_to_html(run_dir)
    step_params = params.get("steps", {})
    datasets = {str(p.get("dataset", "")) for p in step_params.values()}
    is_demo = any(d.startswith("demo") for d in datasets)
    total = sum(t.get("seconds", 0) for t in timings.values())
    failed = [k for k, t in timings.items() if t.get("status") == "failed"]
    head = [
        f"<h1>dfd-kit run <code>{html.escape(run_dir.name)}</code></h1>",
        f"<p>profile <code>{html.escape(str(params.get('profile', '?')))}</code>, "
        f"{html.escape(str(environment.get('time', '')))}, device {html.escape(str(environment.get('device', '?')))}, "
        f"git {html.escape(str(environment.get('git_commit') or '?'))[:12]}"
        f"{' (uncommitted changes)' if environment.get('git_dirty') else ''}; steps took {total:.0f} s in all"
        + (f'; <span class="fail">failed: {html.escape(", ".join(failed))}</span>' if failed else "") + "</p>",
    ]
    if is_demo:
        head.append(f'<p class="caveat">{html.escape(DEMO_CAVEAT)}</p>')
    if timings:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v.get('status', ''))}</td>"
                       f"<td>{v.get('seconds', 0):.1f}</td></tr>" for k, v in sorted(timings.items()))
        head.append(f"<table><tr><th>step</th><th>status</th><th>seconds</th></tr>{rows}</table>")
    head.append(_weights_table(environment.get("weights", {})))
    sections = [s for s in (_step_section(key, run_dir, metrics, timings) for key in sorted(
        {*STEP_TITLES, *(k[:2] for k in timings), *(k[:2] for k in metrics)})) if s]
    appendix = [
        "<h2>Parameters and environment</h2>",
        _environment_table(environment, params),
        f"<details><summary>parameters of each step</summary><pre>{html.escape(json.dumps(params, indent=2, default=str))}</pre></details>",
        f"<details><summary>environment</summary><pre>{html.escape(json.dumps(environment, indent=2))}</pre></details>",
    ]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>dfd-kit run "
            f"{html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(head + sections + appendix) + "</body></html>")
    target = run_dir / runs.REPORT_PAGE
    return atomic_write(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))
