#!/usr/bin/env bash
# Installs, reinstalls, removes and purges a holdfast .deb ON THIS MACHINE and checks what the
# maintainer scripts did at each step. For throwaway machines and containers (CI): it creates
# and deletes the system user 'holdfast' and /usr/bin/holdfast. `make deb-install-check`.
#
#   packaging/install-check.sh DEB
#
# Where systemd is not PID 1 (a container), the unit is enabled (its symlink recorded by
# deb-systemd-helper) but nothing is started or stopped: that part of the scripts is guarded by
# [ -d /run/systemd/system ] and is not exercised here.
set -euo pipefail

deb=${1:?usage: install-check.sh DEB}
[[ $(id -u) == 0 ]] || { echo "install-check: needs root (dpkg -i)"; exit 1; }
if dpkg-query -W -f='${Status}' holdfast 2>/dev/null | grep -q 'ok installed'; then
    echo "install-check: holdfast is already installed here; refusing to touch it"
    exit 1
fi
if getent passwd holdfast >/dev/null; then
    echo "install-check: a user 'holdfast' exists already; refusing to delete it later"
    exit 1
fi
check() { if eval "$2"; then echo "ok: $1"; else echo "FAIL: $1 ($2)"; exit 1; fi; }
wants=/etc/systemd/system/multi-user.target.wants/holdfast.service

echo "== dpkg -i (first installation)"
dpkg -i "$deb"
check "the broker's system user exists" 'getent passwd holdfast | grep -q ":/nonexistent:/usr/sbin/nologin$"'
check "its uid is a system uid" '(( $(id -u holdfast) < 1000 ))'
check "the unit is enabled" '[[ -L $wants ]]'
check "the binary runs" '[[ $(/usr/bin/holdfast --version) == "$(dpkg-deb -f "$deb" Version | sed "s/-[^-]*$//")" ]]'
check "the shipped configuration is valid here, user included" '/usr/bin/holdfast config check /etc/holdfast/holdfast.yaml >/dev/null'
check "man holdfast opens" 'man -w holdfast >/dev/null'

echo "== dpkg -i again (an upgrade to the same version)"
echo "# a local change" >> /etc/holdfast/holdfast.yaml
dpkg -i --force-confold "$deb"
check "the user is kept" 'getent passwd holdfast >/dev/null'
check "the local change to the conffile is kept" 'grep -q "a local change" /etc/holdfast/holdfast.yaml'

echo "== dpkg -r"
dpkg -r holdfast
check "the binary is gone" '[[ ! -e /usr/bin/holdfast ]]'
check "the configuration stays until purge" '[[ -f /etc/holdfast/holdfast.yaml ]]'
check "the user stays until purge" 'getent passwd holdfast >/dev/null'

echo "== dpkg -P"
dpkg -P holdfast
check "the configuration is gone" '[[ ! -e /etc/holdfast ]]'
check "the user is gone" '! getent passwd holdfast >/dev/null'
check "its group is gone" '! getent group holdfast >/dev/null'
check "the unit's symlink is gone" '[[ ! -e $wants && ! -L $wants ]]'
check "dpkg forgot the package" '! dpkg-query -W holdfast >/dev/null 2>&1'
echo "install-check: every check passed"
