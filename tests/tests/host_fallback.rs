//! The `userspace` tier (no BPF) driven directly, without a daemon: fanotify on the filesystem of
//! /var/tmp (this host has it), and inotify forced. Every scenario runs in a scratch directory
//! under /var/tmp; the small budget applies only to jobs in the test's own cgroup (fanotify sees
//! the whole filesystem, so every other job on the machine is under the unlimited default rule).
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use guardrail_agent::{
    fallback::{Fallback, UNKNOWN_JOB},
    sensor::KernelPolicy,
};
use guardrail_common::*;
use guardrail_integration::*;

const BUDGET: u64 = 100;
const FILES: usize = 10_000;
/// Provisional bound for fanotify, not yet promised in the docs: debug builds on the shared 2-core
/// host measured 94-193 before directory handles resolved (EBADF on an O_PATH mount fd) and
/// 2900-3300 after (every other job's directories on the root filesystem are now resolved on
/// the same thread). To be set from release-build measurements once that cost is cut.
const FANOTIFY_PROMISE: u64 = 500;
/// inotify attributes by guess at the crossing (a /proc scan), so its stop lands later.
const INOTIFY_PROMISE: u64 = 2000;

fn kdev(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).expect("stat");
    (kernel_dev_from_user(m.dev()), m.ino())
}

fn rule(budget: u64) -> RuleParams {
    RuleParams {
        budget,
        window_ns: 600_000_000_000,
        action: ACTION_HOLD,
        flags: 0,
    }
}

/// The kernel tables of the harness's `policy()`: rule 1 (the test cgroup) gets `budget` outside
/// `target`; the default rule is unlimited; `protected` may not be deleted.
fn tables(budget: u64, target: &Path, protected: &Path, cg: &TestCgroup) -> KernelPolicy {
    KernelPolicy {
        mode: MODE_ENFORCE,
        dirs: vec![
            (
                kdev(target),
                DirRule {
                    kind: DIR_TARGET,
                    data_dir_id: 0,
                    target_rules: 0b11,
                    data_owner_rules: 0,
                },
            ),
            (
                kdev(protected),
                DirRule {
                    kind: DIR_PROTECTED_ROOT,
                    ..DirRule::default()
                },
            ),
        ],
        rules: vec![rule(100_000_000), rule(budget)],
        cgroups: vec![(std::fs::metadata(&cg.path).expect("cgroup").ino(), 1)],
        ..KernelPolicy::default()
    }
}

struct Setup {
    s: tempfile::TempDir,
    cg: TestCgroup,
    target: PathBuf,
    protected: PathBuf,
}

fn setup() -> Setup {
    require_root();
    let s = scratch();
    let target = s.path().join("target");
    let protected = s.path().join("protected");
    std::fs::create_dir_all(&target).expect("mkdir target");
    std::fs::create_dir_all(&protected).expect("mkdir protected");
    Setup {
        s,
        cg: TestCgroup::new(),
        target,
        protected,
    }
}

/// Polls and processes until `until` says stop or `timeout` passes; returns every event.
fn drive(
    fb: &mut Fallback,
    timeout: Duration,
    mut until: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut all = Vec::new();
    let start = Instant::now();
    while start.elapsed() < timeout {
        let mut fds = [PollFd::new(fb.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(50u16));
        all.extend(fb.process());
        if until(&all) {
            break;
        }
    }
    all
}

fn crossed_by(events: &[Event], pgid: u32) -> Option<Event> {
    events
        .iter()
        .find(|e| e.kind == EV_BUDGET_CROSSED && e.pgid == pgid)
        .copied()
}

/// The runaway scenario: `script` over FILES out-of-scope files is stopped; returns the overshoot
/// and the (stopped) job.
fn runaway(fb: &mut Fallback, s: &Setup, script: &str, promise: u64) -> (u64, Job) {
    let victim = s.s.path().join("victim");
    fill(&victim, FILES);
    let job = Job::spawn_in(script, s.s.path(), Some(&s.cg));
    let pgid = job.pgid();
    let events = drive(fb, Duration::from_secs(120), |ev| {
        crossed_by(ev, pgid).is_some()
    });
    let ev = crossed_by(&events, pgid).unwrap_or_else(|| {
        panic!(
            "{script}: no crossing for job {pgid} ({} files left)",
            count_files(&victim)
        )
    });
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "{script}: every process of the job is stopped"
    );
    // Drain what was still queued: it is overshoot, never a second crossing nor a "retry".
    let later = drive(fb, Duration::from_millis(700), |_| false);
    let left = settle(&victim, Duration::from_millis(500));
    let gone = (FILES - left) as u64;
    let overshoot = gone.saturating_sub(BUDGET);
    eprintln!(
        "userspace tier ({}) {script}: {gone} files gone at the stop, {overshoot} past the budget of {BUDGET}",
        fb.mechanism()
    );
    assert_eq!(
        ev.count,
        BUDGET + 1,
        "the event reports the crossing deletion"
    );
    assert_ne!(
        ev.flags & EVF_USERSPACE,
        0,
        "flagged as seen from userspace"
    );
    assert_ne!(ev.flags & EVF_SIGNALLED, 0, "the job was signalled");
    assert_eq!(ev.flags & (EVF_TRACEPOINT | EVF_REFUSED), 0);
    assert!(ev.incident > 0);
    let key = JobKey {
        sid: ev.sid,
        pgid: ev.pgid,
    };
    assert_eq!(fb.job(&key).map(|j| j.state), Some(JOB_HELD));
    assert!(
        !later
            .iter()
            .any(|e| e.pgid == pgid && matches!(e.kind, EV_BUDGET_CROSSED | EV_HELD_RETRY)),
        "one event per state change, not per file"
    );
    assert!(gone > BUDGET, "the budget itself is never stopped early");
    assert!(
        overshoot <= promise,
        "{script}: {overshoot} files past the budget; the docs promise at most {promise}"
    );
    (overshoot, job)
}

fn fanotify(s: &Setup) -> Fallback {
    let fb = Fallback::new(
        &tables(BUDGET, &s.target, &s.protected, &s.cg),
        &[s.s.path().to_path_buf()],
        false,
    )
    .expect("fanotify watcher");
    assert_eq!(fb.mechanism(), "fanotify", "this host has fanotify");
    fb
}

#[test]
fn fanotify_stops_rm_rf_at_the_budget_and_approve_lets_it_finish() {
    let _k = kernel_lock();
    let s = setup();
    let mut fb = fanotify(&s);
    let (_, mut held) = runaway(&mut fb, &s, "rm -rf victim", FANOTIFY_PROMISE);
    // Approve as the daemon does: allowance, counters reset, SIGCONT.
    let (key, mut job) = fb
        .jobs()
        .into_iter()
        .find(|(_, j)| j.state == JOB_HELD)
        .expect("the held job");
    job.state = JOB_ACTIVE;
    job.allowance = ALLOWANCE_UNLIMITED;
    job.count = 0;
    job.prev_count = 0;
    job.incident = 0;
    fb.set_job(&key, &job);
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(key.pgid as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("resume our job");
    let mut done = false;
    let events = drive(&mut fb, Duration::from_secs(60), |_| {
        if done {
            return true;
        }
        done = held.child.try_wait().ok().flatten().is_some();
        false
    });
    assert!(done, "the approved job finishes");
    assert!(
        !events.iter().any(|e| e.pgid == key.pgid),
        "approved for the job: no more events"
    );
    assert_eq!(count_files(&s.s.path().join("victim")), 0);
}

#[test]
fn fanotify_stops_find_delete() {
    let _k = kernel_lock();
    let s = setup();
    let mut fb = fanotify(&s);
    runaway(&mut fb, &s, "find victim -type f -delete", FANOTIFY_PROMISE);
}

#[test]
fn fanotify_stops_forked_workers_as_one_job() {
    let _k = kernel_lock();
    let s = setup();
    let mut fb = fanotify(&s);
    let kit = env!("CARGO_BIN_EXE_guardrail-testkit");
    runaway(
        &mut fb,
        &s,
        &format!("{kit} fork-unlink 8 victim"),
        FANOTIFY_PROMISE,
    );
}

#[test]
fn fanotify_never_counts_deletions_inside_a_target() {
    let _k = kernel_lock();
    let s = setup();
    let mut fb = fanotify(&s);
    // 3000 files in nested directories below the target: 30 times the budget.
    let build = s.target.join("build");
    for d in 0..30 {
        fill(&build.join(format!("d{d:02}")).join("sub"), 100);
    }
    let mut job = Job::spawn_in("rm -rf build", &s.target, Some(&s.cg));
    let pgid = job.pgid();
    let mut done = false;
    let events = drive(&mut fb, Duration::from_secs(60), |_| {
        // Keep draining a little after the job ended.
        if done {
            return true;
        }
        done = job.child.try_wait().ok().flatten().is_some();
        false
    });
    assert!(done, "the job finished unstopped");
    assert!(
        events.iter().all(|e| e.pgid != pgid),
        "no event for deletions inside a target"
    );
    let counted = fb
        .jobs()
        .into_iter()
        .filter(|(k, _)| k.pgid == pgid)
        .map(|(_, j)| j.total)
        .sum::<u64>();
    assert_eq!(counted, 0, "no deletion inside the target was counted");
    assert!(!build.exists());
}

#[test]
fn fanotify_protected_root_deleted_stops_the_job() {
    let _k = kernel_lock();
    let s = setup();
    let mut fb = fanotify(&s);
    assert_eq!(fb.unlocated_protected_roots(), 0);
    let job = Job::spawn_in("rmdir protected; sleep 60", s.s.path(), Some(&s.cg));
    let pgid = job.pgid();
    let events = drive(&mut fb, Duration::from_secs(30), |ev| {
        ev.iter()
            .any(|e| e.kind == EV_PROTECTED_ROOT && e.pgid == pgid)
    });
    let ev = events
        .iter()
        .find(|e| e.kind == EV_PROTECTED_ROOT && e.pgid == pgid)
        .expect("protected root event for the job");
    assert_ne!(ev.flags & EVF_SIGNALLED, 0);
    assert!(ev.incident > 0);
    let name = ev.path[0].split(|b| *b == 0).next().unwrap_or_default();
    assert_eq!(name, b"protected", "the event names the deleted entry");
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "the job is stopped (the root is already gone: the tier cannot refuse)"
    );
}

#[test]
fn inotify_guesses_the_job_from_the_open_directory() {
    let _k = kernel_lock();
    let s = setup();
    // inotify names no process: everything counts for the unknown job under the default rule.
    // Watching only the scratch tree makes a default budget safe here.
    let mut policy = tables(BUDGET, &s.target, &s.protected, &s.cg);
    policy.rules[0] = rule(BUDGET);
    let mut fb = Fallback::new(&policy, &[s.s.path().to_path_buf()], true).expect("inotify");
    assert_eq!(fb.mechanism(), "inotify");
    runaway(&mut fb, &s, "rm -rf victim", INOTIFY_PROMISE);
    let unknown = fb.job(&UNKNOWN_JOB).expect("the unknown job counted");
    assert!(unknown.incident > 0);
}

#[test]
fn inotify_cannot_attribute_to_the_jobs_own_rule() {
    let _k = kernel_lock();
    let s = setup();
    // The harness's cgroup-scoped rule never applies under inotify: no process, no cgroup. The
    // job runs to the end under the (unlimited) default rule; this is the tier's documented gap.
    let mut fb = Fallback::new(
        &tables(BUDGET, &s.target, &s.protected, &s.cg),
        &[s.s.path().to_path_buf()],
        true,
    )
    .expect("inotify");
    let victim = s.s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.s.path(), Some(&s.cg));
    let mut done = false;
    let events = drive(&mut fb, Duration::from_secs(60), |_| {
        if done {
            return true;
        }
        done = job.child.try_wait().ok().flatten().is_some();
        false
    });
    assert!(done, "not stopped");
    assert!(events.is_empty());
    let unknown = fb.job(&UNKNOWN_JOB).expect("counted for the unknown job");
    assert!(
        unknown.total >= 1000,
        "every deletion counted for the unknown job, got {}",
        unknown.total
    );
}

#[test]
fn selftest_measurement_reports_a_bounded_overshoot() {
    let _k = kernel_lock();
    require_root();
    let over =
        guardrail_agent::fallback::measure_blast_radius(Path::new("/var/tmp"), 100, 5000, false)
            .expect("measured");
    eprintln!("measure_blast_radius (fanotify): {over} files past a budget of 100");
    assert!(over <= FANOTIFY_PROMISE);
    assert!(!Path::new(&format!("/var/tmp/guardrail-blast-{}", std::process::id())).exists());
}
