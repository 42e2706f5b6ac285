#!/usr/bin/env bash
# The pusher-bridge benchmark (docs/performance.md): builds the release binary, the load
# generator and the benchmark-only no-broker build, then for each broker starts the bridge
# against the local NATS / RabbitMQ, posts signed webhooks from 32 keep-alive connections over
# loopback, verifies that every acknowledged event was stored, and prints the results table.
#
#   bench/run.sh                 # null (the ceiling), nats, amqp
#   bench/run.sh nats amqp       # a subset
#
# Environment: DURATION (measured window, default 10s), WARMUP (2s), CONNECTIONS (32),
# MAX_WEBHOOKS (1500000 per run), REPEAT (1; runs of the brokers are interleaved and the table
# shows each broker's median run), LABEL (names the rows), NATS_URL, AMQP_URL,
# BRIDGE_BIN / NULL_BRIDGE_BIN (other builds to measure, e.g. an older one),
# BENCH_NO_BUILD=1 to use the binaries as built.
# Exit code: 0 when every run was answered 2xx and stored every acknowledged event.
set -euo pipefail
cd "$(dirname "$0")/.."

brokers=("$@")
[ ${#brokers[@]} -eq 0 ] && brokers=(null nats amqp)

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
  cargo build --release --bin pusher-bridge --example loadgen
  # The no-broker build has its own target dir so it never replaces the normal binary.
  CARGO_TARGET_DIR=target/bench-null cargo build --release --features bench-null-broker \
    --bin pusher-bridge
fi

nats_url=${NATS_URL:-nats://127.0.0.1:4222}
amqp_url=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
# The broker server's pid (whoever listens on the URL's port), to report its CPU time too.
listener_pid() {
  ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true
}
nats_pid=$(listener_pid "$(sed -E 's#^.*://([^@/]*@)?[^:/]*:([0-9]+).*$#\2#' <<<"$nats_url")")
amqp_pid=$(listener_pid "$(sed -E 's#^.*://([^@/]*@)?[^:/]*:([0-9]+).*$#\2#' <<<"$amqp_url")")

mkdir -p target/bench
results="target/bench/results-$(date +%Y%m%d-%H%M%S).jsonl"
status=0
for _ in $(seq "${REPEAT:-1}"); do
  for broker in "${brokers[@]}"; do
    bin=${BRIDGE_BIN:-target/release/pusher-bridge}
    pid_args=()
    case $broker in
      null) bin=${NULL_BRIDGE_BIN:-target/bench-null/release/pusher-bridge} ;;
      nats) [ -n "$nats_pid" ] && pid_args=(--broker-pid "$nats_pid") ;;
      amqp) [ -n "$amqp_pid" ] && pid_args=(--broker-pid "$amqp_pid") ;;
    esac
    target/release/examples/loadgen run --broker "$broker" --bridge-bin "$bin" \
      --nats-url "$nats_url" --amqp-url "$amqp_url" \
      --duration "${DURATION:-10s}" --warmup "${WARMUP:-2s}" \
      --connections "${CONNECTIONS:-32}" --max-webhooks "${MAX_WEBHOOKS:-1500000}" \
      --label "${LABEL:-}" --json "$results" "${pid_args[@]}" || status=1
  done
done

echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)," \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), load average now $(cut -d' ' -f1-3 /proc/loadavg)"
echo "results: $results"
echo
target/release/examples/loadgen table "$results"
exit $status
