//! What /proc says about a job: its command line, user, terminal, and its members.

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The most of a command line the agent reads: the event log keeps the command whole up to
/// this, every human-readable sink caps it much shorter (`text::cap_command`).
const CMDLINE_MAX: u64 = 256 * 1024;

pub fn cmdline(pid: u32) -> Option<String> {
    use std::io::Read;
    let mut raw = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/cmdline"))
        .ok()?
        .take(CMDLINE_MAX)
        .read_to_end(&mut raw)
        .ok()?;
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

/// What the agent reads of /proc/PID/stat. The command name (comm) is whatever the process
/// chose (`prctl(PR_SET_NAME)`): any bytes but NUL, not UTF-8, with `)` and spaces in it, so it
/// is kept as bytes and the fields after it are read from the LAST `)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub comm: Vec<u8>,
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    pub session: u32,
    pub tty_nr: u32,
    /// When the process started, in clock ticks since boot (field 22); None if the line ends
    /// early.
    pub starttime: Option<u64>,
}

/// Parses the bytes of /proc/PID/stat: `pid (comm) state ppid pgrp session tty_nr ...`.
pub fn parse_stat(raw: &[u8]) -> Option<Stat> {
    let open = raw.iter().position(|b| *b == b'(')?;
    let close = raw.iter().rposition(|b| *b == b')')?;
    let comm = raw.get(open + 1..close)?.to_vec();
    // After the name the kernel writes only ASCII numbers and the state letter.
    let rest = std::str::from_utf8(raw.get(close + 1..)?).ok()?;
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let mut num = || f.next()?.parse::<i64>().ok();
    // tty_nr is an int (a device number); pgrp and session are 0 for kernel threads.
    let (ppid, pgrp, session, tty_nr) = (num()?, num()?, num()?, num()?);
    // tpgid, flags, minflt, cminflt, majflt, cmajflt, utime, stime, cutime, cstime, priority,
    // nice, num_threads, itrealvalue: then starttime.
    let starttime = f.nth(14).and_then(|s| s.parse::<u64>().ok());
    Some(Stat {
        comm,
        state,
        ppid: u32::try_from(ppid).ok()?,
        pgrp: u32::try_from(pgrp).ok()?,
        session: u32::try_from(session).ok()?,
        tty_nr: tty_nr as u32,
        starttime,
    })
}

/// /proc/PID/stat of a live process; None once it has exited (even in the middle of the read).
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read(format!("/proc/{pid}/stat")).ok()?)
}

/// Fields of /proc/PID/stat after the command name: (state, ppid, pgrp, session, tty_nr).
fn stat_fields(pid: u32) -> Option<(char, u32, u32, u32, u32)> {
    let s = stat(pid)?;
    Some((s.state, s.ppid, s.pgrp, s.session, s.tty_nr))
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn stat_with_a_hostile_comm_parses_from_the_last_paren() {
        let raw = b"4242 (a) R 1 2 (\xff) S 77 4242 4200 34817 4242 4194304 0 0";
        let s = parse_stat(raw).expect("parses");
        assert_eq!(s.comm, b"a) R 1 2 (\xff".to_vec());
        assert_eq!(
            (s.state, s.ppid, s.pgrp, s.session, s.tty_nr),
            ('S', 77, 4242, 4200, 34817)
        );
        let bytes = [b"9 (".as_slice(), &[0xff, 0xfe], b") T 1 9 9 0 -1"].concat();
        assert_eq!(parse_stat(&bytes).map(|s| s.state), Some('T'));
        assert_eq!(parse_stat(b"9 (x) R 1"), None, "cut short: None, no panic");
        assert_eq!(parse_stat(b""), None);
        assert_eq!(s.starttime, None, "a line cut before starttime has none");
        // A full line (field 22 is starttime), with a comm that looks like more fields.
        let full = b"77 (x) 1 2 3) S 1 77 77 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 123456 0 0";
        assert_eq!(parse_stat(full).and_then(|s| s.starttime), Some(123456));
    }

    #[test]
    fn our_own_stat_reads() {
        let s = stat(std::process::id()).expect("our own stat");
        assert_eq!(s.pgrp, nix::unistd::getpgrp().as_raw() as u32);
        assert_eq!(stat(u32::MAX), None);
        assert!(s.starttime.is_some_and(|t| t > 0), "{s:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any comm the kernel could show (no NUL, at most 64 bytes here) and arbitrary garbage
        /// never panic, and a well-formed line always gives back its numbers.
        #[test]
        fn any_comm_round_trips(comm in proptest::collection::vec(1u8..=255, 0..64),
                                ppid in 0u32..4_000_000, pgrp in 0u32..4_000_000) {
            let raw = [b"123 (".as_slice(), &comm, format!(") S {ppid} {pgrp} 5 0 1").as_bytes()].concat();
            let s = parse_stat(&raw).ok_or_else(|| TestCaseError::fail("does not parse"))?;
            prop_assert_eq!(s.comm, comm);
            prop_assert_eq!((s.ppid, s.pgrp), (ppid, pgrp));
        }

        #[test]
        fn garbage_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_stat(&raw);
        }
    }
}
