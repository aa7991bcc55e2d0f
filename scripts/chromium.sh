#!/usr/bin/env bash
# Headless Chromium for the test that renders report.html (Debian's `chromium` package).
#
#   scripts/chromium.sh    # installs it with apt-get when missing (root + Debian/Ubuntu)
#
# Exits 0 when a chromium binary is on PATH afterwards, 1 otherwise; progress on stderr.
set -euo pipefail

log() { echo "chromium.sh: $*" >&2; }

for exe in chromium chromium-browser google-chrome; do
    if command -v "$exe" >/dev/null 2>&1; then
        exit 0
    fi
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "chromium is not installed and cannot be installed here (needs root + apt-get)"
    exit 1
fi
log "installing chromium with apt-get ..."
export DEBIAN_FRONTEND=noninteractive
# the package lists may be stale or absent on a fresh machine: update once if install fails
apt-get install -y -qq --no-install-recommends chromium >&2 \
    || { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends chromium >&2; }
command -v chromium >/dev/null 2>&1 || { log "no chromium after installing it"; exit 1; }
