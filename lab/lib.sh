# Shared helpers of the kernel lab scripts (sourced, not run).
# Everything lives under $KVMTRACE_LAB_CACHE (default /var/cache/kvmtrace-lab), outside the repo.

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB_CACHE=${KVMTRACE_LAB_CACHE:-/var/cache/kvmtrace-lab}
LAB_SUITES="bullseye bookworm trixie"

lab_say() { printf '[lab] %s\n' "$*" >&2; }
lab_die() { printf 'lab: %s\n' "$*" >&2; exit "${LAB_DIE_RC:-2}"; }

lab_check_suite() {
  case " $LAB_SUITES " in *" $1 "*) ;; *) LAB_DIE_RC=2 lab_die "unknown suite '$1' (one of: $LAB_SUITES)";; esac
}

# Cache key of a suite's image: the recipe (this file, build-image.sh, the guest requirements)
# and the suite. Package versions are resolved at build time and recorded in the manifest.
lab_key() {
  cat "$LAB_DIR/lib.sh" "$LAB_DIR/build-image.sh" "$LAB_DIR/guest-requirements.txt" \
    | { cat; echo "suite=$1"; } | sha256sum | cut -c1-16
}
lab_image_dir() { echo "$LAB_CACHE/$1/$(lab_key "$1")"; }

# Host tools: install only what is missing (a fresh CI machine has none of them).
lab_host_apt_updated=0
lab_need_host_tools() {  # lab_need_host_tools CMD:PKG ...
  local missing=() pair
  for pair in "$@"; do command -v "${pair%%:*}" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "${KVMTRACE_LAB_NO_APT:-0}" = 1 ] && LAB_DIE_RC=3 lab_die "missing host packages: ${missing[*]} (KVMTRACE_LAB_NO_APT=1 forbids installing them)"
  [ "$(id -u)" = 0 ] || LAB_DIE_RC=3 lab_die "missing host packages: ${missing[*]}; installing them needs root"
  command -v apt-get >/dev/null || LAB_DIE_RC=3 lab_die "missing host packages: ${missing[*]} and no apt-get to install them"
  (
    flock 9
    if [ $lab_host_apt_updated = 0 ]; then apt-get update -q >/dev/null; fi
    lab_say "host: apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  ) 9>/var/lock/kvmtrace-lab-apt.lock || LAB_DIE_RC=3 lab_die "could not install host packages: ${missing[*]}"
  lab_host_apt_updated=1
}
export PATH="$PATH:/usr/sbin:/sbin"
