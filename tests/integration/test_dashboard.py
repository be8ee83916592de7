"""The operators' dashboard (``/dashboard``) in headless Chromium, against a real node.

``infergate up`` (embedded: SQLite, filesystem broker) runs with two API keys, ``viewer`` (read) and
``operator`` (admin); a small CT series arrives over DICOM and ct-tissue-seg and ct-bone-classifier process it.
A second ``infergate api`` on the same data folder, without keys (loopback), stands for a node that runs
without authentication. In Debian's chromium (the launch options of the OHIF test):

* without authentication the page shows the jobs straight away, with no login box;
* with keys it asks for one before calling the API, shows the API's 401 message for a wrong key, then lists
  the study and both jobs as done; the filters narrow the list; no patient value is anywhere on the page;
* the job page shows the preview (the ``<img>`` decoded: ``naturalWidth > 0``), measurements, stage timings
  and the SEG and SR, whose DICOM file downloads with the key;
* Retry with the read-only key shows the 403; Cancel and Re-export of a done job show the API's 409 messages;
  Retry with the operator key queues the job again, which the REST API confirms (a new run finishes), and the
  page's auto-refresh shows it done again;
* no key ever appears in a URL, the browser reports no script error and no Content-Security-Policy violation.

Screenshots go to ``artifacts/dashboard-jobs.png`` and ``artifacts/dashboard-job.png`` (as in the OHIF test).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess, node_env, wait_for_http
from tests.helpers.ohif_browser import CHROMIUM, CHROMIUM_ARGS
from tests.helpers.peers import LOOPBACK, free_port, run_storescu, wait_for_port
from tests.helpers.phi_watch import CANARY

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts"
QUIET_SECONDS = 2.0
PATIENT_NAME, PATIENT_ID = "Dashboard^CANARY", "CANARY-DASH-1"
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_STEP_MS = 30_000


def _api(base: str, path: str, key: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"{base}{path}", headers={"X-API-Key": key} if key else {})
    try:
        with _HTTP.open(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _wait_for_jobs(base: str, key: str, study_uid: str, count: int, timeout: float) -> dict[str, dict[str, Any]]:
    """The study's jobs by model once ``count`` of them are settled, read with ``key``."""
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        status, body = _api(base, f"/api/v1/jobs?study_instance_uid={study_uid}", key)
        assert status == 200, body
        if len(body["items"]) >= count and all(job["state"] in ("done", "failed") for job in body["items"]):
            return {job["model_id"]: job for job in body["items"]}
        time.sleep(0.5)
    raise TimeoutError(f"jobs not settled within {timeout} s; last answer: {body}")


@contextmanager
def _browser_page(events: dict[str, list[str]]) -> Iterator[Page]:
    """A fresh Chromium page that records every request URL, console message and script error in ``events``."""
    assert CHROMIUM.is_file(), f"No Chromium at {CHROMIUM}; install Debian's chromium package."
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True).new_page()
            page.set_default_timeout(_STEP_MS)
            page.on("request", lambda request: events["requests"].append(request.url))
            page.on("console", lambda message: events["console"].append(f"[{message.type}] {message.text}"))
            page.on("pageerror", lambda error: events["errors"].append(str(error)))
            yield page
        finally:
            browser.close()


def _job_rows(page: Page) -> Any:
    return page.locator("#jobs tbody tr[data-job-id]")


def _expect_listed_done(page: Page, jobs: dict[str, dict[str, Any]]) -> None:
    for job in jobs.values():
        expect(page.locator(f'#jobs tr[data-job-id="{job["id"]}"]')).to_have_attribute("data-state", "done")


def _sign_in(page: Page, key: str) -> None:
    page.fill("#login-secret", key)
    page.click("#login-submit")


@pytest.mark.timeout(300)
def test_dashboard_lists_jobs_shows_a_job_and_drives_its_actions(tmp_path: Path) -> None:
    viewer_key, operator_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    keys = ",".join(
        f"{name}:{hashlib.sha256(value.encode()).hexdigest()}:{scope}"
        for name, value, scope in (("viewer", viewer_key, "read"), ("operator", operator_key, "admin"))
    )
    data_dir = tmp_path / "var"
    scp_port, api_port, open_port = free_port(), free_port(), free_port()
    base, open_base = f"http://{LOOPBACK}:{api_port}", f"http://{LOOPBACK}:{open_port}"
    env = node_env(
        data_dir=data_dir, scp_port=scp_port, api_port=api_port, series_quiet_seconds=QUIET_SECONDS, api_keys=keys
    )
    node = NodeProcess(["up"], env, tmp_path / "up.log").start()
    open_api = NodeProcess(["api"], node_env(data_dir=data_dir, api_port=open_port), tmp_path / "api-open.log")
    events: dict[str, list[str]] = {"requests": [], "console": [], "errors": []}
    try:
        wait_for_port(LOOPBACK, scp_port, timeout=60)
        wait_for_http(f"{base}/health", timeout=60)
        info = write_ct_series(tmp_path / "ct", slices=32, size=128, patient_name=PATIENT_NAME, patient_id=PATIENT_ID)
        sent = run_storescu(info.folder, port=scp_port, aec="INFERGATE")
        assert sent.returncode == 0, sent.stderr
        jobs = _wait_for_jobs(base, operator_key, info.study_uid, 2, timeout=QUIET_SECONDS + 90)
        assert {job["state"] for job in jobs.values()} == {"done"}, jobs
        seg_job, classifier = jobs["ct-tissue-seg"], jobs["ct-bone-classifier"]
        open_api.start()  # after `up` migrated the database
        wait_for_http(f"{open_base}/health", timeout=60)

        with _browser_page(events) as page:
            # A node without authentication: no login box, the jobs at once.
            page.goto(f"{open_base}/dashboard")
            _expect_listed_done(page, jobs)
            expect(page.locator("#login")).to_be_hidden()
            expect(page.locator("#sign-out")).to_be_hidden()

            # With keys: the page asks first, and calls nothing before it has a key.
            answer = page.goto(f"{base}/dashboard")
            assert answer is not None and "script-src 'self'" in answer.headers["content-security-policy"]
            expect(page.locator("#login")).to_be_visible()
            expect(page.locator("#view")).to_be_hidden()
            assert not [url for url in events["requests"] if url.startswith(f"{base}/api/")]
            _sign_in(page, "not-" + viewer_key)
            expect(page.locator("#auth-error")).to_contain_text("401")
            expect(page.locator("#auth-error")).to_contain_text("The API key is not valid.")
            expect(page.locator("#view")).to_be_hidden()
            _sign_in(page, viewer_key)
            expect(page.locator("#login")).to_be_hidden()
            _expect_listed_done(page, jobs)
            study_row = page.locator(f'#studies tr[data-study-uid="{info.study_uid}"]')
            expect(study_row).to_contain_text("2 done")

            # Filters: model and state on the server, free text here.
            page.select_option("#filter-model", "ct-bone-classifier")
            expect(_job_rows(page)).to_have_count(1)
            expect(_job_rows(page)).to_have_attribute("data-job-id", str(classifier["id"]))
            page.select_option("#filter-model", "")
            page.select_option("#filter-state", "failed")
            expect(page.locator("#jobs")).to_contain_text("No jobs match.")
            page.select_option("#filter-state", "")
            expect(_job_rows(page)).to_have_count(2)
            page.fill("#filter-text", f"#{seg_job['id']}")
            expect(_job_rows(page)).to_have_count(1)
            page.fill("#filter-text", "")
            expect(_job_rows(page)).to_have_count(2)
            study_row.get_by_role("button", name="Show jobs").click()
            expect(page.locator("#filter-study")).to_be_visible()
            expect(_job_rows(page)).to_have_count(2)
            found = CANARY.search(page.inner_text("body"))
            assert found is None, f"patient data on the jobs page: {found.group(0)!r}"
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-jobs.png"), full_page=True)

            # The job page: preview, measurements, timings, result objects.
            page.click(f'#jobs tr[data-job-id="{seg_job["id"]}"] a')
            page.wait_for_url(f"**/dashboard/jobs/{seg_job['id']}")
            expect(page.locator("#preview")).to_be_visible()
            page.wait_for_function("() => { const i = document.getElementById('preview'); return i.complete; }")
            assert page.evaluate("document.getElementById('preview').naturalWidth") > 0
            expect(page.locator("#measurements")).to_contain_text("Soft tissue")
            expect(page.locator('#timings tr[data-stage="onnx"]')).to_be_visible()
            expect(page.locator('#results tr[data-kind="SR"]')).to_be_visible()
            with page.expect_download() as download:
                page.click('#results tr[data-kind="SEG"] button[data-download="dicom"]')
            seg = pydicom.dcmread(download.value.path())
            assert seg.Modality == "SEG" and seg.StudyInstanceUID == info.study_uid
            found = CANARY.search(page.inner_text("body"))
            assert found is None, f"patient data on the job page: {found.group(0)!r}"
            page.screenshot(path=str(ARTIFACTS / "dashboard-job.png"), full_page=True)

            # A read-only key may look but not retry: the API's 403 is shown, and nothing happened.
            page.click("#action-retry")
            expect(page.locator("#outcome")).to_contain_text('403): This operation needs the "submit" scope.')
            status, unchanged = _api(base, f"/api/v1/jobs/{seg_job['id']}", operator_key)
            assert status == 200 and unchanged["finished_at"] == seg_job["finished_at"], unchanged

            page.click("#sign-out")
            expect(page.locator("#login")).to_be_visible()
            assert page.evaluate("window.sessionStorage.length") == 0
            _sign_in(page, operator_key)
            expect(page.locator("#preview")).to_be_visible()

            # Cancel and Re-export of a done job (no PACS configured): the API's 409 messages.
            page.click("#action-cancel")
            outcome = page.locator("#outcome")
            expect(outcome).to_contain_text(f"Cancel refused. The API answered 409: Job {seg_job['id']} is done; ")
            expect(outcome).to_contain_text("only unfinished jobs can be cancelled.")
            page.click("#action-export")
            expect(outcome).to_contain_text("Re-export refused. The API answered 409: No result destinations are")

            # Retry: the job is queued again and runs again; the page follows it by itself.
            page.click("#action-retry")
            expect(page.locator("#outcome")).to_contain_text(f"Retry accepted: job {seg_job['id']} is now queued.")
            rerun = _wait_for_rerun(base, operator_key, seg_job)
            expect(page.locator(".job-head .state")).to_have_text("done", timeout=_STEP_MS)
            assert rerun["attempts"] == 1

            # A classifier's job page lists its findings.
            page.click("#back")
            page.click(f'#jobs tr[data-job-id="{classifier["id"]}"] a')
            _, detail = _api(base, f"/api/v1/jobs/{classifier['id']}", operator_key)
            assert detail["findings"], detail
            expect(page.locator("#findings tbody tr")).to_have_count(len(detail["findings"]))
            expect(page.locator("#findings")).to_contain_text(detail["findings"][0]["code_meaning"])
    except BaseException:
        print(node.log_text()[-20000:])  # noqa: T201
        print("browser console:", *events["console"][-50:], sep="\n  ")  # noqa: T201
        raise
    finally:
        open_api.stop()
        node.stop()
    assert not events["errors"], events["errors"]
    assert not [line for line in events["console"] if "Content Security Policy" in line], events["console"]
    leaked = [url for url in events["requests"] if viewer_key in url or operator_key in url]
    assert not leaked, "an API key was put in a URL"


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _wait_for_rerun(base: str, key: str, before: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """The job once a run started after ``before`` has finished (a later ``finished_at``), over REST."""
    deadline = time.monotonic() + timeout
    job: Any = None
    while time.monotonic() < deadline:
        status, job = _api(base, f"/api/v1/jobs/{before['id']}", key)
        assert status == 200, job
        if job["state"] == "done" and job["finished_at"] and _time(job["finished_at"]) > _time(before["finished_at"]):
            return dict(job)
        assert job["state"] in ("queued", "running", "exporting", "done"), job
        time.sleep(0.3)
    raise TimeoutError(f"the retried job did not run again within {timeout} s; last answer: {job}")
