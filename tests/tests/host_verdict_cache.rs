//! The tracepoint tier's scope cache (ebpf deletion/cache.rs): a run of deletions in one
//! directory inside a target is allowed from a cached verdict. The cache must never let a
//! deletion go free that a full judgement would count: each test warms the cache as user nobody
//! (deletions through one directory fd in one thread, like `rm -rf`), changes what the verdict
//! depends on, and counts the files left once the job is held at the budget.
//!
//! Checked against a build without the invalidation (`chain_holds` and the policy generation
//! left out of the hit test): `a_directory_moved_out_of_a_target_is_counted_again` failed (no
//! hold: every file went free). `a_reload_that_drops_the_target_counts_again` still passed there:
//! between the warm-up and the deletions the test itself forks and execs (`kill -HUP`), which moves
//! the exec/fork generation and drops the entry too, and other tasks' deletions on the CPU replace
//! it; it checks what a user sees after a reload, not the policy generation alone.
use std::{path::Path, process::Command, time::Duration};

use guardrail_integration::*;

const BUDGET: u64 = 20;
const FILES: usize = 200;
const WARM: usize = 50;

fn testkit(args: &str) -> String {
    format!("{AS_NOBODY} {} {args}", testkit_bin().display())
}

/// Waits for the hold and returns how many files are left in `dir` once it has settled; the job
/// must be stopped.
fn left_at_hold(agent: &Agent, job: &Job, dir: &Path) -> usize {
    agent
        .wait_hold(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the job is held: {e:#}"));
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "the held job is stopped"
    );
    settle(dir, Duration::from_millis(700))
}

/// A subdirectory of a target, its first WARM files deleted (free, and its verdict cached), is
/// moved out of every target by the deleting process itself; the rest of its files are deleted
/// through the directory fd held since before the move. They count: the move itself and BUDGET
/// deletions reach the crossing (the tracepoint tier lets the crossing deletion through), so
/// FILES - WARM - BUDGET files are left. A cache that did not re-read the directory's ancestry
/// on a hit would have let them all go free.
#[test]
fn a_directory_moved_out_of_a_target_is_counted_again() {
    let _k = kernel_lock();
    let scene = Scene::new().open_to_others();
    let target = scene.dir("target");
    let out = scene.dir("out");
    let sub = target.join("sub");
    fill(&sub, FILES);
    chown_nobody(&target);
    chown_nobody(&out);
    let text = policy(BUDGET, &[&target], &[], &scene.cg);
    let Setup { agent, cg, s } = scene.start(&text);
    agent.require_tier(Tier::Tracepoint);
    let moved = out.join("sub");
    let mut job = Job::spawn_in(
        &testkit(&format!(
            "fd-unlink {} {WARM} rename={}",
            sub.display(),
            moved.display()
        )),
        s.path(),
        Some(&cg),
    );
    let left = left_at_hold(&agent, &job, &moved);
    assert_eq!(
        left,
        FILES - WARM - BUDGET as usize,
        "after the move, {BUDGET} deletions (the move counted once, the crossing one let \
         through) and no more"
    );
    let id = agent.hold_ids()[0];
    agent.deny_and_wait(id, &mut job);
    assert_eq!(count_files(&moved), left, "nothing deleted after the deny");
}

/// Installs since the agent started (each flips the policy slot).
fn reloads(agent: &Agent) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("guardrail: policy reloaded ("))
        .count()
}

/// Writes `text` as the agent's policy and sends SIGHUP; returns once the reload is logged and no
/// other (the policy watcher's own) has followed for a second.
fn reload(agent: &Agent, text: &str) {
    let before = reloads(agent);
    let tmp = agent.policy.with_extension("new");
    std::fs::write(&tmp, text).expect("write the new policy");
    std::fs::rename(&tmp, &agent.policy).expect("install the new policy");
    let status = Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success(), "SIGHUP sent");
    assert!(
        wait_until(Duration::from_secs(10), || reloads(agent) > before),
        "the agent reloads:\n{}",
        agent.log()
    );
    let mut seen = reloads(agent);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = reloads(agent);
        if now == seen {
            break;
        }
        seen = now;
    }
}

/// The cache warmed in a target, then the policy reloaded without that target (SIGHUP): the
/// directory's further deletions count and the job is held at the budget, with BUDGET + 1 files
/// gone after the reload (no move here: the crossing is the BUDGET + 1st deletion, let through).
/// The new policy is installed an even number of times, so the slot alone would not tell.
#[test]
fn a_reload_that_drops_the_target_counts_again() {
    let _k = kernel_lock();
    let scene = Scene::new().open_to_others();
    let target = scene.dir("target");
    let other = scene.dir("other");
    let sub = target.join("sub");
    fill(&sub, FILES);
    chown_nobody(&target);
    let text = policy(BUDGET, &[&target], &[], &scene.cg);
    let Setup { agent, cg, s } = scene.start(&text);
    agent.require_tier(Tier::Tracepoint);
    let go = s.path().join("go");
    let mut job = Job::spawn_in(
        &testkit(&format!(
            "fd-unlink {} {WARM} wait={}",
            sub.display(),
            go.display()
        )),
        s.path(),
        Some(&cg),
    );
    assert!(
        wait_until(Duration::from_secs(30), || count_files(&sub)
            == FILES - WARM),
        "the warm-up deletions in the target are free and done"
    );
    assert!(agent.holds().is_empty(), "no hold while in the target");
    // Every install flips the policy slot, so the target-less policy is installed an even number
    // of times after the warm-up: the slot is the warm-up's again and only the policy generation
    // tells the cached verdict is stale.
    let dropped = policy(BUDGET, &[&other], &[], &cg);
    reload(&agent, &dropped);
    if reloads(&agent) % 2 == 1 {
        reload(&agent, &dropped);
    }
    assert_eq!(
        reloads(&agent) % 2,
        0,
        "an even number of installs since start:\n{}",
        agent.log()
    );
    std::fs::write(&go, "").expect("touch go");
    let left = left_at_hold(&agent, &job, &sub);
    assert_eq!(
        left,
        FILES - WARM - BUDGET as usize - 1,
        "after the reload, {} deletions (the crossing one let through) and no more",
        BUDGET + 1
    );
    let id = agent.hold_ids()[0];
    agent.deny_and_wait(id, &mut job);
    assert_eq!(count_files(&sub), left, "nothing deleted after the deny");
}
