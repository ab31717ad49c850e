// Small line charts drawn as inline SVG (no library, nothing from elsewhere).

import { h } from "./dom.js";

const NS = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function fmt(v) {
  if (v === 0) return "0";
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 1) return v.toFixed(1).replace(/\.0$/, "");
  return v.toPrecision(2);
}

/**
 * series: [{name, values: (number|null)[], cls}] over shared x positions labelled `xLabels`.
 * Returns a <figure> with the chart, a legend and a caption (the chart's summary in words).
 */
export function lineChart({ title, series, xLabels, unit = "", summary = "" }) {
  const W = 640;
  const H = 240;
  const m = { l: 52, r: 16, t: 14, b: 34 };
  const n = Math.max(1, xLabels.length);
  const all = series.flatMap((se) => se.values.filter((v) => v !== null && v !== undefined && isFinite(v)));
  const lo = Math.min(0, ...all);
  const hi = niceMax(Math.max(...all, 0));
  const x = (i) => m.l + (n === 1 ? (W - m.l - m.r) / 2 : (i * (W - m.l - m.r)) / (n - 1));
  const y = (v) => H - m.b - ((v - lo) / (hi - lo || 1)) * (H - m.t - m.b);
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": `${title}. ${summary}` });
  svg.append(s("title", {}, title));
  for (const f of [0, 0.5, 1]) {
    const v = lo + f * (hi - lo);
    svg.append(s("line", { x1: m.l, x2: W - m.r, y1: y(v), y2: y(v), class: "grid" }));
    svg.append(s("text", { x: m.l - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, `${fmt(v)}${unit}`));
  }
  const marks = [...new Set([0, Math.floor((n - 1) / 2), n - 1])];
  for (const i of marks) {
    if (xLabels[i] === undefined) continue;
    svg.append(s("text", { x: x(i), y: H - m.b + 18, "text-anchor": i === 0 ? "start" : i === n - 1 ? "end" : "middle", class: "tick" }, xLabels[i]));
  }
  series.forEach((se, k) => {
    let d = "";
    let pen = false;
    se.values.forEach((v, i) => {
      if (v === null || v === undefined || !isFinite(v)) {
        pen = false;
        return;
      }
      d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    if (d) svg.append(s("path", { d, class: `line line-${k} ${se.cls || ""}` }));
    // Isolated points (a single minute with data) stay visible as dots.
    se.values.forEach((v, i) => {
      const prev = se.values[i - 1];
      const next = se.values[i + 1];
      if (v !== null && v !== undefined && isFinite(v) && (prev === null || prev === undefined) && (next === null || next === undefined)) {
        svg.append(s("circle", { cx: x(i), cy: y(v), r: 3, class: `dot line-${k}` }));
      }
    });
  });
  return h(
    "figure",
    { class: "figure" },
    h("figcaption", {}, title),
    svg,
    h("ul", { class: "legend" }, series.map((se, k) => h("li", {}, h("span", { class: `swatch line-${k}`, "aria-hidden": "true" }), se.name))),
    summary ? h("p", { class: "help" }, summary) : null,
  );
}
