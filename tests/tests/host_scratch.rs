//! Files root writes on a user's behalf, and the metrics endpoint, against an unprivileged
//! attacker (user nobody, through `guardrail-testkit` under setpriv): pre-planted symlinks at
//! every name root could predict must change nothing, and a slow client must not hold the
//! endpoint. Planted paths are removed afterwards (only those this test made, owned by nobody).
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use guardrail_integration::*;

/// Numbers (pids) planted ahead of the next pid: the processes started between the planting and
/// the command under attack (on a busy build host, hundreds) must not outrun them.
const AHEAD: u32 = 2000;
const SECRET: &[u8] = b"root:$6$do-not-touch:19000:0:99999:7:::\n";

fn last_pid() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .expect("ns_last_pid")
        .trim()
        .parse()
        .expect("a pid")
}

/// A root-only directory holding a root-owned file with [`SECRET`] in it: what the planted
/// symlinks point at (nobody cannot read or write it, only name it).
fn victim() -> (tempfile::TempDir, PathBuf) {
    let d = scratch();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let f = d.path().join("shadow");
    std::fs::write(&f, SECRET).expect("write victim");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (d, f)
}

/// Plants, as nobody, a symlink to `target` at every template (`{n}` = each of the next
/// [`AHEAD`] pids); returns the pid it started from and the number of links made.
fn plant(kit: &NobodyKit, target: &Path, templates: &[String]) -> (u32, usize) {
    let from = last_pid() + 1;
    let mut args = vec![
        "plant-links".to_string(),
        target.display().to_string(),
        from.to_string(),
        AHEAD.to_string(),
    ];
    args.extend(templates.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kit.cmd(&args).output().expect("setpriv runs");
    assert!(
        out.status.success(),
        "planting as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let made: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a count");
    assert_eq!(
        made,
        AHEAD as usize * templates.len(),
        "nobody planted every link"
    );
    (from, made)
}

/// The `i`th pid from `from` on, wrapping at pid_max like the kernel (and plant-links).
fn nth_pid(from: u32, i: u32) -> u32 {
    let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4_194_304);
    (from - 1 + i) % pid_max + 1
}

/// The planted links that are still symlinks to `target`.
fn links_intact(target: &Path, from: u32, templates: &[String]) -> usize {
    let mut n_ok = 0;
    for i in 0..AHEAD {
        let n = nth_pid(from, i);
        for t in templates {
            let p = PathBuf::from(t.replace("{n}", &n.to_string()));
            if std::fs::read_link(&p).is_ok_and(|l| l == target) {
                n_ok += 1;
            }
        }
    }
    n_ok
}

/// Removes what nobody planted: each `(prefix, from)` names directories `<prefix>{n}` (only
/// those owned by nobody, so nothing of anyone else's).
struct Planted(Vec<String>, u32);

impl Drop for Planted {
    fn drop(&mut self) {
        for i in 0..AHEAD {
            let n = nth_pid(self.1, i);
            for prefix in &self.0 {
                let p = PathBuf::from(format!("{prefix}{n}"));
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.uid() == 65534) {
                    let _ = if p.is_symlink() {
                        std::fs::remove_file(&p)
                    } else {
                        std::fs::remove_dir_all(&p)
                    };
                }
            }
        }
    }
}

/// `guardrail selftest` as root after nobody planted its old scratch names
/// (`/var/tmp/guardrail-selftest-<pid>/victim/f0000`, `/var/tmp/guardrail-selftest-sd-<pid>/
/// {reboot,policy.toml}`) as symlinks to a root-only file, for the next 2000 pids. The old code
/// reused the planted directory (`create_dir_all`) and wrote through the symlink (`fs::write`):
/// the root-only file was truncated to "x"; it then removed the planted trees.
#[test]
fn selftest_writes_nothing_through_names_a_user_planted() {
    require_root();
    let _k = kernel_lock();
    let (_vd, target) = victim();
    let templates = vec![
        "/var/tmp/guardrail-selftest-{n}/victim/f0000".to_string(),
        "/var/tmp/guardrail-selftest-sd-{n}/reboot".to_string(),
        "/var/tmp/guardrail-selftest-sd-{n}/policy.toml".to_string(),
    ];
    let kit = NobodyKit::new();
    let (from, made) = plant(&kit, &target, &templates);
    let _cleanup = Planted(
        vec![
            "/var/tmp/guardrail-selftest-".into(),
            "/var/tmp/guardrail-selftest-sd-".into(),
        ],
        from,
    );
    let out = Command::new(guardrail_bin())
        .arg("selftest")
        .output()
        .expect("selftest runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let now = last_pid();
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&target).expect("the victim is still there")),
        String::from_utf8_lossy(SECRET),
        "the root-only file is unchanged (planted pids {from}.., last pid now {now})\n{text}"
    );
    assert_eq!(
        links_intact(&target, from, &templates),
        made,
        "every planted link is still there, untouched"
    );
    assert!(
        out.status.success(),
        "selftest still passes:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for check in ["runaway deletion", "remote shutdown"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("[ ok ] {check}: "))),
            "{check} passes:\n{text}"
        );
    }
    let left: Vec<_> = std::fs::read_dir("/run/guardrail")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("guardrail-selftest"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "selftest removed its scratch: {left:?}");
}

/// The userspace tier's measurement (`selftest --tier userspace`) after nobody planted
/// `/var/tmp/guardrail-blast-<pid>/victim/f00000` for the next 2000 pids. The old code filled
/// the planted directory through the symlink (truncating the root-only file) and removed it.
#[test]
fn userspace_selftest_writes_nothing_through_names_a_user_planted() {
    require_root();
    let _k = kernel_lock();
    let (_vd, target) = victim();
    let templates = vec!["/var/tmp/guardrail-blast-{n}/victim/f00000".to_string()];
    let kit = NobodyKit::new();
    let (from, made) = plant(&kit, &target, &templates);
    let _cleanup = Planted(vec!["/var/tmp/guardrail-blast-".into()], from);
    let out = Command::new(guardrail_bin())
        .args(["selftest", "--tier", "userspace"])
        .output()
        .expect("selftest runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&target).expect("the victim is still there")),
        String::from_utf8_lossy(SECRET),
        "the root-only file is unchanged\n{text}"
    );
    assert_eq!(links_intact(&target, from, &templates), made);
    assert!(
        out.status.success()
            && text
                .lines()
                .any(|l| l.starts_with("[ ok ] runaway deletion: ")),
        "the measurement still passes:\n{text}"
    );
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free TCP port")
        .port()
}

/// An agent whose policy writes the node_exporter textfile `textfile` and serves metrics on
/// `port` (nothing else: syslog off).
fn metrics_agent(textfile: Option<&Path>, port: u16) -> (Agent, TestCgroup, tempfile::TempDir) {
    let s = scratch();
    let cg = TestCgroup::new();
    let mut extra = format!(
        "[alerts.syslog]\nenabled = false\n[alerts.prometheus]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    if let Some(t) = textfile {
        extra.push_str(&format!("textfile = \"{}\"\n", t.display()));
    }
    let text = policy_with(100, &[s.path()], &[], &cg, &extra);
    (Agent::start(&text).expect("agent starts"), cg, s)
}

/// One GET; the status code and body, or None when no answer came within 5 s.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n")?.1.to_string()))
}

/// The textfile's directory belongs to the prometheus user (here nobody), who planted
/// `<textfile>.<pid>.tmp` symlinks to a root-only file for the next 2000 pids before the agent
/// started. The old writer opened exactly that name with File::create as root: it followed the
/// link, wrote the metrics into the root-only file, then renamed the link over the textfile.
#[test]
fn textfile_temp_names_a_user_planted_are_never_opened() {
    require_root();
    let _k = kernel_lock();
    let (_vd, target) = victim();
    let dir = scratch();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).expect("chown to nobody");
    let textfile = dir.path().join("guardrail.prom");
    let templates = vec![format!("{}.{{n}}.tmp", textfile.display())];
    let kit = NobodyKit::new();
    let (from, made) = plant(&kit, &target, &templates);
    let (agent, _cg, _s) = metrics_agent(Some(&textfile), free_tcp_port());
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(
            &textfile
        )
        .is_ok_and(|t| t.contains("\nguardrail_up 1\n"))),
        "the agent writes its textfile:\n{}",
        agent.log()
    );
    let planted_pid = agent.pid() >= from && agent.pid() < from + AHEAD;
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&target).expect("the victim is still there")),
        String::from_utf8_lossy(SECRET),
        "the root-only file is unchanged (agent pid {} among the planted: {planted_pid})",
        agent.pid()
    );
    let m = std::fs::symlink_metadata(&textfile).expect("stat textfile");
    assert!(m.file_type().is_file(), "the textfile is a regular file");
    assert_eq!(
        m.mode() & 0o777,
        0o644,
        "node_exporter (another user) can read it"
    );
    assert_eq!(links_intact(&target, from, &templates), made);
    assert!(agent.stop().expect("stops").success());
    // Nothing but the textfile and the planted links: no temporary file left behind.
    let entries = std::fs::read_dir(dir.path()).expect("read dir").count();
    assert_eq!(
        entries,
        made + 1,
        "only the textfile besides the planted links"
    );
}

/// A client (nobody) that sends its request one byte every 200 ms. The old endpoint served one
/// client at a time with a 2 s timeout per read, so the dribbler held it for everyone as long as
/// it kept sending: the scrape waited. Now the scrape is answered at once, and the dribbler is
/// cut off at the whole-request deadline (2 s) although it never stopped sending.
#[test]
fn metrics_answer_within_a_second_while_another_client_dribbles() {
    require_root();
    let _k = kernel_lock();
    let port = free_tcp_port();
    let (agent, _cg, _s) = metrics_agent(None, port);
    let addr = format!("127.0.0.1:{port}");
    let kit = NobodyKit::new();
    let slow = kit
        .cmd(&["dribble", &addr, "6"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the dribbler starts");
    std::thread::sleep(Duration::from_millis(600));
    let start = Instant::now();
    let (code, body) = get(port, "/metrics").expect("the endpoint answers");
    let took = start.elapsed();
    assert_eq!(code, 200);
    assert!(body.contains("\nguardrail_up 1\n"), "{body}");
    assert!(
        took < Duration::from_secs(1),
        "answered in {took:?} while another client dribbles"
    );
    let out = slow.wait_with_output().expect("the dribbler ends");
    let said = String::from_utf8_lossy(&out.stdout);
    let ms: u64 = said
        .trim()
        .strip_prefix("closed after ")
        .unwrap_or_else(|| panic!("the server hangs up on the dribbler: {said}"))
        .parse()
        .expect("milliseconds");
    assert!(
        (1900..4000).contains(&ms),
        "cut off at the 2 s request deadline, not per read: {ms} ms"
    );
    // A request as long as the cap (8 KiB) without its end is refused, not read on. (Exactly
    // the cap: the server reads it all, so closing sends no reset before the answer is read.)
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let head = "GET /metrics HTTP/1.1\r\nX: ";
    let _ = s.write_all(format!("{head}{}", "a".repeat(8192 - head.len())).as_bytes());
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    assert!(
        String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 431 "),
        "an oversized request is refused: {:?}",
        String::from_utf8_lossy(&resp[..resp.len().min(80)])
    );
    assert!(agent.stop().expect("stops").success());
}
