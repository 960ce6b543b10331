#!/usr/bin/env bash
# Make sure the Debian tools that the packaging and unit tests use are on this machine, installing
# the missing ones from the machine's own apt sources (Debian's packages). Usage:
#   packaging/ensure-tools.sh systemd-analyze dpkg-deb python3.11 ...
# Each argument is a command; the table below names the Debian package that provides it.
set -euo pipefail
declare -A pkg_of=(
  [systemd-analyze]=systemd
  [dpkg-deb]=dpkg
  [python3.11]=python3.11
  [adduser]=adduser
  [fakeroot]=fakeroot
  [ip]=iproute2
  [setpriv]=util-linux
  [dig]=dnsutils
  [curl]=curl
  [dnsmasq]=dnsmasq-base
  [unbound]=unbound
  [unbound-checkconf]=unbound
  [promtool]=prometheus
  [chromium]=chromium
  [lintian]=lintian
  [strip]=binutils
  [objdump]=binutils
  [debootstrap]=debootstrap
  [systemd-nspawn]=systemd-container
  [nsenter]=util-linux
  [gcc]=gcc
  [python3.11-config]=python3.11-dev  # Python.h: the compiled build (setup.py, HOSTMESH_COMPILE=1)
  [python3.12-config]=python3.12-dev
  [python3.13-config]=python3.13-dev
)
missing_packages() {
  missing=()
  for cmd in "$@"; do
    command -v "$cmd" >/dev/null 2>&1 && continue
    pkg="${pkg_of[$cmd]:-}"
    [ -n "$pkg" ] || { echo "ensure-tools: no Debian package known for '$cmd'" >&2; exit 2; }
    missing+=("$pkg")
  done
}
missing_packages "$@"
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "ensure-tools: need root to install ${missing[*]} (apt-get install ${missing[*]})" >&2
  exit 1
fi
# One dpkg user at a time: test workers (make unit runs several) may ask at once, and apt-get fails
# rather than waits while another holds dpkg's lock. tests/test_deb.py takes the same lock around
# its installs. What the holder installed is not asked for again.
exec 9>/run/lock/hostmesh-dpkg.lock
flock 9
missing_packages "$@"
[ "${#missing[@]}" -eq 0 ] && exit 0
echo "ensure-tools: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
