//! A parallel job is held at its budget, not killed (issue #14, tracepoint tier on the host).
//!
//! The tracepoint tier cannot refuse a deletion: when a job is held, every one of its tasks that
//! is deleting at that moment gets one file through and is stopped right after. The self-resume
//! limit (a held job that keeps resuming itself is killed at its 8th deletion since the hold)
//! counted those stops as resumes: a job with 16 parallel workers (`xargs -P 16 rm`, here
//! `guardrail-testkit fork-unlink 16`) was killed at its budget, half deleted, with no way to
//! approve it. Now each task's first stop at the hold is not a resume: the job is held, an
//! approve lets it finish, every file goes and every worker exits cleanly. Runs in a scratch
//! directory under /var/tmp; assertions count files on disk.
use std::time::Duration;

use guardrail_integration::*;

const BUDGET: usize = 100;
const FILES: usize = 3000;
const WORKERS: usize = 16;

#[test]
fn sixteen_parallel_workers_are_held_at_the_budget_and_finish_when_approved() {
    require_root();
    let _k = kernel_lock();
    let s = scratch();
    let victim = s.path().join("victim");
    fill(&victim, FILES);
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(BUDGET as u64, &[], &[], &cg)).expect("agent starts");
    let mut job = Job::spawn_in(
        &format!(
            "exec {} fork-unlink {WORKERS} victim >&2",
            testkit_bin().display()
        ),
        s.path(),
        Some(&cg),
    );
    let id = agent
        .wait_hold(Duration::from_secs(60))
        .expect("the parallel job is held");
    let left = settle(&victim, Duration::from_millis(1500));
    let gone = FILES - left;
    eprintln!("budget {BUDGET}, {WORKERS} workers: {gone} files gone at the hold");
    assert!(
        gone > BUDGET && gone <= BUDGET + WORKERS,
        "{gone} of {FILES} files gone: the budget {BUDGET} and at most one per worker past it"
    );
    let killed: Vec<_> = agent
        .events()
        .into_iter()
        .map(|e| e["incident"].clone())
        .filter(|i| i["outcome"] == "killed")
        .collect();
    assert!(
        killed.is_empty(),
        "the held parallel job was killed as if it resumed itself: {killed:?}\n{}",
        agent.log()
    );
    assert_eq!(agent.holds().len(), 1, "one open hold: {:?}", agent.holds());
    assert!(job.stopped(), "the job's workers are stopped");
    assert_eq!(count_files(&victim), left, "nothing deleted while held");

    agent.cli_ok(&["approve", &id.to_string()]);
    let status = job.wait(Duration::from_secs(120));
    assert!(
        status.is_some_and(|st| st.success()),
        "the approved job finishes and exits 0: {status:?}"
    );
    assert_eq!(
        count_files(&victim),
        0,
        "every file gone after the approval"
    );
    let out = job.stderr();
    assert!(
        out.contains(&format!("fork-unlink: {WORKERS} workers, 0 saw failures")),
        "every worker finished its share: {out}"
    );
    assert!(agent.stop().expect("agent stops").success());
}
