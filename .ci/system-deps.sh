#!/usr/bin/env bash
# Debian packages the tests use: chromium (real-browser tests, driven by Playwright) and a
# PostgreSQL server (store tests). Installs what is missing when we may (root or sudo -n).
set -euo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else
  echo "missing Debian packages: ${need[*]} (install them: apt-get install ${need[*]})" >&2; exit 1
fi
echo "installing Debian packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get -o DPkg::Lock::Timeout=600 update -qq >/dev/null
$sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
