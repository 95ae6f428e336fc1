#!/usr/bin/env bash
# Starts a throw-away InfluxDB 1.x on 127.0.0.1:${1:-8086} with its data in a temp dir and prints
# its PID. Used by .ci/run for the integration tests (TRACKTRACE_TEST_INFLUX_URL).
set -euo pipefail
port=${1:-8086}
dir=$(mktemp -d /tmp/tracktrace-influx.XXXXXX)
cat > "$dir/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$((port + 2))"
[meta]
  dir = "$dir/meta"
[data]
  dir = "$dir/data"
  wal-dir = "$dir/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:$port"
  log-enabled = false
[monitor]
  store-enabled = false
CONF
influxd -config "$dir/influxdb.conf" >"$dir/influxd.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  if curl -sf "http://127.0.0.1:$port/ping" >/dev/null 2>&1; then echo "$pid"; exit 0; fi
  sleep 0.1
done
echo "influxd did not start; log:" >&2; cat "$dir/influxd.log" >&2; kill "$pid" 2>/dev/null; exit 1
