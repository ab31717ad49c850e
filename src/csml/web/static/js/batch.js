// Batches from the page: several files dropped (or chosen, or a folder) on one input of
// the submit form become one ordinary job per file, with the same app, operation,
// parameters and other inputs.
//
// - Files of at most INLINE_MAX_BYTES (and the form's other files, when they are all that
//   small) are sent inline, in base64, through the batch route (POST /v1/jobs/batch), up
//   to BATCH_ITEMS items and about BATCH_BYTES of base64 per request, one request at a
//   time. Larger files go one per request through the single-job route (POST /v1/jobs,
//   multipart), at most IN_FLIGHT at a time; so does every item of a batch request the
//   coordinator refused as a whole for its form (400, 404, 405, 413, 415, 422: no batch
//   route, or a smaller bound than this page assumes). Either way each item is a job: it
//   counts against the identity's quotas and the queue's fairness like any job.
// - The batch route answers per item: a job, or the refusal a single submission would
//   have got. A refusal that passes with time (429, or 503 with Retry-After; of one item
//   or of a whole request) is sent again after the server's Retry-After; any other
//   refusal fails that item with the server's message and the batch goes on.
// - Items are followed through the page's job store (`jobs`, fed by the event stream,
//   or by its polling fallback): nothing is polled per item. A job that falls out of the
//   store's snapshot (it keeps the newest jobs) while running, or while the batch has
//   heard nothing for STALL_MS, is read once (see `checkStall`).
// - A batch ends when every item has ended (done, failed, cancelled or never sent); then
//   it offers a JSONL manifest (one line per item) and a zip of the outputs, both
//   built in the page as Blobs.
// Batches live as long as the page (the jobs themselves stay in the job list).

import { ApiError, api, apiBlob, extensionFor, retryDelay, saveBlob } from "./api.js";
import { announce, append, clear, h, newId, shortId } from "./dom.js";
import { jobs, summary } from "./jobs.js";
import { zipBlob } from "./zip.js";

const IN_FLIGHT = 4;
/** The most bytes an input may carry inline (`csml.schemas.workers.INLINE_MAX_BYTES`). A
 * coordinator with a smaller bound refuses the request (413): its items go one by one. */
export const INLINE_MAX_BYTES = 256 * 1024;
const BATCH_ITEMS = 200; // per request (the route takes up to 500)
const BATCH_BYTES = 8 << 20; // about the most base64 per request (the route takes 12 MiB)
// A whole batch request refused with one of these: send its items one by one.
const NOT_AS_BATCH = new Set([400, 404, 405, 413, 415, 422]);
const STALL_MS = 30000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const WORDS = {
  pending: "Waiting to be sent",
  sending: "Sending",
  retrying: "Sending again soon",
  queued: "Queued",
  running: "Running",
  succeeded: "Done",
  failed: "Failed",
  cancelled: "Cancelled",
};

const batches = []; // newest first
const watchers = new Set();

function changed(batch) {
  for (const fn of watchers) fn(batch);
}

/** "photos/a.jpg" -> "photos_a": a name to save an item's outputs under. */
function stemOf(path) {
  const noExt = path.replace(/\.[^./]*$/, "");
  return noExt.replace(/[^\w.-]+/g, "_").replace(/^[_.]+/, "") || "item";
}

function errorText(err) {
  const where = err instanceof ApiError && err.field ? ` (${err.field})` : "";
  return `${err.message}${where}`;
}

/** An item's refusal from the batch route, in the words a single submission has: its
 * field without the request's `items.N.` (and the spec's `spec.`). */
function itemErrorText(error) {
  const field = String(error?.field || "").replace(/^items\.\d+\.?/, "").replace(/^spec\./, "");
  return `${error?.message || "refused"}${field ? ` (${field})` : ""}`;
}

/** A file's bytes in base64 (standard alphabet, padded). */
function base64Of(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      const url = String(reader.result);
      const comma = url.indexOf(",");
      resolve(comma < 0 ? "" : url.slice(comma + 1));
    };
    reader.onerror = () => reject(reader.error || new Error("the file could not be read"));
    reader.readAsDataURL(blob);
  });
}

/** About the length of a file's base64. */
function base64Length(size) {
  return Math.ceil(size / 3) * 4;
}

class Batch {
  /**
   * `parts`: the operation's file inputs in order, `{name, file}` (file null when none is
   * sent) with exactly one `{name, batch: true}`; `files`: `[{file, path}]` for that one.
   */
  constructor({ app, operation, params, parts, files, trustedOnly = false }) {
    this.id = newId("batch");
    this.app = app;
    this.operation = operation;
    this.params = params;
    this.trustedOnly = trustedOnly;
    this.parts = parts;
    this.input = parts.find((p) => p.batch).name;
    this.items = files.map(({ file, path }, index) => ({
      index,
      path,
      file,
      state: "pending",
      jobId: null,
      job: null,
      error: null,
      retryAt: null,
    }));
    const stems = new Set();
    for (const item of this.items) {
      let stem = stemOf(item.path);
      for (let n = 2; stems.has(stem); n++) stem = `${stemOf(item.path)}-${n}`;
      stems.add(stem);
      item.stem = stem; // outputs are saved as <stem>-<output><ext>, distinct per item
    }
    this.stopped = false;
    this.sent = false;
    this.ended = false;
    this.wakers = new Set();
    this.reading = new Set();
    this.lastChange = Date.now();
    const unsubscribe = jobs.subscribe((ids) => this.onJobs(ids));
    const stall = setInterval(() => this.checkStall(), STALL_MS / 2);
    this.unsubscribe = () => {
      unsubscribe();
      clearInterval(stall);
    };
  }

  counts() {
    const c = { total: this.items.length, succeeded: 0, failed: 0, cancelled: 0, finished: 0 };
    for (const item of this.items) {
      if (TERMINAL.has(item.state)) {
        c[item.state]++;
        c.finished++;
      }
    }
    return c;
  }

  form(item) {
    const data = new FormData();
    const spec = { app: this.app, operation: this.operation, params: this.params };
    if (this.trustedOnly) spec.trusted_only = true;
    data.append("spec", JSON.stringify(spec));
    for (const part of this.parts) {
      const file = part.batch ? item.file : part.file;
      if (file) data.append(part.name, file, file.name);
    }
    return data;
  }

  sleep(ms) {
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.wakers.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, ms);
      this.wakers.add(wake);
    });
  }

  async run() {
    const shared = await this.sharedInline();
    const inline = shared ? this.items.filter((i) => i.file.size <= INLINE_MAX_BYTES) : [];
    const inlineSet = new Set(inline);
    const alone = this.items.filter((i) => !inlineSet.has(i));
    await Promise.all([this.runBatches(inline, shared), this.sendAlone(alone)]);
    this.sent = true;
    this.update();
  }

  /** The form's other files in base64 (input name -> text), to go with every item of a
   * batch request; null when one of them is too large to travel inline. */
  async sharedInline() {
    const out = {};
    for (const part of this.parts) {
      if (part.batch || !part.file) continue;
      if (part.file.size > INLINE_MAX_BYTES) return null;
      try {
        out[part.name] = await base64Of(part.file);
      } catch {
        return null; // sent as multipart, which names the problem per item
      }
    }
    return out;
  }

  /** Items sent one per request (multipart), at most IN_FLIGHT at a time. */
  async sendAlone(items) {
    let next = 0;
    const lane = async () => {
      while (next < items.length) {
        const item = items[next++];
        await this.send(item);
      }
    };
    await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, items.length) }, lane));
  }

  /** Items sent inline through the batch route, one request at a time, in order; those
   * refused for now wait for their Retry-After and go in a later request. */
  async runBatches(items, shared) {
    let waiting = [...items];
    const sharedChars = Object.values(shared || {}).reduce((n, text) => n + text.length, 0);
    while (waiting.length) {
      if (this.stopped) {
        for (const item of waiting) this.notSent(item);
        this.update();
        return;
      }
      const now = Date.now();
      const due = waiting.filter((i) => !i.retryAt || i.retryAt <= now);
      if (!due.length) {
        await this.sleep(Math.min(...waiting.map((i) => i.retryAt)) - now);
        continue;
      }
      const chunk = [];
      let chars = 0;
      for (const item of due) {
        const size = 256 + sharedChars + base64Length(item.file.size);
        if (chunk.length && (chunk.length >= BATCH_ITEMS || chars + size > BATCH_BYTES)) break;
        chunk.push(item);
        chars += size;
      }
      const taken = new Set(chunk);
      waiting = waiting.filter((i) => !taken.has(i));
      const later = await this.sendBatch(chunk, shared);
      waiting = [...waiting, ...later].sort((a, b) => a.index - b.index);
    }
  }

  /** One batch request; returns the items refused for now (to send again later). */
  async sendBatch(chunk, shared) {
    for (const item of chunk) {
      item.state = "sending";
      item.retryAt = null;
    }
    this.update();
    const spec = { app: this.app, operation: this.operation, params: this.params };
    const sent = [];
    const entries = [];
    for (const item of chunk) {
      try {
        entries.push({ spec, inputs: { ...shared, [this.input]: await base64Of(item.file) } });
        sent.push(item);
      } catch (err) {
        item.state = "failed";
        item.error = `The file could not be read: ${err.message}`;
      }
    }
    if (!sent.length) {
      this.update();
      return [];
    }
    let answer;
    try {
      answer = await api("/v1/jobs/batch", { method: "POST", body: { items: entries } });
    } catch (err) {
      const wait = retryDelay(err);
      if (wait !== null) {
        for (const item of sent) this.refusedForNow(item, errorText(err), wait);
        this.update();
        return sent;
      }
      if (err instanceof ApiError && NOT_AS_BATCH.has(err.status)) {
        await this.sendAlone(sent); // not as a batch here: each item on its own
        return [];
      }
      for (const item of sent) {
        item.state = "failed";
        item.error = errorText(err);
      }
      this.update();
      return [];
    }
    const later = [];
    const accepted = [];
    for (const result of answer.items || []) {
      const item = sent[result.index];
      if (!item) continue;
      if (result.job) {
        this.accept(item, result.job);
        accepted.push(item);
        continue;
      }
      const wait = retryDelay(Object.assign(new ApiError(result.status, { error: result.error }), {
        retryAfter: result.retry_after == null ? null : String(result.retry_after),
      }));
      if (wait !== null) {
        this.refusedForNow(item, itemErrorText(result.error), wait);
        later.push(item);
      } else {
        item.state = "failed";
        item.error = itemErrorText(result.error);
      }
    }
    for (const item of sent) {
      if (item.state === "sending") { // the coordinator said nothing of it
        item.state = "failed";
        item.error = "The coordinator's answer did not include this file.";
      }
    }
    const cancelled = accepted.filter((i) => this.stopped && !TERMINAL.has(i.state));
    if (cancelled.length) await this.cancelItems(cancelled); // sent while cancelling
    this.update();
    return later;
  }

  notSent(item) {
    item.state = "cancelled";
    item.error = "Not sent: the batch was cancelled.";
    item.retryAt = null;
  }

  refusedForNow(item, text, wait) {
    item.state = "retrying";
    item.error = text;
    item.retryAt = Date.now() + wait * 1000;
  }

  /** An item's job, as the submission answered it (the stream may have told more). */
  accept(item, job) {
    item.jobId = job.id;
    jobs.submitted(job);
    this.take(item, jobs.get(job.id));
  }

  async send(item) {
    for (;;) {
      if (this.stopped) {
        this.notSent(item);
        this.update();
        return;
      }
      item.state = "sending";
      item.retryAt = null;
      this.update();
      try {
        const job = await api("/v1/jobs", { method: "POST", form: this.form(item) });
        this.accept(item, job);
        if (this.stopped && !TERMINAL.has(item.state)) await this.cancelItems([item]); // sent while cancelling
        else this.update();
        return;
      } catch (err) {
        const wait = retryDelay(err);
        if (wait === null) {
          item.state = "failed";
          item.error = errorText(err);
          this.update();
          return;
        }
        this.refusedForNow(item, errorText(err), wait);
        this.update();
        await this.sleep(wait * 1000);
      }
    }
  }

  take(item, job) {
    item.job = job;
    item.state = job.state;
    item.error = job.error || null;
  }

  onJobs(ids) {
    let any = false;
    const missing = [];
    for (const item of this.items) {
      if (!item.jobId || (ids && !ids.includes(item.jobId))) continue;
      const job = jobs.get(item.jobId);
      if (job) {
        if (job !== item.job) {
          this.take(item, job);
          any = true;
        }
      } else if (item.state === "running") missing.push(item);
    }
    if (missing.length) this.readMissing(missing);
    if (any) this.update();
  }

  /**
   * The store keeps the newest jobs of a snapshot; events still come for every job. A
   * running job out of the snapshot may have ended between two streams: read at once
   * (`onJobs`). A queued one ending in that gap is rarer: read only if the batch has
   * heard nothing for STALL_MS.
   */
  checkStall() {
    if (this.ended || Date.now() - this.lastChange < STALL_MS) return;
    const missing = this.items.filter((i) => i.jobId && !TERMINAL.has(i.state) && !jobs.get(i.jobId));
    if (missing.length) this.readMissing(missing);
  }

  /** Jobs of this batch the store no longer holds (older than its snapshot): read once. */
  async readMissing(items) {
    const todo = items.filter((i) => !this.reading.has(i.jobId));
    for (const i of todo) this.reading.add(i.jobId);
    let next = 0;
    const lane = async () => {
      while (next < todo.length) {
        const item = todo[next++];
        try {
          this.take(item, await api(`/v1/jobs/${encodeURIComponent(item.jobId)}`));
        } catch (e) {
          if (e.status === 404 || e.status === 401) {
            item.state = "failed";
            item.error = e.message;
          }
        } finally {
          this.reading.delete(item.jobId);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, todo.length) }, lane));
    this.update();
  }

  update() {
    this.lastChange = Date.now();
    if (!this.ended && this.sent && this.items.every((i) => TERMINAL.has(i.state))) {
      this.ended = true;
      this.unsubscribe();
      const c = this.counts();
      const parts = [`${c.succeeded} done`, `${c.failed} failed`];
      if (c.cancelled) parts.push(`${c.cancelled} cancelled`);
      announce(`Batch of ${c.total} finished: ${parts.join(", ")}.`, c.failed ? "error" : "success");
    }
    changed(this);
  }

  /** Stop sending, and cancel the items already queued or running. */
  async cancel() {
    this.stopped = true;
    for (const wake of [...this.wakers]) wake();
    await this.cancelItems(this.items.filter((i) => i.jobId && !TERMINAL.has(i.state)));
  }

  async cancelItems(active) {
    let next = 0;
    const lane = async () => {
      while (next < active.length) {
        const item = active[next++];
        try {
          jobs.upsert(await api(`/v1/jobs/${item.jobId}`, { method: "DELETE" }));
        } catch (e) {
          if (e.status !== 409) announce(e.message, "error"); // 409: it had just ended
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, active.length) }, lane));
  }

  outputName(item, name, info) {
    return `${item.stem}-${name}${extensionFor(info.media_type)}`;
  }

  /** One JSON line per item: input, job id, state, error, result, outputs. */
  manifest() {
    const lines = this.items.map((item) => {
      const job = item.job;
      const outputs = {};
      for (const [name, info] of Object.entries((job && job.outputs) || {})) {
        outputs[name] = { file: this.outputName(item, name, info), media_type: info.media_type, size: info.size };
      }
      return JSON.stringify({
        input: item.path,
        job_id: item.jobId,
        state: item.state,
        error: item.error,
        result: job && job.state === "succeeded" ? (job.result ?? null) : null,
        outputs,
      });
    });
    return new Blob([lines.join("\n") + "\n"], { type: "application/x-ndjson" });
  }

  fileBase() {
    return `batch-${this.app}-${this.operation}-${shortId(this.items.find((i) => i.jobId)?.jobId || "none")}`;
  }

  /** Every output of the items that succeeded, under the names the manifest gives. */
  async outputsZip() {
    const entries = [];
    for (const item of this.items) {
      if (item.state !== "succeeded" || !item.job) continue;
      for (const [name, info] of Object.entries(item.job.outputs || {})) {
        const blob = await apiBlob(`/v1/jobs/${item.jobId}/outputs/${encodeURIComponent(name)}`);
        entries.push({ name: this.outputName(item, name, info), blob });
      }
    }
    return zipBlob(entries);
  }
}

/** Start a batch (it runs in the background) and show it in every mounted batch list. */
export function startBatch(options) {
  const batch = new Batch(options);
  batches.unshift(batch);
  changed(batch);
  batch.run();
  return batch;
}

function itemMessage(item) {
  if (item.state === "retrying" && item.error) {
    const left = Math.max(0, Math.ceil((item.retryAt - Date.now()) / 1000));
    return `Refused for now (${item.error}); sending again in ${left} s.`;
  }
  if (item.error && item.state !== "succeeded") return item.error;
  if (item.job && item.state === "succeeded") return summary(item.job) || "Done.";
  if (item.job) return item.job.progress?.message || "";
  return "";
}

function itemRow(batch, item) {
  const li = h("li", { class: `batch-item state-${item.state}`, dataset: { item: String(item.index), state: item.state } });
  const message = itemMessage(item);
  const links = [];
  if (item.jobId) {
    links.push(h("a", { href: `#/jobs/${item.jobId}`, class: "button small secondary", "aria-label": `${item.state === "succeeded" ? "Results" : "Details"} of ${item.path}` },
      item.state === "succeeded" ? "Results" : "Details"));
  }
  if (item.state === "succeeded" && item.job) {
    for (const [name, info] of Object.entries(item.job.outputs || {})) {
      const file = batch.outputName(item, name, info);
      links.push(h("button", {
        type: "button",
        class: "button small secondary",
        "aria-label": `Download ${name} of ${item.path}`,
        onclick: async (e) => {
          const button = e.currentTarget;
          button.disabled = true;
          try {
            saveBlob(await apiBlob(`/v1/jobs/${item.jobId}/outputs/${encodeURIComponent(name)}`), file);
          } catch (err) {
            announce(err.message, "error");
          } finally {
            button.disabled = false;
          }
        },
      }, `Download ${name}`));
    }
  }
  return append(li, [
    h("div", { class: "job-head" },
      h("span", { class: "batch-name", title: item.path }, item.path),
      h("span", { class: `badge badge-${TERMINAL.has(item.state) || item.state === "running" || item.state === "queued" ? item.state : "queued"}` }, WORDS[item.state] || item.state),
    ),
    message ? h("p", { class: `batch-message ${item.state === "failed" ? "error-text" : "muted"}` }, message) : null,
    links.length ? h("div", { class: "cell-actions" }, links, item.jobId ? h("code", { class: "muted" }, shortId(item.jobId)) : null) : null,
  ]);
}

function countsText(c) {
  const parts = [`${c.succeeded} done`, `${c.failed} failed`];
  if (c.cancelled) parts.push(`${c.cancelled} cancelled`);
  return `${c.finished}/${c.total} finished · ${parts.join(" · ")}`;
}

function panel(batch, onDismiss) {
  const titleId = `${batch.id}-title`;
  const okFill = h("div", { class: "bar-fill ok" });
  const badFill = h("div", { class: "bar-fill bad" });
  const bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-labelledby": titleId }, okFill, badFill);
  const counts = h("p", { class: "batch-counts", dataset: { testid: "batch-counts" } });
  const actions = h("div", { class: "actions" });
  const list = h("ol", { class: "batch-items" });
  const section = h("section", { class: "panel batch", "aria-labelledby": titleId, dataset: { batch: batch.id } },
    h("h2", { id: titleId }, `Batch: ${batch.app} · ${batch.operation.replaceAll("_", " ")}`),
    h("p", { class: "help" }, `${batch.items.length} files on "${batch.input}", one job each, sent together in batch requests (files over ${INLINE_MAX_BYTES / 1024} KiB one by one).`),
    bar,
    counts,
    actions,
    list,
  );
  const rows = [];
  let ended = null;
  const draw = () => {
    const c = batch.counts();
    bar.setAttribute("aria-valuemax", String(c.total));
    bar.setAttribute("aria-valuenow", String(c.finished));
    bar.setAttribute("aria-valuetext", countsText(c));
    const pct = (n) => `${c.total ? (n / c.total) * 100 : 0}%`;
    okFill.style.width = pct(c.succeeded); // done in green, failed or cancelled in red
    badFill.style.width = pct(c.failed + c.cancelled);
    counts.textContent = countsText(c);
    if (ended !== batch.ended) {
      ended = batch.ended;
      if (batch.ended) {
        const manifest = h("button", {
          type: "button",
          class: "button primary",
          onclick: () => saveBlob(batch.manifest(), `${batch.fileBase()}.jsonl`),
        }, "Download manifest");
        const zip = h("button", {
          type: "button",
          class: "button secondary",
          onclick: async (e) => {
            const button = e.currentTarget;
            button.disabled = true;
            button.textContent = "Preparing the zip…";
            try {
              saveBlob(await batch.outputsZip(), `${batch.fileBase()}-outputs.zip`);
            } catch (err) {
              announce(`The zip could not be made: ${err.message}`, "error");
            } finally {
              button.disabled = false;
              button.textContent = "Download outputs (zip)";
            }
          },
        }, "Download outputs (zip)");
        const outputs = batch.items.some((i) => i.state === "succeeded" && Object.keys(i.job?.outputs || {}).length);
        const dismiss = h("button", { type: "button", class: "button secondary", onclick: () => onDismiss(batch) }, "Remove from page");
        clear(actions, manifest, outputs ? zip : null, dismiss);
      } else {
        clear(actions, h("button", {
          type: "button",
          class: "button danger",
          onclick: (e) => {
            e.currentTarget.disabled = true;
            e.currentTarget.textContent = "Cancelling…";
            batch.cancel();
          },
        }, "Cancel batch"));
      }
    }
    batch.items.forEach((item, i) => {
      const sig = JSON.stringify([item.state, item.error, item.jobId, item.state === "retrying" ? Math.ceil((item.retryAt - Date.now()) / 1000) : 0, item.job && item.job.progress, item.job && item.job.result ? 1 : 0]);
      if (rows[i] && rows[i].sig === sig) return;
      const li = itemRow(batch, item);
      if (rows[i]) {
        // Keep the keyboard focus on the row's control across a redraw.
        const focused = rows[i].el.contains(document.activeElement) ? document.activeElement.getAttribute("aria-label") : null;
        rows[i].el.replaceWith(li);
        if (focused) li.querySelector(`[aria-label="${CSS.escape(focused)}"]`)?.focus();
      } else list.append(li);
      rows[i] = { el: li, sig };
    });
  };
  draw();
  return { section, draw };
}

/** The batches of this page in `root`, live. Returns a cleanup function. */
export function mountBatches(root) {
  const panels = new Map();
  const dismiss = (batch) => {
    const i = batches.indexOf(batch);
    if (i >= 0) batches.splice(i, 1);
    panels.get(batch)?.section.remove();
    panels.delete(batch);
    document.getElementById("submit-title")?.focus();
  };
  const render = (batch) => {
    for (const b of batches) {
      if (batch && b !== batch) continue;
      let p = panels.get(b);
      if (!p) {
        p = panel(b, dismiss);
        panels.set(b, p);
        const newer = batches.slice(0, batches.indexOf(b)).map((x) => panels.get(x)?.section).filter(Boolean);
        if (newer.length) newer[newer.length - 1].after(p.section);
        else root.prepend(p.section);
      } else p.draw();
    }
  };
  watchers.add(render);
  render(null);
  // Count down the waits before sending again.
  const tick = setInterval(() => {
    for (const b of batches) if (b.items.some((i) => i.state === "retrying")) panels.get(b)?.draw();
  }, 1000);
  return () => {
    watchers.delete(render);
    clearInterval(tick);
  };
}
