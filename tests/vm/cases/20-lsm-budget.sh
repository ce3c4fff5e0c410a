#!/bin/sh
# vm-timeout: 900
# The mass-deletion guard in the LSM tier: budget 100 over 10,000 out-of-scope files, for each
# way of deleting: exactly 100 files go, 9,900 stay, the job is held. Then approve, deny and a
# resume without approval, each counted on disk.
. /cases/lib.inc
N=10000
mkdir -p "$S/target" "$S/root"
policy 100 "$S/target" "$S/root" >"$S/policy.toml"
start_agent "$S/policy.toml"

# scenario NAME SCRIPT: fills victim/, runs SCRIPT as its own job, expects exactly 9900 left.
scenario() {
    name=$1; script=$2
    cleanup "$S/victim"; $KIT fill $N "$S/victim" >/dev/null
    [ "$(count "$S/victim")" -eq $N ] || fail "$name: fill"
    ( cd "$S" && exec setsid sh -c "$script" >/dev/null 2>"$S/job.err" ) &
    JOB=$!
    id=$(wait_hold) || fail "$name: no hold within 60s"
    left=$(settle "$S/victim")
    echo "$name: held as incident $id with $left of $N files left"
    [ "$left" -eq $((N - 100)) ] || fail "$name: expected exactly $((N - 100)) files left, found $left"
}

end_job() { kill -KILL "-$1" 2>/dev/null; wait "$JOB" 2>/dev/null; }

# stopped PID: the process is in state T.
stopped() { [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" = T ]; }

scenario "rm -rf" "rm -rf victim"
pg=$(gr holds --json | sed -n 's/.*"pgid": \([0-9]*\).*/\1/p' | head -n1)
# A held job cannot resume itself: SIGCONT without approval deletes nothing more, and the kernel
# stops it again at its next attempt.
kill -CONT "-$pg" || fail "kill -CONT"
sleep 2
[ "$(count "$S/victim")" -eq $((N - 100)) ] || fail "kill -CONT of a held job deleted files"
stopped "$pg" || fail "the resumed held job was not stopped again"
echo "kill -CONT: nothing more deleted, the job is stopped again"
gr approve "$id" --for-job || fail "approve failed"
wait "$JOB"
[ "$(count "$S/victim")" -eq 0 ] || fail "the approved job did not finish"
echo "approve: the job finished, 0 files left"

scenario "shell loop" 'for f in victim/*; do rm -f "$f"; done'
pg=$(gr holds --json | sed -n 's/.*"pgid": \([0-9]*\).*/\1/p' | head -n1)
gr deny "$id" || fail "deny failed"
sleep 1
kill -0 "-$pg" 2>/dev/null && fail "the denied job is still running"
[ "$(count "$S/victim")" -eq $((N - 100)) ] || fail "deny: files were deleted after the hold"
echo "deny: the job ended, $((N - 100)) files left"

scenario "find -delete" "find victim -type f -delete"
end_job "$(gr holds --json | sed -n 's/.*"pgid": \([0-9]*\).*/\1/p' | head -n1)"; gr deny "$id" >/dev/null 2>&1

scenario "forked workers" "$KIT fork-unlink 8 victim"
gr deny "$id" >/dev/null || fail "deny"

scenario "io_uring" "$KIT uring-unlink victim"
gr deny "$id" >/dev/null || fail "deny"

cleanup "$S/victim" "$S/dest"; $KIT fill $N "$S/dest" >/dev/null; $KIT fill $N "$S/src" >/dev/null
( cd "$S" && exec setsid "$KIT" rename-over src dest >/dev/null 2>&1 ) &
JOB=$!
id=$(wait_hold) || fail "rename over: no hold"
left=$(settle "$S/src")
echo "rename over: held with $left of $N sources left"
[ "$left" -eq $((N - 100)) ] || fail "rename over: expected exactly $((N - 100)) renamed-over files, found $((N - left))"
gr deny "$id" >/dev/null

# Inside a target nothing is counted: 10,000 deleted freely.
$KIT fill $N "$S/target/build" >/dev/null
( cd "$S/target" && exec setsid rm -rf build )
[ "$(count "$S/target")" -eq 0 ] || fail "deletions inside the target were stopped"
gr holds --json | grep -q '"id"' && fail "a hold was opened for deletions inside a target"
echo "target: $N files deleted freely"
stop_agent
echo "ok"
