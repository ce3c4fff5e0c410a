#!/bin/sh
# `guardrail selftest` reports the tier under test here (lsm, or fmodret without BPF LSM), and
# every struct offset resolved from this kernel's BTF (6.1, another layout than the host's) reads
# what /proc says.
. /cases/lib.inc
out=$(/bin/guardrail selftest); rc=$?
echo "$out"
[ $rc -eq 0 ] || fail "selftest exited $rc"
echo "$out" | grep -q "^tier: $TIER\$" || fail "selftest does not report the $TIER tier"
n=$(echo "$out" | grep -c '^\[ ok \] offset ')
[ "$n" -eq 9 ] || fail "expected 9 offsets read right, got $n"
echo "$out" | grep -q 'FAIL\] offset' && fail "an offset is wrong on this kernel"
echo "$out" | grep -q '^\[ ok \] runaway deletion: .* 20 files gone, 0 past the budget' \
    || fail "the runaway was not stopped with 0 files past the budget"
echo "$out" | grep -q '^\[ ok \] remote shutdown: a stand-in "reboot" .*: refused with EPERM before it ran$' \
    || fail "the stand-in shutdown from a remote session was not refused"
echo "ok: tier $TIER, 9 offsets match /proc, runaway stopped with 0 files past the budget, remote shutdown refused"
