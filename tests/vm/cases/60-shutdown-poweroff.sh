#!/bin/sh
# vm-timeout: 300
# The remote-shutdown guard in the LSM and fmodret tiers. A session classified remote is built
# the way the agent's classifier recognises one without logind: an executable named
# `sshd-session` (a copy of the testkit: the classifier goes by the executable, not the command
# name) takes a new audit session id by writing /proc/self/loginuid, exactly what pam_loginuid
# does in OpenSSH's per-connection process, and runs the "user's" commands as its children. From
# there `reboot -f` and `poweroff -f` (busybox applets: reboot(2), refused through
# capable(CAP_SYS_BOOT)), `echo o > /proc/sysrq-trigger` (file_open) and SIGRTMIN+4 to PID 1
# (task_kill) are refused and the VM keeps running; after `guardrail confirm guardrail-vm`,
# `poweroff -f` powers the VM off, which the harness counts as the pass.
. /cases/lib.inc
shutdown_policy "$S/policy.toml"
start_agent "$S/policy.toml"
gr status | grep -q "^tier:    $TIER " || fail "status does not say tier $TIER"
gr status | grep -q "${SD_PREFIX}capable" || fail "the shutdown programs of the $TIER tier are not attached"

fake_sshd_session

cat >"$S/remote.sh" <<'EOS'
. /cases/lib.inc
wait_remote
echo "remote session $sid"
tail="To [a-z ]* guardrail-vm, run: guardrail confirm guardrail-vm, then repeat the command within 2 minutes."
# `reboot -f` and `poweroff -f` exec busybox through their /bin links (bprm_check_security, by
# argv[0]); `busybox poweroff -f` is not a shutdown exec by its name, so it reaches reboot(2)
# (capable CAP_SYS_BOOT); the sysrq write is refused at file_open.
for cmd in "reboot -f" "poweroff -f" "busybox poweroff -f" "busybox reboot -f" "echo o >/proc/sysrq-trigger"; do
    out=$( (eval "$cmd") 2>&1 ) && { echo "REMOTE-FAIL: '$cmd' succeeded"; exit 1; }
    echo "$cmd -> $out"
    echo "$out" | grep -q "Operation not permitted" || { echo "REMOTE-FAIL: '$cmd' not refused with EPERM"; exit 1; }
    echo "$out" | grep -q "guardrail: refused \"[^\"]*\" on guardrail-vm, requested from ssh (session $sid). $tail" \
        || { echo "REMOTE-FAIL: '$cmd' printed no refusal message"; exit 1; }
done
# SIGRTMIN+4 (38, systemd's poweroff request) to PID 1: refused at task_kill.
out=$(kill -38 1 2>&1) && { echo "REMOTE-FAIL: kill -38 1 succeeded"; exit 1; }
echo "kill -38 1 -> $out"
echo "$out" | grep -q "Operation not permitted" || { echo "REMOTE-FAIL: kill -38 1 not refused with EPERM"; exit 1; }
echo "still running after six refused shutdowns"
/bin/guardrail --socket "$S/gr.sock" confirm wrong-name && { echo "REMOTE-FAIL: confirm wrong-name succeeded"; exit 1; }
/bin/guardrail --socket "$S/gr.sock" confirm guardrail-vm || { echo "REMOTE-FAIL: confirm guardrail-vm failed"; exit 1; }
echo "REMOTE-POWEROFF"
sync
poweroff -f
echo "REMOTE-FAIL: poweroff -f returned after the confirmation"
exit 1
EOS

"$S/sshd-session" "$S/remote.sh" 2>&1 | tee "$S/remote.out"
grep -q "REMOTE-FAIL" "$S/remote.out" && fail "$(grep REMOTE-FAIL "$S/remote.out")"
grep -q "incident .* refused" "$S/agent.log" || fail "no refusal incident"
grep -q 'op":"reboot(2)' "$S/events.jsonl" || fail "no reboot(2) refusal recorded"
fail "the VM did not power off after the confirmation"
