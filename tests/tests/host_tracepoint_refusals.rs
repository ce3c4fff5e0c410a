//! Tracepoint tier (the host kernel refuses BPF LSM): a deletion in a data directory the job is not
//! named for cannot be refused in this tier, so the kernel stops the job right after that first
//! deletion and it becomes an ordinary hold (or, under a `block` rule, the job is killed). The
//! foreign job runs as user nobody in the test cgroup; the data directory is owned by root only.
//! Every scenario runs in a scratch directory under /var/tmp; every assertion counts files on disk.
use std::{path::PathBuf, time::Duration};

use guardrail_integration::*;

const FILES: usize = 1000;

/// The data directory of the scene (owned by root jobs only).
fn data(st: &Setup) -> PathBuf {
    st.s.path().join("data")
}

/// `data/sub`, FILES files nobody may delete as far as file permissions go.
fn victim(st: &Setup) -> PathBuf {
    data(st).join("sub")
}

/// `rule_extra`: more keys for the test cgroup's rule (e.g. `action = "block"`).
fn setup(rule_extra: &str) -> Setup {
    // nobody must reach the data directory through the scratch directory.
    let scene = Scene::new().open_to_others();
    let target = scene.dir("target");
    let data = scene.path().join("data");
    fill(&data.join("sub"), FILES);
    chown_nobody(&data);
    let extra = format!(
        "{rule_extra}\n[[deletion.data_dir]]\npath = {:?}\nowners = {{ users = [\"root\"] }}\n",
        data.display().to_string()
    );
    // The budget is far above what the job deletes: only the data directory can stop it.
    let text = policy_with(100_000, &[&target], &[], &scene.cg, &extra);
    let setup = scene.start(&text);
    setup.agent.require_tier(Tier::Tracepoint);
    setup
}

/// The foreign job: `rm -rf data/sub` as user nobody, in the test cgroup.
fn foreign_rm(st: &Setup) -> Job {
    Job::spawn_in(
        &format!("{AS_NOBODY} rm -rf data/sub"),
        st.s.path(),
        Some(&st.cg),
    )
}

fn data_dir_incidents(agent: &Agent) -> Vec<serde_json::Value> {
    let mut incs = agent.incidents();
    incs.retain(|i| i["kind"] == "data_dir");
    incs
}

/// Old code: the tracepoint hook ignored the refusal, so all 1000 files went and the event log
/// said outcome `refused` for deletions that happened; nothing was held. Now: stopped after the
/// first file (999 left), listed by `guardrail holds`, one incident `held` with a reason naming
/// the data directory, and `deny` ends the job with nothing more deleted.
#[test]
fn foreign_rm_rf_in_data_dir_is_held_after_one_file_then_denied() {
    let _k = kernel_lock();
    let st = setup("");
    let mut job = foreign_rm(&st);
    let id = st
        .agent
        .wait_hold(Duration::from_secs(60))
        .expect("the foreign job is held");
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "every process of the job is stopped"
    );
    assert_eq!(
        settle(&victim(&st), Duration::from_millis(700)),
        FILES - 1,
        "stopped after exactly one file"
    );
    let holds = st.agent.holds();
    assert_eq!(holds.len(), 1, "one open hold: {holds:?}");
    assert_eq!(holds[0]["id"].as_u64(), Some(id));
    let incs = data_dir_incidents(&st.agent);
    assert_eq!(incs.len(), 1, "one data_dir incident: {incs:?}");
    assert_eq!(incs[0]["id"].as_u64(), Some(id));
    assert_eq!(incs[0]["outcome"], "held", "{incs:?}");
    let reason = incs[0]["reason"].as_str().unwrap_or_default();
    let want = format!(
        "stopped after 1 file: a foreign deletion in data directory {}",
        data(&st).display()
    );
    assert!(reason.starts_with(&want), "reason {reason:?}");
    assert!(reason.contains("the file is gone"), "reason {reason:?}");
    assert!(
        !st.agent
            .events()
            .iter()
            .any(|e| e["incident"]["outcome"] == "refused"),
        "nothing is called refused in this tier: {:?}",
        st.agent.events()
    );

    st.agent.cli_ok(&["deny", &id.to_string()]);
    assert!(
        job.wait(Duration::from_secs(10)).is_some(),
        "the denied job ends"
    );
    assert_eq!(count_files(&victim(&st)), FILES - 1, "nothing more deleted");
    assert!(st.agent.holds().is_empty(), "no hold left");
}

/// `approve --more N` lets the job go on, and its next foreign deletion holds it again (one more
/// file, a new incident); a plain `approve` lets it delete in the data directory for the rest
/// of the job. Old code: nothing was ever held, all 1000 files went at once.
#[test]
fn approve_continues_once_and_for_job_lets_it_finish() {
    let _k = kernel_lock();
    let st = setup("");
    let mut job = foreign_rm(&st);
    let first = st
        .agent
        .wait_hold(Duration::from_secs(60))
        .expect("the foreign job is held");
    assert_eq!(settle(&victim(&st), Duration::from_millis(700)), FILES - 1);
    st.agent
        .cli_ok(&["approve", &first.to_string(), "--more", "1"]);
    let second = wait_until(Duration::from_secs(30), || {
        st.agent
            .holds()
            .first()
            .and_then(|h| h["id"].as_u64())
            .is_some_and(|id| id != first)
    });
    assert!(second, "held again at its next foreign deletion");
    let second = st.agent.wait_hold(Duration::from_secs(1)).expect("held");
    assert_eq!(
        settle(&victim(&st), Duration::from_millis(700)),
        FILES - 2,
        "exactly one more file after approve --more"
    );
    let outcomes: Vec<String> = data_dir_incidents(&st.agent)
        .iter()
        .map(|e| format!("{}:{}", e["id"], e["outcome"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        outcomes,
        [
            format!("{first}:held"),
            format!("{first}:approved"),
            format!("{second}:held")
        ],
        "incidents"
    );
    st.agent.cli_ok(&["approve", &second.to_string()]);
    assert!(
        job.wait(Duration::from_secs(60)).is_some(),
        "the job approved for the rest of it finishes"
    );
    assert_eq!(count_files(&victim(&st)), 0, "it deleted the rest");
    assert!(st.agent.holds().is_empty(), "no hold left");
}

/// Under a `block` rule the job is killed right after its first foreign deletion. Old code: all
/// 1000 files gone, outcome `refused`, the job ran to its end.
#[test]
fn block_rule_kills_the_foreign_job_after_one_file() {
    let _k = kernel_lock();
    let st = setup("action = \"block\"");
    let mut job = foreign_rm(&st);
    assert!(
        job.wait(Duration::from_secs(30)).is_some(),
        "the foreign job ends"
    );
    assert_eq!(
        settle(&victim(&st), Duration::from_millis(500)),
        FILES - 1,
        "killed after exactly one file"
    );
    let ok = wait_until(Duration::from_secs(10), || {
        !data_dir_incidents(&st.agent).is_empty()
    });
    assert!(ok, "an incident is recorded");
    let incs = data_dir_incidents(&st.agent);
    assert_eq!(incs.len(), 1, "one data_dir incident: {incs:?}");
    assert_eq!(incs[0]["outcome"], "killed", "{incs:?}");
    let reason = incs[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("killed after 1 file: a foreign deletion in data directory"),
        "reason {reason:?}"
    );
    assert!(st.agent.holds().is_empty(), "nothing held");
}

/// A held foreign job resumed without approval (`kill -CONT`) is stopped again at its next
/// deletion in the data directory: one more file (the tier cannot refuse it), the same hold, no
/// new incident. Old code: never held, all 1000 files gone.
#[test]
fn resumed_without_approval_is_stopped_again_after_one_more_file() {
    let _k = kernel_lock();
    let st = setup("");
    let mut job = foreign_rm(&st);
    let id = st
        .agent
        .wait_hold(Duration::from_secs(60))
        .expect("the foreign job is held");
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "every process of the job is stopped"
    );
    assert_eq!(settle(&victim(&st), Duration::from_millis(700)), FILES - 1);
    // Only our own job, by its process group id.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(job.pgid() as i32),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("SIGCONT to the job");
    assert!(
        wait_until(Duration::from_secs(10), || {
            count_files(&victim(&st)) < FILES - 1 && job.stopped()
        }),
        "the resumed job is stopped again"
    );
    assert_eq!(
        settle(&victim(&st), Duration::from_millis(700)),
        FILES - 2,
        "exactly one more file"
    );
    let holds = st.agent.holds();
    assert_eq!(holds.len(), 1, "still one hold: {holds:?}");
    assert_eq!(holds[0]["id"].as_u64(), Some(id), "the same hold");
    assert_eq!(data_dir_incidents(&st.agent).len(), 1, "no new incident");
    st.agent.cli_ok(&["deny", &id.to_string()]);
    assert!(job.wait(Duration::from_secs(10)).is_some(), "denied, ended");
    assert_eq!(count_files(&victim(&st)), FILES - 2, "nothing more deleted");
}
