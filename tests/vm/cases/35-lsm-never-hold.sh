#!/bin/sh
# vm-timeout: 300
# A job of a `never_hold` unit (a scope standing in for systemd-logind.service) past its budget:
# the kernel never stops it and refuses every further deletion outside scope. Exactly 100 files
# gone, no hold, the job ends by itself.
. /cases/lib.inc
mkdir -p "$S/target" "$S/protected"
policy 100 "$S/target" "$S/protected" |
    awk '{ print } /^protect_mount_points/ { print "never_hold = [\"stand-in-logind.scope\"]" }' >"$S/policy.toml"
grep -q '^never_hold' "$S/policy.toml" || fail "the test policy has no never_hold"
CG=/sys/fs/cgroup/stand-in-logind.scope
mkdir -p "$CG" || fail "cannot create $CG"
start_agent "$S/policy.toml"

$KIT fill 300 "$S/victim" >/dev/null
# Four workers deleting at once: each is refused past the budget, none is stopped.
sh -c 'echo $$ >"$1/cgroup.procs" && cd "$2" && exec setsid "$3" fork-unlink 4 victim' _ "$CG" "$S" "$KIT" >/dev/null 2>&1 &
JOB=$!
i=0
while kill -0 "$JOB" 2>/dev/null; do
    i=$((i + 1))
    [ $i -gt 600 ] && fail "the never_hold job is still running after 60s ($(count "$S/victim") files left; holds: $(gr holds --json))"
    sleep 0.1
done
left=$(count "$S/victim")
[ "$left" -eq 200 ] || fail "expected exactly 200 of 300 files left (100 deleted, the rest refused), found $left"
gr holds --json | grep -q '"id"' && fail "a never_hold job was held"
grep -q '"outcome":"refused"' "$S/events.jsonl" || fail "no refused incident in the event log"
grep -q 'stand-in-logind.scope is never held' "$S/events.jsonl" || fail "the incident does not say why it was not held"
grep -q 'not held' "$S/agent.log" || fail "the agent log does not say it was not held"
echo "never_hold: refused past the budget, never stopped: 100 deleted, 200 refused, no hold"
stop_agent
rmdir "$CG"
