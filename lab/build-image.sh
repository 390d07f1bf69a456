#!/usr/bin/env bash
# Build (or reuse) the kernel-lab guest image of one or more Debian suites, as root.
#   lab/build-image.sh SUITE...        SUITE = bullseye (11, 5.10) | bookworm (12, 6.1) | trixie (13, 6.12) | all
# Result: $KVMTRACE_LAB_CACHE/SUITE/KEY/{rootfs.img,vmlinuz,initrd.img,manifest.txt}
# (default cache /var/cache/kvmtrace-lab). KEY hashes the recipe (lab/lib.sh, this script,
# lab/guest-requirements.txt), so an image is rebuilt only when the recipe or package set changes;
# KVMTRACE_LAB_REBUILD=1 forces a rebuild. Several suites build concurrently.
# The image: debootstrap minbase + linux-image-amd64 + matching linux-headers-amd64 (installed
# in one apt run, so the ABI matches) + python3-bpfcc + bpftool + a venv at /opt/kvmtrace-venv
# (--system-site-packages, so bcc imports) with kvmtrace's Python dependencies. kvmtrace itself
# is NOT in the image: lab/run.sh mounts the current working tree at every boot.
# Mirrors: the host's own apt sources (override MIRROR / SECURITY); the guest gets its own
# sources list inside its root; the host's apt configuration is never changed.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -ge 1 ] || { echo "usage: $0 SUITE... (or all)" >&2; exit 2; }
[ "$1" = all ] && set -- $LAB_SUITES
for s in "$@"; do lab_check_suite "$s"; done
[ "$(id -u)" = 0 ] || LAB_DIE_RC=3 lab_die "building images needs root (debootstrap, chroot)"
lab_need_host_tools debootstrap:debootstrap mkfs.ext4:e2fsprogs debugfs:e2fsprogs flock:util-linux
# debootstrap checks Debian's Release signatures (Ubuntu hosts lack the keyring)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || lab_need_host_tools lab-no-such-command:debian-archive-keyring

uris() { awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null; awk '$1=="deb"{print $2}' /etc/apt/sources.list 2>/dev/null || true; }
MIRROR=${MIRROR:-$(uris | grep -v security | head -1)}
SECURITY=${SECURITY:-$(uris | grep security | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}

# Bootstrap PID 1 baked into the image: it only mounts the per-run work disk and hands over to the
# init script on it (lab/guest-init.sh from the working tree), so editing that never rebuilds.
BOOT_INIT='#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /lab && mount -t ext4 /dev/vdb /lab && [ -x /lab/init.sh ] && exec /lab/init.sh
echo "KVMTRACE-LAB-HARNESS-ERROR no work disk (/dev/vdb) with init.sh"
echo o > /proc/sysrq-trigger; sleep 30'

build_one() {
  local suite=$1 dir key tmp R t0
  key=$(lab_key "$suite"); dir="$LAB_CACHE/$suite/$key"
  mkdir -p "$LAB_CACHE/$suite"
  exec 9>"$LAB_CACHE/$suite/.lock"; flock 9          # one builder per suite
  if [ -f "$dir/ok" ] && [ "${KVMTRACE_LAB_REBUILD:-0}" != 1 ]; then
    lab_say "$suite: cached image $dir"; return 0
  fi
  t0=$(date +%s)
  rm -rf "$LAB_CACHE/$suite"/.build.*                # leftovers of an interrupted build
  tmp="$LAB_CACHE/$suite/.build.$$"; R="$tmp/rootfs"
  mkdir -p "$tmp"
  cleanup() { umount "$R/proc" 2>/dev/null || true; umount "$R/sys" 2>/dev/null || true; }
  trap cleanup EXIT
  lab_say "$suite: debootstrap ($MIRROR) -> $tmp (log: $tmp/build.log)"
  debootstrap --variant=minbase --include=kmod,udev,initramfs-tools,ca-certificates,procps,python3,python3-venv \
    "$suite" "$R" "$MIRROR" >"$tmp/build.log" 2>&1 || { tail -20 "$tmp/build.log" >&2; lab_die "$suite: debootstrap failed"; }
  cat > "$R/etc/apt/sources.list" <<EOS
deb $MIRROR $suite main
deb $MIRROR $suite-updates main
deb $SECURITY $suite-security main
EOS
  printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"
  mount -t proc proc "$R/proc"; mount -t sysfs sys "$R/sys"
  lab_say "$suite: apt-get install kernel + headers + bcc"
  chroot "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive sh -ec '
    apt-get update -q
    apt-get install -y -q --no-install-recommends linux-image-amd64 linux-headers-amd64 python3-bpfcc
    # bpftool is optional (the cleanup checks use it when present); a mirror missing it is no failure
    apt-get install -y -q --no-install-recommends bpftool || echo "LAB-NOTE: bpftool not installable"
    apt-get clean; rm -rf /var/lib/apt/lists/*' >>"$tmp/build.log" 2>&1 \
    || { tail -20 "$tmp/build.log" >&2; lab_die "$suite: apt-get in the guest root failed"; }
  # pip inside the root: trust the host's CA bundle, run with a clean environment (PIP_* name host paths)
  cp /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/ca-certificates.crt"
  cp "$LAB_DIR/guest-requirements.txt" "$R/tmp/req.txt"
  lab_say "$suite: venv /opt/kvmtrace-venv + pip install"
  chroot "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PIP_CERT=/etc/ssl/certs/ca-certificates.crt sh -ec '
    python3 -m venv --system-site-packages /opt/kvmtrace-venv
    /opt/kvmtrace-venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir --upgrade "pip<25.3"
    /opt/kvmtrace-venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir -r /tmp/req.txt
    /opt/kvmtrace-venv/bin/python -c "import bcc, pandas, pyarrow, scipy, click, rich, matplotlib, pytest, jsonschema"
    rm -f /tmp/req.txt' >>"$tmp/build.log" 2>&1 \
    || { tail -20 "$tmp/build.log" >&2; lab_die "$suite: pip install in the guest venv failed"; }
  cleanup; trap - EXIT
  printf '%s\n' "$BOOT_INIT" > "$R/usr/local/sbin/kvmtrace-lab-init"; chmod 755 "$R/usr/local/sbin/kvmtrace-lab-init"
  mkdir -p "$R/lab"
  local kver; kver=$(ls "$R/lib/modules" | head -1)
  {
    echo "suite=$suite key=$key kernel=$kver built=$(date -u +%FT%TZ) mirror=$MIRROR"
    chroot "$R" dpkg-query -W -f='${Package}=${Version}\n' | grep -E '^(linux-image|linux-headers|python3-bpfcc|libbpfcc|bpftool|python3=|python3\.[0-9]+=)' || true
    chroot "$R" env -i PATH=/usr/bin:/bin /opt/kvmtrace-venv/bin/python -m pip freeze 2>/dev/null || true
  } > "$tmp/manifest.txt"
  cp "$R/boot/vmlinuz-$kver" "$tmp/vmlinuz"; cp "$R/boot/initrd.img-$kver" "$tmp/initrd.img"
  local mb; mb=$(du -sm "$R" | cut -f1)
  lab_say "$suite: mkfs.ext4 -d (${mb} MiB of files)"
  mkfs.ext4 -q -F -L kvmtrace-lab -d "$R" "$tmp/rootfs.img" "$((mb + 768))M" >>"$tmp/build.log" 2>&1
  rm -rf "$R"
  touch "$tmp/ok"
  rm -rf "$dir"; mv "$tmp" "$dir"
  # keep only the current key of this suite
  for old in "$LAB_CACHE/$suite"/*/; do [ "${old%/}" = "$dir" ] || rm -rf "${old%/}"; done
  lab_say "$suite: built $dir (kernel $kver) in $(( $(date +%s) - t0 )) s"
}

if [ $# = 1 ]; then build_one "$1"; exit; fi
pids=(); for s in "$@"; do ( build_one "$s" ) & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
