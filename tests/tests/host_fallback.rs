//! The `userspace` tier (no BPF): driven directly, without a daemon (fanotify on the filesystem of
//! /var/tmp, which this host has, and inotify forced), and end to end through
//! `guardrail agent --tier userspace`. Every scenario runs in a scratch directory under /var/tmp;
//! the small budget applies only to jobs in the test's own cgroup (fanotify sees the whole
//! filesystem, so every other job on the machine is under the unlimited default rule).
use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use guardrail_agent::{
    fallback::{Fallback, PROMISED_OVERSHOOT, UNKNOWN_JOB, Watch},
    sensor::KernelPolicy,
};
use guardrail_common::*;
use guardrail_integration::*;

const BUDGET: u64 = 100;
const FILES: usize = 10_000;
/// The bound the docs promise for fanotify (fallback.rs, probe.rs, README).
const FANOTIFY_PROMISE: u64 = PROMISED_OVERSHOOT;
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

/// A scratch tree with a target and a protected root inside, and the test's cgroup: the tier is
/// driven in-process, without an agent.
fn setup() -> Scene {
    let scene = Scene::new();
    scene.dir("target");
    scene.dir("protected");
    scene
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
fn runaway(fb: &mut Fallback, s: &Scene, script: &str, promise: u64) -> (u64, Job) {
    let victim = s.path().join("victim");
    fill(&victim, FILES);
    let job = Job::spawn_in(script, s.path(), Some(&s.cg));
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

fn fanotify(s: &Scene) -> Fallback {
    let fb = Fallback::new(
        &tables(BUDGET, &s.dir("target"), &s.dir("protected"), &s.cg),
        &[s.path().to_path_buf()],
        Watch::Fanotify,
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
    assert_eq!(count_files(&s.path().join("victim")), 0);
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

/// The watcher is not run at all until the runaway is over: eight forked workers delete 2000
/// files and exit before a single event is read, so /proc names none of them. Who forked them
/// (the process events connector) still names their job: the shell that started them, still
/// running, is held as a guess.
#[test]
fn fanotify_names_the_job_of_workers_that_exited_before_they_were_read() {
    let _k = kernel_lock();
    let s = setup();
    let mut fb = fanotify(&s);
    assert!(
        fb.names_exited_processes(),
        "root may subscribe to the process events connector"
    );
    let victim = s.path().join("victim");
    fill(&victim, 2000);
    let kit = env!("CARGO_BIN_EXE_guardrail-testkit");
    let job = Job::spawn_in(
        &format!("{kit} fork-unlink 8 victim; sleep 60"),
        s.path(),
        Some(&s.cg),
    );
    let pgid = job.pgid();
    let workers_gone = || {
        pids_in_group(pgid).iter().all(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| !c.starts_with("guardrail-test"))
        })
    };
    assert!(
        wait_until(Duration::from_secs(60), || count_files(&victim) == 0
            && workers_gone()),
        "the workers deleted everything and exited ({} files left)",
        count_files(&victim)
    );
    let events = drive(&mut fb, Duration::from_secs(30), |ev| {
        crossed_by(ev, pgid).is_some()
    });
    let ev = crossed_by(&events, pgid).unwrap_or_else(|| {
        panic!(
            "no crossing for job {pgid}; events: {:?}",
            events
                .iter()
                .map(|e| (e.kind, e.pgid, e.flags))
                .collect::<Vec<_>>()
        )
    });
    assert_ne!(ev.flags & EVF_GUESSED, 0, "flagged as a guess");
    assert_ne!(ev.flags & EVF_SIGNALLED, 0, "the job was signalled");
    assert_eq!(ev.count, BUDGET + 1, "the crossing deletion");
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "the job's shell is held"
    );
}

#[test]
fn fanotify_never_counts_deletions_inside_a_target() {
    let _k = kernel_lock();
    let s = setup();
    let mut fb = fanotify(&s);
    // 3000 files in nested directories below the target: 30 times the budget.
    let build = s.dir("target").join("build");
    for d in 0..30 {
        fill(&build.join(format!("d{d:02}")).join("sub"), 100);
    }
    let mut job = Job::spawn_in("rm -rf build", &s.dir("target"), Some(&s.cg));
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
    // The deleting process stays alive after the rmdir, so /proc still names its job when the
    // event is read (a deleter that exits at once is attributed by guesswork: a documented gap of
    // this tier, not what this test is about).
    let job = Job::spawn_in(
        "exec python3 -c 'import os, time; os.rmdir(\"protected\"); time.sleep(60)'",
        s.path(),
        Some(&s.cg),
    );
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
    let mut policy = tables(BUDGET, &s.dir("target"), &s.dir("protected"), &s.cg);
    policy.rules[0] = rule(BUDGET);
    let mut fb =
        Fallback::new(&policy, &[s.path().to_path_buf()], Watch::Inotify).expect("inotify");
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
        &tables(BUDGET, &s.dir("target"), &s.dir("protected"), &s.cg),
        &[s.path().to_path_buf()],
        Watch::Inotify,
    )
    .expect("inotify");
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    // The watcher learns of `victim` from its creation event and only then watches it: let it
    // read that before `rm` starts (on a busy host rm got 80 files in first).
    let _ = drive(&mut fb, Duration::from_millis(500), |_| false);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&s.cg));
    // Watched on for 2 s after the job ended: on a busy host the watcher reads the last
    // deletions' events after `rm` has exited (it once counted 920 of 1000 when it stopped at once).
    let mut ended: Option<std::time::Instant> = None;
    let events = drive(&mut fb, Duration::from_secs(60), |_| {
        if let Some(t) = ended {
            return t.elapsed() > Duration::from_secs(2);
        }
        if job.child.try_wait().ok().flatten().is_some() {
            ended = Some(std::time::Instant::now());
        }
        false
    });
    assert!(ended.is_some(), "not stopped");
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

// --- end to end: `guardrail agent --tier userspace` -----------------------------------------

fn agent_userspace() -> Setup {
    let scene = Scene::new();
    let target = scene.dir("target");
    let text = policy(BUDGET, &[&target], &[], &scene.cg);
    let run = scene.start_with(&text, &["--tier", "userspace"]);
    run.agent.require_tier(Tier::Userspace);
    assert!(
        run.agent.saw("fanotify on the filesystem of /"),
        "{}",
        run.agent.log()
    );
    run
}

/// 3000 files below a target (30 times the budget) deleted by the test job: never held. Returns
/// the inode numbers of the directories it deleted (the filesystem may give them to new ones).
fn target_is_free(r: &Setup) -> HashSet<u64> {
    let build = r.s.path().join("target").join("build");
    for d in 0..30 {
        fill(&build.join(format!("d{d:02}")), 100);
    }
    let mut deleted_dirs: HashSet<u64> = std::fs::read_dir(&build)
        .expect("read build")
        .map(|e| e.expect("entry").metadata().expect("stat").ino())
        .collect();
    deleted_dirs.insert(std::fs::metadata(&build).expect("stat build").ino());
    let mut job = Job::spawn_in("rm -rf target/build", r.s.path(), Some(&r.cg));
    assert!(
        job.wait(Duration::from_secs(60))
            .is_some_and(|s| s.success()),
        "the job inside the target runs to the end"
    );
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        r.agent.holds().is_empty(),
        "deletions inside a target are free"
    );
    assert!(!build.exists());
    deleted_dirs
}

/// `rm -rf` over FILES files outside the target: held within the promise. Returns the hold.
fn held_runaway(r: &Setup) -> (Job, u64) {
    let victim = r.s.path().join("victim");
    fill(&victim, FILES);
    held_runaway_in(r, &victim)
}

/// [`held_runaway`] in `victim` (already filled with FILES files).
fn held_runaway_in(r: &Setup, victim: &Path) -> (Job, u64) {
    let name = victim.file_name().expect("victim name").to_string_lossy();
    let job = Job::spawn_in(&format!("rm -rf {name}"), r.s.path(), Some(&r.cg));
    let id = r
        .agent
        .wait_hold(Duration::from_secs(30))
        .expect("the runaway is held");
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "every process of the held job is stopped"
    );
    let left = settle(victim, Duration::from_millis(500));
    let gone = (FILES - left) as u64;
    let overshoot = gone.saturating_sub(BUDGET);
    eprintln!(
        "guardrail agent --tier userspace, rm -rf: {gone} files gone at the hold, {overshoot} past the budget of {BUDGET}"
    );
    assert!(gone > BUDGET, "the budget itself is never stopped early");
    assert!(
        overshoot <= PROMISED_OVERSHOOT,
        "{overshoot} files past the budget; the docs promise at most {PROMISED_OVERSHOOT}"
    );
    let holds = r.agent.holds();
    assert_eq!(holds.len(), 1, "one hold for the job: {holds:?}");
    assert_eq!(holds[0]["pgid"].as_u64(), Some(job.pgid() as u64));
    assert_eq!(holds[0]["tier"].as_str(), Some("userspace"));
    (job, id)
}

#[test]
fn agent_userspace_holds_rm_rf_and_approve_finishes_it() {
    let _k = kernel_lock();
    let r = agent_userspace();
    let (mut job, id) = held_runaway(&r);
    let out = r.agent.cli(&["approve", &id.to_string(), "--for-job"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        job.wait(Duration::from_secs(60))
            .is_some_and(|s| s.success()),
        "the approved job finishes"
    );
    assert_eq!(count_files(&r.s.path().join("victim")), 0);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        r.agent.holds().is_empty(),
        "approved for the job: no new hold"
    );
    let seen = r.agent.outcomes_of(id);
    assert!(
        seen.iter().any(|o| o == "held") && seen.iter().any(|o| o == "approved"),
        "{seen:?}"
    );
}

/// A directory for the runaway, outside the target, made where the filesystem hands out the inode
/// number of a directory in `deleted_dirs` if it does within a few tries (ext4 mostly does): the
/// agent must judge it by where it is, not by what it knew of the deleted directory.
fn victim_on_a_reused_inode(r: &Setup, deleted_dirs: &HashSet<u64>) -> PathBuf {
    for n in 0..64 {
        let candidate = r.s.path().join(format!("victim{n:02}"));
        std::fs::create_dir(&candidate).expect("mkdir victim");
        let ino = std::fs::metadata(&candidate).expect("stat victim").ino();
        if deleted_dirs.contains(&ino) {
            eprintln!(
                "{} has inode {ino}, a directory the first phase deleted inside the target",
                candidate.display()
            );
            return candidate;
        }
    }
    eprintln!("no new directory got a deleted directory's inode number this time");
    r.s.path().join("victim00")
}

/// Issue 4: in one agent, a phase of deletions inside the target (free), then a runaway outside
/// it right after, in a directory that may have a deleted one's inode number: held, then denied.
#[test]
fn agent_userspace_target_is_free_and_deny_ends_the_runaway() {
    let _k = kernel_lock();
    let r = agent_userspace();
    let deleted_dirs = target_is_free(&r);
    let victim = victim_on_a_reused_inode(&r, &deleted_dirs);
    fill(&victim, FILES);
    let (mut job, id) = held_runaway_in(&r, &victim);
    let out = r.agent.cli(&["deny", &id.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = job
        .wait(Duration::from_secs(20))
        .expect("the denied job ends");
    assert!(!status.success(), "killed, not finished: {status:?}");
    assert!(count_files(&victim) > 0, "the denied job deleted no more");
    let seen = r.agent.outcomes_of(id);
    assert!(seen.iter().any(|o| o == "denied"), "{seen:?}");
}
