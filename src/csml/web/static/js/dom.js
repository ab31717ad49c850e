// Tiny DOM helpers: elements are built with properties and text, never from HTML strings.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key in el && !key.startsWith("aria") && key !== "role" && key !== "for") {
      el[key] = value;
    } else el.setAttribute(key === "for" ? "for" : key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export const $ = (sel, root = document) => root.querySelector(sel);

let uid = 0;
export const newId = (prefix) => `${prefix}-${++uid}`;

export function shortId(id) {
  return id ? id.slice(0, 12) : "";
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KB", "MB", "GB", "TB"];
  let v = n;
  let i = -1;
  do {
    v /= 1024;
    i++;
  } while (v >= 1024 && i < units.length - 1);
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

export function formatTime(iso) {
  if (!iso) return "";
  return new Date(iso).toLocaleString(undefined, {
    dateStyle: "medium",
    timeStyle: "short",
  });
}

/** Announce a message to screen readers and show it in the status bar. */
export function announce(text, kind = "info") {
  const bar = document.getElementById("notice");
  if (!bar) return;
  bar.className = `notice notice-${kind}`;
  bar.setAttribute("role", kind === "error" ? "alert" : "status");
  bar.hidden = !text;
  clear(
    bar,
    h("span", {}, text || ""),
    h("button", { type: "button", class: "notice-close", "aria-label": "Dismiss", onclick: () => { bar.hidden = true; } }, "×"),
  );
  if (text && kind !== "error") {
    clearTimeout(announce.timer);
    announce.timer = setTimeout(() => {
      bar.hidden = true;
    }, 6000);
  }
}

/** Show the view at `hash`, even when it is the one already shown (it is drawn again). */
export function go(hash) {
  if (location.hash === hash) window.dispatchEvent(new HashChangeEvent("hashchange"));
  else location.hash = hash;
}

/** A time of today as hours and minutes; another day's with its date. */
export function formatWhen(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString(undefined, { timeStyle: "short" }) : formatTime(iso);
}
