"""The HTML report: one self-contained file (plotly embedded, no CDN), a row per claim, and
figures like the seed's: heatmaps for sweeps, lines for the logit lens and DLA."""

from __future__ import annotations

import html

from harness.expect import fmt
from harness.report import STATUS_ORDER, _measured_cell, expected_text

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}.passed{color:#176d2c}
.failed,.error{color:#b00020;font-weight:bold}.skipped,.xfailed{color:#8a6d00}
.figure{display:inline-block;vertical-align:top;margin:0 1em 1em 0}code{font-size:90%}
"""


def html_report(report: dict) -> str:
    from plotly.offline import get_plotlyjs

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>interp-harness report"
             f"</title><style>{CSS}</style><script>{get_plotlyjs()}</script></head><body>",
             "<h1>interp-harness report</h1>", _environment(report)]
    for spec in report["specs"]:
        parts.append(_spec_section(spec))
    parts.append("</body></html>")
    return "\n".join(parts)


def _environment(report: dict) -> str:
    env = dict(report["environment"], harness=report["harness_version"])
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in env.items())
    return f"<table class='environment'>{cells}</table>"


def _spec_section(spec: dict) -> str:
    claims = sorted(spec["claims"], key=lambda c: STATUS_ORDER.get(c["status"], 9))
    out = [f"<h2>{html.escape(spec['spec'])} <small><code>{html.escape(spec['file'])}</code>"
           "</small></h2>"]
    if spec.get("error"):
        out.append(f"<pre class='error'>{html.escape(spec['error'])}</pre>")
    head = "".join(f"<th>{h}</th>" for h in ("status", "claim", "measure", "models", "measured",
                                             "expected", "margin", "details", "seconds"))
    rows = "".join(_row(c) for c in claims)
    out.append(f"<table class='claims'><tr>{head}</tr>{rows}</table>")
    figures = [f for f in (_figure(c) for c in spec["claims"]) if f]
    out += figures
    return "\n".join(out)


def _row(c: dict) -> str:
    esc = html.escape
    cells = [f"<span class='{esc(c['status'])}'>{esc(c['status'])}</span>",
             f"<code>{esc(c['id'])}</code>",
             esc(c["measure"] + (" (attribution approx.)" if c.get("method") == "attribution"
                                 else "")),
             esc(", ".join(c.get("models", []))), esc(_measured_cell(c)),
             esc(expected_text(c["expected"])),
             fmt(c["margin"]) if c.get("margin") is not None else "",
             esc(c.get("message", "")), f"{c.get('seconds', 0):.2f}"]
    return "<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>"


def _figure(c: dict) -> str | None:
    measured = c.get("measured")
    if c["measure"] == "patch_sweep" and isinstance(measured, dict):
        fig = _heatmap(c, measured)
    elif c["measure"] in ("logit_lens", "dla") and isinstance(measured, dict):
        fig = _lines(c, measured)
    else:
        return None
    return "<div class='figure'>" + fig.to_html(full_html=False, include_plotlyjs=False) + \
        "</div>"


def _heatmap(c: dict, grid: dict):
    import plotly.graph_objects as go

    axes, labels, values = grid["axes"], grid["labels"], grid["values"]
    if len(axes) == 1:
        fig = go.Figure(go.Bar(x=[str(x) for x in labels[0]], y=values))
    else:
        y_labels, z = _rows_of(axes, labels, values)
        x_labels = [f"{tok}_{i}" if axes[-1] == "pos" else str(tok)
                    for i, tok in enumerate(labels[-1])]
        fig = go.Figure(go.Heatmap(z=z, x=x_labels, y=y_labels, zmid=0, colorscale="RdBu",
                                   colorbar={"title": "normalized"}))
        fig.update_yaxes(autorange="reversed", title=" x ".join(axes[:-1]), type="category")
        fig.update_xaxes(title=axes[-1], type="category")
    title = f"{c['id']}: {c['measure']} " + ("(attribution approximation)"
                                              if grid.get("method") == "attribution" else "")
    fig.update_layout(title=title, width=640, height=420, margin={"t": 50})
    return fig


def _rows_of(axes, labels, values):
    """2-D grids as they are; [layer, head, pos] flattened to rows L{l}H{h}."""
    if len(axes) == 2:
        return [str(x) for x in labels[0]], values
    rows, names = [], []
    for li, layer in enumerate(labels[0]):
        for hi, head in enumerate(labels[1]):
            names.append(f"L{layer}H{head}")
            rows.append(values[li][hi])
    return names, rows


def _lines(c: dict, grid: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    per_model = c.get("models_measured") or {}
    series = per_model.items() if per_model else [(", ".join(c.get("models", [])), grid)]
    kind = go.Scatter if c["measure"] == "logit_lens" else go.Bar
    for name, g in series:
        x = [str(x) for x in g["labels"][0]]
        trace = kind(x=x, y=g["values"], name=name)
        fig.add_trace(trace)
    fig.update_layout(title=f"{c['id']}: {c['measure']} (logit diff)", width=640, height=420,
                      margin={"t": 50}, barmode="group")
    return fig
