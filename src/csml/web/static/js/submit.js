// Submit: pick an app and an operation, drop input files, fill the generated form.

import { ApiError, api } from "./api.js";
import { announce, clear, formatBytes, h, newId, shortId } from "./dom.js";
import { startBatch } from "./batch.js";
import { buildParams } from "./form.js";
import { jobs } from "./jobs.js";

let preset = null;

/** Open the submit form with these choices (e.g. "use this model for prediction"). */
export function presetSubmit(choice) {
  preset = choice;
}

/** Files of a dropped folder (and its sub-folders), with their paths inside it; hidden files skipped. */
async function walk(entry, out) {
  if (entry.name.startsWith(".")) return;
  if (entry.isFile) {
    const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
    out.push({ file, path: entry.fullPath.replace(/^\//, "") });
  } else if (entry.isDirectory) {
    const reader = entry.createReader();
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      for (const child of batch) await walk(child, out);
    }
  }
}

function picked(fileList) {
  return [...fileList]
    .filter((f) => !f.name.startsWith("."))
    .map((file) => ({ file, path: file.webkitRelativePath || file.name }));
}

function dropZone(spec, onChange) {
  const id = newId(`file-${spec.name}`);
  const chosen = h("span", { class: "file-chosen", "aria-live": "polite" }, "No file chosen");
  const input = h("input", {
    type: "file",
    id,
    name: spec.name,
    class: "visually-hidden",
    multiple: true,
    accept: spec.media_type && spec.media_type !== "application/octet-stream" ? spec.media_type : undefined,
  });
  const folder = h("input", { type: "file", id: `${id}-folder`, class: "visually-hidden", webkitdirectory: true, multiple: true });
  if (spec.required) input.setAttribute("aria-required", "true");
  const error = h("p", { class: "field-error", hidden: true, id: `${id}-error` });
  const help = h("p", { class: "help", id: `${id}-help` }, spec.description || "", spec.media_type ? ` (${spec.media_type})` : "",
    " Several files, or a folder, make a batch: one job per file.");
  input.setAttribute("aria-describedby", `${id}-help ${id}-error`);
  let files = []; // [{file, path}]
  const show = () => {
    const first = files[0];
    const total = files.reduce((n, f) => n + f.file.size, 0);
    if (!first) chosen.textContent = "No file chosen";
    else if (files.length === 1) chosen.textContent = `${first.path} — ${formatBytes(first.file.size)}`;
    else {
      const names = files.slice(0, 3).map((f) => f.path).join(", ");
      chosen.textContent = `${files.length} files — ${formatBytes(total)}: ${names}${files.length > 3 ? ", …" : ""}`;
    }
    zone.classList.toggle("has-file", Boolean(first));
    if (first) error.hidden = true;
    onChange();
  };
  input.addEventListener("change", () => {
    files = picked(input.files);
    show();
  });
  folder.addEventListener("change", () => {
    if (!folder.files.length) return;
    input.value = "";
    files = picked(folder.files);
    folder.value = "";
    show();
  });
  const zone = h(
    "div",
    { class: "drop", "data-input": spec.name },
    input,
    h("label", { for: id, class: "drop-label" },
      h("span", { class: "drop-title" }, spec.name, spec.required ? "" : " (optional)"),
      h("span", { class: "drop-hint" }, "Drop files or a folder here, or ", h("span", { class: "link" }, "choose files")),
      chosen,
    ),
  );
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    const dt = e.dataTransfer;
    if (!dt || !dt.files.length) return;
    // Entries must be taken while the event runs; a folder is read afterwards.
    const entries = [...(dt.items || [])].map((i) => (i.kind === "file" && i.webkitGetAsEntry ? i.webkitGetAsEntry() : null));
    if (entries.some((en) => en && en.isDirectory)) {
      input.value = "";
      chosen.textContent = "Reading the folder…";
      const out = [];
      try {
        for (const en of entries) if (en) await walk(en, out);
      } catch (err) {
        error.textContent = `The folder could not be read: ${err.message || err}`;
        error.hidden = false;
      }
      files = out;
    } else {
      input.files = dt.files;
      files = picked(input.files);
    }
    show();
  });
  return {
    spec,
    element: h("div", { class: "field" }, zone,
      h("div", { class: "folder-pick" }, folder, h("label", { for: folder.id, class: "link" }, `Or choose a folder for "${spec.name}"`)),
      help, error),
    input,
    files: () => files,
    validate(skip) {
      const missing = spec.required && !skip && !files.length;
      error.hidden = !missing;
      error.textContent = missing ? `Choose a file for "${spec.name}".` : "";
      return !missing;
    },
    setDisabled(off) {
      zone.hidden = off;
    },
    reset() {
      input.value = "";
      folder.value = "";
      files = [];
      show();
    },
  };
}

async function attestationWords(app) {
  let workers;
  try {
    workers = await api(`/v1/apps/${encodeURIComponent(app)}/workers`);
  } catch (e) {
    return e.message;
  }
  if (!workers.length) return `No ${app} worker is running, so none can be checked.`;
  const insecure = workers.filter((w) => w.insecure).length;
  const kinds = [...new Set(workers.filter((w) => !w.insecure).map((w) => w.kind))];
  const parts = [];
  if (insecure) {
    parts.push(
      `${insecure} of ${workers.length} ${app} workers ${insecure === 1 ? "has" : "have"} no attestation: the operator could read a job sent to ${insecure === 1 ? "it" : "them"}.`,
    );
  }
  if (kinds.length) {
    parts.push(`${workers.length - insecure} present${workers.length - insecure === 1 ? "s" : ""} enclave evidence (${kinds.join(", ")}), which your own client must verify.`);
  }
  parts.push(
    "This page comes from the coordinator, which a confidential job must not have to trust, so it cannot encrypt for you: send confidential jobs with the csml command (csml submit … --confidential), which checks each worker's attestation itself.",
  );
  return parts.join(" ");
}

export async function renderSubmit(root) {
  const chosen = preset;
  preset = null;
  const apps = await api("/v1/apps");
  const usable = apps.filter((a) => a.operations.length);
  const appSel = h("select", { id: "app", name: "app" },
    usable.map((a) => h("option", { value: a.name }, a.workers ? `${a.name} — ${a.workers} worker${a.workers === 1 ? "" : "s"}` : `${a.name} — no worker yet (jobs wait)`)),
  );
  const served = usable.find((a) => a.workers > 0);
  if (served) appSel.value = served.name;
  const opSel = h("select", { id: "operation", name: "operation" });
  const opHelp = h("p", { class: "help", id: "operation-help" });
  opSel.setAttribute("aria-describedby", "operation-help");
  const filesBox = h("div", { class: "files" });
  const paramsBox = h("fieldset", { class: "params" });
  const confidential = h("input", { type: "checkbox", id: "confidential", name: "confidential" });
  const confWords = h("p", { class: "help", id: "confidential-words", "aria-live": "polite" });
  confidential.setAttribute("aria-describedby", "confidential-words");
  const requires = h("input", { type: "text", id: "requires", name: "requires", placeholder: "e.g. gpu=true, gpu_memory_gb>=16", autocomplete: "off" });
  const requiresHelp = h("p", { class: "help", id: "requires-help" });
  requires.setAttribute("aria-describedby", "requires-help");
  // Verification (issue 13): only the operator's workers, never a contributed one.
  const trusted = h("input", { type: "checkbox", id: "trusted-only", name: "trusted_only" });
  const trustedWords = h("p", { class: "help", id: "trusted-words", "aria-live": "polite" });
  trusted.setAttribute("aria-describedby", "trusted-words");
  const trustedBox = h("div", { class: "check" }, trusted, h("label", { for: "trusted-only" }, "Operator's workers only"));
  function trustWords(app) {
    const n = app ? app.contributed_workers || 0 : 0;
    trustedWords.textContent = n
      ? `${n} of this app's workers ${n === 1 ? "is" : "are"} contributed by other users: they can read the jobs they run, and their results are checked before you see them. Tick to keep your job on the operator's workers.`
      : "Run it only on the operator's workers (no contributed worker serves this app now).";
  }
  const submit = h("button", { type: "submit", class: "button primary" }, "Submit job");
  const formError = h("p", { class: "field-error", role: "alert", hidden: true });
  let current = { files: [], params: null, op: null, app: null };

  /** The zones given several files (a batch over that input when there is exactly one). */
  const several = () => current.files.filter((f) => f.files().length > 1 && !f.input.closest(".drop[hidden]"));
  function label() {
    const many = several();
    submit.textContent = many.length === 1 ? `Submit ${many[0].files().length} jobs` : "Submit job";
  }

  const models = api("/v1/models").then((r) => r.models).catch(() => []);

  function modelPicker(op, files) {
    return ({ id, required }) => {
      const spec = op.inputs.find((f) => f.model);
      const select = h("select", { id, name: "model" }, h("option", { value: "" }, spec && !spec.required ? "— none —" : "— upload a model file instead —"));
      models.then((list) => {
        for (const m of list) {
          if (spec && m.format !== spec.model.format) continue;
          select.append(h("option", { value: m.id }, `${m.name} · ${m.kind} · ${shortId(m.id)}`));
        }
        if (chosen && chosen.model) select.value = chosen.model;
        sync();
      });
      const sync = () => {
        const file = files.find((f) => f.spec.model);
        if (file) file.setDisabled(Boolean(select.value));
      };
      select.addEventListener("change", sync);
      return select;
    };
  }

  function showOperation() {
    const app = usable.find((a) => a.name === appSel.value);
    const op = app.operations.find((o) => o.name === opSel.value) || app.operations[0];
    opHelp.textContent = op.description || "";
    const needs = describeRequires(op.requires || {});
    requiresHelp.textContent = "Labels the worker must have: NAME=VALUE (equal) or NAME>=NUMBER (at least), separated by commas."
      + (needs ? ` This operation already needs ${needs}.` : "");
    clear(filesBox);
    clear(paramsBox, h("legend", {}, "Parameters"));
    const files = op.inputs.map((spec) => dropZone(spec, label));
    for (const f of files) filesBox.append(f.element);
    if (!files.length) filesBox.append(h("p", { class: "muted" }, "This operation takes no files."));
    const special = op.params_schema.properties && op.params_schema.properties.model ? { model: modelPicker(op, files) } : {};
    const params = buildParams(paramsBox, op.params_schema, special);
    current = { app, op, files, params };
    label();
    trustWords(app);
    confidential.checked = false;
    confWords.textContent = "";
    submit.disabled = false;
  }

  function showOperations() {
    const app = usable.find((a) => a.name === appSel.value);
    clear(opSel, app.operations.map((o) => h("option", { value: o.name }, o.name.replaceAll("_", " "))));
    if (chosen && chosen.app === app.name && chosen.operation) opSel.value = chosen.operation;
    showOperation();
  }

  appSel.addEventListener("change", showOperations);
  opSel.addEventListener("change", showOperation);
  confidential.addEventListener("change", async () => {
    submit.disabled = confidential.checked;
    if (!confidential.checked) {
      confWords.textContent = "";
      return;
    }
    confWords.textContent = "Checking the workers…";
    confWords.textContent = await attestationWords(current.app.name);
  });

  const form = h(
    "form",
    { class: "submit-form", novalidate: true, "aria-labelledby": "submit-title" },
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "app" }, "App"), appSel),
      h("div", { class: "field" }, h("label", { for: "operation" }, "Operation"), opSel),
    ),
    opHelp,
    filesBox,
    paramsBox,
    h("div", { class: "field" }, h("label", { for: "requires" }, "Worker requirements (optional)"), requires, requiresHelp),
    h("div", { class: "check" }, confidential, h("label", { for: "confidential" }, "Confidential (end-to-end encrypted)")),
    confWords,
    trustedBox,
    trustedWords,
    formError,
    h("div", { class: "actions" }, submit),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    formError.hidden = true;
    const { params, firstInvalid } = current.params.collect();
    const modelChosen = Boolean(params.model);
    let filesOk = true;
    let firstMissing = null;
    for (const f of current.files) {
      const ok = f.validate(Boolean(f.spec.model && modelChosen));
      if (!ok) {
        filesOk = false;
        firstMissing = firstMissing || f.input;
      }
    }
    if (firstInvalid || !filesOk) {
      formError.textContent = "Please correct the fields marked below.";
      formError.hidden = false;
      (firstInvalid || firstMissing).focus();
      return;
    }
    const sent = current.files.filter((f) => !(f.spec.model && modelChosen));
    const many = sent.filter((f) => f.files().length > 1);
    if (many.length > 1) {
      formError.textContent = `Several files can go in one input only (here: ${many.map((f) => f.spec.name).join(", ")}); keep one file in the others.`;
      formError.hidden = false;
      many[1].input.focus();
      return;
    }
    if (many.length === 1) {
      const batch = startBatch({
        app: current.app.name,
        operation: current.op.name,
        params,
        parts: sent.map((f) => (f === many[0] ? { name: f.spec.name, batch: true } : { name: f.spec.name, file: f.files()[0]?.file || null })),
        files: many[0].files(),
        trustedOnly: trusted.checked,
      });
      announce(`Batch of ${batch.items.length} jobs started (${current.op.name.replaceAll("_", " ")}).`, "success");
      for (const f of current.files) f.reset();
      return;
    }
    const spec = { app: current.app.name, operation: current.op.name, params };
    let needs;
    try {
      needs = parseRequires(requires.value);
    } catch (err) {
      formError.textContent = err.message;
      formError.hidden = false;
      requires.focus();
      return;
    }
    if (Object.keys(needs).length) spec.requires = needs;
    if (trusted.checked) spec.trusted_only = true;
    const data = new FormData();
    data.append("spec", JSON.stringify(spec));
    for (const f of sent) {
      const file = f.files()[0]?.file;
      if (file) data.append(f.spec.name, file, file.name);
    }
    submit.disabled = true;
    submit.textContent = "Sending…";
    try {
      const job = await api("/v1/jobs", { method: "POST", form: data });
      jobs.submitted(job);
      announce(`Job ${shortId(job.id)} submitted (${job.operation.replaceAll("_", " ")}).`, "success");
      for (const f of current.files) {
        f.input.value = "";
        f.input.dispatchEvent(new Event("change"));
      }
    } catch (err) {
      const where = err instanceof ApiError && err.field ? ` (${err.field})` : "";
      formError.textContent = `${err.message}${where}`;
      formError.hidden = false;
      if (err.retryAfter) formError.textContent += ` Try again in ${err.retryAfter} s.`;
    } finally {
      submit.disabled = confidential.checked;
      label();
    }
  });

  clear(root, h("h2", { id: "submit-title", tabindex: "-1" }, "New job"));
  if (!usable.length) {
    root.append(h("p", {}, "No app is available yet: no worker has joined the service."));
    return;
  }
  root.append(form);
  if (chosen && usable.some((a) => a.name === chosen.app)) appSel.value = chosen.app;
  showOperations();
}

/** `gpu=true, mem>=16` -> {gpu: true, mem: {min: 16}} (see docs/user-guide/placement.md). */
export function parseRequires(text) {
  const out = {};
  for (const part of text.split(",").map((p) => p.trim()).filter(Boolean)) {
    const min = part.indexOf(">=");
    if (min > 0) {
      const value = Number(part.slice(min + 2).trim());
      if (part.slice(min + 2).trim() === "" || !Number.isFinite(value)) throw new Error(`"${part}": a minimum needs a number`);
      out[part.slice(0, min).trim()] = { min: value };
      continue;
    }
    const eq = part.indexOf("=");
    if (eq <= 0) throw new Error(`"${part}": write NAME=VALUE or NAME>=NUMBER`);
    const raw = part.slice(eq + 1).trim();
    const number = Number(raw);
    out[part.slice(0, eq).trim()] = raw === "true" ? true : raw === "false" ? false : raw !== "" && Number.isFinite(number) ? number : raw;
  }
  return out;
}

function describeRequires(requires) {
  return Object.entries(requires)
    .map(([name, cond]) => (cond !== null && typeof cond === "object" ? `${name}>=${cond.min}` : `${name}=${cond}`))
    .join(", ");
}
