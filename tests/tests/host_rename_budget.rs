//! Moving files away is deleting them where they were (issue 14, item 2), on the host kernel
//! (tracepoint tier). A rename to another directory counts against the budget of the source's
//! scope: `mv` out of a directory outside the job's targets into a target (where deleting them
//! afterwards is free) is held at the budget, and moving files out of a data directory by a job
//! not named for it stops the job after one file. Renames within one directory and moves inside
//! one target stay free. Every mover runs as user nobody in the test cgroup; every scenario runs
//! in a scratch directory under /var/tmp and every assertion counts files on disk or reads the
//! incident an admin would read.
use std::{path::Path, time::Duration};

use guardrail_integration::*;

const FILES: usize = 1200;
const BUDGET: u64 = 100;
const SESSION_BUDGET: u64 = 300;

/// A scene open to nobody with a declared target `target`, a non-target directory `victim` of
/// FILES files (both nobody's), and an agent giving the test cgroup's jobs BUDGET (and, with
/// `session`, a login session SESSION_BUDGET, shared by the test rule's jobs).
fn setup(session: bool, extra: &str) -> (Setup, std::path::PathBuf, std::path::PathBuf) {
    let scene = Scene::new().open_to_others();
    let target = scene.dir("target");
    let victim = scene.path().join("victim");
    fill(&victim, FILES);
    chown_nobody(&victim);
    chown_nobody(&target);
    let levels = if session {
        format!(
            "shared_budgets = true\n[deletion.session]\nbudget = {SESSION_BUDGET}\nwindow = \"10m\"\naction = \"hold\"\n"
        )
    } else {
        String::new()
    };
    let text = policy_with(
        BUDGET,
        &[&target],
        &[],
        &scene.cg,
        &format!("{levels}{extra}"),
    );
    let st = scene.start(&text);
    st.agent.require_tier(Tier::Tracepoint);
    (st, victim, target)
}

/// `body` run by /bin/sh as nobody in `cwd`, in the test cgroup; with `login`, in a new audit
/// session (login uid 65534), as pam_loginuid makes one at a login.
fn as_nobody(body: &str, cwd: &Path, cg: &TestCgroup, login: bool) -> Job {
    let login = if login {
        "echo 65534 > /proc/self/loginuid || exit 90\n"
    } else {
        ""
    };
    Job::spawn_in(
        &format!("{login}exec {AS_NOBODY} /bin/sh -c '{body}'"),
        cwd,
        Some(cg),
    )
}

fn held_incident(agent: &Agent, id: u64) -> serde_json::Value {
    agent
        .wait_incident(Duration::from_secs(10), |i| {
            i["id"].as_u64() == Some(id) && i["outcome"] == "held"
        })
        .unwrap_or_else(|| panic!("incident {id} in the event log:\n{}", agent.log()))
}

fn no_incident(agent: &Agent) {
    let incs = agent.incidents();
    assert!(incs.is_empty(), "no incident: {incs:?}");
    assert!(agent.holds().is_empty(), "nothing held");
}

/// The reproduced evasion, one `mv` of 1,200 files out of a non-target directory into a target.
/// Old code: the tracepoint tier judged only a rename's destination, which is in a target, so all
/// 1,200 files moved with no hold (and deleting them there would be free). Now each move counts
/// against the job's budget: held right after the 101st (the tier's one past the budget), the
/// incident says so, and `deny` ends the job with nothing more moved.
#[test]
fn one_mv_out_of_scope_into_a_target_is_held_at_the_budget() {
    let _k = kernel_lock();
    let (st, victim, target) = setup(false, "");
    let job = as_nobody("mv f* ../target/", &victim, &st.cg, false);
    let id = st
        .agent
        .wait_hold(Duration::from_secs(60))
        .expect("the mv is held");
    let left = settle(&victim, Duration::from_millis(700));
    assert_eq!(
        left,
        FILES - BUDGET as usize - 1,
        "files left in the source"
    );
    assert_eq!(count_files(&target), BUDGET as usize + 1, "files moved");
    let inc = held_incident(&st.agent, id);
    assert_eq!(inc["kind"], "budget_crossed", "{inc}");
    assert_eq!(
        inc["reason"],
        format!(
            "{} deletions outside the deletion targets within 10m (budget {BUDGET}, rule test-job)",
            BUDGET + 1
        ),
        "{inc}"
    );
    st.agent.cli_ok(&["deny", &id.to_string()]);
    drop(job);
    assert!(
        wait_until(Duration::from_secs(10), || st.agent.holds().is_empty()),
        "the denied hold closes"
    );
    assert_eq!(
        count_files(&victim),
        FILES - BUDGET as usize - 1,
        "nothing more moved"
    );
}

/// The same as a loop of `setsid mv`, one file and one job each, in one login session: no job
/// reaches its own budget, the session's does. Old code: all 1,200 files moved, nothing held.
#[test]
fn a_loop_of_setsid_mv_is_held_at_the_session_budget() {
    let _k = kernel_lock();
    let (st, victim, _target) = setup(true, "");
    let job = as_nobody(
        r#"for f in f*; do setsid mv "$f" ../target/; done"#,
        &victim,
        &st.cg,
        true,
    );
    let id = st
        .agent
        .wait_hold(Duration::from_secs(180))
        .expect("the session is held");
    let inc = held_incident(&st.agent, id);
    let left = settle(&victim, Duration::from_millis(700));
    assert_eq!(
        left,
        FILES - SESSION_BUDGET as usize - 1,
        "files left in the source"
    );
    assert_eq!(inc["level"], "session", "{inc}");
    let reason = inc["reason"].as_str().unwrap_or_default();
    let want = format!(
        "deleted {n} files outside targets in 10m across {n} jobs (budget {SESSION_BUDGET} per session)",
        n = SESSION_BUDGET + 1
    );
    assert!(reason.ends_with(&want), "reason {reason:?}, want {want:?}");
    drop(job);
    st.agent.cli_ok(&["deny", &id.to_string()]);
    assert!(
        wait_until(Duration::from_secs(10), || st.agent.holds().is_empty()),
        "the denied hold closes"
    );
    assert_eq!(
        count_files(&victim),
        FILES - SESSION_BUDGET as usize - 1,
        "nothing more moved"
    );
}

/// 1,000 renames within one directory outside every target (`mv a b`, `mv b a`: what editors and
/// logrotate do) delete nothing and are never held, far past the budget of 100. Old code: every
/// rename whose destination was outside scope counted, so the job was held at the 101st.
#[test]
fn renames_within_one_directory_are_never_held() {
    let _k = kernel_lock();
    let (st, victim, _target) = setup(false, "");
    let dir = victim.join("sub");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("a"), b"the file's bytes\n").expect("write");
    chown_nobody(&dir);
    let mut job = as_nobody(
        "for i in $(seq 500); do mv a b && mv b a || exit 1; done",
        &dir,
        &st.cg,
        false,
    );
    let status = job
        .wait(Duration::from_secs(180))
        .expect("the loop finishes");
    assert!(status.success(), "loop: {status}");
    assert_eq!(
        std::fs::read(dir.join("a")).expect("a is there"),
        b"the file's bytes\n"
    );
    assert_eq!(count_files(&dir), 1);
    no_incident(&st.agent);
}

/// Moving 1,200 files between two subdirectories of one declared target is free (the source is
/// in the job's target), far past the budget.
#[test]
fn moves_inside_one_target_are_free() {
    let _k = kernel_lock();
    let (st, _victim, target) = setup(false, "");
    let (a, b) = (target.join("a"), target.join("b"));
    fill(&a, FILES);
    std::fs::create_dir(&b).expect("mkdir");
    chown_nobody(&target);
    let mut job = as_nobody("mv f* ../b/", &a, &st.cg, false);
    let status = job.wait(Duration::from_secs(120)).expect("mv finishes");
    assert!(status.success(), "mv: {status}");
    assert_eq!(count_files(&a), 0);
    assert_eq!(count_files(&b), FILES);
    no_incident(&st.agent);
}

/// A job not named for a data directory moves its files out (to a directory outside every
/// target): in this tier the first move goes through and the job is stopped right after it,
/// as for a deletion there. Old code: only the destination (outside scope) was judged, against a
/// budget of 100,000: all 1,200 files left the data directory, nothing held.
#[test]
fn a_foreign_job_moving_files_out_of_a_data_dir_is_stopped_after_one() {
    let _k = kernel_lock();
    let scene = Scene::new().open_to_others();
    let target = scene.dir("target");
    let data = scene.path().join("data");
    let elsewhere = scene.path().join("elsewhere");
    fill(&data.join("sub"), FILES);
    std::fs::create_dir(&elsewhere).expect("mkdir");
    chown_nobody(&data);
    chown_nobody(&elsewhere);
    let extra = format!(
        "[[deletion.data_dir]]\npath = {:?}\nowners = {{ users = [\"root\"] }}\n",
        data.display().to_string()
    );
    let text = policy_with(100_000, &[&target], &[], &scene.cg, &extra);
    let st = scene.start(&text);
    st.agent.require_tier(Tier::Tracepoint);
    let job = as_nobody("mv f* ../../elsewhere/", &data.join("sub"), &st.cg, false);
    let id = st
        .agent
        .wait_hold(Duration::from_secs(60))
        .expect("the foreign mover is held");
    assert_eq!(
        settle(&data.join("sub"), Duration::from_millis(700)),
        FILES - 1,
        "stopped after exactly one file"
    );
    assert_eq!(count_files(&elsewhere), 1);
    let inc = held_incident(&st.agent, id);
    assert_eq!(inc["kind"], "data_dir", "{inc}");
    let reason = inc["reason"].as_str().unwrap_or_default();
    let want = format!(
        "stopped after 1 file: a foreign deletion in data directory {}",
        data.display()
    );
    assert!(reason.starts_with(&want), "reason {reason:?}");
    st.agent.cli_ok(&["deny", &id.to_string()]);
    drop(job);
    assert!(
        wait_until(Duration::from_secs(10), || st.agent.holds().is_empty()),
        "the denied hold closes"
    );
    assert_eq!(
        count_files(&data.join("sub")),
        FILES - 1,
        "nothing more moved"
    );
}
