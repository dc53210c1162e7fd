"""The Grafana dashboards as data: their panel queries, with Grafana's variables filled in,
and `softwatch dashboard-snapshot`, which renders every panel from a live Prometheus into
one PNG per dashboard (for READMEs, and wherever Grafana is not installed)."""

from __future__ import annotations

import json
import math
import re
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

VARIABLES = {"$model": ".*", "$params": ".*", "$replica": ".*"}


def load(directory: str | Path) -> dict[str, dict]:
    """Every dashboard JSON in `directory`, by file stem."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))}
    if not found:
        raise ValueError(f"no dashboard JSON files in {directory}")
    return found


def expand(expr: str, rate_interval: str = "1m", range_: str = "1h") -> str:
    """A panel's PromQL as Grafana would send it with every template variable at "All"."""
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)


def panel_queries(dashboard: dict) -> list[tuple[str, str, str, bool]]:
    """(panel title, refId, PromQL, instant) of every target of every panel."""
    return [(panel["title"], t["refId"], t["expr"], bool(t.get("instant")))
            for panel in dashboard["panels"] for t in panel.get("targets", [])]


def _get(url: str, path: str, params: dict) -> list[dict]:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=30) as r:
        reply = json.loads(r.read())
    if reply.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {params.get('query')!r}: {reply}")
    return reply["data"]["result"]


def query(url: str, expr: str) -> list[dict]:
    return _get(url, "/api/v1/query", {"query": expr})


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    return _get(url, "/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})


def snapshot(url: str, dashboard: dict, out: str | Path, minutes: float = 60) -> Path:
    """Render every panel of `dashboard` from the Prometheus at `url` over the last `minutes`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = datetime.now(timezone.utc).timestamp()
    start = end - minutes * 60
    step = max(5.0, minutes * 60 / 240)
    range_ = f"{int(minutes)}m"
    panels = dashboard["panels"]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(16, 3.4 * rows), squeeze=False)
    for ax, panel in zip(axes.ravel(), panels):
        ax.set_title(panel["title"], fontsize=10)
        for target in panel.get("targets", []):
            expr = expand(target["expr"], "1m", range_)
            legend = target.get("legendFormat", "")
            if target.get("instant"):
                result = query(url, expr)
                labels = [_legend(legend, r["metric"]) for r in result]
                ax.barh(labels, [float(r["value"][1]) for r in result], color="#4477aa")
                continue
            for series in query_range(url, expr, start, end, step):
                times = [datetime.fromtimestamp(float(t), timezone.utc) for t, _ in series["values"]]
                ax.plot(times, [float(v) for _, v in series["values"]], label=_legend(legend, series["metric"]),
                        linewidth=1.2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
        ax.tick_params(labelsize=8)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard['title']} — last {range_} from {url}", fontsize=12)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def _legend(template: str, labels: dict) -> str:
    return re.sub(r"{{\s*(\w+)\s*}}", lambda m: labels.get(m.group(1), ""), template) or str(labels)
