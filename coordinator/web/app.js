// The dashboard page: fetch /api/snapshot every 1.5 s and redraw. Read-only.
// Every value from the ledger (descriptions, reasons, diffs) is submitter-written text: it is
// only ever placed with textContent / createTextNode, never parsed as HTML.
"use strict";

const EVERY_MS = 1500;
const STALE_S = 10;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) {
    if (k === null || k === undefined) continue;
    e.appendChild(typeof k === "object" ? k : document.createTextNode(String(k)));
  }
  return e;
}

function sv(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

const isNum = (x) => typeof x === "number" && isFinite(x);
const num = (x, d = 4) => (isNum(x) ? x.toFixed(d) : "–");
const pm = (m, s, d = 4) => (isNum(m) ? m.toFixed(d) + (isNum(s) ? " ± " + s.toFixed(d) : "") : "–");
const pct = (x) => (isNum(x) ? (x <= 1 ? (100 * x).toFixed(1) + "%" : String(x)) : "–");

// The first clause of a long reason (the whole of it is the cell's tooltip).
function short(text, n) {
  text = String(text || "");
  const cut = text.indexOf(";");
  if (cut > 0 && cut < n) text = text.slice(0, cut);
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

function dur(s) {
  if (!isNum(s)) return "–";
  s = Math.max(0, Math.round(s));
  const m = Math.floor(s / 60);
  return m ? `${m}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

function when(t) {
  if (!isNum(t)) return "–";
  return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
}

function fill(id, ...kids) {
  const node = document.getElementById(id);
  node.replaceChildren(...kids.filter((k) => k !== null && k !== undefined));
  return node;
}

function table(id, header, rows, empty) {
  if (!rows.length) return fill(id, el("tr", {}, el("td", { class: "empty" }, empty)));
  const head = el("tr", {}, ...header.map(([t, c]) => el("th", c ? { class: c } : {}, t)));
  return fill(id, head, ...rows);
}

// ---- sections ----------------------------------------------------------------------------

function renderHeads(st, hist) {
  const base = {};
  for (const s of hist.progress || []) base[s.hw_class] = s.baseline;
  const cards = (st.heads || []).map((h) => {
    const b = base[h.hw_class];
    const delta = isNum(h.val_bpb) && isNum(b) && Math.abs(h.val_bpb - b) > 1e-12
      ? `${(h.val_bpb - b).toFixed(4)} vs baseline ${b.toFixed(4)}` : "";
    const runs = h.runs ? `${h.runs} run${h.runs > 1 ? "s" : ""}` : h.state;
    return el("div", { class: "card", "data-class": h.hw_class },
      el("div", { class: "cls" }, h.hw_class),
      el("div", { class: "big head-bpb" }, num(h.val_bpb),
        isNum(h.sem) ? el("span", { class: "sem" }, ` ± ${h.sem.toFixed(4)}`) : null),
      el("div", { class: "cls" }, `head #${st.head_candidate} · ${runs}`,
        isNum(h.sigma) ? ` · σ ${h.sigma.toFixed(4)}${h.sigma_source === "prior" ? " (prior)" : ""}` : ""),
      delta ? el("div", { class: "delta" }, delta) : null,
      h.drift ? el("div", { class: "failed cls" }, `drift: ${h.drift}`) : null);
  });
  fill("heads", ...(cards.length ? cards : [el("div", { class: "empty" }, "no worker has joined yet")]));
}

function progressCell(w, settings) {
  const p = w.progress;
  if (w.state !== "running") {
    return el("td", { class: "muted" }, w.state === "gone" ? (w.gone_reason || "")
      : w.state === "paused" ? (w.paused || "") : "");
  }
  if (!p) return el("td", { class: "muted" }, "starting…");
  const frac = isNum(p.progress) ? Math.min(1, Math.max(0, p.progress)) : 0;
  const budget = settings && settings.time_budget;
  const left = isNum(budget) ? budget * (1 - frac)
    : (isNum(p.elapsed) && frac > 0 ? p.elapsed / frac * (1 - frac) : null);
  const bits = [`step ${isNum(p.step) ? p.step : "–"}`, `${(100 * frac).toFixed(0)}%`,
    `loss ${num(p.loss, 3)}`,
    isNum(p.tok_per_sec) ? `${Math.round(p.tok_per_sec).toLocaleString("en-US")} tok/s` : null,
    `${dur(left)} left`].filter(Boolean);
  const fillBar = el("span", {});
  fillBar.style.width = `${(100 * frac).toFixed(1)}%`;   // CSSOM: allowed by the page's CSP
  const bar = el("span", { class: "bar" + (w.purpose === "head" ? " head" : "") }, fillBar);
  return el("td", { class: "progress" }, bar, el("span", { class: "ptext" }, bits.join(" · ")));
}

function renderWorkers(st) {
  const rows = (st.workers || []).map((w) => {
    const what = w.state === "running"
      ? `${w.purpose === "head" ? "head" : "candidate"} #${w.candidate_id}` : "";
    return el("tr", { class: "worker" }, el("td", {}, w.name),
      el("td", {}, w.hw_class), el("td", { class: `state-${w.state}` }, w.state),
      el("td", {}, what), progressCell(w, st.settings));
  });
  table("workers", [["worker"], ["class"], ["state"], ["running"], ["progress"]], rows,
    "no workers yet: start one with autoresearch-worker join");
  const idle = Object.entries(st.not_working || {});
  if (idle.length) {
    document.getElementById("workers").appendChild(el("tr", {}, el("td", { colspan: 5, class: "failed" },
      "getting no work: " + idle.map(([n, why]) => `${n} (${why})`).join("; "))));
  }
}

function renderQueue(st, hist) {
  const q = st.queue || [];
  fill("queue-n", q.length ? `(${q.length})` : "");
  table("queue", [["#"], ["description"]],
    q.slice(0, 12).map((c) => el("tr", {}, el("td", {}, `#${c.candidate_id}`), el("td", {}, c.description))),
    "empty");
  if (q.length > 12) document.getElementById("queue").appendChild(
    el("tr", {}, el("td", { colspan: 2, class: "muted" }, `… and ${q.length - 12} more`)));
  // Candidates with runs but no decision: repeats under way, or waiting for the head's runs.
  const m = st.in_progress || st.measured || [];
  const sem = {};
  for (const s of hist.progress || []) for (const p of s.pending || []) sem[p.candidate_id] = p;
  fill("measured-n", m.length ? `(${m.length})` : "");
  table("measured", [["#"], ["description"], ["val_bpb", "n"], ["runs", "n"], ["state"]],
    m.map((c) => {
      const h = sem[c.candidate_id] || {};
      const runs = isNum(c.runs_wanted) && c.runs_wanted > 0 ? `${c.runs || 0} of ${c.runs_wanted}`
        : String(c.runs || h.n || 0);
      return el("tr", {}, el("td", {}, `#${c.candidate_id}`), el("td", {}, c.description),
        el("td", { class: "n" }, pm(isNum(h.mean) ? h.mean : c.val_bpb, h.sem)),
        el("td", { class: "n" }, runs),
        el("td", { class: "muted" }, c.waiting_for || c.state || ""));
    }),
    "nothing waiting");
}

function renderProblems(st, snap) {
  const items = (st.problems || []).map((p) => el("div", { class: "problem" }, p));
  if (snap.history_error) items.push(el("div", { class: "problem" }, "history: " + snap.history_error));
  fill("problems", ...items);
}

function renderDecisions(hist) {
  const rows = (hist.decisions || []).map((d) => el("tr", {},
    el("td", {}, when(d.decided_at)), el("td", {}, `#${d.candidate_id}`),
    el("td", { class: d.verdict }, d.verdict), el("td", {}, d.description),
    el("td", {}, d.hw_class || ""), el("td", { class: "n" }, pm(d.mean, d.sem)),
    el("td", { class: "n" }, num(d.head_bpb)), el("td", { class: "n" }, pct(d.confidence)),
    el("td", { class: "muted", title: d.reason || "" }, short(d.reason, 90))));
  table("decisions", [["time"], ["#"], ["verdict"], ["description"], ["class"], ["val_bpb", "n"],
    ["head", "n"], ["confidence", "n"], ["reason"]], rows, "no decisions yet");
}

let keptKey = null;
function renderKept(hist) {
  const kept = hist.kept || [];
  const key = kept.map((k) => k.commit).join(",");
  if (key === keptKey) return;           // unchanged: keep open <details> and loaded diffs
  keptKey = key;
  if (!kept.length) return fill("kept", el("div", { class: "empty" }, "nothing kept yet"));
  fill("kept", ...kept.map((k) => {
    const pre = el("pre", { class: "diff" }, "loading…");
    const d = el("details", {}, el("summary", {},
      `#${k.candidate_id} ${k.description} — gain ${pm(k.gain, k.gain_sem)} on ${k.hw_class}` +
      (isNum(k.confidence) ? `, confidence ${pct(k.confidence)}` : "") +
      ` (${String(k.commit).slice(0, 10)})`), pre);
    d.addEventListener("toggle", () => {
      if (!d.open || d.dataset.loaded) return;
      fetch(`/api/diff/${k.candidate_id}`).then((r) => r.text()).then((text) => {
        d.dataset.loaded = "1";
        pre.replaceChildren(...text.split("\n").map((line) => {
          const cls = line.startsWith("@@") ? "hunk" : line.startsWith("+") && !line.startsWith("+++")
            ? "add" : line.startsWith("-") && !line.startsWith("---") ? "del" : "";
          return el("span", cls ? { class: cls } : {}, line + "\n");
        }));
      });
    });
    return d;
  }));
}

// ---- the progress plot (the same series as the report's PNG) -----------------------------

function plot(s) {
  const W = 1000, H = 290, L = 62, R = 16, T = 26, B = 34;
  const svg = sv("svg", { class: "plot", viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `progress on ${s.hw_class}` });
  const pts = s.points || [], pend = s.pending || [], st = s.staircase || [];
  const levels = st.map((v) => v.val_bpb).concat(isNum(s.baseline) ? [s.baseline] : []);
  const means = pts.concat(pend).map((p) => p.mean).filter(isNum);
  if (!levels.length && !means.length) {
    svg.appendChild(sv("text", { x: L, y: H / 2 }, `${s.hw_class}: nothing measured yet`));
    return svg;
  }
  const lo0 = Math.min(...levels, ...means);
  const top = levels.length ? Math.max(...levels) : Math.max(...means);
  const span = Math.max(top - lo0, 0.01);
  const lo = lo0 - 0.15 * span, hi = top + 0.6 * span;
  const xmax = Math.max(1, ...pts.map((p) => p.x)) + pend.length + 1.1;
  const X = (x) => L + (x + 0.3) / (xmax + 0.3) * (W - L - R);
  const Y = (y) => T + (hi - Math.min(y, hi)) / (hi - lo) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = lo + (hi - lo) * i / 4;
    svg.appendChild(sv("line", { class: "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v) }));
    svg.appendChild(sv("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, v.toFixed(3)));
  }
  svg.appendChild(sv("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  svg.appendChild(sv("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  svg.appendChild(sv("text", { x: (L + W) / 2, y: H - 6, "text-anchor": "middle" },
    "experiment (decision order on this class) · val_bpb, lower is better"));
  if (isNum(s.baseline)) {
    svg.appendChild(sv("line", { class: "base", x1: L, x2: W - R, y1: Y(s.baseline), y2: Y(s.baseline) }));
  }
  if (st.length) {
    let d = `M${X(st[0].x)},${Y(st[0].val_bpb)}`;
    for (let i = 1; i < st.length; i++) d += ` H${X(st[i].x)} V${Y(st[i].val_bpb)}`;
    svg.appendChild(sv("path", { class: "stair", d }));
  }
  const dot = (p, x, colour, r, hollow) => {
    if (isNum(p.sem) && p.mean <= hi) {
      svg.appendChild(sv("line", { x1: X(x), x2: X(x), y1: Y(p.mean - p.sem), y2: Y(p.mean + p.sem),
        stroke: colour, "stroke-width": 1.2 }));
    }
    const c = sv("circle", { cx: X(x), cy: Y(p.mean), r, fill: hollow ? "#fff" : colour,
      stroke: hollow ? colour : (r > 5 ? "#000" : colour), "stroke-width": hollow ? 2 : 0.7 });
    c.appendChild(sv("title", {}, `#${p.candidate_id} ${p.description}: ${pm(p.mean, p.sem)}` +
      (p.n ? ` (${p.n} run${p.n > 1 ? "s" : ""})` : "")));
    svg.appendChild(c);
  };
  for (const p of pts) if (isNum(p.mean) && p.verdict !== "kept") dot(p, p.x, "#9e9e9e", 4);
  const x0 = (pts.length ? pts[pts.length - 1].x : 0) + 1;
  pend.forEach((p, i) => { if (isNum(p.mean)) dot(p, x0 + i, "#f28e2b", 5, true); });
  for (const p of pts) if (isNum(p.mean) && p.verdict === "kept") dot(p, p.x, "#1a9850", 6);
  for (const v of st) {
    if (v.kind === "kept" && v.label) {
      const label = v.label.length > 40 ? v.label.slice(0, 39) + "…" : v.label;
      svg.appendChild(sv("text", { class: "klabel", x: X(v.x) + 8, y: Y(v.val_bpb) + 14 }, label));
    } else if ((v.kind === "elsewhere" || v.kind === "start") && v.label) {
      const right = X(v.x) > 0.6 * W;      // near the right edge: end the text at the step
      svg.appendChild(sv("text", { class: "olabel", x: X(v.x) + (right ? -5 : 5), y: Y(v.val_bpb) - 5,
        "text-anchor": right ? "end" : "start" }, v.label));
    }
  }
  const head = st.length ? st[st.length - 1].val_bpb : null;
  const nk = pts.filter((p) => p.verdict === "kept").length;
  let sub = `${pts.length} decided, ${nk} kept`;
  if (isNum(head)) sub += `, head ${head.toFixed(4)}`;
  if (isNum(head) && isNum(s.baseline) && Math.abs(head - s.baseline) > 1e-12) {
    sub += ` (${(head - s.baseline).toFixed(4)} vs baseline)`;
  }
  if (pend.length) sub += `, ${pend.length} being measured`;
  svg.appendChild(sv("text", { class: "title", x: L, y: 16 }, `${s.hw_class} — ${sub}`));
  return svg;
}

function renderPlots(hist) {
  const series = hist.progress || [];
  // A class with nothing decided or being measured gets one line, not an empty chart.
  const one = (s) => ((s.points || []).length || (s.pending || []).length ? plot(s)
    : el("div", { class: "empty" }, `${s.hw_class}: nothing decided here yet` +
      (isNum(s.baseline) ? ` (baseline ${s.baseline.toFixed(4)})` : "")));
  fill("plots", ...(series.length ? series.map(one) : [el("div", { class: "empty" }, "no measurements yet")]));
}

// ---- the loop ----------------------------------------------------------------------------

function render(snap) {
  const st = snap.status;
  const hist = snap.history || {};
  const live = document.getElementById("live");
  const stale = !isNum(snap.age) || snap.age > STALE_S;
  live.className = "live" + (stale ? " stale" : "");
  live.textContent = stale ? "no fresh data from the coordinator" : `live · updated ${when(snap.published_at)}`;
  if (!st) return;
  document.title = `${st.branch || "autoresearch"} — fleet`;
  fill("title", st.branch || "autoresearch fleet");
  const c = st.counts || {};
  fill("summary", `head #${st.head_candidate} (${String(st.head || "").slice(0, 10)}) · ` +
    `${c.kept || 0} kept, ${c.discarded || 0} discarded, ${c.failed || 0} failed, ` +
    `${(c.queued || 0)} queued · ${c.attempts || 0} runs`);
  renderHeads(st, hist);
  renderProblems(st, snap);
  renderWorkers(st);
  renderQueue(st, hist);
  renderPlots(hist);
  renderDecisions(hist);
  renderKept(hist);
  document.body.dataset.seq = String(snap.seq);
}

function tick() {
  fetch("/api/snapshot", { cache: "no-store" })
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error(r.status))))
    .then(render)
    .catch(() => {
      const live = document.getElementById("live");
      live.className = "live stale";
      live.textContent = "dashboard not answering";
    })
    .finally(() => setTimeout(tick, EVERY_MS));
}

tick();
