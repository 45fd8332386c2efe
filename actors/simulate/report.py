"""The simulation report: a table for the terminal, JSON, and an HTML page with PNG plots.

Input is the data of one or more runs (:meth:`actors.simulate.runner.Run.result`) under their
labels; several runs are printed side by side, one column each. Everything here is a pure
function of that data, so the same runs give byte-identical output.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from actors.simulate.ledger import STATES

STATE_NAMES = {"busy": "busy", "booting": "booting", "idle": "idle", "shutting_down": "shutting down"}
COLORS = {"busy": "#2a9d8f", "booting": "#e9c46a", "idle": "#e76f51", "shutting_down": "#8d99ae"}


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m}m{sec:02d}s"
    h, m = divmod(round(s / 60), 60)
    return f"{h}h{m:02d}m"


def money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.2f}"


def rows(runs: list[tuple[str, dict]]) -> list[tuple[str, list[str]]]:
    """(label, one cell per run) for the table."""
    out: list[tuple[str, list[str]]] = []

    def row(label, fn):
        out.append((label, [fn(r) for _, r in runs]))

    def section(title):
        out.append((title, [""] * len(runs)))

    row("simulated time", lambda r: duration(r["simulated_hours"] * 3600) + (" (limit hit)" if r["timed_out"] else ""))
    row("containers submitted", lambda r: str(r["containers"]["submitted"]))
    row("  complete", lambda r: str(r["containers"]["by_state"].get("Complete", 0)))
    row("  cancelled", lambda r: str(r["containers"]["by_state"].get("Cancelled", 0)))
    row("  never started", lambda r: str(r["containers"]["never_started"]))
    row("total cost", lambda r: money(r["cost"]))
    row("lower bound (cheapest type each)", lambda r: money(r["lower_bound"]))
    row("cost / lower bound", lambda r: "-" if r["ratio"] is None else f"{r['ratio']:.3f}")
    row("lower bound (packed shares)", lambda r: money(r["lower_bound_packed"]))
    row("cost / packed lower bound", lambda r: "-" if r["ratio_packed"] is None else f"{r['ratio_packed']:.3f}")
    row("instances created", lambda r: str(r["instances_created"]))
    row("peak instances", lambda r: str(r["peak_instances"]))
    row("peak running containers", lambda r: str(r["peak_running_containers"]))
    section("instance-hours")
    for s in STATES:
        row(f"  {STATE_NAMES[s]}", lambda r, s=s: f"{sum(t['hours'][s] for t in r['instance_hours'].values()):.2f}")
    types = sorted({t for _, r in runs for t in r["instance_hours"]},
                   key=lambda t: next(r["instance_hours"][t]["price"] for _, r in runs if t in r["instance_hours"]))
    for t in types:
        def cell(r, t=t):
            v = r["instance_hours"].get(t)
            if v is None:
                return "-"
            h = v["hours"]
            return f"{v['total_hours']:.2f} ({h['busy']:.1f}/{h['booting']:.1f}/{h['idle']:.1f}/{h['shutting_down']:.1f})"
        row(f"  {t} (busy/boot/idle/shut)", cell)
    section("queue wait (submit to Running)")
    row("  all p50 / p95 / max", lambda r: _waits(r["wait"]))
    classes = []
    for _, r in runs:
        for k in r["wait_by_size"]:
            if k not in classes:
                classes.append(k)
    for k in classes:
        row(f"  {k}", lambda r, k=k: _waits(r["wait_by_size"].get(k)))
    reasons = []
    for _, r in runs:
        for k in r["cancelled"]:
            if k not in reasons:
                reasons.append(k)
    if reasons:
        section("cancelled, by reason")
        for k in reasons:
            row("  " + (k if len(k) <= 60 else k[:57] + "..."), lambda r, k=k: str(r["cancelled"].get(k, 0)))
    section("cloud errors")
    row("  quota", lambda r: str(r["cloud_errors"]["create_quota"]))
    row("  rate limits", lambda r: str(r["cloud_errors"]["create_rate_limit"] + r["cloud_errors"]["list_rate_limit"]))
    row("  capacity", lambda r: str(r["cloud_errors"]["create_capacity"]))
    row("  other", lambda r: str(r["cloud_errors"]["create_other"] + r["cloud_errors"]["list_other"]))
    return out


def _waits(w: dict | None) -> str:
    if not w or not w["count"]:
        return "-"
    return f"{duration(w['p50'])} / {duration(w['p95'])} / {duration(w['max'])} (n={w['count']})"


def table(runs: list[tuple[str, dict]], workload: str) -> str:
    header = ["", *[label for label, _ in runs]]
    body = [[label, *cells] for label, cells in rows(runs)]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [f"workload {workload}, seed {runs[0][1]['seed']}"]
    fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip()  # noqa: E731
    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(r) for r in body]
    return "\n".join(lines) + "\n"


def to_json(runs: list[tuple[str, dict]], workload: str) -> str:
    doc = {"workload": workload, "runs": [{"label": label, **r} for label, r in runs]}
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


# --- HTML with plots ---------------------------------------------------------------------------------

PLOTS = (("instances.png", "Instances by state"), ("queue.png", "Queued containers"),
         ("running.png", "Running containers"), ("cost.png", "Cumulative cost"))


def _hours(series):
    return [p["t"] / 3600 for p in series]


def plots(runs: list[tuple[str, dict]], out: Path) -> list[Path]:
    """One PNG per plot; runs overlaid (instances: one panel per run)."""
    from matplotlib.figure import Figure  # the OO API: no pyplot global state, no display
    paths = []
    n = len(runs)
    fig = Figure(figsize=(9, 2.6 * n), dpi=100)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, (label, r) in zip(axes, runs):
        s = r["series"]
        ax.stackplot(_hours(s), *[[p["instances"][st] for p in s] for st in STATES],
                     labels=[STATE_NAMES[st] for st in STATES], colors=[COLORS[st] for st in STATES])
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("instances")
        ax.legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("simulated hours")
    paths.append(_save(fig, out / PLOTS[0][0]))
    for (name, title), key, ylabel in zip(PLOTS[1:], ("queued", "running", "cost"),
                                          ("containers", "containers", "$")):
        fig = Figure(figsize=(9, 3.2), dpi=100)
        ax = fig.subplots()
        for label, r in runs:
            ax.plot(_hours(r["series"]), [p[key] for p in r["series"]], label=label, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("simulated hours")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / name))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    return path


def page(runs: list[tuple[str, dict]], workload: str) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in runs)
    body = []
    for label, cells in rows(runs):
        if not any(cells):
            body.append(f'<tr class="section"><th colspan="{len(cells) + 1}">{html.escape(label)}</th></tr>')
        else:
            body.append(f"<tr><th>{html.escape(label.strip())}</th>"
                        + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    imgs = "\n".join(f'<h2>{html.escape(title)}</h2>\n<img src="{name}" alt="{html.escape(title)}">'
                     for name, title in PLOTS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dispatch-cloud simulate: {html.escape(workload)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: 2px 10px; border-bottom: 1px solid #ddd; font-size: 90%; }}
td {{ text-align: right; font-family: monospace; }}
th {{ text-align: left; font-weight: normal; }}
tr.section th {{ font-weight: bold; padding-top: 10px; }}
</style></head>
<body>
<h1>What-if simulation: {html.escape(workload)}</h1>
<p>Seed {runs[0][1]['seed']}. Cost is the cloud's bill: each instance at its type's price from Create
until it is gone. The lower bound is each container's run time at the price of the cheapest type
it fits; the packed lower bound charges each container only its share of an instance (its
largest fraction of the type's VCPUs, RAM, scratch or GPUs).</p>
<table>
<tr><th></th>{head}</tr>
{chr(10).join(body)}
</table>
{imgs}
</body></html>
"""


def write(runs: list[tuple[str, dict]], workload: str, out: Path) -> list[Path]:
    """report.json, report.txt, index.html and the PNGs into ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in (("report.json", to_json(runs, workload)), ("report.txt", table(runs, workload)),
                       ("index.html", page(runs, workload))):
        (out / name).write_text(text, encoding="utf-8")
        files.append(out / name)
    return files + plots(runs, out)
