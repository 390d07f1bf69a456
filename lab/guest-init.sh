#!/bin/sh
# PID 1 of a lab guest (exec'd by the image's /usr/local/sbin/kvmtrace-lab-init once the per-run
# work disk is mounted at /lab). Copied there by lab/run.sh from the working tree at every run.
# /lab/src = the kvmtrace working tree, /lab/cmd = the command, /lab/results = copied back.
export PATH=/opt/kvmtrace-venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/lab/src KVMTRACE_LAB_GUEST=1 KVMTRACE_LAB_RESULTS=/lab/results
say() { echo "KVMTRACE-LAB $*"; }
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
hostname kvmtrace-lab 2>/dev/null

say "BOOTED kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
modprobe rng-core 2>/dev/null            # 5.10: ccp (a kvm_amd dependency) needs it first
if modprobe kvm_amd; then say "KVM $(ls -l /dev/kvm 2>&1)"; else say "KVM modprobe kvm_amd FAILED"; fi
# `kvmtrace` on PATH runs the mounted working tree (no install step: the tree is on PYTHONPATH)
printf '#!/bin/sh\nexec /opt/kvmtrace-venv/bin/python -m kvmtrace.cli "$@"\n' > /usr/local/bin/kvmtrace
chmod 755 /usr/local/bin/kvmtrace
mkdir -p /lab/results
cd /lab/src
say "BEGIN uptime=$(cut -d' ' -f1 /proc/uptime)"
# output goes to the console (between markers) and to results/output.log
( /bin/bash /lab/cmd; echo $? > /lab/results/.rc ) 2>&1 | tee /lab/results/output.log
rc=$(cat /lab/results/.rc 2>/dev/null || echo 125)
say "EXIT rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /; sync; umount /lab 2>/dev/null || mount -o remount,ro /lab; sync
echo o > /proc/sysrq-trigger
# Power-off runs asynchronously and shuts the disks down: exec nothing more (an exec'd `sleep`
# can hit an I/O error, init exits, and the kernel panics "Attempted to kill init").
while :; do :; done
