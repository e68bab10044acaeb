#!/usr/bin/env bash
# Cargo's runner for test binaries under scripts/test.sh: a binary that
# hangs is ended after BHATTI_TEST_BINARY_TIMEOUT seconds (default 900) and
# counted as failed, so one stuck test cannot stall the whole run.
set -uo pipefail
limit=${BHATTI_TEST_BINARY_TIMEOUT:-900}
started=$SECONDS
timeout --kill-after=15 "$limit" "$@"
rc=$?
# One line per binary, to find where CI's time goes.
echo "test binary $(basename "$1") took $((SECONDS - started)) s (exit $rc)" >&2
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "FAILED: $(basename "$1") ran longer than ${limit}s and was ended" >&2
fi
exit "$rc"
