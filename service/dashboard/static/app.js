// The dashboard's entry point: the login box, the page's route, and the auto-refresh loop.
//
// Two pages share this shell: /dashboard (recent studies and jobs) and /dashboard/jobs/{id}. Each view
// has refresh() (throws ApiError) and dispose(); this module calls refresh() every few seconds while the
// tab is visible, and turns a 401 (or a 403 on reading) into the login box with the API's message.

import { DASHBOARD, authMethods, authRequired, credential, describeError, forgetCredential, saveCredential } from "./api.js";
import { el, fill, formatTime } from "./format.js";
import { JobView } from "./job.js";
import { JobsView } from "./jobs.js";

const REFRESH_MS = 5000;
const KIND_LABELS = { api_key: "API key", bearer: "Bearer token" };

const $ = (id) => document.getElementById(id);

class Dashboard {
  constructor() {
    this.view = null;
    this.timer = null;
    this.busy = false;
    this.again = false;
  }

  init() {
    $("home").href = DASHBOARD;
    this.setUpLogin();
    $("sign-out").addEventListener("click", () => {
      forgetCredential();
      this.showLogin("");
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.view) this.refresh();
    });
    if (authRequired() && !credential()) this.showLogin("");
    else this.start();
  }

  setUpLogin() {
    const methods = authMethods();
    const kind = $("login-kind");
    for (const option of [...kind.options]) {
      if (!methods.includes(option.value)) option.remove();
    }
    $("login-kind-label").hidden = methods.length < 2;
    const label = () => {
      $("login-secret-label").textContent = KIND_LABELS[kind.value] || "Credential";
    };
    kind.addEventListener("change", label);
    label();
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const secret = $("login-secret").value.trim();
      if (!secret) return;
      saveCredential(kind.value || methods[0], secret);
      $("login-secret").value = "";
      this.start();
    });
  }

  showLogin(message) {
    this.stop();
    $("view").hidden = true;
    $("login").hidden = false;
    $("who").hidden = true;
    $("sign-out").hidden = true;
    const error = $("auth-error");
    error.textContent = message;
    error.hidden = !message;
    $("login-secret").focus();
  }

  start() {
    $("login").hidden = true;
    const stored = authRequired() ? credential() : null;
    $("who").hidden = !stored;
    $("sign-out").hidden = !stored;
    if (stored) $("who").textContent = `Signed in with ${stored.kind === "bearer" ? "a bearer token" : "an API key"}`;

    this.autoRefresh = el("input", { type: "checkbox", id: "auto-refresh", checked: true, onchange: () => this.schedule() });
    this.updated = el("span", { id: "updated", className: "hint" });
    this.loadError = el("p", { id: "load-error", className: "message error", role: "alert", hidden: true });
    const content = el("div", { id: "content" });
    const main = $("view");
    fill(
      main,
      el(
        "div",
        { className: "status" },
        el("label", {}, this.autoRefresh, ` Auto-refresh every ${REFRESH_MS / 1000} s`),
        el("button", { type: "button", id: "refresh", onclick: () => this.refresh() }, "Refresh now"),
        this.updated,
      ),
      this.loadError,
      content,
    );
    main.hidden = false;

    const match = window.location.pathname.slice(DASHBOARD.length).match(/^\/jobs\/(\d+)\/?$/);
    const onAuthFailure = (error) => this.authFailed(error);
    this.view = match ? new JobView(content, Number(match[1]), { onAuthFailure }) : new JobsView(content);
    this.view.onFilter = () => this.refresh();
    this.refresh();
    this.schedule();
  }

  stop() {
    if (this.timer) window.clearInterval(this.timer);
    this.timer = null;
    this.view?.dispose();
    this.view = null;
  }

  schedule() {
    if (this.timer) window.clearInterval(this.timer);
    this.timer = null;
    if (this.autoRefresh?.checked) {
      this.timer = window.setInterval(() => {
        if (!document.hidden) this.refresh();
      }, REFRESH_MS);
    }
  }

  async refresh() {
    if (this.busy) {
      this.again = true; // a filter changed mid-request: fetch once more when it returns
      return;
    }
    const view = this.view;
    if (!view) return;
    this.busy = true;
    try {
      await view.refresh();
      if (view !== this.view) return;
      this.loadError.hidden = true;
      this.updated.textContent = `Updated ${formatTime(new Date().toISOString())}`;
    } catch (error) {
      if (view !== this.view) return;
      if (error.isAuth) {
        this.authFailed(error);
      } else {
        this.loadError.textContent = describeError(error);
        this.loadError.hidden = false;
      }
    } finally {
      this.busy = false;
      if (this.again && this.view) {
        this.again = false;
        this.refresh();
      }
    }
  }

  /** The credential was refused: forget it and ask again, saying why (never repeating the credential). */
  authFailed(error) {
    if (!authRequired()) {
      // the API wants a credential the page was told it would not: say so rather than loop
      this.loadError.textContent = describeError(error);
      this.loadError.hidden = false;
      return;
    }
    forgetCredential();
    this.showLogin(describeError(error));
  }
}

new Dashboard().init();
