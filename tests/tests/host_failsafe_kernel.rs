//! The guard never stops the host's own machinery (tracepoint tier, the host kernel): a
//! `never_hold` unit's job is never stopped, even while no agent runs (the programs stay pinned
//! after a crash) and the next agent does not adopt it as a hold; a `Delegate=yes`-style
//! sub-cgroup of a unit gets the unit's rule; removing empty cgroups is no deletion. Every
//! scenario runs in a scratch directory under /var/tmp and counts what is left on disk.
use std::{path::Path, time::Duration};

use guardrail_integration::*;

const BUDGET: u64 = 100;

/// The test policy (jobs in `cg` get BUDGET) with `never_hold` set to `units`.
fn policy_never_hold(target: &Path, cg: &TestCgroup, units: &[&str]) -> String {
    let list = units
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    policy(BUDGET, &[target], &[], cg).replace(
        "protect_mount_points = false\n",
        &format!("protect_mount_points = false\nnever_hold = [{list}]\n"),
    )
}

/// A never_hold unit's job (a cgroup standing in for systemd-logind.service) crosses its budget
/// while the agent is dead (SIGKILL: the programs and maps stay pinned): nothing stops it, every
/// file goes, and the next agent on the same pins adopts no hold and stops nothing.
///
/// The old code decided never_hold in the agent only: with no agent running the kernel SIGSTOPped
/// the job at its budget and nobody continued it (state T, 1,900 files left), and the next agent
/// adopted it as an open hold (and would have killed it at the hold timeout).
#[test]
fn a_never_hold_job_is_not_stopped_while_no_agent_runs_nor_adopted_after() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let unit = format!("guardrail-test-logind-{}.service", std::process::id());
    let cg = TestCgroup::at(&unit);
    let text = policy_never_hold(&target, &cg, &[&unit]);
    let pins = unique_pin_dir();
    let pin_arg = pins.to_string_lossy().into_owned();
    let agent = Agent::start_with(&text, &["--pin-dir", &pin_arg]).expect("agent starts");
    agent.crash();
    assert!(
        pins.join("links").is_dir(),
        "the crashed agent left its programs pinned"
    );

    let victim = s.path().join("victim");
    fill(&victim, 2000);
    // The job stays alive after its deletions, so the next agent sees it.
    let mut job = Job::spawn_in("rm -rf victim && exec sleep 60", s.path(), Some(&cg));
    let mut seen_stopped = false;
    let done = wait_until(Duration::from_secs(60), || {
        seen_stopped |= group_states(job.pgid()).contains(&'T');
        count_files(&victim) == 0 && !victim.exists()
    });
    assert!(
        done,
        "the never_hold job deleted everything with no agent running ({} files left, states {:?})",
        count_files(&victim),
        group_states(job.pgid())
    );
    assert!(!seen_stopped, "the never_hold job was stopped");

    let next = Agent::start_with(&text, &["--pin-dir", &pin_arg]).expect("next agent starts");
    assert!(
        next.saw("replaced"),
        "the next agent took over the pinned programs:\n{}",
        next.log()
    );
    assert!(next.holds().is_empty(), "adopted: {:?}", next.holds());
    assert!(!next.saw("adopted open hold"), "{}", next.log());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        group_states(job.pgid()),
        vec!['S'],
        "the job (its sleep) runs on, not stopped"
    );
    assert!(job.child.try_wait().expect("try_wait").is_none());
    assert!(next.stop().expect("agent stops").success());
}

/// A sub-cgroup of a ruled unit (what a `Delegate=yes` service makes) is judged under the unit's
/// rule: held at the unit's budget, exactly like the unit's own processes.
///
/// The old code matched units by exact cgroup id: a job in `unit/payload` got the default rule
/// (budget 100,000,000 in the test policy) and deleted all 2,000 files.
#[test]
fn a_sub_cgroup_of_a_ruled_unit_gets_the_units_rule() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let unit = TestCgroup::new();
    let payload = TestCgroup::at(&format!("{}/payload", unit.name.trim_start_matches('/')));
    let agent = Agent::start(&policy(BUDGET, &[&target], &[], &unit)).expect("agent starts");
    let victim = s.path().join("victim");
    fill(&victim, 2000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&payload));
    let id = agent
        .wait_hold(Duration::from_secs(60))
        .expect("the sub-cgroup's job is held under the unit's rule");
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "the job is stopped"
    );
    let left = settle(&victim, Duration::from_millis(700)) as u64;
    assert!(
        (2000 - BUDGET - 1..=2000 - BUDGET).contains(&left),
        "{left} files left; the unit's budget is {BUDGET} (one deleting task: at most one more)"
    );
    let held = agent.holds();
    assert_eq!(held[0]["rule"], "test-job", "{held:?}");
    agent.deny_and_wait(id, &mut job);
    assert_eq!(count_files(&victim) as u64, left, "nothing deleted after");
    assert!(agent.stop().expect("agent stops").success());
    drop(payload);
}

/// A budgeted job removing 1,000 empty cgroups (what systemd does at every unit stop, and a
/// container runtime's clean-up) is not counted: cgroupfs entries are kernel objects, not data.
/// The job works from inside the cgroup tree with one-component names, the case the tracepoint
/// tier can tell (an absolute path starts from `/`, whose filesystem tells nothing).
///
/// The old code counted every rmdir: the job was held at 100 with 900 cgroups left.
#[test]
fn removing_empty_cgroups_is_not_a_deletion() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let cg = TestCgroup::new();
    let tree = TestCgroup::new();
    for i in 0..1000 {
        std::fs::create_dir(tree.path.join(format!("g{i:04}"))).expect("mkdir cgroup");
    }
    let agent = Agent::start(&policy(BUDGET, &[&target], &[], &cg)).expect("agent starts");
    let mut job = Job::spawn_in(
        &format!("cd {:?} && rmdir g*", tree.path.display().to_string()),
        s.path(),
        Some(&cg),
    );
    let status = job.wait(Duration::from_secs(60));
    let left = std::fs::read_dir(&tree.path)
        .expect("read cgroup")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('g'))
        .count();
    assert_eq!(
        left,
        0,
        "every empty cgroup removed (holds: {:?})",
        agent.holds()
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the job ran to its end: {status:?}"
    );
    assert!(agent.holds().is_empty(), "held: {:?}", agent.holds());
    // The same job deleting real files is still counted: held at the budget.
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent
        .wait_hold(Duration::from_secs(60))
        .expect("real files still count");
    agent.deny_and_wait(id, &mut job);
    assert!(agent.stop().expect("agent stops").success());
}

/// Only the host's PID 1 is exempt: a job whose process is PID 1 of a new pid namespace (a
/// container's init) is an ordinary job, held at its budget. Guards the exemption against being
/// keyed on a namespace's pid number, which any user with a user namespace can get.
#[test]
fn a_containers_init_is_not_pid_1() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(BUDGET, &[&target], &[], &cg)).expect("agent starts");
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    // `unshare --fork` makes rm PID 1 of the new namespace.
    let mut job = Job::spawn_in(
        "exec unshare --pid --fork rm -rf victim",
        s.path(),
        Some(&cg),
    );
    let id = agent
        .wait_hold(Duration::from_secs(60))
        .expect("the namespace's init is held at the budget");
    let left = settle(&victim, Duration::from_millis(700)) as u64;
    assert!(
        (1000 - BUDGET - 1..=1000 - BUDGET).contains(&left),
        "{left} files left"
    );
    agent.deny_and_wait(id, &mut job);
    assert!(agent.stop().expect("agent stops").success());
}

/// A never_hold unit that starts after the agent (its cgroup appears later) is mapped when it
/// appears: its job crossing the budget is reported and never stopped.
///
/// The old watcher re-resolved only the units of rules, exemptions and data directory owners:
/// the late unit ran under its rule with no never_hold and was held (state T).
#[test]
fn a_never_hold_unit_started_after_the_agent_is_never_held() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let unit = format!("guardrail-test-late-{}.service", std::process::id());
    // The test rule (budget 100) and never_hold both name the unit's cgroup, created only once
    // the agent runs (where the agent watches for units: the cgroup2 root, as system.slice).
    let late = TestCgroup {
        path: cgroup2_root().join(&unit),
        name: format!("/{unit}"),
    };
    let text = policy_never_hold(&target, &late, &[&unit]);
    let agent = Agent::start(&text).expect("agent starts");
    std::fs::create_dir(&late.path).expect("the unit's cgroup appears");
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .saw("a unit it names started")),
        "the agent re-resolved its units when the cgroup appeared:\n{}",
        agent.log()
    );
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&late));
    let mut seen_stopped = false;
    let done = wait_until(Duration::from_secs(60), || {
        seen_stopped |= group_states(job.pgid()).contains(&'T');
        job.child.try_wait().ok().flatten().is_some()
    });
    assert!(
        done && !seen_stopped,
        "the job ran to its end, never stopped"
    );
    assert_eq!(count_files(&victim), 0, "every file deleted");
    assert!(agent.holds().is_empty(), "held: {:?}", agent.holds());
    assert!(
        agent.saw(&format!("{unit} is never held")),
        "{}",
        agent.log()
    );
    assert!(agent.stop().expect("agent stops").success());
    drop(late);
}

/// The userspace tier reads the same never_hold table: a job in a sub-cgroup of a never_hold unit
/// past its budget is reported and never stopped by the watcher; every file goes.
///
/// The old tier matched units by exact cgroup id, so the sub-cgroup's job ran under the default
/// rule and never crossed (no "never held" report); a never_hold job that did cross was stopped by
/// the watcher (SIGSTOP) and continued only once the agent read the event.
#[test]
fn the_userspace_tier_never_stops_a_never_hold_units_sub_cgroup() {
    let _k = kernel_lock();
    require_root();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let unit = format!("guardrail-test-bus-{}.service", std::process::id());
    let cg = TestCgroup::at(&unit);
    let sub = TestCgroup::at(&format!("{unit}/worker"));
    let agent = Agent::start_with(
        &policy_never_hold(&target, &cg, &[&unit]),
        &["--tier", "userspace"],
    )
    .expect("agent starts with the userspace tier");
    assert!(agent.saw("tier userspace in force"), "{}", agent.log());
    let victim = s.path().join("victim");
    fill(&victim, 2000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&sub));
    let mut seen_stopped = false;
    let done = wait_until(Duration::from_secs(60), || {
        seen_stopped |= group_states(job.pgid()).contains(&'T');
        job.child.try_wait().ok().flatten().is_some()
    });
    assert!(
        done && !seen_stopped,
        "the job ran to its end, never stopped"
    );
    assert_eq!(count_files(&victim), 0, "every file deleted");
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .saw(&format!("{unit} is never held"))),
        "{}",
        agent.log()
    );
    assert!(agent.holds().is_empty(), "held: {:?}", agent.holds());
    assert!(agent.stop().expect("agent stops").success());
    drop(sub);
}
