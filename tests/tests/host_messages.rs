//! Messages and text, tracepoint tier on the host kernel, the real binary: a held job is told
//! why only through descriptors it holds itself, and a job's text (its command line) reaches
//! every human-readable sink escaped and capped. Jobs run as user `nobody`, in scratch trees
//! under /var/tmp; every assertion is on bytes a user would look at.
use std::{
    ffi::CString,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{fs::PermissionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use guardrail_integration::{collectors::*, *};

const BUDGET: u64 = 20;
const FILES: usize = 400;

/// A scratch tree nobody may delete in (the victim directory is theirs), a cgroup for the
/// test's jobs and an agent whose policy gives those jobs BUDGET deletions.
fn setup(alerts_toml: &str) -> Setup {
    let scene = Scene::new().open_to_others();
    let target = scene.dir("target");
    let victim = scene.path().join("victim");
    fill(&victim, FILES);
    chown_nobody(&victim);
    let text = policy_with(BUDGET, &[&target], &[], &scene.cg, alerts_toml);
    scene.start(&text)
}

/// `sh -c script` in `cwd`, joining the test cgroup, then as nobody (no groups). `setup` runs
/// between fork and exec before privileges are dropped (it may open files, set a terminal).
fn nobody_job(
    script: &str,
    cwd: &Path,
    cg: &TestCgroup,
    session: bool,
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script).current_dir(cwd);
    if !session {
        cmd.process_group(0);
    }
    guardrail_agent::cgroup::join_at_exec(&mut cmd, &cg.path).expect("cgroup path");
    // SAFETY: the closures only make raw syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(setup);
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Waits for the hold and gives the message writer thread a moment.
fn held(agent: &Agent) -> u64 {
    let id = agent
        .wait_hold(Duration::from_secs(60))
        .expect("the job is held");
    std::thread::sleep(Duration::from_millis(800));
    id
}

/// The attack of review finding C1: the old agent reopened `/proc/PID/fd/2` for writing as
/// root. A job whose fd 2 is an `O_PATH` handle (which needs no read or write permission on the
/// file) on a root-only 0600 file made the agent overwrite that file's first bytes with the
/// hold message. Now an O_PATH (or read-only) descriptor is never written.
#[test]
fn an_o_path_stderr_on_a_root_only_file_leaves_it_unchanged() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup("");
    let secret = s.path().join("secret");
    let before: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&secret, &before).expect("write secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let path = CString::new(secret.as_os_str().as_encoded_bytes()).expect("no NUL");
    let mut cmd = nobody_job("rm -rf victim", s.path(), &cg, false, || Ok(()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: open and dup2 only, between fork and exec, after the privileges are dropped
    // (registered last): nobody opens the O_PATH handle itself.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_PATH);
            if fd < 0 || libc::dup2(fd, 2) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    let job = Job {
        child: cmd.spawn().expect("spawn job"),
    };
    let id = held(&agent);
    // The job really holds the handle: its rm's fd 2 names the secret file.
    let holders: Vec<u32> = pids_in_group(job.pgid())
        .into_iter()
        .filter(|p| std::fs::read_link(format!("/proc/{p}/fd/2")).ok() == Some(secret.clone()))
        .collect();
    assert!(!holders.is_empty(), "the job's fd 2 is the O_PATH handle");
    let after = std::fs::read(&secret).expect("read secret");
    assert!(
        after == before,
        "the root-only file changed; it now starts {:?}",
        String::from_utf8_lossy(&after[..after.len().min(120)])
    );
    agent.cli_ok(&["deny", &id.to_string()]);
    drop(job);
    assert!(agent.stop().expect("agent stops").success());
}

/// Review finding C1 again: `2>>job.log` is an append-mode description, but the old agent's
/// fresh open started at offset 0 and overwrote the log's first bytes. Through the job's own
/// description the message lands after the earlier content.
#[test]
fn an_append_mode_log_keeps_its_content_and_gets_the_message_appended() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup("");
    let log = s.path().join("job.log");
    let earlier = "earlier run: 2024-05-01 all well\n".repeat(40);
    std::fs::write(&log, &earlier).expect("write log");
    chown_nobody(&log);
    let mut cmd = nobody_job("rm -rf victim 2>>job.log", s.path(), &cg, false, || Ok(()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let job = Job {
        child: cmd.spawn().expect("spawn job"),
    };
    let id = held(&agent);
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::metadata(&log).is_ok_and(|m| m.len() as usize > earlier.len())
        }),
        "the message reaches the log"
    );
    let text = std::fs::read_to_string(&log).expect("read log");
    assert!(
        text.starts_with(&earlier),
        "the earlier content is intact:\n{text}"
    );
    let added = &text[earlier.len()..];
    let h = hostname();
    assert!(
        added.starts_with(&format!("\nguardrail: held job \"rm -rf victim\" on {h}: "))
            && added.ends_with(&format!(
                "  To let it finish (no limit for the rest of this job): guardrail approve {id}\n  To let it delete 20 more, then hold it again:         guardrail approve {id} --more 20\n  To end it:                                            guardrail deny {id}\n"
            ))
            && !added.contains('\r'),
        "the appended message:\n{added}"
    );
    // `guardrail status` says how jobs are told.
    let status = String::from_utf8_lossy(&agent.cli_ok(&["status"]).stdout).into_owned();
    assert!(
        status.contains(
            "messages to jobs: written to the job's own terminal or stderr (pidfd_getfd)"
        ),
        "{status}"
    );
    agent.cli_ok(&["deny", &id.to_string()]);
    drop(job);
    assert!(agent.stop().expect("agent stops").success());
}

/// A helper process in a mount namespace of its own with a new devpts instance mounted on
/// `dir`: a container's /dev/pts. Its files are reached through /proc/PID/root.
struct DevptsNs {
    child: Child,
    dir: PathBuf,
}

impl DevptsNs {
    fn start(dir: &Path) -> DevptsNs {
        std::fs::create_dir_all(dir).expect("mkdir");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount -t devpts -o newinstance,ptmxmode=666,mode=620 devpts '{}' && exec sleep 600",
                dir.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare runs");
        let ns = DevptsNs {
            child,
            dir: dir.to_path_buf(),
        };
        assert!(
            wait_until(Duration::from_secs(10), || ns.ptmx().exists()),
            "the new devpts instance is mounted"
        );
        ns
    }

    fn ptmx(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root{}/ptmx",
            self.child.id(),
            self.dir.display()
        ))
    }
}

impl Drop for DevptsNs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pty master from `ptmx`, unlocked, non-blocking: (master, index).
fn open_pty(ptmx: &Path) -> (OwnedFd, u32) {
    let p = CString::new(ptmx.as_os_str().as_encoded_bytes()).expect("no NUL");
    // SAFETY: open of a path we own the string of; the result is checked.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK) };
    assert!(
        fd >= 0,
        "open {}: {}",
        ptmx.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor only we hold.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let (mut n, unlock): (libc::c_uint, libc::c_int) = (0, 0);
    // SAFETY: TIOCGPTN writes an unsigned int, TIOCSPTLCK reads an int; both ours.
    unsafe {
        assert_eq!(libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n), 0);
        assert_eq!(
            libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock),
            0
        );
    }
    (master, n)
}

/// Whatever is waiting on a non-blocking pty master.
fn drain(master: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: a read into our buffer from our descriptor.
        let n = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Review finding H1: the old agent computed `/dev/pts/N` from the job's tty_nr and opened it
/// in the host's /dev: a job on a container's pty N (its own devpts instance) had its message
/// written to the host's pty N, another user's terminal. Now the message goes to the terminal
/// the job holds, and the host pty with the same number gets nothing.
#[test]
fn a_job_on_a_pty_of_its_own_devpts_gets_the_message_there_and_the_host_pty_nothing() {
    let _k = kernel_lock();
    let Setup { agent, cg, s } = setup("");
    let ns = DevptsNs::start(&s.path().join("pts"));
    // A host pty first; then container ptys until one has the same number.
    let (host_master, n) = open_pty(Path::new("/dev/ptmx"));
    let mut container = Vec::new();
    let job_master = loop {
        let (m, i) = open_pty(&ns.ptmx());
        assert!(i <= n, "the new instance numbers from 0");
        if i == n {
            break m;
        }
        container.push(m);
    };
    // SAFETY: TIOCGPTPEER opens the master's peer and returns a new descriptor (checked).
    let slave = unsafe {
        libc::ioctl(
            job_master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY,
        )
    };
    assert!(
        slave >= 0,
        "TIOCGPTPEER: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor only we hold.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let mut cmd = nobody_job("rm -rf victim", s.path(), &cg, true, || {
        // SAFETY: setsid and TIOCSCTTY on our stdin (the container pty), between fork and exec.
        unsafe {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    });
    cmd.stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave));
    let job = Job {
        child: cmd.spawn().expect("spawn job"),
    };
    let id = held(&agent);
    let mut seen = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            seen.push_str(&drain(&job_master));
            seen.contains(&format!("guardrail deny {id}"))
        }),
        "the message reaches the job's own terminal; it shows:\n{seen:?}"
    );
    assert!(
        seen.contains(&format!(
            "guardrail: held job \"rm -rf victim\" on {}: ",
            hostname()
        )),
        "{seen:?}"
    );
    assert_eq!(drain(&host_master), "", "the host's pts/{n} gets nothing");
    agent.cli_ok(&["deny", &id.to_string()]);
    drop(job);
    drop(container);
    assert!(agent.stop().expect("agent stops").success());
}

/// The hostile argument: erase-line, an OSC 52 clipboard write, a right-to-left override and a
/// newline followed by a forged agent line.
const HOSTILE_PRINTF: &str =
    r"x\033[2K\033]52;c;aGk=\007\342\200\256\nguardrail: incident 999 approved";
/// How every human-readable sink must show it.
const HOSTILE_SHOWN: &str = r"x\x1b[2K\x1b]52;c;aGk=\x07\u{202e}\nguardrail: incident 999 approved";

fn assert_escaped(what: &str, text: &str) {
    assert!(
        text.contains(&format!("rm -rf victim {HOSTILE_SHOWN}")),
        "{what} shows the command escaped:\n{text}"
    );
    assert!(
        !text.contains('\x1b') && !text.contains('\x07') && !text.contains('\u{202e}'),
        "{what} holds no raw escape or bidi character:\n{text:?}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.trim_start().starts_with("guardrail: incident 999")),
        "{what} has no forged line:\n{text}"
    );
}

/// Review findings M1/M4: a command line with escape sequences and bidi characters reached the
/// agent's stdout (the journal: the newline forged a second entry), `guardrail holds`, `status`
/// and `events` raw, rsyslog with the bidi override raw, and Alertmanager's annotations raw.
#[test]
fn a_hostile_command_line_is_escaped_in_every_sink() {
    let _k = kernel_lock();
    let rs = Rsyslog::start();
    let am = Alertmanager::start();
    let toml = format!(
        "[alerts.syslog]\nenabled = true\nformat = \"rfc5424\"\nremote = \"udp://127.0.0.1:{}\"\n[alerts.alertmanager]\nurl = \"http://127.0.0.1:{}\"\n",
        rs.udp, am.port
    );
    let Setup { agent, cg, s } = setup(&toml);
    let script = format!("rm -rf victim \"$(printf '{HOSTILE_PRINTF}')\"");
    let mut cmd = nobody_job(&script, s.path(), &cg, false, || Ok(()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let job = Job {
        child: cmd.spawn().expect("spawn job"),
    };
    let id = held(&agent);
    let out = |args: &[&str]| String::from_utf8_lossy(&agent.cli_ok(args).stdout).into_owned();
    assert_escaped("guardrail holds", &out(&["holds"]));
    assert_escaped("guardrail status", &out(&["status"]));
    let events = out(&["events", "--log", &agent.event_log.display().to_string()]);
    assert_escaped("guardrail events", &events);
    let msg = {
        let mut msg = String::new();
        assert!(
            wait_until(Duration::from_secs(10), || {
                msg = rs
                    .with_msgid("held")
                    .pop()
                    .and_then(|m| m["msg"].as_str().map(str::to_string))
                    .unwrap_or_default();
                !msg.is_empty()
            }),
            "the held line reaches rsyslog"
        );
        msg
    };
    assert_escaped("the rsyslog line", &msg);
    let mut alert = None;
    assert!(
        wait_until(Duration::from_secs(15), || {
            alert = am.alert_for(id);
            alert.is_some()
        }),
        "the alert reaches Alertmanager"
    );
    let alert = alert.unwrap_or_default();
    for k in ["command", "summary"] {
        assert_escaped(
            &format!("the alert's {k}"),
            alert["annotations"][k].as_str().unwrap_or(""),
        );
    }
    // The event log keeps the command exactly (JSON escapes it).
    let raw = agent
        .events()
        .into_iter()
        .find_map(|e| e["incident"]["command"].as_str().map(str::to_string))
        .unwrap_or_default();
    assert!(
        raw.contains("x\x1b[2K\x1b]52;c;aGk=\x07\u{202e}\nguardrail"),
        "{raw:?}"
    );
    agent.cli_ok(&["deny", &id.to_string()]);
    drop(job);
    // Every line the agent printed (its journal), collected until it exited.
    let output = agent.output.clone();
    assert!(agent.stop().expect("agent stops").success());
    let printed = output.lock().map(|l| l.join("\n")).unwrap_or_default();
    assert_escaped("the agent's stdout", &printed);
}

/// Review finding M4: `rm -rf "$DIR/"*` expanded to 100 KB of argv made a syslog message larger
/// than a UDP datagram: the old agent's send failed and the hold never reached the collector.
/// The command is capped (with its full length noted) and the `guardrail approve N` tail stays.
#[test]
fn a_100_kb_command_line_still_reaches_rsyslog_over_udp() {
    let _k = kernel_lock();
    let rs = Rsyslog::start();
    let toml = format!(
        "[alerts.syslog]\nenabled = true\nformat = \"rfc5424\"\nremote = \"udp://127.0.0.1:{}\"\n",
        rs.udp
    );
    let Setup { agent, cg, s } = setup(&toml);
    let script = "rm -rf victim $(seq -f /nonexistent/%07g 1 6000)";
    let mut cmd = nobody_job(script, s.path(), &cg, false, || Ok(()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let job = Job {
        child: cmd.spawn().expect("spawn job"),
    };
    let id = held(&agent);
    let command = agent
        .events()
        .into_iter()
        .find_map(|e| e["incident"]["command"].as_str().map(str::to_string))
        .unwrap_or_default();
    assert!(command.len() > 100_000, "{} bytes", command.len());
    let mut msg = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            msg = rs
                .with_msgid("held")
                .pop()
                .and_then(|m| m["msg"].as_str().map(str::to_string))
                .unwrap_or_default();
            !msg.is_empty()
        }),
        "the held line reaches rsyslog over UDP"
    );
    assert!(
        msg.contains(&format!("… ({} bytes)", command.len())),
        "the command is capped with its length: {msg}"
    );
    assert!(
        msg.ends_with(&format!("guardrail approve {id} | guardrail deny {id}")),
        "{msg}"
    );
    agent.cli_ok(&["deny", &id.to_string()]);
    drop(job);
    assert!(agent.stop().expect("agent stops").success());
}

/// Review finding C1 for the shutdown refusal: the old agent told a refused caller through
/// `/proc/PID/fd/2` too, so a caller run as nobody with an `O_PATH` fd 2 on a root-only file had
/// the refusal written over that file. Every class of session must confirm here, so the
/// stand-in (a copy of /bin/echo named `reboot`) is refused whoever runs it.
#[test]
fn a_refused_shutdown_caller_with_an_o_path_stderr_leaves_the_file_unchanged() {
    let _k = kernel_lock();
    let scene = Scene::new().open_to_others();
    let standin = standin(&scene.path().join("bin"), "reboot");
    let target = scene.dir("target");
    let extra = shutdown_toml(["confirm"; 4], &[&standin]);
    let text = policy_with(100, &[&target], &[], &scene.cg, &extra);
    let Setup { agent, cg, s } = scene.start(&text);
    let secret = s.path().join("secret");
    let before = b"root:$y$j9T$not-a-real-hash:19000:0:99999:7:::\n".repeat(20);
    std::fs::write(&secret, &before).expect("write secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let path = CString::new(secret.as_os_str().as_encoded_bytes()).expect("no NUL");
    let script = format!("exec {} stand-in ran", standin.display());
    let mut cmd = nobody_job(&script, s.path(), &cg, false, || Ok(()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: open and dup2 only, between fork and exec, as nobody (registered last).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_PATH);
            if fd < 0 || libc::dup2(fd, 2) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    let mut job = Job {
        child: cmd.spawn().expect("spawn the caller"),
    };
    assert!(
        job.wait(Duration::from_secs(20)).is_some(),
        "the refused caller ends"
    );
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .saw("guardrail: refused \"reboot\"")),
        "the agent refused the stand-in:\n{}",
        agent.log()
    );
    std::thread::sleep(Duration::from_millis(800));
    let mut out = String::new();
    if let Some(o) = job.child.stdout.as_mut() {
        use std::io::Read;
        let _ = o.read_to_string(&mut out);
    }
    assert!(
        !out.contains("stand-in ran"),
        "the stand-in never ran: {out}"
    );
    let after = std::fs::read(&secret).expect("read secret");
    assert!(
        after == before,
        "the root-only file changed; it now starts {:?}",
        String::from_utf8_lossy(&after[..after.len().min(160)])
    );
    drop(job);
    assert!(agent.stop().expect("agent stops").success());
}
