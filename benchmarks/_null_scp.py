"""A bare pynetdicom storage SCP: answers every C-STORE Success at once, stores nothing.

The ingest benchmark runs it beside the node as the ceiling of any SCP built on pynetdicom on the
same machine: the association, PDU and DIMSE handling the node cannot avoid, with the node's
network settings (TCP_NODELAY, 1 MiB max PDU) and no decoding, file or database work.

    python benchmarks/_null_scp.py PORT
"""

from __future__ import annotations

import sys

from pynetdicom import AE, AllStoragePresentationContexts, evt

from infergate.dicom.net import NODELAY_HANDLER


def _store(event: evt.Event) -> int:
    return 0x0000


def main(port: int) -> None:
    ae = AE(ae_title="NULLSCP")
    ae.maximum_pdu_size = 1024 * 1024
    ae.maximum_associations = 64
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    print(f"listening on {port}", flush=True)  # noqa: T201
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[NODELAY_HANDLER, (evt.EVT_C_STORE, _store)])


if __name__ == "__main__":
    main(int(sys.argv[1]))
