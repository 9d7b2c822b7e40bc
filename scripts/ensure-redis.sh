#!/usr/bin/env bash
# Make sure a Redis answers on 127.0.0.1:6379 (tests use db 9, `make run` db 0).
# Starts a throwaway, non-persistent server if none answers; never touches a running one.
set -euo pipefail

ping_redis() {
    redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG
}

if ping_redis; then
    exit 0
fi
echo "ensure-redis: starting redis-server on 127.0.0.1:6379" >&2
logdir="${TMPDIR:-/tmp}"
redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly no --daemonize yes \
    --dir "$logdir" --logfile "$logdir/mailgate-redis.log"
for _ in $(seq 1 100); do
    if ping_redis; then
        exit 0
    fi
    sleep 0.1
done
echo "ensure-redis: redis-server did not answer; see $logdir/mailgate-redis.log" >&2
exit 1
