// The user page: a small hash router over the views.
//
// Each view renders into its own element, put in <main> when its route starts, and gets
// an AbortSignal aborted when the next route starts. A view still loading when the user
// leaves it (a late response) therefore draws, at worst, into its own detached element,
// never over the next view; its requests are aborted and the clean-up it returns late
// (subscriptions) is run at once instead of being kept.

import { identity } from "./api.js";
import { mountBatches } from "./batch.js";
import { renderCredit } from "./credit.js";
import { announce, clear, h, shortId } from "./dom.js";
import { renderIdentity } from "./identity.js";
import { renderJob } from "./job.js";
import { jobs, mountJobList } from "./jobs.js";
import { renderModels } from "./models.js";
import { renderSubmit } from "./submit.js";

const main = document.getElementById("main");
let cleanup = () => {};
let streaming = null;
let view = new AbortController(); // the current view's; aborted when the next one starts

function syncIdentity() {
  const me = identity();
  const who = document.getElementById("who");
  clear(who, me ? h("a", { href: "#/identity" }, `Id ${shortId(me.id)}`) : "");
  for (const a of document.querySelectorAll("nav a[data-route]")) {
    a.parentElement.hidden = !me && a.dataset.route !== "identity"; // nothing there before joining
  }
  const token = me ? me.token : null;
  if (token !== streaming) {
    streaming = token;
    if (token) jobs.start();
    else {
      jobs.stop();
      jobs.replace([]);
    }
  }
}

function markNav(route) {
  for (const a of document.querySelectorAll("nav a[data-route]")) {
    if (a.dataset.route === route) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

async function route() {
  cleanup();
  cleanup = () => {};
  view.abort();
  const mine = new AbortController();
  view = mine;
  const current = () => view === mine;
  /** Keep a view's clean-up, or run it at once when the view was left while loading. */
  const adopt = (stop) => {
    if (current()) cleanup = stop;
    else stop();
  };
  const root = h("div", { class: "view" });
  clear(main, root);
  syncIdentity();
  const hash = location.hash || "";
  const me = identity();
  let name = hash.replace(/^#\/?/, "").split("/")[0] || (me ? "work" : "identity");
  if (!me && name !== "identity") name = "identity";
  markNav(name === "jobs" ? "work" : name);
  const titles = { identity: "Your identity", work: "Submit and follow jobs", jobs: "Job", models: "Your models", credit: "Your credit" };
  document.title = `${titles[name] || "CSML"} — CSML`;
  try {
    if (name === "identity") renderIdentity(root);
    else if (name === "work") {
      const form = h("section", { class: "panel", "aria-labelledby": "submit-title" });
      const list = h("section", { class: "panel", "aria-labelledby": "jobs-title" });
      const batchArea = h("div", { class: "batches" });
      clear(root, h("h1", { class: "visually-hidden" }, "Submit and follow jobs"), h("div", { class: "work" }, h("div", { class: "work-side" }, form, batchArea), list));
      const unmountList = mountJobList(list);
      const unmountBatches = mountBatches(batchArea);
      adopt(() => {
        unmountList();
        unmountBatches();
      });
      list.querySelector("h2").id = "jobs-title";
      await renderSubmit(form);
    } else if (name === "jobs") {
      const id = hash.split("/")[2] || "";
      adopt(await renderJob(root, id, mine.signal));
    } else if (name === "models") await renderModels(root);
    else if (name === "credit") await renderCredit(root);
    else clear(root, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/work" }, "Go to your jobs")));
  } catch (e) {
    if (current() && e.name !== "AbortError") clear(root, h("h1", {}, "Something went wrong"), h("p", { class: "error-text" }, e.message));
  }
}

window.addEventListener("hashchange", () => {
  route().then(() => main.focus({ preventScroll: false }));
});
window.addEventListener("csml:identity", syncIdentity);
window.addEventListener("storage", (e) => {
  if (e.key === "csml.identity") route();
});
window.addEventListener("unhandledrejection", (e) => announce(e.reason?.message || String(e.reason), "error"));
route();
