#!/usr/bin/env bash
# Installs, reinstalls, removes and purges a holdfast .deb ON THIS MACHINE and checks what the
# maintainer scripts did at each step. For throwaway machines and containers (CI): it creates
# and deletes the system user 'holdfast' and /usr/bin/holdfast. `make deb-install-check`.
#
#   packaging/install-check.sh DEB
#
# Where systemd is not PID 1 (a container), the unit is enabled (its symlink recorded by
# deb-systemd-helper) but nothing is started or stopped: that part of the scripts is guarded by
# [ -d /run/systemd/system ] and is not exercised here. The live upgrade is exercised either
# way: a newer package (this one repacked with a higher version and a binary with another
# sha256) is installed over a running daemon — the unit where systemd runs, else the daemon
# started by hand, whose socket the postinst finds — while a process streams
# (packaging/upgrade-check.py). The daemon's bridge points at a Unix path nobody listens on (it
# redials; nothing dials vsock), and a bridge key is provisioned for it if there is none.
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
# Until the daemon answers on its control socket (up to 30 s).
wait_for_daemon() {
    for _ in $(seq 150); do
        /usr/bin/holdfast status --socket /run/holdfast/control.sock >/dev/null 2>&1 && return
        sleep 0.2
    done
}
# A daemon started by hand, as an image's init would (no systemd): its pid in daemon_pid, its
# output in $1.
start_daemon_by_hand() {
    HOLDFAST_BRIDGE_ADDRESS=$bridge setsid /usr/bin/holdfast daemon --config /etc/holdfast/holdfast.yaml > "$1" 2>&1 &
    daemon_pid=$!
}
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

echo "== dpkg -i a newer package over a running daemon while a process streams"
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/holdfast-install-check.XXXXXX")
dpkg-deb -R "$deb" "$work/newer"
sed -i "s/^Version: \(.*\)$/Version: \1+upgradecheck1/" "$work/newer/DEBIAN/control"
printf '\nholdfast install-check: a newer build\n' >> "$work/newer/usr/bin/holdfast"
(cd "$work/newer" && md5sum $(awk '{print $2}' DEBIAN/md5sums) > DEBIAN/md5sums.new && mv DEBIAN/md5sums.new DEBIAN/md5sums)
dpkg-deb -b --root-owner-group "$work/newer" "$work/newer.deb" >/dev/null
made_key=""
if [[ ! -e /etc/holdfast/bridge.key ]]; then
    (umask 077 && { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; } > /etc/holdfast/bridge.key)
    made_key=1
fi
bridge="unix:/run/holdfast/no-host.sock"
daemon_pid=""
if [[ -d /run/systemd/system ]]; then
    mkdir -p /run/systemd/system/holdfast.service.d
    printf '[Service]\nEnvironment=HOLDFAST_BRIDGE_ADDRESS=%s\n' "$bridge" > /run/systemd/system/holdfast.service.d/install-check.conf
    systemctl daemon-reload
    systemctl start holdfast.service
else
    start_daemon_by_hand "$work/daemon.log"
fi
wait_for_daemon
upgrade_ok=0
python3 "$here/upgrade-check.py" "$work/newer.deb" /run/holdfast || upgrade_ok=$?
# An aborted upgrade: dpkg runs the old postinst with abort-upgrade NEW once the new package
# failed to unpack, the old files back. The daemon runs that version: nothing to upgrade (it
# reloaded, and said it "now runs the new version").
upgrades() { timeout 10 holdfast status --socket /run/holdfast/control.sock 2>/dev/null | sed -n '1s/.*live upgrades: \([0-9]*\).*/\1/p'; }
upgrades_before=$(upgrades)
aborted=$(/var/lib/dpkg/info/holdfast.postinst abort-upgrade 9.9.9 2>&1) || true
check "an aborted upgrade's postinst upgrades nothing" '[[ $(upgrades) == "$upgrades_before" ]] && ! grep -q "live upgrade\|new version" <<<"$aborted"'
if [[ -n $daemon_pid ]]; then
    kill -TERM "$daemon_pid"
    wait "$daemon_pid" || true
    [[ $upgrade_ok == 0 ]] || cat "$work/daemon.log"
else
    systemctl stop holdfast.service
    rm -f /run/systemd/system/holdfast.service.d/install-check.conf
    rmdir /run/systemd/system/holdfast.service.d 2>/dev/null || true
    systemctl daemon-reload
    [[ $upgrade_ok == 0 ]] || journalctl -u holdfast --no-pager -n 200
fi
check "a newer package upgraded the running daemon live, nothing lost" '[[ $upgrade_ok == 0 ]]'
check "the newer version is installed" '[[ $(dpkg-query -W -f="\${Version}" holdfast) == *+upgradecheck1 ]]'

echo "== dpkg -r"
daemon_pid=""
if [[ ! -d /run/systemd/system ]]; then
    # A daemon the image's init started (here: by hand, with a process running): the prerm must
    # stop it before its binary goes, as systemd's stop would.
    start_daemon_by_hand "$work/daemon-remove.log"
    wait_for_daemon
fi
dpkg -r holdfast
if [[ -n $daemon_pid ]]; then
    check "the prerm stopped the daemon the image's init had started" '[[ $(sed -n "s/.*) \(.\) .*/\1/p" /proc/$daemon_pid/stat 2>/dev/null) == Z || ! -d /proc/$daemon_pid ]]'
    stopped=0
    wait "$daemon_pid" || stopped=$?
    check "it stopped in order (exit 0)" '[[ $stopped == 0 ]] || { cat "$work/daemon-remove.log"; false; }'
fi
[[ -n $made_key ]] && rm -f /etc/holdfast/bridge.key
rm -rf "$work"
check "the binary is gone" '[[ ! -e /usr/bin/holdfast ]]'
check "the configuration stays until purge" '[[ -f /etc/holdfast/holdfast.yaml ]]'
check "the user stays until purge" 'getent passwd holdfast >/dev/null'

echo "== dpkg -i after dpkg -r (a reinstallation)"
reinstall_log=$(mktemp)
dpkg -i "$deb" 2>&1 | tee "$reinstall_log"
check "the binary is back" '[[ -x /usr/bin/holdfast ]]'
check "no live upgrade was tried (nothing ran to upgrade)" '! grep -q "live upgrade" "$reinstall_log"'
check "the preinst's note is gone" '[[ ! -e /run/holdfast-package ]]'
if [[ -d /run/systemd/system ]]; then
    check "the daemon was started again, as on a first installation" 'systemctl --quiet is-active holdfast.service'
fi
rm -f "$reinstall_log"

echo "== dpkg -P"
dpkg -P holdfast
check "the configuration is gone" '[[ ! -e /etc/holdfast ]]'
check "the user is gone" '! getent passwd holdfast >/dev/null'
check "its group is gone" '! getent group holdfast >/dev/null'
check "the unit's symlink is gone" '[[ ! -e $wants && ! -L $wants ]]'
check "dpkg forgot the package" '! dpkg-query -W holdfast >/dev/null 2>&1'
echo "install-check: every check passed"
