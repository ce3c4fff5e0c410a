//! Alert latency: from the deletion that crosses the budget to the agent's alert arriving at a
//! local rsyslog (UDP on loopback, RFC 5424) and at a local Prometheus Alertmanager, all seen by
//! this process on one clock: the crossing as the inotify event of the (budget+1)th deletion,
//! read by a thread blocked on it; the arrival as the line in rsyslog's output file and as the
//! alert in Alertmanager's API, both polled every millisecond.
use std::{
    net::{TcpStream, UdpSocket},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::sys::{self, Agent};

const BUDGET: u64 = 10;
const FILES: usize = 200;

pub struct LatencyResult {
    pub runs: usize,
    /// Crossing to the line at rsyslog, one per run.
    pub syslog: Vec<Duration>,
    /// Crossing to the alert listed by Alertmanager's API, one per run.
    pub alertmanager: Vec<Duration>,
}

struct Rsyslog(Child);

impl Drop for Rsyslog {
    fn drop(&mut self) {
        sys::stop_child(&mut self.0);
    }
}

fn free_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// rsyslogd in the foreground with its own configuration, receiving on loopback, writing each
/// message's MSGID on a line of its own.
fn rsyslog(dir: &Path) -> Result<(Rsyslog, u16)> {
    let (udp, tcp) = (free_port()?, free_port()?);
    let d = dir.display();
    let conf = format!(
        "global(workDirectory=\"{d}\")\nmodule(load=\"imudp\")\n\
         input(type=\"imudp\" address=\"127.0.0.1\" port=\"{udp}\")\nmodule(load=\"imtcp\")\n\
         input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{tcp}\")\n\
         template(name=\"id\" type=\"string\" string=\"%msgid%\\n\")\n\
         action(type=\"omfile\" file=\"{d}/messages\" template=\"id\")\n"
    );
    std::fs::write(dir.join("rsyslog.conf"), conf)?;
    let child = Command::new("rsyslogd")
        .arg("-n")
        .arg("-f")
        .arg(dir.join("rsyslog.conf"))
        .arg("-i")
        .arg(dir.join("rsyslogd.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rsyslogd (apt-get install rsyslog, or cargo xtask setup)")?;
    let r = Rsyslog(child);
    if !sys::wait_until(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", tcp)).is_ok()
    }) {
        bail!("rsyslogd did not listen on 127.0.0.1:{tcp} within 10 s");
    }
    Ok((r, udp))
}

struct AlertManager(Child, u16);

impl Drop for AlertManager {
    fn drop(&mut self) {
        sys::stop_child(&mut self.0);
    }
}

/// prometheus-alertmanager on a loopback port with its own configuration and storage, clustering
/// off, its one receiver doing nothing (what is measured is the alert's arrival).
fn alertmanager(dir: &Path) -> Result<AlertManager> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.join("alertmanager.yml");
    std::fs::write(
        &conf,
        "route:\n  receiver: nobody\n  group_by: [host, rule]\nreceivers:\n  - name: nobody\n",
    )?;
    let child = Command::new("prometheus-alertmanager")
        .arg(format!("--config.file={}", conf.display()))
        .arg(format!("--storage.path={}", dir.join("am-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting prometheus-alertmanager (cargo xtask setup installs it)")?;
    let am = AlertManager(child, port);
    if !sys::wait_until(Duration::from_secs(30), || {
        http_get(port, "/-/ready").is_some_and(|(code, _)| code == 200)
    }) {
        bail!("alertmanager was not ready on 127.0.0.1:{port} within 30 s");
    }
    Ok(am)
}

/// A plain HTTP/1.1 GET on loopback: (status, body, de-chunked). The tests' copy
/// (tests/src/collectors.rs) is out of reach: xtask builds before the eBPF toolchain exists and
/// cannot depend on the tests crate, and one GET is not worth a crate of its own.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, mut body) = text.split_once("\r\n\r\n")?;
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some((code, body.to_string()));
    }
    let mut out = String::new();
    while let Some((len, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    Some((code, out))
}

/// The incidents of the held-job alerts Alertmanager lists (one alert per incident; a resolved
/// one may leave the list, so arrivals are told by new incident labels, not by a count).
fn held_alerts(port: u16) -> std::collections::BTreeSet<String> {
    http_get(port, "/api/v2/alerts")
        .and_then(|(_, body)| serde_json::from_str::<Vec<serde_json::Value>>(&body).ok())
        .map(|v| {
            v.iter()
                .filter(|a| a["labels"]["alertname"] == "GuardrailJobHeld")
                .filter_map(|a| a["labels"]["incident"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn held_lines(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == "held")
        .count()
}

/// When the crossing was seen (set by the watcher thread), the thread, its inotify fd.
type Watch = (
    Arc<Mutex<Option<Instant>>>,
    std::thread::JoinHandle<()>,
    i32,
);

/// A thread blocked on an inotify fd watching `dir`, which records when it read the
/// (BUDGET+1)th deletion.
fn watch_crossing(dir: &Path) -> Result<Watch> {
    // SAFETY: inotify_init1 takes flags only.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if fd < 0 {
        bail!("inotify_init1: {}", std::io::Error::last_os_error());
    }
    let p = std::ffi::CString::new(dir.to_string_lossy().into_owned())?;
    // SAFETY: a valid inotify fd and a NUL-terminated path.
    if unsafe { libc::inotify_add_watch(fd, p.as_ptr(), libc::IN_DELETE | libc::IN_DELETE_SELF) }
        < 0
    {
        let e = std::io::Error::last_os_error();
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(fd) };
        bail!("inotify_add_watch: {e}");
    }
    let at = Arc::new(Mutex::new(None));
    let a = at.clone();
    let t = std::thread::spawn(move || {
        let mut seen = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reading into a buffer of the given length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            let now = Instant::now();
            if n <= 0 {
                return;
            }
            let (n, mut off) = (n as usize, 0usize);
            while off + 16 <= n {
                let mask =
                    u32::from_ne_bytes([buf[off + 4], buf[off + 5], buf[off + 6], buf[off + 7]]);
                let len = u32::from_ne_bytes([
                    buf[off + 12],
                    buf[off + 13],
                    buf[off + 14],
                    buf[off + 15],
                ]) as usize;
                if mask & libc::IN_DELETE != 0 {
                    seen += 1;
                    if seen == BUDGET + 1 {
                        *a.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
                    }
                }
                // The watch is gone (the bench removed the directory): done.
                if mask & libc::IN_IGNORED != 0 {
                    return;
                }
                off += 16 + len;
            }
        }
    });
    Ok((at, t, fd))
}

pub fn run(bin: &Path, scratch: &Path, rm: &Path, runs: usize) -> Result<LatencyResult> {
    let dir = scratch.join("latency");
    std::fs::create_dir_all(&dir)?;
    let (_rsyslog, port) = rsyslog(&dir)?;
    let am = alertmanager(&dir)?;
    let target = dir.join("target");
    std::fs::create_dir_all(&target)?;
    let pol = super::deletion::scoped_policy(
        &target,
        rm,
        BUDGET,
        &format!(
            "[alerts.syslog]\nenabled = true\nremote = \"udp://127.0.0.1:{port}\"\n\
             [alerts.alertmanager]\nurl = \"http://127.0.0.1:{}\"\n",
            am.1
        ),
    );
    let agent = Agent::start(bin, &pol, &dir.join("agent"))?;
    let messages = dir.join("messages");
    let mut r = LatencyResult {
        runs,
        syslog: Vec::new(),
        alertmanager: Vec::new(),
    };
    for i in 0..runs {
        let victim = dir.join(format!("victim{i}"));
        std::fs::create_dir_all(&victim)?;
        for f in 0..FILES {
            std::fs::File::create(victim.join(format!("f{f:04}")))?;
        }
        let before = held_lines(&messages);
        let seen_am = held_alerts(am.1);
        let (at, watcher, fd) = watch_crossing(&victim)?;
        let mut child = Command::new(rm)
            .arg("-rf")
            .arg(&victim)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let g = child.id() as i32;
        // Polled every millisecond: the resolution of this measurement.
        let t = Instant::now();
        let (mut arrived, mut arrived_am) = (None, None);
        while t.elapsed() < Duration::from_secs(20) && (arrived.is_none() || arrived_am.is_none()) {
            if arrived.is_none() && held_lines(&messages) > before {
                arrived = Some(Instant::now());
            }
            if arrived_am.is_none() && !held_alerts(am.1).is_subset(&seen_am) {
                arrived_am = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: kill(2) of the process group of the rm the bench started.
        unsafe { libc::kill(-g, libc::SIGKILL) };
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&victim);
        let _ = watcher.join();
        // SAFETY: closing the inotify fd, its reader joined.
        unsafe { libc::close(fd) };
        let crossed = *at.lock().unwrap_or_else(|e| e.into_inner());
        match (crossed, arrived, arrived_am) {
            (Some(c), Some(a), Some(m)) => {
                r.syslog.push(a.saturating_duration_since(c));
                r.alertmanager.push(m.saturating_duration_since(c));
            }
            _ => bail!(
                "run {i}: crossing seen {}, line at rsyslog {}, alert at Alertmanager {} (within 20 s): {}",
                crossed.is_some(),
                arrived.is_some(),
                arrived_am.is_some(),
                agent.log_text()
            ),
        }
    }
    drop(agent);
    Ok(r)
}
