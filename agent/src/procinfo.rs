//! What /proc says about a job: its command line, user, terminal, and its members.
use std::{io::Write, os::unix::fs::OpenOptionsExt};

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if args.is_empty() {
        None
    } else {
        Some(args.join(" "))
    }
}

pub fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

/// Fields of /proc/PID/stat after the command name: (state, ppid, pgrp, session, tty_nr).
fn stat_fields(pid: u32) -> Option<(char, u32, u32, u32, u32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f.first()?.chars().next()?,
        f.get(1)?.parse().ok()?,
        f.get(2)?.parse().ok()?,
        f.get(3)?.parse().ok()?,
        f.get(4)?.parse().ok()?,
    ))
}

/// Processes whose process group is `pgid`.
pub fn pids_in_group(pgid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat_fields(*pid).is_some_and(|f| f.2 == pgid))
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether a job lives: its process group has a member, or, for a job keyed by a lone process
/// (no process group of its own), that process exists.
pub fn pgid_alive(pgid: u32) -> bool {
    let p = nix::unistd::Pid::from_raw(pgid as i32);
    pgid > 1
        && (nix::sys::signal::killpg(p, None).is_ok() || nix::sys::signal::kill(p, None).is_ok())
}

/// Signals a job: its process group, or the lone process a job is keyed by when it has no group
/// of its own. Never process group 0 or 1, and never our own group as a whole: when the job shares
/// it (the agent run by hand from the same script), every other member is signalled one by one.
pub fn signal_job(pgid: u32, sig: nix::sys::signal::Signal) {
    use nix::{sys::signal, unistd::Pid};
    if pgid <= 1 || pgid == std::process::id() {
        return;
    }
    let own = nix::unistd::getpgrp().as_raw() as u32;
    if pgid == own {
        for pid in pids_in_group(pgid) {
            if pid != std::process::id() {
                let _ = signal::kill(Pid::from_raw(pid as i32), sig);
            }
        }
        return;
    }
    if signal::killpg(Pid::from_raw(pgid as i32), sig).is_err() {
        let _ = signal::kill(Pid::from_raw(pgid as i32), sig);
    }
}

/// The terminal device of a process, from its tty_nr.
fn tty_path(pid: u32) -> Option<String> {
    let (_, _, _, _, tty_nr) = stat_fields(pid)?;
    if tty_nr == 0 {
        return None;
    }
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    match major {
        136..=143 => Some(format!("/dev/pts/{}", (major - 136) * 256 + minor)),
        4 if minor < 64 => Some(format!("/dev/tty{minor}")),
        4 => Some(format!("/dev/ttyS{}", minor - 64)),
        _ => None,
    }
}

pub fn tty_name(pid: u32) -> Option<String> {
    tty_path(pid).map(|p| p.trim_start_matches("/dev/").to_string())
}

/// One short message to the job's terminal (the way `wall` writes to a tty), or to its stderr
/// when it has no terminal.
pub fn tell_job(pid: u32, msg: &str) {
    let target = tty_path(pid).unwrap_or_else(|| format!("/proc/{pid}/fd/2"));
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&target);
    if let Ok(mut f) = opened {
        let _ = f.write_all(msg.as_bytes());
    }
}

/// The stopped ancestors of a job: sudo with `use_pty` (Debian's default) runs the command in a
/// session of its own on a new pty and stops itself (both its processes) when the command stops,
/// and only the job's own process group is signalled on approve or deny. Continuing them is what
/// `fg` would do. Only the parent chain, at most four levels up, and only processes that are
/// stopped; never PID 1 or the agent.
pub fn stopped_ancestors(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Some(leader) = pids_in_group(pgid).first().copied() else {
        return out;
    };
    let Some((_, mut parent, _, _, _)) = stat_fields(leader) else {
        return out;
    };
    for _ in 0..4 {
        if parent <= 1 || parent == std::process::id() {
            break;
        }
        let Some((state, next, _, _, _)) = stat_fields(parent) else {
            break;
        };
        if state == 'T' {
            out.push(parent);
        }
        parent = next;
    }
    out
}

pub fn continue_pids(pids: &[u32]) {
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}
