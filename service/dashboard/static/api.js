// Calls to the node's REST API, with the operator's credential in a header (never in a URL).
//
// The credential lives in sessionStorage: it survives a reload and links within the tab, and is gone
// when the tab closes. Paths are resolved against the node's root as seen from this page, so the
// dashboard keeps working behind a reverse proxy that mounts the node under a prefix.

const STORAGE_KEY = "infergate.dashboard.credential";
const API_KEY_HEADER = "X-API-Key";

/** The node's root path ("" or a proxy prefix), taken from where the dashboard is served. */
export const ROOT = window.location.pathname.replace(/\/dashboard(\/.*)?$/, "");
/** The dashboard's own root, for links between its pages. */
export const DASHBOARD = `${ROOT}/dashboard`;

/** An answer the API refused (4xx/5xx), carrying its `detail` message when it sent one. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.detail = detail || "";
  }

  /** 401/403: the credential is missing, wrong, expired or lacks a scope. */
  get isAuth() {
    return this.status === 401 || this.status === 403;
  }
}

/** Which credentials the API accepts (from the page the server rendered); empty: no login needed. */
export function authMethods() {
  return (document.body.dataset.auth || "").split(" ").filter(Boolean);
}

export function authRequired() {
  return authMethods().length > 0;
}

/** The stored credential as {kind, secret}, or null. */
export function credential() {
  try {
    const stored = JSON.parse(window.sessionStorage.getItem(STORAGE_KEY) || "null");
    return stored && typeof stored.secret === "string" && stored.secret ? stored : null;
  } catch {
    return null;
  }
}

export function saveCredential(kind, secret) {
  window.sessionStorage.setItem(STORAGE_KEY, JSON.stringify({ kind, secret }));
}

export function forgetCredential() {
  window.sessionStorage.removeItem(STORAGE_KEY);
}

function headers(extra) {
  const out = new Headers(extra || {});
  const stored = authRequired() ? credential() : null;
  if (stored && stored.kind === "bearer") {
    out.set("Authorization", `Bearer ${stored.secret}`);
  } else if (stored) {
    out.set(API_KEY_HEADER, stored.secret);
  }
  return out;
}

async function detailOf(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((e) => e.msg).join("; ");
  } catch {
    // not JSON (a proxy's error page): the status says enough
  }
  return "";
}

async function call(method, path, { accept = "application/json", query } = {}) {
  const url = new URL(`${ROOT}${path}`, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const response = await fetch(url, {
    method,
    headers: headers({ Accept: accept }),
    credentials: "omit", // the API takes header credentials only; no cookies to send
    cache: "no-store",
  });
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  return response;
}

/** GET a JSON resource of the API (`path` starts with /api/...). */
export async function getJson(path, query) {
  return (await call("GET", path, { query })).json();
}

/** POST to an action of the API (retry, cancel, export) and return its JSON answer. */
export async function post(path, query) {
  return (await call("POST", path, { query })).json();
}

/** GET an image with the credential, as a blob URL the caller must revoke. */
export async function imageUrl(path) {
  const response = await call("GET", path, { accept: "image/png" });
  return URL.createObjectURL(await response.blob());
}

/** GET `path` with the credential and the given Accept header; the Response, for its body and headers. */
export async function fetchWith(path, accept) {
  return call("GET", path, { accept });
}

/** The API path of one of its own absolute URLs (a result link), so it is fetched from this origin. */
export function apiPath(url) {
  const path = new URL(url, window.location.origin).pathname;
  const at = path.indexOf("/dicomweb/");
  return at >= 0 ? path.slice(at) : path.slice(ROOT.length);
}

/** Hand `blob` to the browser as a file download named `filename`. */
export function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  window.setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** A sentence for a person about a failed call, with the API's own message. */
export function describeError(error) {
  if (!(error instanceof ApiError)) return `The API could not be reached (${error.message}).`;
  if (error.status === 401) return `The API refused the credential (401): ${error.detail || "not valid"}`;
  if (error.status === 403) return `The credential is not allowed to do this (403): ${error.detail}`;
  return `The API answered ${error.status}: ${error.detail || "no detail"}`;
}
