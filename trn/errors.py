"""Typed errors with messages a user can act on (never bare asserts on user input)."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "InputError", "ShapeError", "TRNError"]


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
