#!/bin/sh
# vm-timeout: 600
# Budgets above the job in the LSM tier (issue 14): one login session runs 1,200 `setsid rm`,
# one file and one job each (a job's budget starts afresh every time). The session's budget is
# 300: exactly 300 files go, the 301st is refused and its job held, and the incident names the
# session. Then a second session of the same user, held at the user's budget of 400.
. /cases/lib.inc
N=1200
mkdir -p "$S/target" "$S/root"
policy 100 "$S/target" "$S/root" '
[deletion.session]
budget = 300
window = "10m"
action = "hold"

[deletion.user]
budget = 400
window = "10m"
action = "hold"
' >"$S/policy.toml"
start_agent "$S/policy.toml"

# session_loop DIR: in a new audit session (what pam_loginuid does at a login), one `setsid rm`
# per file of DIR; prints the loop's pid.
session_loop() {
    ( cd "$1" && exec sh -c 'echo 0 > /proc/self/loginuid || exit 90
for f in f*; do setsid rm -f "$f"; done' >/dev/null 2>"$S/job.err" ) &
    echo $!
}

$KIT fill $N "$S/victim" >/dev/null
LOOP=$(session_loop "$S/victim")
id=$(wait_hold) || fail "session loop: no hold within 60s"
sid=$(cat "/proc/$LOOP/sessionid")
left=$(settle "$S/victim")
echo "session loop: held as incident $id with $left of $N files left"
[ "$left" -eq $((N - 300)) ] || fail "session loop: expected exactly $((N - 300)) files left, found $left"
reason="session $sid deleted 300 files outside targets in 10m across 301 jobs; the next was refused (budget 300 per session)"
gr holds --json | grep -qF "\"reason\": \"$reason\"" || fail "session loop: hold reason is not \"$reason\": $(gr holds --json)"
grep -q '"level":"session"' "$S/events.jsonl" || fail "no level in the event log: $(cat "$S/events.jsonl")"
kill -KILL "$LOOP"; wait "$LOOP" 2>/dev/null
gr deny "$id" >/dev/null || fail "deny"
sleep 1
[ "$(count "$S/victim")" -eq $((N - 300)) ] || fail "session loop: files went after the hold"
echo "session loop: denied, $((N - 300)) files left"

# A second session of the same login uid (0): the user has counted 301 (300 deleted, one
# refused), so 99 more go before the user's budget of 400 holds the next.
cleanup "$S/victim"; $KIT fill $N "$S/victim" >/dev/null
LOOP=$(session_loop "$S/victim")
id=$(wait_hold) || fail "user: no hold within 60s"
left=$(settle "$S/victim")
echo "user: held as incident $id with $left of $N files left"
[ "$left" -eq $((N - 99)) ] || fail "user: expected exactly $((N - 99)) files left, found $left"
reason="user root (login uid 0) deleted 400 files outside targets in 10m across 401 jobs; the next was refused (budget 400 per user)"
gr holds --json | grep -qF "\"reason\": \"$reason\"" || fail "user: hold reason is not \"$reason\": $(gr holds --json)"
kill -KILL "$LOOP"; wait "$LOOP" 2>/dev/null
gr deny "$id" >/dev/null || fail "deny"
cleanup "$S/victim"
stop_agent
echo "ok"
