"""Binary deltas between firmware images: the patch formats otabox makes and devices apply.

The server makes `ALGORITHM` patches unless told otherwise (`--delta-algorithm`), in a child
process (`otabox delta make`) so its time and memory are bounded; the device SDK applies every
format in `FORMATS`. Names are those of the device protocol's `delta.algorithm`
(docs/protocol.md, section 8). The choice is by measurement (bench/RESULTS.md, "Delta
algorithms"): detools-lzma makes the smallest patches of real executables (7-10 % below
bsdiff4), needs ~7.5x the image to make one (bsdiff4 18x) and applies in a fixed 8 MiB
streaming (bsdiff4's Python API holds old + new image). bsdiff4 (BSDIFF40) stays for devices
that carry the classic `bspatch`. File I/O only; no network, no server.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

__all__ = ["ALGORITHM", "FORMATS", "LIBRARIES", "DeltaError", "apply", "make"]

ALGORITHM = "detools-lzma"
# Each format and the package that makes and applies it (imported on first use; the binary's
# build reads this table to bundle them).
LIBRARIES = {"detools-lzma": "detools", "bsdiff4": "bsdiff4"}
FORMATS = tuple(LIBRARIES)


class DeltaError(Exception):
    """A delta could not be made or applied (unknown format, corrupt patch, missing library)."""


def _library(algorithm: str) -> ModuleType:
    """The library of a format, imported on first use (they are not small; most commands need none)."""
    if algorithm not in FORMATS:
        raise DeltaError(f"unknown delta algorithm {algorithm!r} (known: {', '.join(FORMATS)})")
    name = LIBRARIES[algorithm]
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DeltaError(f"the {name} package, needed for {algorithm} deltas, is not installed") from exc


def make(old: Path, new: Path, out: Path, algorithm: str = ALGORITHM) -> int:
    """Write the patch that rebuilds `new` from `old` to `out`; returns its size in bytes."""
    lib = _library(algorithm)
    if algorithm == "bsdiff4":
        lib.file_diff(str(old), str(new), str(out))
    else:
        with open(old, "rb") as f_old, open(new, "rb") as f_new, open(out, "wb") as f_patch:
            lib.create_patch(f_old, f_new, f_patch, compression="lzma")
    return out.stat().st_size


def apply(old: Path, patch: Path, out: Path, algorithm: str) -> None:
    """Rebuild the new image from `old` and `patch` into `out`. Raises DeltaError.

    The caller checks the result against the full image's size and digest: a patch that
    applies cleanly can still be for another image.
    """
    lib = _library(algorithm)
    try:
        if algorithm == "bsdiff4":
            lib.file_patch(str(old), str(out), str(patch))
        else:
            with open(old, "rb") as f_old, open(patch, "rb") as f_patch, open(out, "wb") as f_out:
                lib.apply_patch(f_old, f_patch, f_out)
    except Exception as exc:  # corrupt input raises whatever the decoder hits (ValueError, OSError, ...)
        out.unlink(missing_ok=True)
        raise DeltaError(f"{algorithm} patch does not apply: {exc}") from exc
