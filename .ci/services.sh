#!/usr/bin/env bash
# Starts the local services the integration tests talk to, when they are not running.
# (CI machines start PostgreSQL, Redis and NATS before the run; this makes the script
# self-sufficient on a machine where one of them stopped.)
set -uo pipefail

up() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

wait_up() {
  for _ in $(seq 1 50); do up "$2" && { echo "$1: up on $2"; return 0; }; sleep 0.2; done
  echo "$1: NOT reachable on port $2" >&2; return 1
}

if ! up 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
wait_up postgresql 5432

if ! up 6379; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi
wait_up redis 6379

if ! up 4222; then
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
fi
wait_up nats 4222

# InfluxDB 1.x and promtool come from Debian's packages; install them when missing.
if ! command -v influxd >/dev/null || ! command -v promtool >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq influxdb prometheus >/dev/null
fi
# The packages may start their Debian services; we run our own loopback instance instead.
for svc in influxdb prometheus; do
  (systemctl stop "$svc" || service "$svc" stop) >/dev/null 2>&1 || true
done
pkill -f '^/usr/bin/prometheus' >/dev/null 2>&1 || true
