"""Check that OHIF, with a running node as its DICOMweb data source, lists a study and shows its SEG and SR.

Serves OHIF's prebuilt app (fetched with ``scripts/ohif/fetch.sh`` unless ``--ohif-dist`` is given) on
``http://127.0.0.1:<port>``, with an ``app-config.js`` pointing at the node, and drives Debian's headless
Chromium through the study list and the viewer. The viewer calls the node cross-origin, so start the node with
``INFERGATE_CORS_ORIGINS=http://127.0.0.1:<port>`` (3000 unless ``--port`` says otherwise)::

    INFERGATE_CORS_ORIGINS=http://127.0.0.1:3000 infergate up &
    python scripts/ohif/check.py --dicomweb http://127.0.0.1:8000/dicomweb --study 1.2.3... \\
        --screenshot artifacts/ohif.png

``--screenshot artifacts/ohif.png`` writes ``artifacts/ohif-study-list.png``, ``artifacts/ohif-viewer.png`` and
``artifacts/ohif-seg.png``. Exits 0 when OHIF showed everything, 1 with the reason (and the browser's log) when
it did not, 2 when it could not run (no Chromium, no OHIF, bad arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file from anywhere: the repo's helpers

from tests.helpers.ohif_browser import OhifCheckFailed, check_study  # noqa: E402
from tests.helpers.ohif_server import OHIF_VERSION, OhifServer, fetch_ohif  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dicomweb", required=True, help="the node's DICOMweb root, e.g. http://127.0.0.1:8000/dicomweb"
    )
    parser.add_argument("--study", required=True, help="StudyInstanceUID that must be listed with a SEG and an SR")
    parser.add_argument(
        "--screenshot", type=Path, default=Path("artifacts/ohif.png"), help="screenshot path; one file per step"
    )
    parser.add_argument("--port", type=int, default=3000, help="loopback port OHIF is served on (the CORS origin)")
    parser.add_argument("--ohif-dist", type=Path, help=f"a built OHIF app folder; default @ohif/app@{OHIF_VERSION}")
    parser.add_argument("--modality", action="append", help="modality the study must show (repeat); default SEG, SR")
    parser.add_argument("--segment", action="append", help="segment name the opened SEG must list (repeat)")
    parser.add_argument("--no-open-seg", action="store_true", help="only list the series, do not open the SEG")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed for each step")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        dist = args.ohif_dist or fetch_ohif()
        server = OhifServer(dist, args.dicomweb, port=args.port)
    except (RuntimeError, ValueError, OSError) as exc:
        sys.stderr.write(f"cannot serve OHIF: {exc}\n")
        return 2
    with server:
        sys.stdout.write(f"OHIF {server.origin} -> {args.dicomweb} (the node must allow CORS from {server.origin})\n")
        try:
            report = check_study(
                server.origin,
                args.dicomweb,
                args.study,
                screenshots=args.screenshot.parent,
                prefix=args.screenshot.stem,
                modalities=args.modality or ("SEG", "SR"),
                segments=args.segment,
                open_seg=not args.no_open_seg,
                timeout=args.timeout,
            )
        except FileNotFoundError as exc:
            sys.stderr.write(f"{exc}\n")
            return 2
        except OhifCheckFailed as exc:
            sys.stderr.write(f"FAILED: {exc}\n")
            return 1
    sys.stdout.write(
        f"OK in {report.seconds:.1f} s: series {report.series_modalities}, segments {report.segments}\n"
        + "".join(f"  screenshot {path}\n" for path in report.screenshots)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
