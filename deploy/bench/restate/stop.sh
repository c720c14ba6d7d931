#!/usr/bin/env bash
# Stops the restate-server and service started by run.sh (by pid file only).
cd "$(dirname "$0")"
for name in service restate-server; do
  f=run/$name.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  pat=$([ $name = service ] && echo 'service.mjs|restate-inline-service' || echo restate-server)
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' </proc/$pid/cmdline | grep -Eq "$pat"; then
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { echo "$name ($pid) did not exit, SIGKILL"; kill -KILL "$pid"; }
    echo "stopped $name ($pid)"
  fi
  rm -f "$f"
done
