#!/bin/sh
# vm-timeout: 300
# A held job cannot resume itself, in the LSM tier: a sibling looping `kill -CONT` on a job held at
# its budget gets not one file more (every deletion of a held job is refused and the task stopped
# again before it), the hold stays open, and nothing kills the job: the tracepoint tier's
# self-resume limit (guardrail_common::SELF_RESUME_LIMIT) never applies here.
. /cases/lib.inc
N=1000
mkdir -p "$S/target" "$S/root"
policy 100 "$S/target" "$S/root" >"$S/policy.toml"
start_agent "$S/policy.toml"

cleanup "$S/victim"; $KIT fill $N "$S/victim" >/dev/null
( cd "$S" && exec setsid rm -rf victim >/dev/null 2>&1 ) &
JOB=$!
id=$(wait_hold) || fail "rm -rf was not held"
left=$(settle "$S/victim")
[ "$left" -eq $((N - 100)) ] || fail "expected exactly $((N - 100)) files left at the hold, found $left"
pg=$(gr holds --json | sed -n 's/.*"pgid": \([0-9]*\).*/\1/p' | head -n1)
# The sibling: 300 resumes, every 10 ms, from outside the held job.
i=0
while [ $i -lt 300 ]; do kill -CONT "-$pg" 2>/dev/null || break; i=$((i + 1)); sleep 0.01; done
left=$(settle "$S/victim")
echo "kill -CONT x$i on held job $pg: $left of $N files left"
[ "$left" -eq $((N - 100)) ] || fail "a held job resumed by a kill -CONT loop deleted $((N - 100 - left)) files"
kill -0 "$JOB" 2>/dev/null || fail "the held job is gone (nothing should kill it in this tier)"
gr holds --json | grep -q "\"id\": $id" || fail "hold $id is no longer open"
grep -q '"outcome":"killed"' "$S/events.jsonl" && fail "the job was reported killed"
gr deny "$id" >/dev/null || fail "deny"
wait "$JOB" 2>/dev/null
[ "$(count "$S/victim")" -eq $((N - 100)) ] || fail "files went after the deny"
stop_agent
cleanup "$S/victim"
echo "ok: a kill -CONT loop on a held job deletes nothing in the lsm tier; the hold stays until deny"
