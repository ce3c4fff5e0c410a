#!/bin/sh
# vm-timeout: 300
# Issue #18, LSM tier. (1) Refusals are reported at a bounded rate: one job's 40 refused unlinks
# in a data directory are 7 events (1st, 2nd, 3rd, 5th, 9th, 17th, 33rd), not 40. (2) The agent
# is known by its pid and its start time: after it crashes (programs pinned), a process given its
# pid (clone3 set_tid, standing in for a user forking until they get it) is refused like anyone
# else. The old programs allowed everything from `tgid == agent_tgid`: rmdir of the protected
# root and the unlinks in the data directory succeeded.
. /cases/lib.inc
mkdir -p "$S/target" "$S/root" "$S/data"
i=0
while [ $i -lt 40 ]; do i=$((i + 1)); echo x >"$S/data/f$i"; done
policy 100 "$S/target" "$S/root" "
[[deletion.data_dir]]
path = \"$S/data\"
owners = { units = [\"database.service\"] }" >"$S/policy.toml"
start_agent "$S/policy.toml"

# The attacker runs as root here: busybox's setpriv cannot change uids, and neither check depends
# on the uid (the host tests, tests/tests/host_failsafe_jobs.rs, attack as nobody).

# (1) One job (a session and process group of its own: processes of the VM's bare init have
# none, and would each be a job), 40 refused unlinks.
setsid sh -c 'for f in "$1"/data/f*; do rm -f "$f" 2>/dev/null && echo "UNLINKED $f"; done' sh "$S" >"$S/unlinks.out"
grep -q UNLINKED "$S/unlinks.out" && fail "unlinks in the data directory succeeded: $(cat "$S/unlinks.out")"
[ "$(count "$S/data")" -eq 40 ] || fail "files in the data directory changed"
sleep 1
n=$(grep -o '"kind":"data_dir"' "$S/events.jsonl" | wc -l)
echo "data_dir events for 40 refusals: $n"
[ "$n" -eq 7 ] || fail "expected 7 data_dir events (1, 2, 3, 5, 9, 17, 33), got $n"

# (2) The agent crashes; its pid goes to another process.
PID=$AGENT
kill -KILL "$AGENT"
wait "$AGENT" 2>/dev/null
[ -d /sys/fs/bpf/guardrail/links ] || fail "nothing is pinned after the crash"
out=$($KIT with-pid "$PID" rmdir "$S/root" 2>&1) && fail "rmdir of the protected root by pid $PID (the dead agent's) succeeded"
echo "with-pid $PID rmdir: $out"
echo "$out" | grep -q "clone3" && fail "could not take pid $PID: $out"
[ -d "$S/root" ] || fail "the protected root is gone"
out=$($KIT with-pid "$PID" rm -f "$S/data/f1" 2>&1) && fail "unlink in the data directory by pid $PID succeeded"
echo "with-pid $PID rm: $out"
[ "$(count "$S/data")" -eq 40 ] || fail "files in the data directory changed"

# The next agent replaces the pinned programs; a stop detaches everything.
start_agent "$S/policy.toml"
stop_agent
echo "ok: refusals rate-limited; a dead agent's pid exempts nobody"
