"""What the SCP reliability tests share: the SCP as a real process, a sender that reports every
status, a private PostgreSQL cluster that can be stopped, a small tmpfs, and one consistency check.

Everything stays on loopback. The SCP runs as ``python -m service.scp`` (what ``infergate scp``
execs) in its own process group, so that SIGKILL is a crash of the whole service, and it logs to a
file that the tests print when they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import select

from infergate.config import Settings
from infergate.dicom.net import NODELAY_HANDLER
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine
from infergate.store.tables import Base, Instance, Series
from tests.helpers.node import node_env
from tests.helpers.peers import free_port, port_is_listening

LOOPBACK = "127.0.0.1"
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


def migrate(data_dir: Path, database_url: str | None) -> Settings:
    """Settings of the node under test, with its database migrated."""
    settings = Settings(data_dir=data_dir, database_url=database_url)
    engine = make_engine(settings)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return settings


class ScpProcess:
    """The node's SCP in its own process group; ``kill`` is a crash, ``start`` a restart.

    ``kill`` and ``start`` may be called from two threads (a killer and a sender): a lock keeps
    one restart at a time.
    """

    def __init__(
        self,
        workdir: Path,
        settings: Settings,
        *,
        watcher: bool = False,
        env: Mapping[str, object] | None = None,
        strace_log: Path | None = None,
        strace_calls: str = "fsync,fdatasync,linkat,sendto,recvfrom",
    ) -> None:
        self.workdir = workdir
        self.settings = settings
        self.port = free_port()
        self.watcher = watcher
        self.strace_log = strace_log
        self.strace_calls = strace_calls
        values: dict[str, object] = {"data_dir": settings.data_path, "scp_port": self.port, **(env or {})}
        if settings.database_url:
            values["database_url"] = settings.database_url
        self.env = node_env(**values)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._lock = threading.RLock()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 60.0) -> ScpProcess:
        with self._lock:
            assert self.process is None or self.process.poll() is not None, "the SCP is already running"
            self.starts += 1
            command = [sys.executable, "-m", "service.scp", *([] if self.watcher else ["--no-watcher"])]
            if self.strace_log is not None:
                # -f: every thread; --seccomp-bpf: stop only at the traced calls (SQLite's many
                # others made the SCP ten times slower); -yy: paths of files and both ends of
                # sockets; -s: enough of each buffer to see a C-STORE-RSP's SOP Instance UID and
                # PostgreSQL's COMMIT. Each thread's calls keep their order, and a call that
                # returned is logged before any call it caused in another thread.
                trace = ["strace", "-f", "--seccomp-bpf", "-qq", "-yy", "-s", "320", "-e", f"trace={self.strace_calls}"]
                command = [*trace, "-o", str(self.strace_log), *command]
            env = {k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_")}
            env.update(self.env)
            with self.log_path(self.starts).open("ab") as log:
                self.process = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            deadline = time.monotonic() + timeout
            while not port_is_listening(self.port):
                if self.process.poll() is not None:
                    raise RuntimeError(f"the SCP exited with {self.process.returncode}:\n{self.log_text()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the SCP did not listen within {timeout} s:\n{self.log_text()}")
                time.sleep(0.02)
            return self

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def restart(self) -> None:
        with self._lock:
            self.kill()
            self.start()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL what is left."""
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_path(self, start: int) -> Path:
        return self.workdir / f"scp-{self.port}-{start}.log"

    def log_text(self, limit: int = 6000) -> str:
        parts = []
        for start in range(1, self.starts + 1):
            path = self.log_path(start)
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-limit:]}")
        return "\n".join(parts)


class Sender:
    """A pynetdicom SCU that reports each C-STORE's status, or None when no answer came.

    None means what it means to a PACS: the instance was not acknowledged and must be sent again.

    It sends the files' bytes as they are (``STORE_SEND_CHUNKED_DATASET``, set by the
    ``verbatim_sends`` fixture), so a stored file can be compared with its source byte for byte.
    """

    def __init__(
        self,
        port: int,
        *,
        called: str = "INFERGATE",
        calling: str = "RELIABILITY",
        sop_classes: Sequence[str] = (CTImageStorage, EnhancedCTImageStorage),
        timeout: float = 15.0,
        response_timeout: float | None = None,
    ) -> None:
        self.port = port
        self.called = called
        self.ae = AE(ae_title=calling)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout
        if response_timeout is not None:
            # pynetdicom 3 waits the whole DIMSE timeout for a C-STORE-RSP even when the peer died
            # while the request was being sent; a test that kills the SCP often shortens it. A
            # response that is merely slow then counts as none, and the instance is re-sent.
            self.ae.dimse_timeout = response_timeout
        self.ae.connection_timeout = 2.0
        for sop_class in sop_classes:
            self.ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        self.assoc: Association | None = None

    def connect(self, timeout: float = 60.0) -> None:
        """Associate, retrying while the SCP (re)starts."""
        deadline = time.monotonic() + timeout
        while not self._associate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no association with 127.0.0.1:{self.port} within {timeout} s")
            time.sleep(0.05)

    def _associate(self) -> bool:
        if self.assoc is not None and self.assoc.is_established:
            return True
        # TCP_NODELAY as the node's own SCU sets it: without it, Nagle's algorithm and delayed ACKs
        # add about 40 ms to every C-STORE on loopback.
        self.assoc = self.ae.associate(LOOPBACK, self.port, ae_title=self.called, evt_handlers=[NODELAY_HANDLER])
        return self.assoc.is_established

    def store(self, path: Path) -> int | None:
        """One C-STORE on the current association (made if needed); None: no response."""
        if not self._associate():
            return None
        assert self.assoc is not None
        try:
            status = self.assoc.send_c_store(path)
        except (RuntimeError, OSError, ValueError):
            return None
        return int(status.Status) if "Status" in status else None

    def abort(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.abort()

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.ae.shutdown()


def dataset_bytes(path: Path) -> bytes:
    """The dataset of a Part 10 file, after its File Meta Information (which each writer makes its own)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path.name} is not a Part 10 file"
    # (0002,0000) File Meta Information Group Length, explicit VR little endian: tag, "UL", 4, value
    assert data[132:138] == b"\x02\x00\x00\x00UL", f"{path.name} has no meta group length"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


@dataclass(frozen=True)
class StoredInstance:
    path: Path
    size: int
    series_instance_uid: str


def stored_instances(settings: Settings) -> dict[str, StoredInstance]:
    """SOP Instance UID -> the row's file and size, read from the node's database."""
    engine = make_engine(settings)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(Instance.sop_instance_uid, Instance.path, Instance.size, Series.series_instance_uid).join(
                    Series, Instance.series_id == Series.id
                )
            ).all()
    finally:
        engine.dispose()
    return {uid: StoredInstance(settings.data_path / path, size, series) for uid, path, size, series in rows}


def table_rows(settings: Settings, table: type[Base]) -> list[dict[str, Any]]:
    """Every row of a table, as dicts."""
    engine = make_engine(settings)
    try:
        with engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(select(table.__table__))]
    finally:
        engine.dispose()


def files_under(folder: Path) -> set[Path]:
    """Every file below ``folder``, hidden and temporary ones included."""
    return {path for path in folder.rglob("*") if path.is_file()} if folder.exists() else set()


def assert_consistent(
    settings: Settings,
    acknowledged: Mapping[str, Path],
    refused: Iterable[str] = (),
    *,
    unresolved: Iterable[str] = (),
) -> None:
    """The store's promise after any fault.

    * every acknowledged instance has a row and a file whose dataset equals the source's, byte for byte,
      and whose size the row records;
    * a refused instance (never acknowledged, not re-sent) has neither;
    * no file without a row and no row without a file among received instances (the node's own
      SEG/SR results live elsewhere): nothing partial or temporary is left.

    ``unresolved`` names refused instances whose row may exist without a file (a COMMIT that
    reached the database although its reply was lost); the sender's retry restores their files.
    """
    rows = stored_instances(settings)
    for uid, source in acknowledged.items():
        assert uid in rows, f"acknowledged instance {uid} has no row"
        row = rows[uid]
        assert row.path.is_file(), f"acknowledged instance {uid} has a row but no file"
        assert dataset_bytes(row.path) == dataset_bytes(source), f"stored bytes of {uid} differ from the sent ones"
        assert row.size == row.path.stat().st_size, f"the row of {uid} records another size than its file's"
    for uid in refused:
        assert uid not in rows, f"refused instance {uid} has a row"
    files = files_under(settings.instances_dir)
    received = {uid: row for uid, row in rows.items() if row.path.is_relative_to(settings.instances_dir)}
    indexed = {row.path for uid, row in received.items() if uid not in set(unresolved)}
    assert files - indexed == set(), f"files without a row: {sorted(p.name for p in files - indexed)}"
    assert indexed - files == set(), f"rows without a file: {sorted(p.name for p in indexed - files)}"


# --- a private PostgreSQL that a test may stop ------------------------------------------------------


def _pg_bin(name: str) -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    if not candidates:
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed under /usr/lib/postgresql")
    return candidates[0]


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free loopback port, owned by this test.

    The machine's shared server is never touched. initdb refuses to run as root, so as root the
    cluster belongs to the ``postgres`` user (through ``runuser``).
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="infergate-pg-"))
        self.data = self.root / "data"
        self._user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres")
            self._user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._user, *args], capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {result.stdout}{result.stderr}{self.log_text()}")

    def init(self) -> PrivatePostgres:
        self._run(
            str(_pg_bin("initdb")), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"
        )
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses={LOOPBACK}"
        self._run(
            str(_pg_bin("pg_ctl")), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start"
        )

    def stop_immediately(self) -> None:
        """``pg_ctl stop -m immediate``: the server dies without a checkpoint, as on a crash."""
        self._run(str(_pg_bin("pg_ctl")), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def log_text(self) -> str:
        log = self.root / "log"
        return log.read_text(errors="replace")[-3000:] if log.exists() else ""

    def destroy(self) -> None:
        subprocess.run(
            [*self._user, str(_pg_bin("pg_ctl")), "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` mounted at ``folder``, so that writes fail with ENOSPC as on a full disk.

    Needs root (as in CI); raises ``PermissionError`` with mount's message where it is refused.
    """
    folder.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise PermissionError(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.2) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)
