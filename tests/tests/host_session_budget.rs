//! Budgets above the job (issue 14, item 1), on the host kernel (tracepoint tier): a login session
//! that runs every `rm` as a job of its own (`setsid rm` in a loop, an interactive loop with job
//! control, cron or ssh loops) is counted as a whole, and so is a user across sessions. Each loop
//! runs as user nobody in an audit session of its own (a fresh `/proc/self/loginuid` write gives
//! one, as pam_loginuid does at a login); every assertion counts files on disk or reads the
//! incident an admin would read.
use std::{path::Path, time::Duration};

use guardrail_integration::*;

const FILES: usize = 1200;
const SESSION_BUDGET: u64 = 300;
const USER_BUDGET: u64 = 400;

/// An agent whose only counted jobs are the test's (the default rule shares no budget above the
/// job; the test's rule says it does, since rules inherit `[deletion]`'s), with a job budget no single `rm` of these tests reaches, and the session and user
/// budgets above.
fn start(user_budget: u64) -> Setup {
    let scene = Scene::new();
    let target = scene.dir("target");
    let policy = format!(
        r#"mode = "enforce"
[deletion]
budget = 100000000
window = "10m"
action = "hold"
hold_timeout = "10m"
on_deny = "kill"
targets = ["{target}"]
protected_roots = ["/"]
protect_mount_points = false
shared_budgets = false

[deletion.session]
budget = {SESSION_BUDGET}
window = "10m"
action = "hold"

[deletion.user]
budget = {user_budget}
window = "10m"
action = "hold"

[[deletion.rule]]
name = "test-job"
match = {{ cgroup = "{cg}" }}
targets = ["{target}"]
budget = 100
shared_budgets = true
"#,
        target = target.display(),
        cg = scene.cg.name,
    );
    scene.start(&policy)
}

/// A directory of `n` files that nobody may delete, outside every target.
fn victim(s: &tempfile::TempDir, name: &str, n: usize) -> std::path::PathBuf {
    let dir = s.path().join(name);
    fill(&dir, n);
    chown_nobody(&dir);
    dir
}

/// `body` run by /bin/sh as nobody in `cwd`, in a new audit session (login uid 65534), inside the
/// test's cgroup.
fn session_as_nobody(body: &str, cwd: &Path, cg: &TestCgroup) -> Job {
    let script = format!(
        "echo 65534 > /proc/self/loginuid || exit 90\nexec {AS_NOBODY} /bin/sh -c '{body}'"
    );
    Job::spawn_in(&script, cwd, Some(cg))
}

/// One job per file: what `for f in *; do rm "$f"; done` does at a prompt with job control.
const SETSID_LOOP: &str = r#"for f in f*; do setsid rm -f "$f"; done"#;

fn audit_session(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/sessionid"))
        .expect("sessionid")
        .trim()
        .to_string()
}

/// The open hold's incident from the event log.
fn held_incident(agent: &Agent, id: u64) -> serde_json::Value {
    agent
        .wait_incident(Duration::from_secs(10), |i| {
            i["id"].as_u64() == Some(id) && i["outcome"] == "held"
        })
        .unwrap_or_else(|| panic!("incident {id} in the event log:\n{}", agent.log()))
}

/// The incident's reason for `who` crossing `budget` per `level` (tracepoint: the crossing
/// deletion happened; lsm: it was refused).
fn reason(inc: &serde_json::Value, who: &str, budget: u64, level: &str) -> String {
    let jobs = budget + 1;
    if inc["tier"] == "lsm" {
        format!(
            "{who} deleted {budget} files outside targets in 10m across {jobs} jobs; the next was refused (budget {budget} per {level})"
        )
    } else {
        format!(
            "{who} deleted {jobs} files outside targets in 10m across {jobs} jobs (budget {budget} per {level})"
        )
    }
}

/// How many files the crossing deletion leaves behind: the tracepoint tier stops the job right
/// after it (one past the budget); the lsm tier refuses it.
fn past_budget(inc: &serde_json::Value) -> usize {
    if inc["tier"] == "lsm" { 0 } else { 1 }
}

/// The reproduced evasion: 1,200 `setsid rm`, one file each, in one login session. The old code
/// budgeted only each job (process group), so every `rm` started afresh and all 1,200 files went
/// with no hold. Now the session's 301st deletion holds the job that made it, the incident names
/// the session, and nothing more goes.
#[test]
fn a_loop_of_setsid_rm_is_held_at_the_session_budget() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = start(100_000);
    let dir = victim(&s, "victim", FILES);
    let job = session_as_nobody(SETSID_LOOP, &dir, &cg);
    let id = agent
        .wait_hold(Duration::from_secs(120))
        .expect("the session is held");
    let session = audit_session(job.pgid());
    let inc = held_incident(&agent, id);
    let left = settle(&dir, Duration::from_millis(700));
    let expect_left = FILES - SESSION_BUDGET as usize - past_budget(&inc);
    assert_eq!(
        left, expect_left,
        "files left at the hold ({})",
        inc["tier"]
    );
    assert_eq!(
        inc["reason"],
        reason(
            &inc,
            &format!("session {session}"),
            SESSION_BUDGET,
            "session"
        ),
        "incident: {inc}"
    );
    assert_eq!(inc["level"], "session");
    assert_eq!(inc["level_jobs"], SESSION_BUDGET + 1);
    assert_eq!(inc["budget"], SESSION_BUDGET);
    let hold = agent.holds();
    assert_eq!(hold.len(), 1, "one hold: {hold:?}");
    assert_eq!(hold[0]["reason"], inc["reason"]);
    // The loop first (it would start the next `rm`), then the held job.
    drop(job);
    agent.cli_ok(&["deny", &id.to_string()]);
    assert!(
        wait_until(Duration::from_secs(10), || agent.holds().is_empty()),
        "the denied hold closes"
    );
    assert_eq!(count_files(&dir), expect_left, "nothing more went");
}

/// A user who spreads the same loop over two login sessions (a second ssh login, a cron job per
/// run: each is an audit session of its own) stays under each session's budget; the user's
/// budget counts both. The old code held neither session: 250 + 1,200 files went.
#[test]
fn a_user_is_held_across_two_sessions_at_the_user_budget() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = start(USER_BUDGET);
    let first_dir = victim(&s, "first", 250);
    let second_dir = victim(&s, "second", FILES);

    let mut first = session_as_nobody(SETSID_LOOP, &first_dir, &cg);
    let status = first
        .wait(Duration::from_secs(120))
        .expect("the first session's loop ends");
    assert!(status.success(), "first loop: {status}");
    assert_eq!(
        count_files(&first_dir),
        0,
        "250 files is under every budget"
    );
    assert!(agent.holds().is_empty(), "nothing held yet");

    let second = session_as_nobody(SETSID_LOOP, &second_dir, &cg);
    let id = agent
        .wait_hold(Duration::from_secs(120))
        .expect("the user is held");
    let inc = held_incident(&agent, id);
    let left = settle(&second_dir, Duration::from_millis(700));
    let gone = USER_BUDGET as usize - 250 + past_budget(&inc);
    assert_eq!(
        left,
        FILES - gone,
        "files left at the hold ({})",
        inc["tier"]
    );
    assert_eq!(
        inc["reason"],
        reason(&inc, "user nobody (login uid 65534)", USER_BUDGET, "user"),
        "incident: {inc}"
    );
    assert_eq!(inc["level"], "user");
    drop(second);
    agent.cli_ok(&["deny", &id.to_string()]);
    assert!(
        wait_until(Duration::from_secs(10), || agent.holds().is_empty()),
        "the denied hold closes"
    );
    assert_eq!(count_files(&second_dir), FILES - gone, "nothing more went");
}

/// What an admin does by hand in a session: one `rm` of 50 files and a few single deletions.
/// Nothing is held and no incident is made.
#[test]
fn an_admin_cleaning_up_by_hand_is_not_held() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = start(USER_BUDGET);
    let dir = victim(&s, "logs", 60);
    let mut job = session_as_nobody(
        r#"rm f0000* f0001* f0002* f0003* f0004* && for f in f*; do setsid rm -f "$f"; done"#,
        &dir,
        &cg,
    );
    let status = job.wait(Duration::from_secs(60)).expect("the cleanup ends");
    assert!(status.success(), "cleanup: {status}");
    assert_eq!(count_files(&dir), 0, "everything the admin removed is gone");
    assert!(agent.holds().is_empty(), "nothing held");
    assert!(
        !agent
            .events()
            .iter()
            .any(|e| e["incident"]["kind"] == "budget_crossed"),
        "no incident: {:?}",
        agent.events()
    );
}
