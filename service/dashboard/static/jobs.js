// The jobs page: recent studies (grouped from the jobs) and recent jobs, with filters.
//
// State and model filter on the server (GET /api/v1/jobs?state=&model_id=&study_instance_uid=); the free
// text filters the fetched jobs here, on fields that hold no patient data: job id, model, state, study and
// series UIDs, and the error message. Patient names, IDs and birth dates are never requested.

import { DASHBOARD, getJson } from "./api.js";
import { JOB_STATES, between, el, fill, formatSeconds, formatTime, stateBadge, uidSpan } from "./format.js";

const LIMIT = 200;
const MAX_STUDIES = 15;

/** Whether `job` matches the free text `needle` (lower case). "#12" or "12" also matches job 12 exactly. */
export function matches(job, needle) {
  if (!needle) return true;
  const id = needle.match(/^#?(\d+)$/);
  if (id && job.id === Number(id[1])) return true;
  const fields = [
    `#${job.id}`,
    job.model_id,
    job.model_version,
    job.state,
    job.study_instance_uid,
    job.series_instance_uid,
    job.error,
  ];
  return fields.some((field) => field && String(field).toLowerCase().includes(needle));
}

/** Studies of `jobs`, newest activity first: {uid, series, jobs, states: {state: n}, models, latest}. */
export function studiesOf(jobs) {
  const studies = new Map();
  for (const job of jobs) {
    let study = studies.get(job.study_instance_uid);
    if (!study) {
      study = { uid: job.study_instance_uid, series: new Set(), jobs: 0, states: {}, models: new Set(), latest: "" };
      studies.set(job.study_instance_uid, study);
    }
    study.series.add(job.series_instance_uid);
    study.jobs += 1;
    study.states[job.state] = (study.states[job.state] || 0) + 1;
    study.models.add(job.model_id);
    for (const time of [job.created_at, job.started_at, job.finished_at]) {
      if (time && time > study.latest) study.latest = time;
    }
  }
  return [...studies.values()].sort((a, b) => (a.latest < b.latest ? 1 : -1));
}

export class JobsView {
  constructor(root) {
    this.root = root;
    this.jobs = [];
    this.lastAnswer = null;
    this.models = null;
    this.filters = { state: "", model: "", text: "", study: "" };
    this.build();
  }

  build() {
    this.stateSelect = el(
      "select",
      { id: "filter-state", onchange: () => this.setFilter("state", this.stateSelect.value) },
      el("option", { value: "" }, "All states"),
      JOB_STATES.map((state) => el("option", { value: state }, state)),
    );
    this.modelSelect = el(
      "select",
      { id: "filter-model", onchange: () => this.setFilter("model", this.modelSelect.value) },
      el("option", { value: "" }, "All models"),
    );
    this.textInput = el("input", {
      id: "filter-text",
      type: "search",
      placeholder: "Job id, model, study or series UID, error",
      oninput: () => {
        this.filters.text = this.textInput.value.trim().toLowerCase();
        this.renderJobs();
      },
    });
    this.studyChip = el("span", { id: "filter-study", className: "chip", hidden: true });
    this.studiesBody = el("tbody");
    this.jobsBody = el("tbody");
    this.count = el("p", { className: "hint", id: "jobs-count" });
    fill(
      this.root,
      el(
        "section",
        { className: "panel" },
        el("h2", {}, "Recent studies"),
        el(
          "table",
          { id: "studies" },
          el("thead", {}, el("tr", {}, ["Study", "Series", "Jobs", "Models", "Last activity", ""].map((h) => el("th", {}, h)))),
          this.studiesBody,
        ),
      ),
      el(
        "section",
        { className: "panel" },
        el("h2", {}, "Jobs"),
        el(
          "div",
          { className: "filters" },
          el("label", {}, "State ", this.stateSelect),
          el("label", {}, "Model ", this.modelSelect),
          el("label", { className: "grow" }, "Search ", this.textInput),
          this.studyChip,
        ),
        el(
          "table",
          { id: "jobs" },
          el(
            "thead",
            {},
            el(
              "tr",
              {},
              [
                ["Job"],
                ["State"],
                ["Model"],
                ["Study"],
                ["Series"],
                ["Attempts"],
                ["Created"],
                ["Finished"],
                ["Wait", "From the job's creation to the start of its last run"],
                ["Run", "From the start to the end of its last run"],
                ["Error"],
              ].map(([h, title]) => el("th", { title }, h)),
            ),
          ),
          this.jobsBody,
        ),
        this.count,
      ),
    );
  }

  setFilter(name, value) {
    this.filters[name] = value;
    this.onFilter?.();
  }

  async refresh() {
    if (this.models === null) {
      this.models = await getJson("/api/v1/models");
      this.renderModelOptions();
    }
    const page = await getJson("/api/v1/jobs", {
      limit: LIMIT,
      state: this.filters.state,
      model_id: this.filters.model,
      study_instance_uid: this.filters.study,
    });
    const text = JSON.stringify(page.items);
    if (text === this.lastAnswer) return; // unchanged: leave the tables (and a pending click) alone
    this.lastAnswer = text;
    this.jobs = page.items;
    this.renderStudies();
    this.renderJobs();
  }

  renderModelOptions() {
    const ids = [...new Set(this.models.map((model) => model.id))].sort();
    this.modelSelect.append(...ids.map((id) => el("option", { value: id }, id)));
  }

  renderStudies() {
    const rows = studiesOf(this.jobs)
      .slice(0, MAX_STUDIES)
      .map((study) =>
        el(
          "tr",
          { dataset: { studyUid: study.uid } },
          el("td", {}, uidSpan(study.uid)),
          el("td", { className: "num" }, study.series.size),
          el(
            "td",
            {},
            Object.entries(study.states).map(([state, n]) => el("span", { className: "count" }, n, " ", stateBadge(state))),
          ),
          el("td", {}, [...study.models].sort().join(", ")),
          el("td", {}, formatTime(study.latest)),
          el("td", {}, el("button", { type: "button", className: "link", onclick: () => this.showStudy(study.uid) }, "Show jobs")),
        ),
      );
    fill(this.studiesBody, rows.length ? rows : el("tr", {}, el("td", { colSpan: 6, className: "empty" }, "No studies yet.")));
  }

  showStudy(uid) {
    this.filters.study = uid;
    fill(
      this.studyChip,
      "Study ",
      uidSpan(uid),
      el("button", { type: "button", className: "link", title: "Show every study", onclick: () => this.showStudy("") }, "×"),
    );
    this.studyChip.hidden = !uid;
    this.onFilter?.();
  }

  renderJobs() {
    const shown = this.jobs.filter((job) => matches(job, this.filters.text));
    const rows = shown.map((job) =>
      el(
        "tr",
        { dataset: { jobId: job.id, state: job.state } },
        el("td", {}, el("a", { href: `${DASHBOARD}/jobs/${job.id}` }, `#${job.id}`)),
        el("td", {}, stateBadge(job.state)),
        el("td", {}, job.model_id, job.model_version ? el("span", { className: "muted" }, ` ${job.model_version}`) : null),
        el("td", {}, uidSpan(job.study_instance_uid)),
        el("td", {}, uidSpan(job.series_instance_uid)),
        el("td", { className: "num" }, job.attempts),
        el("td", {}, formatTime(job.created_at)),
        el("td", {}, formatTime(job.finished_at)),
        el("td", { className: "num" }, formatSeconds(between(job.created_at, job.started_at))),
        el("td", { className: "num" }, formatSeconds(between(job.started_at, job.finished_at))),
        el("td", { className: "error-text", title: job.error || "" }, job.error || ""),
      ),
    );
    fill(this.jobsBody, rows.length ? rows : el("tr", {}, el("td", { colSpan: 11, className: "empty" }, "No jobs match.")));
    this.count.textContent = `${shown.length} of the ${this.jobs.length} most recent jobs${
      this.jobs.length === LIMIT ? ` (the latest ${LIMIT})` : ""
    }.`;
  }

  dispose() {}
}
