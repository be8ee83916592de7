#!/usr/bin/env bash
# Install everything the tests need and run the whole suite:
#   Debian peers (dcmtk, Orthanc + DICOMweb plugin, dicom3tools), the project in .venv with its
#   test group, PostgreSQL and Redis answering on 127.0.0.1; then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v storescu >/dev/null || need_apt+=(dcmtk)
command -v Orthanc >/dev/null || need_apt+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null || need_apt+=(dicom3tools)
command -v strace >/dev/null || need_apt+=(strace)  # the SCP's durability order (tests/reliability)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)  # headless browser for the OHIF check
command -v npm >/dev/null || need_apt+=(npm)  # fetches the prebuilt OHIF app
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx-core)  # the OHIF proxy config (tests/test_deploy.py)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  apt-get update -qq
  # no package's own service may start (nginx and Orthanc would take ports 80 and 4242): tests start their own
  policy_rc=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy_rc=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  if [ -n "$policy_rc" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# PostgreSQL and Redis: use the running ones, start them if they are down.
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=25.1"
.venv/bin/python -m pip install -q -e . --group test

# static checks first: they take seconds and name the line
.venv/bin/python -m ruff check infergate service workers tests models
.venv/bin/python -m mypy

set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
