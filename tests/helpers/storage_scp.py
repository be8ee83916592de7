"""A small in-process C-STORE SCP (pynetdicom) that answers a chosen status, for export tests."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from tests.helpers.peers import free_port


@dataclass
class StorageSCP:
    """Records received SOP Instance UIDs; ``status`` is what every C-STORE is answered with.

    ``received`` lists the objects answered Success, ``stores`` every C-STORE whatever the answer, and
    ``associations`` counts the associations requested of it; ``delay`` seconds pass before each answer.
    """

    ae_title: str = "FAKEPACS"
    status: int = 0x0000
    delay: float = 0.0
    port: int = field(default_factory=free_port)
    received: list[str] = field(default_factory=list)
    stores: list[str] = field(default_factory=list)
    associations: int = 0
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: Event) -> int:
        ds: Dataset = event.dataset
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.stores.append(str(ds.SOPInstanceUID))
            if self.status == 0x0000:
                self.received.append(str(ds.SOPInstanceUID))
        return self.status

    def _on_requested(self, event: Event) -> None:
        with self._lock:
            self.associations += 1

    def start(self) -> StorageSCP:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_REQUESTED, self._on_requested)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"
