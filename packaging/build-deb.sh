#!/usr/bin/env bash
# Builds the Debian package from a release binary with dpkg-deb (no debhelper) and prints the
# .deb's path. `make deb` runs it after the static release build.
#
#   packaging/build-deb.sh BINARY OUTPUT_DIR
#
# The package version is the changelog's top entry (packaging/debian/changelog); its upstream
# part must be what the binary's --version says. Its date is SOURCE_DATE_EPOCH: every file in
# the package carries it, so the same inputs give the same .deb.
set -euo pipefail

binary=${1:?usage: build-deb.sh BINARY OUTPUT_DIR}
output=${2:?usage: build-deb.sh BINARY OUTPUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
debian=$here/debian
umask 022

version=$("$binary" --version)
changelog=$debian/changelog
package_version=$(sed -n '1s/^holdfast (\([^)]*\)) .*/\1/p' "$changelog")
if [[ ${package_version%-*} != "$version" ]]; then
    echo "error: packaging/debian/changelog's top entry is $package_version but the binary is $version: add an entry" >&2
    exit 1
fi
maintainer=$(sed -n 's/^ -- \(.*>\)  .*$/\1/p' "$changelog" | head -n 1)
released=$(sed -n 's/^ -- .*>  \(.*\)$/\1/p' "$changelog" | head -n 1)
export SOURCE_DATE_EPOCH
SOURCE_DATE_EPOCH=$(date -d "$released" +%s)
architecture=$(dpkg --print-architecture)

work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/holdfast
doc=$root/usr/share/doc/holdfast

install -d "$root/DEBIAN" "$root/usr/bin" "$root/etc/holdfast" "$root/etc/needrestart/conf.d" "$root/usr/lib/systemd/system" \
    "$root/usr/share/man/man1" "$doc" "$root/usr/share/lintian/overrides" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
# Debug info and symbol tables are not shipped (Swift's reflection metadata lives in allocated
# sections, which strip keeps).
install -m 0755 "$binary" "$root/usr/bin/holdfast"
strip --remove-section=.comment --remove-section=.note "$root/usr/bin/holdfast"
install -m 0644 "$top/config/holdfast.yaml" "$root/etc/holdfast/holdfast.yaml"
# needrestart never restarts the daemon (a restart ends every container): see the file.
install -m 0644 "$here/needrestart/holdfast.conf" "$root/etc/needrestart/conf.d/holdfast.conf"
install -m 0644 "$here/holdfast.service" "$root/usr/lib/systemd/system/holdfast.service"
sed "s/@VERSION@/$version/" "$here/holdfast.1" | gzip -9n > "$root/usr/share/man/man1/holdfast.1.gz"
install -m 0644 "$debian/copyright" "$doc/copyright"
gzip -9n < "$changelog" > "$doc/changelog.Debian.gz"
install -m 0644 "$debian/lintian-overrides" "$root/usr/share/lintian/overrides/holdfast"
# Shell completions, as swift-argument-parser generates them from the binary's own commands and
# options (so they cannot drift from it), where each shell looks for a package's.
# (bash's is sourced, not run: no #! line, which lintian flags.)
"$binary" --generate-completion-script bash | sed '1{/^#!/d}' > "$root/usr/share/bash-completion/completions/holdfast"
"$binary" --generate-completion-script zsh > "$root/usr/share/zsh/vendor-completions/_holdfast"
"$binary" --generate-completion-script fish > "$root/usr/share/fish/vendor_completions.d/holdfast.fish"
chmod 0644 "$root/usr/share/bash-completion/completions/holdfast" "$root/usr/share/zsh/vendor-completions/_holdfast" \
    "$root/usr/share/fish/vendor_completions.d/holdfast.fish"

# Depends: the shared libraries the binary loads, as dpkg-shlibdeps resolves them (it wants a
# debian/control to read), plus adduser for postinst.
mkdir "$work/debian"
printf 'Source: holdfast\n\nPackage: holdfast\nArchitecture: any\n' > "$work/debian/control"
shlibs=$(cd "$work" && dpkg-shlibdeps -O -e holdfast/usr/bin/holdfast 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[[ -n $shlibs ]] || { echo "error: dpkg-shlibdeps found no dependencies for $binary" >&2; exit 1; }
depends="adduser, $shlibs"
installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)

sed -e "s|@VERSION@|$package_version|" -e "s|@ARCH@|$architecture|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@DEPENDS@|$depends|" "$debian/control.in" > "$root/DEBIAN/control"
install -m 0644 "$debian/conffiles" "$root/DEBIAN/conffiles"
for script in preinst postinst prerm postrm; do install -m 0755 "$debian/$script" "$root/DEBIAN/$script"; done
# md5sums: every file but the conffiles (dpkg keeps their sums itself), as dh_md5sums does.
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\n' | LC_ALL=C sort | grep -vxF -f <(sed 's|^/||' DEBIAN/conffiles) \
    | xargs -d '\n' md5sum > DEBIAN/md5sums)
chmod 0644 "$root/DEBIAN/md5sums"

find "$root" -depth -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$output"
deb="$output/holdfast_${package_version}_${architecture}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
