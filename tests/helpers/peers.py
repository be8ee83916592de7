"""Real DICOM peers for tests: an Orthanc PACS and the DCMTK command-line tools, on loopback only.

The style guide asks for tests against real peers rather than mocks. These helpers start them quickly and
reproducibly:

* :class:`Orthanc` runs ``/usr/sbin/Orthanc`` with a generated configuration in its own folder (storage,
  index, log), free ports, the DICOMweb plugin and an optional Lua auto-routing script, and exposes the few
  REST calls that tests assert with.
* :func:`run_storescu` and :func:`run_echoscu` wrap DCMTK with ``TCP_NODELAY=1``: without it, Nagle's
  algorithm and delayed ACKs slowed loopback transfers of 512x512 CT slices into storescp from about 300 to
  22 instances/s here.

Traffic only ever goes to 127.0.0.1. Orthanc 1.10 has no bind-address option and listens on all interfaces, so
when a C compiler is available it is started with a tiny ``LD_PRELOAD`` shim (:func:`loopback_shim`) that
turns ``bind(INADDR_ANY)`` into ``bind(127.0.0.1)``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DICOMWEB_PLUGIN",
    "LOOPBACK",
    "ORTHANC_BINARY",
    "STORESCU_PROPOSAL_FLAGS",
    "Orthanc",
    "OrthancError",
    "free_port",
    "loopback_shim",
    "port_is_listening",
    "run_echoscu",
    "run_storescu",
    "wait_for_port",
]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

# An AE title that is also safe to paste into a Lua string literal.
_SAFE_AE = re.compile(r"^[A-Za-z0-9_.\- ]{1,16}$")
# No proxy, whatever the environment says: requests must reach the local Orthanc, not a proxy.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancError(RuntimeError):
    """Orthanc did not start, stop or answer as expected; the message ends with its log."""


def _require_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f'Argument "host" should be a loopback address; tests never leave this machine, got "{host}".'
        )


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the usual race applies, as in pynetdicom)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_is_listening(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on ``host:port`` right now."""
    _require_loopback(host)
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until ``host:port`` accepts a TCP connection.

    Raises
    ------
    ValueError
        If ``host`` is not a loopback address.
    TimeoutError
        If nothing listened within ``timeout`` seconds.
    """
    _require_loopback(host)
    deadline = time.monotonic() + timeout
    while True:
        if port_is_listening(port, host):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"Nothing listened on {host}:{port} within {timeout} s.")
        time.sleep(0.02)


_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

/* Rewrite bind(0.0.0.0) / bind(::) to loopback so that a test server is unreachable from the network. */
int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static int (*real_bind)(int, const struct sockaddr *, socklen_t);
    if (!real_bind) real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;
        memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&in4, sizeof in4);
        }
    }
    if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        memcpy(&in6, addr, sizeof in6);
        if (memcmp(&in6.sin6_addr, &in6addr_any, sizeof in6addr_any) == 0) {
            in6.sin6_addr = in6addr_loopback;
            return real_bind(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real_bind(fd, addr, len);
}
"""


def loopback_shim() -> Path | None:
    """Build (once, cached in the temp folder) the ``LD_PRELOAD`` library that keeps servers on loopback.

    Returns ``None``, with a warning, where no C compiler is available: the server then listens on all
    interfaces, as Orthanc does by default, though tests still only connect to 127.0.0.1.
    """
    digest = hashlib.sha256(_SHIM_SOURCE.encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"infergate-loopback-bind-{digest}.so"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("No C compiler: test servers will listen on all interfaces, not only loopback.")
        return None
    with tempfile.TemporaryDirectory(prefix="infergate-shim-") as build:
        source = Path(build) / "bind.c"
        source.write_text(_SHIM_SOURCE)
        output = Path(build) / "bind.so"
        result = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(output), str(source), "-ldl"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            log.warning(
                "Could not build the loopback shim; servers listen on all interfaces:\n%s", result.stderr
            )
            return None
        os.replace(output, target)  # atomic, so parallel test processes never load a half-written file
    return target


def _die_with_parent_hook() -> Callable[[], object] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when the test process dies.

    So no Orthanc outlives a crashed or killed test run and holds its ports. libc is loaded here, in the
    parent, so that the child only makes one system call between fork and exec. The signal follows the
    thread that started the child: start Orthanc from the thread that will also stop it.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: stop() and the context manager still clean up in the normal case
    pr_set_pdeathsig = 1
    return functools.partial(prctl, pr_set_pdeathsig, signal.SIGTERM)


def _lua_autoroute(target: str, skip_calling_aet: str | None) -> str:
    # Orthanc 1.10 names the calling AE "RemoteAet" in the origin table (there is no "CallingAet" key).
    skip = f"  if origin['RemoteAet'] == '{skip_calling_aet}' then return end\n" if skip_calling_aet else ""
    return (
        "-- Generated by tests/helpers/peers.py: forward received images to the inference node.\n"
        "function OnStoredInstance(instanceId, tags, metadata, origin)\n"
        "  local modality = tags['Modality']\n"
        "  if modality == 'SEG' or modality == 'SR' then return end\n"
        f"{skip}"
        f"  SendToModality(instanceId, '{target}')\n"
        "end\n"
    )


class Orthanc:
    """A real Orthanc PACS in a private folder, on free loopback ports.

    Use it as a context manager (``with Orthanc(tmp_path) as pacs: ...``) or call :meth:`start` and
    :meth:`stop`; both are idempotent. Orthanc answers HTTP about 0.2 s after it starts, but takes 1-5 s to
    exit, so :meth:`stop` waits for the process to end before the ports can be reused.

    Parameters
    ----------
    folder
        Holds the configuration, storage, index, Lua script and ``orthanc.log``; a temporary folder, removed
        by :meth:`stop`, when ``None``.
    aet
        Orthanc's own AE title.
    modalities
        ``DicomModalities``: name -> ``[AE, host, port]``,
        e.g. ``{"node": ["INFERGATE", "127.0.0.1", 11112]}``.
    autoroute_to
        A name in ``modalities``: every stored instance except SEG and SR is sent there (Lua
        ``OnStoredInstance``), as a PACS routes studies to an AI node.
    autoroute_skip_calling_aet
        Instances received from this calling AE are not routed, so results never bounce back to the node.
    stable_age
        Seconds without a new instance after which Orthanc calls a series or study stable.
    dicomweb
        Load the DICOMweb plugin at ``/dicom-web/``.
    extra_config
        Merged last into the configuration, for options these parameters do not cover.
    loopback_only
        Start Orthanc with :func:`loopback_shim` so that it listens on 127.0.0.1 only.
    """

    def __init__(
        self,
        folder: Path | None = None,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Sequence[str | int]] | None = None,
        autoroute_to: str | None = None,
        autoroute_skip_calling_aet: str | None = None,
        stable_age: int = 60,
        dicomweb: bool = True,
        extra_config: Mapping[str, Any] | None = None,
        loopback_only: bool = True,
        binary: Path = ORTHANC_BINARY,
    ) -> None:
        for name, value in (("aet", aet), ("autoroute_skip_calling_aet", autoroute_skip_calling_aet)):
            if value is not None and not _SAFE_AE.match(value):
                raise ValueError(f'Argument "{name}" should be 1-16 letters, digits, spaces or "_.-".')
        self.modalities = {name: list(entry) for name, entry in (modalities or {}).items()}
        for name, entry in self.modalities.items():
            if len(entry) != 3 or not _SAFE_AE.match(name) or not isinstance(entry[2], int):
                raise ValueError(
                    f'Argument "modalities" should map names to [AE, host, port]; got {name!r}: {entry!r}.'
                )
            _require_loopback(str(entry[1]))
        if autoroute_to is not None and autoroute_to not in self.modalities:
            raise ValueError(
                f'Argument "autoroute_to" should name one of the modalities, got "{autoroute_to}".'
            )
        if stable_age < 1:
            raise ValueError('Argument "stable_age" should be at least 1 second.')
        self.aet = aet
        self.autoroute_to = autoroute_to
        self.autoroute_skip_calling_aet = autoroute_skip_calling_aet
        self.stable_age = stable_age
        self.dicomweb = dicomweb
        self.extra_config = dict(extra_config or {})
        self.loopback_only = loopback_only
        self.binary = binary
        self._own_folder = folder is None
        self.folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="orthanc-"))
        self.http_port = 0
        self.dicom_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._saved_log: str | None = None
        #: Seconds the last start() took until HTTP and DICOM answered, and the last stop() until exit.
        self.start_seconds = 0.0
        self.stop_seconds = 0.0

    # Life cycle ---------------------------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    @property
    def url(self) -> str:
        """Base URL of the REST API, e.g. ``http://127.0.0.1:8042``."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def config(self) -> dict[str, Any]:
        """The configuration written to ``orthanc.json``; tuned for quick, quiet, loopback-only tests."""
        storage = self.folder / "storage"
        config: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": self.modalities,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "StableAge": self.stable_age,
            # speed: no fsync per file, no zlib, no persisted jobs (test data is disposable)
            "SyncStorageArea": False,
            "StorageCompression": False,
            "SaveJobs": False,
            "DicomScpTimeout": 10,
            "DicomAssociationCloseDelay": 1,
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 2,
            "Plugins": [],
            "LuaScripts": [],
        }
        if self.dicomweb:
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False}
        if self.autoroute_to is not None:
            config["LuaScripts"] = [str(self.folder / "autoroute.lua")]
        config.update(self.extra_config)
        return config

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Write the configuration, start Orthanc and wait until both HTTP and DICOM answer.

        Raises
        ------
        OrthancError
            If the binary or plugin is missing, or Orthanc exits or stays silent for ``timeout`` seconds.
        """
        if self.running:
            return self
        if not self.binary.exists():
            raise OrthancError(f"Orthanc is not installed at {self.binary} (Debian package `orthanc`).")
        if self.dicomweb and not DICOMWEB_PLUGIN.exists():
            raise OrthancError(
                f"The DICOMweb plugin is missing at {DICOMWEB_PLUGIN} (package `orthanc-dicomweb`)."
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        if self.autoroute_to is not None:
            (self.folder / "autoroute.lua").write_text(
                _lua_autoroute(self.autoroute_to, self.autoroute_skip_calling_aet)
            )
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        env = dict(os.environ, TCP_NODELAY="1")
        shim = loopback_shim() if self.loopback_only else None
        if shim is not None:
            env["LD_PRELOAD"] = f"{shim} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(shim)
        self._saved_log = None
        began = time.monotonic()
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [str(self.binary), str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                env=env,
                preexec_fn=_die_with_parent_hook(),
            )
        try:
            self._wait_until_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _wait_until_ready(self, deadline: float) -> None:
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with status {self._process.returncode}.\n{self.log_text()}"
                )
            try:
                self.get_json("/system")
                if port_is_listening(self.dicom_port):
                    return
            except (OSError, OrthancError):
                pass
            if time.monotonic() >= deadline:
                raise OrthancError(f"Orthanc did not answer on {self.url} in time.\n{self.log_text()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate Orthanc and wait for its process to exit (kill it after ``timeout`` seconds).

        Orthanc stops its HTTP server, DICOM server and jobs engine one after the other, which takes 1-5 s;
        returning earlier would leave the ports busy for the next test.
        """
        process, self._process = self._process, None
        if process is not None:
            began = time.monotonic()
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("Orthanc ignored SIGTERM for %s s; killing it.", timeout)
                    process.kill()
                    process.wait(timeout)
            self.stop_seconds = time.monotonic() - began
        if self._own_folder and self.folder.exists():
            self._saved_log = self.log_text()
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        """Orthanc's stdout and stderr so far, for assertion messages."""
        if self._saved_log is not None:
            return self._saved_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # REST ---------------------------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        timeout: float = 30.0,
    ) -> bytes:
        """One REST call to this Orthanc (loopback, no proxy); raises :class:`OrthancError` on HTTP errors."""
        if not path.startswith("/"):
            raise ValueError(f'Argument "path" should start with "/", got "{path}".')
        headers = {"Content-Type": content_type} if content_type else {}
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with _HTTP.open(req, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise OrthancError(f"{method} {path} answered {error.code}: {detail}") from error

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path, timeout=5.0))

    def post_json(self, path: str, payload: object) -> Any:
        return json.loads(self.request("POST", path, json.dumps(payload).encode(), "application/json"))

    def find(self, level: str = "Instance", query: Mapping[str, str] | None = None) -> list[str]:
        """Orthanc IDs matching a C-FIND-like query, via ``POST /tools/find``.

        ``level`` is ``Patient``, ``Study``, ``Series`` or ``Instance``; ``query`` maps DICOM keywords to
        values (wildcards allowed), e.g. ``{"Modality": "SEG"}``.
        """
        ids = self.post_json("/tools/find", {"Level": level, "Query": dict(query or {})})
        return [str(item) for item in ids]

    def wait_for_instances(
        self, count: int, query: Mapping[str, str] | None = None, timeout: float = 60.0
    ) -> list[str]:
        """Poll :meth:`find` until at least ``count`` instances match; for results that arrive asynchronously.

        Raises
        ------
        TimeoutError
            With the number found and Orthanc's log, if fewer arrived in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = self.find("Instance", query)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{len(found)} of {count} instances matching {dict(query or {})} arrived in {timeout} s."
                    "\n"
                    f"{self.log_text()[-4000:]}"
                )
            time.sleep(0.1)

    def instance_file(self, instance_id: str) -> bytes:
        """The stored Part 10 file of an instance."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def instance_tags(self, instance_id: str, *, simplify: bool = True) -> dict[str, Any]:
        """Tags of an instance: keyword -> value (``simplified-tags``), or Orthanc's full ``tags`` JSON."""
        tags = self.get_json(f"/instances/{instance_id}/{'simplified-tags' if simplify else 'tags'}")
        return dict(tags)

    def store_file(self, path: Path) -> dict[str, Any]:
        """Upload a Part 10 file with ``POST /instances``; returns Orthanc's answer (``ID``, ``Status``)."""
        answer = json.loads(self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom"))
        return dict(answer)

    def statistics(self) -> dict[str, Any]:
        """``GET /statistics``: counts of patients, studies, series and instances."""
        return dict(self.get_json("/statistics"))


# DCMTK ------------------------------------------------------------------------------------------------------


def _dcmtk_env() -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1")


#: storescu's flag proposing each compressed transfer syntax (each also proposes the uncompressed ones).
STORESCU_PROPOSAL_FLAGS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE lossless
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated explicit VR little endian
}


def _files_under(targets: Iterable[Path]) -> Iterable[Path]:
    for target in targets:
        if target.is_dir():
            yield from (path for path in sorted(target.rglob("*")) if path.is_file())
        else:
            yield target


def _proposal_flags(targets: Iterable[Path]) -> list[str]:
    """The ``-x?`` flag the files' compressed transfer syntax needs, or none for uncompressed files."""
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    flags: set[str] = set()
    for path in _files_under(targets):
        try:
            syntax = str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
        except (InvalidDicomError, OSError):
            continue  # storescu skips or reports such files itself
        if syntax in STORESCU_PROPOSAL_FLAGS:
            flags.add(STORESCU_PROPOSAL_FLAGS[syntax])
    if len(flags) > 1:
        raise ValueError(
            f"The files use several compressed transfer syntaxes ({sorted(flags)}); storescu proposes one "
            "per call: send each syntax separately or pass a -x flag in extra_args."
        )
    return sorted(flags)


def run_storescu(
    folder_or_files: Path | Iterable[Path],
    *,
    port: int,
    aet: str = "STORESCU",
    aec: str = "INFERGATE",
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Send files (or every file under a folder) with DCMTK ``storescu`` to ``127.0.0.1:port``.

    ``-R`` (propose only what the files need) is always passed, because the default proposal list lacks
    Segmentation. ``-R`` alone still proposes only uncompressed syntaxes, and storescu then tries to
    decompress a compressed file and stops there, so the matching ``-x?`` flag is added from the files' meta
    information unless ``extra_args`` already holds one. The result is returned unchecked; assert on
    ``returncode`` and ``stderr`` in the test.

    Raises
    ------
    ValueError
        If nothing is named, or the files use two compressed syntaxes (storescu proposes only one; send
        them in separate calls).
    """
    if isinstance(folder_or_files, Path):
        targets = [folder_or_files]
    else:
        targets = [Path(item) for item in folder_or_files]
    if not targets:
        raise ValueError('Argument "folder_or_files" should name at least one file or folder.')
    scan = ["+sd", "+r"] if any(target.is_dir() for target in targets) else []
    proposal: list[str] = []
    if not any(arg.startswith("-x") for arg in extra_args):
        proposal = _proposal_flags(targets)
    command = [
        "storescu",
        "-R",
        *scan,
        *proposal,
        "-aet",
        aet,
        "-aec",
        aec,
        *extra_args,
        LOOPBACK,
        str(port),
        *(str(target) for target in targets),
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=_dcmtk_env(), check=False
    )


def run_echoscu(
    port: int, aec: str, *, aet: str = "ECHOSCU", timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """C-ECHO ``127.0.0.1:port`` with DCMTK ``echoscu``; ``returncode`` 0 means the peer answered Success."""
    command = ["echoscu", "-aet", aet, "-aec", aec, LOOPBACK, str(port)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=_dcmtk_env(), check=False
    )
