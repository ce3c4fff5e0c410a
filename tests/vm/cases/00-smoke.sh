#!/bin/sh
# The VM itself is fit for the tier under test: BPF LSM active (lsm tier) or built but not active
# (fmodret tier, booted with Ubuntu's list), BTF present, scratch tmpfs writable.
set -eu

lsm=$(cat /sys/kernel/security/lsm)
tier=$(sed -n 's/.*guardrail\.tier=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "active LSMs: $lsm; tier under test: ${tier:-lsm}"
case ",$lsm,:${tier:-lsm}" in
    *,bpf,*:lsm) ;;
    *,bpf,*:*) echo "FAIL: bpf is an active LSM, the ${tier} tier cannot be tested"; exit 1 ;;
    *:lsm) echo "FAIL: bpf is not an active LSM"; exit 1 ;;
esac

# BPF LSM programs are typed against the kernel's BTF; without it nothing loads.
[ -s /sys/kernel/btf/vmlinux ] || { echo "FAIL: /sys/kernel/btf/vmlinux missing"; exit 1; }
echo "btf: $(wc -c </sys/kernel/btf/vmlinux) bytes"

grep -q ' /sys/fs/bpf bpf ' /proc/mounts || { echo "FAIL: bpffs not mounted"; exit 1; }
grep -q ' /scratch tmpfs ' /proc/mounts || { echo "FAIL: /scratch is not a tmpfs"; exit 1; }

f="$GUARDRAIL_VM_SCRATCH/probe"
echo "hello from $(hostname)" >"$f"
[ "$(cat "$f")" = "hello from guardrail-vm" ] || { echo "FAIL: scratch round trip"; exit 1; }
rm "$f"
[ ! -e "$f" ] || { echo "FAIL: could not delete from scratch"; exit 1; }
echo "scratch ok"
