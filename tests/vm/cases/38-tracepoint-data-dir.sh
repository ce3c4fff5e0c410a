#!/bin/sh
# vm-timeout: 300
# The tracepoint tier, forced on 6.1: its programs load under this kernel's verifier (the chain
# sys_enter_unlinkat -> judge -> emit_refusal -> emit sits at the 512-byte stack limit), and a
# deletion in a data directory by a job not named for it, which this tier cannot refuse, goes
# through for that one file and then holds the job; deny ends it with nothing more deleted.
# (Before: the tier ignored the refusal, all 500 files went, and the log said "refused".)
. /cases/lib.inc
mkdir -p "$S/bin" "$S/target" "$S/root" "$S/db"
cp "$KIT" "$S/bin/postgres"
policy 100000 "$S/target" "$S/root" "
[[deletion.data_dir]]
path = \"$S/db\"
owners = { executables = [\"$S/bin/postgres\"] }" >"$S/policy.toml"
rm -f "$S/agent.log"
/bin/guardrail agent --tier tracepoint --policy "$S/policy.toml" --socket "$S/gr.sock" \
    --event-log "$S/events.jsonl" >"$S/agent.log" 2>&1 &
AGENT=$!
i=0
until grep -q "guardrail: ready" "$S/agent.log" 2>/dev/null; do
    kill -0 "$AGENT" 2>/dev/null || fail "the agent (tracepoint tier) exited before it was ready"
    i=$((i + 1)); [ $i -gt 600 ] && fail "the agent was not ready within 60s"
    sleep 0.1
done
grep -q "tier tracepoint in force" "$S/agent.log" || fail "the tracepoint tier is not in force"

$KIT fill 500 "$S/db/base" >/dev/null
# Started inside the data directory: the tier judges by the directory a deletion starts from.
( cd "$S/db" && exec setsid rm -rf base >/dev/null 2>&1 ) &
JOB=$!
id=$(wait_hold) || fail "the foreign rm -rf was not held ($(count "$S/db") of 500 files left)"
left=$(settle "$S/db")
echo "foreign rm -rf in a data directory: held as incident $id, $left of 500 files left"
[ "$left" -eq 499 ] || fail "expected the job stopped after 1 file (499 left), found $left"
grep -Eq '"outcome": ?"held"' "$S/events.jsonl" || fail "no incident with outcome held"
grep -Eq '"outcome": ?"refused"' "$S/events.jsonl" && fail "a deletion that happened is logged as refused"
gr deny "$id" >/dev/null || fail "deny"
wait "$JOB" 2>/dev/null
[ "$(count "$S/db")" -eq 499 ] || fail "files went after the deny"

# A held job cannot resume itself: a sibling looping `kill -CONT` on it gets at most
# SELF_RESUME_LIMIT (8) files more, then the kernel kills it. (Before: one file per resume, all
# 500 went and rm exited 0.)
$KIT fill 500 "$S/db/loop" >/dev/null
( cd "$S/db" && exec setsid rm -rf loop >/dev/null 2>&1 ) &
JOB=$!
i=0
while [ $i -lt 3000 ] && kill -CONT "$JOB" 2>/dev/null; do i=$((i + 1)); sleep 0.01; done
wait "$JOB"; rc=$?
left=$(count "$S/db/loop")
echo "kill -CONT loop (x$i) on the held foreign rm: exit $rc, $left of 500 files left"
[ "$rc" -eq 137 ] || fail "the self-resuming job was not killed (exit $rc)"
[ "$left" -ge $((500 - 1 - 8)) ] || fail "more than 1 + 8 files went: $left of 500 left"
grep -q 'resumed itself 8 times without approval; killed' "$S/events.jsonl" || fail "no incident says the job resumed itself and was killed"
gr holds --json | grep -q '"id"' && fail "a hold is still open after the kill"
stop_agent
cleanup "$S/db"
echo "ok: tracepoint tier loads on 6.1; a foreign rm -rf in a data directory is held after 1 file, denied, 499 left; a kill -CONT loop is killed after at most 8 more"
