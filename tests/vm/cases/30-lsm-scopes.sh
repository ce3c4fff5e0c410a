#!/bin/sh
# vm-timeout: 600
# Per-job scopes (the First Server fix), exemptions, data-directory owners, the hold timeout and
# the `rm -rf "$X/"*` accident, in the LSM tier. Every assertion counts files on disk.
. /cases/lib.inc
N=10000
mkdir -p "$S/bin" "$S/target" "$S/root" "$S/releases/old" "$S/db" "$S/pkgroot/protected"
# Stand-ins with their own file identity: an update program, a package manager, a database.
for p in update-program dpkg postgres; do cp "$KIT" "$S/bin/$p"; done
policy 100 "$S/target" "$S/pkgroot/protected" "
[[deletion.rule]]
name = \"update-program\"
match = { executable = \"$S/bin/update-program\" }
targets = [\"$S/releases\"]
budget = 0

[[deletion.exempt]]
name = \"package-manager\"
executables = [\"$S/bin/dpkg\"]

[[deletion.data_dir]]
path = \"$S/db\"
owners = { executables = [\"$S/bin/postgres\"] }" >"$S/policy.toml"
start_agent "$S/policy.toml"

# 1. The update program may delete in its declared target only; budget 0 elsewhere: held before
#    the first file, its forked workers included.
$KIT fill 500 "$S/releases/old" >/dev/null
( cd "$S" && exec setsid "$S/bin/update-program" fork-unlink 4 releases/old >/dev/null ) || fail "update in scope"
[ "$(count "$S/releases/old")" -eq 0 ] || fail "the update program could not delete inside its target"
$KIT fill 500 "$S/customer" >/dev/null
( cd "$S" && exec setsid "$S/bin/update-program" fork-unlink 4 customer >/dev/null 2>&1 ) &
JOB=$!
id=$(wait_hold) || fail "the out-of-scope update program was not held"
left=$(settle "$S/customer")
echo "update program out of scope: held as incident $id, $left of 500 customer files left"
[ "$left" -eq 500 ] || fail "budget 0: expected all 500 customer files left, found $left"
gr holds --json | grep -q '"rule": "update-program"' || fail "the hold does not name the job's rule"
gr deny "$id" >/dev/null || fail "deny"
wait "$JOB" 2>/dev/null

# 2. An exempt package manager deletes freely, but not a protected root.
$KIT fill $N "$S/pkgroot/protected/files" >/dev/null
out=$( cd "$S" && setsid "$S/bin/dpkg" rm-rf pkgroot/protected )
echo "exempt: $out"
[ "$(count "$S/pkgroot")" -eq 0 ] || fail "the exempt job was stopped inside"
[ -d "$S/pkgroot/protected" ] || fail "the exempt job removed a protected root"
gr holds --json | grep -q '"id"' && fail "an exempt job was held"
echo "exempt: $N files deleted freely, the protected root stays"

# 2b. The kernel tags the exempt process by pid. A new process that gets its pid once it exited
#     (forced here with clone3 set_tid; on a busy host pids wrap) is an ordinary job: held at the
#     budget, exactly 100 files gone.
$KIT fill 300 "$S/reuse" >/dev/null
( cd "$S" && exec setsid "$S/bin/dpkg" count reuse >/dev/null ) &
PM=$!
wait "$PM"
( cd "$S" && exec setsid $KIT with-pid "$PM" rm -rf reuse >/dev/null 2>&1 ) &
JOB=$!
id=$(wait_hold) || fail "rm -rf with the exited package manager's pid $PM was not held ($(count "$S/reuse") of 300 files left)"
left=$(settle "$S/reuse")
[ "$left" -eq 200 ] || fail "pid reuse: expected 200 of 300 files left at the hold, found $left"
gr deny "$id" >/dev/null || fail "deny"
wait "$JOB" 2>/dev/null
echo "pid reuse: rm -rf with the exempt process's old pid $PM held as incident $id, 200 files left"

# 3. A data directory: the named job may delete in it, anybody else is refused from the first file.
$KIT fill 50 "$S/db/base" >/dev/null
( cd "$S" && setsid rm -f db/base/f00000 2>/dev/null )
[ "$(count "$S/db")" -eq 50 ] || fail "a job not named for the data directory deleted in it"
( cd "$S" && setsid "$S/bin/postgres" fork-unlink 2 db/base >/dev/null ) || fail "postgres"
[ "$(count "$S/db")" -eq 0 ] || fail "the data directory's own job was refused"
echo "data dir: refused for others, allowed for its owner"
stop_agent

# 4. The hold timeout denies an unanswered hold.
sed 's/^hold_timeout = .*/hold_timeout = "3s"/' "$S/policy.toml" >"$S/policy-timeout.toml"
start_agent "$S/policy-timeout.toml"
$KIT fill 1000 "$S/victim" >/dev/null
( cd "$S" && exec setsid rm -rf victim >/dev/null 2>&1 ) &
JOB=$!
# Nobody answers: within the 3s timeout plus a tick the job must be gone (the guest is slow, so
# wait for the end rather than race the hold).
i=0
while kill -0 "$JOB" 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "the job still runs 30s after its hold should have timed out"
    sleep 0.1
done
[ "$(count "$S/victim")" -eq 900 ] || fail "expected 900 files left after the timeout, found $(count "$S/victim")"
grep -q '"outcome":"held"' "$S/events.jsonl" || fail "no held incident in the event log"
grep -q '"outcome":"timed_out"' "$S/events.jsonl" || fail "no timed_out incident in the event log"
echo "hold timeout: denied after 3s, 900 files left"
stop_agent

# 5. rm -rf "$X/"* with X empty, as root inside a scratch root (chroot): stopped at the budget.
R="$S/chroot"
mkdir -p "$R/bin" "$R/srv/www" "$R/backup"
cp /bin/busybox "$R/bin/busybox"; ln -s busybox "$R/bin/sh"; ln -s busybox "$R/bin/rm"
$KIT fill 5000 "$R/srv/www" >/dev/null; $KIT fill 5000 "$R/backup" >/dev/null
start_agent "$S/policy.toml"
( exec setsid chroot "$R" /bin/sh -c 'X=""; rm -rf "$X/"*' >/dev/null 2>&1 ) &
JOB=$!
id=$(wait_hold) || { ls -la "$S"; kill -0 "$AGENT" && echo "agent alive"; fail "the empty-variable rm was not held"; }
left=$(( $(settle "$R/srv") + $(count "$R/backup") ))
echo "rm -rf \"\$X/\"*: held as incident $id with $left of 10000 files left"
[ "$left" -eq 9900 ] || fail "expected exactly 9900 files left, found $left"
gr deny "$id" >/dev/null
stop_agent
echo "ok"
