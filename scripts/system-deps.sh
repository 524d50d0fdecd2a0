#!/usr/bin/env bash
# System packages the test suite needs: a PostgreSQL server (tests start their own
# throwaway cluster), a Java runtime (the Spark connector test runs a local
# SparkSession) and Chromium (tests/test_ui.py drives /usr/bin/chromium with
# Playwright; Playwright's own browser downloads are not used). Installed with
# apt-get when run as root and missing.
set -euo pipefail
packages=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || packages+=(postgresql)
command -v java >/dev/null 2>&1 || packages+=(openjdk-17-jre-headless)
[ -x /usr/bin/chromium ] || packages+=(chromium)
[ ${#packages[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${packages[@]}"
else
    echo "missing system packages: ${packages[*]} (Debian: sudo apt-get install ${packages[*]})" >&2
    exit 1
fi
