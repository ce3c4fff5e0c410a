#!/bin/sh
# vm-timeout: 300
# The guard never stops the host's own machinery, in the LSM tier:
# - a `never_hold` unit's job (a cgroup standing in for systemd-journald.service) past its budget
#   while the agent is dead (SIGKILL, programs pinned) is refused with EPERM and never stopped;
#   the refusal is that job's only: the next job of the unit, in a process group of its own,
#   deletes again;
# - removing empty cgroups (absolute paths, as systemd does at every unit stop) and files on
#   devtmpfs are no deletions: a budgeted job removes 300 of each and is not held.
# (PID 1 here is /init, a shell that deletes one file per case: it cannot be made to delete past
# a budget on demand, so its exemption is not exercised here.)
. /cases/lib.inc
mkdir -p "$S/target" "$S/protected"
policy 100 "$S/target" "$S/protected" |
    awk '{ print } /^protect_mount_points/ { print "never_hold = [\"stand-in-journald.service\"]" }' >"$S/policy.toml"
grep -q '^never_hold' "$S/policy.toml" || fail "the test policy has no never_hold"
CG=/sys/fs/cgroup/stand-in-journald.service
mkdir -p "$CG" || fail "cannot create $CG"

# stopped_any PGID: some process of the group is in state T.
stopped_any() {
    for st in /proc/[0-9]*/stat; do
        set -- $(cat "$st" 2>/dev/null)
        [ "$5" = "$PG" ] && [ "$3" = T ] && return 0
    done
    return 1
}

# in_unit DIR SCRIPT: runs `sh -c SCRIPT` in DIR as a new session (its own process group) inside
# the stand-in unit, in the background; JOB is its pid (= its process group).
in_unit() {
    sh -c 'echo $$ >"$1/cgroup.procs" && cd "$2" && exec setsid sh -c "$3"' _ "$CG" "$1" "$2" >"$S/job.out" 2>&1 &
    JOB=$!
}

# wait_job: waits up to 60s for the job to end, failing if any of its processes is ever stopped.
wait_job() {
    i=0
    while kill -0 "$JOB" 2>/dev/null; do
        PG=$(cut -d' ' -f5 "/proc/$JOB/stat" 2>/dev/null)
        [ -n "$PG" ] && stopped_any && fail "$1: the never_hold job was stopped"
        i=$((i + 1))
        [ $i -gt 600 ] && fail "$1: still running after 60s ($(count "$S/victim") files left)"
        sleep 0.1
    done
}

start_agent "$S/policy.toml"
kill -KILL "$AGENT"
wait "$AGENT" 2>/dev/null
[ -d /sys/fs/bpf/guardrail/links ] || fail "nothing is pinned after the crash"

# 1. Past its budget with no agent: refused, not stopped.
$KIT fill 300 "$S/victim" >/dev/null
in_unit "$S" "$KIT fork-unlink 4 victim"
wait_job "no agent"
left=$(count "$S/victim")
[ "$left" -eq 200 ] || fail "no agent: expected exactly 200 of 300 files left (100 deleted, the rest refused), found $left"
echo "no agent: the never_hold job was refused past 100 files, never stopped, and ended by itself"

# 2. The next job of the same unit is a job of its own: a whole budget again (100 more files),
# then refused the same way, still with no agent.
in_unit "$S" "rm -rf victim"
wait_job "next job"
left2=$(count "$S/victim")
[ "$left2" -eq 100 ] || fail "next job: expected exactly 100 of 200 files left (a fresh budget of 100), found $left2"
echo "next job: deleted 100 more files (its own budget), then refused"

# 3. The next agent adopts no hold.
start_agent "$S/policy.toml"
grep -q "replaced [0-9]* programs left pinned" "$S/agent.log" || fail "the next agent did not replace the pinned programs"
gr holds --json | grep -q '"id"' && fail "the next agent adopted a never_hold job as a hold"
grep -q "adopted open hold" "$S/agent.log" && fail "the next agent adopted a hold"

# 4. Pseudo filesystems: a budgeted job (budget 100, outside the never_hold unit) removes 300
# empty cgroups by absolute path and 300 files on devtmpfs, and is not held.
T=/sys/fs/cgroup/gr-failsafe-tree
mkdir -p "$T" || fail "mkdir $T"
i=0
while [ $i -lt 300 ]; do mkdir "$T/g$i" || fail "mkdir $T/g$i"; i=$((i + 1)); done
( exec setsid sh -c "rmdir $T/g*" >"$S/job.out" 2>&1 ) || fail "rmdir of 300 empty cgroups failed: $(cat "$S/job.out")"
ls "$T" | grep -q '^g' && fail "cgroups left after the rmdir"
gr holds --json | grep -q '"id"' && fail "removing empty cgroups opened a hold"
rmdir "$T"
echo "cgroups: 300 empty cgroups removed, not counted"
if grep -q '^[^ ]* /dev devtmpfs ' /proc/mounts; then
    mkdir -p /dev/gr-failsafe
    $KIT fill 300 /dev/gr-failsafe >/dev/null
    ( exec setsid rm -rf /dev/gr-failsafe ) || fail "rm -rf on devtmpfs failed"
    [ -e /dev/gr-failsafe ] && fail "devtmpfs files left: $(count /dev/gr-failsafe)"
    gr holds --json | grep -q '"id"' && fail "deleting on devtmpfs opened a hold"
    echo "devtmpfs: 300 files removed, not counted"
else
    echo "devtmpfs: /dev is not devtmpfs here; not checked"
fi
# ... while the same deletions on a real filesystem still count.
$KIT fill 300 "$S/real" >/dev/null
( cd "$S" && exec setsid rm -rf real ) &
JOB=$!
id=$(wait_hold) || fail "real files: no hold"
gr deny "$id" >/dev/null || fail "deny"
echo "real files: held at the budget as before"
stop_agent
rmdir "$CG"
echo "ok"
