"""The progress plot as a PNG (matplotlib, an optional extra: ``pip install
'autoresearch-fleet[report]'``).

One panel per hardware class, drawn from ``coordinator.history.progress``: every decided
candidate's val_bpb in decision order (mean, with a +-sem bar when it has repeats), discarded in
grey, kept in green and labelled, candidates still being measured as hollow orange circles, the
head as a staircase, the baseline as a dashed line. Lower is better. Points far above the head
(a broken variant at 3 bpb) would flatten the picture, so the y axis stops at a margin above the
head's worst level and such points are drawn as triangles on the top edge.

The live dashboard draws the same series client-side (SVG) instead: matplotlib in the
coordinator's process would hold the interpreter lock for the length of every redraw.
"""
from __future__ import annotations

import io
from typing import Any

MISSING = ("the progress plot needs matplotlib: pip install 'autoresearch-fleet[report]' "
           "(or pip install matplotlib)")

KEPT_COLOUR, DISCARD_COLOUR, PENDING_COLOUR, HEAD_COLOUR = "#1a9850", "#9e9e9e", "#f28e2b", \
    "#2b6cb0"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed (the message says how to install it)."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(MISSING) from None
    matplotlib.use("Agg")          # no display: render to memory
    import matplotlib.pyplot as plt
    return plt


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _ylim(series: dict) -> tuple[float, float] | None:
    levels = [v["val_bpb"] for v in series["staircase"]]
    means = [p["mean"] for p in series["points"] + series["pending"] if p["mean"] is not None]
    if series.get("baseline") is not None:
        levels.append(series["baseline"])
    if not levels and not means:
        return None
    lo = min(levels + means)
    top_ref = max(levels) if levels else max(means)
    span = max(top_ref - lo, 0.01)
    return lo - 0.15 * span, top_ref + 0.6 * span


def progress_png(progress: list[dict], title: str = "", dpi: int = 110) -> bytes:
    """The plot as PNG bytes (PlotUnavailable without matplotlib)."""
    plt = _pyplot()
    panels = progress or [{"hw_class": "(no measurements yet)", "points": [], "pending": [],
                           "staircase": [], "baseline": None}]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.9 * len(panels)), squeeze=False)
    for ax, series in zip(axes[:, 0], panels):
        _panel(ax, series)
    if title:
        fig.suptitle(title, fontsize=13, x=0.01, ha="left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _panel(ax: Any, s: dict) -> None:
    pts, pending = s["points"], s["pending"]
    kept = [p for p in pts if p["verdict"] == "kept" and p["mean"] is not None]
    disc = [p for p in pts if p["verdict"] != "kept" and p["mean"] is not None]
    lim = _ylim(s)
    top = lim[1] if lim else None

    def clip(ps):
        inside = [p for p in ps if top is None or p["mean"] <= top]
        above = [p for p in ps if top is not None and p["mean"] > top]
        return inside, above

    d_in, d_above = clip(disc)
    if d_in:
        ax.errorbar([p["x"] for p in d_in], [p["mean"] for p in d_in],
                    yerr=[p["sem"] or 0 for p in d_in], fmt="o", color=DISCARD_COLOUR,
                    ms=5, alpha=0.75, elinewidth=1, capsize=2, label="discarded", zorder=2)
    if d_above:
        ax.plot([p["x"] for p in d_above], [top] * len(d_above), "^", color=DISCARD_COLOUR,
                ms=6, label="discarded (above the axis)", zorder=2, clip_on=False)
    if kept:
        ax.errorbar([p["x"] for p in kept], [p["mean"] for p in kept],
                    yerr=[p["sem"] or 0 for p in kept], fmt="o", color=KEPT_COLOUR, ms=8,
                    mec="black", mew=0.6, elinewidth=1.2, capsize=3, label="kept", zorder=4)
    if pending:
        x0 = (pts[-1]["x"] if pts else 0) + 1
        xs = [x0 + i for i in range(len(pending))]
        ax.errorbar(xs, [p["mean"] for p in pending], yerr=[p["sem"] or 0 for p in pending],
                    fmt="o", mfc="none", color=PENDING_COLOUR, ms=7, capsize=2,
                    label="being measured", zorder=3)
    stairs = s["staircase"]
    if stairs:
        xs, ys = [], []
        for i, v in enumerate(stairs):
            if i:
                xs.append(v["x"])
                ys.append(ys[-1])      # horizontal to here at the old level, then the step
            xs.append(v["x"])
            ys.append(v["val_bpb"])
        ax.plot(xs, ys, "-", color=HEAD_COLOUR, lw=1.8, label="head", zorder=3)
        for v in stairs:
            if v["kind"] == "kept":
                ax.annotate(_short(v["label"]), (v["x"], v["val_bpb"]), xytext=(7, -11),
                            textcoords="offset points", fontsize=8.5, color="#1b4332",
                            zorder=5)
            elif v["kind"] in ("elsewhere", "start") and v["label"]:
                ax.annotate(_short(v["label"], 48), (v["x"], v["val_bpb"]), xytext=(5, 4),
                            textcoords="offset points", fontsize=7.5, color="#666666",
                            style="italic", zorder=5)
    if s.get("baseline") is not None:
        ax.axhline(s["baseline"], ls="--", lw=1, color="#555555",
                   label=f"baseline {s['baseline']:.4f}", zorder=1)
    if lim:
        ax.set_ylim(*lim)
    n_kept = len(kept)
    head = stairs[-1]["val_bpb"] if stairs else None
    sub = f"{len(pts)} decided, {n_kept} kept"
    if head is not None:
        sub += f", head {head:.4f}"
        if s.get("baseline") is not None and abs(head - s["baseline"]) > 1e-12:
            sub += f" ({head - s['baseline']:+.4f} vs baseline)"
    ax.set_title(f"{s['hw_class']}   —   {sub}", fontsize=10, loc="left")
    ax.set_xlabel("experiment (decision order on this class)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(True, alpha=0.25)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlim(left=-0.3, right=max([p["x"] for p in pts] + [1]) + len(pending) + 1.1)
    if pts or pending or stairs:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
