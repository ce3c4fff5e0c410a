//! Where a login session comes from: `remote`, `local` or `none`, keyed by the kernel's audit
//! session id (set by pam_loginuid, inherited through sudo, su, setsid and tmux servers; changing
//! it needs CAP_AUDIT_CONTROL). The kernel asks nobody: the agent pushes each session's class into
//! `SD_SESSIONS` as soon as the session runs anything (the kernel reports new session ids), on
//! inotify events of logind's session files and utmp, and on a periodic rescan.
//!
//! Evidence, strongest first (threats.md §C); `local` and `none` only on positive evidence:
//! logind's /run/systemd/sessions/ID (REMOTE=1 → remote; a seat or a VT → local; SERVICE cron →
//! none); else the executables (`/proc/PID/exe`, never the command name a process may set) of
//! the session's processes and their ancestors: a remote-access daemon (sshd, dropbear,
//! teleport, ssm, shellinabox, ttyd, mosh-server, xrdp, cockpit) → remote; a root cron or atd
//! from a root-owned executable → none; root's `login` under PID 1 on a local terminal, or a
//! display manager → local. Everything else — a process that wrote its own loginuid, a session
//! whose processes were all reparented to PID 1 (a tmux server left behind) — stays
//! unclassified, which the policy treats as `unknown`. The remote host comes from SSH_CONNECTION
//! in a session process's environment or utmp's host for its tty (text for messages only).
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

/// Programs whose presence in a session (or among the ancestors of its processes) marks it
/// remote, by the file name of their executable (never their command name, which any process
/// may set), with the service name shown in messages. Remote is the strictest class: this
/// evidence needs no more than the executable's name.
const REMOTE_LEADERS: &[(&str, &str)] = &[
    ("sshd", "ssh"),
    ("sshd-session", "ssh"),
    ("sshd-auth", "ssh"),
    ("dropbear", "ssh"),
    ("tinysshd", "ssh"),
    ("teleport", "teleport"),
    ("amazon-ssm-agent", "ssm"),
    ("ssm-session-worker", "ssm"),
    ("shellinaboxd", "shellinabox"),
    ("ttyd", "ttyd"),
    ("mosh-server", "mosh"),
    ("xrdp", "xrdp"),
    ("xrdp-sesman", "xrdp"),
    ("cockpit-session", "cockpit"),
    ("cockpit-ws", "cockpit"),
];
/// Services whose logins run no interactive user (class none): they widen what is free, so they
/// count only as root processes running a root-owned executable from a directory only root may
/// write.
const NO_LOGIN_LEADERS: &[&str] = &["cron", "crond", "atd"];
/// The console's login, started on a local terminal by getty (which execs it: its parent is
/// PID 1). Same trust conditions as [`NO_LOGIN_LEADERS`].
const CONSOLE_LOGIN: &[&str] = &["login"];
/// Display managers' session helpers: a graphical login at the machine.
const DISPLAY_MANAGERS: &[&str] = &["gdm-session-worker", "lightdm", "sddm-helper", "xdm"];
/// How far up the parent chain to look for a remote daemon (past sudo, su, tmux, scripts).
const MAX_ANCESTORS: usize = 32;

#[derive(Debug, Clone, Default)]
struct Proc {
    pid: u32,
    ppid: u32,
    /// Real uid.
    uid: u32,
    /// The file name of the executable (`/proc/PID/exe`), "" when unreadable.
    exe: String,
    /// The executable is root's and sits where only root may write (a user cannot have copied
    /// it there under that name), and it still exists.
    exe_trusted: bool,
    tty: Option<String>,
}

impl Proc {
    fn runs(&self, names: &[&str]) -> bool {
        names.contains(&self.exe.as_str())
    }

    /// A root process running one of `names` from a trusted executable.
    fn is_root_service(&self, names: &[&str]) -> bool {
        self.uid == 0 && self.exe_trusted && self.runs(names)
    }
}

/// Root's, and nobody else may write it or the directory it is in.
fn trusted_file(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let safe = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0);
    safe(path) && path.parent().is_some_and(safe)
}

fn read_session(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/sessionid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn proc_info(pid: u32) -> Option<Proc> {
    let ppid = crate::host::procinfo::stat(pid)?.ppid;
    let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    // A replaced executable reads "/usr/sbin/sshd (deleted)": its name still says what it was
    // (enough for remote evidence), but it can no longer be checked (no trust).
    let (exe, exe_trusted) = match &link {
        Some(p) => {
            let text = p.to_string_lossy();
            let deleted = text.ends_with(" (deleted)");
            let name = text
                .trim_end_matches(" (deleted)")
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_string();
            (name, !deleted && trusted_file(p))
        }
        None => (String::new(), false),
    };
    Some(Proc {
        pid,
        ppid,
        uid,
        exe,
        exe_trusted,
        tty: crate::host::procinfo::tty_name(pid),
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
    // logind's files are root's; still, `local` needs positive evidence: a seat or a VT. A
    // session logind knows nothing more of is left to the process evidence.
    let class = if NO_LOGIN_LEADERS.contains(&service.as_str()) {
        Class::None
    } else if get("REMOTE").as_deref() == Some("1") {
        Class::Remote
    } else if tty.as_deref().is_some_and(is_serial) {
        Class::Serial
    } else if get("SEAT").is_some() || get("VTNR").is_some() {
        Class::Local
    } else {
        return None;
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
            .find_map(|p| crate::host::procinfo::tty_name(*p))
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

/// Classifies one session from what the system shows now; None (the policy's `unknown`) when
/// nothing is positive evidence. The one login classifier: the shutdown guard's classes and the
/// deletion incidents' `session.class` both come from here.
pub fn classify(session: u32, pids: &[u32]) -> Option<Origin> {
    if let Some(o) = logind(session) {
        return Some(o);
    }
    if pids.is_empty() {
        return None;
    }
    let members: Vec<Proc> = pids.iter().filter_map(|p| proc_info(*p)).collect();
    // The ancestors of the session's processes up to PID 1, outside the session.
    let ids: HashSet<u32> = members.iter().map(|p| p.pid).collect();
    let mut ancestors: Vec<Proc> = Vec::new();
    let mut seen: HashSet<u32> = ids.clone();
    for m in &members {
        let mut pp = m.ppid;
        for _ in 0..MAX_ANCESTORS {
            if pp <= 1 || !seen.insert(pp) {
                break;
            }
            let Some(p) = proc_info(pp) else { break };
            pp = p.ppid;
            ancestors.push(p);
        }
    }
    let origin = decide(&members, &ancestors)?;
    let host = if origin.class == Class::Remote {
        remote_host(pids)
    } else {
        None
    };
    Some(Origin { host, ..origin })
}

/// The decision on gathered evidence (pure, for the tests): `members` are the session's
/// processes, `ancestors` their ancestors outside it (up to, not including, PID 1).
fn decide(members: &[Proc], ancestors: &[Proc]) -> Option<Origin> {
    let tty = members.iter().find_map(|p| p.tty.clone());
    let origin = |class, service: &str| Origin {
        class,
        service: service.to_string(),
        host: None,
        tty: tty.clone(),
    };
    // Remote: a remote-access daemon in the session or above it.
    for p in members.iter().chain(ancestors) {
        if let Some((_, service)) = REMOTE_LEADERS.iter().find(|(n, _)| p.exe == *n) {
            return Some(origin(Class::Remote, service));
        }
    }
    // No interactive login: the session cron or atd opened for a job.
    if let Some(p) = members.iter().find(|p| p.is_root_service(NO_LOGIN_LEADERS)) {
        return Some(origin(Class::None, &p.exe));
    }
    // The console's login, as getty leaves it: its parent is PID 1, on a local terminal.
    let console = members.iter().find(|p| {
        p.is_root_service(CONSOLE_LOGIN)
            && p.ppid == 1
            && p.tty.as_deref().is_some_and(is_local_terminal)
    });
    if let Some(p) = console {
        let class = if p.tty.as_deref().is_some_and(is_serial) {
            Class::Serial
        } else {
            Class::Local
        };
        return Some(Origin {
            tty: p.tty.clone(),
            ..origin(class, "login")
        });
    }
    if members
        .iter()
        .chain(ancestors)
        .any(|p| p.is_root_service(DISPLAY_MANAGERS))
    {
        return Some(origin(Class::Local, ""));
    }
    // Anything else (a process that wrote its own loginuid, a session whose processes were all
    // reparented to PID 1) carries no evidence.
    None
}

/// A terminal of this machine: a virtual console, the console, or a serial line.
fn is_local_terminal(tty: &str) -> bool {
    let t = tty.trim_start_matches("/dev/");
    t == "console"
        || is_serial(t)
        || t.strip_prefix("tty")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
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

    fn p(pid: u32, ppid: u32, uid: u32, exe: &str, trusted: bool, tty: Option<&str>) -> Proc {
        Proc {
            pid,
            ppid,
            uid,
            exe: exe.to_string(),
            exe_trusted: trusted,
            tty: tty.map(str::to_string),
        }
    }

    #[test]
    fn a_session_without_evidence_is_unknown() {
        // A root shell that wrote its own loginuid, started by a live local process (before:
        // `local`, so a remote shutdown from it was allowed).
        let members = [p(500, 400, 0, "bash", true, None)];
        let ancestors = [p(400, 300, 0, "cargo", false, Some("pts/0"))];
        assert_eq!(decide(&members, &ancestors), None);
        // Reparented to PID 1: nothing either.
        assert_eq!(decide(&[p(501, 1, 1000, "tmux", true, None)], &[]), None);
    }

    #[test]
    fn names_a_user_can_choose_are_no_evidence() {
        // A user's own copy of `login` or `cron` (its executable is the user's), or root's
        // shell renamed `login` with prctl (the executable is still bash): no class.
        let fake_login = p(600, 1, 1000, "login", false, Some("tty1"));
        assert_eq!(decide(&[fake_login], &[]), None);
        let fake_cron = p(601, 1, 1000, "cron", true, None);
        assert_eq!(decide(&[fake_cron], &[]), None);
        let renamed = p(602, 1, 0, "bash", true, Some("tty1"));
        assert_eq!(decide(&[renamed], &[]), None);
    }

    #[test]
    fn positive_evidence_classifies() {
        let sshd = p(10, 1, 0, "sshd", true, None);
        let shell = p(11, 10, 1000, "bash", true, Some("pts/0"));
        assert_eq!(
            decide(std::slice::from_ref(&shell), std::slice::from_ref(&sshd))
                .map(|o| (o.class, o.service)),
            Some((Class::Remote, "ssh".to_string()))
        );
        // A remote daemon anywhere above counts, past sudo and su.
        let sudo = p(12, 11, 0, "sudo", true, Some("pts/0"));
        assert_eq!(
            decide(&[p(13, 12, 0, "bash", true, None)], &[sudo, shell, sshd]).map(|o| o.class),
            Some(Class::Remote)
        );
        let login = p(20, 1, 0, "login", true, Some("tty1"));
        assert_eq!(
            decide(&[login, p(21, 20, 1000, "bash", true, Some("tty1"))], &[]).map(|o| o.class),
            Some(Class::Local)
        );
        // login must sit where getty left it: under PID 1, on a local terminal.
        assert_eq!(
            decide(&[p(22, 5, 0, "login", true, Some("tty1"))], &[]),
            None
        );
        assert_eq!(
            decide(&[p(23, 1, 0, "login", true, Some("pts/4"))], &[]),
            None
        );
        assert_eq!(
            decide(&[p(24, 1, 0, "login", true, Some("ttyS0"))], &[]).map(|o| o.class),
            Some(Class::Serial)
        );
        assert_eq!(
            decide(&[p(30, 2, 0, "cron", true, None)], &[]).map(|o| o.class),
            Some(Class::None)
        );
        assert_eq!(
            decide(
                &[p(40, 39, 1000, "bash", true, None)],
                &[p(39, 1, 0, "gdm-session-worker", true, None)]
            )
            .map(|o| o.class),
            Some(Class::Local)
        );
    }

    #[test]
    fn local_terminals() {
        assert!(is_local_terminal("tty1") && is_local_terminal("console"));
        assert!(is_local_terminal("ttyS0") && is_local_terminal("/dev/hvc0"));
        assert!(
            !is_local_terminal("pts/0") && !is_local_terminal("tty") && !is_local_terminal("ttyx")
        );
    }
}
