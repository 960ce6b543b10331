#!/usr/bin/env bash
# Fetch the Consul binary from Debian's bullseye archive into a cache folder, without touching the
# machine's apt sources: a private sources list names the same mirror the machine already uses.
# Prints the path of the binary. A host that already has `consul` on PATH uses it as is.
set -euo pipefail
cache="${HOSTMESH_CACHE:-$(cd "$(dirname "$0")/.." && pwd)/.cache}"
bin="$cache/consul/usr/bin/consul"
if [ -n "${CONSUL_BIN:-}" ] && [ -x "$CONSUL_BIN" ]; then echo "$CONSUL_BIN"; exit 0; fi
if command -v consul >/dev/null 2>&1; then command -v consul; exit 0; fi
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi

mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror=$(awk '/^URIs:/ {for (i=2;i<=NF;i++) if ($i !~ /security/) {print $i; exit}}' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1=="deb" && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^(http|https|file):/) {print $i; exit}}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "install-consul: no Debian mirror found in the apt sources" >&2; exit 1; }

apt_dir="$cache/apt"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$cache/consul"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bullseye main" > "$apt_dir/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
          -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o APT::Sandbox::User=root)
apt-get -qq "${apt_opts[@]}" update >&2
(cd "$apt_dir/archives" && apt-get -qq "${apt_opts[@]}" download consul >&2)
deb=$(ls "$apt_dir"/archives/consul_*.deb | head -n1)
dpkg-deb -x "$deb" "$cache/consul"
[ -x "$bin" ] || { echo "install-consul: $bin missing after unpacking $deb" >&2; exit 1; }
echo "$bin"
