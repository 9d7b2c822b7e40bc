#!/usr/bin/env bash
# Idempotent setup on a fresh Debian/Ubuntu: system packages, then .venv with mailgate[dev].
# Re-running is cheap: apt is touched only when a package is missing, pip only when
# pyproject.toml changed since the last install (stamp file inside .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

have_pkg() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# Find a Python >= 3.11 (pyenv shims, Debian's python3, ...).
find_python() {
    local c
    for c in python3.13 python3.12 python3.11 python3; do
        if command -v "$c" >/dev/null 2>&1 &&
            "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

missing=()
for p in postfix swaks redis-server; do
    have_pkg "$p" || missing+=("$p")
done
PY="$(find_python || true)"
if [ -z "$PY" ]; then
    missing+=(python3 python3-venv)
elif ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian splits venv/ensurepip out of the interpreter package.
    ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    missing+=("python${ver}-venv")
fi

if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}" >&2
    # "No configuration": no /etc/postfix/main.cf, no system Postfix started; tests
    # run their own private instances.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -o DPkg::Lock::Timeout=600
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${missing[@]}"
    PY="$(find_python)"
fi

# A venv whose interpreter is too old (or broken) is rebuilt.
if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "bootstrap: creating .venv with $PY" >&2
    rm -rf .venv
    "$PY" -m venv .venv
fi

stamp=.venv/.mailgate-install-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "bootstrap: pip install -e '.[dev]'" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    echo "$want" >"$stamp"
fi

# promtool, for `promtool check rules` / `promtool test rules` on deploy/prometheus/
# (tests/integration/test_deploy_files.py). Debian ships it in the prometheus package,
# whose installation would also set up and start a Prometheus server: take only the
# binary out of the .deb, into the venv.
if ! command -v promtool >/dev/null 2>&1 && [ ! -x .venv/bin/promtool ]; then
    echo "bootstrap: extracting promtool from Debian's prometheus package into .venv/bin" >&2
    tmp="$(mktemp -d)"
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -o DPkg::Lock::Timeout=600
        (cd "$tmp" && apt-get download prometheus)
    fi
    dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
    install -m 0755 "$tmp/usr/bin/promtool" .venv/bin/promtool
    rm -rf "$tmp"
fi
