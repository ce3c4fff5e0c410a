#!/bin/sh
# vm-timeout: 1500
# What each kernel tier costs, side by side in one boot (run by `cargo xtask bench`, not by the
# test command's VM steps: it asserts nothing, it measures). Rounds interleave the tiers so that
# a noisy moment hits all of them. For each: an exec loop (the shutdown guard's exec programs; in
# the fmod_ret tier the security_bprm_check and security_file_open trampolines), a loop of
# capability checks (chown as root: security_capable, a trampoline in the fmod_ret tier only) and
# an rm -rf of a tree outside every target (the deletion programs). Sizes come from
# /bench-sizes ("ROUNDS EXECS CHOWNS FILES"). Output: one TIERCOST line per tier and round.
S=$GUARDRAIL_VM_SCRATCH
KIT=/bin/guardrail-testkit
# Without /bench-sizes (`cargo xtask vm --cases-dir tests/vm/bench`): the quick sizes.
if [ -r /bench-sizes ]; then read -r ROUNDS EXECS CHOWNS FILES </bench-sizes; else
    ROUNDS=1 EXECS=20 CHOWNS=1000 FILES=200; fi
TIERS="none tracepoint fmodret"
grep -q bpf /sys/kernel/security/lsm && TIERS="$TIERS lsm"
cat >"$S/policy.toml" <<POLICY
mode = "enforce"
[deletion]
budget = 100000000
window = "10m"
action = "hold"
hold_timeout = "10m"
on_deny = "kill"
targets = []
protected_roots = ["/"]
protect_mount_points = false
POLICY
touch "$S/owned" && chown 65534:65534 "$S/owned"
num() { sed -n "s/.* in \([0-9]*\) ns/\1/p"; }
r=1
while [ $r -le "$ROUNDS" ]; do
    for t in $TIERS; do
        AGENT=
        if [ "$t" != none ]; then
            rm -f "$S/agent.log"
            /bin/guardrail agent --tier "$t" --policy "$S/policy.toml" --socket "$S/gr.sock" \
                --event-log "$S/events.jsonl" >"$S/agent.log" 2>&1 &
            AGENT=$!
            i=0
            until grep -q "guardrail: ready" "$S/agent.log" 2>/dev/null; do
                kill -0 "$AGENT" 2>/dev/null || { cat "$S/agent.log"; echo "FAIL: agent --tier $t exited"; exit 1; }
                i=$((i + 1)); [ $i -gt 900 ] && { echo "FAIL: agent --tier $t not ready"; exit 1; }
                sleep 0.1
            done
            grep -q "tier $t in force" "$S/agent.log" || { cat "$S/agent.log"; echo "FAIL: tier $t not in force"; exit 1; }
        fi
        $KIT fill "$FILES" "$S/tree/a" >/dev/null || exit 1
        e=$($KIT exec-loop "$EXECS" | num)
        c=$($KIT chown-loop "$CHOWNS" "$S/owned" | num)
        d=$($KIT timed-rm-rf "$S/tree" | num)
        echo "TIERCOST round=$r tier=$t exec_ns=$((e / EXECS)) chown_ns=$((c / CHOWNS)) rm_ns=$((d / FILES))"
        if [ -n "$AGENT" ]; then
            kill -TERM "$AGENT"; wait "$AGENT" || { echo "FAIL: agent --tier $t exit status"; exit 1; }
        fi
    done
    r=$((r + 1))
done
