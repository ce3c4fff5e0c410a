//! The policy file as an admin meets it: `policy check` diagnostics, `policy explain`, hot reload
//! with no gap (a broken edit keeps the last good policy in force), editors' save patterns, and
//! audit mode. Kernel parts run on the host's tracepoint tier in scratch trees.
use std::{path::Path, process::Command, time::Duration};

use guardrail_integration::*;

fn write_atomically(path: &Path, text: &str) {
    // What editors do: write a temporary file, then rename it over the original.
    let tmp = path.with_extension("toml.tmp~");
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename over");
}

/// Starts a runaway over `n` out-of-scope files and returns how many were gone when it was held.
fn held_after(agent: &Agent, s: &Path, cg: &TestCgroup, n: usize) -> (u64, usize) {
    let victim = s.join("victim");
    let _ = std::fs::remove_dir_all(&victim);
    fill(&victim, n);
    let _job = Job::spawn_in("rm -rf victim", s, Some(cg));
    let id = agent.wait_hold(Duration::from_secs(30)).expect("held");
    let left = settle(&victim, Duration::from_millis(500));
    agent.cli_ok(&["deny", &id.to_string()]);
    (id, n - left)
}

#[test]
fn broken_edit_keeps_the_last_good_policy_and_a_fix_takes_effect_within_a_second() {
    require_root();
    let _k = kernel_lock();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir");
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(100, &[&target], &[], &cg)).expect("agent");

    // A typo, saved in place: rejected, diagnostics logged with file:line:col, old policy stays.
    let broken =
        policy(100, &[&target], &[], &cg).replace("budget = 100\n", "budget = 100\nbudgett = 5\n");
    std::fs::write(&agent.policy, &broken).expect("write broken");
    assert!(
        wait_until(Duration::from_secs(5), || agent.saw("policy rejected")),
        "the broken policy is rejected:\n{}",
        agent.log()
    );
    assert!(
        agent.saw("error[E0001]"),
        "the rejection carries the diagnostic code"
    );
    assert!(
        agent.saw("policy.toml:17:1"),
        "and the position of the unknown key:\n{}",
        agent.log()
    );
    let status = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    assert!(
        status.contains("the policy on disk is not the one in force"),
        "status says so:\n{status}"
    );
    let (_, gone) = held_after(&agent, s.path(), &cg, 1000);
    assert!(
        (100..=101).contains(&gone),
        "the last good policy (budget 100) still holds runaways: {gone} gone"
    );

    // The fix, saved the way editors save (rename over): picked up within a second.
    let fixed = policy(50, &[&target], &[], &cg);
    let before = agent.log().matches("policy reloaded").count();
    write_atomically(&agent.policy, &fixed);
    assert!(
        wait_until(Duration::from_secs(1), || agent
            .log()
            .matches("policy reloaded")
            .count()
            > before),
        "the fixed policy is in force within a second:\n{}",
        agent.log()
    );
    let status = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    assert!(
        !status.contains("not the one in force"),
        "status agrees with the file:\n{status}"
    );
    let (_, gone) = held_after(&agent, s.path(), &cg, 1000);
    assert!(
        (50..=51).contains(&gone),
        "the new budget (50) is in force: {gone} gone"
    );
}

#[test]
fn vim_probe_files_and_sighup() {
    require_root();
    let _k = kernel_lock();
    let s = scratch();
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(100, &[], &[], &cg)).expect("agent");
    // vim writes and deletes a file named 4913 next to the one it saves: not a policy change.
    let probe = agent.dir.path().join("4913");
    std::fs::write(&probe, "").expect("probe");
    std::fs::remove_file(&probe).expect("rm probe");
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        !agent.saw("policy reloaded") && !agent.saw("policy rejected"),
        "4913 is ignored:\n{}",
        agent.log()
    );
    // SIGHUP reloads.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    assert!(
        wait_until(Duration::from_secs(2), || agent
            .saw("policy reloaded (SIGHUP)")),
        "SIGHUP reloads"
    );
    drop(s);
}

#[test]
fn audit_mode_reports_what_it_would_have_held_and_stops_nothing() {
    require_root();
    let _k = kernel_lock();
    let s = scratch();
    let cg = TestCgroup::new();
    let text = policy(100, &[], &[], &cg).replace("mode = \"enforce\"", "mode = \"audit\"");
    let agent = Agent::start(&text).expect("agent");
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    assert!(
        job.wait(Duration::from_secs(60)).is_some(),
        "the job runs to its end"
    );
    assert_eq!(count_files(&victim), 0, "audit mode stops nothing");
    assert!(agent.holds().is_empty(), "no hold in audit mode");
    assert!(
        wait_until(Duration::from_secs(3), || agent
            .events()
            .iter()
            .any(|e| e["incident"]["outcome"] == "would_have_held")),
        "the event log has the would-have-held incident:\n{}",
        std::fs::read_to_string(&agent.event_log).unwrap_or_default()
    );
}

#[test]
fn policy_check_prints_compiler_style_diagnostics_and_exits_1() {
    let dir = tempfile::tempdir().expect("tmp");
    let bad = dir.path().join("policy.toml");
    std::fs::write(&bad, "mode = \"enforce\"\n[deletion]\nbudget = 10\ntargets = [\"tmp\"]\nwindow = \"ten minutes\"\n")
        .expect("write");
    let out = Command::new(guardrail_bin())
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "errors exit 1:\n{err}");
    assert!(
        err.contains("error[E0003]"),
        "relative path reported:\n{err}"
    );
    assert!(
        err.contains(&format!("{}:4:12", bad.display())),
        "with file:line:col:\n{err}"
    );
    assert!(
        err.contains("error[E0004]"),
        "bad duration reported:\n{err}"
    );
    let json = Command::new(guardrail_bin())
        .args(["policy", "check", "--json"])
        .arg(&bad)
        .output()
        .expect("run");
    let diags: serde_json::Value = serde_json::from_slice(&json.stdout).expect("--json is JSON");
    assert!(
        diags
            .as_array()
            .is_some_and(|a| a.iter().any(|d| d["code"] == "E0003" && d["line"] == 4)),
        "{diags}"
    );

    let good = Command::new(guardrail_bin())
        .args(["policy", "check"])
        .output()
        .expect("run");
    assert_eq!(
        good.status.code(),
        Some(0),
        "the embedded default passes:\n{}",
        String::from_utf8_lossy(&good.stderr)
    );
}

#[test]
fn policy_explain_names_the_deciding_rule() {
    let s = scratch();
    let target = s.path().join("target");
    let data = s.path().join("db");
    std::fs::create_dir_all(target.join("cache")).expect("mkdir");
    std::fs::create_dir_all(&data).expect("mkdir");
    let cg = TestCgroup::new();
    let text = policy_with(
        100,
        &[&target],
        &[],
        &cg,
        &format!(
            "[[deletion.data_dir]]\npath = {:?}\nowners = {{ users = [\"root\"] }}\n",
            data.display().to_string()
        ),
    );
    let p = s.path().join("policy.toml");
    std::fs::write(&p, text).expect("write");
    let explain = |path: &Path, extra: &[&str]| {
        let out = Command::new(guardrail_bin())
            .args(["policy", "explain"])
            .arg(path)
            .arg("--policy")
            .arg(&p)
            .args(extra)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "explain: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let inside = explain(&target.join("cache/x"), &[]);
    assert!(
        inside.to_lowercase().contains("target"),
        "inside a target:\n{inside}"
    );
    let outside = explain(&s.path().join("elsewhere"), &[]);
    assert!(
        outside.contains("100000000"),
        "outside: counted against the default budget:\n{outside}"
    );
    let foreign = explain(&data.join("table"), &["--user", "nobody"]);
    assert!(
        foreign.to_lowercase().contains("refused"),
        "a data dir refuses a job not named for it:\n{foreign}"
    );
    let owner = explain(&data.join("table"), &["--user", "root"]);
    assert!(
        !owner.to_lowercase().contains("refused"),
        "the named job may delete:\n{owner}"
    );
}

#[test]
fn policy_test_replays_job_summaries_through_a_candidate_budget() {
    require_root();
    let _k = kernel_lock();
    let s = scratch();
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(1000, &[], &[], &cg)).expect("agent");
    let victim = s.path().join("victim");
    fill(&victim, 300);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    assert!(
        job.wait(Duration::from_secs(60)).is_some(),
        "300 deletions stay under the budget of 1000"
    );
    let pgid = job.pgid();
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .events()
            .iter()
            .any(|e| e["job"]["pgid"] == pgid)),
        "the agent wrote a job summary when the job ended:\n{}",
        std::fs::read_to_string(&agent.event_log).unwrap_or_default()
    );
    let replay = |budget: u64| {
        let candidate = s.path().join(format!("candidate-{budget}.toml"));
        std::fs::write(&candidate, policy(budget, &[], &[], &cg)).expect("write candidate");
        let out = Command::new(guardrail_bin())
            .args(["policy", "test", "--events"])
            .arg(&agent.event_log)
            .arg("--policy")
            .arg(&candidate)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "policy test: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let strict = replay(100);
    let line = strict
        .lines()
        .find(|l| l.contains(&format!("pgid {pgid} ")))
        .unwrap_or("")
        .to_string();
    assert!(
        line.contains("301 deletions outside scope")
            || line.contains("300 deletions outside scope"),
        "{strict}"
    );
    assert!(
        line.contains("candidate rule test-job: would hold (peak"),
        "budget 100 would have held it:\n{strict}"
    );
    let loose = replay(5000);
    let line = loose
        .lines()
        .find(|l| l.contains(&format!("pgid {pgid} ")))
        .unwrap_or("")
        .to_string();
    assert!(
        line.contains("within budget"),
        "budget 5000 would not:\n{loose}"
    );
}

#[test]
fn policy_explain_shutdown_per_session_class() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("policy.toml");
    let default = Command::new(guardrail_bin())
        .args(["policy", "default"])
        .output()
        .expect("run");
    std::fs::write(&p, &default.stdout).expect("write the shipped default");
    let explain = |class: &str| {
        let out = Command::new(guardrail_bin())
            .args([
                "policy",
                "explain",
                "--shutdown",
                "--session-class",
                class,
                "--policy",
            ])
            .arg(&p)
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "explain --shutdown: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    };
    // The shipped default: remote sessions confirm, local ones are allowed.
    assert!(
        explain("remote").contains("confirm"),
        "{}",
        explain("remote")
    );
    assert!(explain("local").contains("allow"), "{}", explain("local"));
    assert!(
        explain("unknown").contains("confirm"),
        "{}",
        explain("unknown")
    );
}

#[test]
fn a_unit_rule_applies_to_a_unit_started_after_the_agent() {
    require_root();
    let _k = kernel_lock();
    let s = scratch();
    let unit = format!("guardrail-test-{}.service", std::process::id());
    // Only the slice exists when the agent starts: the unit's cgroup appears later, the way
    // systemd creates it when the unit starts.
    let slice = cgroup2_root().join("system.slice");
    let made_slice = !slice.exists();
    std::fs::create_dir_all(&slice).expect("system.slice");
    let other = TestCgroup::new();
    let text = policy_with(
        100_000_000,
        &[],
        &[],
        &other,
        &format!(
            "[[deletion.rule]]\nname = \"nightly-update\"\nmatch = {{ unit = \"{unit}\" }}\nbudget = 50\n"
        ),
    );
    let agent = Agent::start(&text).expect("agent");
    let cg = TestCgroup::at(&format!("system.slice/{unit}"));
    assert!(
        wait_until(Duration::from_secs(3), || agent
            .saw("a unit it names started")),
        "the agent noticed the unit's cgroup:\n{}",
        agent.log()
    );
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let _job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    agent
        .wait_hold(Duration::from_secs(30))
        .expect("the unit's job is held");
    let gone = 1000 - settle(&victim, Duration::from_millis(500));
    assert!(
        (50..=51).contains(&gone),
        "the unit rule's budget (50) applied: {gone} gone"
    );
    assert!(
        agent.holds()[0]["rule"] == "nightly-update",
        "held under the unit's rule: {:?}",
        agent.holds()
    );
    drop(_job);
    drop(cg);
    if made_slice {
        let _ = std::fs::remove_dir(&slice);
    }
}
