"""Binary deltas between firmware images: the patch format otabox makes and devices apply.

The server makes `ALGORITHM` patches (`otabox delta make`, run as a child process so its time
and memory are bounded); the device SDK applies any format named in `FORMATS`. The choice is by
measurement: bench/RESULTS.md, "Delta algorithms". Names are those of the device protocol's
`delta.algorithm` (docs/protocol.md). File I/O only; no network, no server.
"""

from __future__ import annotations

from pathlib import Path

try:
    import bsdiff4
except ImportError:  # pragma: no cover - depends on the install
    bsdiff4 = None  # type: ignore[assignment]

__all__ = ["ALGORITHM", "FORMATS", "DeltaError", "apply", "make"]

# bsdiff4 (BSDIFF40): the smallest patches on real executables by far, applied in one pass with
# memory of about old + new image; making one costs ~15x the image in memory, so the server caps
# the image size it makes deltas for.
ALGORITHM = "bsdiff4"
FORMATS = ("bsdiff4",)


class DeltaError(Exception):
    """A delta could not be made or applied (unknown format, corrupt patch, missing library)."""


def make(old: Path, new: Path, out: Path, algorithm: str = ALGORITHM) -> int:
    """Write the patch that rebuilds `new` from `old` to `out`; returns its size in bytes."""
    if algorithm not in FORMATS:
        raise DeltaError(f"unknown delta algorithm {algorithm!r}")
    if bsdiff4 is None:
        raise DeltaError("the bsdiff4 package is not installed")
    bsdiff4.file_diff(str(old), str(new), str(out))
    return out.stat().st_size


def apply(old: Path, patch: Path, out: Path, algorithm: str) -> None:
    """Rebuild the new image from `old` and `patch` into `out`. Raises DeltaError.

    The caller checks the result against the full image's size and digest: a patch that
    applies cleanly can still be for another image.
    """
    if algorithm not in FORMATS:
        raise DeltaError(f"unknown delta algorithm {algorithm!r}")
    if bsdiff4 is None:
        raise DeltaError("the bsdiff4 package is not installed")
    try:
        bsdiff4.file_patch(str(old), str(out), str(patch))
    except Exception as exc:  # bsdiff4 raises ValueError/OSError/MemoryError on corrupt input
        out.unlink(missing_ok=True)
        raise DeltaError(f"{algorithm} patch does not apply: {exc}") from exc
