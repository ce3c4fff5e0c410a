//! Living with guardrail day to day (issue #17, items 1 and 2), tracepoint tier on the host
//! kernel: `guardrail approve ID` lets a held job finish, `--more N` then a second hold shows
//! what the job has done in all, `guardrail approve` without an id picks among the caller's own
//! session's holds at a terminal, and a stopped agent leaves no job stopped without a record.
//! Every job is the test's own (its cgroup, a scratch directory under /var/tmp).
use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use guardrail_integration::{collectors::hostname, *};

const BUDGET: u64 = 100;

/// An agent whose policy gives the test's cgroup `BUDGET`, with `deletion` TOML lines added to
/// `[deletion]` and `extra_args` for the agent.
fn setup_with(deletion: &str, extra_args: &[&str]) -> Setup {
    let scene = Scene::new();
    let target = scene.dir("target");
    let text = policy(BUDGET, &[&target], &[], &scene.cg).replace(
        "on_deny = \"kill\"\n",
        &format!("on_deny = \"kill\"\n{deletion}"),
    );
    let setup = scene.start_with(&text, extra_args);
    setup.agent.require_tier(Tier::Tracepoint);
    setup
}

/// Whether a process of `pgid` is stopped (state T).
fn any_stopped(pgid: u32) -> bool {
    group_states(pgid).contains(&'T')
}

/// The hold message tells a held job how to let it finish, and doing just that (a bare
/// `guardrail approve ID`) lets a 1,000-file `rm -rf` delete every file, with no second hold;
/// the same command run again afterwards is a new job, held at the budget.
/// Old code: a bare approve granted one more budget (100 here), so the job was held again as a
/// new incident with some 800 files left.
#[test]
fn approving_as_the_message_says_lets_the_job_finish() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup_with("", &[]);
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent.wait_new_hold(&[]);
    let out = agent.cli_ok(&["approve", &id.to_string()]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        format!(
            "approved incident {id} on {} for the rest of the job; job {} resumed",
            hostname(),
            job.pgid()
        )
    );
    let status = job.wait(Duration::from_secs(60)).expect("the job finishes");
    assert!(status.success(), "rm -rf exits 0: {status:?}");
    assert_eq!(count_files(&victim), 0, "every file deleted");
    assert!(!victim.exists(), "and the directory");
    let message = job.stderr();
    assert!(
        message.contains(&format!(
            "  To let it finish (no limit for the rest of this job): guardrail approve {id}\n"
        )),
        "the hold message offers the rest of the job first:\n{message}"
    );
    assert!(
        message.contains(&format!(
            "  {:<53} guardrail approve {id} --more {BUDGET}\n",
            format!("To let it delete {BUDGET} more, then hold it again:")
        )),
        "and N more:\n{message}"
    );
    assert!(agent.holds().is_empty(), "no hold open");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        agent.incidents_with_outcome("held").len(),
        1,
        "one hold in all"
    );
    let approved = agent.incidents_with_outcome("approved");
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0]["id"].as_u64(), Some(id));
    // The approval was that job's only: the same command run again is a new job, held at the
    // budget.
    let again = s.path().join("again");
    fill(&again, 1000);
    let mut next = Job::spawn_in("rm -rf again", s.path(), Some(&cg));
    let second = agent.wait_new_hold(&[]);
    assert_ne!(second, id);
    let gone = 1000 - settle(&again, Duration::from_millis(500)) as u64;
    assert!(
        (BUDGET..=BUDGET + 1).contains(&gone),
        "the new job is held at the budget: {gone} gone"
    );
    agent.deny_and_wait(second, &mut next);
    assert!(agent.stop().expect("stops").success());
}

/// `--more 100` lets exactly 100 more go; the second hold of the same job shows what it has
/// deleted in all and the earlier approval: in `holds`, in the event and in the job's message.
/// Old code: the second hold looked like a first one (its count was the window's, 101), and
/// nothing said the job had been approved before.
#[test]
fn a_job_held_again_shows_its_total_and_the_earlier_approval() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup_with("", &[]);
    let victim = s.path().join("victim");
    fill(&victim, 2000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let first = agent.wait_new_hold(&[]);
    let gone_first = 2000 - settle(&victim, Duration::from_millis(500)) as u64;
    let out = agent.cli_ok(&["approve", &first.to_string(), "--more", "100"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("for 100 more deletions"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let second = agent.wait_new_hold(&[first]);
    let gone = 2000 - settle(&victim, Duration::from_millis(500)) as u64;
    assert!(
        (100..=101).contains(&(gone - gone_first)),
        "100 more (tracepoint tier: and the one that crossed): {}",
        gone - gone_first
    );
    let holds = agent.holds();
    assert_eq!(holds.len(), 1);
    let h = &holds[0];
    assert_eq!(h["id"].as_u64(), Some(second));
    assert_eq!(h["total_count"].as_u64(), Some(gone), "the total: {h}");
    let earlier = &h["earlier_approvals"][0];
    assert_eq!(earlier["incident"].as_u64(), Some(first), "{h}");
    assert_eq!(earlier["more"].as_u64(), Some(100));
    assert_eq!(earlier["by_uid"].as_u64(), Some(0));
    assert_eq!(earlier["total_at_approval"].as_u64(), Some(gone_first));
    let again = format!(
        "Held again: {gone} deletions outside its targets in all; incident {first} approved for 100 more deletions by uid 0 at {gone_first} deletions."
    );
    let text = String::from_utf8_lossy(&agent.cli_ok(&["holds"]).stdout).into_owned();
    assert!(text.contains(&again), "`guardrail holds`:\n{text}");
    let held = agent.incidents_with_outcome("held");
    let ev = held
        .iter()
        .find(|i| i["id"].as_u64() == Some(second))
        .expect("the second hold's event");
    assert_eq!(ev["total_count"].as_u64(), Some(gone));
    assert_eq!(ev["earlier_approvals"][0]["incident"].as_u64(), Some(first));
    agent.deny_and_wait(second, &mut job);
    let message = job.stderr();
    assert!(
        message.contains(&format!("  {again}\n")),
        "the job's second message:\n{message}"
    );
    assert!(agent.stop().expect("stops").success());
}

/// SIGTERM (a deliberate stop) with a job held and the default `on_agent_stop = "end"`: the job
/// is ended, nothing of it is left stopped, no file more is deleted, and the event log and the
/// agent's log say so, one incident per hold.
/// Old code: the programs were detached and the job left in state T with no record anywhere.
#[test]
fn stopping_the_agent_ends_its_held_jobs_by_default() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup_with("", &[]);
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent.wait_new_hold(&[]);
    assert!(wait_until(Duration::from_secs(10), || job.stopped()));
    let left = settle(&victim, Duration::from_millis(500));
    agent.sigterm_and_wait();
    let text = std::fs::read_to_string(&agent.event_log).expect("event log");
    let out = agent.log();
    assert!(agent.stop().expect("stops").success());
    let status = job.wait(Duration::from_secs(10)).expect("the job ended");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed: {status:?}"
    );
    assert!(!any_stopped(job.pgid()), "nothing left stopped");
    assert_eq!(count_files(&victim), left, "no file more deleted");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ended: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|e| e["incident"]["outcome"] == "ended_on_agent_stop")
        .collect();
    assert_eq!(ended.len(), 1, "one incident per hold:\n{text}");
    assert_eq!(ended[0]["incident"]["id"].as_u64(), Some(id));
    assert_eq!(ended[0]["incident"]["action"], "deny");
    assert_eq!(
        ended[0]["incident"]["decided_by_text"],
        "agent stopped (deletion.on_agent_stop = \"end\")"
    );
    assert!(
        lines.iter().any(|e| e["agent"]["kind"] == "agent_stopped"
            && e["agent"]["message"].as_str().is_some_and(|m| m.ends_with(
                "programs detached; 1 held job(s) ended (deletion.on_agent_stop = \"end\")"
            ))),
        "the agent_stopped event counts them:\n{text}"
    );
    assert!(
        out.contains(&format!("incident {id} ended_on_agent_stop on "))
            && out.contains(
                "guardrail: 1 held job(s) ended as the agent stops (deletion.on_agent_stop = \"end\")"
            ),
        "the agent's log:\n{out}"
    );
}

/// The same stop with `on_agent_stop = "continue"`: the held job runs to its end (every file
/// deleted), with one `continued_on_agent_stop` incident.
/// Old code: left stopped (state T) with no record.
#[test]
fn stopping_the_agent_continues_its_held_jobs_when_the_policy_says_so() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup_with("on_agent_stop = \"continue\"\n", &[]);
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent.wait_new_hold(&[]);
    assert!(wait_until(Duration::from_secs(10), || job.stopped()));
    agent.sigterm_and_wait();
    let text = std::fs::read_to_string(&agent.event_log).expect("event log");
    assert!(agent.stop().expect("stops").success());
    let status = job.wait(Duration::from_secs(60)).expect("the job finished");
    assert!(status.success(), "rm -rf ran to its end: {status:?}");
    assert_eq!(count_files(&victim), 0);
    let continued: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["incident"]["outcome"] == "continued_on_agent_stop")
        .collect();
    assert_eq!(continued.len(), 1, "{text}");
    assert_eq!(continued[0]["incident"]["id"].as_u64(), Some(id));
    assert_eq!(continued[0]["incident"]["action"], "approve");
}

/// A crash (SIGKILL) keeps the job held in the pinned state; `guardrail status` with no agent
/// lists it with the commands that free it (exit 3); the next agent adopts the hold, and its
/// deliberate stop then ends the job (the default) instead of leaving it stopped.
/// Old code: `guardrail status` with no agent only said it could not connect.
#[test]
fn with_no_agent_status_lists_the_pinned_holds_and_the_next_agent_adopts_them() {
    let _k = kernel_lock();
    let pins = unique_pin_dir();
    let pins_arg = pins.display().to_string();
    let _unpin = Unpin(pins.clone());
    let Setup { agent, cg, s } = setup_with("", &["--pin-dir", &pins_arg]);
    let policy_text = std::fs::read_to_string(&agent.policy).expect("policy");
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent.wait_new_hold(&[]);
    assert!(wait_until(Duration::from_secs(10), || job.stopped()));
    let left = settle(&victim, Duration::from_millis(500));
    agent.crash();
    assert!(job.stopped(), "still held after the crash");

    let status = |json: bool| {
        let mut c = Command::new(guardrail_bin());
        c.args(["--socket", "/run/guardrail-test-no-agent.sock", "status"])
            .args(["--pin-dir", &pins_arg]);
        if json {
            c.arg("--json");
        }
        c.output().expect("guardrail status")
    };
    let out = status(false);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(3), "not running: exit 3\n{text}");
    let pgid = job.pgid();
    assert!(
        text.contains(
            "agent:   not running: no agent answers on /run/guardrail-test-no-agent.sock"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  incident {id}  pgid {pgid}  user root  /bin/sh -c rm -rf victim  2 of 2 processes stopped, held "
        )) && text.contains(&format!("end it: kill -KILL -{pgid}"))
            && text.contains(
                "`sudo guardrail off` (detaches the pinned programs and continues every held job)"
            ),
        "status lists the held job and how to free it:\n{text}"
    );
    let out = status(true);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["running"], false);
    assert_eq!(v["held"][0]["incident"].as_u64(), Some(id), "{v}");
    assert_eq!(v["held"][0]["pgid"].as_u64(), Some(pgid as u64));

    let second = Agent::start_with(&policy_text, &["--pin-dir", &pins_arg]).expect("next agent");
    assert!(
        second.saw(&format!("adopted open hold {id}")),
        "adopted:\n{}",
        second.log()
    );
    assert_eq!(
        second.holds().first().and_then(|h| h["id"].as_u64()),
        Some(id)
    );
    assert!(second.stop().expect("stops").success());
    let status = job
        .wait(Duration::from_secs(10))
        .expect("ended at the stop");
    assert!(!status.success());
    assert!(!any_stopped(pgid));
    assert_eq!(count_files(&victim), left);
    assert!(!pins.exists(), "a stop removes the pins");
}

/// Removes a pin directory when the test ends, however it ends: a crashed agent's programs must
/// not stay attached after a failed assertion (removing the last pin detaches a program).
struct Unpin(std::path::PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `guardrail approve` (no id) at a terminal (`script` gives it a pty) in a new audit
/// session, typing `answer`: returns (exit code, what the terminal showed).
fn approve_at_terminal_in_new_session(agent: &Agent, answer: &str) -> (Option<i32>, String) {
    let cmd = format!(
        "{} --socket {} approve",
        guardrail_bin().display(),
        agent.socket.display()
    );
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg("echo 0 > /proc/self/loginuid || exit 1\nprintf '%s\\n' \"$ANSWER\" | script -qec \"$CMD\" /dev/null")
        .env("ANSWER", answer)
        .env("CMD", cmd)
        .stdin(Stdio::null())
        .output()
        .expect("script");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `guardrail approve` with no id, at a terminal, lists the holds of the caller's own audit
/// session (found through its pidfd, not anything it says) and approves the one whose host name
/// is typed; from another session, or as another (unprivileged) user of the same session, it
/// offers nothing; with no terminal it refuses with a clear message (exit 2).
#[test]
fn approve_without_an_id_picks_among_the_callers_own_session_holds() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup_with("", &[]);
    // The socket's directory open to all, as /run/guardrail is: user nobody asks too.
    std::fs::set_permissions(
        agent.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let host = hostname();
    // One login session (a new audit session, as pam_loginuid makes it) that starts the job in
    // a process group of its own, then, on a line from the test, runs the approval.
    let script = "echo 0 > /proc/self/loginuid || exit 1\ncat /proc/self/sessionid; echo\nsetsid rm -rf victim </dev/null >/dev/null 2>&1 &\nread _\nprintf '%s\\n' \"$ANSWER\" | setpriv --reuid=65534 --regid=65534 --clear-groups script -qec \"$CMD\" /dev/null\necho nobody-exit=$?\nprintf '%s\\n' \"$ANSWER\" | script -qec \"$CMD\" /dev/null\n";
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(script)
        .current_dir(s.path())
        .env("ANSWER", &host)
        .env(
            "CMD",
            format!(
                "{} --socket {} approve",
                guardrail_bin().display(),
                agent.socket.display()
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    {
        use std::os::unix::process::CommandExt;
        c.process_group(0);
    }
    guardrail_agent::cgroup::join_at_exec(&mut c, &cg.path).expect("cgroup");
    let mut login = c.spawn().expect("the login session");
    let mut stdout = BufReader::new(login.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("session id");
    let session: u64 = line.trim().parse().expect("a session id");
    let id = agent.wait_new_hold(&[]);
    let holds = agent.holds();
    assert_eq!(holds[0]["audit_session"].as_u64(), Some(session));

    // No terminal: a clear refusal, nothing approved.
    let out = Command::new(guardrail_bin())
        .args(["--socket", &agent.socket.display().to_string(), "approve"])
        .stdin(Stdio::null())
        .output()
        .expect("approve");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "guardrail: approve needs an incident id when it is not run at a terminal: `guardrail approve ID` (open holds: `guardrail holds`); nothing approved"
    );
    // Another session: none of its holds, nothing approved even when the host name is typed.
    let (code, shown) = approve_at_terminal_in_new_session(&agent, &host);
    assert_eq!(code, Some(1), "{shown}");
    assert!(
        shown.contains(&format!("no open hold of your session on {host}")),
        "{shown}"
    );
    assert_eq!(agent.holds().len(), 1, "still held");

    // The job's own session: its hold listed, the host name typed, approved.
    login
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\n")
        .expect("go");
    let status = login.wait().expect("the login session ends");
    let mut shown = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut shown);
    assert!(status.success(), "approve at the terminal:\n{shown}");
    // User nobody in the same login session (su, setpriv keep it) is offered nothing: root's
    // hold is not theirs.
    let (by_nobody, shown) = shown.split_once("nobody-exit=").expect("nobody's turn");
    assert!(
        shown.starts_with("1\n")
            && by_nobody.contains(&format!(
                "no open hold of your session on {host} (only the holds of your audit session ({session}) are shown)"
            ))
            && !by_nobody.contains("Approve hold"),
        "nobody's terminal:\n{by_nobody}"
    );
    assert!(
        shown.contains(&format!(
            "Approve hold {id} on {host} for the rest of its job? Type its id or the host name ({host}) to approve, anything else cancels:"
        )),
        "the question names the host:\n{shown}"
    );
    assert!(
        shown.contains(&format!(
            "approved incident {id} on {host} for the rest of the job"
        )),
        "{shown}"
    );
    assert!(
        wait_until(Duration::from_secs(60), || count_files(&victim) == 0),
        "the approved job finished: {} files left",
        count_files(&victim)
    );
    assert!(agent.holds().is_empty());
    assert!(agent.stop().expect("stops").success());
}
