//! Tracepoint tier on the host kernel (which refuses BPF LSM): the kernel counts per job and stops
//! the job with a signal right after the deletion that crossed the budget. Every scenario runs in
//! a scratch directory under /var/tmp; every assertion counts files on disk.
use std::{path::Path, process::Command, time::Duration};

use guardrail_integration::*;

const BUDGET: u64 = 100;
const FILES: usize = 10_000;

/// A scratch tree with a target and a protected root inside, a cgroup for the test's jobs, and
/// an agent whose policy gives those jobs `budget`: the tracepoint tier's scenarios.
fn setup(budget: u64) -> Setup {
    let scene = Scene::new();
    let target = scene.dir("target");
    let protected = scene.dir("protected");
    let text = policy(budget, &[&target], &[&protected], &scene.cg);
    let setup = scene.start(&text);
    setup.agent.require_tier(Tier::Tracepoint);
    setup
}

/// Runs `script` over FILES out-of-scope files and checks the tracepoint tier's bound: the job is
/// held with at most `budget + tasks` files gone (and at least `budget - early`: io_uring counts at
/// submission, so requests still queued when the job stops were counted but never ran); approve
/// lets it finish.
fn runaway(script: &str, tasks: usize, early: usize) {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup(BUDGET);
    let victim = s.path().join("victim");
    fill(&victim, FILES);
    let mut job = Job::spawn_in(script, s.path(), Some(&cg));
    let id = agent
        .wait_hold(Duration::from_secs(60))
        .expect("the job is held");
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "every process of the job is stopped"
    );
    let left = settle(&victim, Duration::from_millis(700));
    let gone = FILES - left;
    eprintln!("{script}: {gone} files gone at the hold (budget {BUDGET}, {tasks} deleting tasks)");
    let (low, high) = (BUDGET - early as u64, BUDGET + tasks as u64);
    assert!(
        gone as u64 >= low && gone as u64 <= high,
        "{gone} files gone; the tracepoint tier promises between {low} and {high}"
    );
    agent.cli_ok(&["approve", &id.to_string(), "--for-job"]);
    assert!(
        job.wait(Duration::from_secs(120)).is_some(),
        "the approved job finishes"
    );
    assert_eq!(
        count_files(&victim),
        0,
        "the approved job deleted everything"
    );
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "agent exits 0 on SIGTERM, got {status}");
}

#[test]
fn rm_rf_is_held_at_the_budget_then_approved() {
    runaway("rm -rf victim", 1, 0);
}

#[test]
fn shell_loop_of_one_rm_per_file_is_one_job() {
    runaway("for f in victim/*; do rm -f \"$f\"; done", 1, 0);
}

#[test]
fn xargs_parallel_rm_is_one_job() {
    runaway(
        "find victim -type f -print0 | xargs -0 -n 20 -P8 rm -f",
        8,
        0,
    );
}

#[test]
fn find_delete_is_held() {
    runaway("find victim -type f -delete", 1, 0);
}

#[test]
fn forked_workers_are_one_job() {
    let kit = testkit_bin();
    runaway(&format!("{} fork-unlink 8 victim", kit.display()), 8, 0);
}

#[test]
fn io_uring_unlinks_are_counted() {
    let kit = testkit_bin();
    // io_uring runs up to a submission batch (32) before the stop lands in the submitter, and
    // counts at submission: up to a batch may be counted and never run.
    runaway(&format!("{} uring-unlink victim", kit.display()), 32, 32);
}

#[test]
fn deny_ends_the_job_and_nothing_more_is_deleted() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup(BUDGET);
    let victim = s.path().join("victim");
    fill(&victim, 2000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent.wait_hold(Duration::from_secs(60)).expect("held");
    let left_at_hold = settle(&victim, Duration::from_millis(500));
    agent.cli_ok(&["deny", &id.to_string()]);
    assert!(
        job.wait(Duration::from_secs(10)).is_some(),
        "the denied job ends"
    );
    assert_eq!(
        count_files(&victim),
        left_at_hold,
        "nothing more is deleted after deny"
    );
    assert!(agent.holds().is_empty(), "no hold stays open");
    // A job without a terminal got the hold message on its stderr, naming the host and the
    // exact commands.
    let host = nix::unistd::gethostname()
        .expect("hostname")
        .into_string()
        .expect("utf-8");
    let err = job.stderr();
    assert!(
        err.contains(&format!("guardrail: held job \"rm -rf victim\" on {host}")),
        "stderr:\n{err}"
    );
    assert!(
        err.contains(&format!("guardrail approve {id}"))
            && err.contains(&format!("guardrail deny {id}")),
        "stderr:\n{err}"
    );
}

#[test]
fn deletions_inside_targets_are_free() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup(BUDGET);
    let inside = s.path().join("target/build");
    fill(&inside, FILES);
    let mut job = Job::spawn_in("rm -rf build", &s.path().join("target"), Some(&cg));
    assert!(
        job.wait(Duration::from_secs(120)).is_some(),
        "the job finishes"
    );
    assert_eq!(
        count_files(&inside),
        0,
        "all {FILES} files inside the target deleted"
    );
    assert!(
        agent.holds().is_empty(),
        "no hold for deletions inside a target"
    );
}

#[test]
fn agent_reports_tier_and_detaches_on_sigterm() {
    let _k = kernel_lock();
    let Setup { agent, .. } = setup(BUDGET);
    assert!(
        agent.saw("guardrail: tier tracepoint in force"),
        "start-up names the tier:\n{}",
        agent.log()
    );
    assert!(
        agent.saw("tier tracepoint cannot: cannot refuse a single syscall"),
        "start-up names the gaps"
    );
    let status = agent.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("tier:    tracepoint"),
        "status shows the tier:\n{text}"
    );
    let pid = agent.pid();
    let log = agent.log();
    let exit = agent.stop().expect("stops");
    assert!(exit.success(), "exit 0 on SIGTERM");
    // No program of ours stays loaded: the ids the agent printed are gone from the kernel
    // (other agents may run on this machine; only ours are checked).
    let ids = program_ids(&log);
    assert!(
        ids.len() >= 8,
        "the tracepoint tier attaches at least 8 programs: {ids:?}"
    );
    for id in ids {
        let show = Command::new("bpftool")
            .args(["prog", "show", "id", &id])
            .output()
            .expect("bpftool");
        assert!(
            !show.status.success(),
            "program {id} still loaded after the agent (pid {pid}) exited"
        );
    }
}

#[test]
fn selftest_reports_tracepoint_and_offsets_match_proc() {
    require_root();
    let _k = kernel_lock();
    let out = Command::new(guardrail_bin())
        .arg("selftest")
        .output()
        .expect("selftest runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "selftest exits 0:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("tier: tracepoint"),
        "selftest reports the tracepoint tier here:\n{text}"
    );
    for field in [
        "task_struct.tgid",
        "task_struct.sessionid",
        "signal_struct.pids[PGID]",
        "fs_struct.pwd",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("[ ok ]") && l.contains(field)),
            "{field} read right:\n{text}"
        );
    }
    let runaway = text
        .lines()
        .find(|l| l.contains("runaway deletion"))
        .unwrap_or("");
    assert!(
        runaway.starts_with("[ ok ]"),
        "selftest proves enforcement with a real runaway:\n{text}"
    );
    assert!(
        runaway.contains("21 files gone, 1 past the budget")
            || runaway.contains("20 files gone, 0 past the budget"),
        "at most one file past the budget in this tier:\n{runaway}"
    );
    // A stand-in shutdown from a session classified remote: the tracepoint tier stops the
    // program before its first instruction.
    assert!(
        text.lines().any(
            |l| l.starts_with("[ ok ] remote shutdown: a stand-in \"reboot\"")
                && l.ends_with("stopped before its first instruction")
        ),
        "selftest proves the shutdown guard with a stand-in:\n{text}"
    );
    let _ = Path::new("/");
}

#[test]
fn kill_cont_of_a_held_job_is_stopped_again() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup(BUDGET);
    let victim = s.path().join("victim");
    fill(&victim, 2000);
    let job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent.wait_hold(Duration::from_secs(60)).expect("held");
    let at_hold = settle(&victim, Duration::from_millis(500));
    // Resumed from "its own shell" without approval.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(job.pgid() as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "the kernel stopped the job again"
    );
    let after = settle(&victim, Duration::from_millis(500));
    // The tracepoint tier cannot refuse the attempt that re-stops it: at most one more file.
    assert!(
        at_hold - after <= 1,
        "{} files deleted after kill -CONT without approval",
        at_hold - after
    );
    let holds = agent.holds();
    assert_eq!(holds.len(), 1, "the hold stays open");
    assert_eq!(holds[0]["id"].as_u64(), Some(id));
}

#[test]
fn a_crashed_agents_hold_survives_and_the_next_agent_adopts_it() {
    require_root();
    let _k = kernel_lock();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir");
    let cg = TestCgroup::new();
    let text = policy(BUDGET, &[&target], &[], &cg);
    let pins = unique_pin_dir();
    let pins_arg = pins.display().to_string();
    let first = Agent::start_with(&text, &["--pin-dir", &pins_arg]).expect("first agent");
    let victim = s.path().join("victim");
    fill(&victim, 2000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = first.wait_hold(Duration::from_secs(60)).expect("held");
    let at_hold = settle(&victim, Duration::from_millis(500));
    first.crash();

    // No agent runs: the pinned programs keep enforcing. Resumed without approval, the job is
    // stopped again by the kernel.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(job.pgid() as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT");
    std::thread::sleep(Duration::from_millis(300));
    // The deleting process is stopped again by the kernel (its shell merely waits for it: with
    // no agent running, nobody re-stops the rest of the group).
    let rm_stopped = || {
        pids_in_group(job.pgid()).iter().any(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            stat.contains("(rm) T")
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), rm_stopped),
        "the pinned programs stopped rm again"
    );
    let after = settle(&victim, Duration::from_millis(500));
    assert!(
        at_hold - after <= 1,
        "{} files deleted while no agent ran",
        at_hold - after
    );

    // The next agent adopts the hold: same incident id; approve lets the job finish.
    let second = Agent::start_with(&text, &["--pin-dir", &pins_arg]).expect("second agent");
    assert!(
        second.saw(&format!("adopted open hold {id}")),
        "the hold is adopted:\n{}",
        second.log()
    );
    assert_eq!(
        second.holds().first().and_then(|h| h["id"].as_u64()),
        Some(id)
    );
    let out = second.cli(&["approve", &id.to_string(), "--for-job"]);
    assert!(
        out.status.success(),
        "approve: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        job.wait(Duration::from_secs(60)).is_some(),
        "the approved job finishes"
    );
    assert_eq!(count_files(&victim), 0);
    let status = second.stop().expect("stops");
    assert!(status.success());
    assert!(
        !pins.exists(),
        "a stop (not a restart) removes the pins: {}",
        pins.display()
    );
}

#[test]
fn approve_also_continues_a_wrapper_stopped_in_sympathy() {
    // sudo with use_pty (Debian's default) runs the command in its own process group and stops
    // itself when the command stops: approve must continue it too, or the admin's shell keeps
    // showing a stopped job.
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup(BUDGET);
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let kit = testkit_bin();
    let mut job = Job::spawn_in(
        &format!("exec {} mirror-stop rm -rf victim", kit.display()),
        s.path(),
        Some(&cg),
    );
    let id = agent.wait_hold(Duration::from_secs(60)).expect("held");
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "the wrapper stopped in sympathy"
    );
    agent.cli_ok(&["approve", &id.to_string(), "--for-job"]);
    let status = job.wait(Duration::from_secs(60));
    assert!(
        status.is_some(),
        "the wrapper was continued and the job finished"
    );
    assert_eq!(count_files(&victim), 0);
}

/// A policy whose test rule uses `action`.
fn setup_action(budget: u64, action: &str) -> Setup {
    let scene = Scene::new();
    let text = policy(budget, &[], &[], &scene.cg).replace(
        &format!("budget = {budget}\n"),
        &format!("budget = {budget}\naction = \"{action}\"\n"),
    );
    let setup = scene.start(&text);
    setup.agent.require_tier(Tier::Tracepoint);
    setup
}

#[test]
fn block_kills_the_job_at_the_budget_without_a_hold() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup_action(BUDGET, "block");
    let victim = s.path().join("victim");
    fill(&victim, 2000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let status = job
        .wait(Duration::from_secs(60))
        .expect("the blocked job ends");
    assert!(!status.success(), "the blocked job was killed: {status:?}");
    let gone = 2000 - count_files(&victim);
    assert!(
        (100..=101).contains(&gone),
        "block stops it at the budget: {gone} gone"
    );
    assert!(agent.holds().is_empty(), "block opens no hold");
    assert!(
        wait_until(Duration::from_secs(3), || agent
            .events()
            .iter()
            .any(|e| e["incident"]["outcome"] == "killed")),
        "the event log has the blocked incident"
    );
}

#[test]
fn alert_counts_and_reports_but_stops_nothing() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup_action(BUDGET, "alert");
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    assert!(
        job.wait(Duration::from_secs(60))
            .is_some_and(|st| st.success()),
        "the job runs to its end"
    );
    assert_eq!(count_files(&victim), 0);
    assert!(agent.holds().is_empty(), "alert opens no hold");
    assert!(
        wait_until(Duration::from_secs(3), || agent
            .events()
            .iter()
            .any(|e| e["incident"]["kind"] == "budget_crossed")),
        "the crossing is reported:\n{}",
        std::fs::read_to_string(&agent.event_log).unwrap_or_default()
    );
}

#[test]
fn approve_with_a_budget_lets_exactly_that_many_more_go() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup(BUDGET);
    let victim = s.path().join("victim");
    fill(&victim, 2000);
    let _job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let first = agent.wait_hold(Duration::from_secs(60)).expect("held");
    let at_first = settle(&victim, Duration::from_millis(500));
    let out = agent.cli(&["approve", &first.to_string(), "--budget", "300"]);
    assert!(
        out.status.success(),
        "approve --budget: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = agent
        .wait_hold(Duration::from_secs(60))
        .expect("held again after 300 more");
    assert_ne!(first, second, "a new incident");
    let at_second = settle(&victim, Duration::from_millis(500));
    let more = at_first - at_second;
    assert!(
        (300..=301).contains(&more),
        "exactly the granted 300 more went (tracepoint tier: +1): {more}"
    );
}

/// The kernel tags a process whose executable matched a rule (here: an exempt package manager)
/// and its children. A process that later gets an exited one's pid must not inherit the tag:
/// `with-pid` gives an ordinary `rm -rf` the exempt process's pid on purpose, and it is held at
/// the budget like any other job.
#[test]
fn a_reused_pid_does_not_inherit_an_exemption() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let pm = s.path().join("pm");
    std::fs::copy(testkit_bin(), &pm).expect("copy the package manager stand-in");
    let cg = TestCgroup::new();
    let exempt = format!(
        "[[deletion.exempt]]\nname = \"package-manager\"\nexecutables = [\"{}\"]\n",
        pm.display()
    );
    let agent =
        Agent::start(&policy_with(BUDGET, &[&target], &[], &cg, &exempt)).expect("agent starts");

    // The exempt stand-in deletes 1000 files, ten times the budget, unstopped.
    let exempt_dir = s.path().join("cache");
    fill(&exempt_dir, 1000);
    let mut pm_job = Job::spawn_in(
        &format!("exec {} rm-rf cache", pm.display()),
        s.path(),
        Some(&cg),
    );
    let pm_pid = pm_job.child.id();
    assert!(
        pm_job.wait(Duration::from_secs(60)).is_some(),
        "the exempt job finishes"
    );
    assert_eq!(
        count_files(&exempt_dir),
        0,
        "the exempt job deleted everything"
    );
    assert!(agent.holds().is_empty(), "an exempt job is never held");

    // Its pid, reused by an ordinary rm -rf.
    let victim = s.path().join("victim");
    fill(&victim, FILES);
    let mut job = Job::spawn_in(
        &format!(
            "exec {} with-pid {pm_pid} rm -rf victim",
            testkit_bin().display()
        ),
        s.path(),
        Some(&cg),
    );
    let id = agent.wait_hold(Duration::from_secs(60)).unwrap_or_else(|e| {
        panic!(
            "the rm -rf with the exempt process's pid {pm_pid} was not held ({e}; {} of {FILES} files left; its stderr: {})",
            count_files(&victim),
            job.stderr()
        )
    });
    let left = settle(&victim, Duration::from_millis(700));
    let gone = (FILES - left) as u64;
    assert!(
        (BUDGET..=BUDGET + 1).contains(&gone),
        "{gone} files gone; one deleting task: the budget, at most one more"
    );
    agent.cli_ok(&["deny", &id.to_string()]);
    assert!(
        job.wait(Duration::from_secs(30)).is_some(),
        "the denied job ends"
    );
    assert_eq!(
        count_files(&victim),
        left,
        "nothing more deleted after the deny"
    );
    assert!(agent.stop().expect("agent stops").success());
}

/// A job of a `deletion.never_hold` unit (a test scope standing in for systemd-logind.service)
/// is not stopped at its budget: this tier cannot refuse, so the kernel reports the crossing and
/// lets the job go on; it finishes.
#[test]
fn a_never_hold_unit_is_reported_and_not_kept_stopped() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let unit = format!("guardrail-test-never-hold-{}.scope", std::process::id());
    let cg = TestCgroup::at(&unit);
    let text = policy(BUDGET, &[&target], &[], &cg).replace(
        "protect_mount_points = false\n",
        &format!("protect_mount_points = false\nnever_hold = [\"{unit}\"]\n"),
    );
    let agent = Agent::start(&text).expect("agent starts");
    let victim = s.path().join("victim");
    fill(&victim, 2000);
    // Eight workers deleting at once: none of them may be stopped, before or after the crossing.
    let mut job = Job::spawn_in(
        &format!("{} fork-unlink 8 victim", testkit_bin().display()),
        s.path(),
        Some(&cg),
    );
    assert!(
        job.wait(Duration::from_secs(60)).is_some(),
        "the job is continued and finishes ({} files left, holds: {:?})",
        count_files(&victim),
        agent.holds()
    );
    assert_eq!(count_files(&victim), 0, "every file deleted");
    assert!(agent.holds().is_empty(), "never held");
    let reported = agent
        .events()
        .into_iter()
        .find(|e| e["incident"]["outcome"] == "reported" && e["incident"]["unit"] == unit.as_str());
    let reported = reported.unwrap_or_else(|| {
        panic!(
            "no reported incident for {unit}; events: {:?}",
            agent.events()
        )
    });
    let reason = reported["incident"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("{unit} is never held")) && reason.contains("only reported"),
        "{reason}"
    );
    assert!(agent.log().contains("not held"), "{}", agent.log());
    assert!(agent.stop().expect("agent stops").success());
}
