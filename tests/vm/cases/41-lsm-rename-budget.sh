#!/bin/sh
# vm-timeout: 600
# Moving files away is deleting them where they were (issue 14, item 2), in the LSM tier: a
# rename to another directory is judged as a deletion from the source's scope. `mv` of 1,200
# files out of a non-target directory into a target is held at the budget (exactly 100 moved),
# and so is a login session's loop of `setsid mv` at the session's budget; a job not named for a
# data directory cannot move a file out of it; a protected root cannot be renamed away. Renames
# within one directory and moves inside one target stay free. (As root: busybox's setpriv cannot
# change uids; the host tests, tests/tests/host_rename_budget.rs, attack as nobody.)
. /cases/lib.inc
N=1200
mkdir -p "$S/bin" "$S/target" "$S/root" "$S/db/base" "$S/elsewhere"
cp "$KIT" "$S/bin/postgres"
policy 100 "$S/target" "$S/root" "
[deletion.session]
budget = 300
window = \"10m\"
action = \"hold\"

[[deletion.data_dir]]
path = \"$S/db\"
owners = { executables = [\"$S/bin/postgres\"] }" >"$S/policy.toml"
start_agent "$S/policy.toml"

# 1. One mv of 1,200 files out of scope into the target: held before the 101st move.
$KIT fill $N "$S/victim" >/dev/null
( cd "$S/victim" && exec setsid sh -c 'mv f* ../target/' >/dev/null 2>"$S/job.err" ) &
JOB=$!
id=$(wait_hold) || fail "mv into the target: no hold within 60s ($(count "$S/victim") of $N left)"
left=$(settle "$S/victim")
echo "mv into the target: held as incident $id with $left of $N files left"
[ "$left" -eq $((N - 100)) ] || fail "mv: expected exactly $((N - 100)) files left, found $left"
[ "$(count "$S/target")" -eq 100 ] || fail "mv: expected 100 files in the target, found $(count "$S/target")"
gr holds --json | grep -qF '101 deletions outside the deletion targets within 10m (budget 100' || fail "mv: hold reason: $(gr holds --json)"
gr deny "$id" >/dev/null || fail "deny"
wait "$JOB" 2>/dev/null
sleep 1
[ "$(count "$S/victim")" -eq $((N - 100)) ] || fail "mv: files moved after deny"
echo "mv into the target: denied, $((N - 100)) files left"
# The target is emptied, never removed: a new directory in its place is no target until the
# agent has re-resolved the policy's identities (asynchronous; a later section raced it).
cleanup "$S/victim" "$S/target"/*

# 2. A login session's loop of `setsid mv`, one file and one job each: the session's budget.
$KIT fill $N "$S/victim" >/dev/null
( cd "$S/victim" && exec sh -c 'echo 0 > /proc/self/loginuid || exit 90
for f in f*; do setsid mv "$f" ../target/; done' >/dev/null 2>"$S/job.err" ) &
LOOP=$!
id=$(wait_hold) || fail "setsid mv loop: no hold within 60s ($(count "$S/victim") of $N left)"
sid=$(cat "/proc/$LOOP/sessionid")
left=$(settle "$S/victim")
echo "setsid mv loop: held as incident $id with $left of $N files left"
[ "$left" -eq $((N - 300)) ] || fail "setsid mv loop: expected exactly $((N - 300)) files left, found $left"
reason="session $sid deleted 300 files outside targets in 10m across 301 jobs; the next was refused (budget 300 per session)"
gr holds --json | grep -qF "\"reason\": \"$reason\"" || fail "setsid mv loop: hold reason is not \"$reason\": $(gr holds --json)"
kill -KILL "$LOOP"; wait "$LOOP" 2>/dev/null
gr deny "$id" >/dev/null || fail "deny"
# The target is emptied, never removed: a new directory in its place is no target until the
# agent has re-resolved the policy's identities (asynchronous; a later section raced it).
cleanup "$S/victim" "$S/target"/*

# 3. 1,000 renames within one directory outside every target (busybox mv: plain rename(2)): free.
mkdir -p "$S/conf"; echo "the file's bytes" >"$S/conf/a"
( cd "$S/conf" && exec setsid sh -c 'i=0; while [ $i -lt 500 ]; do mv a b && mv b a || exit 1; i=$((i + 1)); done' ) \
    || fail "renames within one directory failed: $(cat "$S/job.err" 2>/dev/null)"
[ "$(cat "$S/conf/a")" = "the file's bytes" ] || fail "the renamed file changed"
gr holds --json | grep -q '"id"' && fail "renames within one directory were held"
echo "1000 renames within one directory: free"

# 4. Moving 1,200 files between two subdirectories of the target: free.
$KIT fill $N "$S/target/a" >/dev/null; mkdir -p "$S/target/b"
( cd "$S/target/a" && exec setsid sh -c 'mv f* ../b/' ) || fail "mv inside the target failed"
[ "$(count "$S/target/b")" -eq $N ] || fail "mv inside the target: $(count "$S/target/b") of $N moved"
gr holds --json | grep -q '"id"' && fail "moves inside a target were held"
echo "mv inside the target: $N files moved freely"

# 5. A job not named for the data directory cannot move a file out of it (refused, EPERM); a
#    protected root cannot be renamed away.
$KIT fill 50 "$S/db/base" >/dev/null
( cd "$S/db/base" && exec setsid sh -c 'mv f00000 f00001 ../../elsewhere/' 2>/dev/null )
[ "$(count "$S/db")" -eq 50 ] || fail "a foreign job moved files out of the data directory"
[ "$(count "$S/elsewhere")" -eq 0 ] || fail "files arrived from the data directory"
grep -q '"kind":"data_dir"' "$S/events.jsonl" || fail "no data_dir incident: $(cat "$S/events.jsonl")"
( cd "$S" && exec setsid mv root elsewhere/root 2>/dev/null ) && fail "the protected root was renamed away"
[ -d "$S/root" ] || fail "the protected root is gone"
echo "data dir: a foreign move refused; protected root: not renamed away"
cleanup "$S/db" "$S/elsewhere" "$S/target" "$S/conf"
stop_agent
echo "ok"
