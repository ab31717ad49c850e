// The operator view: workers, queues, the last hour's throughput and latency, failures,
// the credit ledger's totals, and join tokens. The operator token is kept for this browser tab only (sessionStorage).

import { api } from "./api.js";
import { lineChart } from "./charts.js";
import { announce, clear, formatDuration, formatTime, h, shortId } from "./dom.js";

const KEY = "csml.operator";
const REFRESH_MS = 5000;
const main = document.getElementById("main");
let timer = null;

const token = () => sessionStorage.getItem(KEY);

function signIn(message) {
  clearTimeout(timer);
  const input = h("input", { type: "password", id: "op-token", name: "token", autocomplete: "current-password" });
  const error = h("p", { class: "field-error", id: "op-token-error", hidden: !message }, message || "");
  input.setAttribute("aria-describedby", "op-token-help op-token-error");
  const form = h("form", { class: "panel", novalidate: true },
    h("div", { class: "field" },
      h("label", { for: "op-token" }, "Operator token"),
      input,
      h("p", { class: "help", id: "op-token-help" }, "Set on the coordinator with CSML_OPERATOR_TOKEN. It is kept in this tab only."),
      error,
    ),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "button primary" }, "Open the operator view")),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!input.value.trim()) {
      error.textContent = "Enter the operator token.";
      error.hidden = false;
      input.focus();
      return;
    }
    sessionStorage.setItem(KEY, input.value.trim());
    load();
  });
  clear(document.getElementById("who"));
  clear(main, h("h1", {}, "Operator"), form);
  input.focus();
}

function meter(value, max, label) {
  const pct = max ? Math.min(100, Math.round((100 * value) / max)) : 0;
  const bar = h("div", { class: "bar", role: "progressbar", "aria-label": label, "aria-valuemin": "0", "aria-valuemax": String(max), "aria-valuenow": String(value) }, h("div", { class: "bar-fill" }));
  bar.firstChild.style.width = `${pct}%`;
  return h("div", { class: "meter" }, bar, h("span", {}, `${value} / ${max}`));
}

function appsTable(apps) {
  return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Table; scrolls sideways on narrow screens" }, h("table", { class: "wide", "aria-labelledby": "apps-title" },
    h("thead", {}, h("tr", {}, ["App", "Live workers", "Slots", "Queued (of capacity)", "Running"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, apps.map((a) => h("tr", { dataset: { app: a.name } },
      h("th", { scope: "row" }, a.name),
      h("td", { dataset: { col: "workers" } }, String(a.workers)),
      h("td", {}, String(a.slots)),
      h("td", { dataset: { col: "depth" } }, meter(a.queue.depth, a.queue.capacity, `${a.name} queue depth`)),
      h("td", { dataset: { col: "running" } }, String(a.queue.running)),
    ))),
  ));
}

function workersTable(workers) {
  if (!workers.length) return h("p", { class: "muted" }, "No worker has joined.");
  return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Table; scrolls sideways on narrow screens" }, h("table", { class: "wide", "aria-labelledby": "workers-title" },
    h("thead", {}, h("tr", {}, ["Worker", "App", "State", "Slots in use", "Last heartbeat", "Labels", "Sandbox"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, workers.map((w) => h("tr", { dataset: { worker: w.id } },
      h("th", { scope: "row" }, h("code", {}, shortId(w.id))),
      h("td", {}, w.app),
      h("td", {}, h("span", { class: `state-${w.state}` }, { live: "Live", silent: "Silent", left: "Left" }[w.state])),
      h("td", {}, `${w.running} / ${w.slots}`),
      h("td", {}, `${formatDuration(w.heartbeat_age_seconds)} ago`),
      h("td", { class: "help" }, Object.entries(w.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "—"),
      h("td", { class: "help sandbox" }, w.sandbox || "—"),
    ))),
  ));
}

function charts(stats) {
  const labels = stats.minutes.map((m) => new Date(m.start).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" }));
  const total = stats.minutes.reduce((n, m) => n + m.finished, 0);
  const lat = stats.minutes.filter((m) => m.latency_mean_seconds !== null);
  const worst = lat.length ? Math.max(...lat.map((m) => m.latency_p95_seconds)) : null;
  return h("div", { class: "grid-2" },
    lineChart({
      title: "Jobs finished per second",
      series: [
        { name: "finished / s", values: stats.minutes.map((m) => m.jobs_per_second) },
        { name: "failed / s", values: stats.minutes.map((m) => m.failed / 60) },
      ],
      xLabels: labels,
      summary: `${total} job${total === 1 ? "" : "s"} finished in the last ${stats.window_minutes} minutes.`,
    }),
    lineChart({
      title: "Latency, submission to end (seconds)",
      series: [
        { name: "mean", values: stats.minutes.map((m) => m.latency_mean_seconds) },
        { name: "95th percentile", values: stats.minutes.map((m) => m.latency_p95_seconds) },
      ],
      xLabels: labels,
      unit: " s",
      summary: worst === null ? "No job finished in this window." : `The slowest minute's 95th percentile was ${worst.toFixed(2)} s.`,
    }),
  );
}

function failuresTable(failures) {
  if (!failures.length) return h("p", { class: "muted" }, "No job failed in the last hour.");
  return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Table; scrolls sideways on narrow screens" }, h("table", { "aria-labelledby": "failures-title" },
    h("thead", {}, h("tr", {}, ["Reason", "Jobs", "Apps"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, failures.map((f) => h("tr", {}, h("td", {}, f.reason), h("td", {}, String(f.count)), h("td", {}, f.apps.join(", "))))),
  ));
}

const credits = (milli) => (milli / 1000).toFixed(3);

/** The credit ledger's totals (never whose). */
function creditSection(t) {
  const summary = h("p", { id: "credit-totals" },
    `Earned ${credits(t.earned_milli)} · spent ${credits(t.spent_milli)} credits in ${t.entries} entries; `,
    `${t.credited_identities} of ${t.identities} identities with a ledger hold credit (${credits(t.outstanding_milli)} in all). `,
    `Priority: at most ${t.priority.k} of every ${t.priority.n} jobs per app.`);
  if (!t.apps.length) return [summary];
  return [summary, h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Table; scrolls sideways on narrow screens" }, h("table", { "aria-labelledby": "credit-title" },
    h("thead", {}, h("tr", {}, ["App", "Earned", "Spent", "Entries"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, t.apps.map((a) => h("tr", {}, h("td", {}, a.app), h("td", {}, credits(a.earned_milli)), h("td", {}, credits(a.spent_milli)), h("td", {}, String(a.entries))))),
  ))];
}

function tokensSection(tokens, onChange) {
  const label = h("input", { type: "text", id: "jt-label", name: "label", maxLength: 200, autocomplete: "off" });
  const appsInput = h("input", { type: "text", id: "jt-apps", name: "apps", maxLength: 400, autocomplete: "off", placeholder: "opencv, echo" });
  const shown = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "actions token-form", novalidate: true },
    h("div", { class: "field" }, h("label", { for: "jt-label" }, "Label for a new join token"), label),
    h("div", { class: "field" }, h("label", { for: "jt-apps" }, "Apps it may serve (comma-separated; blank: any app)"), appsInput),
    h("button", { type: "submit", class: "button primary" }, "Create join token"),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const apps = appsInput.value.split(",").map((a) => a.trim()).filter(Boolean);
      const body = apps.length ? { label: label.value, apps } : { label: label.value, any_app: true };
      const created = await api("/v1/operator/join-tokens", { method: "POST", token: token(), body });
      label.value = "";
      appsInput.value = "";
      clear(shown, h("div", { class: "token-once" },
        h("p", {}, "Copy this join token now; it is not shown again:"),
        h("code", { class: "break", "data-testid": "new-join-token" }, created.token),
        h("p", { class: "help" }, `On the worker machine: csml worker --app APP --coordinator ${location.origin} --join-token <token>`),
      ));
      onChange();
    } catch (err) {
      announce(err.message, "error");
    }
  });
  const rows = tokens.map((t) => h("tr", { dataset: { token: t.id } },
    h("th", { scope: "row" }, h("code", {}, shortId(t.id))),
    h("td", {}, t.label || "—"),
    h("td", {}, t.apps ? t.apps.join(", ") + (t.may_publish ? " (may publish)" : "") : "any app"),
    h("td", {}, formatTime(t.created_at)),
    h("td", {}, t.revoked_at ? `revoked ${formatTime(t.revoked_at)}` : "active"),
    h("td", {}, String(t.workers)),
    h("td", {}, t.revoked_at ? "" : h("button", {
      type: "button",
      class: "button small danger",
      "aria-label": `Revoke join token ${shortId(t.id)}${t.label ? ` (${t.label})` : ""}`,
      onclick: async () => {
        try {
          await api(`/v1/operator/join-tokens/${t.id}`, { method: "DELETE", token: token() });
          announce(`Join token ${shortId(t.id)} revoked: its workers are refused from their next call.`, "success");
          onChange();
        } catch (err) {
          announce(err.message, "error");
        }
      },
    }, "Revoke")),
  ));
  return [form, shown, h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Table; scrolls sideways on narrow screens" }, h("table", { class: "wide", "aria-labelledby": "tokens-title" },
    h("thead", {}, h("tr", {}, ["Token", "Label", "Apps", "Created", "State", "Workers", "Action"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, rows),
  ))];
}

async function load() {
  clearTimeout(timer);
  const t = token();
  if (!t) return signIn();
  const typing = document.activeElement;
  if (typing && typing.tagName === "INPUT" && main.contains(typing) && typing.value) {
    timer = setTimeout(load, REFRESH_MS); // do not redraw under someone typing
    return;
  }
  let overview;
  let stats;
  let tokens;
  let credit;
  try {
    [overview, stats, tokens, credit] = await Promise.all([
      api("/v1/operator/overview", { token: t }),
      api("/v1/operator/stats?minutes=60", { token: t }),
      api("/v1/operator/join-tokens", { token: t }),
      api("/v1/operator/credit", { token: t }),
    ]);
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      sessionStorage.removeItem(KEY);
      return signIn(e.status === 401 ? "That is not the operator token." : e.message);
    }
    announce(e.message, "error");
    timer = setTimeout(load, REFRESH_MS);
    return;
  }
  const active = document.activeElement && main.contains(document.activeElement) ? document.activeElement.id : null;
  const tokensBox = h("section", { class: "card", "aria-labelledby": "tokens-title" }, h("h2", { id: "tokens-title" }, "Join tokens"));
  tokensBox.append(...tokensSection(tokens.tokens, load));
  clear(document.getElementById("who"), h("button", {
    type: "button",
    class: "button small secondary",
    onclick: () => {
      sessionStorage.removeItem(KEY);
      signIn();
    },
  }, "Sign out"));
  const keep = main.querySelector("[data-testid=new-join-token]")?.closest(".token-once");
  clear(main,
    h("div", { class: "section-head" }, h("h1", {}, "Operator"), h("span", { class: "live" }, `Updated ${new Date(overview.generated_at).toLocaleTimeString()}`)),
    h("section", { class: "card", "aria-labelledby": "apps-title" }, h("h2", { id: "apps-title" }, "Queues"), appsTable(overview.apps)),
    h("section", { class: "card", "aria-labelledby": "workers-title" }, h("h2", { id: "workers-title" }, "Workers"), workersTable(overview.workers)),
    h("section", { class: "card", "aria-labelledby": "charts-title" }, h("h2", { id: "charts-title" }, "The last hour"), charts(stats)),
    h("section", { class: "card", "aria-labelledby": "failures-title" }, h("h2", { id: "failures-title" }, "Failures by reason"), failuresTable(stats.failures)),
    h("section", { class: "card", "aria-labelledby": "credit-title" }, h("h2", { id: "credit-title" }, "Credit"), ...creditSection(credit)),
    tokensBox,
  );
  if (keep) tokensBox.querySelector("[aria-live]").append(keep);
  if (active && document.getElementById(active)) document.getElementById(active).focus();
  timer = setTimeout(load, REFRESH_MS);
}

load();
