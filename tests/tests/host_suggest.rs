//! `guardrail policy suggest` end to end: an agent in audit mode sees a service's job delete past
//! its budget, `policy suggest` turns the agent's own event log into a drop-in scoping that
//! service to the directory it deleted in, `policy check` accepts it, and an agent enforcing the
//! drop-in lets the same job finish while the same service deleting elsewhere is held.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use guardrail_integration::*;

const BUDGET: usize = 20;
const FILES: usize = 100;

/// The test service's rule matches it by unit; every other job on the machine is left alone.
fn policy_text(mode: &str, unit: &str, cache: &Path) -> String {
    format!(
        r#"mode = "{mode}"
[deletion]
budget = 100000000
window = "10m"
action = "hold"
hold_timeout = "10m"
on_deny = "kill"
targets = []
protected_roots = ["/"]
protect_mount_points = false

[[deletion.rule]]
name = "test-service"
match = {{ unit = "{unit}" }}
targets = [{cache:?}]
budget = {BUDGET}
"#
    )
}

fn guardrail(args: &[&str]) -> Output {
    Command::new(guardrail_bin())
        .args(args)
        .output()
        .expect("running guardrail")
}

/// One process deleting every file of its working directory, one per 20 ms (a service's worker:
/// alive when the agent reads its crossing, so the incident names its cgroup and unit).
const SLOW_DELETE: &str =
    "perl -e 'for (sort glob(\"f*\")) { unlink $_; select(undef, undef, undef, 0.02) }'";

/// The service's job: deletes every file in `dir`, then ends. Like a service it has no login
/// session (the runner's audit session is cleared, where the test runs in one).
fn service_job(dir: &Path, cg: &TestCgroup) -> Job {
    Job::spawn_in(
        &format!("{{ echo 4294967295 > /proc/self/loginuid; }} 2>/dev/null; {SLOW_DELETE}"),
        dir,
        Some(cg),
    )
}

/// Both agents run the userspace tier: it names every deleted path in full and judges it by its
/// real directory on any host (the tracepoint tier of a host without BPF LSM counts deletions by
/// absolute path whatever the targets, and may not name a relative path's directories).
const TIER: [&str; 2] = ["--tier", "userspace"];

#[test]
fn suggest_learns_a_services_directory_from_audit_mode_and_the_rule_holds_nothing_else() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    let victim = s.path().join("victim");
    let cache = s.path().join("cache");
    let elsewhere = s.path().join("elsewhere");
    std::fs::create_dir_all(&cache).expect("mkdir cache");
    let unit = format!("guardrail-suggest-{}.service", std::process::id());
    let cg = TestCgroup::at(&unit);

    // 1. Audit mode: the service deletes 100 files, 80 past its budget; nothing is stopped.
    let audit_policy = s.path().join("audit.toml");
    std::fs::write(&audit_policy, policy_text("audit", &unit, &cache)).expect("write policy");
    let agent =
        Agent::start_with(&policy_text("audit", &unit, &cache), &TIER).expect("audit agent starts");
    fill(&victim, FILES);
    let mut job = service_job(&victim, &cg);
    assert!(job.wait(Duration::from_secs(60)).is_some(), "the job ends");
    assert_eq!(count_files(&victim), 0, "audit mode stops nothing");
    // The job's summary is written once the agent sees its process group gone.
    let summarised = wait_until(Duration::from_secs(30), || {
        agent
            .events()
            .iter()
            .any(|e| e["job"]["incident"].as_u64().is_some_and(|i| i != 0))
    });
    assert!(summarised, "a job summary; events: {:?}", agent.events());
    let incident = agent
        .events()
        .into_iter()
        .find(|e| e["incident"]["outcome"] == "would_have_held")
        .unwrap_or_else(|| panic!("a would_have_held incident: {:?}", agent.events()));
    let id = incident["incident"]["id"].as_u64().expect("incident id");
    assert_eq!(incident["incident"]["unit"], unit.as_str());
    assert_eq!(incident["incident"]["cgroup"], format!("/{unit}").as_str());
    let events = s.path().join("events.jsonl");
    std::fs::copy(&agent.event_log, &events).expect("copy the event log");
    assert!(agent.stop().expect("agent stops").success());

    // 2. The suggestion, from the agent's real event log.
    let dropins = s.path().join("policy.d");
    std::fs::create_dir_all(&dropins).expect("mkdir policy.d");
    let out_file = dropins.join("50-suggested.toml");
    let out = guardrail(&[
        "policy",
        "suggest",
        "--events",
        &events.display().to_string(),
        "--policy",
        &audit_policy.display().to_string(),
        "--out",
        &out_file.display().to_string(),
    ]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "suggested: {report}\n{}\nincident: {incident}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dropin = std::fs::read_to_string(&out_file).expect("the drop-in is written");
    eprintln!("{report}\n{dropin}");
    let rule = format!(
        "[[deletion.rule]]\nname = \"test-service\"\nmatch = {{ unit = \"{unit}\" }}\ntargets = [\n    \"{}\",  # kept from rule \"test-service\"\n    \"{}\",  # new: incident {id}\n]\nbudget = {BUDGET}\nwindow = \"10m\"\naction = \"hold\"\n",
        cache.display(),
        victim.display(),
    );
    assert!(
        dropin.contains(&rule),
        "the rule scopes the service to the directory it deleted in:\n{dropin}"
    );
    assert_eq!(dropin.matches("[[deletion.rule]]").count(), 1, "{dropin}");
    assert!(
        dropin.contains(&format!("#   incident {id} at ")) && dropin.contains("#     deleted "),
        "the evidence is in the comment:\n{dropin}"
    );
    assert!(
        report.contains(&format!(
            "with the drop-in: within budget (peak 0 <= {BUDGET}): not held"
        )) && report.contains("none of the 1 job(s) it learned from would have been held"),
        "{report}"
    );
    assert!(
        report.contains(&format!("an unscoped runaway in {unit} (10000 deletions"))
            && report.contains("the rules are scoped, not exemptions"),
        "{report}"
    );

    // 3. `policy check` accepts the main policy with the drop-in.
    let enforce_policy = s.path().join("enforce.toml");
    std::fs::write(&enforce_policy, policy_text("enforce", &unit, &cache)).expect("write");
    let check = guardrail(&[
        "policy",
        "check",
        &enforce_policy.display().to_string(),
        "--dir",
        &dropins.display().to_string(),
    ]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // 4. Enforcing with the drop-in: the same job finishes, the service deleting elsewhere is
    // held at its budget.
    let dropins_arg = dropins.display().to_string();
    let agent = Agent::start_with(
        &policy_text("enforce", &unit, &cache),
        &[TIER[0], TIER[1], "--policy-dir", &dropins_arg],
    )
    .expect("enforcing agent starts");
    fill(&victim, FILES);
    let mut job = service_job(&victim, &cg);
    assert!(
        job.wait(Duration::from_secs(60)).is_some(),
        "the learned job is not held (holds: {:?})",
        agent.holds()
    );
    assert_eq!(
        count_files(&victim),
        0,
        "every file of the learned job deleted"
    );
    assert!(agent.holds().is_empty(), "never held");

    fill(&elsewhere, FILES);
    let mut job = service_job(&elsewhere, &cg);
    let hold = agent
        .wait_hold(Duration::from_secs(30))
        .expect("the service deleting elsewhere is held");
    let left = settle(&elsewhere, Duration::from_millis(500));
    // The userspace tier stops the job just after the crossing: its budget gone, and the files
    // it reached before the stop (a few at one file per 20 ms).
    assert!(
        (FILES - BUDGET - 10..FILES - BUDGET).contains(&left),
        "held just past its budget of {BUDGET}: {left} of {FILES} files left"
    );
    agent.deny_and_wait(hold, &mut job);
    assert_eq!(
        count_files(&elsewhere),
        left,
        "nothing deleted after the deny"
    );
    assert!(agent.stop().expect("agent stops").success());
}

/// Hostile or broken input: a record that is not JSON names its file and line (exit 2); a log
/// with nothing learned exits 1; an existing --out file is never overwritten.
#[test]
fn suggest_reports_bad_input_by_line_and_nothing_to_suggest_with_exit_1() {
    let s = scratch();
    let policy = s.path().join("p.toml");
    std::fs::write(&policy, "[deletion]\nbudget = 300\n").expect("write policy");
    let p = policy.display().to_string();
    let log = s.path().join("events.jsonl");
    let l = log.display().to_string();

    std::fs::write(&log, "{\"agent\":{}}\n\n").expect("write");
    let out = guardrail(&["policy", "suggest", "--events", &l, "--policy", &p]);
    assert_eq!(out.status.code(), Some(1), "nothing to suggest");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to suggest"));

    std::fs::write(&log, "{\"agent\":{}}\nnot json \u{1b}[2J\n").expect("write");
    let out = guardrail(&["policy", "suggest", "--events", &l, "--policy", &p]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("{l}:2: not a JSON record")), "{err}");
    assert!(!err.contains('\u{1b}'), "{err}");

    std::fs::write(&log, "{\"incident\":{\"id\":\"x\"}}\n").expect("write");
    let out = guardrail(&["policy", "suggest", "--events", &l, "--policy", &p]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{l}:1: an incident that does not read")),
        "{err}"
    );

    let missing: PathBuf = s.path().join("absent.jsonl");
    let out = guardrail(&[
        "policy",
        "suggest",
        "--events",
        &missing.display().to_string(),
        "--policy",
        &p,
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// The attack: an unprivileged user names a cgroup in their own delegated tree after a service
/// (`.../user@65534.service/app.slice/<name>.service`) and deletes past the budget under the
/// audit-mode agent, hoping `policy suggest` turns their evidence into a rule that frees their
/// directory for a real system service of that name. Judged by a user rule, so without the
/// check that a unit is reached through system slices only, a rule for that unit (base: the
/// user rule) would be suggested. Expected: no rule, a note saying why, exit 1, no file.
#[test]
fn a_unit_named_in_a_users_delegated_tree_gets_no_rule() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    // nobody must reach its directory inside the scratch directory.
    std::fs::set_permissions(
        s.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod scratch");
    let victim = s.path().join("victim");
    fill(&victim, FILES);
    chown_nobody(&victim);
    let unit = format!("guardrail-suggest-evil-{}.service", std::process::id());
    let parents = [
        "user.slice",
        "user.slice/user-65534.slice",
        "user.slice/user-65534.slice/user@65534.service",
        "user.slice/user-65534.slice/user@65534.service/app.slice",
    ];
    let created: Vec<PathBuf> = parents
        .iter()
        .map(|p| cgroup2_root().join(p))
        .filter(|p| !p.exists())
        .collect();
    let cg = TestCgroup::at(&format!("{}/{unit}", parents[3]));
    let text = format!(
        r#"mode = "audit"
[deletion]
budget = 100000000
window = "10m"
targets = []
protected_roots = ["/"]
protect_mount_points = false

[[deletion.rule]]
name = "nobody"
match = {{ user = "65534" }}
targets = []
budget = {BUDGET}
"#
    );
    let policy_file = s.path().join("audit.toml");
    std::fs::write(&policy_file, &text).expect("write policy");
    let agent = Agent::start_with(&text, &TIER).expect("agent starts");
    let mut job = Job::spawn_in(
        &format!(
            "{{ echo 4294967295 > /proc/self/loginuid; }} 2>/dev/null; {AS_NOBODY} {SLOW_DELETE}"
        ),
        &victim,
        Some(&cg),
    );
    assert!(job.wait(Duration::from_secs(60)).is_some(), "the job ends");
    assert_eq!(count_files(&victim), 0, "audit mode stops nothing");
    let incident = agent
        .events()
        .into_iter()
        .find(|e| e["incident"]["outcome"] == "would_have_held")
        .unwrap_or_else(|| panic!("a would_have_held incident: {:?}", agent.events()));
    assert_eq!(incident["incident"]["unit"], unit.as_str(), "{incident}");
    let events = s.path().join("events.jsonl");
    std::fs::copy(&agent.event_log, &events).expect("copy the event log");
    assert!(agent.stop().expect("agent stops").success());

    let out_file = s.path().join("50-suggested.toml");
    let out = guardrail(&[
        "policy",
        "suggest",
        "--events",
        &events.display().to_string(),
        "--policy",
        &policy_file.display().to_string(),
        "--out",
        &out_file.display().to_string(),
    ]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "nothing to suggest: {report}");
    assert!(
        report.contains("not attributable to a system service")
            && report.contains("user@65534.service"),
        "{report}"
    );
    assert!(!out_file.exists(), "no drop-in written");
    drop(cg);
    for p in created.iter().rev() {
        let _ = std::fs::remove_dir(p);
    }
}
