#!/usr/bin/env bash
# Install the Debian packages the test suite drives, if they are missing:
# Chromium (the page), redis-server (cache, broker), promtool (monitoring rules), openssl,
# wrk (the benchmark), nginx (the proxy tests: a router in front of gunicorn), PostgreSQL
# (the feedback store's server tests; its binaries live in
# /usr/lib/postgresql/<version>/bin, not on PATH).
# npm: `make check-vendor` compares the page's vendored runtime with its npm package.
# docker-compose (Debian's v1): `docker-compose config` checks docker-compose.yml, no engine needed.
set -euo pipefail

packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
command -v openssl >/dev/null 2>&1 || packages+=(openssl)
command -v wrk >/dev/null 2>&1 || packages+=(wrk)
{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 || packages+=(nginx)
command -v docker-compose >/dev/null 2>&1 || packages+=(docker-compose)
command -v npm >/dev/null 2>&1 || packages+=(npm)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || packages+=(postgresql)

if [ ${#packages[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "Please install these packages first: ${packages[*]}" >&2
  exit 1
fi
echo "Installing ${packages[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
