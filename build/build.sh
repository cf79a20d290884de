#!/usr/bin/env bash
# Build dist/otabox: the whole otabox CLI (serve and every admin command) as one executable
# that runs on a Linux machine without Python. See docs/binary.md.
#
#   build/build.sh          make/refresh build/.venv, then build dist/otabox
#
# Needs only a Python 3.11+ with venv and a shared libpython (PYTHON=..., default python3.11)
# and the package index. build/.venv is made from pyproject.toml and the pins below and
# reused while they are unchanged; PyInstaller's scratch files go to build/work.
set -euo pipefail
cd "$(dirname "$0")/.."

PYINSTALLER_VERSION=6.22.3
HOOKS_CONTRIB_VERSION=2026.9

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# Whatever environment called us (an activated virtualenv, a test run), build from our own.
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE

VENV=build/.venv
stamp="$(sha256sum pyproject.toml | cut -c1-16)-pyinstaller$PYINSTALLER_VERSION-$HOOKS_CONTRIB_VERSION"
stamp="$stamp-$("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "build.sh: setting up $VENV ..." >&2
  "$PY" -m venv --clear "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "pyinstaller==$PYINSTALLER_VERSION" "pyinstaller-hooks-contrib==$HOOKS_CONTRIB_VERSION"
  # Editable: the spec reads the sources from the checkout, and the venv stays valid while
  # only otabox/ changes. This installs otabox's runtime dependencies and nothing else.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e .
  echo "$stamp" > "$VENV/.stamp"
fi

start=$(date +%s)
"$VENV/bin/python" -m PyInstaller --noconfirm --log-level WARN \
  --distpath dist --workpath build/work build/otabox.spec
end=$(date +%s)

# A data file left out only shows at run time (template not found): check the archive now.
"$VENV/bin/python" - <<'PY'
import sys
from pathlib import Path

from PyInstaller.archive.readers import CArchiveReader

inside = set(CArchiveReader("dist/otabox").toc)
wanted = sorted(
    p.as_posix() for sub in ("templates", "static") for p in Path("otabox/server/http/console", sub).rglob("*") if p.is_file()
)
missing = [name for name in wanted if name not in inside]
if missing:
    sys.exit(f"build.sh: dist/otabox lacks {len(missing)} console files, e.g. {missing[:3]}")
if wanted:
    print(f"build.sh: {len(wanted)} console files bundled")
PY

dist/otabox --version
size=$(stat -c %s dist/otabox)
echo "build.sh: dist/otabox built in $((end - start)) s, $((size / 1024 / 1024)) MB ($size bytes)"
