#!/usr/bin/env bash
# System packages the test suite needs: a PostgreSQL server (tests start their own
# throwaway cluster). Installs with apt-get when run as root and missing.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q postgresql
else
    echo "PostgreSQL server binaries not found: install them (Debian: sudo apt-get install postgresql)" >&2
    exit 1
fi
