#!/usr/bin/env bash
# Make sure what the test suite talks to is here: PostgreSQL and MariaDB up, Prometheus/promtool installed.
set -euo pipefail

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432 || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }
psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE test" >/dev/null

# MariaDB (tests/instrumentation/test_serverview_mariadb.py): root without a password on 127.0.0.1:3306.
if ! mysqladmin -h 127.0.0.1 -P 3306 -u root ping >/dev/null 2>&1; then
  if [ -x /etc/init.d/mariadb ]; then
    /etc/init.d/mariadb start >/dev/null || true
  fi
  for _ in $(seq 1 30); do mysqladmin -h 127.0.0.1 -P 3306 -u root ping >/dev/null 2>&1 && break; sleep 1; done
fi
mysqladmin -h 127.0.0.1 -P 3306 -u root ping >/dev/null 2>&1 \
  || { echo "MariaDB is not reachable on 127.0.0.1:3306 (root, no password)" >&2; exit 1; }

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package's own service must not run: tests start their own on 127.0.0.1 only. Where systemd
    # runs, the install started it: stop those units. Elsewhere the install started nothing (this image's
    # policy-rc.d forbids it, and --no-install-recommends leaves out prometheus-node-exporter), and we
    # never stop processes by name.
    if [ -d /run/systemd/system ]; then
      systemctl stop prometheus prometheus-node-exporter 2>/dev/null || true
    fi
  else
    echo "prometheus/promtool missing and cannot apt-get install them; those tests will fail" >&2
  fi
fi
