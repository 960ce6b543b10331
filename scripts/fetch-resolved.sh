#!/usr/bin/env bash
# Unpack Debian's systemd-resolved into a cache folder without installing it, for the tests that run
# it inside a network namespace of their own. Not `apt-get install`: the package turns
# /etc/resolv.conf into a link to resolved's stub, and a machine that does not boot systemd (a CI
# container) would have no DNS left. The version is the installed systemd's: resolved links its
# private library. Prints the path of the binary.
set -euo pipefail
cache="${HOSTMESH_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.cache}"
version=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null) \
  || { echo "fetch-resolved: the systemd package is not installed" >&2; exit 1; }
dest="$cache/systemd-resolved/$version"
bin="$dest/lib/systemd/systemd-resolved"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
download() { (cd "$tmp" && apt-get -qq -o APT::Sandbox::User=root download "systemd-resolved=$version" >&2); }
if ! download; then
  [ "$(id -u)" = 0 ] || { echo "fetch-resolved: systemd-resolved=$version not in the apt lists (apt-get update as root)" >&2; exit 1; }
  apt-get update -qq >&2
  download || { echo "fetch-resolved: systemd-resolved=$version is not in the machine's apt sources" >&2; exit 1; }
fi
mkdir -p "$dest"
dpkg-deb -x "$tmp"/systemd-resolved_*.deb "$dest"
[ -x "$bin" ] || { echo "fetch-resolved: $bin missing after unpacking" >&2; exit 1; }
echo "$bin"
