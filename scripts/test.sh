#!/usr/bin/env bash
# The test suite: unit tests on tiny random Llama models plus integration tests on the embedded
# model, the shipped data and the DeepSpeed launcher. Extra arguments go to pytest (e.g. -k obs).
source "$(dirname "$0")/_env.sh"
set +e
"$PY" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
