//! The agent's life cycle on the host kernel (issue #18): a stop at any moment of start-up, a
//! broken policy at start, the emergency off switch with no agent, and login classes that need
//! positive evidence. Destructive steps run in scratch directories under /var/tmp; every job is
//! the test's own, in its own cgroup.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use guardrail_integration::{collectors::hostname, *};

const BUDGET: u64 = 100;

/// (id, type) of every BPF program and link loaded now, by bpftool.
fn bpf_objects() -> Vec<(String, u64, String)> {
    let mut out = Vec::new();
    for what in ["prog", "link"] {
        let o = Command::new("bpftool")
            .args([what, "show", "-j"])
            .output()
            .expect("bpftool (apt install bpftool)");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        for x in v.as_array().into_iter().flatten() {
            out.push((
                what.to_string(),
                x["id"].as_u64().unwrap_or(0),
                x["type"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

/// Tracing programs and links (the agent's kinds) that were not there in `before`.
fn new_tracing_objects(before: &[(String, u64, String)]) -> Vec<(String, u64, String)> {
    bpf_objects()
        .into_iter()
        .filter(|o| {
            matches!(
                o.2.as_str(),
                "tracepoint" | "raw_tracepoint" | "lsm" | "tracing" | "perf_event"
            )
        })
        .filter(|o| !before.contains(o))
        .collect()
}

/// Whether `dir` is gone or holds nothing.
fn gone_or_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut rd| rd.next().is_none())
}

/// A SIGINT at every 0.1 s of start-up, up to past ready: each time the agent exits 0 within
/// 2 s and leaves no pin and no program of its attached. Every other run gets a second SIGINT
/// during clean-up, which must not leave anything half-attached either.
/// Old code: the signals were blocked only once the agent served, so a SIGINT before that (the
/// default disposition) killed it with everything it had pinned left attached, or, once its
/// signalfd existed but before it was polled, the agent went on to serve as if nothing came.
#[test]
fn sigint_at_any_moment_of_startup_stops_cleanly() {
    let _k = kernel_lock();
    require_root();
    let cg = TestCgroup::new();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, policy_text(&target, &cg)).expect("policy");
    let before = bpf_objects();
    let mut past_ready = 0;
    // Every 0.1 s up to 3 s, then every second until past ready (start-up takes 10 s and more
    // on a busy 2-core host).
    let steps = (1..=30u64)
        .map(|i| i * 100)
        .chain((4..=60u64).map(|i| i * 1000));
    for at in steps {
        let pins = unique_pin_dir();
        let log = dir.path().join(format!("agent-{at}.log"));
        let mut child = Command::new(guardrail_bin())
            .arg("agent")
            .arg("--policy")
            .arg(&policy)
            .arg("--socket")
            .arg(dir.path().join("guardrail.sock"))
            .arg("--event-log")
            .arg(dir.path().join("events.jsonl"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--pin-dir")
            .arg(&pins)
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the agent");
        std::thread::sleep(Duration::from_millis(at));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
        let sent = Instant::now();
        if (at / 100) % 2 == 0 {
            std::thread::sleep(Duration::from_millis(20));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        }
        let mut status = None;
        while sent.elapsed() < Duration::from_secs(2) {
            if let Some(st) = child.try_wait().expect("wait") {
                status = Some(st);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "SIGINT {} ms into start-up: the agent still ran 2 s later:\n{out}",
                at
            );
        };
        assert_eq!(
            status.code(),
            Some(0),
            "SIGINT {} ms into start-up: exit {status}:\n{out}",
            at
        );
        assert!(
            gone_or_empty(&pins),
            "SIGINT {} ms into start-up left pins in {}:\n{out}",
            at,
            pins.display()
        );
        let mut left = Vec::new();
        assert!(
            wait_until(Duration::from_secs(3), || {
                left = new_tracing_objects(&before);
                left.is_empty()
            }),
            "SIGINT {} ms into start-up left BPF programs or links attached: {left:?}\n{out}",
            at
        );
        if out.contains("guardrail: ready") {
            past_ready += 1;
            if past_ready == 2 {
                break;
            }
        }
    }
    assert!(
        past_ready > 0,
        "the agent never got ready within 60 s: the loop tested only part of start-up"
    );
}

fn policy_text(target: &Path, cg: &TestCgroup) -> String {
    policy(BUDGET, &[target], &[], cg)
}

/// A policy with an error at start: the agent runs on the last policy that loaded (kept by an
/// earlier start in the test's state directory), says so on stderr, in the event log
/// (`policy_fallback`) and in `guardrail status`, and holds a job at that policy's budget.
/// Old code: it refused to start ("refusing to start without a valid policy"): nothing guarded.
#[test]
fn broken_policy_at_start_runs_on_the_last_good_one() {
    let _k = kernel_lock();
    require_root();
    let cg = TestCgroup::new();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let state = tempfile::tempdir().expect("state dir");
    let state_dir = state.path().join("guardrail");
    let state_arg = state_dir.display().to_string();
    let good = policy_text(&target, &cg);

    let first = Agent::start_with(&good, &["--state-dir", &state_arg]).expect("agent starts");
    let saved = state_dir.join("last-good.json");
    let meta = std::fs::metadata(&saved).expect("the last good policy is saved");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "last-good.json mode"
    );
    let dmeta = std::fs::metadata(&state_dir).expect("state dir");
    assert_eq!(dmeta.permissions().mode() & 0o777, 0o700, "state dir mode");
    let text = std::fs::read_to_string(&saved).expect("read last-good.json");
    assert!(
        text.contains(&first.policy.display().to_string()),
        "last-good.json names its source {}:\n{text}",
        first.policy.display()
    );
    assert!(first.stop().expect("stops").success());

    // A typo: budget is a number.
    let broken = good.replacen(&format!("budget = {BUDGET}\n"), "budget = \"lots\"\n", 1);
    assert_ne!(broken, good);
    let agent = Agent::start_with(&broken, &["--state-dir", &state_arg])
        .expect("the agent starts on a broken policy");
    assert!(
        agent.saw("guardrail: WARNING: the policy")
            && agent.saw("has errors")
            && agent.saw("the last good policy (saved "),
        "no loud warning on stderr:\n{}",
        agent.log()
    );
    let fallback: Vec<serde_json::Value> = agent
        .events()
        .into_iter()
        .filter(|e| e["agent"]["kind"] == "policy_fallback")
        .collect();
    assert_eq!(
        fallback.len(),
        1,
        "one policy_fallback event: {:#?}",
        agent.events()
    );
    let msg = fallback[0]["agent"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains(&format!("the policy {} has errors", agent.policy.display()))
            && msg.contains("the last good policy (saved ")
            && msg.contains("is in force instead"),
        "policy_fallback says what and why: {msg}"
    );
    let status = String::from_utf8_lossy(&agent.cli_ok(&["status"]).stdout).into_owned();
    assert!(
        status.contains("WARNING: not the configured policy: the policy")
            && status.contains("the last good policy (saved "),
        "status does not say the last good policy is in force:\n{status}"
    );

    // The last good policy's budget holds a runaway in the test's cgroup.
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent
        .wait_hold(Duration::from_secs(60))
        .expect("the job is held at the last good policy's budget");
    let left = settle(&victim, Duration::from_millis(700));
    let gone = 1000 - left as u64;
    assert!(
        (BUDGET..=BUDGET + 1).contains(&gone),
        "{gone} files gone at the hold, budget {BUDGET}"
    );
    agent.deny_and_wait(id, &mut job);
    assert!(agent.stop().expect("stops").success());
}

/// `guardrail off` with the agent dead (SIGKILL) and a job held by the pinned programs: the job
/// is continued and finishes, the pins are gone. As nobody it refuses.
/// Old code: no such command; the pinned programs kept the job stopped and kept enforcing.
#[test]
fn off_switch_continues_held_jobs_with_no_agent() {
    let _k = kernel_lock();
    require_root();
    let cg = TestCgroup::new();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let pins = unique_pin_dir();
    let pins_arg = pins.display().to_string();
    let before = bpf_objects();
    let agent = Agent::start_with(&policy_text(&target, &cg), &["--pin-dir", &pins_arg])
        .expect("agent starts");
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    agent.wait_hold(Duration::from_secs(60)).expect("held");
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "job stopped"
    );
    let held_left = settle(&victim, Duration::from_millis(500));
    let socket = agent.socket.clone();
    agent.crash();
    assert!(
        pins.join("links").is_dir(),
        "the programs stay pinned after a crash"
    );

    let nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(guardrail_bin())
        .args(["off", "--pin-dir", &pins_arg])
        .output()
        .expect("setpriv");
    assert_eq!(nobody.status.code(), Some(1), "off as nobody: {nobody:?}");
    assert!(
        String::from_utf8_lossy(&nobody.stderr).contains("guardrail off needs root"),
        "off as nobody says why: {nobody:?}"
    );
    assert!(pins.join("links").is_dir(), "nobody switched nothing off");
    assert_eq!(count_files(&victim), held_left, "still held");

    let out = Command::new(guardrail_bin())
        .arg("--socket")
        .arg(&socket)
        .args(["off", "--pin-dir", &pins_arg])
        .output()
        .expect("guardrail off");
    let o = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "guardrail off failed: {o}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        o.contains(&format!("guardrail off: continued held job {}", job.pgid())),
        "off does not report the job it continued:\n{o}"
    );
    assert!(
        o.contains(&format!("guardrail off: removed {}", pins.display())),
        "{o}"
    );
    let Some(st) = job.wait(Duration::from_secs(60)) else {
        let ps = Command::new("ps")
            .args(["-eo", "pid,pgid,stat,wchan:20,args"])
            .output()
            .expect("ps");
        panic!(
            "the continued job did not finish:\n{}\noff said:\n{o}\n{} files left, bpf: {:?}",
            String::from_utf8_lossy(&ps.stdout)
                .lines()
                .filter(|l| l.split_whitespace().nth(1) == Some(job.pgid().to_string().as_str()))
                .collect::<Vec<_>>()
                .join("\n"),
            count_files(&victim),
            new_tracing_objects(&before)
        );
    };
    assert!(st.success(), "rm -rf exits 0: {st}");
    assert_eq!(
        count_files(&victim),
        0,
        "the job deleted everything once continued"
    );
    assert!(!pins.exists(), "pins gone");
    assert!(
        wait_until(Duration::from_secs(3), || new_tracing_objects(&before)
            .is_empty()),
        "programs left attached after off: {:?}",
        new_tracing_objects(&before)
    );
}

const RAN: &str = "stand-in ran";

/// The stand-in `reboot` of host_shutdown.rs (a copy of /bin/echo) in a scratch tree nobody may
/// traverse, and an agent whose policy treats it as a shutdown command: remote → confirm, local →
/// allow, unknown → confirm. Returns the scene and the stand-in.
fn shutdown_setup() -> (Setup, PathBuf) {
    // nobody runs the stand-in and its own programs from here.
    let scene = Scene::new().open_to_others();
    let standin = standin(&scene.path().join("bin"), "reboot");
    let target = scene.dir("target");
    let extra = shutdown_toml(["confirm", "allow", "allow", "confirm"], &[&standin]);
    let text = policy_with(BUDGET, &[&target], &[], &scene.cg, &extra);
    (scene.start(&text), standin)
}

/// Runs `script` in a new audit session (it writes /proc/self/loginuid, as pam_loginuid would)
/// started by this test (no sshd, no getty, no display manager): returns (session, output).
fn in_new_session(script: &str, agent: &Agent) -> (u32, String) {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo 0 > /proc/self/loginuid && cat /proc/self/sessionid && echo && read _ && {script}"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("a new session");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("session id");
    let session: u32 = line.trim().parse().expect("a session id");
    assert_ne!(session, u32::MAX, "writing loginuid gave no session id");
    // Let the agent see (and classify) the session before it asks for anything.
    std::thread::sleep(Duration::from_millis(1500));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\n")
        .expect("go");
    let out = child.wait_with_output().expect("wait");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
    assert!(
        !agent.saw(&format!("session {session} is local")),
        "session {session} was classified local:\n{}",
        agent.log()
    );
    (
        session,
        format!("{rest}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

/// The refusal for a reboot from an unclassified session, and its incident as class unknown.
fn assert_refused_as_unknown(agent: &Agent, session: u32, out: &str, what: &str) {
    let h = hostname();
    assert!(
        !out.lines().any(|l| l.trim() == RAN),
        "{what}: the stand-in ran:\n{out}"
    );
    // Unclassified; or remote, where the test itself runs below an sshd (the walk up the
    // parent chain finds it): never local.
    let from = [
        format!("requested from an unclassified session (session {session})"),
        "requested from ssh".to_string(),
    ];
    let head = format!("guardrail: refused \"reboot\" on {h}, ");
    let tail = format!(
        ". To reboot {h}, run: guardrail confirm {h}, then repeat the command within 2 minutes."
    );
    assert!(
        out.lines().any(|l| l.contains(&head)
            && l.contains(&tail)
            && from.iter().any(|f| l.contains(f.as_str()))),
        "{what}: no refusal message in:\n{out}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || agent.events().iter().any(|e| {
            e["incident"]["kind"] == "shutdown"
                && e["incident"]["audit_session"] == session
                && e["incident"]["reason"].as_str().is_some_and(|r| {
                    r.contains("judged as class unknown") || r.contains("judged as class remote")
                })
        })),
        "{what}: no shutdown incident judged as class unknown: {:#?}",
        agent.events()
    );
}

/// A session made by a process that writes its own loginuid, started by neither sshd nor a
/// local login, is `unknown`: a reboot from it needs confirmation like a remote one.
/// Old code: it was `local` (started by a live process other than PID 1), so the reboot ran.
#[test]
fn evidence_less_session_needs_confirmation() {
    let _k = kernel_lock();
    let (
        Setup {
            agent,
            cg: _cg,
            s: _s,
        },
        standin,
    ) = shutdown_setup();
    let (session, out) = in_new_session(&format!("exec {} {RAN}", standin.display()), &agent);
    assert_refused_as_unknown(&agent, session, &out, "evidence-less session");
    assert!(agent.stop().expect("stops").success());
}

/// nobody's own program named `login` in a new session does not make the session local.
/// Old code: a process named `login` (command or executable name) was a local login: the reboot
/// ran.
#[test]
fn a_process_named_login_is_no_local_login() {
    let _k = kernel_lock();
    let (Setup { agent, cg: _cg, s }, standin) = shutdown_setup();
    // nobody's copy of sh named `login`, which runs the stand-in as nobody.
    let login = s.path().join("login");
    std::fs::copy("/bin/sh", &login).expect("copy sh");
    nix::unistd::chown(
        &login,
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .expect("chown");
    let (session, out) = in_new_session(
        &format!(
            "exec setpriv --reuid=65534 --regid=65534 --clear-groups {} -c '{} {RAN}; sleep 1'",
            login.display(),
            standin.display()
        ),
        &agent,
    );
    assert_refused_as_unknown(&agent, session, &out, "a process named login");
    assert!(agent.stop().expect("stops").success());
}

/// The userspace tier cannot adopt what a BPF agent pinned: it switches it off (held jobs
/// continued) and says so, instead of leaving programs enforcing unseen beside its watcher.
/// Old code: the userspace tier ignored --pin-dir; the crashed agent's programs stayed attached.
#[test]
fn userspace_tier_switches_off_bpf_pins_it_cannot_adopt() {
    let _k = kernel_lock();
    require_root();
    let cg = TestCgroup::new();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let pins = unique_pin_dir();
    let pins_arg = pins.display().to_string();
    let before = bpf_objects();
    let text = policy_text(&target, &cg);
    Agent::start_with(&text, &["--pin-dir", &pins_arg])
        .expect("BPF agent starts")
        .crash();
    assert!(pins.join("links").is_dir(), "pinned after the crash");
    let agent = Agent::start_with(&text, &["--pin-dir", &pins_arg, "--tier", "userspace"])
        .expect("userspace agent starts");
    let needle = format!(
        "guardrail: WARNING: programs of a previous BPF agent were pinned in {}; the userspace tier cannot adopt them, so they were switched off: detached ",
        pins.display()
    );
    assert!(
        agent.saw(&needle) && !agent.saw("switched off: detached 0 programs"),
        "no warning {needle:?} with the programs it detached:\n{}",
        agent.log()
    );
    assert!(!pins.exists(), "the pins are gone");
    assert!(
        wait_until(Duration::from_secs(3), || new_tracing_objects(&before)
            .is_empty()),
        "BPF programs left attached beside the userspace tier: {:?}",
        new_tracing_objects(&before)
    );
    assert!(
        agent
            .events()
            .iter()
            .any(|e| e["agent"]["kind"] == "tier_degraded"
                && e["agent"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("switched off"))),
        "no tier_degraded event: {:#?}",
        agent.events()
    );
    assert!(agent.stop().expect("stops").success());
}

/// A pin directory that is not on bpffs (as inside a unit's private mount namespace where the
/// host has none): the agent pins nothing, says so, and still enforces while it runs.
/// Old code: pinning failed and the agent refused to start (or, with /sys/fs/bpf unmounted, it
/// mounted bpffs in its private namespace, where the pins died with it).
#[test]
fn pins_go_only_to_a_visible_bpffs() {
    let _k = kernel_lock();
    require_root();
    let cg = TestCgroup::new();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    let pins = s.path().join("pins");
    let pins_arg = pins.display().to_string();
    let agent = Agent::start_with(&policy_text(&target, &cg), &["--pin-dir", &pins_arg])
        .expect("agent starts without pins");
    let needle = format!(
        "guardrail: WARNING: {} is not on a bpffs visible to the host",
        s.path().display()
    );
    assert!(
        agent.saw(&needle),
        "no warning {needle:?}:\n{}",
        agent.log()
    );
    assert!(!pins.exists(), "nothing pinned outside bpffs");
    let victim = s.path().join("victim");
    fill(&victim, 1000);
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent.wait_hold(Duration::from_secs(60)).expect("held");
    agent.deny_and_wait(id, &mut job);
    let left = count_files(&victim) as u64;
    assert!(
        (1000 - BUDGET - 1..=1000 - BUDGET).contains(&left),
        "{left} files left, budget {BUDGET}"
    );
    assert!(agent.stop().expect("stops").success());
}
