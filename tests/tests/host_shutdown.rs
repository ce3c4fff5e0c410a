//! Remote-shutdown guard, tracepoint tier on the host kernel, with a real sshd (Debian's
//! openssh-server, UsePAM yes: pam_loginuid gives each login its audit session id) started by
//! the test on 127.0.0.1. No real shutdown command ever runs: the policy's `[shutdown] commands`
//! names a stand-in, a copy of /bin/echo called `reboot` in a scratch directory, which prints
//! "stand-in ran" when it is allowed to run.
use std::{
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use guardrail_integration::{collectors::hostname, *};

const RAN: &str = "stand-in ran";

/// The refusal message, up to the session id (which the test cannot know in advance) and after.
fn message_parts(from: &str) -> (String, String) {
    let h = hostname();
    (
        format!("guardrail: refused \"reboot\" on {h}, requested from {from} (session "),
        format!(
            "). To reboot {h}, run: guardrail confirm {h}, then repeat the command within 2 minutes."
        ),
    )
}

/// Asserts that `text` holds the exact refusal message for a request from `from`.
fn assert_refusal(text: &str, from: &str, what: &str) {
    let (head, tail) = message_parts(from);
    let Some(start) = text.find(&head) else {
        panic!("{what}: no refusal message starting {head:?} in:\n{text}");
    };
    let rest = &text[start + head.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    assert!(
        !digits.is_empty(),
        "{what}: no session id in the message:\n{text}"
    );
    assert!(
        rest[digits.len()..].starts_with(&tail),
        "{what}: the message does not end {tail:?}:\n{text}"
    );
}

/// How many times the stand-in printed its line (bash's "Killed <command line>" report also
/// contains the words, so whole lines are counted).
fn ran(text: &str) -> usize {
    text.lines().filter(|l| l.trim() == RAN).count()
}

/// sshd on 127.0.0.1:port with its own config, host key and authorized key in a temp dir.
struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Sshd {
    fn start() -> Sshd {
        let pam = std::fs::read_to_string("/etc/pam.d/sshd")
            .expect("/etc/pam.d/sshd: install openssh-server (cargo xtask setup)");
        assert!(
            pam.lines()
                .any(|l| !l.trim_start().starts_with('#') && l.contains("pam_loginuid")),
            "/etc/pam.d/sshd does not run pam_loginuid: logins would get no audit session id"
        );
        let dir = tempfile::Builder::new()
            .prefix("guardrail-sshd-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        for (key, kind) in [("host_key", "ed25519"), ("id", "ed25519")] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-N", "", "-f"])
                .arg(d.join(key))
                .status()
                .expect("ssh-keygen");
            assert!(st.success(), "ssh-keygen failed");
        }
        std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).expect("authorized_keys");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM yes\n\
             StrictModes no\nPrintMotd no\nPrintLastLog no\nLogLevel ERROR\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).expect("sshd_config");
        // Privilege separation directory, created by the package's service unit normally.
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        // Its log (-e: to stderr) goes to a file: the readiness probe below makes it complain.
        let log = std::fs::File::create(d.join("sshd.log")).expect("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting /usr/sbin/sshd");
        assert!(
            wait_until(Duration::from_secs(20), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "sshd does not listen on 127.0.0.1:{port}"
        );
        Sshd { child, dir, port }
    }

    fn ssh(&self, tty: bool) -> Command {
        // A caller left stopped would hang the test: fail it instead.
        let mut c = Command::new("timeout");
        c.args(["120", "ssh"])
            .args([
                "-q",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
            ])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
            .arg("-i")
            .arg(self.dir.path().join("id"))
            .arg("-p")
            .arg(self.port.to_string());
        if tty {
            c.arg("-tt");
        } else {
            c.arg("-T");
        }
        c.arg("root@127.0.0.1").stdin(Stdio::null());
        c
    }

    /// Runs `cmd` (a shell command line on the "remote" side) over ssh.
    fn run(&self, tty: bool, cmd: &str) -> Output {
        self.ssh(tty).arg(cmd).output().expect("running ssh")
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // Only the sshd this test started, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stand-in `reboot` of the scene (a copy of /bin/echo), beside a stand-in `shutdown` whose
/// `-c` cancels rather than asks.
fn standin_in(s: &tempfile::TempDir) -> PathBuf {
    s.path().join("bin/reboot")
}

/// An agent whose policy guards shutdowns (remote → confirm) and treats the stand-ins as
/// shutdown commands; its deletion rules are the usual cgroup-scoped test rules, so it never holds
/// anything else on the machine.
fn setup() -> Setup {
    setup_with(&[])
}

fn setup_with(agent_args: &[&str]) -> Setup {
    let scene = Scene::new();
    let bin = scene.path().join("bin");
    let reboot = standin(&bin, "reboot");
    let shutdown = standin(&bin, "shutdown");
    let target = scene.dir("target");
    let extra = shutdown_toml(
        ["confirm", "allow", "allow", "confirm"],
        &[&reboot, &shutdown],
    );
    let text = policy_with(100, &[&target], &[], &scene.cg, &extra);
    scene.start_with(&text, agent_args)
}

fn gr(agent: &Agent) -> String {
    format!(
        "{} --socket {}",
        guardrail_bin().display(),
        agent.socket.display()
    )
}

#[test]
fn remote_shutdown_is_refused_until_confirmed_by_host_name() {
    let _k = kernel_lock();
    let Setup { agent, cg: _cg, s } = setup();
    let standin = standin_in(&s);
    let sshd = Sshd::start();
    let reboot = format!("{} {RAN}", standin.display());
    let from = "ssh 127.0.0.1";

    // Interactive ssh as root, with a terminal: the message lands on the terminal.
    let out = sshd.run(true, &format!("{reboot}; echo rc=$?"));
    let (o, e) = output_text(&out);
    assert_refusal(&o, from, "ssh -tt");
    assert!(ran(&o) == 0, "the stand-in ran over ssh:\n{o}");
    assert!(
        o.contains("rc=137"),
        "the stand-in was not killed (rc):\n{o}\n{e}"
    );

    // Under sudo: SSH_CONNECTION is stripped, the audit session is not.
    let out = sshd.run(true, &format!("sudo {reboot}; echo rc=$?"));
    let (o, e) = output_text(&out);
    assert_ne!(out.status.code(), Some(124), "sudo over ssh hung:\n{o}");
    assert_refusal(&o, from, "sudo over ssh");
    assert!(ran(&o) == 0, "the stand-in ran under sudo:\n{o}\n{e}");
    assert!(!o.contains("rc=0"), "sudo reported success:\n{o}");

    // sudo without a terminal (Ansible's become): sudo waits for its command itself.
    let out = sshd.run(false, &format!("sudo {reboot}"));
    let (o, e) = output_text(&out);
    assert_ne!(out.status.code(), Some(124), "sudo without a tty hung");
    assert_refusal(&e, from, "sudo over ssh without a tty");
    assert!(
        ran(&o) == 0,
        "the stand-in ran under sudo without a tty:\n{o}"
    );
    assert!(!out.status.success(), "sudo without a tty exited 0");

    // `ssh host cmd` without a terminal (Ansible, scripts): the message goes to stderr.
    let out = sshd.run(false, &reboot);
    let (o, e) = output_text(&out);
    assert_refusal(&e, from, "ssh host cmd");
    assert!(ran(&o) == 0, "the stand-in ran without a tty:\n{o}");
    assert!(!out.status.success(), "ssh host cmd exited 0");

    // A tmux server started over ssh keeps the session's audit id after the ssh connection is
    // gone; a window opened later (here by the test, from outside) is still a remote request.
    let sock = s.path().join("tmux.sock");
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .arg("-S")
            .arg(&sock)
            .args(args)
            .output()
            .expect("tmux")
    };
    let out = sshd.run(
        false,
        &format!(
            "tmux -S {} new-session -d -s g -x 250 -y 20 'sleep 600'",
            sock.display()
        ),
    );
    assert!(
        out.status.success(),
        "tmux over ssh: {:?}",
        output_text(&out)
    );
    let pane = s.path().join("pane.done");
    let out = tmux(&[
        "new-window",
        "-t",
        "g",
        &format!("{reboot}; echo rc=$? > {}; sleep 600", pane.display()),
    ]);
    assert!(
        out.status.success(),
        "tmux new-window: {:?}",
        output_text(&out)
    );
    assert!(
        wait_until(Duration::from_secs(30), || pane.exists()),
        "the command in the tmux window never finished"
    );
    let rc = std::fs::read_to_string(&pane).unwrap_or_default();
    let screen = String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-J", "-t", "g:1"]).stdout)
        .into_owned();
    // While the tmux server keeps the ssh login's session alive, `guardrail status` lists it.
    let status = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    let _ = tmux(&["kill-server"]);
    assert!(
        status
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .any(|w| w.len() == 4
                && w[0].parse::<u32>().is_ok()
                && w[1..] == ["remote", "ssh", "127.0.0.1"]),
        "status does not list the ssh session as remote:\n{status}"
    );
    assert_refusal(&screen, from, "tmux started over ssh");
    assert!(ran(&screen) == 0, "the stand-in ran in tmux:\n{screen}");
    assert_eq!(rc.trim(), "rc=137", "the stand-in in tmux was not killed");

    // Confirmation: a wrong name is refused with a clear message and exit 1.
    let out = sshd.run(false, &format!("{} confirm wrong-name", gr(&agent)));
    let (_, e) = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "confirm wrong-name: {e}");
    assert!(
        e.contains(&format!(
            "guardrail: \"wrong-name\" is not this host's name (this is {}); nothing confirmed",
            hostname()
        )),
        "confirm wrong-name said:\n{e}"
    );

    // The host's name grants this session one pass: the stand-in runs once, then is refused
    // again.
    let out = sshd.run(
        false,
        &format!(
            "{gr} confirm {h} && {reboot} && {reboot}; echo rc=$?",
            gr = gr(&agent),
            h = hostname()
        ),
    );
    let (o, e) = output_text(&out);
    assert!(
        o.contains("confirmed: the next shutdown request from this session"),
        "confirm {}: {o}\n{e}",
        hostname()
    );
    assert_eq!(
        ran(&o),
        1,
        "after one confirmation the stand-in runs exactly once:\n{o}\n{e}"
    );
    assert!(o.contains("rc=137"), "the second run was not killed:\n{o}");
    assert_refusal(&e, from, "second run after one confirmation");

    // Every refusal and confirmation is an incident, with the session's origin.
    let killed = |agent: &Agent| {
        agent
            .events()
            .iter()
            .filter(|v| v["incident"]["outcome"] == "killed")
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || killed(&agent) >= 6),
        "six refusals are recorded: {:#?}",
        agent.events()
    );
    let incidents: Vec<serde_json::Value> = agent
        .events()
        .into_iter()
        .filter_map(|v| v.get("incident").cloned())
        .collect();
    let count = |kind: &str, outcome: &str| {
        incidents
            .iter()
            .filter(|i| i["kind"] == kind && i["outcome"] == outcome)
            .count()
    };
    assert!(count("shutdown", "killed") >= 6, "refusals: {incidents:#?}");
    assert_eq!(count("shutdown_confirmation", "granted"), 1);
    assert_eq!(count("shutdown", "confirmed"), 1);
    assert!(
        incidents
            .iter()
            .filter(|i| i["outcome"] == "killed")
            .all(|i| i["reason"].as_str().unwrap_or("").contains(from)),
        "a refusal incident lacks the origin: {incidents:#?}"
    );
    drop(sshd);
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "agent exits 0, got {status}");
}

/// No login session at all (a service): allowed, with an alert. (A session without evidence of
/// a local login is `unknown` and needs confirmation: host_lifecycle.rs.)
#[test]
fn no_session_runs_the_stand_in_freely() {
    let _k = kernel_lock();
    let Setup { agent, cg: _cg, s } = setup();
    let standin = standin_in(&s);

    // No login session at all (a service): allowed, with an alert.
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo 4294967295 > /proc/self/loginuid; exec {} {RAN}",
            standin.display()
        ))
        .output()
        .expect("no session");
    assert!(
        out.status.success() && ran(&String::from_utf8_lossy(&out.stdout)) == 1,
        "the stand-in did not run without a session: {:?}",
        output_text(&out)
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            agent
                .events()
                .iter()
                .filter(|v| {
                    v["incident"]["kind"] == "shutdown" && v["incident"]["outcome"] == "allowed"
                })
                .count()
                >= 1
        }),
        "allowed requests are not alerted: {:#?}",
        agent.events()
    );
    let status = agent.stop().expect("agent stops");
    assert!(status.success(), "agent exits 0, got {status}");
}

/// Processes running `exe` that are stopped (state T).
fn stopped_running(exe: &std::path::Path) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
        .collect()
}

/// The shutdown programs are pinned with the deletion hooks: with no agent running (crashed, or
/// between the two halves of a restart) remote shutdowns are still refused. A caller the kernel
/// stopped just before the crash is answered by the next agent (message, then killed); once the
/// crashed agent's promise to answer has run out, the kernel kills the program itself.
#[test]
fn pinned_guard_refuses_while_no_agent_runs() {
    let _k = kernel_lock();
    let pins = unique_pin_dir();
    let pins_arg = pins.display().to_string();
    let Setup { agent, cg: _cg, s } = setup_with(&["--pin-dir", &pins_arg]);
    let standin = standin_in(&s);
    // The agent's policy, to start the next agents on the same pins.
    let policy = std::fs::read_to_string(&agent.policy).expect("the agent's policy");
    let sshd = Sshd::start();
    let reboot = format!("{} {RAN}", standin.display());
    let from = "ssh 127.0.0.1";
    agent.crash();

    // Right after the crash the agent's promise to answer still holds: the kernel stops the
    // stand-in before its first instruction and waits.
    let waiting = sshd
        .ssh(false)
        .arg(format!("{reboot}; echo rc=$?"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");
    assert!(
        wait_until(Duration::from_secs(30), || !stopped_running(&standin)
            .is_empty()),
        "the stand-in was not stopped by the pinned programs"
    );
    let second = Agent::start_with(&policy, &["--pin-dir", &pins_arg]).expect("second agent");
    let out = waiting.wait_with_output().expect("ssh output");
    let (o, e) = output_text(&out);
    assert_refusal(&e, from, "a caller stopped while no agent ran");
    assert_eq!(ran(&o), 0, "the stand-in ran:\n{o}");
    assert!(
        o.contains("rc=137"),
        "the stand-in was not killed:\n{o}\n{e}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || second
            .saw("answered 1 shutdown callers stopped while no agent ran")),
        "the second agent did not report the caller it answered:\n{}",
        second.log()
    );
    second.crash();

    // Once the promise has run out (5 s), the kernel kills the program at once: refused, with
    // no message (no agent writes one) and without hanging the caller.
    std::thread::sleep(Duration::from_secs(6));
    let out = sshd.run(false, &format!("{reboot}; echo rc=$?"));
    let (o, e) = output_text(&out);
    assert_ne!(out.status.code(), Some(124), "the caller hung:\n{o}\n{e}");
    assert_eq!(ran(&o), 0, "the stand-in ran with no agent:\n{o}");
    assert!(
        o.contains("rc=137"),
        "the stand-in was not killed:\n{o}\n{e}"
    );

    // A normal stop of the next agent detaches everything.
    let third = Agent::start_with(&policy, &["--pin-dir", &pins_arg]).expect("third agent");
    assert!(third.stop().expect("stops").success());
    assert!(!pins.exists(), "the pins are gone: {}", pins.display());
}

/// `shutdown -c` cancels a scheduled shutdown: never refused, even from a remote session, while
/// `shutdown -r now` from the same session is.
#[test]
fn shutdown_cancel_is_never_refused() {
    let _k = kernel_lock();
    let Setup { agent, cg: _cg, s } = setup();
    let standin = standin_in(&s);
    let shutdown = standin.with_file_name("shutdown");
    let sshd = Sshd::start();

    let out = sshd.run(
        false,
        &format!("{} -c {RAN}; echo rc=$?", shutdown.display()),
    );
    let (o, e) = output_text(&out);
    assert!(
        o.lines().any(|l| l.trim() == format!("-c {RAN}")) && o.contains("rc=0"),
        "shutdown -c did not run from a remote session:\n{o}\n{e}"
    );
    assert!(
        !e.contains("guardrail: refused"),
        "shutdown -c was refused:\n{e}"
    );

    let out = sshd.run(
        false,
        &format!("{} -r now {RAN}; echo rc=$?", shutdown.display()),
    );
    let (o, e) = output_text(&out);
    let h = hostname();
    assert!(
        e.contains(&format!(
            "guardrail: refused \"shutdown\" on {h}, requested from ssh 127.0.0.1 (session "
        )) && e.contains(&format!("To shut down {h}, run: guardrail confirm {h}")),
        "shutdown -r now was not refused with the message:\n{o}\n{e}"
    );
    assert!(
        o.contains("rc=137"),
        "shutdown -r now was not killed:\n{o}\n{e}"
    );
    drop(sshd);
    assert!(agent.stop().expect("stops").success());
}
