"""Headless Chromium, driven by Playwright, checking what OHIF shows of a study on the node.

:func:`check_study` does what a radiologist would: in OHIF's study list it finds the study's row (by the
patient ID, accession number and description the node's QIDO-RS gives for the UID), checks the modalities
listed, clicks it and launches the Basic Viewer, checks that the viewer opened *that* study and that its series
panel lists a ``SEG`` and an ``SR`` series (OHIF prints the modality on each thumbnail), then opens the SEG
over the CT and reads the segment names from the segmentation panel. A screenshot of each step is written
whatever happens. The browser's console, failed requests and HTTP error answers are collected; an error
answer from the node fails the check and is named in the message (request URL, status, Accept header), so
that a DICOMweb problem is reported precisely rather than as a time-out.

The browser is Debian's ``/usr/bin/chromium``, started by Playwright on a fresh temporary profile; Playwright's
own browser download is never used.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, Request, Response, ViewportSize, sync_playwright

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "BrowserLog",
    "OhifCheckFailed",
    "OhifReport",
    "StudyRow",
    "check_study",
    "study_row",
]

CHROMIUM = Path("/usr/bin/chromium")
#: Headless on a machine without a GPU or a network: no background traffic (it would hammer the closed network),
#: WebGL through SwiftShader so that cornerstone renders on its GPU path rather than the CPU fallback.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]
_VIEWPORT: ViewportSize = {"width": 1600, "height": 1000}
#: A returning user: the viewer's onboarding tour and the investigational-use banner were dismissed before.
#: Both would otherwise cover part of the screenshots; neither is configuration of the data source.
_RETURNING_USER = (
    "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"
    "sessionStorage.setItem('investigationalUseDialog', 'hidden');"
)
_MODALITY_LIST = re.compile(r"^[A-Z]{2,8}([\\/][A-Z]{2,8})*$")
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OhifCheckFailed(AssertionError):
    """OHIF did not show what was expected; the message says what, and ends with the browser's log."""


@dataclass
class BrowserLog:
    """What the page said and which requests went wrong, in order; ``watched`` is the node's origin."""

    watched: str
    console: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    error_responses: list[str] = field(default_factory=list)
    node_errors: list[str] = field(default_factory=list)
    in_flight: int = 0

    def attach(self, page: Page) -> None:
        page.on("console", lambda message: self.console.append(f"[{message.type}] {message.text}"))
        page.on("pageerror", lambda error: self.console.append(f"[pageerror] {error}"))
        page.on("request", self._started)
        page.on("requestfinished", self._finished)
        page.on("requestfailed", self._failed)
        page.on("response", self._response)

    def _started(self, request: Request) -> None:
        self.in_flight += 1

    def _finished(self, request: Request) -> None:
        self.in_flight -= 1

    def _failed(self, request: Request) -> None:
        self.in_flight -= 1
        line = f"{request.method} {request.url}: {request.failure} (Accept: {request.headers.get('accept', '')})"
        self.failed_requests.append(line)
        # a request the page itself cancels (it navigated on, or a thumbnail went out of view) is not the node's fault
        if request.url.startswith(self.watched) and "ERR_ABORTED" not in (request.failure or ""):
            self.node_errors.append(line)

    def _response(self, response: Response) -> None:
        if response.status < 400:
            return
        request = response.request
        line = (
            f"{request.method} {response.url} -> {response.status} {response.status_text} "
            f"(Accept: {request.headers.get('accept', '')}; answered Content-Type: "
            f"{response.headers.get('content-type', '')})"
        )
        self.error_responses.append(line)
        if response.url.startswith(self.watched):
            self.node_errors.append(line)

    def text(self, limit: int = 200) -> str:
        """The log for a failure message: error answers and failed requests, then the last console lines."""
        return "\n".join(
            [
                "HTTP error answers:",
                *(f"  {line}" for line in self.error_responses[-limit:]),
                "failed requests:",
                *(f"  {line}" for line in self.failed_requests[-limit:]),
                "browser console:",
                *(f"  {line}" for line in self.console[-limit:]),
            ]
        )


@dataclass(frozen=True)
class StudyRow:
    """What OHIF's study list shows of a study, as the node's QIDO-RS answers it."""

    study_uid: str
    patient_id: str
    accession_number: str
    study_description: str
    modalities: tuple[str, ...]


@dataclass
class OhifReport:
    """What OHIF showed: the series modalities and segment names, and the screenshots written."""

    series_modalities: list[str]
    segments: list[str]
    screenshots: list[Path]
    log: BrowserLog
    seconds: float


def _first(item: dict[str, dict[str, list[object]]], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def study_row(dicomweb_url: str, study_uid: str, timeout: float = 30.0) -> StudyRow:
    """Look the study up with QIDO-RS (PS3.18 10.6), for the values that identify its row in the study list.

    Raises
    ------
    OhifCheckFailed
        If the node does not answer or does not list the study.
    """
    url = (
        f"{dicomweb_url.rstrip('/')}/studies?StudyInstanceUID={quote(study_uid)}"
        "&includefield=00080050,00100020,00081030,00080061"
    )
    request = urllib.request.Request(url, headers={"Accept": "application/dicom+json"})
    try:
        with _HTTP.open(request, timeout=timeout) as response:
            body = response.read()
    except OSError as exc:  # URLError and HTTPError included
        raise OhifCheckFailed(f"The node's QIDO-RS ({url}) did not answer: {exc}") from exc
    found = json.loads(body) if body else []
    if not found:
        raise OhifCheckFailed(f"The node's QIDO-RS ({url}) does not list study {study_uid}.")
    item = found[0]
    return StudyRow(
        study_uid=study_uid,
        patient_id=_first(item, "00100020"),
        accession_number=_first(item, "00080050"),
        study_description=_first(item, "00081030"),
        modalities=tuple(str(value) for value in item.get("00080061", {}).get("Value", [])),
    )


def _screenshot(page: Page, path: Path, written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        page.screenshot(path=str(path))
    except PlaywrightError:  # the failure being reported matters more than its picture
        return
    written.append(path)


def check_study(
    ohif_url: str,
    dicomweb_url: str,
    study_uid: str,
    *,
    screenshots: Path,
    prefix: str = "ohif",
    modalities: Iterable[str] = ("SEG", "SR"),
    segments: Iterable[str] | None = None,
    open_seg: bool = True,
    mode: str = "Basic Viewer",
    timeout: float = 60.0,
    chromium: Path = CHROMIUM,
) -> OhifReport:
    """Check that OHIF at ``ohif_url`` lists ``study_uid`` and shows its ``modalities`` in the viewer.

    Parameters
    ----------
    ohif_url
        Where OHIF is served (``http://127.0.0.1:3000``), configured with the node as its data source.
    dicomweb_url
        The node's DICOMweb root that OHIF uses; error answers from it fail the check.
    study_uid
        The study that must be listed and opened.
    screenshots, prefix
        Folder and file-name prefix of the screenshots: ``<prefix>-study-list.png``, ``<prefix>-viewer.png`` and
        ``<prefix>-seg.png``, each written even when its step fails.
    modalities
        Modalities that the study list and the viewer's series panel must show for the study.
    segments
        Segment names the segmentation panel must list once the SEG is opened; ``None``: at least one.
    open_seg
        Open the (first) SEG over its images, as a double click on its thumbnail does.
    mode
        The OHIF mode launched from the study list.
    timeout
        Seconds allowed for each step.

    Returns
    -------
    OhifReport

    Raises
    ------
    FileNotFoundError
        If ``chromium`` is missing.
    OhifCheckFailed
        If a step does not show what it should, or the node answered a request with an error.
    """
    if not Path(chromium).is_file():
        raise FileNotFoundError(f"No Chromium at {chromium}; install Debian's chromium package.")
    wanted = sorted(set(modalities))
    row_info = study_row(dicomweb_url, study_uid, timeout=timeout)
    base = ohif_url.rstrip("/")
    node = urlsplit(dicomweb_url)
    log = BrowserLog(watched=f"{node.scheme}://{node.netloc}")
    written: list[Path] = []
    started = time.monotonic()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport=_VIEWPORT)
            context.add_init_script(_RETURNING_USER)
            page = context.new_page()
            page.set_default_timeout(timeout * 1000)
            log.attach(page)
            step = _Steps(page, log, screenshots, prefix, written, timeout)
            step.study_list(base, row_info, wanted, mode)
            series = step.viewer(study_uid, wanted)
            names = step.segmentation(segments) if open_seg and "SEG" in series else []
        finally:
            browser.close()
    if log.node_errors:
        raise OhifCheckFailed(
            "OHIF showed the study, but the node answered some of its requests with an error:\n  "
            + "\n  ".join(log.node_errors)
            + f"\n{log.text()}"
        )
    return OhifReport(series, names, written, log, time.monotonic() - started)


class _Steps:
    """The steps of :func:`check_study` on one page; each screenshots its result and fails with the log."""

    def __init__(
        self, page: Page, log: BrowserLog, folder: Path, prefix: str, written: list[Path], timeout: float
    ) -> None:
        self.page, self.log, self.folder, self.prefix = page, log, folder, prefix
        self.written, self.timeout = written, timeout

    def _fail(self, name: str, message: str, exc: BaseException | None = None) -> OhifCheckFailed:
        _screenshot(self.page, self.folder / f"{self.prefix}-{name}.png", self.written)
        detail = f" ({type(exc).__name__}: {str(exc).splitlines()[0]})" if exc is not None else ""
        return OhifCheckFailed(f"{message}{detail}\nlast URL: {self.page.url}\n{self.log.text()}")

    def _wait_visible(self, locator: Locator, name: str, message: str) -> None:
        try:
            locator.first.wait_for(state="visible")
        except PlaywrightError as exc:
            raise self._fail(name, message, exc) from exc

    def study_list(self, base: str, row: StudyRow, wanted: list[str], mode: str) -> None:
        """Find the study's row, check its modalities, select it and launch ``mode`` on it."""
        page = self.page
        page.goto(f"{base}/", wait_until="load")
        rows = page.locator("tr")
        for text in (row.patient_id, row.accession_number, row.study_description):
            if text:
                rows = rows.filter(has_text=text)
        described = f"patient ID {row.patient_id!r}, accession {row.accession_number!r}"
        self._wait_visible(rows, "study-list", f"OHIF's study list does not show the study ({described}).")
        cells = [text.strip() for text in rows.first.locator("td").all_inner_texts()]
        listed = {m for cell in cells if _MODALITY_LIST.match(cell) for m in re.split(r"[\\/]", cell)}
        if not set(wanted) <= listed:
            raise self._fail("study-list", f"The study's row lists modalities {sorted(listed)}, not all of {wanted}.")
        rows.first.click()
        for modality in wanted:  # the selected study's series, listed beside the table
            self._wait_visible(
                page.get_by_text(modality, exact=True),
                "study-list",
                f"The selected study's series list shows no {modality} series.",
            )
        _screenshot(page, self.folder / f"{self.prefix}-study-list.png", self.written)
        launch = page.get_by_role("button", name=mode, exact=True)
        self._wait_visible(launch, "study-list", f"No {mode!r} button to launch the viewer on the study.")
        launch.first.click()

    def viewer(self, study_uid: str, wanted: list[str]) -> list[str]:
        """Check the viewer opened ``study_uid`` and its series panel lists ``wanted``; returns all modalities."""
        page = self.page
        try:
            page.wait_for_url(lambda url: parse_qs(urlsplit(url).query).get("StudyInstanceUIDs") == [study_uid])
        except PlaywrightError as exc:
            raise self._fail(
                "viewer", f"Launching the viewer from the study's row did not open {study_uid}.", exc
            ) from exc
        labels = page.locator('[data-cy="series-modality-label"]')
        found: list[str] = []
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            found = [text.strip() for text in labels.all_inner_texts()]
            if set(wanted) <= set(found):
                break
            page.wait_for_timeout(250)
        else:
            raise self._fail("viewer", f"The viewer's series panel lists modalities {found}, not all of {wanted}.")
        self._settle()
        _screenshot(page, self.folder / f"{self.prefix}-viewer.png", self.written)
        return [text.strip() for text in labels.all_inner_texts()]  # all series, now that loading settled

    def segmentation(self, expected: Iterable[str] | None) -> list[str]:
        """Open the first SEG (double click, then "Yes") and read the segmentation panel's segment names."""
        page = self.page
        page.locator('[data-cy="series-modality-label"]', has_text=re.compile(r"^SEG$")).first.dblclick()
        confirm = page.get_by_role("button", name="Yes", exact=True)
        self._wait_visible(confirm, "seg", "Opening the SEG did not offer to load it over its images.")
        confirm.first.click()
        panel_rows = page.locator('[data-cy="data-row-title"]')
        if not panel_rows.first.is_visible():
            page.locator('[data-cy="panelSegmentation-btn"]').first.click()
        self._wait_visible(panel_rows, "seg", "The segmentation panel lists no segment after opening the SEG.")
        names = [text.strip() for text in panel_rows.all_inner_texts()]
        self._settle()
        _screenshot(page, self.folder / f"{self.prefix}-seg.png", self.written)
        if expected is not None and sorted(names) != sorted(expected):
            raise self._fail("seg", f"The segmentation panel lists segments {names}, expected {sorted(expected)}.")
        return names

    def _settle(self, quiet: float = 0.5, limit: float = 15.0) -> None:
        """Let the viewport draw before a screenshot: wait until no request was in flight for ``quiet`` seconds.

        Best effort: a viewer still prefetching after ``limit`` seconds is fine, the screenshot then shows what
        was drawn so far.
        """
        deadline = time.monotonic() + limit
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if self.log.in_flight > 0:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet:
                break
            self.page.wait_for_timeout(100)
        self.page.wait_for_timeout(300)  # a frame or two for the last image to be drawn
