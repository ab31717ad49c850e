// The user page: a small hash router over the views.

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
  syncIdentity();
  const hash = location.hash || "";
  const me = identity();
  let name = hash.replace(/^#\/?/, "").split("/")[0] || (me ? "work" : "identity");
  if (!me && name !== "identity") name = "identity";
  markNav(name === "jobs" ? "work" : name);
  const titles = { identity: "Your identity", work: "Submit and follow jobs", jobs: "Job", models: "Your models", credit: "Your credit" };
  document.title = `${titles[name] || "CSML"} — CSML`;
  try {
    if (name === "identity") renderIdentity(main);
    else if (name === "work") {
      const form = h("section", { class: "panel", "aria-labelledby": "submit-title" });
      const list = h("section", { class: "panel", "aria-labelledby": "jobs-title" });
      const batchArea = h("div", { class: "batches" });
      clear(main, h("h1", { class: "visually-hidden" }, "Submit and follow jobs"), h("div", { class: "work" }, h("div", { class: "work-side" }, form, batchArea), list));
      const unmountList = mountJobList(list);
      const unmountBatches = mountBatches(batchArea);
      cleanup = () => {
        unmountList();
        unmountBatches();
      };
      list.querySelector("h2").id = "jobs-title";
      await renderSubmit(form);
    } else if (name === "jobs") {
      const id = hash.split("/")[2] || "";
      cleanup = await renderJob(main, id);
    } else if (name === "models") await renderModels(main);
    else if (name === "credit") await renderCredit(main);
    else clear(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/work" }, "Go to your jobs")));
  } catch (e) {
    clear(main, h("h1", {}, "Something went wrong"), h("p", { class: "error-text" }, e.message));
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
