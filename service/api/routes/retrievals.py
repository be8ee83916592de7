"""Studies being pulled from a configured source before their jobs run."""

from __future__ import annotations

from fastapi import APIRouter

from infergate.errors import NotFound
from infergate.store.tables import Retrieval
from service.api.deps import SessionDep
from service.api.schemas import ERROR_RESPONSES, RetrievalOut, RowId

router = APIRouter(prefix="/api/v1/retrievals", tags=["jobs"], responses=ERROR_RESPONSES)


@router.get("/{retrieval_id}", response_model=RetrievalOut)
def get_retrieval(retrieval_id: RowId, session: SessionDep) -> RetrievalOut:
    """State of a pull from a source, and the ids of the jobs it created."""
    row = session.get(Retrieval, retrieval_id)
    if row is None:
        raise NotFound(f"Retrieval {retrieval_id} does not exist.")
    return RetrievalOut.model_validate(row)
