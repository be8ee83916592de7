// Small helpers to build DOM and format values. Text always goes in through textContent, never as
// HTML, so nothing the API returns (an error message, a label) can become markup.

/**
 * Build an element: el("td", {className: "num", title: "..."}, "text", childElement, ...).
 * Attributes named `dataset` take an object; `on<event>` take a listener; others are set as properties
 * when the element has one (className, href, disabled...), else as attributes.
 */
export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace every child of `node`. */
export function fill(node, ...children) {
  node.replaceChildren();
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) node.append(child);
  }
  return node;
}

/** A UID shortened to its head and tail ("1.2.826…498.5001"); the full UID goes in a title. */
export function shortUid(uid, keep = 8) {
  if (!uid) return "";
  return uid.length <= keep * 2 + 1 ? uid : `${uid.slice(0, keep)}…${uid.slice(-keep)}`;
}

/** A <span> showing a shortened UID, the whole of it on hover. */
export function uidSpan(uid) {
  return el("span", { className: "uid", title: uid || "" }, shortUid(uid));
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** A timestamp of the API (ISO 8601) in the browser's local time, or "—". */
export function formatTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(
    d.getMinutes(),
  )}:${pad(d.getSeconds())}`;
}

/** Seconds as "0.42 s", "12.3 s" or "4 min 05 s". */
export function formatSeconds(seconds) {
  if (seconds === undefined || seconds === null || Number.isNaN(seconds)) return "—";
  if (seconds < 10) return `${seconds.toFixed(2)} s`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${pad(Math.round(seconds % 60))} s`;
}

/** Seconds between two API timestamps, or null when either is missing. */
export function between(startIso, endIso) {
  if (!startIso || !endIso) return null;
  return (new Date(endIso).getTime() - new Date(startIso).getTime()) / 1000;
}

/** A coloured badge for a job, export or series state. */
export function stateBadge(state) {
  return el("span", { className: `state state-${state}` }, state);
}

/** The job states of the API (infergate.store.tables.JobState), in their order. */
export const JOB_STATES = ["queued", "running", "exporting", "done", "failed", "cancelled"];
