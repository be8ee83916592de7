"""Typed errors raised by core functions.

Each edge translates them: the REST API into HTTP 4xx, the SCP into DIMSE statuses, Celery tasks
into job state plus a retry decision. No transport codes live here.
"""


class InfergateError(Exception):
    """Base class of every error the core raises on purpose."""


class InvalidInput(InfergateError, ValueError):
    """The input (a dataset, a UID, a request) is malformed or unsupported."""


class NotFound(InfergateError, LookupError):
    """A referenced row, file or model does not exist."""


class Gone(NotFound):
    """What is asked for was held and has been removed on purpose (retention); a NotFound to callers
    that do not tell the two apart."""


class Conflict(InfergateError):
    """The request conflicts with what is already stored."""


class ModelFailed(InfergateError):
    """The model could not be run on the input; permanent for this input."""


class TransientError(InfergateError):
    """A peer or resource is temporarily unavailable; the operation may be retried."""
