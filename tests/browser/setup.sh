#!/usr/bin/env bash
# Browser-test prerequisites, installed only when missing:
#   - Debian's chromium (driven by Python Playwright through executable_path; never `playwright install`)
#   - axe-core (accessibility engine, a test asset only) from the npm registry, checksum-pinned,
#     unpacked to .cache/browser-assets/ (git-ignored)
set -euo pipefail
cd "$(dirname "$0")/../.."

AXE_VERSION=4.14.1
AXE_SHA256=29348999450cdf2849a8e70b7912fc2da85a849da39c0d0d5394f51d4a9ed95c
ASSETS=.cache/browser-assets

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing Debian chromium ..." >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium fonts-dejavu-core >&2
fi

axe="$ASSETS/axe-core-$AXE_VERSION.min.js"
if [ ! -f "$axe" ] || ! echo "$AXE_SHA256  $axe" | sha256sum -c --status; then
  if ! command -v npm >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends npm >&2
  fi
  echo "fetching axe-core $AXE_VERSION from the npm registry ..." >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "axe-core@$AXE_VERSION" >/dev/null && tar xzf "axe-core-$AXE_VERSION.tgz")
  mkdir -p "$ASSETS"
  cp "$tmp/package/axe.min.js" "$axe"
  echo "$AXE_SHA256  $axe" | sha256sum -c --quiet
fi
echo "browser tests ready: $(command -v chromium), $axe" >&2
