// Join (proof of work in a Web Worker), key-file export and import, and "forget me".

import { api, dropIdentity, identity, saveBlob, saveIdentity } from "./api.js";
import { announce, clear, go, h, newId, shortId } from "./dom.js";

function solve(challenge, difficulty, onProgress) {
  return new Promise((resolve, reject) => {
    const worker = new Worker("/static/js/pow-worker.js");
    worker.onmessage = (event) => {
      const msg = event.data;
      if (msg.done) {
        worker.terminate();
        resolve(msg.nonce);
      } else onProgress(msg.tried, msg.expected);
    };
    worker.onerror = (e) => {
      worker.terminate();
      reject(new Error(`the proof of work failed: ${e.message}`));
    };
    worker.postMessage({ challenge, difficulty });
  });
}

async function join(progress, status) {
  const ch = await api("/v1/identities/challenge", { method: "POST" });
  let body;
  if (ch.difficulty > 0) {
    progress.hidden = false;
    status.textContent = "Working out a small puzzle that protects the service from mass sign-ups…";
    const nonce = await solve(ch.challenge, ch.difficulty, (tried, expected) => {
      // Expected work is 2^difficulty hashes; show progress towards that, capped.
      const pct = Math.min(95, Math.round((100 * tried) / (expected * 1.5)));
      progress.value = pct;
      progress.textContent = `${pct}%`;
    });
    progress.value = 100;
    body = { challenge: ch.challenge, nonce };
  }
  status.textContent = "Creating your identity…";
  const created = await api("/v1/identities", { method: "POST", body });
  saveIdentity(created.id, created.token);
  return created;
}

function keyFile(me) {
  const text = JSON.stringify({ csml_key: 1, url: location.origin, id: me.id, token: me.token }, null, 2);
  return new Blob([text + "\n"], { type: "application/json" });
}

export async function importKey(file) {
  let parsed;
  try {
    parsed = JSON.parse(await file.text());
  } catch {
    throw new Error("This file is not a CSML key file (it is not JSON).");
  }
  if (!parsed || typeof parsed.token !== "string" || typeof parsed.id !== "string") {
    throw new Error("This file is not a CSML key file (it has no id and token).");
  }
  if (parsed.url && parsed.url !== location.origin) {
    throw new Error(`This key belongs to ${parsed.url}, not to this service (${location.origin}).`);
  }
  const me = await api("/v1/identities/me", { token: parsed.token });
  if (me.id !== parsed.id) throw new Error("This key file's id does not match its token.");
  saveIdentity(parsed.id, parsed.token);
  return me;
}

function importControl() {
  const inputId = newId("import");
  const input = h("input", {
    type: "file",
    id: inputId,
    accept: ".json,application/json",
    class: "visually-hidden",
    onchange: async () => {
      const file = input.files[0];
      input.value = "";
      if (!file) return;
      try {
        const me = await importKey(file);
        announce(`Key imported. You are ${shortId(me.id)}.`, "success");
        go("#/work");
      } catch (e) {
        announce(e.message, "error");
      }
    },
  });
  return h("span", {}, input, h("label", { for: inputId, class: "button secondary" }, "Import key file"));
}

export function renderIdentity(root) {
  const me = identity();
  if (!me) {
    const progress = h("progress", { max: 100, value: 0, hidden: true, "aria-label": "Puzzle progress" });
    const status = h("p", { class: "muted", role: "status" });
    const button = h("button", { type: "button", class: "button primary large" }, "Join anonymously");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const created = await join(progress, status);
        status.textContent = "";
        announce(`Welcome. Your identity is ${shortId(created.id)}.`, "success");
        go("#/work");
      } catch (e) {
        status.textContent = "";
        progress.hidden = true;
        announce(e.message, "error");
        button.disabled = false;
      }
    });
    clear(
      root,
      h("h1", {}, "Join"),
      h(
        "p",
        { class: "lead" },
        "One click gives you an anonymous identity: a random id that is all this service knows about you — no name, no e-mail, no address.",
      ),
      h("div", { class: "actions" }, button, importControl()),
      progress,
      status,
      h("p", { class: "muted" }, "Your key stays in this browser. Export it to a file to use it elsewhere or to keep it safe: whoever has the key file has your jobs."),
    );
    return;
  }
  const confirmBox = h("div", { class: "confirm", hidden: true, role: "group", "aria-labelledby": "forget-q" });
  const forget = h("button", { type: "button", class: "button danger" }, "Forget me…");
  forget.addEventListener("click", () => {
    confirmBox.hidden = false;
    confirmBox.querySelector("button").focus();
  });
  clear(
    confirmBox,
    h("p", { id: "forget-q" }, "Erase your identity, all your jobs, files and models from the service? This cannot be undone."),
    h(
      "div",
      { class: "actions" },
      h("button", {
        type: "button",
        class: "button danger",
        onclick: async () => {
          try {
            await api("/v1/identities/me", { method: "DELETE" });
          } catch (e) {
            if (e.status !== 401) {
              announce(e.message, "error");
              return;
            }
          }
          dropIdentity();
          announce("Your identity and everything in it were erased.", "success");
          go("#/identity");
        },
      }, "Yes, erase everything"),
      h("button", {
        type: "button",
        class: "button secondary",
        onclick: () => {
          confirmBox.hidden = true;
          forget.focus();
        },
      }, "Keep my identity"),
    ),
  );
  clear(
    root,
    h("h1", {}, "Your identity"),
    h("p", { class: "lead" }, "This random id is all the service knows about you."),
    h("dl", { class: "facts" },
      h("dt", {}, "Id"), h("dd", {}, h("code", { class: "break", "data-testid": "identity-id" }, me.id)),
      h("dt", {}, "Key"), h("dd", {}, "Kept in this browser only."),
    ),
    h(
      "div",
      { class: "actions" },
      h("button", {
        type: "button",
        class: "button primary",
        onclick: () => saveBlob(keyFile(me), `csml-key-${shortId(me.id)}.json`),
      }, "Export key file"),
      importControl(),
      forget,
    ),
    confirmBox,
    h("p", { class: "muted" }, "The key file lets you (or anyone holding it) reach your jobs from another browser or the command line. Keep it private. Importing another key replaces this one in this browser: export this one first to keep it."),
  );
}
