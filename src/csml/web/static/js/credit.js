// Your credit: the balance, what you earned (your contributed workers' accepted runs of
// other people's jobs) and spent (your jobs served ahead of round-robin), and the ledger,
// newest first, paged with "Older entries".

import { api } from "./api.js";
import { clear, formatTime, h, shortId } from "./dom.js";

const credits = (milli) => (milli / 1000).toLocaleString(undefined, { minimumFractionDigits: 3, maximumFractionDigits: 3 });

function entryRow(e) {
  const earned = e.kind === "earned";
  return h("tr", { dataset: { entryId: String(e.id), kind: e.kind } },
    h("td", {}, formatTime(e.at)),
    h("td", {}, earned ? "Earned" : "Spent"),
    h("td", { class: earned ? "credit-earned" : "credit-spent" }, `${earned ? "+" : "−"}${credits(e.amount_milli)}`),
    h("td", {}, e.app),
    h("td", {}, e.job_id ? h("code", {}, shortId(e.job_id)) : "—"),
    h("td", {}, e.worker_id ? h("code", {}, shortId(e.worker_id)) : "—"),
  );
}

export async function renderCredit(root) {
  let info;
  try {
    info = await api("/v1/credit?limit=50");
  } catch (e) {
    clear(root, h("h1", {}, "Your credit"), h("p", { class: "error-text" }, e.message));
    return;
  }
  const body = h("tbody", {}, info.entries.map(entryRow));
  const more = h("p", {});
  let before = info.next_before;
  const showMore = () => {
    clear(more, before === null ? "" : h("button", {
      type: "button",
      class: "button small secondary",
      onclick: async () => {
        const page = await api(`/v1/credit?limit=50&before=${before}`);
        for (const e of page.entries) body.append(entryRow(e));
        before = page.next_before;
        showMore();
      },
    }, "Older entries"));
  };
  showMore();
  const { k, n } = info.priority;
  clear(
    root,
    h("h1", {}, "Your credit"),
    h("p", { class: "lead" },
      "Your contributed workers earn credit for the jobs of others they run (wall seconds × the app's weight); ",
      `while your balance is above zero your queued jobs are served ahead of round-robin, at most ${k} of every ${n} jobs of an app, and each job served so costs its wall seconds.`),
    h("dl", { class: "credit-balance" },
      h("dt", {}, "Balance"), h("dd", { id: "credit-balance" }, `${credits(info.balance_milli)} credits`),
      h("dt", {}, "Earned"), h("dd", {}, credits(info.earned_milli)),
      h("dt", {}, "Spent"), h("dd", {}, credits(info.spent_milli)),
      h("dt", {}, "Priority"), h("dd", {}, info.credited ? "yes: your jobs may be served ahead" : "no: round-robin only"),
    ),
    info.entries.length
      ? h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Credit ledger; scrolls sideways on narrow screens" },
          h("table", { class: "credit wide" },
            h("thead", {}, h("tr", {}, ["When", "Kind", "Credits", "App", "Job", "Worker"].map((c) => h("th", { scope: "col" }, c)))),
            body,
          ))
      : h("p", { class: "muted" }, "No entries yet. Contribute a worker (csml contribute APP) to earn credit."),
    more,
  );
}
