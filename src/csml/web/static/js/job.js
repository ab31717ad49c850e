// One job: its state, its result in readable form, its outputs (images shown, every file
// downloadable), training metrics plotted per epoch, and the models it made.

import { api, apiBlob, extensionFor, saveBlob } from "./api.js";
import { lineChart } from "./charts.js";
import { announce, clear, formatBytes, formatTime, go, h, shortId } from "./dom.js";
import { cancelJob, elapsed, jobs, opName, progressBar, stateLine } from "./jobs.js";
import { presetSubmit } from "./submit.js";

function isScalar(v) {
  return v === null || ["string", "number", "boolean"].includes(typeof v);
}

function scalarText(v) {
  if (v === null) return "—";
  if (typeof v === "number") return Number.isInteger(v) ? v.toLocaleString() : v.toLocaleString(undefined, { maximumFractionDigits: 4 });
  return String(v);
}

function label(key) {
  const t = key.replaceAll("_", " ");
  return t.charAt(0).toUpperCase() + t.slice(1);
}

/** JSON as nested definition lists, with arrays of flat objects as tables. */
export function renderValue(v, depth = 0) {
  if (isScalar(v)) return h("span", {}, scalarText(v));
  if (Array.isArray(v)) {
    if (!v.length) return h("span", { class: "muted" }, "none");
    if (v.every(isScalar)) return h("span", {}, v.map(scalarText).join(", "));
    if (v.every((r) => r && typeof r === "object" && !Array.isArray(r) && Object.values(r).every(isScalar))) {
      const cols = [...new Set(v.flatMap((r) => Object.keys(r)))];
      const shown = v.slice(0, 50);
      return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Table; scrolls sideways on narrow screens" },
        h("table", {},
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "#"), cols.map((c) => h("th", { scope: "col" }, label(c))))),
          h("tbody", {}, shown.map((r, i) => h("tr", {}, h("td", {}, String(i + 1)), cols.map((c) => h("td", {}, scalarText(r[c] ?? null)))))),
        ),
        v.length > shown.length ? h("p", { class: "help" }, `${v.length - shown.length} more rows in the JSON.`) : null,
      );
    }
    return h("pre", { class: "json" }, JSON.stringify(v, null, 2));
  }
  if (depth > 2) return h("pre", { class: "json" }, JSON.stringify(v, null, 2));
  // Top-level keys are the app's field names; deeper keys may be data (class names...): verbatim.
  return h("dl", { class: "facts" }, Object.entries(v).flatMap(([k, val]) => [h("dt", {}, depth === 0 ? label(k) : k), h("dd", {}, renderValue(val, depth + 1))]));
}

/** Per-epoch metrics (`history: [{epoch, loss, ...}]`) as one chart per metric. */
export function historyCharts(history) {
  if (!Array.isArray(history) || history.length < 1 || typeof history[0] !== "object") return null;
  const keys = Object.keys(history[0]).filter((k) => k !== "epoch" && history.every((r) => typeof r[k] === "number"));
  if (!keys.length) return null;
  const xLabels = history.map((r, i) => `epoch ${r.epoch ?? i + 1}`);
  return h("div", { class: "charts" }, keys.map((k) => {
    const values = history.map((r) => r[k]);
    return lineChart({
      title: `${label(k)} per epoch`,
      series: [{ name: label(k), values }],
      xLabels,
      summary: `${label(k)} went from ${scalarText(values[0])} to ${scalarText(values[values.length - 1])} over ${values.length} epochs.`,
    });
  }));
}

function headline(job) {
  const r = job.result || {};
  if (typeof r.count === "number" && /face/.test(job.operation)) {
    return h("p", { class: "headline", "data-testid": "face-count" }, `${r.count} face${r.count === 1 ? "" : "s"} found`);
  }
  if (typeof r.count === "number") return h("p", { class: "headline" }, `Count: ${r.count}`);
  return null;
}

async function outputView(job, name, info) {
  const fileName = `${shortId(job.id)}-${name}${extensionFor(info.media_type)}`;
  const download = h("button", {
    type: "button",
    class: "button secondary small",
    "aria-label": `Download ${name}`,
    onclick: async () => saveBlob(await apiBlob(`/v1/jobs/${job.id}/outputs/${encodeURIComponent(name)}`), fileName),
  }, "Download");
  const box = h("div", { class: "output", dataset: { output: name } },
    h("div", { class: "output-head" }, h("h3", {}, name), h("span", { class: "muted" }, `${info.media_type} · ${formatBytes(info.size)}`), download),
  );
  try {
    if (info.media_type.startsWith("image/") && info.size < 40 * 1024 * 1024) {
      const blob = await apiBlob(`/v1/jobs/${job.id}/outputs/${encodeURIComponent(name)}`);
      const img = h("img", { src: URL.createObjectURL(blob), alt: `Output "${name}" of ${opName(job)}`, class: "output-image" });
      box.append(img);
    } else if ((info.media_type.startsWith("text/") || info.media_type === "application/json") && info.size < 512 * 1024) {
      const text = await (await apiBlob(`/v1/jobs/${job.id}/outputs/${encodeURIComponent(name)}`)).text();
      if (info.media_type.split(";")[0].trim() === "text/csv") {
        const rows = text.trim().split(/\r?\n/).slice(0, 21).map((l) => l.split(","));
        box.append(h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Table; scrolls sideways on narrow screens" }, h("table", {},
          h("thead", {}, h("tr", {}, rows[0].map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, rows.slice(1).map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))),
        )));
      } else {
        let shown = text;
        if (info.media_type === "application/json") {
          try {
            shown = JSON.stringify(JSON.parse(text), null, 2);
          } catch {
            shown = text;
          }
        }
        box.append(h("pre", { class: "json" }, shown.slice(0, 20000)));
      }
    }
  } catch (e) {
    box.append(h("p", { class: "error-text" }, e.message));
  }
  return box;
}

/**
 * Render job `jobId` into `root`; returns the clean-up (its subscription). `signal`: the
 * view's, aborted when the user leaves it: nothing more is drawn nor subscribed then.
 */
export async function renderJob(root, jobId, signal) {
  let job = jobs.get(jobId);
  try {
    job = await api(`/v1/jobs/${encodeURIComponent(jobId)}?positions=true`, { signal });
  } catch (e) {
    if (signal?.aborted) return () => {};
    clear(root, h("h1", {}, "Job"), h("p", { class: "error-text" }, e.message), h("p", {}, h("a", { href: "#/work" }, "Back to your jobs")));
    return () => {};
  }
  const body = h("div", {});
  let shown = "";
  const draw = async (j) => {
    const sig = JSON.stringify([j.state, j.progress, j.queue_position]);
    if (sig === shown) return;
    const terminalChange = shown && JSON.parse(shown)[0] !== j.state;
    shown = sig;
    const active = j.state === "queued" || j.state === "running";
    const summary = h("div", { class: "card" },
      h("div", { class: "job-head" }, h("span", { class: `badge badge-${j.state}` }, stateLine(j)), h("span", { class: "muted" }, elapsed(j))),
      active ? progressBar(j, "job-title") : null,
      j.progress.message && active ? h("p", {}, j.progress.message) : null,
      j.error ? h("p", { class: j.state === "failed" ? "error-box" : "muted", role: j.state === "failed" ? "alert" : undefined }, j.error) : null,
      h("dl", { class: "facts small" },
        h("dt", {}, "Id"), h("dd", {}, h("code", { class: "break" }, j.id)),
        h("dt", {}, "Submitted"), h("dd", {}, formatTime(j.created_at)),
        j.finished_at ? [h("dt", {}, "Finished"), h("dd", {}, formatTime(j.finished_at))] : null,
        Object.keys(j.params || {}).length ? [h("dt", {}, "Parameters"), h("dd", {}, renderValue(j.params, 2))] : null,
        Object.keys(j.inputs || {}).length ? [h("dt", {}, "Inputs"), h("dd", {}, Object.entries(j.inputs).map(([n, f]) => `${n} (${formatBytes(f.size)})`).join(", "))] : null,
      ),
      active ? h("div", { class: "actions" }, h("button", { type: "button", class: "button secondary", onclick: (e) => cancelJob(j, e.currentTarget) }, "Cancel job")) : null,
    );
    clear(body, summary);
    if (j.confidential) {
      body.append(h("p", { class: "card" }, `This job is confidential: its result and files are encrypted for the key kept by the client that sent it. Read them with: csml result ${shortId(j.id)}`));
    }
    if (j.state === "succeeded" && !j.confidential) {
      const results = h("section", { class: "card", "aria-labelledby": "result-title" }, h("h2", { id: "result-title" }, "Result"));
      const top = headline(j);
      if (top) results.append(top);
      const charts = historyCharts(j.result && j.result.history);
      if (charts) results.append(charts);
      if (j.result && Object.keys(j.result).length) results.append(renderValue(j.result));
      body.append(results);
      const models = Object.entries(j.models || {});
      if (models.length) {
        body.append(h("section", { class: "card", "aria-labelledby": "models-title" },
          h("h2", { id: "models-title" }, "Models made"),
          h("ul", {}, models.map(([out, id]) => h("li", {}, `${out}: `, h("code", {}, shortId(id)), " — ", h("a", { href: "#/models" }, "see its metrics and use it for prediction")))),
        ));
      }
      const outs = Object.entries(j.outputs || {});
      if (outs.length) {
        const sec = h("section", { class: "card", "aria-labelledby": "outputs-title" }, h("h2", { id: "outputs-title" }, "Outputs"));
        body.append(sec);
        for (const [name, info] of outs) sec.append(await outputView(j, name, info));
      }
    }
    if (terminalChange) announce(`Job ${shortId(j.id)}: ${stateLine(j)}.`, j.state === "failed" ? "error" : "info");
  };
  clear(root,
    h("p", {}, h("a", { href: "#/work" }, "← Your jobs")),
    h("h1", { id: "job-title", tabindex: "-1" }, opName(job)),
    body,
  );
  await draw(job);
  if (signal?.aborted) return () => {};
  const unsubscribe = jobs.subscribe((changed) => {
    if (changed && !changed.includes(jobId)) return;
    const j = jobs.get(jobId);
    if (j) draw(j);
  });
  return unsubscribe;
}

export function useModel(model, apps) {
  for (const app of apps) {
    if (app.name !== model.app) continue;
    for (const op of app.operations) {
      if (op.inputs.some((f) => f.model && f.model.format === model.format && f.model.version >= model.format_version)) {
        presetSubmit({ app: app.name, operation: op.name, model: model.id });
        go("#/work");
        return true;
      }
    }
  }
  return false;
}
