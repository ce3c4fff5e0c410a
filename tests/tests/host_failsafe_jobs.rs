//! Fail safe, kernel side (issue #18), tracepoint tier on the host: exemptions nobody can borrow,
//! the agent's exemption bound to its identity, no job stopped without a record, held jobs that a
//! flood of new jobs cannot evict, and refusals reported at a bounded rate. Attackers run as user
//! nobody; every scenario runs in a scratch directory under /var/tmp and counts files on disk.
use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use guardrail_integration::*;

const BUDGET: u64 = 10;
const FILES: usize = 1000;

fn exempt(name: &str, exe: &Path) -> String {
    format!(
        "[[deletion.exempt]]\nname = \"{name}\"\nexecutables = [\"{}\"]\nunits = []\ncgroups = []\n",
        exe.display()
    )
}

/// A rule in audit mode for the jobs of `cg`: its decisions are reported, nothing is stopped.
fn audit_rule(name: &str, cg: &TestCgroup) -> String {
    format!(
        "[[deletion.rule]]\nname = \"{name}\"\nmatch = {{ cgroup = \"{}\" }}\nmode = \"audit\"\n",
        cg.name
    )
}

/// Files gone at the hold, with the tracepoint tier's bound for one deleting task.
fn assert_held_at_budget(victim: &Path, what: &str) -> usize {
    let left = settle(victim, Duration::from_millis(700));
    let gone = (FILES - left) as u64;
    assert!(
        (BUDGET..=BUDGET + 1).contains(&gone),
        "{what}: {gone} of {FILES} files gone; the budget is {BUDGET} (at most one more)"
    );
    left
}

/// A user's own logrotate (`-s` state and configuration of their own) whose `firstaction` runs
/// `rm -rf` under a policy that exempts logrotate by executable. The old code tagged every exec
/// of the exempt binary, whoever ran it, and the tag survived the exec of the shell and of rm:
/// all 1000 files went. Now only root's (or the rule's declared user's) exec counts, and the
/// tag is dropped at the exec of a program not on the list: the job is held at its budget.
#[test]
fn a_users_logrotate_firstaction_is_not_exempt() {
    require_root();
    let _k = kernel_lock();
    let logrotate = Path::new("/usr/sbin/logrotate");
    assert!(
        logrotate.exists(),
        "logrotate is missing: `cargo xtask setup` installs it"
    );
    let s = open_scratch();
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy_with(
        BUDGET,
        &[],
        &[],
        &cg,
        &exempt("cleaners", logrotate),
    ))
    .expect("agent starts");
    let home = s.path().join("home");
    let victim = home.join("victim");
    fill(&victim, FILES);
    std::fs::create_dir_all(home.join("log")).expect("mkdir log");
    std::fs::write(home.join("log/app.log"), b"something to rotate\n").expect("log");
    let conf = home.join("lr.conf");
    std::fs::write(
        &conf,
        format!(
            "{}/log/app.log {{\n    missingok\n    firstaction\n        rm -rf {}\n    endscript\n}}\n",
            home.display(),
            victim.display()
        ),
    )
    .expect("lr.conf");
    chown_nobody(&home);
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut job = Job::spawn_in(
        &format!(
            "{AS_NOBODY} {} -f -s home/st home/lr.conf",
            logrotate.display()
        ),
        s.path(),
        Some(&cg),
    );
    let id = agent.wait_hold(Duration::from_secs(60)).unwrap_or_else(|e| {
        panic!(
            "nobody's logrotate firstaction was not held ({e}); {} of {FILES} files left; stderr: {}",
            count_files(&victim),
            job.stderr()
        )
    });
    let left = assert_held_at_budget(&victim, "a user's logrotate firstaction");
    agent.deny_and_wait(id, &mut job);
    assert_eq!(count_files(&victim), left, "nothing deleted after the deny");
    assert!(agent.stop().expect("agent stops").success());
}

/// An exempt program run by root keeps its exemption for its own deletions, but a shell it
/// execs (a pager's `!sh`, a cleaner's script) does not inherit it. The old code kept the tag
/// across the exec: the shell's `rm -rf` deleted all 1000 files.
#[test]
fn the_exemption_is_dropped_when_an_exempt_program_execs_a_shell() {
    require_root();
    let _k = kernel_lock();
    let s = open_scratch();
    let cg = TestCgroup::new();
    // Stand-ins with identities of their own: a package manager that deletes by itself
    // (testkit's rm-rf), and a program that execs whatever it is given (env).
    let pm = s.path().join("pm");
    std::fs::copy(testkit_bin(), &pm).expect("copy testkit");
    let launcher = s.path().join("pager");
    std::fs::copy("/usr/bin/env", &launcher).expect("copy env");
    let extra = format!(
        "{}[[deletion.exempt]]\nname = \"pager\"\nexecutables = [\"{}\"]\nunits = []\ncgroups = []\n",
        exempt("package-manager", &pm),
        launcher.display()
    );
    let agent = Agent::start(&policy_with(BUDGET, &[], &[], &cg, &extra)).expect("agent starts");

    // Root's exempt program deleting by itself: still exempt.
    let cache = s.path().join("cache");
    fill(&cache, FILES);
    let mut pm_job = Job::spawn_in(
        &format!("exec {} rm-rf cache", pm.display()),
        s.path(),
        Some(&cg),
    );
    assert!(
        pm_job.wait(Duration::from_secs(60)).is_some(),
        "exempt job ends"
    );
    assert_eq!(
        count_files(&cache),
        0,
        "root's exempt program deleted everything"
    );
    assert!(
        agent.holds().is_empty(),
        "root's exempt program is never held"
    );

    // Root's exempt program that execs a shell: the shell's rm -rf counts.
    let victim = s.path().join("victim");
    fill(&victim, FILES);
    let mut job = Job::spawn_in(
        &format!("exec {} /bin/sh -c 'rm -rf victim'", launcher.display()),
        s.path(),
        Some(&cg),
    );
    let id = agent
        .wait_hold(Duration::from_secs(60))
        .unwrap_or_else(|e| {
            panic!(
                "the shell exec'd by an exempt program was not held ({e}); {} of {FILES} left",
                count_files(&victim)
            )
        });
    assert_held_at_budget(&victim, "a shell exec'd by an exempt program");
    agent.deny_and_wait(id, &mut job);
    assert!(agent.stop().expect("agent stops").success());
}

/// The agent crashes with its programs pinned; an unprivileged process then gets the dead
/// agent's pid (forking until it does: here clone3 with set_tid) and deletes. The old pinned
/// programs allowed everything from `tgid == agent_tgid`: all 1000 files went. Now the agent is
/// known by its pid *and* start time: the impostor is counted and stopped at its budget by the
/// pinned programs.
#[test]
fn a_process_with_a_dead_agents_pid_is_not_exempt() {
    require_root();
    let _k = kernel_lock();
    let s = open_scratch();
    let cg = TestCgroup::new();
    let pins = unique_pin_dir();
    let pins_arg = pins.display().to_string();
    let agent = Agent::start_with(&policy(BUDGET, &[], &[], &cg), &["--pin-dir", &pins_arg])
        .expect("agent starts");
    let agent_pid = agent.pid();
    agent.crash();
    let victim = s.path().join("victim");
    fill(&victim, FILES);
    chown_nobody(&victim);
    let job = Job::spawn_in(
        &format!(
            "exec {} with-pid {agent_pid} {AS_NOBODY} rm -rf victim",
            testkit_bin().display()
        ),
        s.path(),
        Some(&cg),
    );
    // The impostor itself (testkit, its parent, only waits for it).
    let stopped = wait_until(Duration::from_secs(30), || {
        proc_state(agent_pid) == Some('T')
    });
    let left = settle(&victim, Duration::from_millis(700));
    // Unpin the crashed agent's programs before asserting, so a failure leaves nothing behind.
    drop(job);
    let _ = std::fs::remove_dir_all(&pins);
    assert!(
        stopped,
        "the process with the dead agent's pid {agent_pid} was not stopped; {left} of {FILES} files left"
    );
    let gone = (FILES - left) as u64;
    assert!(
        (BUDGET..=BUDGET + 1).contains(&gone),
        "{gone} files gone by the process with the dead agent's pid; budget {BUDGET}"
    );
}

/// The agent is stalled while the kernel's event ring is full (a flood of 2000 one-file jobs in a
/// data directory under an audit-mode rule: one "would have refused" event each, and nothing
/// stopped, since the tracepoint tier holds a foreign job that deletes there for real), then a
/// job crosses its budget: the kernel holds it, its crossing event is lost. The old agent never
/// heard of it: the job stayed stopped with no incident id and no timeout. Now a tick finds it
/// held in the kernel and adopts it.
#[test]
fn a_job_held_while_its_event_was_lost_gets_an_id_and_a_timeout() {
    require_root();
    let _k = kernel_lock();
    let s = open_scratch();
    let cg = TestCgroup::new();
    let data = s.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir data");
    let flood_cg = TestCgroup::new();
    let extra = format!(
        "[[deletion.data_dir]]\npath = \"{}\"\nowners = {{ users = [\"daemon\"] }}\n{}",
        data.display(),
        audit_rule("flood", &flood_cg)
    );
    let agent = Agent::start(&policy_with(BUDGET, &[], &[], &cg, &extra)).expect("agent starts");
    let agent_pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    let victim = s.path().join("victim");
    fill(&victim, FILES);
    fill(&data, 2000);

    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGSTOP).expect("stall agent");
    // 2000 jobs, one "would have refused" event each: far more than the ring holds.
    let mut flood_job = Job::spawn_in(
        &format!("exec {} setsid-unlink 2000 data", testkit_bin().display()),
        s.path(),
        Some(&flood_cg),
    );
    let flood = flood_job.wait(Duration::from_secs(120));
    // `exec`: the job is rm alone, which the kernel stops itself (no agent stops the rest).
    let mut job = Job::spawn_in("exec rm -rf victim", s.path(), Some(&cg));
    let held_by_kernel = wait_until(Duration::from_secs(30), || job.stopped());
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGCONT).expect("resume agent");
    assert!(flood.is_some_and(|st| st.success()), "the flood ran");
    assert_eq!(count_files(&data), 0, "every flood job deleted its file");
    assert!(held_by_kernel, "the kernel stopped the job at its budget");

    let found = wait_until(Duration::from_secs(20), || {
        agent
            .holds()
            .iter()
            .any(|h| h["pgid"].as_u64() == Some(job.pgid() as u64))
    });
    let holds = agent.holds();
    assert!(
        found,
        "the held job was never listed: holds {holds:?}; log:\n{}",
        agent.log()
    );
    assert!(
        agent.saw("its crossing event was lost"),
        "the crossing event was really lost (else this test proves nothing):\n{}",
        agent.log()
    );
    let h = holds
        .iter()
        .find(|h| h["pgid"].as_u64() == Some(job.pgid() as u64))
        .expect("listed");
    assert!(
        h["id"].as_u64().is_some_and(|id| id > 0),
        "an incident id: {h}"
    );
    assert_eq!(
        h["timeout_secs"].as_u64(),
        Some(600),
        "the policy's hold timeout: {h}"
    );
    assert!(job.stopped(), "the job stays stopped while held");
    let left = assert_held_at_budget(&victim, "a job whose crossing event was lost");
    let id = h["id"].as_u64().expect("id").to_string();
    assert!(
        agent
            .events()
            .iter()
            .any(|e| e["incident"]["id"].as_u64() == h["id"].as_u64()
                && e["incident"]["outcome"] == "held"),
        "the adopted hold is in the event log"
    );
    agent.cli_ok(&["deny", &id]);
    assert!(
        job.wait(Duration::from_secs(30)).is_some(),
        "denied job ends"
    );
    assert_eq!(count_files(&victim), left);
    assert!(agent.stop().expect("agent stops").success());
}

/// One job is held; a flood of 20,000 short-lived jobs (more than the kernel's LRU job table
/// holds) pushes its counters out, while the agent is busy (stalled here, so that it removes no
/// ended job meanwhile); then the held job is resumed with `kill -CONT`. The old code
/// made a fresh entry for it, with a fresh budget: another budget's worth of files went before it
/// was held again. Now the held state lives in a map nothing evicts: at most one more file (the
/// tracepoint tier cannot refuse the attempt that re-stops it), and the same hold stays open.
#[test]
fn a_flood_of_new_jobs_does_not_free_a_held_job() {
    require_root();
    let _k = kernel_lock();
    let s = open_scratch();
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(BUDGET, &[], &[], &cg)).expect("agent starts");
    let victim = s.path().join("victim");
    fill(&victim, FILES);
    let flood_dir = s.path().join("flood");
    fill(&flood_dir, 20_000);
    let job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent.wait_hold(Duration::from_secs(60)).expect("held");
    let at_hold = assert_held_at_budget(&victim, "before the flood");

    let agent_pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGSTOP).expect("stall agent");
    let mut flood = Job::spawn_in(
        &format!("exec {} setsid-unlink 20000 flood", testkit_bin().display()),
        s.path(),
        Some(&cg),
    );
    let flooded = flood.wait(Duration::from_secs(300));
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGCONT).expect("resume agent");
    assert!(
        flooded.is_some_and(|st| st.success()),
        "the flood of jobs ran"
    );
    assert_eq!(
        count_files(&flood_dir),
        0,
        "every flood job deleted its file"
    );
    // The flood filled the kernel's job table: the agent says so.
    assert!(
        wait_until(Duration::from_secs(10), || agent.events().iter().any(|e| {
            e["agent"]["kind"] == "tier_degraded"
                && e["agent"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("JOBS map is"))
        })),
        "no alert that the JOBS map is 80 % full; log:\n{}",
        agent.log()
    );
    assert_eq!(
        count_files(&victim),
        at_hold,
        "the held job's files are unchanged by the flood"
    );
    assert!(
        job.stopped(),
        "the held job stays stopped through the flood"
    );

    sigcont_job(job.pgid());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "the kernel stopped the resumed job again"
    );
    let after = settle(&victim, Duration::from_millis(700));
    assert!(
        at_hold - after <= 1,
        "{} files deleted after kill -CONT following the flood (at most one: the attempt that re-stops it)",
        at_hold - after
    );
    let holds = agent.holds();
    assert_eq!(holds.len(), 1, "one hold: {holds:?}");
    assert_eq!(
        holds[0]["id"].as_u64(),
        Some(id),
        "the same hold stays open"
    );
    agent.cli_ok(&["deny", &id.to_string()]);
    assert!(agent.stop().expect("agent stops").success());
}

/// An `rm -rf` by a job not named for a data directory, over 1000 files in it, under an
/// audit-mode rule (so that it is not stopped: the tracepoint tier holds an enforced foreign job
/// after its first file, see host_tracepoint_refusals.rs; the lsm tier's refusals, which go through
/// the same kernel function, are counted in VM case 37): the old kernel emitted one event per
/// file (1000 incidents in the event log). Now refusals are reported once per job and kind, then
/// at the 2nd, 3rd, 5th, 9th, ... attempt: 11 for 1000.
#[test]
fn refusals_in_a_data_directory_are_reported_at_a_bounded_rate() {
    require_root();
    let _k = kernel_lock();
    let s = open_scratch();
    let cg = TestCgroup::new();
    let data = s.path().join("data");
    fill(&data, FILES);
    chown_nobody(&data);
    let audit_cg = TestCgroup::new();
    let extra = format!(
        "[[deletion.data_dir]]\npath = \"{}\"\nowners = {{ users = [\"daemon\"] }}\n{}",
        data.display(),
        audit_rule("audited", &audit_cg)
    );
    let agent = Agent::start(&policy_with(BUDGET, &[], &[], &cg, &extra)).expect("agent starts");
    let mut job = Job::spawn_in(
        &format!("{AS_NOBODY} rm -rf data"),
        s.path(),
        Some(&audit_cg),
    );
    assert!(job.wait(Duration::from_secs(60)).is_some(), "the rm ends");
    assert_eq!(
        count_files(&data),
        0,
        "audit mode stops nothing: the rm deleted every file"
    );
    let counted = |agent: &Agent| {
        agent
            .events()
            .iter()
            .filter(|e| e["incident"]["kind"] == "data_dir")
            .count()
    };
    wait_until(Duration::from_secs(5), || counted(&agent) >= 11);
    std::thread::sleep(Duration::from_secs(1));
    let n = counted(&agent);
    let events = agent.events();

    let last = events
        .iter()
        .filter(|e| e["incident"]["kind"] == "data_dir")
        .filter_map(|e| e["incident"]["count"].as_u64())
        .max();
    assert_eq!(
        n, 11,
        "data_dir events for one job's 1000 deletions: 1, 2, 3, 5, ..., 513 (got {n})"
    );
    assert_eq!(last, Some(513), "the last report carries the running count");
    assert!(
        events
            .iter()
            .filter(|e| e["incident"]["kind"] == "data_dir")
            .all(|e| e["incident"]["outcome"] == "would_have_refused"),
        "every report says what audit mode did: {events:?}"
    );
    assert!(agent.holds().is_empty(), "nothing held");
    assert!(agent.stop().expect("agent stops").success());
}
