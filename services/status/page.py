"""The status page at `/`: one HTML document rendered on the server from a services.status.dashboard.Dashboard.

No script and nothing fetched from elsewhere (no CDN, no external stylesheet or font): bars are CSS, the
throughput chart is inline SVG, and a meta refresh reloads it, so a proxy that adds the bearer header serves
it as is. A media query lays it out in one column on a phone.
"""
from __future__ import annotations

import html
from datetime import datetime

from services.status.dashboard import Dashboard, NodeRow, Throughput
from services.status.progress import RATE_BASES, format_duration, format_progress_line

PAGE_REFRESH_SECONDS = 5
CHART_WIDTH, CHART_HEIGHT = 600, 140  # SVG user units; the SVG stretches to the card's width

STYLE = """
:root{--ok:#2e9d5b;--err:#d9822b;--fail:#c9303e;--run:#3b7dd8;--idle:#d7dce2;--ink:#1d2329;--dim:#66707a}
*{box-sizing:border-box}
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:1.2em 1.6em;color:var(--ink);
background:#f4f6f8}
h1{font-size:1.35em;margin:0 0 .2em}h2{font-size:1em;margin:0 0 .6em;color:var(--dim);text-transform:uppercase;
letter-spacing:.04em}
.sub{color:var(--dim);margin:0 0 1em}
.grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:1em}
.card{background:#fff;border-radius:8px;padding:1em 1.1em;box-shadow:0 1px 2px rgba(0,0,0,.08);min-width:0}
.wide{grid-column:1/-1}
.state{display:inline-block;padding:.05em .55em;border-radius:1em;color:#fff;background:var(--dim);font-size:.8em;
vertical-align:middle}
.state.running{background:var(--run)}.state.complete{background:var(--ok)}.state.stopped{background:var(--err)}
.bar{display:flex;height:1.3em;border-radius:4px;overflow:hidden;background:var(--idle);margin:.3em 0}
.bar span{display:block;height:100%}
.ok{background:var(--ok)}.err{background:var(--err)}.fail{background:var(--fail)}.run{background:var(--run)}
.legend{color:var(--dim);font-size:.9em;margin-bottom:.8em}
.legend span{display:inline-block;white-space:nowrap;margin-right:.9em}
.legend i{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.3em;vertical-align:-.05em}
.idle{background:var(--idle)}
.hbar{display:grid;grid-template-columns:6.5em 1fr 4em;gap:.2em .6em;align-items:center;font-size:.9em}
.hbar div.track{background:var(--idle);height:.9em;border-radius:3px;overflow:hidden}
.hbar div.track span{display:block;height:100%}
.hbar .n{text-align:right;font-variant-numeric:tabular-nums}
svg.chart{width:100%;height:9em;display:block;background:#fafbfc;border:1px solid #e3e7eb;border-radius:4px}
.axis{display:flex;justify-content:space-between;color:var(--dim);font-size:.8em}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.9em}
th,td{padding:.3em .6em;text-align:left;border-bottom:1px solid #edf0f2;white-space:nowrap}
th{color:var(--dim);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.stale td{color:var(--dim);background:#fbf3f3}
.badge{font-size:.78em;padding:0 .45em;border-radius:1em;color:#fff;background:var(--ok)}
.badge.stale{background:var(--fail)}.badge.finished{background:var(--dim)}
.none{color:var(--dim);font-style:italic}
@media (max-width:720px){
body{padding:.7em .6em;font-size:14px}.grid{grid-template-columns:1fr;gap:.7em}.card{padding:.8em}
.optional{display:none}.hbar{grid-template-columns:5.5em 1fr 3.2em}
}
"""


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value))


def format_timestamp(seconds: float | None) -> str:
    return "-" if seconds is None else datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%H:%M:%S")


def percent(part: float, whole: float) -> float:
    return 0.0 if whole <= 0 else max(0.0, min(100.0, 100.0 * part / whole))


def segments(*parts: tuple[str, float, float]) -> str:
    """A stacked bar: (css class, value, whole) per segment; what is left shows as the track."""
    spans = "".join(f'<span class="{cls}" style="width:{percent(value, whole):.2f}%"></span>'
                    for cls, value, whole in parts)
    return f'<div class="bar">{spans}</div>'


def legend(*items: tuple[str, str]) -> str:
    return '<div class="legend">' + "".join(legend_item(cls, text) for cls, text in items) + "</div>"


def legend_item(cls: str, text: str) -> str:
    return f'<span><i class="{cls}"></i>{esc(text)}</span>'



def progress_card(progress: dict) -> str:
    shards, rows = progress["shards"], progress["rows"]
    total = shards["total"]
    done_rows = rows["ok"] + rows["error"]
    planned = rows["planned"] if rows["planned"] is not None else done_rows
    hours = progress["audio_hours"]
    estimate = ""
    if rows["ok"] and planned > done_rows:  # audio still to come, extrapolated from the rows done so far
        estimate = f", about {hours * planned / done_rows:.2f} h when done"
    return f"""<section class="card wide"><h2>Progress</h2>
{segments(("ok", shards["done"], total), ("run", shards["running"], total), ("fail", shards.get("failed", 0), total))}
{legend(("ok", f"{shards['done']} / {total} shards done"), ("run", f"{shards['running']} running"),
        ("fail", f"{shards.get('failed', 0)} failed"), ("idle", f"{shards['pending']} pending"),
        *fault_items(progress.get("faults") or {}))}
{segments(("ok", rows["ok"], planned), ("err", rows["error"], planned))}
{legend(("ok", f"{rows['ok']} rows ok"), ("err", f"{rows['error']} errors"),
        ("idle", f"of {planned} rows"))}
<div class="legend">{esc(f"{hours:.2f} h of audio encoded{estimate}")}</div>
<p class="sub">{esc(format_progress_line(progress))}</p></section>"""


def fault_items(faults: dict) -> list[tuple[str, str]]:
    """Retried attempts and lost encoders, when driver.json reports them."""
    items = []
    if faults.get("shard_retries"):
        items.append(("err", f"{faults['shard_retries']} attempts retried"))
    if faults.get("encoders_lost"):
        items.append(("fail", f"{faults['encoders_lost']} encoders lost and replaced"))
    return items


def chart_points(values: tuple[float, ...], peak: float) -> list[tuple[float, float]]:
    """Bucket centres in SVG units, y grown downwards; 4 % headroom above the peak."""
    n = len(values)
    return [((k + 0.5) * CHART_WIDTH / n, CHART_HEIGHT - CHART_HEIGHT * 0.96 * v / peak) for k, v in enumerate(values)]


def throughput_svg(t: Throughput) -> str:
    """Audio-s/s as an area and rows/s as a line, each scaled to its own peak, over the measured buckets; from
    there to now, the heartbeats' audio-s/s as a dashed red line (Throughput says why)."""
    n, measured = len(t.rows_per_s), t.measured_buckets
    audio_peak = max(max(t.audio_seconds_per_s), t.live_audio_seconds_per_s or 0.0) or 1.0
    rows_peak = max(max(t.rows_per_s), t.live_rows_per_s or 0.0) or 1.0
    area = chart_points(t.audio_seconds_per_s, audio_peak)[:measured]
    line = chart_points(t.rows_per_s, rows_peak)[:measured]
    edge = CHART_WIDTH * measured / n
    shapes = ""
    if area:
        polygon = " ".join(f"{x:.1f},{y:.1f}" for x, y in [(0, CHART_HEIGHT), (0, area[0][1]), *area,
                                                              (edge, area[-1][1]), (edge, CHART_HEIGHT)])
        polyline = " ".join(f"{x:.1f},{y:.1f}" for x, y in line)
        shapes = (f'<polygon points="{polygon}" fill="#2e9d5b" fill-opacity=".35" stroke="#2e9d5b" '
                  'vector-effect="non-scaling-stroke"/>'
                  f'<polyline points="{polyline}" fill="none" stroke="#3b7dd8" stroke-width="2" '
                  'vector-effect="non-scaling-stroke"/>')
    grid = "".join(f'<line x1="0" x2="{CHART_WIDTH}" y1="{CHART_HEIGHT * f:.1f}" y2="{CHART_HEIGHT * f:.1f}" '
                   'stroke="#e3e7eb" vector-effect="non-scaling-stroke"/>' for f in (0.25, 0.5, 0.75))
    live = ""
    if t.live_audio_seconds_per_s is not None:
        y = CHART_HEIGHT - CHART_HEIGHT * 0.96 * t.live_audio_seconds_per_s / audio_peak
        start = min(edge, CHART_WIDTH - 6)
        live = (f'<line x1="{start:.1f}" x2="{CHART_WIDTH}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c9303e" '
                'stroke-width="2.5" stroke-dasharray="6 4" vector-effect="non-scaling-stroke"/>')
    return (f'<svg class="chart" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" preserveAspectRatio="none" role="img" '
            f'aria-label="throughput over time">{grid}{shapes}{live}</svg>')


def throughput_card(t: Throughput) -> str:
    now = ""
    if t.live_rows_per_s is not None:
        now = legend_item("fail", f"now (heartbeats): {t.live_rows_per_s:.1f} rows/s, "
                                  f"{t.live_audio_seconds_per_s:.0f} audio-s/s")
    if t.empty:
        return (f'<section class="card"><h2>Throughput</h2><p class="none">no shard published yet</p>'
                f'<div class="legend">{now}</div></section>')
    return f"""<section class="card"><h2>Throughput</h2>
<div class="legend">{legend_item("ok", f"audio-s/s (peak {max(t.audio_seconds_per_s):.0f})")}
{legend_item("run", f"rows/s (peak {max(t.rows_per_s):.1f})")}{now}</div>
{throughput_svg(t)}
<div class="axis"><span>{clock(t.start)}</span><span>{clock((t.start + t.end) / 2)}</span>
<span>{clock(t.end)}</span></div>
</section>"""


def horizontal_bars(items: list[tuple[str, int]], cls: str) -> str:
    peak = max((n for _, n in items), default=0)
    return '<div class="hbar">' + "".join(
        f'<span>{esc(label)}</span><div class="track"><span class="{cls}" style="width:{percent(n, peak):.1f}%">'
        f'</span></div><span class="n">{n}</span>' for label, n in items) + "</div>"


def errors_card(d: Dashboard) -> str:
    if not d.errors_by_reason:
        return '<section class="card"><h2>Errors by reason</h2><p class="none">no error rows</p></section>'
    recent = "".join(f'<tr><td class="num">{e.shard}</td><td class="num">{e.index}</td><td>{esc(e.id)}</td>'
                     f"<td>{esc(e.reason)}</td></tr>" for e in d.recent_errors)
    return f"""<section class="card"><h2>Errors by reason</h2>
{horizontal_bars(list(d.errors_by_reason.items()), "err")}
<h2 style="margin-top:1em">Most recent error rows</h2><div class="scroll"><table>
<tr><th class="num">shard</th><th class="num">line</th><th>id</th><th>reason</th></tr>{recent}</table></div>
</section>"""


def duration_card(d: Dashboard) -> str:
    if not any(d.duration_counts):
        return '<section class="card"><h2>Clip durations</h2><p class="none">no clip encoded yet</p></section>'
    edges = d.duration_edges
    labels = [f"< {edges[0]:g} s", *(f"{lo:g}–{hi:g} s" for lo, hi in zip(edges, edges[1:])), f"≥ {edges[-1]:g} s"]
    items = list(zip(labels, d.duration_counts))
    first = next(i for i, (_, n) in enumerate(items) if n)  # trim empty bins at both ends
    last = max(i for i, (_, n) in enumerate(items) if n)
    return f"""<section class="card"><h2>Clip durations (encoded rows)</h2>
{horizontal_bars(items[first:last + 1], "run")}</section>"""


def nodes_card(nodes: list[NodeRow], finished: bool) -> str:
    """`finished`: the job is complete, so no encoder is alive and none should be: say that, not "0 / 1"."""
    rows = "".join(f'<tr><td>{esc(n.node)}</td>'
                   f'<td class="num">{f"{n.encoders} finished" if finished else f"{n.alive} / {n.encoders}"}</td>'
                   f'<td class="num">{n.rows}</td><td class="num">{n.rows_per_s:.1f}</td>'
                   f'<td class="num">{n.audio_seconds_per_s:.0f}</td></tr>' for n in nodes)
    body = (f'<div class="scroll"><table><tr><th>node</th><th class="num">alive</th><th class="num">rows</th>'
            f'<th class="num">rows/s</th><th class="num">audio-s/s</th></tr>{rows}</table></div>'
            if nodes else '<p class="none">no encoder has reported yet</p>')
    return f'<section class="card"><h2>Nodes</h2>{body}</section>'


def encoders_card(encoders: list[dict], now: float) -> str:
    rows = []
    for e in encoders:
        state = e.get("state") or ("alive" if e["alive"] else "stale")
        # A finished encoder's last heartbeat only grows older: its age says nothing, so none is shown.
        age = "-" if e["updated"] is None or state == "finished" else format_duration(max(0.0, now - e["updated"]))
        shard = "-" if e["shard"] is None else e["shard"]
        badge = f'<span class="badge{"" if state == "alive" else f" {state}"}">{state}</span>'
        rows.append(
            f'<tr class="{state}"><td>{esc(e["name"])}</td><td>{badge}</td>'
            f'<td>{esc(e["node"])}</td><td class="optional">{esc(e["hostname"])}</td>'
            f'<td class="optional">{esc(e["device"])}</td><td class="num">{shard}</td>'
            f'<td class="num">{e["rows"]}</td><td class="num">{e["rows_per_s"]:.1f}</td>'
            f'<td class="num">{e["audio_seconds_per_s"]:.0f}</td><td class="num">{esc(age)}</td></tr>')
    body = ('<div class="scroll"><table><tr><th>encoder</th><th>state</th><th>node</th><th class="optional">host</th>'
            '<th class="optional">device</th><th class="num">shard</th><th class="num">rows</th>'
            '<th class="num">rows/s</th><th class="num">audio-s/s</th><th class="num">heartbeat age</th></tr>'
            + "".join(rows) + "</table></div>") if rows else '<p class="none">no encoder has reported yet</p>'
    return f'<section class="card wide"><h2>Encoders</h2>{body}</section>'


def headline(p: dict) -> str:
    """A finished job's duration and its own rate (naming what the rate is over), else the ETA."""
    rate = p["rate"]
    rates = f'{rate["rows_per_s"]:.1f} rows/s, {rate["audio_seconds_per_s"]:.0f} audio-s/s'
    if p.get("duration_seconds"):
        return esc(f"finished in {format_duration(p['duration_seconds'])}: {rates} over "
                   f"{RATE_BASES[p['rate_basis']]} (start-up included)")
    return esc(f"ETA {format_duration(p['eta_seconds'])} · {rates} over {RATE_BASES[p['rate_basis']]}")


def render_page(d: Dashboard) -> str:
    p = d.progress
    state = esc(p["state"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{PAGE_REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>encode: {state}</title><style>{STYLE}</style></head>
<body><h1>Encode job <span class="state {state}">{state}</span></h1>
<p class="sub">{headline(p)} · updated {esc(format_timestamp(p["updated"]))}
· refreshes every {PAGE_REFRESH_SECONDS} s</p>
<main class="grid">
{progress_card(p)}
{throughput_card(d.throughput)}
{duration_card(d)}
{encoders_card(p["encoders"], p["updated"])}
{errors_card(d)}
{nodes_card(d.nodes, p["state"] == "complete")}
</main></body></html>"""
