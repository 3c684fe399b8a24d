"""Typed errors with messages a user can act on (never bare asserts on user input)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["CheckpointError", "ConfigError", "DataError", "InputError", "RequestError", "ShapeError", "TRNError",
           "one_line"]


class TRNError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(TRNError, ValueError):
    """A tensor, array or image handed to us is unusable (dtype, NaN, range, empty...)."""


class ShapeError(InputError):
    """A tensor has the wrong number of dimensions, channels or spatial size."""


class ConfigError(TRNError, ValueError):
    """A config file or option is malformed: unknown key, wrong type, unknown name, bad value."""


class DataError(TRNError, OSError):
    """A dataset is missing or its files are corrupt."""


class CheckpointError(TRNError, OSError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class SanitizeError(TRNError, RuntimeError):
    """A sanitisation job cannot account for every input, OUTPUT belongs to another job, or Ray could not run it."""


class RequestError(Exception):
    """A request the service refuses: :mod:`trn.http_api` turns it into a JSON error body with ``status`` (and
    ``headers``, e.g. ``Retry-After``)."""

    def __init__(self, status: int, kind: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers

    def __reduce__(self) -> tuple:  # pickles whole (Exception's default keeps only the message), e.g. via Ray
        return type(self), (self.status, self.kind, self.message, dict(self.headers) if self.headers else None)


def one_line(e: BaseException) -> str:
    """``e`` as one line (type and message, whitespace collapsed, at most 300 characters)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
