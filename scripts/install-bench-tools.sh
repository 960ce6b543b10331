#!/usr/bin/env bash
# Install the benchmark's peers and load generators from Debian's packages if they are missing:
#   nginx (backend), haproxy (peer), wrk (throughput), and a C compiler with libc's headers (gcc,
#   libc6-dev) for bench/pace.c, the fixed-rate latency client, which bench/cbuild.py builds at first use.
# Runs `apt-get update` at most once. Package maintainer scripts must not start system-wide
# nginx/haproxy services on :80 — the benchmark runs its own instances on loopback — so while
# installing we put a policy-rc.d that forbids service starts (only if the host has none).
# Prints nothing on success when everything is already there; exits non-zero with one line otherwise.
set -euo pipefail

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || need+=(gcc)
[ -e /usr/include/stdio.h ] || need+=(libc6-dev)  # gcc only recommends it; pace.c needs its headers
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "install-bench-tools: missing ${need[*]}; run as root or: sudo apt-get install ${need[*]}" >&2
  exit 1
fi

policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
echo "install-bench-tools: installing ${need[*]} from Debian's packages" >&2
log=$(mktemp)
if ! { apt-get -qq update && apt-get -qq install -y --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2; rm -f "$log"
  echo "install-bench-tools: apt-get install ${need[*]} failed" >&2
  exit 1
fi
rm -f "$log"
command -v wrk >/dev/null 2>&1 || { echo "install-bench-tools: wrk missing after install" >&2; exit 1; }
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || {
  echo "install-bench-tools: no C compiler (cc, gcc) after install" >&2; exit 1; }
