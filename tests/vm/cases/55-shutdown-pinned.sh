#!/bin/sh
# vm-timeout: 300
# The shutdown guard's LSM programs are pinned: with the agent killed (SIGKILL, no clean-up) a
# session classified remote still cannot reboot. Once the dead agent's promise to answer (5 s)
# has run out, refused callers get a plain EPERM at once (no message, no stop, no hang). The next
# agent adopts the pins and a SIGTERM detaches everything.
. /cases/lib.inc
shutdown_policy "$S/policy.toml"
start_agent "$S/policy.toml"
fake_sshd_session

cat >"$S/remote.sh" <<'EOS'
. /cases/lib.inc
wait_remote
touch "$S/classified"
i=0
until [ -e "$S/crashed" ]; do
    i=$((i + 1)); [ $i -gt 600 ] && { echo "REMOTE-FAIL: the agent was never killed"; exit 1; }
    sleep 0.1
done
for cmd in "reboot -f" "busybox poweroff -f" "echo o >/proc/sysrq-trigger"; do
    out=$( (eval "$cmd") 2>&1 ) && { echo "REMOTE-FAIL: '$cmd' succeeded with no agent"; exit 1; }
    echo "$cmd -> $out"
    echo "$out" | grep -q "Operation not permitted" || { echo "REMOTE-FAIL: '$cmd' not refused with EPERM"; exit 1; }
    echo "$out" | grep -q "guardrail:" && { echo "REMOTE-FAIL: '$cmd' got a message from a dead agent"; exit 1; }
done
echo "REMOTE-OK"
EOS

"$S/sshd-session" "$S/remote.sh" >"$S/remote.out" 2>&1 &
REMOTE=$!
i=0
until [ -e "$S/classified" ]; do
    kill -0 $REMOTE 2>/dev/null || fail "the remote session ended early: $(cat "$S/remote.out")"
    i=$((i + 1)); [ $i -gt 600 ] && fail "the remote session was never classified"
    sleep 0.1
done
kill -KILL "$AGENT"
wait "$AGENT" 2>/dev/null
[ -d /sys/fs/bpf/guardrail/links ] || fail "nothing is pinned after the crash"
ls /sys/fs/bpf/guardrail/links | grep -q "^${SD_PREFIX}bprm_check\$" || fail "the shutdown programs are not pinned: $(ls /sys/fs/bpf/guardrail/links)"
sleep 6
touch "$S/crashed"
wait $REMOTE
cat "$S/remote.out"
grep -q "REMOTE-FAIL" "$S/remote.out" && fail "$(grep REMOTE-FAIL "$S/remote.out")"
grep -q "REMOTE-OK" "$S/remote.out" || fail "the remote session did not finish"

start_agent "$S/policy.toml"
grep -q "replaced [0-9]* programs left pinned" "$S/agent.log" || fail "the next agent did not replace the pinned programs"
stop_agent
if [ -e /sys/fs/bpf/guardrail ]; then fail "a stop left pins: $(ls -R /sys/fs/bpf/guardrail)"; fi
