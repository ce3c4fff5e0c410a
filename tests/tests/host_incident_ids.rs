//! Incident ids are unique, whoever makes the incident (architecture issue #13, bug 4).
//!
//! The kernel numbers a crossing with an atomic add on its counter; the agent numbers the
//! incidents it makes itself (a refused shutdown, an adopted hold). The old agent took its ids
//! with a read-then-write of the same counter, which is not atomic with the kernel's add: a
//! crossing numbered in between got the same id, and `guardrail approve N` could name two
//! incidents. Now the agent's ids come from the kernel's own add (a program run with
//! BPF_PROG_TEST_RUN). Tracepoint tier on the host: many short jobs cross an `alert` rule's budget
//! (kernel ids) while a shutdown stand-in is refused again and again (agent ids); every id in the
//! event log is distinct and none is 0. No real shutdown runs: the stand-in is a copy of
//! /bin/echo called `reboot` in a scratch directory.
//!
//! The old race window was two syscalls wide (microseconds): the old agent passed this test in
//! the runs tried, so it guards the property rather than reproducing the collision on demand.
use std::{collections::BTreeMap, time::Duration};

use guardrail_integration::*;

const JOBS: usize = 6000;
const REFUSALS: usize = 120;

#[test]
fn kernel_and_agent_incidents_never_share_an_id() {
    require_root();
    let _k = kernel_lock();
    let s = scratch();
    let bin = s.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    let standin = bin.join("reboot");
    std::fs::copy("/bin/echo", &standin).expect("copying /bin/echo as the stand-in");
    let work = s.path().join("work");
    for half in 0..2 {
        let d = work.join(half.to_string());
        let st = std::process::Command::new(testkit_bin())
            .args(["fill", &(JOBS / 2).to_string()])
            .arg(&d)
            .status()
            .expect("run testkit fill");
        assert!(st.success(), "fill {}", d.display());
    }
    let cg = TestCgroup::new();
    let extra = format!(
        r#"action = "alert"

[shutdown]
remote = "block"
local = "block"
none = "block"
unknown = "block"
logind_inhibitor = false
commands = ["{}"]
"#,
        standin.display()
    );
    let agent = Agent::start(&policy_with(0, &[], &[], &cg, &extra)).expect("agent starts");
    // Two floods of jobs as fast as fork allows: each job (a session of its own) deletes one file
    // past a budget of 0, one kernel-numbered `alerted` crossing.
    let mut deleters = Job::spawn_in(
        &format!(
            "{kit} setsid-unlink {n} work/0 & {kit} setsid-unlink {n} work/1 & wait",
            kit = testkit_bin().display(),
            n = JOBS / 2
        ),
        s.path(),
        Some(&cg),
    );
    // Meanwhile the agent numbers a refusal of its own for every run of the stand-in.
    let mut refused = Job::spawn(
        &format!(
            "i=0; while [ $i -lt {REFUSALS} ]; do {} x >/dev/null 2>&1; i=$((i + 1)); done",
            standin.display()
        ),
        s.path(),
    );
    assert!(
        deleters.wait(Duration::from_secs(600)).is_some(),
        "the deleting jobs end"
    );
    assert!(
        refused.wait(Duration::from_secs(600)).is_some(),
        "the refused stand-ins end"
    );
    let counts = |agent: &Agent| {
        let mut alerted = 0;
        let mut refusals = 0;
        for e in agent.events() {
            let inc = &e["incident"];
            match inc["outcome"].as_str() {
                Some("alerted") => alerted += 1,
                // Refused (LSM) or stopped and killed after its message (tracepoint).
                Some("refused" | "killed") if inc["kind"] == "shutdown" => refusals += 1,
                _ => {}
            }
        }
        (alerted, refusals)
    };
    // Every refusal is reported; crossings can outrun the agent (a full ring drops events, which
    // the agent counts), so the test waits until the log stops growing and checks what is there.
    let mut last = (0, 0);
    let quiet = wait_until(Duration::from_secs(400), || {
        std::thread::sleep(Duration::from_secs(2));
        let now = counts(&agent);
        let settled = now == last && now.1 == REFUSALS;
        last = now;
        settled
    });
    assert!(
        quiet,
        "every refusal reported, then the log settles (alerted, refused): {last:?}, wanted (<= {JOBS}, {REFUSALS})\n{}",
        agent.log()
    );
    eprintln!("alerted crossings recorded: {} of {JOBS}", last.0);
    assert!(
        last.0 >= JOBS / 10,
        "too few crossings recorded to prove anything: {last:?}"
    );
    let mut by_id: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for e in agent.events() {
        let inc = &e["incident"];
        if let Some(id) = inc["id"].as_u64() {
            by_id.entry(id).or_default().push(format!(
                "{} {} (pid {})",
                inc["kind"], inc["outcome"], inc["pid"]
            ));
        }
    }
    assert!(
        !by_id.contains_key(&0),
        "an incident without an id: {:?}",
        by_id.get(&0)
    );
    let shared: Vec<_> = by_id.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        shared.is_empty(),
        "{} ids name more than one incident: {shared:?}",
        shared.len()
    );
    assert_eq!(by_id.len(), last.0 + REFUSALS, "one id per incident");
    assert!(agent.stop().expect("agent stops").success());
}
