//! A held job cannot resume itself (issue #14 item 4), tracepoint tier on the host. This tier
//! cannot refuse a deletion: a held job that is continued without approval deletes one file and
//! is stopped again. An attacker (user nobody) with a sibling process that loops `kill -CONT` on
//! the held job got every file deleted that way, one per resume. Now the kernel kills the job at
//! its `SELF_RESUME_LIMIT`-th deletion since the hold and the incident says so; the same for a
//! ptracer that swallows the stop signals. Every scenario runs
//! in a scratch directory under /var/tmp; every assertion counts files on disk.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use guardrail_integration::*;

const BUDGET: usize = 20;
const FILES: usize = 300;
/// `guardrail_common::SELF_RESUME_LIMIT`, as the README documents it.
const SELF_RESUME_LIMIT: usize = 8;

/// Runs, as user nobody in `cg`, `rm -rf VICTIM` as a job of its own (setsid) and beside it a
/// sibling in the attacker's own job that sends that job SIGCONT every 10 ms until it is gone.
/// The rm's exit status is written to `out/status` (a directory nobody owns). Returns the
/// attacker's job, ended.
fn attack(s: &Path, victim: &str, cg: &TestCgroup) -> Job {
    let out = s.join("out");
    std::fs::create_dir_all(&out).expect("mkdir out");
    chown_nobody(&out);
    let script = s.join("attack.sh");
    std::fs::write(
        &script,
        format!(
            "setsid rm -rf {victim} 2>/dev/null &\n\
             pid=$!\n\
             i=0\n\
             while [ $i -lt 6000 ] && kill -CONT \"$pid\" 2>/dev/null; do i=$((i + 1)); sleep 0.01; done\n\
             wait \"$pid\"\n\
             echo $? >out/status\n"
        ),
    )
    .expect("write attack.sh");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut job = Job::spawn_in(&format!("exec {AS_NOBODY} sh attack.sh"), s, Some(cg));
    assert!(
        job.wait(Duration::from_secs(120)).is_some(),
        "the attack ends (the held rm is gone)"
    );
    job
}

/// The rm's exit status as its shell saw it (137: SIGKILL).
fn rm_status(s: &Path) -> String {
    std::fs::read_to_string(s.join("out/status"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The incident that closed a hold because the job resumed itself, once the agent has it.
fn killed_incident(agent: &Agent) -> Option<serde_json::Value> {
    agent.incidents().into_iter().find(|i| {
        i["outcome"] == "killed"
            && i["reason"].as_str().is_some_and(|r| {
                r.ends_with(&format!(
                    "resumed itself {SELF_RESUME_LIMIT} times without approval; killed"
                ))
            })
    })
}

/// A scratch tree nobody may traverse, with `victim`: FILES files that are nobody's.
fn victim_scene() -> (Scene, PathBuf) {
    let scene = Scene::new().open_to_others();
    let victim = scene.path().join("victim");
    fill(&victim, FILES);
    chown_nobody(&victim);
    (scene, victim)
}

/// Starts the agent on `text`: this file's bounds are the tracepoint tier's.
fn start(scene: Scene, text: &str) -> Setup {
    let setup = scene.start(text);
    setup.agent.require_tier(Tier::Tracepoint);
    setup
}

/// A job held at its budget, resumed by a sibling's `kill -CONT` loop. Old code: each resume let
/// one more file go and the kernel stopped it again, so the loop deleted all 300 files and rm
/// exited 0. Now: at most BUDGET + 1 files at the hold (this tier's one file past the budget),
/// then exactly SELF_RESUME_LIMIT more at most before the kernel kills it; the hold is closed with
/// outcome `killed` and the reason says why.
#[test]
fn a_held_job_resumed_by_a_kill_cont_loop_is_killed_after_the_limit() {
    require_root();
    let _k = kernel_lock();
    let (scene, victim) = victim_scene();
    let text = policy(BUDGET as u64, &[], &[], &scene.cg);
    let Setup { agent, cg, s } = start(scene, &text);

    attack(s.path(), "victim", &cg);
    let left = settle(&victim, Duration::from_millis(700));
    let gone = FILES - left;
    eprintln!("budget {BUDGET}, kill -CONT loop: {gone} of {FILES} files gone");
    assert!(
        gone <= BUDGET + 1 + SELF_RESUME_LIMIT,
        "{gone} of {FILES} files gone: at most the budget {BUDGET}, one past it and {SELF_RESUME_LIMIT} self-resumes"
    );
    assert!(
        gone > BUDGET + 1,
        "{gone} files gone: the sibling's kill -CONT did resume the held job (else this test proves nothing)"
    );
    assert_eq!(rm_status(s.path()), "137", "rm was killed (SIGKILL)");
    assert!(
        wait_until(Duration::from_secs(10), || killed_incident(&agent)
            .is_some()),
        "no incident saying the job resumed itself and was killed: {:?}\n{}",
        agent.events(),
        agent.log()
    );
    let inc = killed_incident(&agent).expect("found");
    assert_eq!(inc["kind"], "budget_crossed", "{inc}");
    assert!(
        agent
            .events()
            .iter()
            .any(|e| e["incident"]["id"] == inc["id"] && e["incident"]["outcome"] == "held"),
        "the same incident was held first"
    );
    assert!(
        wait_until(Duration::from_secs(5), || agent.holds().is_empty()),
        "the hold is closed: {:?}",
        agent.holds()
    );
    assert_eq!(count_files(&victim), left, "nothing deleted after the kill");
    assert!(agent.stop().expect("agent stops").success());
}

/// The same loop on a job held for a foreign deletion in a data directory (the tracepoint tier
/// stops it after that one file). Old code: all 300 files went, one per resume. Now: at most
/// 1 + SELF_RESUME_LIMIT files, the job killed, the incident says both.
#[test]
fn a_foreign_job_in_a_data_directory_resumed_by_a_kill_cont_loop_is_killed_after_the_limit() {
    require_root();
    let _k = kernel_lock();
    let scene = Scene::new().open_to_others();
    let data = scene.path().join("data");
    let victim = data.join("sub");
    fill(&victim, FILES);
    chown_nobody(&data);
    let extra = format!(
        "[[deletion.data_dir]]\npath = {:?}\nowners = {{ users = [\"root\"] }}\n",
        data.display().to_string()
    );
    let text = policy_with(100_000, &[], &[], &scene.cg, &extra);
    let Setup { agent, cg, s } = start(scene, &text);

    attack(s.path(), "data/sub", &cg);
    let left = settle(&victim, Duration::from_millis(700));
    let gone = FILES - left;
    eprintln!("data directory, kill -CONT loop: {gone} of {FILES} files gone");
    assert!(
        gone <= 1 + SELF_RESUME_LIMIT,
        "{gone} of {FILES} files gone: at most the first one and {SELF_RESUME_LIMIT} self-resumes"
    );
    assert!(
        gone > 1,
        "{gone} files gone: the held job was never resumed"
    );
    assert_eq!(rm_status(s.path()), "137", "rm was killed (SIGKILL)");
    assert!(
        wait_until(Duration::from_secs(10), || killed_incident(&agent)
            .is_some()),
        "no incident saying the job resumed itself and was killed: {:?}\n{}",
        agent.events(),
        agent.log()
    );
    let inc = killed_incident(&agent).expect("found");
    assert_eq!(inc["kind"], "data_dir", "{inc}");
    assert!(
        inc["reason"].as_str().is_some_and(
            |r| r.starts_with("stopped after 1 file: a foreign deletion in data directory")
        ),
        "{inc}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || agent.holds().is_empty()),
        "the hold is closed: {:?}",
        agent.holds()
    );
    assert_eq!(count_files(&victim), left, "nothing deleted after the kill");
    assert!(agent.stop().expect("agent stops").success());
}

/// A job held at its budget whose own ptracer (nobody's `guardrail-testkit ptrace-nostop rm -rf`,
/// what a same-user debugger can do) swallows every SIGSTOP, the kernel's and the agent's. Old
/// code: the job never stopped, all 300 files went and rm exited 0. Now: killed at its
/// SELF_RESUME_LIMIT-th deletion since the hold; the incident says so.
#[test]
fn a_held_job_whose_ptracer_swallows_sigstop_is_killed_after_the_limit() {
    ptraced_rm_is_killed_after_the_limit(false);
}

/// The same with the agent too slow to read the crossing before the kernel's kill (it is
/// SIGSTOPped until the traced rm is gone; what a loaded host did in CI). Old code: the crossing,
/// read late, found the job blocked and was reported as a plain budget kill, never saying it
/// resumed itself.
#[test]
fn a_job_killed_for_resuming_before_the_agent_read_its_crossing_says_so() {
    ptraced_rm_is_killed_after_the_limit(true);
}

fn ptraced_rm_is_killed_after_the_limit(pause_agent: bool) {
    use std::os::unix::process::CommandExt;
    require_root();
    let _k = kernel_lock();
    let (scene, victim) = victim_scene();
    let text = policy(BUDGET as u64, &[], &[], &scene.cg);
    let Setup { agent, cg, s } = start(scene, &text);
    let kit = NobodyKit::new();
    let mut cmd = kit.cmd(&["ptrace-nostop", "rm", "-rf", "victim"]);
    cmd.current_dir(s.path())
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    guardrail_agent::cgroup::join_at_exec(&mut cmd, &cg.path).expect("cgroup path");
    let signal_agent = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, &agent.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill {sig} the agent");
    };
    if pause_agent {
        signal_agent("-STOP");
    }
    let mut child = cmd.spawn().expect("spawn the tracer");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if pause_agent {
        signal_agent("-CONT");
    }
    let left = settle(&victim, Duration::from_millis(700));
    let gone = FILES - left;
    eprintln!("budget {BUDGET}, ptracer swallowing SIGSTOP: {gone} of {FILES} files gone");
    assert!(
        gone <= BUDGET + 1 + SELF_RESUME_LIMIT,
        "{gone} of {FILES} files gone: at most the budget {BUDGET}, one past it and {SELF_RESUME_LIMIT} self-resumes"
    );
    assert!(
        gone > BUDGET + 1,
        "{gone} files gone: the ptracer did keep the held job running (else this test proves nothing)"
    );
    assert_eq!(
        status.and_then(|st| st.code()),
        Some(137),
        "the traced rm was killed (SIGKILL; the tracer exits 128 + 9)"
    );
    assert!(
        wait_until(Duration::from_secs(10), || killed_incident(&agent)
            .is_some()),
        "no incident saying the job resumed itself and was killed: {:?}\n{}",
        agent.events(),
        agent.log()
    );
    let inc = killed_incident(&agent).expect("found");
    assert_eq!(inc["kind"], "budget_crossed", "{inc}");
    assert_eq!(inc["action"], "block", "{inc}");
    assert!(
        wait_until(Duration::from_secs(5), || agent.holds().is_empty()),
        "the hold is closed: {:?}",
        agent.holds()
    );
    assert_eq!(count_files(&victim), left, "nothing deleted after the kill");
    assert!(agent.stop().expect("agent stops").success());
}
