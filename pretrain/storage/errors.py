"""Turns SDK exceptions into one-line, actionable StorageErrors that name the URL and carry no secrets."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pretrain.errors import one_line
from pretrain.storage.base import StorageError
from pretrain.storage.redaction import redact

MAX_DETAIL_CHARS = 240


class Failure(enum.Enum):
    NO_BUCKET = "bucket missing"
    NOT_FOUND = "not found"
    DENIED = "access denied"
    UNREACHABLE = "unreachable"
    NO_CREDENTIALS = "no credentials"
    OTHER = "other"


# A backend's classifier: (kind, short detail) for an exception it recognises, None for one it does not.
Classifier = Callable[[BaseException], "tuple[Failure, str] | None"]


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """The error and its causes: SDK wrappers (S3UploadFailedError, RetryError) hide the informative one inside."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def detail_line(text: str) -> str:
    """An SDK's detail, redacted, on one line (its lines joined: the informative part is often not the first)."""
    return one_line(" ".join(redact(text).split()), MAX_DETAIL_CHARS)


def describe(kind: Failure, detail: str, not_found: str) -> str:
    if kind is Failure.NO_BUCKET:
        return f"the bucket does not exist ({detail})"
    if kind is Failure.NOT_FOUND:
        return not_found
    if kind is Failure.DENIED:
        return f"access denied ({detail}); check the credentials and their permissions on this bucket"
    if kind is Failure.UNREACHABLE:
        return f"cannot reach the storage endpoint ({detail}); check the endpoint URL and the network"
    if kind is Failure.NO_CREDENTIALS:
        return f"no credentials found ({detail})"
    return detail


@contextmanager
def storage_errors(action: str, url: str, classify: Classifier, *, not_found: str = "the object does not exist") -> Iterator[None]:
    """Re-raises anything the backend's SDK throws as StorageError('<action> <url> failed: <reason>')."""
    try:
        yield
    except StorageError:
        raise
    except Exception as error:
        kind, detail = Failure.OTHER, f"{type(error).__name__}: {error}"
        for cause in exception_chain(error):
            classified = classify(cause)
            if classified is not None:
                kind, detail = classified
                break
        # "from None": the SDK exception may quote request headers or a SAS URL; its text must not reach a traceback.
        reason = describe(kind, detail_line(detail), not_found)
        raise StorageError(" ".join(redact(f"{action} {url} failed: {reason}").split())) from None


def classify_os_error(error: BaseException) -> tuple[Failure, str] | None:
    if isinstance(error, FileNotFoundError):
        return Failure.NOT_FOUND, str(error)
    if isinstance(error, PermissionError):
        return Failure.DENIED, str(error)
    if isinstance(error, OSError):
        return Failure.OTHER, f"{type(error).__name__}: {error}"
    return None
