#!/usr/bin/env bash
# Set up kvmtrace on a Debian/Ubuntu host, as root. Installs only what is missing; re-runs are fast.
#   distro packages: python3-bpfcc (bcc), bpftool, python3-venv, kernel headers for bcc,
#                    chromium (headless, for the HTML page test only)
#   kernel headers:  linux-headers-$(uname -r) when the distro has it ("exact"); otherwise the
#                    distro's generic headers linked at /lib/modules/$(uname -r)/{build,source}
#                    ("compat": kvmtrace's BPF code never depends on header struct layouts)
#   .venv:           on the system Python with --system-site-packages (so `import bcc` works),
#                    kvmtrace installed editable with test extras
# Options (environment): KVMTRACE_VENV (default ./.venv), KVMTRACE_NO_APT=1 (skip apt entirely).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVMTRACE_VENV:-.venv}
say() { printf '[setup] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    say "installing system packages needs root: run as root (sudo $0), or set KVMTRACE_NO_APT=1 to skip"
    exit 2
  fi
}

apt_updated=0
apt_install() {  # apt_install PKG...: install those not installed yet
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  need_root
  if [ $apt_updated = 0 ]; then say "apt-get update"; apt-get update -q >/dev/null; apt_updated=1; fi
  say "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

if [ "${KVMTRACE_NO_APT:-0}" != 1 ]; then
  if ! command -v apt-get >/dev/null; then
    say "no apt-get: install bcc's Python bindings, bpftool and kernel headers with your distribution's tools, then re-run with KVMTRACE_NO_APT=1"
    exit 3
  fi
  apt_install python3-bpfcc bpftool python3-venv python3-pip
  # openssl (test certificates) and iproute2's ss (connection counts): the exporter's TLS and abuse tests
  apt_install openssl iproute2
  # Prometheus server and promtool: the exporter's end-to-end test, `promtool check/test` of the
  # rules. Installed without letting its own service start (it would take port 9090), and that
  # service is disabled when we installed the package (a host that had it keeps its setup).
  if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q 'install ok installed'; then
    prc=/usr/sbin/policy-rc.d own_prc=0
    if [ ! -e "$prc" ]; then need_root; printf '#!/bin/sh\nexit 101\n' > "$prc"; chmod 755 "$prc"; own_prc=1; fi
    apt_install prometheus || { [ $own_prc = 1 ] && rm -f "$prc"; exit 1; }
    [ $own_prc = 1 ] && rm -f "$prc"
    if command -v systemctl >/dev/null; then systemctl disable prometheus >/dev/null 2>&1 || true; fi
    if [ -d /run/systemd/system ]; then systemctl stop prometheus >/dev/null 2>&1 || true; fi
    say "installed prometheus for promtool and the exporter tests; its service is disabled"
  fi
  # systemd-analyze: `systemd-analyze verify` of the units in deploy/systemd
  command -v systemd-analyze >/dev/null || apt_install systemd
  KREL=$(uname -r)
  if [ ! -e "/lib/modules/$KREL/build/include" ]; then
    if [ $apt_updated = 0 ]; then apt-get update -q >/dev/null; apt_updated=1; fi
    if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
      apt_install "linux-headers-$KREL"            # exact headers
    else
      arch=$(dpkg --print-architecture)
      apt_install "linux-headers-$arch"              # compat headers, linked below
      hdr=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -1)
      common=${hdr%-"$arch"}-common
      [ -d "$common" ] || common=$hdr
      mkdir -p "/lib/modules/$KREL"
      ln -sfn "$hdr" "/lib/modules/$KREL/build"
      ln -sfn "$common" "/lib/modules/$KREL/source"
      say "no linux-headers-$KREL in the archive: linked $(basename "$hdr") as compat headers for bcc"
    fi
  fi
  # headless browser for the HTML page test (tests/test_html_browser.py renders report/compare pages)
  if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q 'install ok installed'; then
    if [ $apt_updated = 0 ]; then need_root; apt-get update -q >/dev/null; apt_updated=1; fi
    if apt-cache show chromium >/dev/null 2>&1; then
      apt_install chromium
    else
      say "no 'chromium' package in this distribution's archive: the HTML browser test will skip"
    fi
  fi
fi

SYSPY=/usr/bin/python3
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV on $SYSPY (with system site-packages for bcc)"
  "$SYSPY" -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.kvmtrace-installed"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "pip install -e .[test]"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
"$VENV/bin/python" -c 'import bcc' 2>/dev/null || say "warning: bcc is not importable from $VENV (install python3-bpfcc); tracing will not work, reports will"
say "ready: $VENV/bin/kvmtrace"
