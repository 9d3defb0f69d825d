"""``autoresearch-coord report DIR``: the night on one self-contained HTML page.

Written from the ledger opened read-only (``coordinator.history``), so it works while the
coordinator runs and after it stopped, and never changes the run. The page has no external
resources: the progress plot is embedded as a base64 PNG (also written beside it as
``progress.png``), styles are inline, there is no script. Everything a submitter wrote
(descriptions, reasons, diffs) is HTML-escaped.

Sections, in the order a researcher reads them in the morning: the headline per hardware class
(head vs baseline), the progress plot, the kept changes (gain +- sem, confidence, the train.py
diff of each keep commit against its parent), candidates still open, failures by kind with
their reasons, the workers (runs per hour, lost leases, utilisation over the night), the noise
per class, every decision.

Without matplotlib (an optional extra) the page is still written, with every table and a note
in place of the plot saying how to install it; ``ReportResult.plot_error`` carries the same
message for the CLI to print. The tables are most of the value, and a partial report beats none
on a machine where installing packages needs someone awake.
"""
from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator import history

REPORT_NAME = "report.html"
PLOT_NAME = "progress.png"


@dataclass
class ReportResult:
    html_path: Path
    png_path: Path | None
    plot_error: str | None
    kept: list[int] = field(default_factory=list)
    decided: int = 0
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"html": str(self.html_path), "png": str(self.png_path) if self.png_path else None,
                "plot_error": self.plot_error, "kept": self.kept, "decided": self.decided,
                "classes": self.classes}


def default_out_dir(repo_dir: Path) -> Path:
    from coordinator.repo import state_dir

    return state_dir(Path(repo_dir)) / "report"


def write_report(repo_dir: Path, out_dir: Path | None = None, plot: bool = True,
                 log: Any = None) -> ReportResult:
    """Read the ledger of ``repo_dir`` and write report.html (+ progress.png) into ``out_dir``
    (default ``DIR/.autoresearch/report``). ``log(str)`` gets one line per stage."""
    say = log or (lambda _line: None)
    repo_dir = Path(repo_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(repo_dir)
    say(f"reading the ledger of {repo_dir} (read-only)")
    with history.read_run(repo_dir) as L:
        night = history.night(L, repo_dir)
    png, plot_error = None, None
    if plot:
        from coordinator.plot import PlotUnavailable, progress_png

        say("drawing the progress plot")
        try:
            png = progress_png(night["progress"], title=_title(night))
        except PlotUnavailable as exc:
            plot_error = str(exc)
    else:
        plot_error = "plot not drawn (--no-plot)"
    out_dir.mkdir(parents=True, exist_ok=True)
    png_path = None
    if png is not None:
        png_path = out_dir / PLOT_NAME
        _write_atomic(png_path, png)
    html_path = out_dir / REPORT_NAME
    say(f"writing {html_path}")
    _write_atomic(html_path, render(night, png, plot_error).encode("utf-8"))
    return ReportResult(html_path, png_path, plot_error,
                        kept=[k["candidate_id"] for k in night["kept"]],
                        decided=len(night["decisions"]),
                        classes=[s["hw_class"] for s in night["progress"]])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ---- formatting ------------------------------------------------------------------------------

def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "–"


def pm(value: Any, sem: Any, digits: int = 4, signed: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    v = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return v + (f" ± {sem:.{digits}f}" if isinstance(sem, (int, float)) else "")


def pct(x: Any) -> str:
    return f"{100 * x:.0f}%" if isinstance(x, (int, float)) else "–"


def when(t: Any, fmt: str = "%a %H:%M") -> str:
    return time.strftime(fmt, time.localtime(t)) if isinstance(t, (int, float)) else "–"


def confidence(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "–"
    return f"{100 * x:.1f}%" if 0 <= x <= 1 else f"{x:g}"


def runs(k: dict) -> str:
    """``3 vs 4, paired``: the candidate's runs, the head's, and the test that compared them."""
    if not k.get("n"):
        return "–"
    text = str(k["n"]) + (f" vs {k['head_n']}" if k.get("head_n") else "")
    return text + (", paired" if k.get("test") == "paired" else "")


def _title(night: dict) -> str:
    return f"{night.get('branch') or 'autoresearch'}: val_bpb per hardware class"


def headline(night: dict) -> list[str]:
    """One sentence per class: where the head ended vs the baseline, from how many keeps."""
    out = []
    for s in night["progress"]:
        stairs = s["staircase"]
        head = stairs[-1]["val_bpb"] if stairs else None
        n_kept = sum(1 for p in s["points"] if p["verdict"] == "kept")
        line = f"{s['hw_class']}: head {num(head)}"
        if head is not None and s.get("baseline") is not None:
            line += f" ({head - s['baseline']:+.4f} vs baseline {num(s['baseline'])})"
        line += f", {n_kept} kept of {len(s['points'])} decided here"
        out.append(line)
    return out


CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;
 margin:0 auto;max-width:1180px;padding:18px 28px 60px;color:#1d2125;background:#fff}
h1{font-size:22px;margin:6px 0 2px} h2{font-size:17px;margin:30px 0 8px;border-bottom:1px solid
 #e3e6ea;padding-bottom:4px} .sub{color:#5c6670;margin:0 0 12px}
table{border-collapse:collapse;margin:6px 0 10px;width:100%} th,td{text-align:left;
 padding:4px 8px;border-bottom:1px solid #eef0f2;vertical-align:top} th{font-weight:600;
 color:#444;background:#f7f8fa} td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.kept{color:#1a7f37;font-weight:600} .discarded{color:#6e7781} .failed{color:#cf222e}
ul.head{margin:4px 0 0 0;padding-left:18px} ul.head li{margin:2px 0}
img.plot{max-width:100%;border:1px solid #e3e6ea} .note{background:#fff8c5;border:1px solid
 #eac54f;padding:8px 12px;border-radius:4px}
pre.diff{font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;background:#f6f8fa;padding:8px;
 overflow-x:auto;border:1px solid #e3e6ea;margin:4px 0 12px} .add{color:#116329;
 background:#e6ffec} .del{color:#82071e;background:#ffebe9} .hunk{color:#6e7781}
details summary{cursor:pointer;color:#0969da} .bar{display:inline-block;height:10px;
 background:#2b6cb0;vertical-align:middle} .barbg{display:inline-block;width:120px;
 height:10px;background:#e8edf3;vertical-align:middle;margin-right:6px}
td.heat{text-align:center;min-width:22px;padding:4px 2px;font-variant-numeric:tabular-nums}
.muted{color:#8c959f} .kind{font-weight:600}
"""


def render_diff(diff: str | None) -> str:
    if diff is None:
        return ""
    if not diff.strip():
        return '<p class="muted">(no change to train.py, or the commit is missing)</p>'
    lines = []
    for line in diff.splitlines():
        cls = ("hunk" if line.startswith("@@") else "add" if line.startswith("+")
               and not line.startswith("+++") else "del" if line.startswith("-")
               and not line.startswith("---") else "")
        lines.append(f'<span class="{cls}">{esc(line)}</span>' if cls else esc(line))
    return '<pre class="diff">' + "\n".join(lines) + "</pre>"


def render(night: dict, png: bytes | None, plot_error: str | None) -> str:
    page: list[str] = []
    add = page.append
    counts = night["counts"]
    add("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(night.get('branch'))} — autoresearch report</title>"
        f"<style>{CSS}</style></head><body>")
    add(f"<h1>{esc(night.get('branch') or 'autoresearch')}</h1>")
    span = (f"{when(night['first_time'], '%Y-%m-%d %H:%M')} → "
            f"{when(night['last_time'], '%Y-%m-%d %H:%M %Z')}" if night["first_time"] else
            "no runs yet")
    decided = sum(counts.get(k, 0) for k in ("kept", "discarded", "failed"))
    waiting = sum(counts.get(k, 0) for k in ("queued", "running", "measured"))
    add(f"<p class='sub'>{esc(span)} · {decided} decided: "
        f"<span class='kept'>{counts.get('kept', 0)} kept</span>, "
        f"{counts.get('discarded', 0)} discarded, "
        f"<span class='failed'>{counts.get('failed', 0)} failed</span>"
        f"{f', {waiting} still open' if waiting else ''} · {night['attempts']} runs · head "
        f"<code>{esc(str(night['head'])[:10])}</code> (#{esc(night['head_candidate'])}) · "
        f"report made {esc(when(night['made_at'], '%Y-%m-%d %H:%M'))}</p>")
    lines = headline(night)
    if lines:
        add("<ul class='head'>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>")

    add("<h2>Progress</h2>")
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        add(f"<img class='plot' alt='progress plot: val_bpb per experiment and hardware class'"
            f" src='data:image/png;base64,{data}'>")
        add("<p class='muted'>Each dot is a decided candidate (mean ± sem of its runs when it "
            "has repeats); green ones were kept. The blue staircase is the head as the rule saw "
            "it at each decision; the dashed line is the baseline. Numbers are compared only "
            "within one hardware class.</p>")
    else:
        add(f"<p class='note'>No plot: {esc(plot_error)}</p>")

    add(f"<h2>Kept changes ({len(night['kept'])})</h2>")
    if night["kept"]:
        add("<table><tr><th>#</th><th>change</th><th>class</th><th class='n'>val_bpb</th>"
            "<th class='n'>head before</th><th class='n'>gain ± sem</th><th class='n'>runs (vs head)</th>"
            "<th class='n'>confidence</th><th>kept</th><th>commit</th></tr>")
        for k in night["kept"]:
            add(f"<tr><td>#{k['candidate_id']}</td><td class='kept'>{esc(k['description'])}</td>"
                f"<td>{esc(k['hw_class'])}</td><td class='n'>{pm(k['mean'], k['sem'])}</td>"
                f"<td class='n'>{pm(k['head_bpb'], k['head_sem'])}</td>"
                f"<td class='n'>{pm(k['gain'], k['gain_sem'], signed=True)}</td>"
                f"<td class='n'>{esc(runs(k))}</td>"
                f"<td class='n'>{confidence(k['confidence'])}</td>"
                f"<td>{when(k['decided_at'])}</td><td><code>{esc(str(k['commit'])[:10])}"
                "</code></td></tr>")
        add("</table>")
        for k in night["kept"]:
            add(f"<details><summary>#{k['candidate_id']} {esc(k['description'])} — train.py "
                f"diff ({esc(str(k['parent'])[:10])} → {esc(str(k['commit'])[:10])})</summary>"
                f"<p class='muted'>{esc(k['reason'])}</p>{render_diff(k['diff'])}</details>")
    else:
        add("<p class='muted'>Nothing kept yet: the head is still the baseline.</p>")

    open_ = [(s["hw_class"], c) for s in night["progress"] for c in s["pending"]]
    if open_:
        add(f"<h2>Still open ({len(open_)})</h2><p class='muted'>Measured but not decided when "
            "the report was made (repeats under way, or waiting for the head's runs).</p>"
            "<table><tr><th>#</th><th>description</th><th>class</th><th class='n'>val_bpb</th>"
            "<th class='n'>runs</th><th>state</th></tr>")
        for hw, c in open_:
            add(f"<tr><td>#{c['candidate_id']}</td><td>{esc(c['description'])}</td>"
                f"<td>{esc(hw)}</td><td class='n'>{pm(c['mean'], c['sem'])}</td>"
                f"<td class='n'>{c['n']}</td><td>{esc(c['state'])}</td></tr>")
        add("</table>")

    fails = night["failures"]
    total = sum(len(v) for v in fails.values())
    add(f"<h2>Failures ({total})</h2>")
    if fails:
        for kind, rows in fails.items():
            add(f"<p><span class='kind failed'>{esc(kind)}</span> × {len(rows)}</p><table>"
                "<tr><th>#</th><th>what</th><th>description</th><th>class</th><th>reason</th>"
                "<th>when</th></tr>")
            for r in rows:
                add(f"<tr><td>#{r['candidate_id']}</td><td>{esc(r['what'])}</td>"
                    f"<td>{esc(r['description'])}</td><td>{esc(r['hw_class'])}</td>"
                    f"<td>{esc(r['reason'])}</td><td>{when(r['time'])}</td></tr>")
            add("</table>")
    else:
        add("<p class='muted'>No failures.</p>")

    add(_workers_html(night["activity"]))
    add(_noise_html(night["noise"]))

    add(f"<h2>Every decision ({len(night['decisions'])})</h2>")
    if night["decisions"]:
        add("<details><summary>show the table</summary><table><tr><th>#</th><th>verdict</th>"
            "<th>description</th><th>class</th><th class='n'>val_bpb</th><th class='n'>head</th>"
            "<th class='n'>runs</th><th class='n'>confidence</th><th>reason</th><th>when</th>"
            "</tr>")
        for d in reversed(night["decisions"]):
            add(f"<tr><td>#{d['candidate_id']}</td><td class='{esc(d['verdict'])}'>"
                f"{esc(d['verdict'])}</td><td>{esc(d['description'])}</td>"
                f"<td>{esc(d['hw_class'])}</td><td class='n'>{pm(d['mean'], d['sem'])}</td>"
                f"<td class='n'>{num(d['head_bpb'])}</td><td class='n'>{esc(runs(d))}</td>"
                f"<td class='n'>{confidence(d['confidence'])}</td><td>{esc(d['reason'])}</td>"
                f"<td>{when(d['decided_at'])}</td></tr>")
        add("</table></details>")
    add("</body></html>")
    return "\n".join(page)


def _workers_html(a: dict) -> str:
    p = ["<h2>Workers</h2>"]
    if not a["workers"]:
        return p[0] + "<p class='muted'>No runs yet.</p>"
    p.append("<table><tr><th>worker</th><th>class</th><th class='n'>runs</th><th class='n'>ok"
             "</th><th class='n'>failed</th><th class='n'>lost leases</th><th class='n'>hours"
             "</th><th class='n'>runs / hour</th><th>busy</th></tr>")
    for w in a["workers"]:
        busy = w["busy"]
        bar = (f"<span class='barbg'><span class='bar' style='width:{100 * busy:.0f}%'></span>"
               f"</span>{pct(busy)}" if isinstance(busy, (int, float)) else "–")
        p.append(f"<tr><td>{esc(w['name'])}</td><td>{esc(w['hw_class'])}</td>"
                 f"<td class='n'>{w['runs']}</td><td class='n'>{w['ok']}</td>"
                 f"<td class='n'>{w['failed']}</td><td class='n'>{w['lost']}</td>"
                 f"<td class='n'>{w['hours']:.1f}</td>"
                 f"<td class='n'>{num(w['runs_per_hour'], 1)}</td><td>{bar}</td></tr>")
    p.append("</table>")
    width = a["bucket_seconds"]
    label = f"{width / 3600:g} h" if width >= 3600 else f"{width / 60:g} min"
    p.append(f"<p class='muted'>Runs finished per {label}, and the fleet's utilisation (time "
             "with a lease ÷ time present; presence is estimated from each worker's first and "
             "last recorded activity).</p><table><tr><th>worker</th>")
    p.extend(f"<th class='n' title='{when(b, '%H:%M')}'>{when(b, '%H:%M')}</th>"
             for b in a["buckets"])
    p.append("</tr>")
    top = max([max(w["per_bucket"] or [0]) for w in a["workers"]] + [1])
    for w in a["workers"]:
        cells = []
        for c in w["per_bucket"]:
            alpha = 0.12 + 0.75 * c / top if c else 0
            style = f" style='background:rgba(43,108,176,{alpha:.2f})'" if c else ""
            cells.append(f"<td class='heat'{style}>{c or '·'}</td>")
        p.append(f"<tr><td>{esc(w['name'])}</td>{''.join(cells)}</tr>")
    cells = []
    for u in a["utilisation"]:
        if u is None:
            cells.append("<td class='heat muted'>–</td>")
        else:
            cells.append(f"<td class='heat' title='{pct(u)}'><span class='bar' style='height:"
                         f"{max(2, 28 * u):.0f}px;width:14px'></span><br>{100 * u:.0f}</td>")
    p.append(f"<tr><td><b>fleet busy %</b></td>{''.join(cells)}</tr></table>")
    return "".join(p)


def _noise_html(noise: list[dict]) -> str:
    p = ["<h2>Noise per class</h2>"]
    if not noise:
        return p[0] + "<p class='muted'>No measurements yet.</p>"
    p.append("<table><tr><th>class</th><th class='n'>σ between reruns</th><th class='n'>"
             "degrees of freedom</th><th class='n'>texts rerun</th><th class='n'>ok runs</th>"
             "<th class='n'>σ of a paired difference</th><th class='n'>σ the rule uses</th>"
             "</tr>")
    for n in noise:
        used = num(n["rule_sigma"])
        if n.get("rule_source") == "prior":
            used += f" (prior, until {n['min_dof']} df)"
        p.append(f"<tr><td>{esc(n['hw_class'])}</td><td class='n'>{num(n['sigma'])}</td>"
                 f"<td class='n'>{n['dof']}</td><td class='n'>{n['repeated']}</td>"
                 f"<td class='n'>{n['runs']}</td><td class='n'>{num(n['paired_sigma'])}</td>"
                 f"<td class='n'>{esc(used)}</td></tr>")
    p.append("</table><p class='muted'>σ between reruns is the pooled standard deviation of "
             "val_bpb between runs of the same train.py on the same class (a dash: nothing was "
             "run twice there yet). Runs that share a seed move together, so a paired "
             "difference scatters less than √2·σ when seeds matter.</p>")
    return "".join(p)
