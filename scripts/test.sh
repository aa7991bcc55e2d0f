#!/usr/bin/env bash
# Install autohybrid with its test extras into .venv and run the whole test suite.
# This is the README's test command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch / torchvision from the machine's local wheel store (plain pip; see README).
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e '.[test]'
# A throwaway PostgreSQL server for the many-worker tests (installed if missing).
if [ -z "${AUTOHYBRID_TEST_PG:-}" ] && [ -f scripts/postgres.sh ]; then
    if pg_env=$(bash scripts/postgres.sh); then
        eval "$pg_env"
    else
        echo "warning: could not start PostgreSQL; its tests will fail in CI, skip elsewhere" >&2
    fi
fi
# Headless Chromium for the test that checks report.html draws (installed if missing).
if [ -f scripts/chromium.sh ] && ! bash scripts/chromium.sh; then
    echo "warning: no chromium; the report rendering test will fail in CI, skip elsewhere" >&2
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests (exit 5); the suite must never be empty" >&2
    exit 1
fi
exit "$rc"
