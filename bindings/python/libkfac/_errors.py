"""The one exception of the package, and the status check every library call goes through."""

from __future__ import annotations

from . import _lib

__all__ = ["KFACError", "check"]


class KFACError(Exception):
    """A libkfac call returned a non-zero status.

    Attributes:
        status: the negative status code (e.g. ``libkfac.KFAC_ERROR_NO_STATISTICS``).
        status_name: the constant's name (e.g. ``"KFAC_ERROR_NO_STATISTICS"``).
        message: the library's description of the failure (its last-error message for the
            handle, or the status's generic description).
    """

    def __init__(self, status: int, message: str = ""):
        self.status = int(status)
        self.status_name = _lib.status_name(self.status)
        self.message = message or _lib.status_string(self.status)
        super().__init__(f"{self.status_name} ({self.status}): {self.message}")

    def __reduce__(self):
        return (type(self), (self.status, self.message))


def last_error(pointer) -> str:
    """The library's last-error message of a handle pointer (a static message for NULL)."""
    return _lib.kfac_optimizer_last_error(pointer).decode("utf-8", "replace")


def check(status: int, pointer=None, context: str = "") -> int:
    """Returns ``status`` when it is not negative; otherwise raises :class:`KFACError` with the
    handle's last-error message (``pointer`` given) or ``context`` and the status's description
    (functions without a handle)."""
    if status >= 0:
        return status
    if pointer is not None:
        raise KFACError(status, last_error(pointer))
    if context:
        raise KFACError(status, f"{context}: {_lib.status_string(status)}")
    raise KFACError(status)
