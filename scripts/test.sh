#!/usr/bin/env bash
# The whole check, as CI runs it: bootstrap, Redis, ruff, mypy, pytest.
# Every step runs even after a failure (one run shows all problems); exit is non-zero
# if any failed.  pytest's exit 5 (no tests collected) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh || { echo "test.sh: bootstrap failed" >&2; exit 1; }
scripts/ensure-redis.sh || { echo "test.sh: Redis unavailable" >&2; exit 1; }

failed=()
run() {
    local name="$1"
    shift
    echo "== $name: $*" >&2
    "$@"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        if [ "$name" = pytest ] && [ "$rc" -eq 5 ]; then
            echo "test.sh: pytest collected no tests" >&2
        fi
        failed+=("$name (exit $rc)")
    fi
}

# Bytecode first: with PYTHONDONTWRITEBYTECODE set (as on some CI images) nothing is
# cached, and every mailgate and CLI process the suite starts (hundreds) would compile
# filter/ again, 0.1-0.3 s each. Python reads bytecode compiled here even with that
# variable set, and checks it against the source, so a stale file is never used.
.venv/bin/python -m compileall -q filter tests/rig >/dev/null ||
    echo "test.sh: compileall failed (the tests will say why)" >&2
run ruff .venv/bin/ruff check
run mypy .venv/bin/mypy
# pytest-xdist: one worker per core, at most 4 (each worker has a Redis database and a
# slice of the port range of its own: tests/rig/workers.py). More workers than cores
# starve the tests that time clients and servers. MAILGATE_TEST_WORKERS=0 runs serially.
workers="${MAILGATE_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}"
if ! [[ "$workers" =~ ^[0-9]+$ ]]; then
    echo "test.sh: MAILGATE_TEST_WORKERS must be a number, not '$workers'" >&2
    exit 2
fi
[ "$workers" -gt 4 ] && workers=4
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers")
run pytest .venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=15 "${parallel[@]}"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "test.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "test.sh: all checks passed" >&2
