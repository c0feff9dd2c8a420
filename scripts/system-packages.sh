#!/usr/bin/env bash
# Make sure the Debian packages the tests or benchmarks need are installed.
#
#   scripts/system-packages.sh PACKAGE[:COMMAND] ...
#
# A package counts as installed when its command (default: the package name) is on PATH or in
# /usr/sbin. Missing ones are installed with apt-get when running as root; otherwise this prints the
# one line to run and exits 1. `make test` and `make bench` call it, so a fresh machine needs nothing
# done by hand.
set -euo pipefail

missing=()
for spec in "$@"; do
  package=${spec%%:*}
  command=${spec#*:}
  if ! command -v "$command" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$command" ]; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "missing system packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing system packages from Debian: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq  # a fresh machine has no package lists yet
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
