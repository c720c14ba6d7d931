#!/usr/bin/env bash
# usage: ./run.sh N C [keep|stop]       (default: stop both processes after the run)
# env:   WARMUP_N=2000 WARMUP_C=64 PAYMENT_SUCCESS_RATE=0.9 SHIPPING_SUCCESS_RATE=1.0 PRODUCTS=10
#        SHAPE=objects|inline|inline-rust
#                              (objects: each participant step is a Virtual Object invocation;
#                               inline: one orders/<id>/run invocation, participants as ctx.run side effects;
#                               inline-rust: the inline shape served by the Restate Rust SDK, rust-service/)
#        TUNED=0|1             (1: small single-node server settings, see README; durability untouched)
#        TUNED_PARTITIONS=2    (partition count used when TUNED=1)
set -euo pipefail
cd "$(dirname "$0")"
N=${1:?usage: run.sh N C [keep|stop]}
C=${2:?usage: run.sh N C [keep|stop]}
MODE=${3:-stop}
WARMUP_N=${WARMUP_N:-2000}
WARMUP_C=${WARMUP_C:-64}
export SHAPE=${SHAPE:-objects}
export TUNED=${TUNED:-0}
TUNED_PARTITIONS=${TUNED_PARTITIONS:-2}
case "$SHAPE" in objects|inline|inline-rust) ;; *) echo "SHAPE must be objects, inline or inline-rust" >&2; exit 1 ;; esac
# SHAPE=inline-rust: prebuilt release binary of rust-service/ (run.sh does not build it, see README)
RUST_TARGET_DIR=${RUST_TARGET_DIR:-$HOME/.cache/restate-target}   # not CARGO_TARGET_DIR on purpose
RUST_BIN=$RUST_TARGET_DIR/release/restate-inline-service
if [ "$SHAPE" = inline-rust ]; then
  build_hint="build it first: (cd rust-service && CARGO_TARGET_DIR=$RUST_TARGET_DIR cargo build --release -j 2)"
  [ -x "$RUST_BIN" ] || { echo "missing $RUST_BIN; $build_hint" >&2; exit 1; }
  if [ -n "$(find rust-service/src rust-service/Cargo.toml -newer "$RUST_BIN" 2>/dev/null)" ]; then
    echo "$RUST_BIN is older than rust-service/ sources; $build_hint" >&2; exit 1
  fi
fi
BIN=$PWD/node_modules/@restatedev/restate-server-linux-x64/bin/restate-server
ADMIN=http://127.0.0.1:19070
INGRESS=http://127.0.0.1:18080
mkdir -p run logs

./stop.sh >/dev/null 2>&1 || true
for p in 18080 19070 15122 19080; do
  if ss -ltnH "sport = :$p" | grep -q .; then echo "port $p already in use" >&2; exit 1; fi
done

# fresh data dir
rm -rf data && mkdir -p data

# Restate server: defaults everywhere except ports, base dir and telemetry (durability untouched).
# TUNED=1 adds small-single-node settings via env (RESTATE_<KEY>, '__' = nested table, '_' = '-').
# Only the partition count differs from the defaults; fsync/WAL settings are the defaults either way.
TUNED_ENV=()
if [ "$TUNED" = 1 ]; then
  TUNED_ENV=(
    RESTATE_DEFAULT_NUM_PARTITIONS="$TUNED_PARTITIONS"   # default 24: one partition processor + log each
  )
  echo "TUNED=1: ${TUNED_ENV[*]}"
fi
SERVER_ENV=(
  RESTATE_INGRESS__BIND_ADDRESS=127.0.0.1:18080
  RESTATE_ADMIN__BIND_ADDRESS=127.0.0.1:19070
  RESTATE_BIND_ADDRESS=127.0.0.1:15122
  RESTATE_ADVERTISED_ADDRESS=http://127.0.0.1:15122/
  RESTATE_DISABLE_TELEMETRY=true
  "${TUNED_ENV[@]}"
)
# what the server actually runs with (defaults + overrides), for the record
env "${SERVER_ENV[@]}" "$BIN" --base-dir "$PWD/data" --dump-config >logs/effective-config.toml 2>&1 || true

env "${SERVER_ENV[@]}" nohup "$BIN" --base-dir "$PWD/data" --no-logo >logs/restate-server.log 2>&1 </dev/null &
echo $! > run/restate-server.pid

if [ "$SHAPE" = inline-rust ]; then
  # same env as the Node service (PAYMENT_SUCCESS_RATE / SHIPPING_SUCCESS_RATE are inherited)
  RESTATE_LOGGING=${RESTATE_LOGGING:-WARN} SERVICE_PORT=19080 nohup "$RUST_BIN" >logs/service.log 2>&1 </dev/null &
else
  RESTATE_LOGGING=${RESTATE_LOGGING:-WARN} SERVICE_PORT=19080 nohup node service.mjs >logs/service.log 2>&1 </dev/null &
fi
echo $! > run/service.pid
echo "shape=$SHAPE tuned=$TUNED"
echo "restate-server pid $(cat run/restate-server.pid), service pid $(cat run/service.pid)"

wait_for() { # desc cmd...
  local desc=$1; shift
  local end=$((SECONDS + 30))
  while [ $SECONDS -lt $end ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timeout waiting for $desc" >&2; ./stop.sh; exit 1
}
wait_for "admin API"   curl -sf -m 2 $ADMIN/health
wait_for "ingress"     curl -sf -m 2 $INGRESS/restate/health
wait_for "service"     bash -c '</dev/tcp/127.0.0.1/19080'

curl -sf -m 20 -X POST $ADMIN/deployments -H 'content-type: application/json' \
     -d '{"uri":"http://127.0.0.1:19080"}' >logs/register.json
echo "registered deployment: $(grep -o '"id":"[^"]*"' logs/register.json | head -1)"
if [ "$SHAPE" != objects ]; then
  wait_for "services visible on ingress" curl -sf -m 2 -X POST $INGRESS/stockview/get -H 'content-type: application/json' -d '{"productId":"p0"}'
else
  wait_for "services visible on ingress" curl -sf -m 2 -X POST $INGRESS/inventory/p0/getStock
fi

if [ "$WARMUP_N" -gt 0 ]; then
  echo "warm-up: $WARMUP_N orders at $WARMUP_C in flight"
  QUIET=1 TAG=warm node driver.mjs "$WARMUP_N" "$WARMUP_C"
fi
echo "measurement: $N orders at $C in flight"
rc=0
TAG=m$(date +%s) node driver.mjs "$N" "$C" | tee "logs/result-$SHAPE$([ "$TUNED" = 1 ] && echo -tuned$TUNED_PARTITIONS)-N$N-C$C-$(date +%Y%m%dT%H%M%S).json" || rc=$?

if [ "$MODE" = keep ]; then
  echo "processes left running (./stop.sh to stop)"
else
  ./stop.sh
fi
exit $rc
