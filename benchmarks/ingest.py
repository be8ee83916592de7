"""Ingest benchmark: the node's SCP and STOW-RS against dcmtk storescp and Orthanc, side by side in one run.

Run from the repository root (dcmtk and Orthanc 1.10 with its DICOMweb plugin installed)::

    .venv/bin/python benchmarks/ingest.py --repeat 5          # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/ingest.py --quick             # tiny series, one repetition: a smoke test

What it does: writes a 200 x 512^2 and a 400 x 64^2 synthetic CT series (two copies of each, with other UIDs, so
that no receiver ever sees a duplicate), then, for each repetition, starts every receiver fresh in its own folder
and sends each case to each receiver in turn, the order rotating from one repetition to the next so that drift
hits them all alike:

* DIMSE: dcmtk ``storescu`` (TCP_NODELAY) with 1 association, then 4 concurrent ``storescu`` each sending every
  4th file, into ``infergate scp --no-watcher`` as shipped (SQLite, fsync of file and folder, SQL commit before
  Success), ``storescp --fork`` (no fsync: dcmtk has no such option), ``storescp`` running ``sync FILE DIR``
  per file (fsync by a process per file, an upper bound on its cost) and Orthanc (fsync per file, its default).
* STOW-RS: ``multipart/related`` POSTs of 50 instances each (1 client, then 4) to ``infergate api`` and to
  Orthanc's DICOMweb plugin.
* Memory: 50, 200 and 800 instances of 512^2 into a fresh node SCP each; its peak RSS should stay flat.

Figures: instances/s and MB/s (Part 10 file bytes) over the wall time from the first A-ASSOCIATE-RQ (or HTTP
request) to the last response; per-request latency p50/p99 timed by the sender (storescu's own log timestamps
per C-STORE; per POST for STOW-RS); receiver CPU (user+system of its process tree, /proc) per instance and peak
RSS (sampled every 50 ms). Each figure is the median with [min-max] over repetitions; ratios are taken within
each repetition, then summarised the same way. A JSON record is appended to ``<results>/ingest.jsonl``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._peers import (  # noqa: E402 - after the repository root is importable
    Monitor,
    NodeReceiver,
    NullScpReceiver,
    OrthancReceiver,
    Receiver,
    StoreScpReceiver,
    multipart_bodies,
    send_storescu,
    send_stow,
    storescu_log_config,
    tool_versions,
    tree_rss_kib,
)
from infergate.progress import bars, wanted  # noqa: E402
from tests.data.make_series import write_ct_series  # noqa: E402

#: Targets of issue 6 (DIMSE, one association, 512^2 series): same-run ratios of instances/s.
TARGETS = (("node/orthanc", "orthanc", 1.5), ("node/storescp", "storescp", 0.5))
REFERENCES = ("orthanc", "storescp", "storescp-sync", "pynetdicom-null")
METRICS = (
    ("inst_per_s", "inst/s"),
    ("mb_per_s", "MB/s"),
    ("lat_p50_ms", "p50 ms"),
    ("lat_p99_ms", "p99 ms"),
    ("cpu_ms_per_inst", "CPU ms/inst"),
    ("peak_rss_mb", "peak RSS MB"),
)
NOTES = [
    "pynetdicom-null is pynetdicom (the node's DICOM library) with the node's network settings answering "
    "Success at once and storing nothing: the ceiling of any SCP built on it on this machine.",
    "DIMSE sender: dcmtk storescu with TCP_NODELAY; latency = its own log timestamps from 'Sending Store Request' "
    "to 'Received Store Response' for each C-STORE; wall = first 'Requesting Association' to last response.",
    "storescp does NOT fsync (dcmtk has no option): it is the no-durability ceiling. storescp-sync runs "
    "'sync FILE DIR' (coreutils, fsync) per file before answering; a process spawn per file makes it pessimistic.",
    "Orthanc 1.10 runs with its defaults (SyncStorageArea=true: fsync per file; SQLite index; max PDU 16 KiB).",
    "The node runs as shipped: infergate scp --no-watcher (or infergate api), SQLite in a fresh data folder, "
    "fsync of each file and its folder, then the SQL commit, before Success.",
    "STOW-RS: http.client, one keep-alive connection per client, 50 instances per POST; latency is per POST.",
    "CPU: user+system seconds of the receiver's process tree (/proc stat, reaped children included), per instance.",
]


@dataclass(frozen=True)
class Series:
    label: str
    copies: tuple[list[Path], list[Path]]  # one for the 1-way case, one for the 4-way case (other UIDs)

    @property
    def megabytes(self) -> float:
        return sum(path.stat().st_size for path in self.copies[0]) / 1e6


def make_series(work: Path, quick: bool) -> tuple[list[Series], list[Path]]:
    """The benchmark series (two copies each) and the memory series, written once into ``work``."""
    shapes = [(64, 8), (32, 8)] if quick else [(512, 200), (64, 400)]
    found = []
    for index, (size, slices) in enumerate(shapes):
        copies = tuple(
            write_ct_series(work / f"ct{size}-{copy}", slices=slices, size=size, seed=10 * index + copy).paths
            for copy in (1, 2)
        )
        found.append(Series(f"{slices}x{size}^2", (list(copies[0]), list(copies[1]))))
    memory_size, memory_slices = (32, 16) if quick else (512, 800)
    memory = write_ct_series(work / "memory", slices=memory_slices, size=memory_size, seed=99).paths
    return found, list(memory)


def build_receivers(kind: str, args: argparse.Namespace) -> list[Receiver]:
    wanted = set(args.receivers.split(","))
    found: list[Receiver] = []
    if "node" in wanted:
        found.append(NodeReceiver("node", kind))
        if kind == "dimse":
            found += [
                NodeReceiver(f"node-pdu{pdu}", kind, env={"INFERGATE_MAX_PDU": str(pdu)}) for pdu in args.node_pdu
            ]
        if args.pg_url:
            found.append(NodeReceiver("node-pg", kind, pg_url=args.pg_url, note="PostgreSQL"))
    if kind == "dimse":
        if "storescp" in wanted:
            found.append(StoreScpReceiver("storescp", kind, note="no fsync"))
        if "storescp-sync" in wanted:
            found.append(StoreScpReceiver("storescp-sync", kind, fsync=True, note="sync(1) per file"))
        if "pynetdicom-null" in wanted:
            found.append(NullScpReceiver("pynetdicom-null", kind, note="answers at once, stores nothing"))
    if "orthanc" in wanted:
        found.append(OrthancReceiver("orthanc", kind))
    return found


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(q) - 1]


def _measure(receiver: Receiver, send: Any, megabytes: float, settle: float) -> dict[str, float]:
    with Monitor(receiver.pid) as monitor:
        result = send()
        time.sleep(settle)  # deferred work (a commit, a reaped child) is the receiver's cost too
    return {
        "instances": result.instances,
        "wall_s": result.wall_seconds,
        "inst_per_s": result.instances / result.wall_seconds,
        "mb_per_s": megabytes / result.wall_seconds,
        "lat_p50_ms": 1e3 * _percentile(result.latencies, 50),
        "lat_p99_ms": 1e3 * _percentile(result.latencies, 99),
        "cpu_s": monitor.cpu_seconds,
        "cpu_ms_per_inst": 1e3 * monitor.cpu_seconds / result.instances,
        "peak_rss_mb": monitor.peak_kib / 1024,
    }


def run_phase(kind: str, series: list[Series], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Every (series, ways, receiver) once per repetition, receivers started fresh for each repetition."""
    runs: list[dict[str, Any]] = []
    log_config = storescu_log_config(work)
    for rep in bars(wanted(args.progress))(range(args.repeat), desc=f"{kind} repetitions"):
        receivers = build_receivers(kind, args)
        try:
            for receiver in receivers:
                receiver.start(work / "rx" / f"{kind}-{rep}-{receiver.name}")
            shift = rep % len(receivers)
            order = receivers[shift:] + receivers[:shift]
            for item in series:
                for copy, ways in enumerate((1, 4)):
                    files = item.copies[copy]
                    stow = multipart_bodies(files, args.batch) if kind == "stow" else None
                    for receiver in order:
                        if stow is None:
                            send = functools.partial(send_storescu, receiver, files, ways, log_config)
                        else:
                            send = functools.partial(send_stow, receiver, *stow, ways, len(files))
                        figures = _measure(receiver, send, item.megabytes, args.settle)
                        case = {"phase": kind, "series": item.label, "ways": ways, "receiver": receiver.name}
                        runs.append(case | {"rep": rep} | figures)
                        _progress(runs[-1])
        finally:
            for receiver in receivers:
                receiver.stop()
            shutil.rmtree(work / "rx", ignore_errors=True)
    return runs


def _progress(run: dict[str, Any]) -> None:
    sys.stderr.write(
        f"  {run['phase']:5} {run['series']:>10} x{run['ways']} rep {run['rep']} {run['receiver']:<14} "
        f"{run['inst_per_s']:8.1f} inst/s  p50 {run['lat_p50_ms']:7.2f} ms  CPU {run['cpu_ms_per_inst']:6.2f} ms/inst\n"
    )


def memory_phase(files: list[Path], args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Peak RSS of a fresh node SCP receiving the first 1/16, 1/4 and all of ``files`` in one association."""
    log_config = storescu_log_config(work)
    found = []
    for count in (len(files) // 16, len(files) // 4, len(files)):
        receiver = NodeReceiver("node", "dimse").start(work / "rx" / f"memory-{count}")
        try:
            time.sleep(args.settle)
            idle_kib = tree_rss_kib(receiver.pid)
            with Monitor(receiver.pid) as monitor:
                result = send_storescu(receiver, files[:count], 1, log_config)
            megabytes = sum(path.stat().st_size for path in files[:count]) / 1e6
            found.append(
                {
                    "instances": count,
                    "megabytes_sent": megabytes,
                    "idle_rss_mb": idle_kib / 1024,
                    "peak_rss_mb": monitor.peak_kib / 1024,
                    "inst_per_s": count / result.wall_seconds,
                }
            )
        finally:
            receiver.stop()
            shutil.rmtree(work / "rx", ignore_errors=True)
    return found


# Summaries -------------------------------------------------------------------------------------------------


def _span(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["phase"], run["series"], run["ways"], run["receiver"])].append(run)
    return [
        {"phase": key[0], "series": key[1], "ways": key[2], "receiver": key[3], "reps": len(group)}
        | {name: _span([run[name] for run in group]) for name, _ in METRICS}
        for key, group in groups.items()
    ]


def same_run_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """node*/reference of instances/s within each repetition, summarised over repetitions."""
    by_rep: dict[tuple[str, str, int, int], dict[str, float]] = defaultdict(dict)
    for run in runs:
        by_rep[(run["phase"], run["series"], run["ways"], run["rep"])][run["receiver"]] = run["inst_per_s"]
    ratios: dict[tuple[str, str, int, str, str], list[float]] = defaultdict(list)
    for (phase, series, ways, _), speeds in by_rep.items():
        for node in (name for name in speeds if name.startswith("node")):
            for ref in (name for name in speeds if name in REFERENCES):
                ratios[(phase, series, ways, node, ref)].append(speeds[node] / speeds[ref])
    return [
        {"phase": key[0], "series": key[1], "ways": key[2], "ratio": f"{key[3]}/{key[4]}"} | _span(values)
        for key, values in ratios.items()
    ]


def check_targets(ratios: list[dict[str, Any]], series_label: str) -> list[dict[str, Any]]:
    found = []
    for name, _, threshold in TARGETS:
        match = [
            item
            for item in ratios
            if item["phase"] == "dimse" and item["series"] == series_label and item["ways"] == 1
            if item["ratio"] == name
        ]
        value = match[0]["median"] if match else None
        found.append(
            {"target": f"DIMSE {series_label}, 1 association: {name} >= {threshold}"}
            | {"median": value, "threshold": threshold, "pass": value is not None and value >= threshold}
        )
    return found


def _fmt(span: dict[str, float]) -> str:
    def one(value: float) -> str:
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"

    return f"{one(span['median'])} [{one(span['min'])}-{one(span['max'])}]"


def render(record: dict[str, Any]) -> str:
    lines = [
        f"infergate ingest benchmark, {record['date']}; {record['machine']['cpus']} CPUs, "
        f"{record['machine']['cpu_model']}; data on {record['machine']['filesystem']}; "
        f"load average {record['load_before']} -> {record['load_after']}",
        "Each cell: median [min-max] over repetitions (repetitions interleaved, order rotating).",
    ]
    batch = record["config"]["batch"]
    for phase, title in (("dimse", "DIMSE C-STORE (storescu -> receiver)"), ("stow", f"STOW-RS ({batch}/POST)")):
        rows = [row for row in record["summary"] if row["phase"] == phase]
        if not rows:
            continue
        lines += ["", f"== {title}, {rows[0]['reps']} repetition(s) =="]
        header = f"{'series':<10} {'ways':>4}  {'receiver':<14}" + "".join(f"{label:>19}" for _, label in METRICS)
        lines += [header, "-" * len(header)]
        for row in rows:
            cells = "".join(f"{_fmt(row[name]):>19}" for name, _ in METRICS)
            lines.append(f"{row['series']:<10} {row['ways']:>4}  {row['receiver']:<14}{cells}")
        ratio_rows = [item for item in record["ratios"] if item["phase"] == phase]
        if ratio_rows:
            lines += ["", "Same-run ratios of inst/s (median [min-max]):"]
            lines += [
                f"  {item['series']:<10} x{item['ways']}  {item['ratio']:<28} {_fmt(item)}" for item in ratio_rows
            ]
    if record["memory"]:
        lines += ["", "== Memory: node SCP, one association, fresh process per size =="]
        for item in record["memory"]:
            lines.append(
                f"  {item['instances']:>5} instances ({item['megabytes_sent']:7.1f} MB): idle RSS "
                f"{item['idle_rss_mb']:6.1f} MB, peak RSS {item['peak_rss_mb']:6.1f} MB"
            )
        lines.append(f"  flat (peak grows by < 10% of the extra data sent): {record['memory_flat']}")
    if record["targets"]:
        lines += ["", "== Targets (issue 6) =="]
        for target in record["targets"]:
            verdict = "PASS" if target["pass"] else "FAIL"
            value = "n/a" if target["median"] is None else f"{target['median']:.2f}"
            suffix = " (quick run: not meaningful)" if record["config"]["quick"] else ""
            lines.append(f"  {verdict}  {target['target']}: {value}{suffix}")
    lines += ["", "Notes:"] + [f"  - {note}" for note in NOTES]
    return "\n".join(lines) + "\n"


def _memory_flat(memory: list[dict[str, Any]]) -> bool | None:
    if len(memory) < 2:
        return None
    first, last = memory[0], memory[-1]
    return bool(last["peak_rss_mb"] - first["peak_rss_mb"] < 0.1 * (last["megabytes_sent"] - first["megabytes_sent"]))


def machine_info(work: Path) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor())
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    resolved = str(work.resolve())
    best = max((m for m in mounts if resolved.startswith(m[1])), key=lambda m: len(m[1]), default=["?", "?", "?"])
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory_kib / 1024**2, 1),
        "filesystem": f"{best[2]} ({best[0]})",
    }


def versions() -> dict[str, str]:
    import fastapi
    import pydicom
    import pynetdicom
    import sqlalchemy
    import uvicorn

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "infergate_commit": commit.stdout.strip() or "unknown",
    } | tool_versions()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="Repetitions of every case (default 3).")
    parser.add_argument("--quick", action="store_true", help="Tiny series and one repetition: a smoke test.")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="Folder of ingest.jsonl.")
    parser.add_argument("--phases", default="dimse,stow,memory", help="Comma-separated: dimse, stow, memory.")
    parser.add_argument(
        "--receivers",
        default="node,storescp,storescp-sync,orthanc,pynetdicom-null",
        help="Comma-separated subset of the receivers.",
    )
    parser.add_argument("--pg-url", help="Also run the node on PostgreSQL (a database per run is created here).")
    parser.add_argument(
        "--node-pdu", type=int, action="append", default=[], help="Also run the node with INFERGATE_MAX_PDU=N."
    )
    parser.add_argument("--batch", type=int, default=50, help="Instances per STOW-RS request (default 50).")
    parser.add_argument("--settle", type=float, default=0.5, help="Seconds measured after the last response.")
    parser.add_argument("--workdir", type=Path, help="Where series and receivers' data go (default: a temp folder).")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Progress bar over the repetitions on stderr (default: only when stderr is a terminal).",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.batch, args.settle = 1, 4, 0.1
    if args.repeat < 1 or args.batch < 1:
        parser.error("--repeat and --batch should be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("storescu", "storescp", "Orthanc") if shutil.which(tool) is None]
    if missing:
        sys.stderr.write(f"ingest benchmark: missing {', '.join(missing)} (dcmtk, orthanc, orthanc-dicomweb)\n")
        return 2
    phases = set(args.phases.split(","))
    work = Path(tempfile.mkdtemp(prefix="infergate-bench-", dir=args.workdir))
    try:
        sys.stderr.write(f"writing series into {work} ...\n")
        series, memory_files = make_series(work, args.quick)
        load_before = os.getloadavg()
        began = time.monotonic()
        runs = run_phase("dimse", series, args, work) if "dimse" in phases else []
        runs += run_phase("stow", series, args, work) if "stow" in phases else []
        memory = memory_phase(memory_files, args, work) if "memory" in phases else []
        ratios = same_run_ratios(runs)
        record: dict[str, Any] = {
            "benchmark": "ingest",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(work),
            "versions": versions(),
            "config": {
                "quick": args.quick,
                "repeat": args.repeat,
                "batch": args.batch,
                "series": {item.label: round(item.megabytes, 2) for item in series},
                "receivers": args.receivers,
                "node_pdu_variants": args.node_pdu,
                "postgres": bool(args.pg_url),
            },
            "load_before": [round(value, 2) for value in load_before],
            "load_after": [round(value, 2) for value in os.getloadavg()],
            "duration_s": round(time.monotonic() - began, 1),
            "summary": summarise(runs),
            "ratios": ratios,
            "targets": check_targets(ratios, series[0].label) if "dimse" in phases else [],
            "memory": memory,
            "memory_flat": _memory_flat(memory),
            "notes": NOTES,
            "runs": runs,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.write(render(record))
    args.results.mkdir(parents=True, exist_ok=True)
    with (args.results / "ingest.jsonl").open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.write(f"\nrecord appended to {args.results / 'ingest.jsonl'}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
