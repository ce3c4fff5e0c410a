#!/bin/sh
# /init of guardrail's LSM-tier test VM (PID 1 in a busybox initramfs built by xtask/src/vm/initramfs.rs).
#
# It mounts the kernel filesystems the agent needs, runs every /cases/*.sh in name order and
# reports each one on the serial console with marker lines the host harness parses:
#
#   GUARDRAIL-VM-LSM <contents of /sys/kernel/security/lsm>
#   GUARDRAIL-VM-START <case>
#   [<case>] <each line the case printed, stdout and stderr>
#   GUARDRAIL-VM-RESULT <case> PASS
#   GUARDRAIL-VM-RESULT <case> FAIL rc=<n> [timeout|no-poweroff]
#   GUARDRAIL-VM-RESULT <case> EXPECT-POWEROFF      (printed before a *-poweroff.sh case runs)
#   GUARDRAIL-VM-DONE
#
# Kernel command line knobs (set by the harness):
#   guardrail.filter=<s>        run only cases whose name (file name without .sh) contains <s>
#   guardrail.only=<name>       run exactly that case (used to boot again for extra poweroff cases)
#   guardrail.case_timeout=<n>  seconds per case; a case may override with a "# vm-timeout: <n>" line
#
# No `set -e`: if PID 1 exits the kernel panics, and a half-run VM says less than a reported failure.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
umask 022

# The kernel gave us /dev/console from the initramfs; devtmpfs replaces /dev, so reopen it.
mount -t devtmpfs dev /dev || echo "guardrail-vm: mounting devtmpfs failed"
exec </dev/console >/dev/console 2>&1

try_mount() { # type source target
    mkdir -p "$3"
    mount -t "$1" "$2" "$3" || echo "guardrail-vm: mounting $1 on $3 failed"
}
try_mount proc proc /proc
try_mount sysfs sysfs /sys
try_mount securityfs securityfs /sys/kernel/security
try_mount bpf bpf /sys/fs/bpf
# tracefs only exists as a mount point when the kernel has it built in.
[ -d /sys/kernel/tracing ] && try_mount tracefs tracefs /sys/kernel/tracing
try_mount cgroup2 cgroup2 /sys/fs/cgroup
try_mount devpts devpts /dev/pts
try_mount tmpfs tmpfs /dev/shm
try_mount tmpfs tmpfs /tmp
try_mount tmpfs tmpfs /scratch
try_mount tmpfs tmpfs /run
mkdir -p /root /etc /run/guardrail-vm
# Tools that look up users (ls -l, id, the agent's audit messages) want these to exist.
[ -e /etc/passwd ] || echo 'root:x:0:0:root:/root:/bin/sh' >/etc/passwd
[ -e /etc/group ] || echo 'root:x:0:' >/etc/group
hostname guardrail-vm
ip link set lo up 2>/dev/null

FILTER=
ONLY=
CASE_TIMEOUT=120
set -f # the command line is split on spaces; its words must not be globbed
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        guardrail.filter=*) FILTER=${arg#guardrail.filter=} ;;
        guardrail.only=*) ONLY=${arg#guardrail.only=} ;;
        guardrail.case_timeout=*) CASE_TIMEOUT=${arg#guardrail.case_timeout=} ;;
    esac
done
set +f

# Plain `poweroff`/`halt`/`reboot` signal PID 1 (USR2/USR1/TERM) as they would busybox init;
# without these traps PID 1 ignores them. Cases that test shutdown paths get the real effect.
trap 'echo "guardrail-vm: poweroff requested"; sync; poweroff -f' USR1 USR2
trap 'echo "guardrail-vm: reboot requested"; sync; reboot -f' TERM

# The firmware leaves its last line ("Booting from ROM..") unterminated: end it, so that our
# first marker starts a line of its own.
echo
echo "GUARDRAIL-VM-LSM $(cat /sys/kernel/security/lsm 2>/dev/null)"

selected() { # name -> true if the filter / only knobs select it
    if [ -n "$ONLY" ]; then
        [ "$1" = "$ONLY" ]
        return
    fi
    case "$1" in *"$FILTER"*) return 0 ;; esac
    return 1
}

prefix() { # name: prefix every line of stdin so the host can attribute it
    while IFS= read -r line || [ -n "$line" ]; do
        printf '[%s] %s\n' "$1" "$line"
    done
}

# Kill everything a case left behind (background daemons, a timed-out case's children), except
# PID 1 and the prefixer: otherwise leftovers keep the output FIFO open, or leak into later cases.
reap_leftovers() { # keep-pid
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$pid" = 1 ] && continue
        [ "$pid" = "$1" ] && continue
        # Kernel threads (and zombies) have no executable; they ignore signals anyway.
        [ -e "$p/exe" ] || continue
        kill -9 "$pid" 2>/dev/null
    done
}

run_case() { # file poweroff(0|1)
    name=$(basename "$1" .sh)
    t=$(sed -n 's/^# *vm-timeout: *\([0-9][0-9]*\).*/\1/p' "$1" | head -n 1)
    [ -n "$t" ] || t=$CASE_TIMEOUT
    scratch=/scratch/$name
    mkdir -p "$scratch"
    kmsg_before=$(dmesg | wc -l)
    echo "GUARDRAIL-VM-START $name"
    [ "$2" = 1 ] && echo "GUARDRAIL-VM-RESULT $name EXPECT-POWEROFF"
    fifo=/run/guardrail-vm/out
    rm -f "$fifo"
    mkfifo "$fifo"
    prefix "$name" <"$fifo" &
    pfx=$!
    started=$(date +%s)
    (cd "$scratch" && GUARDRAIL_VM_CASE=$name GUARDRAIL_VM_SCRATCH=$scratch \
        exec timeout "$t" sh "$1") </dev/null >"$fifo" 2>&1 &
    wait $!
    rc=$?
    elapsed=$(($(date +%s) - started))
    reap_leftovers "$pfx"
    wait "$pfx"
    if [ "$rc" = 0 ] && [ "$2" = 0 ]; then
        echo "GUARDRAIL-VM-RESULT $name PASS"
        return
    fi
    # Kernel messages the case caused (quiet hides most from the console) help explain a failure.
    dmesg | tail -n +"$((kmsg_before + 1))" | tail -n 40 | prefix "$name kernel"
    note=
    # busybox timeout sends SIGTERM: the case's shell then exits with 143.
    [ "$rc" = 143 ] && [ "$elapsed" -ge "$t" ] && note=" timeout"
    [ "$2" = 1 ] && note="$note no-poweroff"
    echo "GUARDRAIL-VM-RESULT $name FAIL rc=$rc$note"
}

# Cases that power the VM off run after all the others (in name order among themselves).
for f in /cases/*.sh; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .sh)
    case "$name" in *-poweroff) continue ;; esac
    selected "$name" && run_case "$f" 0
done
for f in /cases/*-poweroff.sh; do
    [ -f "$f" ] || continue
    selected "$(basename "$f" .sh)" && run_case "$f" 1
done

echo "GUARDRAIL-VM-DONE"
sync
poweroff -f
# Only reached if poweroff failed: ask the kernel directly.
echo o >/proc/sysrq-trigger
sleep 5
