#!/usr/bin/env bash
# Cargo's runner for test binaries under scripts/test.sh: a binary that
# hangs is ended after BHATTI_TEST_BINARY_TIMEOUT seconds (default 900) and
# counted as failed, so one stuck test cannot stall the whole run.
set -uo pipefail
limit=${BHATTI_TEST_BINARY_TIMEOUT:-900}
timeout --kill-after=15 "$limit" "$@"
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "FAILED: $(basename "$1") ran longer than ${limit}s and was ended" >&2
fi
exit "$rc"
