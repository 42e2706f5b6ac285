#!/usr/bin/env bash
# The pusher-bridge benchmark (docs/performance.md): builds the release binary, the load
# generator and the benchmark-only no-broker build, then for each broker starts the bridge
# against the local NATS / RabbitMQ, posts signed webhooks from 32 keep-alive connections over
# loopback, verifies that every acknowledged event was stored, and prints the results table.
#
#   bench/run.sh                 # null (ceiling), nats, amqp
#   bench/run.sh nats amqp       # a subset
#
# Environment: DURATION (measured window, default 10s), WARMUP (2s), CONNECTIONS (32),
# MAX_WEBHOOKS (1500000, whole run), LABEL (names the rows), NATS_URL, AMQP_URL,
# BENCH_NO_BUILD=1 to use the binaries as built.
# Exit code: 0 when every run that took place was answered 2xx and stored every event.
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

mkdir -p target/bench
results="target/bench/results-$(date +%Y%m%d-%H%M%S).jsonl"
status=0
for broker in "${brokers[@]}"; do
  bin=target/release/pusher-bridge
  [ "$broker" = null ] && bin=target/bench-null/release/pusher-bridge
  target/release/examples/loadgen run --broker "$broker" --bridge-bin "$bin" \
    --duration "${DURATION:-10s}" --warmup "${WARMUP:-2s}" \
    --connections "${CONNECTIONS:-32}" --max-webhooks "${MAX_WEBHOOKS:-1500000}" \
    --label "${LABEL:-}" --json "$results" || status=1
done

echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)," \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "results: $results"
echo
target/release/examples/loadgen table "$results"
exit $status
