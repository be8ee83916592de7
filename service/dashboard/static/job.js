// One job: its preview, findings, measurements, stage timings and result objects, and the operator's
// actions on it (Retry, Cancel, Re-export), which call the API's own endpoints and show what it answered.

import { ApiError, DASHBOARD, apiPath, describeError, fetchWith, getJson, imageUrl, post, saveBlob } from "./api.js";
import { el, fill, formatSeconds, formatTime, stateBadge, uidSpan } from "./format.js";

/** The buttons and the API action each calls (POST /api/v1/jobs/{id}/<action>). */
const ACTIONS = [
  { id: "retry", label: "Retry", path: "retry", title: "Queue the job again (done, failed or cancelled jobs)" },
  { id: "cancel", label: "Cancel", path: "cancel", title: "Cancel the job (queued, running or exporting jobs)" },
  { id: "export", label: "Re-export", path: "export", title: "Send its results to the PACS again (done or failed jobs)" },
];

function table(id, headings, rows, empty) {
  return el(
    "table",
    { id },
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colSpan: headings.length, className: "empty" }, empty))),
  );
}

/**
 * The body of the first part of a multipart/related answer (WADO-RS sends even one instance that way,
 * PS3.18 8.7.3), as an ArrayBuffer.
 */
export function firstPart(buffer, contentType) {
  const boundary = /boundary="?([^";]+)"?/i.exec(contentType || "");
  if (!boundary) throw new Error("the answer is not multipart");
  const bytes = new Uint8Array(buffer);
  const encode = (text) => new TextEncoder().encode(text);
  const find = (needle, from) => {
    outer: for (let i = Math.max(from, 0); i <= bytes.length - needle.length; i += 1) {
      for (let j = 0; j < needle.length; j += 1) if (bytes[i + j] !== needle[j]) continue outer;
      return i;
    }
    return -1;
  };
  const open = find(encode(`--${boundary[1]}`), 0);
  const headersEnd = open < 0 ? -1 : find(encode("\r\n\r\n"), open);
  const close = headersEnd < 0 ? -1 : find(encode(`\r\n--${boundary[1]}`), headersEnd + 4);
  if (close < 0) throw new Error("the multipart answer is malformed");
  return buffer.slice(headersEnd + 4, close);
}

function hex(status) {
  return status === null || status === undefined ? "—" : `0x${status.toString(16).toUpperCase().padStart(4, "0")}`;
}

export class JobView {
  constructor(root, jobId, { onAuthFailure }) {
    this.root = root;
    this.jobId = jobId;
    this.onAuthFailure = onAuthFailure;
    this.job = null;
    this.lastAnswer = null;
    this.previewKey = null;
    this.previewUrl = null;
    this.build();
  }

  build() {
    this.title = el("h1", {}, `Job #${this.jobId}`);
    this.buttons = ACTIONS.map((action) =>
      el("button", { type: "button", id: `action-${action.id}`, title: action.title, onclick: () => this.act(action) }, action.label),
    );
    this.outcome = el("p", { id: "outcome", className: "message", role: "status", hidden: true });
    this.summary = el("dl", { id: "summary", className: "summary" });
    this.preview = el("img", { id: "preview", alt: "Key slice with the segmentation overlay or the findings", hidden: true });
    this.previewNote = el("p", { id: "preview-note", className: "hint" });
    this.sections = el("div", { id: "details" });
    fill(
      this.root,
      el("nav", { className: "crumbs" }, el("a", { href: DASHBOARD, id: "back" }, "← All jobs")),
      el("div", { className: "job-head" }, this.title, el("div", { className: "actions" }, this.buttons)),
      this.outcome,
      el(
        "div",
        { className: "columns" },
        el("section", { className: "panel" }, el("h2", {}, "Job"), this.summary),
        el("section", { className: "panel" }, el("h2", {}, "Preview"), el("figure", {}, this.preview), this.previewNote),
      ),
      this.sections,
    );
  }

  async refresh() {
    this.render(await getJson(`/api/v1/jobs/${this.jobId}`));
  }

  async act(action) {
    for (const button of this.buttons) button.disabled = true;
    this.show("pending", `${action.label}: sending…`);
    try {
      const job = await post(`/api/v1/jobs/${this.jobId}/${action.path}`);
      this.show("success", `${action.label} accepted: job ${job.id} is now ${job.state}.`);
      this.render(job);
    } catch (error) {
      this.show("error", `${action.label} refused. ${describeError(error)}`);
      if (error instanceof ApiError && error.status === 401) this.onAuthFailure(error);
    } finally {
      for (const button of this.buttons) button.disabled = false;
    }
  }

  show(kind, text) {
    this.outcome.className = `message ${kind}`;
    this.outcome.textContent = text;
    this.outcome.hidden = false;
  }

  render(job) {
    const text = JSON.stringify(job);
    if (text === this.lastAnswer) return; // unchanged: leave the page (and a pending click) alone
    this.lastAnswer = text;
    this.job = job;
    fill(this.title, `Job #${job.id} `, stateBadge(job.state));
    this.renderSummary(job);
    this.renderPreview(job);
    fill(
      this.sections,
      this.findings(job),
      this.measurements(job),
      this.timings(job),
      this.results(job),
    );
  }

  renderSummary(job) {
    const rows = [
      ["Model", `${job.model_id}${job.model_version ? ` ${job.model_version}` : ""}`],
      ["State", stateBadge(job.state)],
      ["Attempts", job.attempts],
      ["Study", uidSpan(job.study_instance_uid)],
      ["Series", uidSpan(job.series_instance_uid)],
      ["Created", formatTime(job.created_at)],
      ["Started", formatTime(job.started_at)],
      ["Finished", formatTime(job.finished_at)],
      ["Error", job.error ? el("span", { className: "error-text", id: "job-error" }, job.error) : "—"],
    ];
    fill(this.summary, rows.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
  }

  async renderPreview(job) {
    const key = `${job.preview_url}|${job.finished_at}`;
    if (key === this.previewKey) return;
    this.previewKey = key;
    if (!job.preview_url) {
      this.setPreview(null, job.state === "done" || job.state === "exporting"
        ? "This job has no preview (its model reads no image, or none could be rendered)."
        : `No preview yet: the job is ${job.state}; one is rendered when it finishes.`);
      return;
    }
    try {
      // fetched with the credential (an <img src> cannot send a header), shown from a blob URL
      this.setPreview(await imageUrl(`/api/v1/jobs/${job.id}/preview.png`), "Key slice with the result drawn on it.");
    } catch (error) {
      this.previewKey = null; // try again on the next refresh
      this.setPreview(null, `The preview could not be loaded. ${describeError(error)}`);
    }
  }

  setPreview(url, note) {
    if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
    this.previewUrl = url;
    this.preview.hidden = !url;
    if (url) this.preview.src = url;
    else this.preview.removeAttribute("src");
    this.previewNote.textContent = note;
  }

  findings(job) {
    const rows = job.findings.map((f) =>
      el(
        "tr",
        {},
        el("td", {}, f.name),
        el("td", { title: `${f.code_scheme}:${f.code_value}` }, f.code_meaning),
        el("td", { className: "num" }, `${(f.probability * 100).toFixed(1)} %`),
        el("td", {}, f.positive === null ? "—" : f.positive ? "yes" : "no"),
      ),
    );
    return el("section", { className: "panel" }, el("h2", {}, "Findings"), table("findings", ["Finding", "Code", "Probability", "Positive"], rows, "No findings."));
  }

  measurements(job) {
    const rows = job.measurements.map((m) =>
      el(
        "tr",
        {},
        el("td", {}, m.segment_label ?? "—", m.segment_number ? el("span", { className: "muted" }, ` (${m.segment_number})`) : null),
        el("td", {}, m.name),
        el("td", { className: "num" }, `${Number(m.value).toFixed(2)} ${m.unit}`),
      ),
    );
    return el("section", { className: "panel" }, el("h2", {}, "Measurements"), table("measurements", ["Segment", "Measurement", "Value"], rows, "No measurements."));
  }

  timings(job) {
    const stages = Object.entries(job.timings || {});
    const total = stages.reduce((sum, [, seconds]) => sum + seconds, 0);
    const rows = stages.map(([stage, seconds]) =>
      el(
        "tr",
        { dataset: { stage } },
        el("td", {}, stage),
        el("td", { className: "num" }, formatSeconds(seconds)),
        el("td", {}, el("meter", { min: 0, max: total || 1, value: seconds })),
      ),
    );
    if (stages.length) rows.push(el("tr", { className: "total" }, el("td", {}, "total"), el("td", { className: "num" }, formatSeconds(total)), el("td")));
    return el("section", { className: "panel" }, el("h2", {}, "Stage timings"), table("timings", ["Stage", "Seconds", ""], rows, "No timings yet (they are written when a run produces results)."));
  }

  /** Save a result object: its DICOM file (from WADO-RS) or its metadata (DICOM JSON), with the credential. */
  async download(object, what) {
    try {
      if (what === "dicom") {
        const answer = await fetchWith(apiPath(object.retrieve_url), 'multipart/related; type="application/dicom"');
        const part = firstPart(await answer.arrayBuffer(), answer.headers.get("Content-Type"));
        saveBlob(new Blob([part], { type: "application/dicom" }), `${object.kind}-${object.sop_instance_uid}.dcm`);
      } else {
        const answer = await fetchWith(apiPath(object.metadata_url), "application/dicom+json");
        saveBlob(await answer.blob(), `${object.kind}-${object.sop_instance_uid}.json`);
      }
    } catch (error) {
      this.show("error", `The ${object.kind} could not be downloaded. ${error instanceof ApiError ? describeError(error) : error.message}`);
    }
  }

  results(job) {
    const button = (object, what, label, url) =>
      el("button", { type: "button", className: "link", title: url, dataset: { download: what }, onclick: () => this.download(object, what) }, label);
    const rows = job.result_objects.map((r) =>
      el(
        "tr",
        { dataset: { kind: r.kind } },
        el("td", {}, r.kind),
        el("td", {}, uidSpan(r.sop_instance_uid)),
        el("td", {}, uidSpan(r.series_instance_uid)),
        el("td", { className: "links" }, button(r, "dicom", "DICOM file", r.retrieve_url), button(r, "metadata", "metadata", r.metadata_url)),
        el(
          "td",
          {},
          r.exports.length
            ? el(
                "ul",
                { className: "exports" },
                r.exports.map((e) =>
                  el(
                    "li",
                    {},
                    `${e.destination} `,
                    stateBadge(e.state),
                    ` ${e.attempts} attempt${e.attempts === 1 ? "" : "s"}, status ${hex(e.last_status)}`,
                    e.delivered_at ? `, delivered ${formatTime(e.delivered_at)}` : "",
                    e.last_error ? el("span", { className: "error-text" }, ` — ${e.last_error}`) : null,
                  ),
                ),
              )
            : "no exports",
        ),
      ),
    );
    return el(
      "section",
      { className: "panel" },
      el("h2", {}, "Result objects"),
      table("results", ["Kind", "SOP Instance UID", "Series", "Download (WADO-RS)", "Exports"], rows, "No result objects yet."),
    );
  }

  dispose() {
    if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
  }
}
