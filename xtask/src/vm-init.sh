#!/bin/busybox sh
# PID 1 of the `cargo xtask vm` guest: mounts what the tests need, loads the kernel modules,
# runs each test binary listed in /tests/list (with the filter in /tests/filter), prints one
# `tcpscope-vm:` line per binary and a verdict, and powers off.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root RUST_BACKTRACE=1
mkdir -p /root /sys/fs/bpf /var && ln -s /run /var/run
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run
# No tmpfs on /tmp: the initramfs root is already in memory, and binaries or captures whose
# host path lies under /tmp (a clone in /tmp) are unpacked there.
mount -t bpf bpf /sys/fs/bpf
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null

while read -r m; do
    [ -n "$m" ] && { insmod "$m" || echo "tcpscope-vm: insmod $m failed"; }
done < /lib/modules/list
/usr/sbin/ip link set lo up

echo "tcpscope-vm: kernel $(uname -r), $(nproc) CPUs, booted in $(cut -d' ' -f1 /proc/uptime) s"
filter=$(cat /tests/filter)
# Prerequisites the host run was allowed to skip (TCPSCOPE_ALLOW_SKIP) may be skipped here too.
allow_skip=$(cat /tests/allow_skip)
[ -n "$allow_skip" ] && export TCPSCOPE_ALLOW_SKIP="$allow_skip"
# The agent, at its host path (the test binaries run from /tests, away from the target directory).
export TCPSCOPE_AGENT="$(cat /tests/agent)"
# The release archive (`cargo xtask dist`), also at its host path.
export TCPSCOPE_DIST="$(cat /tests/dist-archive)"
failed=""
# Per binary: the slowest (reliability) takes ~10 min under TCG on 6.12; the guest as a whole
# is bounded by `cargo xtask vm --timeout`.
limit=1200
while read -r t; do
    start=$(cut -d' ' -f1 /proc/uptime)
    echo "tcpscope-vm: running $t"
    if [ -n "$filter" ]; then
        timeout $limit "/tests/$t" --test-threads=1 "$filter"
    else
        timeout $limit "/tests/$t" --test-threads=1
    fi
    rc=$?
    end=$(cut -d' ' -f1 /proc/uptime)
    secs=$(awk "BEGIN { printf \"%.1f\", $end - $start }")
    if [ $rc -eq 0 ]; then
        echo "tcpscope-vm: $t passed in $secs s"
    elif [ $rc -eq 143 ] || [ $rc -eq 124 ]; then
        echo "tcpscope-vm: $t FAILED (timed out after $limit s)"
        failed="$failed $t"
    else
        echo "tcpscope-vm: $t FAILED (exit $rc) in $secs s"
        failed="$failed $t"
    fi
done < /tests/list

if [ -z "$failed" ]; then
    echo "tcpscope-vm: verdict pass"
else
    echo "tcpscope-vm: verdict fail:$failed"
fi
sync
poweroff -f
