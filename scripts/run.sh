#!/usr/bin/env bash
# `make run`: mailgate in the foreground in front of a private Postfix, ready for swaks.
#   client -> mailgate 127.0.0.1:2525 -> Postfix 127.0.0.1:10025 -> run/postfix/vmail/<user>/
# Ctrl-C stops mailgate, then the private Postfix.  Local policy tweaks go in
# run/local.d/*.toml (merged over run/mailgate.toml, which is rewritten on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

scripts/bootstrap.sh
scripts/ensure-redis.sh

RUN="$ROOT/run"
PF_DIR="$RUN/postfix"
PF_PORT=10025
SMTP_PORT=2525
METRICS=127.0.0.1:9464
mkdir -p "$RUN/local.d"
chmod 755 "$RUN"

pf() {
    .venv/bin/python -m tests.rig.postfix --dir "$PF_DIR" --port "$PF_PORT" "$@"
}
pf start
trap 'pf stop' EXIT

listen="\"127.0.0.1:$SMTP_PORT\""
shown="127.0.0.1:$SMTP_PORT"
if .venv/bin/python -c 'import socket; socket.socket(socket.AF_INET6).bind(("::1", 0))' 2>/dev/null; then
    listen="$listen, \"[::1]:$SMTP_PORT\""
    shown="$shown and [::1]:$SMTP_PORT"
fi

cat >"$RUN/mailgate.toml" <<TOML
# Written by scripts/run.sh on every run; put your changes in run/local.d/*.toml.
[server]
listen = [$listen]
hostname = "mailgate.localhost"
trusted_networks = []          # check local test clients too

[upstream]
address = "127.0.0.1:$PF_PORT"
xclient = true

[redis]
url = "redis://127.0.0.1:6379/0"

[metrics]
listen = "$METRICS"
TOML

cat <<INFO

  mailgate SMTP : $shown
  metrics       : http://$METRICS/metrics   (health: /healthz, /readyz)
  upstream      : private Postfix on 127.0.0.1:$PF_PORT, mail lands in $PF_DIR/vmail/<user>/new/
                  (users: bob, alice, carol @example.test)
  try           : swaks --server 127.0.0.1:$SMTP_PORT --to bob@example.test --from you@example.org

INFO

# Not exec: the EXIT trap must stop Postfix after mailgate ends.
rc=0
.venv/bin/mailgate serve --config "$RUN/mailgate.toml" || rc=$?
exit "$rc"
