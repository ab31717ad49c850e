// Your models: their metrics, download, delete, and "use for prediction".

import { api, apiBlob, saveBlob } from "./api.js";
import { announce, clear, formatBytes, formatTime, h, shortId } from "./dom.js";
import { useModel } from "./job.js";

const KEY_METRICS = /accuracy|loss|perplexity|score|error|f1|auc/;

/** Up to four numeric metrics, the quality ones (accuracy, loss...) first. */
function metricsSummary(metrics) {
  const numeric = Object.entries(metrics || {}).filter(([k, v]) => typeof v === "number" && !/seconds|seed/.test(k));
  numeric.sort(([a], [b]) => Number(!KEY_METRICS.test(a)) - Number(!KEY_METRICS.test(b)));
  return numeric
    .slice(0, 4)
    .map(([k, v]) => `${k.replaceAll("_", " ")}: ${Number.isInteger(v) ? v : v.toFixed(4)}`)
    .join(" · ") || "—";
}

export async function renderModels(root) {
  let list;
  let apps;
  try {
    [list, apps] = await Promise.all([api("/v1/models").then((r) => r.models), api("/v1/apps")]);
  } catch (e) {
    clear(root, h("h1", {}, "Your models"), h("p", { class: "error-text" }, e.message));
    return;
  }
  const canPredict = (m) =>
    apps.some((a) => a.name === m.app && a.operations.some((op) => op.inputs.some((f) => f.model && f.model.format === m.format)));
  const rows = list.map((m) =>
    h("tr", { dataset: { modelId: m.id } },
      h("th", { scope: "row" }, m.name, h("br"), h("code", { class: "muted" }, shortId(m.id))),
      h("td", {}, `${m.app} · ${m.kind}`, h("br"), h("span", { class: "muted" }, `${m.format} v${m.format_version}`)),
      h("td", {}, metricsSummary(m.metrics)),
      h("td", {}, formatTime(m.created_at), h("br"), h("span", { class: "muted" }, formatBytes(m.size))),
      h("td", { class: "cell-actions" },
        canPredict(m)
          ? h("button", { type: "button", class: "button small primary", "aria-label": `Use for prediction: model ${shortId(m.id)}`, onclick: () => useModel(m, apps) }, "Use for prediction")
          : null,
        h("button", {
          type: "button",
          class: "button small secondary",
          "aria-label": `Download model ${shortId(m.id)}`,
          onclick: async () => saveBlob(await apiBlob(`/v1/models/${m.id}`), `${m.name}-${shortId(m.id)}`),
        }, "Download"),
        h("button", {
          type: "button",
          class: "button small danger",
          "aria-label": `Delete model ${shortId(m.id)}`,
          onclick: async () => {
            try {
              await api(`/v1/models/${m.id}`, { method: "DELETE" });
              announce(`Model ${shortId(m.id)} deleted.`, "success");
              renderModels(root);
            } catch (e) {
              announce(e.message, "error");
            }
          },
        }, "Delete"),
      ),
    ),
  );
  clear(
    root,
    h("h1", {}, "Your models"),
    h("p", { class: "lead" }, "Training jobs keep their models here, with the metrics of the job that made them."),
    list.length
      ? h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Table; scrolls sideways on narrow screens" }, h("table", { class: "models wide" },
          h("thead", {}, h("tr", {}, ["Model", "App", "Metrics", "Made", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, rows),
        ))
      : h("p", { class: "muted" }, "No models yet. Run a training operation (for example dlib · train svm) to make one."),
  );
}
