// The coordinator's API, with the identity kept in this browser (localStorage).

const KEY = "csml.identity";

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `request failed (HTTP ${status})`);
    this.status = status;
    this.code = err.code || "http_error";
    this.field = err.field || null;
    this.retryAfter = null;
  }
}

export function identity() {
  try {
    const saved = JSON.parse(localStorage.getItem(KEY) || "null");
    return saved && saved.token && saved.id ? saved : null;
  } catch {
    return null;
  }
}

export function saveIdentity(id, token) {
  localStorage.setItem(KEY, JSON.stringify({ url: location.origin, id, token }));
  window.dispatchEvent(new CustomEvent("csml:identity"));
}

export function dropIdentity() {
  localStorage.removeItem(KEY);
  window.dispatchEvent(new CustomEvent("csml:identity"));
}

let clockOffset = 0;

/** Note the server's clock (its Date header), so elapsed times do not depend on this one's. */
export function noteServerTime(response) {
  const date = Date.parse(response.headers.get("Date") || "");
  if (!Number.isNaN(date)) {
    const offset = date - Date.now();
    clockOffset = Math.abs(offset) > 2000 ? offset : 0; // the header has 1 s resolution
  }
}

export function serverNow() {
  return Date.now() + clockOffset;
}

export function authHeaders(token) {
  const t = token || identity()?.token;
  return t ? { Authorization: `Bearer ${t}` } : {};
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  const error = new ApiError(response.status, body);
  error.retryAfter = response.headers.get("Retry-After");
  if (response.status === 401 && !error.message.includes("operator")) {
    error.message = "This browser's identity is no longer valid (erased or unknown). Join again or import a key file.";
  }
  return error;
}

/** JSON in, JSON out; throws ApiError with the server's message. */
export async function api(path, { method = "GET", body, token, form, signal } = {}) {
  const headers = { Accept: "application/json", ...authHeaders(token) };
  let payload;
  if (form) payload = form;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { error: { message: "The service cannot be reached. Check your connection." } });
  }
  noteServerTime(response);
  if (!response.ok) throw await failure(response);
  if (response.status === 204) return null;
  return response.json();
}

/** A file from the API (an output or a model), as a Blob. */
export async function apiBlob(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw await failure(response);
  return response.blob();
}

const EXT = { "image/png": ".png", "image/jpeg": ".jpg", "text/csv": ".csv", "application/json": ".json", "application/zip": ".zip", "text/plain": ".txt" };

/** The file name extension for an output's media type ("" when unknown). */
export function extensionFor(mediaType) {
  return EXT[(mediaType || "").split(";")[0].trim()] || "";
}

/**
 * Seconds to wait before sending again a request the server refused for now: a 429
 * (a rate or quota that frees up) after its Retry-After (5 s without one), a 503 only
 * with a Retry-After; null for a refusal that waiting does not cure.
 */
export function retryDelay(error) {
  if (!(error instanceof ApiError)) return null;
  const header = error.retryAfter;
  let seconds = null;
  if (header) {
    const n = Number(header);
    if (Number.isFinite(n)) seconds = n;
    else {
      const at = Date.parse(header);
      if (!Number.isNaN(at)) seconds = (at - serverNow()) / 1000;
    }
  }
  if (error.status === 429) return Math.max(1, seconds ?? 5);
  if (error.status === 503 && seconds !== null) return Math.max(1, seconds);
  return null;
}

/** Save a Blob under a file name (the browser's download). */
export function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
