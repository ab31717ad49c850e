// The caller's jobs, kept live: a server-sent event stream read with fetch() (the token
// goes in a header, never in a URL), and polling when streaming fails.

import { api, authHeaders, identity, noteServerTime, serverNow } from "./api.js";
import { announce, clear, formatDuration, formatWhen, h, shortId } from "./dom.js";

const POLL_MS = 2000;
const ACTIVE = new Set(["queued", "running"]);

class JobStore {
  constructor() {
    this.map = new Map();
    this.listeners = new Set();
    this.mode = "off";
    this.abort = null;
    this.pollTimer = null;
    this.generation = 0;
  }

  list() {
    return [...this.map.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  }

  get(id) {
    return this.map.get(id);
  }

  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  emit(changed) {
    for (const fn of this.listeners) fn(changed);
  }

  upsert(job) {
    this.map.set(job.id, job);
    this.emit([job.id]);
  }

  /**
   * A job as its submission answered it: its first state. The event stream may have
   * told this page of the job before that answer arrived (it runs on another
   * connection, and a fast job can end first): what it told is as new or newer, so
   * it is kept, never put back to "queued".
   */
  submitted(job) {
    if (!this.map.has(job.id)) this.upsert(job);
  }

  replace(list) {
    this.map = new Map(list.map((j) => [j.id, j]));
    this.emit(null);
  }

  remove(id) {
    this.map.delete(id);
    this.emit([id]);
  }

  setMode(mode) {
    this.mode = mode;
    const el = document.getElementById("live-mode");
    if (el) {
      el.textContent = { stream: "Live", poll: "Updating every 2 s", off: "" }[mode];
      el.dataset.mode = mode;
    }
  }

  start() {
    this.stop();
    if (!identity()) return;
    const gen = ++this.generation;
    this.stream(gen);
  }

  stop() {
    this.generation++;
    if (this.abort) this.abort.abort();
    clearTimeout(this.pollTimer);
    this.abort = null;
    this.setMode("off");
  }

  async stream(gen) {
    const controller = new AbortController();
    this.abort = controller;
    try {
      const response = await fetch("/v1/jobs/events", {
        headers: { Accept: "text/event-stream", ...authHeaders() },
        signal: controller.signal,
        cache: "no-store",
      });
      if (response.status === 401) {
        announce("This browser's identity is no longer valid. Join again or import a key file.", "error");
        this.setMode("off");
        return;
      }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      noteServerTime(response);
      this.setMode("stream");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          this.onEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
      }
      if (gen === this.generation) this.stream(gen); // the server ends streams now and then
    } catch (e) {
      if (e.name === "AbortError" || gen !== this.generation) return;
      this.poll(gen);
      // Try streaming again later.
      setTimeout(() => {
        if (gen === this.generation && this.mode === "poll") {
          clearTimeout(this.pollTimer);
          this.stream(gen);
        }
      }, 15000);
    }
  }

  onEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trim());
    }
    if (!data.length) return;
    const payload = JSON.parse(data.join("\n"));
    if (name === "snapshot") this.replace(payload.jobs);
    else if (name === "job") this.upsert(payload);
    else if (name === "gone") this.remove(payload.id);
  }

  async poll(gen) {
    if (gen !== this.generation) return;
    this.setMode("poll");
    try {
      const { jobs } = await api("/v1/jobs?positions=true");
      if (gen === this.generation) this.replace(jobs);
    } catch (e) {
      if (e.status === 401) {
        this.setMode("off");
        return;
      }
    }
    this.pollTimer = setTimeout(() => this.poll(gen), POLL_MS);
  }
}

export const jobs = new JobStore();

const STATE_WORDS = {
  queued: "Queued",
  running: "Running",
  succeeded: "Done",
  failed: "Failed",
  cancelled: "Cancelled",
};

export function elapsed(job, now = serverNow()) {
  const t = (s) => (s ? new Date(s).getTime() : null);
  const created = t(job.created_at);
  const started = t(job.started_at);
  const finished = t(job.finished_at);
  if (job.state === "queued") return `waiting ${formatDuration((now - created) / 1000)}`;
  if (job.state === "running") return `running ${formatDuration((now - (started || created)) / 1000)}`;
  if (finished && started) return `took ${formatDuration((finished - started) / 1000)}`;
  if (finished) return `after ${formatDuration((finished - created) / 1000)}`;
  return "";
}

export function stateLine(job) {
  if (job.state === "queued") {
    return job.queue_position ? `Queued — position ${job.queue_position} in line` : "Queued";
  }
  if (job.state === "running") return `Running — ${Math.round(job.progress.fraction * 100)}%`;
  return STATE_WORDS[job.state] || job.state;
}

/** One line about a job: its result's headline when done, else its progress message. */
export function summary(job) {
  const r = job.result;
  if (job.state === "succeeded" && r && typeof r.count === "number") {
    return /face/.test(job.operation) ? `${r.count} face${r.count === 1 ? "" : "s"} found` : `count: ${r.count}`;
  }
  return job.progress.message || "";
}

export function opName(job) {
  return `${job.app} · ${job.operation.replaceAll("_", " ")}`;
}

export async function cancelJob(job, button) {
  if (button) button.disabled = true;
  try {
    jobs.upsert(await api(`/v1/jobs/${job.id}`, { method: "DELETE" }));
    announce(`Job ${shortId(job.id)} cancelled.`, "success");
  } catch (e) {
    announce(e.message, "error");
    if (button) button.disabled = false;
  }
}

export function progressBar(job, labelId) {
  const pct = Math.round((job.state === "succeeded" ? 1 : job.progress.fraction) * 100);
  const bar = h("div", {
    class: "bar",
    role: "progressbar",
    "aria-valuemin": "0",
    "aria-valuemax": "100",
    "aria-valuenow": String(pct),
    "aria-labelledby": labelId,
  }, h("div", { class: "bar-fill" }));
  bar.firstChild.style.width = `${pct}%`;
  return bar;
}

function row(job) {
  const titleId = `job-title-${job.id}`;
  const li = h("li", { class: `job state-${job.state}`, dataset: { jobId: job.id } });
  fillRow(li, job, titleId);
  return li;
}

function fillRow(li, job, titleId = `job-title-${job.id}`) {
  li.className = `job state-${job.state}`;
  const active = ACTIVE.has(job.state);
  const message = job.error && job.state !== "cancelled" ? job.error : summary(job);
  clear(
    li,
    h("div", { class: "job-head" },
      h("a", { href: `#/jobs/${job.id}`, id: titleId, class: "job-title" }, opName(job)),
      h("span", { class: `badge badge-${job.state}` }, STATE_WORDS[job.state] || job.state),
    ),
    h("div", { class: "job-progress", "aria-hidden": active ? "false" : "true" }, progressBar(job, titleId)),
    h("div", { class: "job-meta" },
      h("span", { class: "job-state" }, ACTIVE.has(job.state) ? stateLine(job) : `Ended ${formatWhen(job.finished_at)}`),
      h("span", { class: "job-elapsed", dataset: { elapsed: job.id } }, elapsed(job)),
    ),
    h("p", { class: `job-message ${job.state === "failed" ? "error-text" : ""}`, title: message }, message || "\u00a0"),
    h("div", { class: "job-actions" },
      h("code", { class: "muted" }, shortId(job.id)),
      active
        ? h("button", { type: "button", class: "button small secondary", "aria-label": `Cancel job ${shortId(job.id)}`, onclick: (e) => cancelJob(job, e.currentTarget) }, "Cancel")
        : h("a", { href: `#/jobs/${job.id}`, class: "button small secondary", "aria-label": `${job.state === "succeeded" ? "Results" : "Details"} of job ${shortId(job.id)}` }, job.state === "succeeded" ? "Results" : "Details"),
    ),
  );
}

/** A live list of the caller's jobs in `root`, updated in place. Returns a cleanup function. */
export function mountJobList(root) {
  const list = h("ul", { class: "jobs", "aria-live": "off" });
  const empty = h("p", { class: "muted" }, "No jobs yet. Submit one with the form.");
  clear(root,
    h("div", { class: "section-head" },
      h("h2", {}, "Your jobs"),
      h("span", { id: "live-mode", class: "live", "aria-live": "polite" }),
    ),
    empty,
    list,
  );
  jobs.setMode(jobs.mode);
  const rows = new Map();
  const render = () => {
    const all = jobs.list();
    empty.hidden = all.length > 0;
    const keep = new Set();
    let previous = null;
    for (const job of all) {
      keep.add(job.id);
      let li = rows.get(job.id);
      if (!li) {
        li = row(job);
        rows.set(job.id, li);
        li.dataset.sig = "";
      }
      const sig = JSON.stringify([job.state, job.progress, job.queue_position, job.error]);
      if (li.dataset.sig !== sig) {
        fillRow(li, job);
        li.dataset.sig = sig;
      }
      const want = previous ? previous.nextSibling : list.firstChild;
      if (want !== li) list.insertBefore(li, want);
      previous = li;
    }
    for (const [id, li] of rows) {
      if (!keep.has(id)) {
        li.remove();
        rows.delete(id);
      }
    }
  };
  const unsubscribe = jobs.subscribe(render);
  render();
  const tick = setInterval(() => {
    const now = serverNow();
    for (const el of list.querySelectorAll("[data-elapsed]")) {
      const job = jobs.get(el.dataset.elapsed);
      if (job && ACTIVE.has(job.state)) el.textContent = elapsed(job, now);
    }
  }, 1000);
  return () => {
    unsubscribe();
    clearInterval(tick);
  };
}
