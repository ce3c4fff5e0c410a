//! Where a login session comes from: `remote`, `local` or `none`, keyed by the kernel's audit
//! session id (set by pam_loginuid, inherited through sudo, su, setsid and tmux servers; changing
//! it needs CAP_AUDIT_CONTROL). The kernel asks nobody: the agent pushes each session's class into
//! `SD_SESSIONS` as soon as the session runs anything (the kernel reports new session ids), on
//! inotify events of logind's session files and utmp, and on a periodic rescan.
//!
//! Evidence, strongest first (threats.md §C): logind's /run/systemd/sessions/ID (REMOTE,
//! REMOTE_HOST, SERVICE, TTY); else the session's processes and their parents (sshd,
//! sshd-session, mosh-server, xrdp, cockpit → remote; cron, atd → none); the remote host comes
//! from SSH_CONNECTION in a session process's environment or utmp's host for its tty. A session
//! whose processes were all reparented to PID 1 before the agent saw it (a tmux server left
//! behind) carries no evidence: it stays unclassified, which the policy treats as `unknown`.
use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use guardrail_common::AUDIT_SESSION_UNSET;

pub const LOGIND_SESSIONS: &str = "/run/systemd/sessions";
pub const UTMP: &str = "/run/utmp";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Local,
    Remote,
    None,
    /// A serial console: the policy's `serial_console` says local or remote.
    Serial,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Local => "local",
            Class::Remote => "remote",
            Class::None => "none",
            Class::Serial => "serial console",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub class: Class,
    /// ssh, mosh, xrdp, cockpit, cron, a logind service name, or "" (local).
    pub service: String,
    pub host: Option<String>,
    pub tty: Option<String>,
}

impl Origin {
    /// "ssh 10.0.0.5", "mosh", "a local session", "serial console ttyS0".
    pub fn describe(&self) -> String {
        match self.class {
            Class::Remote => match &self.host {
                Some(h) if !self.service.is_empty() => format!("{} {h}", self.service),
                Some(h) => format!("remote host {h}"),
                None if !self.service.is_empty() => self.service.clone(),
                None => "a remote session".to_string(),
            },
            Class::Local => match &self.tty {
                Some(t) => format!("a local session on {t}"),
                None => "a local session".to_string(),
            },
            Class::None => match self.service.as_str() {
                "" => "no login session".to_string(),
                s => format!("{s} (no interactive login)"),
            },
            Class::Serial => format!(
                "serial console {}",
                self.tty.as_deref().unwrap_or("(unknown tty)")
            ),
        }
    }
}

/// Programs whose presence in a session (or as the parent of one of its processes) marks it
/// remote, with the service name shown in messages.
const REMOTE_LEADERS: &[(&str, &str)] = &[
    ("sshd", "ssh"),
    ("sshd-session", "ssh"),
    ("mosh-server", "mosh"),
    ("xrdp", "xrdp"),
    ("xrdp-sesman", "xrdp"),
    ("cockpit-session", "cockpit"),
    ("cockpit-ws", "cockpit"),
];
const NO_LOGIN_LEADERS: &[&str] = &["cron", "crond", "atd"];
/// Local logins whose leader PID 1 started directly (so "started by a live local process" does not
/// tell): the console's login, display managers.
const LOCAL_LEADERS: &[&str] = &[
    "login",
    "agetty",
    "gdm-session-worker",
    "lightdm",
    "sddm-helper",
    "xdm",
];

#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    ppid: u32,
    names: [String; 2],
}

fn read_session(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/sessionid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn proc_info(pid: u32) -> Option<Proc> {
    let stat = crate::procinfo::stat(pid)?;
    let (comm, ppid) = (stat.comm_lossy(), stat.ppid);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    Some(Proc {
        pid,
        ppid,
        names: [comm, exe],
    })
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Audit session id of every process now, grouped by session (unset ones left out).
pub fn live_sessions() -> HashMap<u32, Vec<u32>> {
    let mut m: HashMap<u32, Vec<u32>> = HashMap::new();
    for pid in all_pids() {
        if let Some(s) = read_session(pid)
            && s != AUDIT_SESSION_UNSET
        {
            m.entry(s).or_default().push(pid);
        }
    }
    m
}

fn logind(session: u32) -> Option<Origin> {
    let text =
        std::fs::read_to_string(Path::new(LOGIND_SESSIONS).join(session.to_string())).ok()?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
            .filter(|v| !v.is_empty())
    };
    let service = get("SERVICE").unwrap_or_default();
    let tty = get("TTY");
    let class = if NO_LOGIN_LEADERS.contains(&service.as_str()) {
        Class::None
    } else if get("REMOTE").as_deref() == Some("1") {
        Class::Remote
    } else if tty.as_deref().is_some_and(is_serial) {
        Class::Serial
    } else {
        Class::Local
    };
    let service = match service.as_str() {
        "sshd" => "ssh".to_string(),
        _ => service,
    };
    Some(Origin {
        class,
        service,
        host: get("REMOTE_HOST"),
        tty,
    })
}

fn is_serial(tty: &str) -> bool {
    let t = tty.trim_start_matches("/dev/");
    t.starts_with("ttyS") || t.starts_with("hvc") || t.starts_with("ttyAMA")
}

/// The client address of a remote session: SSH_CONNECTION in a session process's environment,
/// else utmp's host for its terminal.
pub fn remote_host(pids: &[u32]) -> Option<String> {
    ssh_client(pids).or_else(|| {
        pids.iter()
            .find_map(|p| crate::procinfo::tty_name(*p))
            .and_then(|t| utmp_host(&t))
    })
}

/// The client address of an SSH connection, from a session process's environment.
fn ssh_client(pids: &[u32]) -> Option<String> {
    for pid in pids {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for var in env.split(|b| *b == 0) {
            let var = String::from_utf8_lossy(var);
            for key in ["SSH_CONNECTION=", "SSH_CLIENT="] {
                if let Some(v) = var.strip_prefix(key)
                    && let Some(addr) = v.split_whitespace().next()
                {
                    return Some(addr.to_string());
                }
            }
        }
    }
    None
}

/// utmp's host for a tty line ("pts/3"), from /run/utmp (glibc x86_64 layout: 384-byte records,
/// ut_type at 0, ut_line[32] at 8, ut_host[256] at 76).
pub fn utmp_host(line: &str) -> Option<String> {
    let data = std::fs::read(UTMP).ok()?;
    let field = |rec: &[u8], off: usize, len: usize| {
        let b = &rec[off..off + len];
        let end = b.iter().position(|c| *c == 0).unwrap_or(len);
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    data.chunks_exact(384).find_map(|rec| {
        let ut_type = i16::from_le_bytes([rec[0], rec[1]]);
        // USER_PROCESS
        if ut_type != 7 || field(rec, 8, 32) != line {
            return None;
        }
        Some(field(rec, 76, 256)).filter(|h| !h.is_empty())
    })
}

/// Classifies one session from what the system shows now; None when nothing tells.
pub fn classify(session: u32, pids: &[u32]) -> Option<Origin> {
    if let Some(o) = logind(session) {
        return Some(o);
    }
    if pids.is_empty() {
        return None;
    }
    let procs: Vec<Proc> = pids.iter().filter_map(|p| proc_info(*p)).collect();
    let members: HashSet<u32> = procs.iter().map(|p| p.pid).collect();
    let tty = pids.iter().find_map(|p| crate::procinfo::tty_name(*p));
    // The session's own processes and the parents of its leaders.
    let mut seen: Vec<Proc> = procs.clone();
    let mut leader_parents = Vec::new();
    for p in &procs {
        if !members.contains(&p.ppid) {
            leader_parents.push(p.ppid);
            if p.ppid > 1
                && let Some(pp) = proc_info(p.ppid)
            {
                seen.push(pp);
            }
        }
    }
    for p in &seen {
        for (name, service) in REMOTE_LEADERS {
            if p.names.iter().any(|n| n == name) {
                let host = ssh_client(pids).or_else(|| tty.as_deref().and_then(utmp_host));
                return Some(Origin {
                    class: Class::Remote,
                    service: service.to_string(),
                    host,
                    tty,
                });
            }
        }
        if let Some(n) = NO_LOGIN_LEADERS
            .iter()
            .find(|n| p.names.iter().any(|x| x == *n))
        {
            return Some(Origin {
                class: Class::None,
                service: n.to_string(),
                host: None,
                tty,
            });
        }
    }
    let local_leader = seen
        .iter()
        .any(|p| LOCAL_LEADERS.iter().any(|n| p.names.iter().any(|x| x == n)));
    // A console or display-manager login, or a session started by something still there that is
    // not PID 1: a local login.
    if local_leader || leader_parents.iter().any(|pp| *pp > 1) {
        let class = if tty.as_deref().is_some_and(is_serial) {
            Class::Serial
        } else {
            Class::Local
        };
        return Some(Origin {
            class,
            service: String::new(),
            host: None,
            tty,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_origins_for_messages() {
        let o = Origin {
            class: Class::Remote,
            service: "ssh".into(),
            host: Some("10.0.0.5".into()),
            tty: Some("pts/0".into()),
        };
        assert_eq!(o.describe(), "ssh 10.0.0.5");
        let l = Origin {
            class: Class::Local,
            service: String::new(),
            host: None,
            tty: None,
        };
        assert_eq!(l.describe(), "a local session");
        assert!(is_serial("/dev/ttyS0") && is_serial("hvc0") && !is_serial("pts/1"));
    }

    #[test]
    fn this_process_session_is_classified_by_its_parent() {
        // The test runner was started by something other than PID 1 (cargo, a shell).
        let me = std::process::id();
        let o = classify(12345678, &[me]).expect("a process with a live parent has an origin");
        assert_ne!(o.class, Class::None);
    }
}
