"""Receivers and senders for ``benchmarks/ingest.py``: the node, dcmtk ``storescp`` and Orthanc, fed the same way.

Every receiver is a real process started fresh in its own folder on loopback ports, so that each one is measured
from the outside in the same way: CPU seconds and resident memory of its process tree from ``/proc``. The senders
are public tools or the standard library: dcmtk ``storescu`` (timestamped with a log4cplus pattern, so that each
C-STORE is timed by the sender itself) and ``http.client`` for STOW-RS.

The test helpers are reused where they fit: :class:`tests.helpers.peers.Orthanc`, :func:`run_storescu` and
:class:`tests.helpers.node.NodeProcess`.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.node import NodeProcess, node_env, wait_for_http
from tests.helpers.peers import LOOPBACK, Orthanc, free_port, run_storescu

_TICK = os.sysconf("SC_CLK_TCK")

# Process tree measurements ---------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(item) for item in handle.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants now (storescp ``--fork`` serves each association in a child)."""
    tree, queue = [], [pid]
    while queue:
        current = queue.pop()
        tree.append(current)
        queue += _children(current)
    return tree


def _cpu_ticks(pid: int, *, reaped: bool) -> int:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    # fields[11:15] are utime, stime, cutime, cstime (stat fields 14-17)
    return sum(int(value) for value in fields[11 : 15 if reaped else 13])


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid``, the children it reaped and the descendants still alive."""
    tree = process_tree(pid)
    return sum(_cpu_ticks(item, reaped=True) for item in tree) / _TICK


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree_rss_kib(pid: int) -> int:
    return sum(_status_kib(item, "VmRSS") for item in process_tree(pid))


class Monitor:
    """CPU seconds and peak RSS of a process tree over one measured run (RSS sampled every ``interval`` s)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.cpu_seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._cpu0 = 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> Monitor:
        self._cpu0 = tree_cpu_seconds(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, tree_rss_kib(self.pid))
        self.cpu_seconds = tree_cpu_seconds(self.pid) - self._cpu0


# Receivers -------------------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """One receiving process; ``kind`` is ``dimse`` (C-STORE on ``port``) or ``stow`` (POST to ``stow_url``)."""

    name: str
    kind: str
    aet: str = ""
    port: int = 0
    stow_url: str = ""
    note: str = ""

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def start(self, folder: Path) -> Receiver:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def _pg_database(admin_url: str, name: str, *, create: bool) -> str:
    """Create (or drop) a database ``name`` next to the one ``admin_url`` names; the new URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        if create:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        else:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@dataclass
class NodeReceiver(Receiver):
    """``infergate scp --no-watcher`` or ``infergate api`` as shipped (SQLite in its data folder unless ``pg_url``)."""

    env: dict[str, str] = field(default_factory=dict)
    pg_url: str | None = None
    _process: NodeProcess | None = None
    _pg_name: str | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, folder: Path) -> NodeReceiver:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        values: dict[str, object] = {"data_dir": folder / "var"}
        if self.kind == "dimse":
            values.update(scp_port=self.port, audit_log=folder / "audit.log")
            self.aet = "INFERGATE"
        else:
            values.update(api_host=LOOPBACK, api_port=self.port, dicomweb_max_upload_bytes=4 * 1024**3)
            self.stow_url = f"http://{LOOPBACK}:{self.port}/dicomweb/studies"
        env = node_env(**values) | self.env
        if self.pg_url:
            self._pg_name = f"infergate_bench_{uuid.uuid4().hex[:12]}"
            env["INFERGATE_DATABASE_URL"] = _pg_database(self.pg_url, self._pg_name, create=True)
        upgrade = subprocess.run(
            [sys.executable, "-m", "infergate.cli", "db", "upgrade"],
            env={k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_")} | env,
            capture_output=True,
            text=True,
            check=False,
        )
        if upgrade.returncode:
            raise RuntimeError(f"infergate db upgrade failed:\n{upgrade.stderr[-3000:]}")
        command = ["scp", "--no-watcher"] if self.kind == "dimse" else ["api"]
        log = folder / f"{command[0]}.log"
        offset = log.stat().st_size if log.exists() else 0
        self._process = NodeProcess(command, env, log).start()
        if self.kind == "stow":
            wait_for_http(f"http://{LOOPBACK}:{self.port}/health", timeout=60)
        else:
            self._wait_listening(offset, 60)
        return self

    def _wait_listening(self, offset: int, timeout: float) -> None:
        """Wait for the SCP's "listening on" line: a probe connection would hold an association slot
        until its ARTIM timer expires, and stopping the SCP would then wait out its drain period."""
        assert self._process is not None and self._process.process is not None
        deadline = time.monotonic() + timeout
        while "listening on" not in self._process.log_text()[offset:]:
            if self._process.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"infergate scp did not start:\n{self._process.log_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self.pg_url and self._pg_name:
            _pg_database(self.pg_url, self._pg_name, create=False)
            self._pg_name = None


@dataclass
class _ProcessReceiver(Receiver):
    """A receiver that is one child process, stopped with SIGTERM."""

    _process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None


@dataclass
class StoreScpReceiver(_ProcessReceiver):
    """dcmtk ``storescp --fork`` writing to a folder; ``fsync`` adds ``sync FILE DIR`` per file (``-xcr -xs``)."""

    fsync: bool = False

    def start(self, folder: Path) -> StoreScpReceiver:
        out = folder / "out"
        out.mkdir(parents=True, exist_ok=True)
        self.port, self.aet = free_port(), "STORESCP"
        # storescp has no fsync option; this runs coreutils `sync` on the file and its folder before the
        # response is sent (the command runs synchronously in the association's process).
        sync = ["-xcr", "sync #p/#f #p", "-xs"] if self.fsync else []
        command = ["storescp", "--fork", "-od", str(out), "-aet", self.aet, *sync, str(self.port)]
        with (folder / "storescp.log").open("ab") as log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, TCP_NODELAY="1")
            )
        deadline = time.monotonic() + 10
        while not _listening(self.pid, self.port):  # no probe connection: it would fork a child
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"storescp did not start: {(folder / 'storescp.log').read_text()[-2000:]}")
            time.sleep(0.02)
        return self


@dataclass
class NullScpReceiver(_ProcessReceiver):
    """``benchmarks/_null_scp.py``: pynetdicom answering Success at once; the ceiling of a pynetdicom SCP."""

    def start(self, folder: Path) -> NullScpReceiver:
        folder.mkdir(parents=True, exist_ok=True)
        self.port, self.aet = free_port(), "NULLSCP"
        script = Path(__file__).with_name("_null_scp.py")
        with (folder / "null-scp.log").open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, str(script), str(self.port)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while not _listening(self.pid, self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the null SCP did not start: {(folder / 'null-scp.log').read_text()[-2000:]}")
            time.sleep(0.05)
        return self


def _listening(pid: int, port: int) -> bool:
    """Whether something on this machine listens on TCP ``port`` (``/proc/net/tcp``, state 0A)."""
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                for line in handle.readlines()[1:]:
                    parts = line.split()
                    if parts[1].endswith(wanted) and parts[3] == "0A":
                        return True
        except FileNotFoundError:
            continue
    return False


@dataclass
class OrthancReceiver(Receiver):
    """A private Orthanc with its default durability (``SyncStorageArea``: fsync per file) and DICOMweb."""

    _orthanc: Orthanc | None = None

    @property
    def pid(self) -> int:
        assert self._orthanc is not None and self._orthanc._process is not None
        return self._orthanc._process.pid

    def start(self, folder: Path) -> OrthancReceiver:
        # tests.helpers.peers turns fsync off for speed; Orthanc's own default is on.
        self._orthanc = Orthanc(folder, aet="ORTHANC", extra_config={"SyncStorageArea": True}).start()
        self.port, self.aet = self._orthanc.dicom_port, "ORTHANC"
        self.stow_url = f"{self._orthanc.dicomweb_url}/studies"
        return self

    def stop(self) -> None:
        if self._orthanc is not None:
            self._orthanc.stop()
            self._orthanc = None


# Senders ---------------------------------------------------------------------------------------------------

#: log4cplus pattern for storescu: epoch seconds, then milliseconds.microseconds (``%Q``).
_LOG_CONFIG = """log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.logToStdErr = true
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%Q} %m%n
"""
_STAMP = re.compile(r"^(\d+)\.(\d+)\.(\d+) (.*)$")


@dataclass
class SendResult:
    """One sending run: wall seconds from first connect to last response, and each request's latency."""

    wall_seconds: float
    latencies: list[float]
    instances: int
    failures: int = 0


def storescu_log_config(folder: Path) -> Path:
    path = folder / "storescu-log.cfg"
    path.write_text(_LOG_CONFIG)
    return path


def parse_storescu(stderr: str) -> tuple[float, float, list[float], int, int]:
    """(first connect, last response, latencies, successes, failures) from a timestamped ``storescu`` log."""
    first = last = 0.0
    sent: float | None = None
    latencies: list[float] = []
    ok = failed = 0
    for line in stderr.splitlines():
        match = _STAMP.match(line)
        if not match:
            continue
        stamp = int(match[1]) + int(match[2]) / 1e3 + int(match[3]) / 1e6
        message = match[4]
        if message.startswith("Requesting Association") and not first:
            first = stamp
        elif message.startswith("Sending Store Request"):
            sent = stamp
        elif message.startswith("Received Store Response") and sent is not None:
            latencies.append(stamp - sent)
            last, sent = stamp, None
            if "(Success)" in message:
                ok += 1
            else:
                failed += 1
    return first, last, latencies, ok, failed


def send_storescu(receiver: Receiver, files: Sequence[Path], associations: int, log_config: Path) -> SendResult:
    """Send ``files`` with ``associations`` concurrent ``storescu`` processes (every n-th file each)."""
    shares = [list(files[i::associations]) for i in range(associations)]
    outputs: list[str] = [""] * associations
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            result = run_storescu(
                shares[index], port=receiver.port, aec=receiver.aet, extra_args=["-lc", str(log_config)]
            )
            outputs[index] = result.stderr
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(associations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    parsed = [parse_storescu(text) for text in outputs]
    firsts = [item[0] for item in parsed if item[0]]
    lasts = [item[1] for item in parsed if item[1]]
    latencies = [value for item in parsed for value in item[2]]
    ok, failed = sum(item[3] for item in parsed), sum(item[4] for item in parsed)
    if ok + failed != len(files) or not firsts or not lasts:
        tail = "\n".join(text[-1500:] for text in outputs)
        raise RuntimeError(f"storescu -> {receiver.name}: {ok} of {len(files)} answered Success\n{tail}")
    return SendResult(max(lasts) - min(firsts), latencies, len(files), failed)


def multipart_bodies(files: Sequence[Path], batch: int) -> tuple[str, list[bytes]]:
    """``multipart/related; type="application/dicom"`` bodies of ``batch`` files each, built before timing."""
    boundary = f"infergate-bench-{uuid.uuid4().hex}"
    bodies = []
    for start in range(0, len(files), batch):
        parts = []
        for path in files[start : start + batch]:
            parts += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), path.read_bytes(), b"\r\n"]
        parts.append(f"--{boundary}--\r\n".encode())
        bodies.append(b"".join(parts))
    return f'multipart/related; type="application/dicom"; boundary={boundary}', bodies


def send_stow(receiver: Receiver, content_type: str, bodies: Sequence[bytes], clients: int, count: int) -> SendResult:
    """POST ``bodies`` to the receiver's STOW-RS URL from ``clients`` threads, one keep-alive connection each."""
    url = receiver.stow_url.removeprefix("http://")
    hostport, _, path = url.partition("/")
    host, _, port = hostport.partition(":")
    spans: list[tuple[float, float]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one(share: Sequence[bytes]) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=600)
        try:
            for body in share:
                began = time.time()
                connection.request(
                    "POST", "/" + path, body, {"Content-Type": content_type, "Accept": "application/dicom+json"}
                )
                response = connection.getresponse()
                answer = response.read()
                ended = time.time()
                with lock:
                    spans.append((began, ended))
                    if response.status != 200:
                        failures.append(f"{response.status}: {answer[:300]!r}")
        finally:
            connection.close()

    threads = [threading.Thread(target=one, args=(bodies[i::clients],)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures or len(spans) != len(bodies):
        raise RuntimeError(f"STOW-RS -> {receiver.name}: {len(failures)} failed request(s): {failures[:2]}")
    wall = max(end for _, end in spans) - min(begin for begin, _ in spans)
    return SendResult(wall, [end - begin for begin, end in spans], count)


def tool_versions() -> dict[str, str]:
    """Versions of the sender and reference tools, as they print them."""
    versions: dict[str, str] = {}
    for name, command in (("dcmtk", ["storescp", "--version"]), ("orthanc", ["Orthanc", "--version"])):
        if shutil.which(command[0]) is None:
            versions[name] = "missing"
            continue
        text = subprocess.run(command, capture_output=True, text=True, check=False).stdout
        match = re.search(r"v?(\d+\.\d+\.\d+)", text)
        versions[name] = match[1] if match else text.strip()[:40]
    return versions


__all__ = [
    "Monitor",
    "NodeReceiver",
    "OrthancReceiver",
    "Receiver",
    "SendResult",
    "StoreScpReceiver",
    "multipart_bodies",
    "send_stow",
    "send_storescu",
    "parse_storescu",
    "storescu_log_config",
    "tool_versions",
    "tree_cpu_seconds",
    "tree_rss_kib",
]
