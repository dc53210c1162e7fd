"""The HTML drift report: one self-contained file (images inlined, no scripts, no network)
with the verdict table of a fresh monitor run over the store, baseline vs current
distributions of every metric it compared, and the time series of the sequence metrics with
regime changes marked."""

from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timedelta, timezone

import numpy as np

from .monitor import METRICS, Filter, Monitor, Sample

TIME_SERIES = ("mean_entropy", "log_perplexity", "mean_top_prob")
TIME_SERIES_SEQUENCES = 20_000  # a hash sample of the store beyond this


def render(monitor: Monitor, out: str) -> str:
    """Run the monitor (its report is written to drift_reports as usual) and write its HTML
    rendering to `out`; returns the verdict."""
    import matplotlib

    matplotlib.use("Agg")
    report = monitor.run()
    rows, verdict = report.rows, report.verdict
    regimes = monitor.regimes()
    parts = [
        f"<h1>softwatch drift report</h1><p>data: {_e(monitor.root)} &middot; generated "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC &middot; verdict: "
        f"<b class='{verdict}'>{verdict}</b></p>",
        "<h2>Verdicts</h2>", _verdict_table(rows),
        "<h2>Regimes</h2>", _regime_table(regimes),
    ]
    for kind in ("regime", "window"):
        comparison = [r for r in rows if r["kind"] == kind]
        if comparison:
            baseline, current = _sides(monitor, comparison[0])
            if len(baseline) and len(current):
                parts += [f"<h2>Baseline vs current ({kind})</h2>",
                          f"<p>{_e(comparison[0]['baseline_regime'])} ({len(baseline)} sequences) vs "
                          f"{_e(comparison[0]['current_regime'])} ({len(current)} sequences)</p>",
                          _image(_distributions(baseline, current))]
    everything = monitor.sample(Filter(), limit=TIME_SERIES_SEQUENCES, order="hash")  # bounded on any store
    if len(everything):
        parts += ["<h2>Time series</h2>", _image(_time_series(everything, regimes))]
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>softwatch drift report</title>" \
           f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return verdict


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.l{text-align:left}.drift{color:#b00020}.no_drift{color:#1b7f3b}
.insufficient_data{color:#777}.traffic_change{color:#a06000}img{max-width:100%}"""


def _verdict_table(rows: list[dict]) -> str:
    head = ["kind", "metric", "test", "statistic", "p value", "effect size", "threshold", "baseline", "current",
            "n baseline", "n current", "verdict"]
    body = []
    for r in rows:
        cells = [r["kind"], r["metric"], r["test"], _n(r["statistic"]), _n(r["p_value"]), _n(r["effect_size"]),
                 _n(r["threshold"]), r["baseline_regime"], r["current_regime"], r["n_baseline"], r["n_current"]]
        body.append("<tr>" + "".join(f"<td class='l'>{_e(c)}</td>" if isinstance(c, str) else f"<td>{_e(c)}</td>"
                                     for c in cells) + f"<td class='l {r['verdict']}'>{r['verdict']}</td></tr>")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body) + "</table>"


def _regime_table(regimes: list[dict]) -> str:
    head = ["model_id", "model_rev", "params_id", "params_source", "temperature", "top_p", "top_k", "sequences",
            "first_ts", "last_ts"]
    body = "".join("<tr>" + "".join(f"<td class='l'>{_e(r[h])}</td>" for h in head) + "</tr>" for r in regimes)
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + body + "</table>"


def _sides(monitor: Monitor, row: dict) -> tuple[Sample, Sample]:
    """The sequences a comparison row was computed on, recovered from its regime labels and
    time ranges."""
    def side(label: str, start, end) -> Sample:
        terms = []
        if "@" in label and "/" in label:
            model_id, rest = label.split("@", 1)
            model_rev, params_id = rest.split("/", 1)
            terms = [("model_id", model_id), ("model_rev", model_rev), ("params_id", params_id.split("[")[0])]
        if start is not None and end is not None:  # read only the comparison's time range, in SQL
            terms += [("since", (start - timedelta(milliseconds=1)).isoformat()),
                      ("until", (end + timedelta(milliseconds=1)).isoformat())]
        sample = monitor.sample(Filter(tuple(terms)), limit=4 * monitor.config.max_sequences)
        if start is not None and end is not None and len(sample):
            lo, hi = start.timestamp() * 1e6, end.timestamp() * 1e6
            sample = sample.take((sample.ts >= lo - 1) & (sample.ts <= hi + 1))
        return sample
    return (side(row["baseline_regime"], row["baseline_start"], row["baseline_end"]),
            side(row["current_regime"], row["current_start"], row["current_end"]))


def _distributions(baseline: Sample, current: Sample):
    import matplotlib.pyplot as plt

    names = [m for m in METRICS if np.isfinite(baseline.metrics[m]).any()]
    cols = 4
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(16, 3.2 * ((len(names) + cols - 1) // cols)))
    for ax, name in zip(np.ravel(axes), names):
        a, b = _finite(baseline.metrics[name]), _finite(current.metrics[name])
        edges = np.histogram_bin_edges(np.concatenate([a, b]), bins=30)
        ax.hist(a, bins=edges, alpha=0.55, density=True, label="baseline", color="#4477aa")
        ax.hist(b, bins=edges, alpha=0.55, density=True, label="current", color="#ee6677")
        ax.set_title(name, fontsize=10)
    for ax in np.ravel(axes)[len(names):]:
        ax.axis("off")
    np.ravel(axes)[0].legend()
    fig.tight_layout()
    return fig


def _time_series(sample: Sample, regimes: list[dict]):
    """Each sequence's metrics in time order (x: sequence number, so idle gaps take no room),
    a rolling mean, and a dashed line where each new regime first appears."""
    import matplotlib.pyplot as plt

    x = np.arange(len(sample))
    deployment = [r for r in regimes if r.get("params_source") != "request"]  # client overrides mark nothing
    changes = [(int(np.searchsorted(sample.ts, r["first_ts"].timestamp() * 1e6 - 1)), r["params_id"])
               for r in deployment[1:]]
    fig, axes = plt.subplots(len(TIME_SERIES), 1, figsize=(16, 2.6 * len(TIME_SERIES)), sharex=True)
    for ax, name in zip(axes, TIME_SERIES):
        values = sample.metrics[name]
        ax.plot(x, values, ".", markersize=2, color="#999999")
        window = max(5, len(values) // 50)
        if len(values) >= window:
            rolling = np.convolve(np.nan_to_num(values), np.ones(window) / window, mode="valid")
            ax.plot(x[window - 1:], rolling, color="#222222", linewidth=1.2, label=f"mean of {window}")
        ax.set_ylabel(name, fontsize=9)
        for at, _ in changes:
            ax.axvline(at, color="#ee6677", linestyle="--", linewidth=1)
    for at, params_id in changes:
        axes[0].annotate(params_id, (at, 1.0), xycoords=("data", "axes fraction"), fontsize=8, color="#ee6677",
                         va="bottom")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("sequence (time order); dashed: a new regime (model, revision or decoding parameters)")
    fig.tight_layout()
    return fig


def _image(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return f"<img alt='chart' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _finite(v: np.ndarray) -> np.ndarray:
    return v[np.isfinite(v)]


def _n(v) -> str:
    return "" if v is None else f"{v:.4g}"


def _e(v) -> str:
    return html.escape("" if v is None else str(v))
