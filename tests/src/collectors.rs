//! The monitoring daemons alert tests deliver to, from Debian's packages, each started on
//! loopback with its own configuration in a temporary directory and stopped by its PID: rsyslog
//! (imudp + imtcp, writing every message as it parsed it to a file) and prometheus-alertmanager.
//! Shared by tests/tests/alerts.rs and tests/tests/host_messages.rs.
use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::wait_until;

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free TCP port")
        .port()
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .expect("hostname")
        .into_string()
        .expect("UTF-8 hostname")
}

/// Stops a child we started, by its PID: SIGTERM, then SIGKILL if it lingers.
pub fn stop_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if !wait_until(Duration::from_secs(5), || {
            matches!(child.try_wait(), Ok(Some(_)))
        }) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// rsyslogd in the foreground with its own config, pid file and work directory, receiving on
/// loopback UDP and TCP and writing each message as rsyslog parsed it (`%jsonmesg%`) to a file.
pub struct Rsyslog {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub udp: u16,
    pub tcp: u16,
}

impl Rsyslog {
    pub fn start() -> Rsyslog {
        let dir = tempfile::Builder::new()
            .prefix("guardrail-rsyslog-")
            .tempdir()
            .expect("temp dir");
        let (udp, tcp) = (free_udp_port(), free_tcp_port());
        let d = dir.path().display();
        let conf = format!(
            r#"global(workDirectory="{d}")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
template(name="json" type="string" string="%jsonmesg%\n")
action(type="omfile" file="{d}/messages.jsonl" template="json")
"#
        );
        let conf_path = dir.path().join("rsyslog.conf");
        std::fs::write(&conf_path, conf).expect("write rsyslog.conf");
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(dir.path().join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .spawn()
            .expect("rsyslogd starts (apt-get install rsyslog, or cargo xtask setup)");
        let r = Rsyslog {
            child,
            dir,
            udp,
            tcp,
        };
        assert!(
            wait_until(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                r.tcp
            ))
            .is_ok()),
            "rsyslogd listens on TCP {}",
            r.tcp
        );
        r
    }

    pub fn messages(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("messages.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("rsyslog writes one JSON object per line"))
            .collect()
    }

    /// Messages whose MSGID (as rsyslog parsed it) is `msgid`.
    pub fn with_msgid(&self, msgid: &str) -> Vec<serde_json::Value> {
        self.messages()
            .into_iter()
            .filter(|m| m["msgid"] == msgid)
            .collect()
    }

    pub fn stop(&mut self) {
        stop_child(&mut self.child);
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// prometheus-alertmanager on a loopback port with its own config and storage, clustering off.
pub struct Alertmanager {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Alertmanager {
    pub fn start() -> Alertmanager {
        let dir = tempfile::Builder::new()
            .prefix("guardrail-alertmanager-")
            .tempdir()
            .expect("temp dir");
        let conf = dir.path().join("alertmanager.yml");
        std::fs::write(
            &conf,
            "route:\n  receiver: nobody\n  group_by: [host, rule]\nreceivers:\n  - name: nobody\n",
        )
        .expect("write alertmanager.yml");
        let port = free_tcp_port();
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("prometheus-alertmanager starts (apt-get install prometheus-alertmanager)");
        let am = Alertmanager { child, dir, port };
        assert!(
            wait_until(Duration::from_secs(20), || {
                http_get(am.port, "/-/ready").is_some_and(|(code, _)| code == 200)
            }),
            "alertmanager is ready on {port}"
        );
        am
    }

    pub fn alerts(&self) -> Vec<serde_json::Value> {
        let (code, body) = http_get(self.port, "/api/v2/alerts").expect("alertmanager answers");
        assert_eq!(code, 200, "GET /api/v2/alerts: {body}");
        serde_json::from_str(&body).expect("a JSON array of alerts")
    }

    /// The alert with label incident=`id`.
    pub fn alert_for(&self, id: u64) -> Option<serde_json::Value> {
        let want = id.to_string();
        self.alerts()
            .into_iter()
            .find(|a| a["labels"]["incident"] == want.as_str())
    }

    pub fn stop(&mut self) {
        stop_child(&mut self.child);
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
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
    let (head, body) = text.split_once("\r\n\r\n")?;
    // Alertmanager answers in chunks; our agent does not.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((code, body))
}

pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
