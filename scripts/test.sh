#!/usr/bin/env bash
# The test suite: unit tests on tiny random Llama models plus integration tests on the embedded
# model, the shipped data and the DeepSpeed launcher. Extra arguments go to pytest (e.g. -k obs).
source "$(dirname "$0")/_env.sh"
# The embedded-model tests need several GB of temporary space at their peak (7.1 GiB in pytest's
# basetemp in a CI run on 2026-12-06, `du -sm /tmp/pytest-of-$USER` every 20 s); say so up front
# rather than let a full disk surface as an I/O error deep inside one test.
NEEDED_GIB=8
temp_dir="${TMPDIR:-/tmp}"
free_gib=$(df -Pk "$temp_dir" | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "$free_gib" -lt "$NEEDED_GIB" ]; then
    echo "warning: $temp_dir has ${free_gib} GiB free; the test suite needs about ${NEEDED_GIB} GiB there (set TMPDIR to a larger disk)" >&2
fi
set +e
"$PY" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
