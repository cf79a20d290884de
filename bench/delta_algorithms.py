"""Binary-diff libraries for firmware delta updates: patch size, time and peak memory to make and to apply.

    python bench/delta_algorithms.py --fetch --synthetic          # the default pairs (~5 minutes, downloads included)
    python bench/delta_algorithms.py --pair OLD NEW --pair OLD2 NEW2 --only bsdiff4,zstd-patch --json out.json

Run it with an interpreter that has `bsdiff4`, `zstandard` and `detools` (a throwaway virtualenv:
`python3.11 -m venv /tmp/dvenv && /tmp/dvenv/bin/pip install bsdiff4 zstandard detools`); an
algorithm whose library is missing is reported as such and the others still run.

Algorithms (`--only`):
- `bsdiff4`: `bsdiff4.diff(old, new)` / `bsdiff4.patch(old, patch)` (BSDIFF40: qsufsort suffix array of
  `old`, three bzip2 streams).
- `zstd-patch`: like `zstd --patch-from`: `new` compressed with `old` as a raw-content dictionary,
  long-distance matching on, window_log = max(level default, ceil(log2(max(len(old), len(new)))) + 1),
  capped at 31; the decoder gets the same dictionary and `max_window_size` = 2**window_log computed
  from len(old) and the frame's content size. One row per `--zstd-levels` level (19 and 3 by default),
  and `3t`, "-3 big-tables": level 3 with hash_log = chain_log = window_log - 1. python-zstandard loads
  the dictionary as a CDict (ZSTD_CCtx_loadDictionary), whose content is indexed only by the level's own
  match-finder tables, not by long-distance matching (that needs ZSTD_CCtx_refPrefix, which the zstd CLI
  uses for --patch-from and python-zstandard does not offer); level 3's tables (2**17 slots) miss most of
  a multi-MB dictionary, big-tables gives the fast level a slot per ~2 bytes of window.
- `detools-lzma`, `detools-heatshrink`: `detools.create_patch(ffrom, fto, fpatch, compression=...)` /
  `detools.apply_patch(ffrom, fpatch, fto)` on file objects (sequential patch, bsdiff algorithm,
  divsufsort), detools' defaults otherwise (heatshrink window 2**8, lookahead 2**7).
- `full-lzma` (a reference, not a delta): `lzma.compress(new)` (xz preset 6) alone, what a device would
  download without any delta; "apply" is `lzma.decompress(patch)`.

Inputs: `--pair OLD NEW` (repeatable); `--fetch` adds the default real pairs, downloaded once into
`--cache` (/tmp/delta-inputs): `cryptography` 46.0.4 -> 46.0.5 `_rust.abi3.so` (Rust, ~12 MB, from the
manylinux2014 x86_64 abi3 wheels through `pip download`) and Debian bookworm's `libcrypto.so.3` from
`libssl3` 3.0.20-1~deb12u2 -> 3.0.22-1~deb12u2 (C, ~4.5 MB, `apt-get download`; when the archive no
longer has those versions or apt-get is missing, `pydantic-core` 2.41.4 -> 2.41.5's
`_pydantic_core.cpython-311-x86_64-linux-gnu.so` wheels instead), and, near the server's 64 MiB bound,
`duckdb` 1.1.2 -> 1.1.3's `duckdb.cpython-311-x86_64-linux-gnu.so` (C++, ~60 MiB; `--no-large` leaves it
out). `--synthetic` adds 16 MiB of seeded
random bytes and the same image with its middle byte flipped.

What each figure is, and what limits it:
- patch: bytes of the patch file and its size as % of the new image. The size of real pairs is set by how
  much of the code moved (relative addresses change all over an ELF when one function grows: bsdiff's
  "diff" stream and detools' data-format-free mode pay for each changed displacement); the synthetic pair
  checks that an algorithm finds a 1-byte change in 16 MiB of incompressible data (a good one: ~0 %).
- make s / apply s: wall time of one run in a fresh child process, from reading the input files (in the
  page cache: the script reads them first) to the output file written; one core (no algorithm here
  uses threads; the JSON has the CPU time too: wall time above it means the machine was busy).
  Interpreter start and imports are not counted. Single runs: expect a few % of noise.
- make MiB / apply MiB: the child's peak resident memory above its own resident memory after the
  imports, i.e. VmHWM - VmRSS(baseline) from /proc/self/status. VmHWM belongs to the child's own address
  space, which exec made fresh; `getrusage(...).ru_maxrss` is not used for the figure because Linux
  carries the parent's high-water mark into a child across fork/vfork + exec (a child of a 300 MB
  process reports >= 300 MB), so a baseline subtraction on ru_maxrss can hide the child's own peak
  (the JSON keeps it as `ru_maxrss_mib`). The figure includes the inputs and outputs held in memory as
  each API needs them: bsdiff4, zstd and lzma take and return bytes (make holds old + new + patch,
  apply old + patch + new), detools streams files (its make reads both files into memory; its apply
  keeps only its decoder state and buffers). So the apply figures of bsdiff4 and zstd-patch are those
  of this host-side Python process; a device-side streaming decoder needs less (see bench/RESULTS.md,
  "Delta algorithms").
- every apply is checked: the parent hashes the rebuilt file and stops with an error (exit 1) unless its
  sha256 is the new image's.
Each child has a time bound (`--timeout`, 300 s); a run cut by it is reported as a timeout.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20
DEFAULT_CACHE = Path("/tmp/delta-inputs")
ALGORITHMS = ("bsdiff4", "zstd-patch", "detools-lzma", "detools-heatshrink", "full-lzma")
LIBRARY = {  # algorithm -> (import name, distribution name)
    "bsdiff4": ("bsdiff4", "bsdiff4"),
    "zstd-patch": ("zstandard", "zstandard"),
    "detools-lzma": ("detools", "detools"),
    "detools-heatshrink": ("heatshrink2", "detools"),  # detools' heatshrink codec is the heatshrink2 package
    "full-lzma": ("lzma", ""),
}
SYNTHETIC_SIZE = 16 * MIB
SYNTHETIC_SEED = 20261203

# The default real pairs (`--fetch`): (label, kind, package, old version, new version, file in the package).
WHEEL_PAIR = (
    "cryptography 46.0.4 -> 46.0.5, _rust.abi3.so",
    "wheel",
    "cryptography",
    "46.0.4",
    "46.0.5",
    "cryptography/hazmat/bindings/_rust.abi3.so",
)
DEBIAN_PAIR = (
    "Debian libssl3 3.0.20-1~deb12u2 -> 3.0.22-1~deb12u2, libcrypto.so.3",
    "deb",
    "libssl3",
    "3.0.20-1~deb12u2",
    "3.0.22-1~deb12u2",
    "usr/lib/x86_64-linux-gnu/libcrypto.so.3",
)
LARGE_PAIR = (  # an image near the server's 64 MiB bound
    "duckdb 1.1.2 -> 1.1.3, duckdb.cpython-311.so",
    "wheel",
    "duckdb",
    "1.1.2",
    "1.1.3",
    "duckdb/duckdb.cpython-311-x86_64-linux-gnu.so",
)
FALLBACK_PAIR = (
    "pydantic-core 2.41.4 -> 2.41.5, _pydantic_core.so",
    "wheel",
    "pydantic-core",
    "2.41.4",
    "2.41.5",
    "pydantic_core/_pydantic_core.cpython-311-x86_64-linux-gnu.so",
)


def log(msg: str) -> None:
    print(f"delta: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs


@dataclass
class Pair:
    label: str
    old: Path
    new: Path
    old_size: int = 0
    new_size: int = 0
    new_sha256: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)

    def load(self) -> None:
        self.old_size = self.old.stat().st_size
        self.new_size = self.new.stat().st_size
        sha256(self.old)  # also brings both files into the page cache before anything is timed
        self.new_sha256 = sha256(self.new)


def sha256(path: Path) -> str:
    """Streamed, so that the parent stays small (its peak must not matter, and its RSS is not measured)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def _fetch_wheel(cache: Path, package: str, version: str, member: str) -> Path:
    out = cache / f"{package}-{version}" / Path(member).name
    if out.exists():
        return out
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--platform", "manylinux2014_x86_64", "--python-version", "3.11", f"{package}=={version}", "-d", str(dl)]
    log(f"fetching {package}=={version} (pip download)")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    stem = package.replace("-", "_")
    wheels = sorted(dl.glob(f"{stem}-{version}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download left no {stem}-{version}-*.whl in {dl}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(f"{out}.part", "wb") as dst:
        shutil.copyfileobj(src, dst, MIB)
    os.replace(f"{out}.part", out)
    return out


def _fetch_deb(cache: Path, package: str, version: str, member: str) -> Path:
    out = cache / f"{package}-{version}" / Path(member).name
    if out.exists():
        return out
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RuntimeError("no apt-get / dpkg-deb here")
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    log(f"fetching {package}={version} (apt-get download)")
    proc = subprocess.run(
        ["apt-get", "download", "-q", f"{package}={version}"], cwd=dl, capture_output=True, text=True, check=False
    )
    debs = sorted(dl.glob(f"{package}_*{version.split(':')[-1]}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download {package}={version} failed: {proc.stderr.strip()[-300:]}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), tmp], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / member, f"{out}.part")
    os.replace(f"{out}.part", out)
    return out


def fetch_pair(cache: Path, spec: tuple[str, str, str, str, str, str]) -> Pair:
    label, kind, package, old_v, new_v, member = spec
    fetch = _fetch_wheel if kind == "wheel" else _fetch_deb
    return Pair(label, fetch(cache, package, old_v, member), fetch(cache, package, new_v, member))


def default_pairs(cache: Path, large: bool = True) -> list[Pair]:
    pairs = [fetch_pair(cache, WHEEL_PAIR)]
    try:
        pairs.append(fetch_pair(cache, DEBIAN_PAIR))
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        log(f"Debian pair unavailable ({exc}); using {FALLBACK_PAIR[0]} instead")
        pairs.append(fetch_pair(cache, FALLBACK_PAIR))
    if large:
        pairs.append(fetch_pair(cache, LARGE_PAIR))
    return pairs


def synthetic_pair(cache: Path, size: int = SYNTHETIC_SIZE, seed: int = SYNTHETIC_SEED) -> Pair:
    """`size` seeded random bytes, and the same with the middle byte flipped (written once, then reused)."""
    name = f"synthetic-{size // MIB}MiB-seed{seed}"
    old, new = cache / f"{name}.old", cache / f"{name}.new"
    if not (old.exists() and new.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        data = bytearray(random.Random(seed).randbytes(size))
        old.write_bytes(data)
        data[size // 2] ^= 0xFF
        new.write_bytes(data)
    return Pair(f"synthetic {size // MIB} MiB random, 1 byte changed", old, new)


# ---------------------------------------------------------------- the work of one child process


def zstd_window_log(old_size: int, new_size: int, level_default: int) -> int:
    """What `zstd --patch-from` does: a window that covers the whole old image (the dictionary) and more."""
    need = math.ceil(math.log2(max(old_size, new_size, 2))) + 1
    return min(31, max(level_default, need))


def _proc_status_bytes(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _zstd_make(zstd: Any, old: bytes, new: bytes, level: int, big_tables: bool) -> bytes:
    default = zstd.ZstdCompressionParameters.from_level(level, source_size=len(new), dict_size=len(old))
    window_log = zstd_window_log(len(old), len(new), default.window_log)
    extra = {}
    if big_tables:  # match-finder tables sized to the window (the level's own are sized for its speed)
        extra = {"hash_log": min(30, window_log - 1), "chain_log": min(30, window_log - 1)}
    params = zstd.ZstdCompressionParameters.from_level(
        level,
        source_size=len(new),
        dict_size=len(old),
        window_log=window_log,
        enable_ldm=1,
        write_content_size=1,
        write_checksum=1,
        **extra,
    )
    dictionary = zstd.ZstdCompressionDict(old, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    return bytes(zstd.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(new))


def _zstd_apply(zstd: Any, old: bytes, patch: bytes) -> bytes:
    frame = zstd.get_frame_parameters(patch)
    window_log = zstd_window_log(len(old), frame.content_size, 10)
    dictionary = zstd.ZstdCompressionDict(old, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    dctx = zstd.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << window_log)
    return bytes(dctx.decompress(patch))


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Make or apply once; returns the time, CPU time and memory figures (see the module docstring)."""
    algo, op = spec["algorithm"], spec["op"]
    src, aux, out = Path(spec["src"]), Path(spec["aux"]), Path(spec["out"])  # src = old; aux = new or patch
    mod: Any = __import__(LIBRARY[algo][0])
    if algo.startswith("detools"):
        import detools

        mod = detools
    baseline = _proc_status_bytes("VmRSS")
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if algo.startswith("detools"):
        compression = algo.removeprefix("detools-")
        with open(src, "rb") as ffrom, open(aux, "rb") as fin, open(out, "wb") as fout:
            if op == "make":
                mod.create_patch(ffrom, fin, fout, compression=compression)
            else:
                mod.apply_patch(ffrom, fin, fout)
    else:
        old, data = src.read_bytes(), aux.read_bytes()
        if algo == "bsdiff4":
            result = mod.diff(old, data) if op == "make" else mod.patch(old, data)
        elif algo == "zstd-patch":
            if op == "make":
                result = _zstd_make(mod, old, data, int(spec["level"]), bool(spec["big_tables"]))
            else:
                result = _zstd_apply(mod, old, data)
        elif algo == "full-lzma":
            result = mod.compress(data) if op == "make" else mod.decompress(data)
        else:
            raise ValueError(f"unknown algorithm {algo}")
        out.write_bytes(result)
        del old, data, result
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = _proc_status_bytes("VmHWM")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_mib": (peak - baseline) / MIB,
        "baseline_mib": baseline / MIB,
        "ru_maxrss_mib": r1.ru_maxrss / 1024,
        "out_size": out.stat().st_size,
    }


# ---------------------------------------------------------------- the parent


@dataclass(frozen=True)
class Variant:
    algorithm: str
    level: int | None = None
    big_tables: bool = False

    @property
    def name(self) -> str:
        if self.level is None:
            return self.algorithm
        return f"{self.algorithm} -{self.level}" + (" big-tables" if self.big_tables else "")


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One make or apply in a fresh interpreter; {"error": ...} when it failed or ran out of time."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:g} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"failed: {last[:200]}"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def missing_library(algo: str) -> str | None:
    name = LIBRARY[algo][0]
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if algo.startswith("detools") and importlib.util.find_spec("detools") is None:
        return "detools not installed"
    return None if found else f"{name} not installed"


def bench_pair(pair: Pair, variants: list[Variant], work: Path, timeout: float) -> None:
    for v in variants:
        row: dict[str, Any] = {"algorithm": v.algorithm, "level": v.level, "big_tables": v.big_tables, "name": v.name}
        pair.results.append(row)
        missing = missing_library(v.algorithm)
        if missing:
            row["error"] = missing
            log(f"{pair.label}: {v.name}: {missing}")
            continue
        tag = v.name.replace(" ", "_")
        patch, rebuilt = work / f"{tag}.patch", work / f"{tag}.rebuilt"
        base = {"algorithm": v.algorithm, "level": v.level, "big_tables": v.big_tables}
        log(f"{pair.label}: {v.name}: make")
        make = run_child({**base, "op": "make", "src": str(pair.old), "aux": str(pair.new), "out": str(patch)}, timeout)
        row["make"] = make
        if "error" in make:
            row["error"] = f"make {make['error']}"
            continue
        row["patch_size"] = patch.stat().st_size
        row["patch_pct"] = 100.0 * row["patch_size"] / pair.new_size
        log(f"{pair.label}: {v.name}: apply ({row['patch_size']:,} B patch)")
        spec = {**base, "op": "apply", "src": str(pair.old), "aux": str(patch), "out": str(rebuilt)}
        applied = run_child(spec, timeout)
        row["apply"] = applied
        if "error" in applied:
            row["error"] = f"apply {applied['error']}"
            continue
        got = sha256(rebuilt)
        if got != pair.new_sha256:
            raise SystemExit(
                f"delta: FAILED: {v.name} on {pair.label}: apply did not rebuild the new image "
                f"(sha256 {got} != {pair.new_sha256}; patch {patch}, output {rebuilt})"
            )
        row["verified"] = True
        patch.unlink()
        rebuilt.unlink()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("bsdiff4", "zstandard", "detools", "heatshrink2"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release()}


# ---------------------------------------------------------------- the table


def _fmt_s(fig: dict[str, Any] | None) -> str:
    return "—" if not fig or "error" in fig else f"{fig['seconds']:.2f}"


def _fmt_mib(fig: dict[str, Any] | None) -> str:
    return "—" if not fig or "error" in fig else f"{fig['peak_mib']:,.1f}"


def _fmt_pct(pct: float) -> str:
    return f"{pct:.2f} %" if pct >= 0.1 else f"{pct:.4f} %"


def table(pairs: list[Pair]) -> str:
    head = ["algorithm", "patch B", "% of new", "make s", "make MiB", "apply s", "apply MiB"]
    lines: list[str] = []
    for pair in pairs:
        rows = [head]
        notes: list[str] = []
        for r in pair.results:
            if "patch_size" in r:
                size, pct = f"{r['patch_size']:,}", _fmt_pct(r["patch_pct"])
            else:
                size, pct = "—", "—"
            name = r["name"] + (" (ref.)" if r["algorithm"] == "full-lzma" else "")
            rows.append([name, size, pct, _fmt_s(r.get("make")), _fmt_mib(r.get("make"))])
            rows[-1] += [_fmt_s(r.get("apply")), _fmt_mib(r.get("apply"))]
            if "error" in r:
                notes.append(f"{r['name']}: {r['error']}")
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines.append(f"{pair.label}: old {pair.old_size:,} B, new {pair.new_size:,} B")
        lines.append("")
        for n, row in enumerate(rows):
            cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
            lines.append("| " + " | ".join(cells) + " |")
            if n == 0:
                lines.append("|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
        lines += [f"- {n}" for n in notes]
        lines.append("")
    if any(r.get("big_tables") for p in pairs for r in p.results):
        lines.append("big-tables = hash_log = chain_log = window_log - 1 (see the docstring).")
    lines.append("MiB = peak RSS of a fresh child above its RSS after imports (inputs/outputs in memory included).")
    checked = sum(1 for p in pairs for r in p.results if r.get("verified"))
    lines.append(f"{checked} applies, each checked: it rebuilt the new image exactly (sha256).")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    first = (__doc__ or "").split("\n", 1)[0]
    p = argparse.ArgumentParser(prog="python bench/delta_algorithms.py", description=first)
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("OLD", "NEW"), help="an image pair")
    p.add_argument("--fetch", action="store_true", help="add the default real pairs (downloaded into --cache once)")
    p.add_argument("--no-large", action="store_true", help="with --fetch: leave out the ~60 MiB duckdb pair")
    p.add_argument("--synthetic", action="store_true", help="add 16 MiB of seeded random bytes and a 1-byte change")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"inputs cache [{DEFAULT_CACHE}]")
    p.add_argument("--only", default=",".join(ALGORITHMS), help=f"comma-separated algorithms [{','.join(ALGORITHMS)}]")
    p.add_argument(
        "--zstd-levels",
        default="19,3,3t",
        help="zstd-patch levels, a row each; suffix 't': big-tables (hash_log = chain_log = window_log - 1) [19,3,3t]",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="bound of each make or apply, seconds [300]")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': JSON on stdout, no table)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    only = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = set(only) - set(ALGORITHMS)
    if unknown:
        p.error(f"unknown algorithm(s) {sorted(unknown)}; choose from {','.join(ALGORITHMS)}")
    levels: list[tuple[int, bool]] = []
    for item in (x.strip() for x in args.zstd_levels.split(",")):
        if item:
            try:
                levels.append((int(item.removesuffix("t")), item.endswith("t")))
            except ValueError:
                p.error(f"--zstd-levels: {item!r} is not a level (e.g. 19 or 3t)")
    args.variants = [
        v
        for a in ALGORITHMS
        if a in only
        for v in ([Variant(a, lv, big) for lv, big in levels] if a == "zstd-patch" else [Variant(a)])
    ]
    if not (args.pair or args.fetch or args.synthetic):
        p.error("no input: give --pair OLD NEW, --fetch and/or --synthetic")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    started = time.monotonic()
    pairs = [Pair(f"{Path(o).name} -> {Path(n).name}", Path(o), Path(n)) for o, n in args.pair]
    if args.fetch:
        pairs += default_pairs(args.cache, large=not args.no_large)
    if args.synthetic:
        pairs.append(synthetic_pair(args.cache))
    for pair in pairs:
        pair.load()
    with tempfile.TemporaryDirectory(prefix="delta-bench-") as tmp:
        for pair in pairs:
            bench_pair(pair, args.variants, Path(tmp), args.timeout)
    elapsed = time.monotonic() - started
    vers = versions()
    result = {
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(elapsed, 1),
        "machine": machine(),
        "versions": vers,
        "pairs": [
            {
                "label": p.label,
                "old": str(p.old),
                "new": str(p.new),
                "old_size": p.old_size,
                "new_size": p.new_size,
                "new_sha256": p.new_sha256,
                "results": p.results,
            }
            for p in pairs
        ],
    }
    if args.json == "-":
        print(json.dumps(result, indent=2))
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    libs = ", ".join(f"{k} {v}" for k, v in vers.items())
    print(f"{table(pairs)}\n{libs}; {machine()['cpus']} CPUs; run time {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
