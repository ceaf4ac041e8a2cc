"""Errors of the data layer. Each message says what is wrong, where (file, key, class) and what to do."""

from __future__ import annotations


class DataError(ValueError):
    """Raw or prepared data is missing, malformed or inconsistent with ``params.yaml``."""


class DownloadError(DataError):
    """A file could not be fetched (offline, refused, HTTP error, interrupted transfer)."""


class ChecksumError(DownloadError):
    """A fetched file has the wrong size or checksum; it has been deleted."""


class UnsafeArchiveError(DataError):
    """An archive member would land outside the extraction directory; nothing was extracted."""


class UnreadableImage(DataError):
    """An image file cannot be decoded (truncated, corrupt, not an image)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason
