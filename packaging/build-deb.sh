#!/usr/bin/env bash
# Build dist/hostmesh-<version>.tar.gz, the wheel, and dist/hostmesh_<version>_<arch>.deb.
#
# The .deb carries a self-contained virtualenv in /opt/hostmesh built on Debian's python3.11 (the
# interpreter the package depends on), the `hostmesh` wheel and every dependency, /usr/bin/hostmesh,
# the systemd units and /etc/hostmesh/agent.toml.example. No debhelper: a staging tree and dpkg-deb.
# Dependency wheels are kept in .cache/wheels so a rebuild does not download them again.
#
# Environment: PYTHON (build frontend, default .venv/bin/python), TARGET_PYTHON (default
# /usr/bin/python3.11), DIST (output folder, default dist), HOSTMESH_CACHE (default .cache),
# WHEELS_ONLY=1 (stop after the sdist, the pure wheel and the dependency wheels; prints the wheel),
# HOSTMESH_COMPILE=0 (the .deb ships the pure wheel instead of the compiled one),
# DEB_MAINTAINER ("Name <mail>" for the control file and changelog; set the real one for a release).
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
cd "$top"
py="${PYTHON:-$top/.venv/bin/python}"
target_py="${TARGET_PYTHON:-/usr/bin/python3.11}"
dist="${DIST:-$top/dist}"
cache="${HOSTMESH_CACHE:-$top/.cache}"
wheels="$cache/wheels"
prefix=/opt/hostmesh

"$top/packaging/ensure-tools.sh" dpkg-deb "$(basename "$target_py")" strip objdump
maintainer="${DEB_MAINTAINER:-hostmesh developers <hostmesh-maintainers@example.org>}"
version=$("$py" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
arch=$(dpkg --print-architecture)
mkdir -p "$dist" "$wheels"

# 1. sdist and wheel; the wheel is built from the sdist, which proves the sdist is complete.
rm -f "$dist"/hostmesh-"$version"*.whl "$dist"/hostmesh-"$version".tar.gz
# The sdist is made in the tree, whose hostmesh.egg-info/ (SOURCES.txt: the sdist's file list) setuptools
# writes meanwhile: one build at a time in a tree (`make unit` runs the packaging tests on two workers;
# tests/test_compiled_build.py takes the same lock for its sdist), or one lists what another half wrote.
# The rest of the build is each one's own (DIST, a staging tree) or safe to share (see the steps below).
mkdir -p "$top/.cache"
exec 8>"$top/.cache/source-tree.lock"
flock 8
# (No --sdist --wheel: given both, build makes the wheel in the tree, with what build/ holds.)
HOSTMESH_COMPILE=0 "$py" -m build --outdir "$dist" . >"$dist/build.log" 2>&1 ||
  { cat "$dist/build.log" >&2; exit 1; }
exec 8>&-  # the wheel is built from the sdist in a folder of build's own
wheel=$(ls "$dist"/hostmesh-"$version"-*.whl)

# 2. dependency wheels for the target interpreter, from the cache when it already has them.
# `pip wheel -w` writes the whole install set, ours included, so it writes to a folder of its own and
# only the dependencies are moved into the cache (rename: each appears whole): a pip reading the cache
# meanwhile (--find-links, tests/test_ansible.py) never finds our wheel there, come and gone.
pip_target=("$py" -m pip --disable-pip-version-check --python "$target_py")
fetched=$(mktemp -d "$cache/.wheels-fetch.XXXXXX")
trap 'rm -rf "$fetched"' EXIT
if ! "${pip_target[@]}" wheel -q --no-index --find-links "$wheels" -w "$fetched" "$wheel" >/dev/null 2>&1; then
  "${pip_target[@]}" wheel -q --find-links "$wheels" -w "$fetched" "$wheel" >&2
fi
rm -f "$fetched"/hostmesh-*.whl  # only dependencies are cached; ours is always the fresh build
find "$fetched" -maxdepth 1 -name '*.whl' -exec mv -f -t "$wheels" {} +
rm -rf "$fetched"
if [ -n "${WHEELS_ONLY:-}" ]; then echo "$wheel"; exit 0; fi  # sdist, wheel and the dependency cache

# The .deb ships the compiled build (setup.py, HOSTMESH_COMPILE=1: the L7 hot modules as C extensions;
# HOSTMESH_COMPILE=0 ships the pure wheel). It is built from the sdist by the target interpreter, so
# the extensions match the Python the package depends on; a compiler and that Python's headers are
# needed (installed here when missing, as root). packaging/compiled_wheel.py keeps the wheel in
# .cache/compiled-wheels under a hash of the sdist's sources and the target: an unchanged source does
# not compile again, and the wheel bench/compiled.py built for the same target (tests/test_compiled_build.py
# in `make unit`) is reused. It says on stderr which it did.
if [ "${HOSTMESH_COMPILE:-1}" = 1 ]; then
  "$top/packaging/ensure-tools.sh" gcc "$(basename "$target_py")-config"
  compiled=$("$py" "$top/packaging/compiled_wheel.py" "$dist/hostmesh-$version.tar.gz" "$target_py" \
    "$cache/compiled-wheels")
  cp "$compiled" "$dist/"
  wheel="$dist/$(basename "$compiled")"
fi

# 3. the virtualenv, built in a staging tree and then pointed at its installed location.
stage=$(mktemp -d "${TMPDIR:-/tmp}/hostmesh-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
venv="$root$prefix"
mkdir -p "$root"
"$target_py" -m venv --without-pip "$venv"
"$py" -m pip --disable-pip-version-check --python "$venv/bin/python" install -q --no-compile \
  --no-index --find-links "$wheels" "$wheel"
# Scripts and activate files name the staging path; rewrite it to the installed one.
grep -rlI --null -- "$venv" "$venv" | xargs -0 -r sed -i "s|$venv|$prefix|g"
sed -i '/^command = /d' "$venv/pyvenv.cfg"
find "$venv" -name '__pycache__' -prune -exec rm -rf {} +
# Debian's rules for shipped objects and library files: stripped shared objects (debug info is
# ~60 % of their size), no executable bit or #! line on modules that are imported, never run.
find "$venv" -name '*.so' -type f -exec strip --strip-unneeded --remove-section=.comment --remove-section=.note {} +
site="$venv/lib/python3.11/site-packages"
find "$site" -name '*.py' -type f -perm /111 -exec chmod a-x {} +
# Packaging metadata that some wheels ship executable (protobuf's dist-info LICENSE, WHEEL): data.
find "$site" -path '*.dist-info/*' -type f -perm /111 -exec chmod a-x {} +
{ grep -rlI --include='*.py' -m1 '^#!' "$site" || true; } | while read -r f; do
  if head -n1 "$f" | grep -q '^#!'; then sed -i '1d' "$f"; fi
done
rm -rf "$venv"/bin/Activate.ps1 "$venv"/lib/python3.11/site-packages/*.dist-info/RECORD.jws
# Byte-compile as installed (shipped, so dpkg tracks and removes the .pyc files).
"$target_py" -m compileall -q -j 0 -s "$root" -p / "$venv/lib" >/dev/null
if grep -rlI -- "$stage" "$venv" | grep -q .; then
  echo "build-deb: staging path leaked into:" >&2; grep -rlI -- "$stage" "$venv" >&2; exit 1
fi

# 4. the rest of the file system.
install -d "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/hostmesh" "$root/usr/share/doc/hostmesh"
ln -s "$prefix/bin/hostmesh" "$root/usr/bin/hostmesh"
install -m 0644 systemd/hostmesh-agent.service systemd/hostmesh-ca.service "$root/lib/systemd/system/"
install -m 0644 packaging/agent.toml.example "$root/etc/hostmesh/agent.toml.example"
[ -f README.md ] && install -m 0644 README.md "$root/usr/share/doc/hostmesh/README.md"
# split-DNS drop-ins for mesh names: examples to copy into the host's resolver config, not installed live
install -d "$root/usr/share/doc/hostmesh/dns"
install -m 0644 packaging/dns/* "$root/usr/share/doc/hostmesh/dns/"
# The operator's reference (docs/, generated parts included) and the examples it points to.
doc="$root/usr/share/doc/hostmesh"
cp -r docs "$doc/docs" && cp -r examples "$doc/examples"
rm -rf "$doc/docs/man" "$doc/docs/completion"
find "$doc" -type d -exec chmod 0755 {} + && find "$doc" -type f -exec chmod 0644 {} +
install -d "$root/usr/share/man/man1"
gzip -9n <docs/man/hostmesh.1 >"$root/usr/share/man/man1/hostmesh.1.gz"
chmod 0644 "$root/usr/share/man/man1/hostmesh.1.gz"
install -D -m 0644 docs/completion/hostmesh.bash "$root/usr/share/bash-completion/completions/hostmesh"
install -D -m 0644 docs/completion/hostmesh.zsh "$root/usr/share/zsh/vendor-completions/_hostmesh"
install -D -m 0644 docs/completion/hostmesh.fish "$root/usr/share/fish/vendor_completions.d/hostmesh.fish"

# Debian's per-package documentation: copyright, changelog, lintian overrides with their reasons.
install -m 0644 packaging/debian/copyright "$doc/copyright"
{
  printf 'hostmesh (%s) unstable; urgency=medium\n\n' "$version"
  printf '  * hostmesh %s. Changes: the git history of the repository.\n\n' "$version"
  printf ' -- %s  %s\n' "$maintainer" "$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"
install -D -m 0644 packaging/debian/lintian-overrides "$root/usr/share/lintian/overrides/hostmesh"
# The libc the shipped shared objects need: the newest GLIBC_ symbol version they reference, and
# 2.36 where one has packed relative relocations (the compiled build's, setup.py link_flags: they
# need GLIBC_ABI_DT_RELR, which names no symbol, so objdump -T does not show it).
glibc=$(find "$venv" -name '*.so' -type f -exec objdump -T {} + 2>/dev/null |
  grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
relr=$(find "$venv" -name '*.so' -type f -exec readelf -V {} + 2>/dev/null | grep -c GLIBC_ABI_DT_RELR || true)
if [ "${relr:-0}" -gt 0 ]; then
  glibc=$(printf '%s\n' "${glibc:-2.28}" 2.36 | sort -V | tail -n1)
fi

# 5. control files and the archive.
install -d "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  -e "s|@MAINTAINER@|$maintainer|" -e "s/@GLIBC@/${glibc:-2.28}/" packaging/debian/control.in \
  >"$root/DEBIAN/control"
install -m 0644 packaging/debian/conffiles "$root/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$root/DEBIAN/"
deb="$dist/hostmesh_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip -z6 --build "$root" "$deb" >/dev/null
echo "$deb"
