"""Draw the Grafana dashboard's panels from their own PromQL, one small chart per panel, with matplotlib.

    python docker/render_dashboard.py --out docs/img/dashboard.png
        starts `sida serve` on the demo model and Prometheus (the shipped scrape config and rules) on loopback,
        sends mixed traffic for --duration seconds, then draws that period (`make dashboard`)
    python docker/render_dashboard.py --prometheus http://localhost:9090 --minutes 30 --out dashboard.png
        draws the last 30 minutes from a running Prometheus, e.g. the compose stack's

The picture is a rendering of the panels' queries, not a Grafana screenshot; Grafana is not needed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import local_stack

REPO = local_stack.DOCKER.parent
sys.path.insert(0, str(REPO))

from tests.live_server import free_port, start_serve  # noqa: E402

SENTENCES = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"
GRID_ROW_INCHES = 0.33  # one Grafana grid unit of height
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _sentences() -> list[str]:
    if SENTENCES.is_file():
        return [line.split("\t")[0].strip() for line in SENTENCES.read_text().splitlines()[1:] if line.strip()]
    return ["a gorgeous , witty , seductive movie .", "a dull mess .", "it 's a charming and often affecting journey ."]


def _client(base: str, stop: threading.Event, rng: random.Random, sentences: list[str]) -> None:
    """One client: mostly classify calls of 1-8 sentences, some completions (a third streamed), rare bad calls."""
    with httpx.Client(base_url=base, timeout=60) as c:
        while not stop.is_set():
            roll = rng.random()
            if roll < 0.75:
                body = {"model": local_stack.MODEL, "input": rng.sample(sentences, rng.randint(1, 8))}
                c.post("/v1/classify", json=body)
            elif roll < 0.98:
                body = {"model": local_stack.MODEL, "prompt": rng.choice(sentences), "max_tokens": rng.randint(4, 16)}
                if rng.random() < 0.33:
                    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        for _ in r.iter_lines():
                            pass
                else:
                    c.post("/v1/completions", json=body)
            else:
                c.post("/v1/completions", json={"model": local_stack.MODEL, "prompt": "x", "max_tokens": 0})
            time.sleep(rng.uniform(0.02, 0.2))


def drive(base: str, duration_s: float, seed: int = 0) -> None:
    """Mixed traffic in four phases of 1, 4, 8 and 2 concurrent clients."""
    sentences = _sentences()
    for i, clients in enumerate((1, 4, 8, 2)):
        stop = threading.Event()
        threads = [
            threading.Thread(target=_client, args=(base, stop, random.Random(seed * 100 + i * 10 + j), sentences))
            for j in range(clients)
        ]
        for t in threads:
            t.start()
        time.sleep(duration_s / 4)
        stop.set()
        for t in threads:
            t.join()


def _legend(template: str, labels: dict, fallback: str) -> str:
    text = _LEGEND.sub(lambda m: labels.get(m.group(1), ""), template).strip()
    return text or fallback


def _formatter(unit: str):
    from matplotlib.ticker import EngFormatter, FuncFormatter, PercentFormatter

    if unit == "percentunit":
        return PercentFormatter(1.0)
    if unit in ("s", "bytes", "Bps"):
        return EngFormatter(unit={"s": "s", "bytes": "B", "Bps": "B/s"}[unit], sep="")
    suffix = {"reqps": "/s", "ops": "/s"}.get(unit, "")
    return FuncFormatter(lambda v, _: f"{v:g}{suffix}")


def render(prometheus: str, start: float, end: float, out: Path, rate_interval: str, step: float) -> Path:
    """One chart per dashboard panel, placed as its gridPos places it, written to `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = json.loads(local_stack.DASHBOARD.read_text())["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    top = 0.6  # inches above the grid, for the figure's title
    fig = plt.figure(figsize=(18, height * GRID_ROW_INCHES + top), dpi=90)
    fig.suptitle(
        "sida dashboard: each panel's PromQL drawn from Prometheus (a rendering, not a Grafana screenshot)",
        fontsize=12,
    )
    grid_top = 1 - top / fig.get_figheight()
    for p in panels:
        ax = fig.add_axes(_rect(p["gridPos"], height, grid_top))
        _draw_panel(ax, p, prometheus, start, end, rate_interval, step)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _rect(g: dict, height: int, grid_top: float) -> list[float]:
    """A panel's axes in figure coordinates: its gridPos cell (24 columns, `height` rows under `grid_top`) less a
    margin for its title, ticks and legend."""
    row = grid_top / height
    x0, w = g["x"] / 24, g["w"] / 24
    y0, h = grid_top - (g["y"] + g["h"]) * row, g["h"] * row
    return [x0 + 0.09 * w, y0 + 0.2 * h, 0.89 * w, 0.68 * h]


def _draw_panel(ax, panel: dict, prometheus: str, start: float, end: float, rate_interval: str, step: float) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults.get("unit", "short")
    for target in panel["targets"]:
        expr = target["expr"].replace("$__rate_interval", rate_interval)
        for series in local_stack.query_range(prometheus, expr, start, end, step):
            ts = [(float(t) - start) / 60 for t, _ in series["values"]]
            vs = [float(v) for _, v in series["values"]]
            ax.plot(ts, vs, linewidth=1.2, label=_legend(target.get("legendFormat", ""), series["metric"], expr[:30]))
    ax.set_title(panel["title"], fontsize=10, loc="left")
    ax.yaxis.set_major_formatter(_formatter(unit))
    ax.tick_params(labelsize=7)
    ax.set_xlim(0, (end - start) / 60)
    ax.set_ylim(defaults.get("min"), defaults.get("max"))  # a ratio's fixed 0..1 axis, as Grafana draws it
    ax.set_xlabel("minutes", fontsize=7, labelpad=1)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=6, loc="upper left", ncol=2, frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")


def live(out: Path, duration_s: float, rate_interval: str, model: str | None) -> Path:
    """Daemon + Prometheus on loopback, traffic, then the rendering of that period."""
    flags = ["--log-level", "warning"] + (["--model", model] if model else [])
    proc, base = start_serve(flags)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            config = local_stack.write_prometheus_config(Path(tmp), base.removeprefix("http://"), interval_s=1)
            prom = local_stack.start_prometheus(config, Path(tmp) / "data", port)
            url = f"http://127.0.0.1:{port}"
            try:
                start = time.time()
                drive(base, duration_s)
                local_stack.wait_for_scrape(url, after=time.time())
                return render(url, start, time.time(), out, rate_interval, step=1)
            finally:
                prom.terminate()
                prom.wait(30)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "dashboard.png")
    p.add_argument("--prometheus", help="a running Prometheus to read from (default: start a local stack)")
    p.add_argument("--minutes", type=float, default=30, help="with --prometheus: how far back to draw")
    p.add_argument("--duration", type=float, default=60, help="local stack: seconds of traffic")
    p.add_argument("--rate-interval", help="stands for $__rate_interval (default: 10s local, 1m with --prometheus)")
    p.add_argument("--model", help="local stack: model folder (default: the demo model)")
    args = p.parse_args()
    if args.prometheus:
        end = time.time()
        out = render(args.prometheus, end - 60 * args.minutes, end, args.out, args.rate_interval or "1m", step=15)
    else:
        out = live(args.out, args.duration, args.rate_interval or "10s", args.model)
    print(out)


if __name__ == "__main__":
    main()
