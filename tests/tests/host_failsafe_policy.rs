//! Fail safe, policy side (issue #18): nothing a user controls widens what is free or exempt.
//! Host kernel, tracepoint tier, real agent; every scenario in a scratch directory under
//! /var/tmp, every assertion about files on disk or what an admin reads.
use std::{
    os::unix::fs::{PermissionsExt, chown},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use guardrail_integration::*;

const BUDGET: u64 = 100;
const FILES: usize = 1000;

/// The tracepoint tier stops a job right after the deletion that crossed its budget: with one
/// deleting task, the budget's files and at most that one more are gone.
fn assert_held_at_budget(agent: &Agent, dir: &Path, files: usize, what: &str) {
    agent
        .wait_hold(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{what}: the job is held: {e:#}"));
    let gone = files - settle(dir, Duration::from_millis(700));
    assert!(
        (BUDGET as usize..=BUDGET as usize + 1).contains(&gone),
        "{what}: {gone} of {files} files gone; held at the budget ({BUDGET}) means {BUDGET} or \
         {} gone",
        BUDGET + 1
    );
}

fn mkdir_755(p: &Path) -> PathBuf {
    std::fs::create_dir_all(p).expect("mkdir");
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p.to_path_buf()
}

/// H5. User `nobody` replaces its `~/.cache` with a symlink to a shared directory, under a policy
/// whose targets include `<home>/*/.cache`. The old resolver kept the link (`exists()`, `stat`
/// follow it), so srv became a target for every job and all 1000 files went without a hold.
/// Now the link is left out with a warning in the agent's log, and a job deleting in srv is held
/// at its budget.
#[test]
fn a_users_cache_symlink_does_not_make_its_target_free() {
    require_root();
    let _k = kernel_lock();
    let s = open_scratch();
    let srv = s.path().join("srv");
    fill(&srv, FILES);
    let home = mkdir_755(&s.path().join("home"));
    let nobody_home = mkdir_755(&home.join("nobody"));
    chown(&nobody_home, Some(NOBODY), Some(NOBODY)).expect("chown");
    let link = nobody_home.join(".cache");
    let out = run_as(
        NOBODY,
        &[
            "ln",
            "-s",
            &srv.display().to_string(),
            &link.display().to_string(),
        ],
    );
    assert!(out.status.success(), "nobody makes the link: {out:?}");

    let glob = home.join("*/.cache");
    let target = mkdir_755(&s.path().join("target"));
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(BUDGET, &[&target, &glob], &[], &cg)).expect("agent starts");
    assert!(
        agent.saw("warning[W0008]")
            && agent.saw(&format!("{:?} is a symlink", link.display().to_string())),
        "the start-up log names the skipped link:\n{}",
        agent.log()
    );
    let _job = Job::spawn_in("rm -rf srv", s.path(), Some(&cg));
    assert_held_at_budget(
        &agent,
        &srv,
        FILES,
        "deleting through nobody's .cache symlink",
    );
}

/// A `<home>/*/.cache` match owned by neither root nor the user whose home it is (here uid 4242's
/// directory in nobody's home, as if moved there) is not a target: the old resolver made any
/// existing match free, so all 1000 of uid 4242's files went without a hold.
#[test]
fn a_cache_directory_of_another_user_is_no_target() {
    require_root();
    let _k = kernel_lock();
    let s = open_scratch();
    let home = mkdir_755(&s.path().join("home"));
    let nobody_home = mkdir_755(&home.join("nobody"));
    chown(&nobody_home, Some(NOBODY), Some(NOBODY)).expect("chown");
    let cache = nobody_home.join(".cache");
    fill(&cache, FILES);
    chown(&cache, Some(4242), Some(4242)).expect("chown");
    let glob = home.join("*/.cache");
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(BUDGET, &[&glob], &[], &cg)).expect("agent starts");
    assert!(
        agent.saw("warning[W0008]") && agent.saw("is owned by uid 4242"),
        "the start-up log names the skipped directory:\n{}",
        agent.log()
    );
    let _job = Job::spawn_in("rm -rf .cache", &nobody_home, Some(&cg));
    assert_held_at_budget(&agent, &cache, FILES, "deleting in uid 4242's directory");
}

/// A target around a protected root is refused by `guardrail policy check` with its position;
/// the old checker only warned (W0002) and loaded it.
#[test]
fn policy_check_refuses_a_target_around_a_protected_root() {
    let s = scratch();
    let keep = s.path().join("x/keep");
    std::fs::create_dir_all(&keep).expect("mkdir");
    let file = s.path().join("policy.toml");
    let text = format!(
        "[deletion]\nprotected_roots = [\"/\", {keep:?}]\ntargets = [{x:?}]\n",
        keep = keep.display().to_string(),
        x = s.path().join("x").display().to_string(),
    );
    std::fs::write(&file, text).expect("write policy");
    let out = Command::new(guardrail_bin())
        .args(["policy", "check"])
        .arg(&file)
        .output()
        .expect("guardrail policy check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "refused:\n{err}");
    assert!(
        err.contains("error[E0018]") && err.contains(&format!("--> {}:3:12", file.display())),
        "E0018 at the target's position:\n{err}"
    );
    assert!(err.contains("1 error(s)"), "{err}");
}

/// M11. A target renamed away while the agent runs: the agent notices (inotify on the declared
/// directory and the way to it), rebuilds its tables, and says why in its log. The moved
/// directory is no longer free (held at the budget), the new directory at the old path is. The
/// old agent kept the moved directory's identity as a target until the next reload, and never
/// knew the new one.
#[test]
fn a_target_renamed_away_is_replaced_by_the_new_directory() {
    require_root();
    let _k = kernel_lock();
    let s = scratch();
    let target = s.path().join("target");
    fill(&target.join("first"), FILES);
    fill(&target.join("second"), FILES);
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy(BUDGET, &[&target], &[], &cg)).expect("agent starts");
    // `rm -rf DIR` deletes through a directory fd, which the tracepoint tier walks up from.
    let mut free = Job::spawn_in("rm -rf first", &target, Some(&cg));
    assert!(
        free.wait(Duration::from_secs(60)).is_some(),
        "deleting in the target finishes"
    );
    assert_eq!(count_files(&target.join("first")), 0, "the target is free");

    let moved = s.path().join("moved");
    std::fs::rename(&target, &moved).expect("mv target moved");
    let removed = format!(
        "declared directory {:?} was removed, renamed or replaced",
        target.display().to_string()
    );
    assert!(
        wait_until(Duration::from_secs(10), || agent.saw(&removed)),
        "the agent reloads when the target moves:\n{}",
        agent.log()
    );
    let fresh = s.path().join("target");
    fill(&fresh.join("third"), FILES);
    let appeared = format!(
        "{:?} appeared on the way to a declared directory",
        fresh.display().to_string()
    );
    assert!(
        wait_until(Duration::from_secs(10), || agent.saw(&appeared)),
        "the agent reloads when the target is made again:\n{}",
        agent.log()
    );
    assert!(
        agent.saw("policy reloaded (") && agent.saw("directory identities resolved again"),
        "{}",
        agent.log()
    );

    let mut free = Job::spawn_in("rm -rf third", &fresh, Some(&cg));
    assert!(
        free.wait(Duration::from_secs(60)).is_some(),
        "deleting in the new target finishes"
    );
    assert_eq!(count_files(&fresh), 0, "the new target is free");
    assert!(agent.holds().is_empty(), "no hold in the new target");

    let _job = Job::spawn_in("rm -rf second", &moved, Some(&cg));
    assert_held_at_budget(
        &agent,
        &moved.join("second"),
        FILES,
        "deleting in the moved-away target",
    );
}

/// H6. A cgroup below `user.slice` (what a user manager delegates to its user) named like the
/// unit of an exemption does not take the exemption. The old resolver searched the whole cgroup
/// tree for the name and mapped the exemption to this cgroup: all 1000 files went, no hold.
/// The job runs as an unprivileged uid whose own rule holds it at the budget.
#[test]
fn a_user_cgroup_named_like_a_unit_does_not_take_its_exemption() {
    require_root();
    let _k = kernel_lock();
    let pid = std::process::id();
    let uid: u32 = 54321;
    let unit = format!("guardrail-test-exempt-{pid}.service");
    let slice = cgroup2_root().join("user.slice");
    let made_slice = !slice.exists();
    let user_cg = TestCgroup::at(&format!(
        "user.slice/guardrail-test-{pid}.slice/user@{uid}.service/{unit}"
    ));
    let s = open_scratch();
    let victim = s.path().join("victim");
    fill(&victim, FILES);
    chown(&victim, Some(uid), Some(uid)).expect("chown");
    let other = TestCgroup::new();
    let text = policy_with(
        100_000_000,
        &[],
        &[],
        &other,
        &format!(
            "[[deletion.rule]]\nname = \"uid-{uid}\"\nmatch = {{ user = \"{uid}\" }}\nbudget = {BUDGET}\n\
             [[deletion.exempt]]\nname = \"the-unit\"\nunits = [\"{unit}\"]\n"
        ),
    );
    let agent = Agent::start(&text).expect("agent starts");
    let _job = Job::spawn_in(
        &format!("{} rm -rf victim", as_uid(uid)),
        s.path(),
        Some(&user_cg),
    );
    assert_held_at_budget(
        &agent,
        &victim,
        FILES,
        "a job in a user cgroup named like the unit",
    );
    assert_eq!(
        agent.holds()[0]["rule"],
        format!("uid-{uid}"),
        "held under the uid's rule, not exempt: {:?}",
        agent.holds()
    );
    drop(_job);
    let parents = [
        user_cg.path.parent().map(Path::to_path_buf),
        user_cg
            .path
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf),
    ];
    drop(user_cg);
    for p in parents.into_iter().flatten() {
        let _ = std::fs::remove_dir(p);
    }
    if made_slice {
        let _ = std::fs::remove_dir(&slice);
    }
}
