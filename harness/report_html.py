"""The HTML report: one self-contained file (plotly embedded, no CDN) that opens on a summary
(counts by status, failing claims first with their messages, filters by status and measure),
then the environment and models as tables, then a row per claim with its figure beside it:
heatmaps for sweeps (positions labelled by their tokens), lines for the logit lens and DLA.
`html_fragment` is the same without the page around it, for Jupyter (`_repr_html_`), with or
without the library (a notebook loads it once: `notebook.py`)."""

from __future__ import annotations

import html
import uuid

from harness.errors import safe_text
from harness.expect import fmt
from harness.kinds import kind_class
from harness.labels import Head, format_label
from harness.report_text import (
    STATUS_ORDER,
    expected_text,
    measured_cell,
    report_summary_line,
    trust_distributions,
    trust_text,
)

CSS = """
.harness-report{font-family:system-ui,sans-serif;color:#222}
.harness-report table{border-collapse:collapse;margin:.5em 0 1.5em}
.harness-report td,.harness-report th{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}.harness-report th{background:#f4f4f4}
.harness-report .passed{color:#176d2c}.harness-report .failed,.harness-report .error{
color:#b00020;font-weight:bold}.harness-report .skipped,.harness-report .xfailed{color:#8a6d00}
.harness-report .summary{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;
background:#fafafa;margin-bottom:1em}.harness-report .summary-line{font-size:1.2em;
font-weight:bold}.harness-report .badge{display:inline-block;border-radius:10px;padding:1px 10px;
margin:.4em .4em 0 0;color:#fff}.harness-report .badge.passed{background:#176d2c;color:#fff}
.harness-report .badge.failed,.harness-report .badge.error{background:#b00020;color:#fff}
.harness-report .badge.skipped,.harness-report .badge.xfailed{background:#8a6d00;color:#fff}
.harness-report .failing li{margin:.3em 0}.harness-report .filters{margin:.6em 0}
.harness-report .filters label{margin-right:1em}.harness-report .fig{min-width:480px}
.harness-report code{font-size:90%}.harness-report .hidden{display:none}
"""

FILTER_JS = """
(function(root){
  function apply(){
    var on={};root.querySelectorAll('input.status-filter').forEach(function(b){
      on[b.value]=b.checked;});
    var measure=root.querySelector('select.measure-filter').value;
    var shown=0;
    root.querySelectorAll('tr.claim').forEach(function(row){
      var keep=on[row.dataset.status]&&(measure==='all'||row.dataset.measure===measure);
      row.classList.toggle('hidden',!keep);if(keep){shown+=1;}});
    root.querySelector('.shown-count').textContent=shown;
  }
  root.querySelectorAll('input.status-filter,select.measure-filter').forEach(function(el){
    el.addEventListener('change',apply);});
  apply();
})(document.getElementById('%s'));
"""


def esc(value) -> str:
    """Any text shown as written in HTML: markup characters as entities, control characters
    (escape codes) escaped as in the terminal."""
    return html.escape(safe_text(str(value)))


def html_report(report: dict) -> str:
    """The whole page: one file that opens offline."""
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>interp-harness report"
            f"</title></head><body style='margin:2em'>{html_fragment(report)}</body></html>")


def html_fragment(report: dict, include_plotlyjs: bool = True) -> str:
    """The report inside one <div> (styles included): a page's body, or a Jupyter cell's
    output. Its filters act only on its own rows. `include_plotlyjs=False` leaves out the
    plotly.js library (~4.6 MB), for a page that has loaded it already (`plotly_js_html`)."""
    root = f"harness-report-{uuid.uuid4().hex[:8]}"
    claims = [c for spec in report["specs"] for c in spec["claims"]]
    parts = [f"<div class='harness-report' id='{root}'><style>{CSS}</style>",
             plotly_js_html() if include_plotlyjs else "", "<h1>interp-harness report</h1>",
             _summary(report, claims), "<h2>Environment</h2>", _environment(report),
             _models(report)]
    for spec in report["specs"]:
        parts.append(_spec_section(spec))
    parts.append(f"<script>{FILTER_JS % root}</script></div>")
    return "\n".join(parts)


def plotly_js_html() -> str:
    """The plotly.js library as one script tag, embedded (the report opens offline): what a
    page or a notebook needs once before any figure draws."""
    from plotly.offline import get_plotlyjs

    return f"<script>{get_plotlyjs()}</script>"


def _summary(report: dict, claims: list[dict]) -> str:
    counts: dict[str, int] = {}
    for c in sorted(claims, key=lambda c: STATUS_ORDER.get(c["status"], 9)):
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    badges = "".join(f"<span class='badge {esc(s)}'>{n} {esc(s)}</span>"
                     for s, n in counts.items())
    failing = [(spec, c) for spec in report["specs"] for c in spec["claims"]
               if c["status"] in ("failed", "error")]
    items = "".join(f"<li><span class='{esc(c['status'])}'>{esc(c['status'].upper())}</span> "
                    f"<a href='#{_anchor(spec, c)}'><code>{esc(spec['spec'])}::{esc(c['id'])}"
                    f"</code></a>: {esc(c.get('message', ''))}</li>" for spec, c in failing)
    spec_errors = "".join(f"<li><span class='error'>SPEC ERROR</span> <code>"
                          f"{esc(s['file'])}</code>: {esc(s['error'])}</li>"
                          for s in report["specs"] if s.get("error"))
    failing_html = f"<h3>Failing claims</h3><ul class='failing'>{spec_errors}{items}</ul>" \
        if items or spec_errors else "<p class='passed'>No claim failed.</p>"
    boxes = "".join(f"<label><input type='checkbox' class='status-filter' value='{esc(s)}' "
                    f"checked> {esc(s)} ({n})</label>" for s, n in counts.items())
    measures = sorted({c["measure"] for c in claims})
    options = "<option value='all'>all measures</option>" + "".join(
        f"<option value='{esc(m)}'>{esc(m)}</option>" for m in measures)
    return (f"<div class='summary'><div class='summary-line'>"
            f"{esc(report_summary_line(report))}</div><div>{badges}</div>{failing_html}"
            f"<div class='filters'>Show: {boxes} <select class='measure-filter'>{options}"
            f"</select> — <span class='shown-count'>{len(claims)}</span> of {len(claims)} "
            f"claims shown</div></div>")


def _anchor(spec: dict, c: dict) -> str:
    return esc(f"claim-{spec['spec']}-{c['id']}")


def _environment(report: dict) -> str:
    env = {"harness": report["harness_version"],
           **{k: v for k, v in report["environment"].items() if k != "models"}}
    if report.get("limit") is not None:
        env["limit"] = f"first {report['limit']} prompts of each claim"
    head = "".join(f"<th>{esc(str(k))}</th>" for k in env)
    cells = "".join(f"<td>{esc(str(v))}</td>" for v in env.values())
    return f"<table class='environment'><tr>{head}</tr><tr>{cells}</tr></table>"


def _models(report: dict) -> str:
    models = report["environment"].get("models") or []
    if not models:
        return ""
    columns = list(dict.fromkeys(k for m in models for k in m))
    head = "".join(f"<th>{esc(k)}</th>" for k in columns)
    rows = "".join("<tr>" + "".join(f"<td>{esc(str(m.get(k, '')))}</td>"
                                    for k in columns) + "</tr>" for m in models)
    return f"<h3>Models</h3><table class='models'><tr>{head}</tr>{rows}</table>"


def _spec_section(spec: dict) -> str:
    claims = sorted(spec["claims"], key=lambda c: STATUS_ORDER.get(c["status"], 9))
    out = [f"<h2>{esc(spec['spec'])} <small><code>{esc(spec['file'])}</code>"
           "</small></h2>"]
    if spec.get("error"):
        out.append(f"<pre class='error'>{esc(spec['error'])}</pre>")
    head = "".join(f"<th>{h}</th>" for h in ("status", "claim", "measure", "models", "measured",
                                             "expected", "margin", "trust", "details",
                                             "seconds", "figure"))
    rows = "".join(_row(spec, c) for c in claims)
    out.append(f"<table class='claims'><tr>{head}</tr>{rows}</table>")
    return "\n".join(out)


def _row(spec: dict, c: dict) -> str:
    cells = [f"<span class='{esc(c['status'])}'>{esc(c['status'])}</span>",
             f"<code>{esc(c['id'])}</code>",
             esc(c["measure"] + (" (attribution approx.)" if c.get("method") == "attribution"
                                 else "")
                 + (" (post-norm scale frozen)" if "post-norm scale frozen"
                    in str(c.get("approximation", "")) else "")),
             esc(", ".join(c.get("models", []))), esc(measured_cell(c)),
             esc(expected_text(c["expected"])),
             fmt(c["margin"]) if c.get("margin") is not None else "",
             esc(trust_text(c.get("trust"))), esc(c.get("message", "")),
             f"{c.get('seconds', 0):.2f}", (_figure(c) or "") + _histograms(c)]
    last = len(cells) - 1
    return (f"<tr class='claim' id='{_anchor(spec, c)}' data-status='{esc(c['status'])}' "
            f"data-measure='{esc(c['measure'])}'>"
            + "".join(f"<td{' class=fig' if i == last and cells[last] else ''}>{x}</td>"
                      for i, x in enumerate(cells)) + "</tr>")


def _histograms(c: dict) -> str:
    """A histogram of every distribution the claim's `trust` holds (the bootstrap's margins:
    how far each resample of the prompts is from the expectation's bound)."""
    import plotly.graph_objects as go

    out = []
    hists = [(name, values, 0.0) for name, values in trust_distributions(c.get("trust")).items()]
    randoms, named = c.get("random_values"), c.get("measured")
    if trust_distributions({"r": randoms}) and isinstance(named, int | float):
        hists.append(("random_values", randoms, named))     # `against`: the line is the named one
    for name, values, line in hists:
        fig = go.Figure(go.Histogram(x=values, nbinsx=30))
        fig.add_vline(x=line, line_dash="dash")
        word = {"bootstrap": "margin per bootstrap resample (> 0: holds)",
                "random_values": "random selections (line: the named one)"}.get(name, name)
        fig.update_layout(title=_plot_text(f"{c['id']}: {word}"), width=520, height=260,
                          margin={"t": 50}, showlegend=False)
        out.append("<div class='figure histogram'>"
                   + fig.to_html(full_html=False, include_plotlyjs=False) + "</div>")
    return "".join(out)


def _figure(c: dict) -> str | None:
    measured = c.get("measured")
    figure = kind_class(c["measure"]).FIGURE   # the claim's kind says which figure it has
    if figure == "heatmap" and isinstance(measured, dict):
        fig = _heatmap(c, measured)
    elif figure in ("lines", "bars") and isinstance(measured, dict):
        fig = _lines(c, measured, figure)
    elif figure == "curve" and isinstance(c.get("curve"), dict):
        fig = _curve(c, c["curve"])
    else:
        return None
    return "<div class='figure'>" + fig.to_html(full_html=False, include_plotlyjs=False) + \
        "</div>"


def token_labels(tokens: list) -> list[str]:
    """Positions labelled by their tokens, numbered so repeated tokens stay apart."""
    return [_plot_text(f"{i}: {tok!r}" if isinstance(tok, str) else tok)
            for i, tok in enumerate(tokens)]


def _plot_text(value) -> str:
    """Text plotly shows as written: it reads a subset of HTML (links, bold) in labels and
    titles, and decodes entities."""
    return html.escape(safe_text(str(value)), quote=False)


def _heatmap(c: dict, grid: dict):
    import plotly.graph_objects as go

    axes, labels, values = grid["axes"], grid["labels"], grid["values"]
    if len(axes) == 1:
        fig = go.Figure(go.Bar(x=[_plot_text(x) for x in labels[0]], y=values))
    else:
        y_labels, z = _rows_of(axes, labels, values)
        x_labels = token_labels(labels[-1]) if axes[-1] == "pos" else \
            [_plot_text(x) for x in labels[-1]]
        fig = go.Figure(go.Heatmap(z=z, x=x_labels, y=y_labels, zmid=0, colorscale="RdBu",
                                   colorbar={"title": "normalized"}))
        fig.update_yaxes(autorange="reversed", title=" x ".join(axes[:-1]), type="category")
        fig.update_xaxes(title=axes[-1] + (" (token)" if axes[-1] == "pos" else ""),
                         type="category")
    title = _plot_text(f"{c['id']}: {c['measure']} ") + ("(attribution approximation)"
                                              if grid.get("method") == "attribution" else "")
    fig.update_layout(title=title, width=520, height=360, margin={"t": 50})
    return fig


def _rows_of(axes, labels, values):
    """2-D grids as they are; [layer, head, pos] flattened to rows L{l}H{h}."""
    if len(axes) == 2:
        return [_plot_text(x) for x in labels[0]], values
    rows, names = [], []
    for li, layer in enumerate(labels[0]):
        for hi, head in enumerate(labels[1]):
            names.append(format_label(Head(layer, head)))
            rows.append(values[li][hi])
    return names, rows


def _curve(c: dict, curve: dict):
    """Faithfulness against circuit size (MIB's curve; its area is CPR, the area between it
    and 1 is CMD)."""
    import plotly.graph_objects as go

    sizes, faith = curve["sizes"], curve["faithfulness"]
    text = [f"{n} edges" for n in curve.get("edges", [])] or None
    fig = go.Figure(go.Scatter(x=sizes, y=faith, mode="lines+markers", text=text,
                               name="faithfulness", fill="tozeroy"))
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_xaxes(title="circuit size (share of edges)", type="log")
    fig.update_yaxes(title="faithfulness")
    fig.update_layout(title=_plot_text(f"{c['id']}: {c['measure']} faithfulness curve"),
                      width=520, height=360, margin={"t": 50})
    return fig


def _lines(c: dict, grid: dict, figure: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    per_model = c.get("models_measured") or {}
    series = per_model.items() if per_model else [(", ".join(c.get("models", [])), grid)]
    kind = go.Scatter if figure == "lines" else go.Bar
    for name, g in series:
        x = [_plot_text(x) for x in g["labels"][0]]
        trace = kind(x=x, y=g["values"], name=_plot_text(name))
        fig.add_trace(trace)
    fig.update_layout(title=_plot_text(f"{c['id']}: {c['measure']} (logit diff)"), width=520,
                      height=360, margin={"t": 50}, barmode="group")
    return fig
