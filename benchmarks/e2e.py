"""End-to-end benchmark: from the last C-STORE response to the SEG and SR accepted by the PACS, by stage.

Run from the repository root (dcmtk, Orthanc and pydicom-data installed)::

    .venv/bin/python benchmarks/e2e.py --repeat 10                   # the three cases, then throughput
    .venv/bin/python benchmarks/e2e.py --cases ct,cxr --repeat 5
    .venv/bin/python benchmarks/e2e.py --layout production --pg-dsn postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python benchmarks/e2e.py --quick                       # one small CT, one repetition: a smoke test

What it does: starts the node as ``infergate up`` would (``scp`` with the watcher, ``api``, ``worker``; separate
processes so that the worker can be restarted with another concurrency) with a private Orthanc as the PACS
(``INFERGATE_PACS``) and a short quiet period (``--quiet``, default 1 s; the watcher looks every
``--watcher-interval`` s). For each case and repetition it writes a study with fresh UIDs, sends it with dcmtk
``storescu`` (whose log timestamps every C-STORE response), polls the REST API until the jobs are settled and
Orthanc holds every SEG/SR, then splits the time from the last C-STORE response to the last result accepted by
Orthanc (the export's ``delivered_at``, recorded when Orthanc answered Success) into:

* ``completion``: to the first job's creation (the quiet period, the watcher's polling, routing);
* ``queue_wait``: from that job being queued to a worker claiming it (the job's ``timings``);
* ``load`` ... ``record``, ``export``: the worker's own stage timings, added up over the case's jobs;
* ``other``: the rest: hand-offs between the case's tasks (the next job, the export tasks, a follow-up job
  routed on the first one's findings), commits, broker latency.

Node overhead = total - quiet period - ONNX compute. Cases: a 200 x 512^2 CT (ct-tissue-seg and
ct-bone-classifier), the MNI152 T1 brain as MR (mr-series-type, then brain-extraction on its finding) and
pydicom-data's chest CR ``RG1_UNCI`` (cxr-demo-classifier). The first run of each case warms the worker up
(ONNX sessions load on first use) and is not counted. Throughput: 10 CT studies (64 x 256^2 by default) sent
at once, with 1, 2 and 4 worker processes (``INFERGATE_WORKER_CONCURRENCY``, one ONNX thread each); studies/min
over the makespan from the first job created to the last result delivered, and the ratio to 1 worker.

Each figure is the median (p50) and p95 over repetitions, with the range. PASS/FAIL per target is printed and a
JSON record (machine, versions, settings, figures, every run) is appended to ``<results>/e2e.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._e2e_node import (  # noqa: E402
    Node,
    cpu_seconds,
    epoch,
    send,
    storescu_log_config,
    wait_for_case,
)
from infergate.dicom.uids import derived_uid  # noqa: E402
from infergate.progress import Progress, bars, no_progress, wanted  # noqa: E402
from tests.helpers.peers import Orthanc  # noqa: E402
from workers.stages import STAGES  # noqa: E402

#: Worker stages in pipeline order (queue_wait is reported per case, from the first job).
WORK_STAGES = tuple(stage for stage in STAGES if stage != "queue_wait")
ROWS = ("completion", "queue_wait", *WORK_STAGES, "other", "total", "overhead")
NOTES = [
    "total: last C-STORE response (storescu's log timestamp) to the last SEG/SR export's delivered_at (the node "
    "records it when Orthanc answers Success); 'seen by poll' is when the benchmark's 0.1 s poll found them all.",
    "completion includes the quiet period; queue_wait is the first job's; worker stages are summed over the "
    "case's jobs (one worker process, so they do not overlap); other = total minus everything listed.",
    "node overhead = total - quiet period - onnx.",
    "throughput: makespan from the first job created to the last result delivered; ratio to 1 worker in the same "
    "run; judged for 2 <= workers <= CPU cores.",
]
LAYOUTS = {
    "embedded": "SQLite and a filesystem broker, as infergate up",
    "production": "PostgreSQL and Redis",
}
#: Node overhead targets of the issue, seconds.
TARGETS = {"ct": 1.0, "cxr": 0.3}
SCALING_TARGET = 0.8


@dataclass(frozen=True)
class Case:
    name: str
    label: str
    models: tuple[str, ...]
    write: Callable[[Path, str], str]  # (folder, tag) -> Study Instance UID of a new study

    @property
    def jobs(self) -> int:
        return len(self.models)


def ct_case(slices: int, size: int) -> Case:
    def write(folder: Path, tag: str) -> str:
        from tests.data.make_series import write_ct_series

        study = derived_uid("e2e", tag, "study")
        return write_ct_series(folder, slices=slices, size=size, study_uid=study, patient_id="E2E-CT").study_uid

    return Case("ct", f"CT {slices} x {size}^2", ("ct-tissue-seg", "ct-bone-classifier"), write)


def mr_case() -> Case:
    def write(folder: Path, tag: str) -> str:
        from tests.data.make_mni_series import write_mni_series

        return write_mni_series(folder, study_uid=derived_uid("e2e", tag, "study")).info.study_uid

    return Case("mr", "MR T1 brain (MNI152, 189 x 233 x 197)", ("mr-series-type", "brain-extraction"), write)


def cxr_case() -> Case:
    def write(folder: Path, tag: str) -> str:
        import pydicom
        from pydicom.data import get_testdata_file
        from pydicom.uid import UID

        path = get_testdata_file("RG1_UNCI.dcm", download=False)
        if path is None:
            raise RuntimeError("RG1_UNCI.dcm not found: install pydicom-data (in the test dependency group).")
        ds = pydicom.dcmread(str(path))
        ds.StudyInstanceUID = UID(derived_uid("e2e", tag, "study"))
        ds.SeriesInstanceUID = UID(derived_uid("e2e", tag, "series"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(derived_uid("e2e", tag, "instance"))
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / "CR000001.dcm", enforce_file_format=True)
        return str(ds.StudyInstanceUID)

    return Case("cxr", "chest CR (RG1, 1955 x 1841)", ("cxr-demo-classifier",), write)


# Measuring --------------------------------------------------------------------------------------------------


def breakdown(jobs: Sequence[dict[str, Any]], last_response: float, seen: float, quiet: float) -> dict[str, Any]:
    """Seconds per row of :data:`ROWS` for one run of a case (its jobs' JSON as the API lists them)."""
    exports = [e for job in jobs for obj in job["result_objects"] for e in obj["exports"]]
    if not exports or any(e["delivered_at"] is None for e in exports):
        raise RuntimeError("a result was not delivered to the PACS")
    end = max(epoch(e["delivered_at"]) for e in exports)
    first = min(jobs, key=lambda job: epoch(job["started_at"]))
    row: dict[str, float] = {
        "completion": min(epoch(job["created_at"]) for job in jobs) - last_response,
        "queue_wait": float(first["timings"].get("queue_wait", 0.0)),
    }
    for stage in WORK_STAGES:
        row[stage] = sum(float(job["timings"].get(stage, 0.0)) for job in jobs)
    row["total"] = end - last_response
    row["other"] = row["total"] - sum(row[name] for name in ("completion", "queue_wait", *WORK_STAGES))
    row["overhead"] = row["total"] - quiet - row["onnx"]
    return {
        "seconds": {name: round(value, 4) for name, value in row.items()},
        "seen_in_pacs": round(seen - last_response, 4),
        "jobs": [
            {
                "model_id": job["model_id"],
                "timings": job["timings"],
                "created": round(epoch(job["created_at"]) - last_response, 4),
                "started": round(epoch(job["started_at"]) - last_response, 4),
                "finished": round(epoch(job["finished_at"]) - last_response, 4),
            }
            for job in jobs
        ],
    }


def run_case(
    case: Case,
    node: Node,
    pacs: Orthanc,
    work: Path,
    repeat: int,
    log_config: Path,
    progress: Progress = no_progress,
) -> list[dict[str, Any]]:
    runs = []
    # run 0 warms the worker up (ONNX sessions) and is not counted
    for index in progress(range(repeat + 1), total=repeat + 1, desc=case.name):
        folder = work / f"{case.name}-{index}"
        study = case.write(folder, f"{work.name}-{case.name}-{index}")
        sent = send([folder], node.scp_port, log_config)[0]
        jobs, seen = wait_for_case(node.api, pacs, [study], case.jobs, timeout=600)
        shutil.rmtree(folder, ignore_errors=True)
        if sorted(job["model_id"] for job in jobs) != sorted(case.models):
            raise RuntimeError(f"{case.name}: expected jobs {case.models}, got {[j['model_id'] for j in jobs]}")
        run = breakdown(jobs, sent.last_response, seen, node.quiet_seconds)
        run["instances"] = sent.instances
        label = "warm-up" if index == 0 else f"run {index}/{repeat}"
        seconds = run["seconds"]
        sys.stderr.write(
            f"  {case.name} {label}: total {seconds['total']:.2f} s, onnx {seconds['onnx']:.2f} s, "
            f"overhead {seconds['overhead']:.2f} s\n"
        )
        if index:
            runs.append(run)
    return runs


def run_throughput(
    node: Node,
    pacs: Orthanc,
    work: Path,
    workers: Sequence[int],
    studies: int,
    slices: int,
    size: int,
    log_config: Path,
) -> list[dict[str, Any]]:
    """10 studies at once per worker count; makespan from the first job created to the last result delivered."""
    case = ct_case(slices, size)
    out: list[dict[str, Any]] = []
    for count in workers:
        node.start_worker(count, onnx_threads=1)
        warm = [work / f"warm-{count}-{i}" for i in range(count)]  # one study per process: ONNX sessions loaded
        warm_uids = [case.write(folder, f"{work.name}-warm-{count}-{i}") for i, folder in enumerate(warm)]
        send(warm, node.scp_port, log_config)
        wait_for_case(node.api, pacs, warm_uids, case.jobs * count, timeout=600)
        folders = [work / f"tp-{count}-{i}" for i in range(studies)]
        uids = [case.write(folder, f"{work.name}-tp-{count}-{i}") for i, folder in enumerate(folders)]
        cpu_before, pacs_before, clock_before = node.cpu(), _pacs_cpu(pacs), time.monotonic()
        sent = send(folders, node.scp_port, log_config)
        jobs, _ = wait_for_case(node.api, pacs, uids, case.jobs * studies, timeout=1800, interval=0.5)
        cpu_after, pacs_after, window = node.cpu(), _pacs_cpu(pacs), time.monotonic() - clock_before
        cpu = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in cpu_after}
        cpu["orthanc"] = round(pacs_after - pacs_before, 2)
        for folder in [*warm, *folders]:
            shutil.rmtree(folder, ignore_errors=True)
        first_job = min(epoch(job["created_at"]) for job in jobs)
        end = max(epoch(e["delivered_at"]) for job in jobs for obj in job["result_objects"] for e in obj["exports"])
        makespan = end - first_job
        out.append(
            {
                "workers": count,
                "studies": studies,
                "jobs": len(jobs),
                "makespan_s": round(makespan, 3),
                "from_last_response_s": round(end - max(item.last_response for item in sent), 3),
                "send_s": round(max(item.last_response for item in sent) - min(item.first for item in sent), 3),
                "studies_per_min": round(60.0 * studies / makespan, 2),
                "onnx_s": round(sum(float(job["timings"].get("onnx", 0.0)) for job in jobs), 3),
                "cpu_s": cpu,
                "cpu_window_s": round(window, 2),
                "cpu_busy": round(sum(cpu.values()) / (window * (os.cpu_count() or 1)), 3),
                "timeline": _timeline(jobs, first_job),
            }
        )
        sys.stderr.write(f"  throughput, {count} worker(s): {out[-1]['studies_per_min']} studies/min\n")
    base = out[0]["studies_per_min"] if out and out[0]["workers"] == 1 else None
    cores = os.cpu_count() or 1
    for item in out:
        item["ratio"] = round(item["studies_per_min"] / base, 3) if base else None
        item["judged"] = 1 < item["workers"] <= cores and base is not None
        item["pass"] = (item["ratio"] >= SCALING_TARGET * item["workers"]) if item["judged"] else None
    return out


def _timeline(jobs: Sequence[dict[str, Any]], origin: float) -> list[dict[str, Any]]:
    """Per job, seconds from ``origin``: created, started, computed (started + worker stages), done."""
    out = []
    for job in sorted(jobs, key=lambda item: epoch(item["started_at"])):
        timings = job["timings"]
        work = sum(float(timings.get(stage, 0.0)) for stage in WORK_STAGES if stage != "export")
        started = epoch(job["started_at"]) - origin
        out.append(
            {
                "model_id": job["model_id"],
                "created": round(epoch(job["created_at"]) - origin, 3),
                "started": round(started, 3),
                "computed": round(started + work, 3),
                "done": round(epoch(job["finished_at"]) - origin, 3),
                "export_s": round(float(timings.get("export", 0.0)), 3),
            }
        )
    return out


def _pacs_cpu(pacs: Orthanc) -> float:
    process = getattr(pacs, "_process", None)
    return cpu_seconds(process.pid) if process is not None else 0.0


# Reporting --------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); the value itself for one sample."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for row in (*ROWS, "seen_in_pacs"):
        values = [run["seen_in_pacs"] if row == "seen_in_pacs" else run["seconds"][row] for run in runs]
        out[row] = {
            "p50": round(statistics.median(values), 4),
            "p95": round(percentile(values, 0.95), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }
    return out


def check_targets(cases: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, limit in TARGETS.items():
        if name not in cases:
            continue
        overhead = cases[name]["summary"]["overhead"]
        out.append(
            {
                "target": f"{cases[name]['label']}: node overhead p50 < {limit} s",
                "value_p50": overhead["p50"],
                "value_p95": overhead["p95"],
                "pass": overhead["p50"] < limit,
            }
        )
    return out


def render(record: dict[str, Any]) -> str:
    settings = record["settings"]
    lines = [
        f"infergate end-to-end benchmark, {record['date']}",
        f"machine: {record['machine']['cpus']} CPUs ({record['machine']['cpu_model']}), "
        f"{record['machine']['memory_gib']} GiB; {record['machine']['platform']}",
        f"layout: {settings['layout']} ({LAYOUTS[settings['layout']]}); quiet period {settings['quiet_seconds']} s, "
        f"watcher every {settings['watcher_interval_seconds']} s; {settings['repeat']} run(s) per case after a "
        f"warm-up; PACS: Orthanc {record['versions'].get('orthanc', '?')}",
        "",
    ]
    for case in record["cases"].values():
        summary = case["summary"]
        lines.append(f"{case['label']} -> {', '.join(case['models'])} ({case['runs_counted']} runs), seconds")
        lines.append(f"  {'stage':<14}{'p50':>9}{'p95':>9}{'min':>9}{'max':>9}")
        for row in (*ROWS, "seen_in_pacs"):
            values = summary[row]
            name = {"overhead": "node overhead", "seen_in_pacs": "seen by poll"}.get(row, row)
            lines.append(
                f"  {name:<14}{values['p50']:>9.3f}{values['p95']:>9.3f}{values['min']:>9.3f}{values['max']:>9.3f}"
            )
        lines.append("")
    if record.get("throughput_error"):
        lines += [f"Throughput: failed: {record['throughput_error']}", ""]
    if record["throughput"]:
        tp = record["config"]["throughput"]
        lines.append(
            f"Throughput: {tp['studies']} CT studies of {tp['slices']} x {tp['size']}^2 sent at once "
            f"(2 jobs each), 1 ONNX thread per worker process, quiet period {settings['throughput_quiet_seconds']} s, "
            f"{record['machine']['cpus']} cores"
        )
        lines.append(
            f"  {'workers':<9}{'makespan s':>11}{'studies/min':>13}{'ratio':>8}{'needed':>8}{'CPU busy':>10}  verdict"
        )
        for item in record["throughput"]:
            needed = SCALING_TARGET * item["workers"]
            verdict = ("PASS" if item["pass"] else "FAIL") if item["judged"] else "beyond the cores, not judged"
            if item["workers"] == 1:
                verdict = "baseline"
            ratio = f"{item['ratio']:.2f}" if item["ratio"] is not None else "-"
            lines.append(
                f"  {item['workers']:<9}{item['makespan_s']:>11.2f}{item['studies_per_min']:>13.2f}"
                f"{ratio:>8}{needed:>8.1f}{item['cpu_busy']:>10.0%}  {verdict}"
            )
        for item in record["throughput"]:
            parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in sorted(item["cpu_s"].items()))
            lines.append(f"  CPU s with {item['workers']} worker(s) over {item['cpu_window_s']:.1f} s: {parts}")
        lines.append("")
    lines.append("Targets")
    for target in record["targets"]:
        verdict = "PASS" if target["pass"] else "FAIL"
        lines.append(f"  {verdict}  {target['target']}: {target['value_p50']:.3f} s (p95 {target['value_p95']:.3f} s)")
    for item in record["throughput"]:
        if item["judged"]:
            verdict = "PASS" if item["pass"] else "FAIL"
            lines.append(
                f"  {verdict}  {item['workers']} workers >= {SCALING_TARGET * item['workers']:.1f}x the throughput "
                f"of 1: {item['ratio']:.2f}x"
            )
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line
    )
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory_kib / 1024**2, 1),
    }


def versions(pacs: Orthanc) -> dict[str, str]:
    import celery
    import highdicom
    import onnxruntime
    import pydicom
    import pynetdicom
    import sqlalchemy

    def run(command: Sequence[str]) -> str:
        try:
            result = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
        except OSError:
            return "unknown"
        return (result.stdout or result.stderr).strip()

    storescu = run(["storescu", "--version"]).splitlines()
    return {
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "highdicom": highdicom.__version__,
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "celery": celery.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "orthanc": str(pacs.get_json("/system").get("Version", "unknown")),
        "dcmtk": storescu[0] if storescu else "unknown",
        "infergate_commit": (run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown")
        + ("+changes" if run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]) else ""),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="Counted runs per case, after a warm-up (default 10).")
    parser.add_argument("--quick", action="store_true", help="One small CT, one run, a tiny throughput: a smoke test.")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="Folder of e2e.jsonl.")
    parser.add_argument("--cases", default="ct,mr,cxr,throughput", help="Comma-separated: ct, mr, cxr, throughput.")
    parser.add_argument("--quiet", type=float, default=1.0, help="INFERGATE_SERIES_QUIET_SECONDS (default 1).")
    parser.add_argument(
        "--watcher-interval", type=float, default=1.0, help="INFERGATE_WATCHER_INTERVAL_SECONDS (default 1, shipped)."
    )
    parser.add_argument(
        "--throughput-quiet", type=float, default=5.0, help="Quiet period of the throughput node (default 5, shipped)."
    )
    parser.add_argument("--ct", default="200x512", help="Slices x size of the latency CT (default 200x512).")
    parser.add_argument("--workers", default="1,2,4", help="Worker process counts for throughput (default 1,2,4).")
    parser.add_argument("--studies", type=int, default=10, help="Studies sent at once for throughput (default 10).")
    parser.add_argument("--throughput-ct", default="64x256", help="Slices x size of those studies (default 64x256).")
    parser.add_argument("--layout", choices=("embedded", "production"), default="embedded")
    parser.add_argument("--pg-dsn", help="PostgreSQL admin DSN for --layout production (a database is created).")
    parser.add_argument("--workdir", type=Path, help="Where studies and the node's data go (default: a temp folder).")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Progress bar over the repetitions on stderr (default: only when stderr is a terminal).",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.cases, args.ct = 1, "ct,throughput", "16x64"
        args.workers, args.studies, args.throughput_ct, args.throughput_quiet = "1,2", 2, "8x64", 1.0
    if args.repeat < 1 or args.studies < 1:
        parser.error("--repeat and --studies should be at least 1")
    args.case_names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = set(args.case_names) - {"ct", "mr", "cxr", "throughput"}
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    args.worker_counts = [int(item) for item in args.workers.split(",")]
    return args


def _dims(text: str) -> tuple[int, int]:
    slices, size = text.lower().split("x")
    return int(slices), int(size)


def _node(work: Path, pacs: Orthanc, args: argparse.Namespace, quiet: float) -> Node:
    return Node(
        work,
        pacs,
        layout=args.layout,
        quiet_seconds=quiet,
        watcher_interval=args.watcher_interval,
        pg_dsn=args.pg_dsn,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("storescu", "Orthanc") if shutil.which(tool) is None]
    if missing:
        sys.stderr.write(f"e2e benchmark: missing {', '.join(missing)} (dcmtk, orthanc)\n")
        return 2
    ct_slices, ct_size = _dims(args.ct)
    tp_slices, tp_size = _dims(args.throughput_ct)
    cases = {"ct": ct_case(ct_slices, ct_size), "mr": mr_case(), "cxr": cxr_case()}
    work = Path(tempfile.mkdtemp(prefix="infergate-e2e-", dir=args.workdir))
    load_before = os.getloadavg()
    began = time.monotonic()
    results: dict[str, Any] = {}
    throughput: list[dict[str, Any]] = []
    throughput_error = None
    try:
        with Orthanc(work / "orthanc", aet="ORTHANC", dicomweb=False) as pacs:
            log_config = storescu_log_config(work)
            latency = [name for name in args.case_names if name in cases]
            if latency:
                node = _node(work / "latency", pacs, args, args.quiet)
                try:
                    node.start(concurrency=1)
                    for name in latency:
                        case = cases[name]
                        sys.stderr.write(f"{case.label}: {args.repeat} run(s) after a warm-up\n")
                        runs = run_case(case, node, pacs, work, args.repeat, log_config, bars(wanted(args.progress)))
                        results[name] = {
                            "label": case.label,
                            "models": list(case.models),
                            "runs_counted": len(runs),
                            "summary": summarise(runs),
                            "runs": runs,
                        }
                except BaseException:
                    sys.stderr.write(node.logs()[-20000:] + "\n")
                    raise
                finally:
                    node.stop()
            if "throughput" in args.case_names:
                # A node of its own, with the throughput quiet period: ten senders at once on a small
                # machine leave gaps longer than a 1 s quiet period within a series, which would then
                # be routed before its last slices arrived (and refused for uneven slice spacing).
                node = _node(work / "throughput", pacs, args, args.throughput_quiet)
                try:
                    node.start(concurrency=1)
                    throughput = run_throughput(
                        node, pacs, work, args.worker_counts, args.studies, tp_slices, tp_size, log_config
                    )
                except (RuntimeError, TimeoutError) as exc:
                    throughput_error = f"{type(exc).__name__}: {exc}"[:2000]
                    sys.stderr.write(f"throughput failed: {throughput_error}\n{node.logs()[-8000:]}\n")
                finally:
                    node.stop()
            record: dict[str, Any] = {
                "benchmark": "e2e",
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": machine_info(),
                "versions": versions(pacs),
                "settings": {
                    "layout": args.layout,
                    "quiet_seconds": args.quiet,
                    "throughput_quiet_seconds": args.throughput_quiet,
                    "watcher_interval_seconds": args.watcher_interval,
                    "repeat": args.repeat,
                    "onnx_threads_latency": "default (0)",
                    "onnx_threads_throughput": 1,
                    "worker_concurrency_latency": 1,
                },
                "config": {
                    "quick": args.quick,
                    "cases": args.case_names,
                    "ct": {"slices": ct_slices, "size": ct_size},
                    "throughput": {"studies": args.studies, "slices": tp_slices, "size": tp_size},
                },
                "load_before": [round(value, 2) for value in load_before],
                "load_after": [round(value, 2) for value in os.getloadavg()],
                "duration_s": round(time.monotonic() - began, 1),
                "cases": results,
                "targets": check_targets(results),
                "throughput": throughput,
                "throughput_error": throughput_error,
                "notes": NOTES,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.write(render(record))
    args.results.mkdir(parents=True, exist_ok=True)
    with (args.results / "e2e.jsonl").open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.write(f"\nrecord appended to {args.results / 'e2e.jsonl'}\n")
    return 1 if throughput_error else 0


if __name__ == "__main__":
    raise SystemExit(main())
