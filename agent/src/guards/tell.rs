//! Messages to a job (the hold message, a shutdown refusal), written only through descriptors the
//! job itself holds: `pidfd_open` + `pidfd_getfd` duplicate its fd 0/1/2 into the agent.
//!
//! Never a path: reopening `/proc/PID/fd/2` or a `/dev/pts/N` computed from tty_nr as root let
//! any user aim the agent at a file it could not write (an `O_PATH` fd 2 on /etc/shadow), cut a
//! `2>>job.log` open at offset 0, and reach another user's host terminal from a container whose
//! devpts numbers collide with the host's. A duplicated descriptor is the job's own open file
//! description: the same pipe, the same append-only log, the terminal of its own devpts, with the
//! access mode the job has. One that is `O_PATH` or read-only is never written.
//!
//! A write must not block the event loop (a full pipe, a terminal stopped with ^S, a log on a hung
//! NFS mount), and the description's flags are shared with the job, so O_NONBLOCK is not ours to
//! set. Instead: `poll(POLLOUT)` with a zero timeout first (a stopped pty and a full pipe are not
//! writable and get nothing), then one `write` of at most MESSAGE_MAX bytes in a short-lived
//! thread, because poll and write race (another writer fills the pipe in between; a regular file
//! always polls writable). At most WRITERS_MAX such threads exist at once; past that, messages are
//! dropped rather than threads piling up behind a stuck descriptor. SIGPIPE is ignored by Rust's
//! runtime, so a reader that went away is an EPIPE, not the agent's death.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::text;

/// A message to a job is a few lines; the bound keeps a hostile command from turning it into a
/// flood of someone's terminal, and keeps a pipe write atomic (below PIPE_BUF).
pub const MESSAGE_MAX: usize = 1024;
/// Writer threads in flight at once.
const WRITERS_MAX: usize = 4;

static WRITERS: AtomicUsize = AtomicUsize::new(0);
/// Why messages to jobs cannot be delivered, when they cannot ("" while they can).
static UNAVAILABLE: Mutex<String> = Mutex::new(String::new());

/// What `guardrail status` says about messages to jobs.
pub fn status() -> String {
    let why = UNAVAILABLE.lock().map(|w| w.clone()).unwrap_or_default();
    if why.is_empty() {
        "written to the job's own terminal or stderr (pidfd_getfd)".to_string()
    } else {
        format!("not written: {why}")
    }
}

/// Checked once at start-up, on the agent itself (always permitted), so a kernel without
/// pidfd_getfd (before 5.6) is reported before the first hold. Returns the sentence to log.
pub fn probe() -> Option<String> {
    let res = pidfd_open(std::process::id()).and_then(|p| pidfd_getfd(&p, 2));
    match res {
        Ok(_) => None,
        Err(e) => {
            let why = format!(
                "pidfd_getfd unavailable ({e}): held jobs and refused shutdown callers are not told why (it needs Linux 5.6 or later, CAP_SYS_PTRACE, and the syscall allowed by any seccomp filter: the shipped unit allows it)"
            );
            set_unavailable(&why);
            Some(why)
        }
    }
}

fn set_unavailable(why: &str) {
    if let Ok(mut w) = UNAVAILABLE.lock() {
        *w = why.to_string();
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes a pidfd we own, a descriptor number in that process and flags
    // (0); it returns a new descriptor (close-on-exec) in ours, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above, a fresh descriptor that only we hold.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Whether the job may write through this description: not O_PATH, not read-only.
fn writable(fd: &OwnedFd) -> bool {
    // SAFETY: F_GETFL on a descriptor we own reads its status flags and changes nothing.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    flags >= 0
        && flags & libc::O_PATH == 0
        && matches!(flags & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR)
}

/// A terminal: a character device that answers TCGETS.
fn is_terminal(fd: &OwnedFd) -> bool {
    // SAFETY: fstat fills a stat buffer we own from a descriptor we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ok = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0;
    // SAFETY: isatty only issues TCGETS on our descriptor.
    ok && st.st_mode & libc::S_IFMT == libc::S_IFCHR && unsafe { libc::isatty(fd.as_raw_fd()) } == 1
}

/// Where a message goes: the first writable terminal among the job's fds 0, 1, 2, else its
/// writable fd 2, else nowhere. Err when the kernel refuses pidfd_getfd altogether.
fn target(pid: u32) -> io::Result<Option<(OwnedFd, bool)>> {
    let pidfd = match pidfd_open(pid) {
        Ok(p) => p,
        // Gone already: nothing to tell.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut stderr = None;
    for n in 0..3 {
        let fd = match pidfd_getfd(&pidfd, n) {
            Ok(fd) => fd,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                return Err(e);
            }
            // EBADF: the job has no such descriptor; ESRCH: it exited meanwhile.
            Err(_) => continue,
        };
        if !writable(&fd) {
            continue;
        }
        if is_terminal(&fd) {
            return Ok(Some((fd, true)));
        }
        if n == 2 {
            stderr = Some(fd);
        }
    }
    Ok(stderr.map(|fd| (fd, false)))
}

/// The bytes written: each line escaped, the whole at most MESSAGE_MAX bytes, starting and
/// ending with a newline. The leading newline puts the message on lines of its own even when
/// the job is mid-line: its own error report races with the agent's write, and glibc's
/// `warn()` writes "kill: (1): Operation not permitted" and its "\n" separately (seen over
/// ssh in the sysvm). A terminal (raw mode possible) gets CR LF.
pub fn render(lines: &[String], terminal: bool) -> Vec<u8> {
    let eol = if terminal { "\r\n" } else { "\n" };
    let mut out = String::from(eol);
    for line in lines {
        let line = text::escape_line(line);
        let room = MESSAGE_MAX.saturating_sub(out.len() + eol.len());
        if line.len() > room {
            // Cut on a character boundary; the lines after it (approve/deny) are short, and the
            // callers cap the long fields first, so this is a last resort.
            let mut end = room;
            while end > 0 && !line.is_char_boundary(end) {
                end -= 1;
            }
            out.push_str(&line[..end]);
            out.push_str(eol);
            break;
        }
        out.push_str(&line);
        out.push_str(eol);
    }
    out.into_bytes()
}

/// Tells a job `lines` (text the agent composed; untrusted parts in it are escaped here).
pub fn tell_job(pid: u32, lines: &[String]) {
    let _ = start_telling(pid, lines);
}

/// Like [`tell_job`], then waits up to `wait` for the write to be done: for a caller that ends
/// the job right after (a refused shutdown program), whose terminal session would otherwise
/// close before the message landed (seen with `ssh -tt` on a busy host). Bounded, so a job
/// that never reads its terminal costs the loop at most `wait`.
pub fn tell_job_and_wait(pid: u32, lines: &[String], wait: std::time::Duration) {
    if let Some(done) = start_telling(pid, lines) {
        let _ = done.recv_timeout(wait);
    }
}

fn start_telling(pid: u32, lines: &[String]) -> Option<std::sync::mpsc::Receiver<()>> {
    let (fd, terminal) = match target(pid) {
        Ok(Some(t)) => t,
        Ok(None) => return None,
        Err(e) => {
            set_unavailable(&format!(
                "pidfd_getfd refused ({e}): a kernel without it, or a security module that forbids ptrace access to jobs"
            ));
            return None;
        }
    };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd we own, zero timeout: returns at once.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) } == 1 && pfd.revents & libc::POLLOUT != 0;
    if !ready {
        return None;
    }
    if WRITERS.fetch_add(1, Ordering::SeqCst) >= WRITERS_MAX {
        WRITERS.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    let bytes = render(lines, terminal);
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("guardrail-tell".into())
        .spawn(move || {
            // SAFETY: one write of our buffer to a descriptor this thread owns.
            let _ = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            drop(fd);
            WRITERS.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(());
        });
    if spawned.is_err() {
        WRITERS.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    Some(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_escaped_bounded_and_end_with_a_newline() {
        let lines = vec![
            format!(
                "guardrail: held job \"rm \x1b]52;c;aGk=\x07 {}\"",
                "x".repeat(5000)
            ),
            "  To let it continue: guardrail approve 7".to_string(),
        ];
        for terminal in [true, false] {
            let m = String::from_utf8(render(&lines, terminal)).expect("UTF-8");
            assert!(m.len() <= MESSAGE_MAX, "{}", m.len());
            assert!(m.ends_with('\n'));
            assert!(m.contains("\\x1b]52;c;aGk=\\x07"), "{m}");
            assert!(!m.contains('\x1b') && !m.contains('\x07'));
        }
        let short = render(&["a".into(), "b".into()], true);
        assert_eq!(short, b"\r\na\r\nb\r\n");
        assert_eq!(render(&["a".into(), "b".into()], false), b"\na\nb\n");
    }

    proptest::proptest! {
        #![proptest_config(crate::text::strategies::config(64))]

        /// Whatever the job's text, the message is at most MESSAGE_MAX bytes, ends with a
        /// newline, and holds no control or bidi character but the line breaks it chose.
        #[test]
        fn any_message_is_bounded_and_safe(
            command in crate::text::strategies::hostile(),
            path in crate::text::strategies::hostile(),
            terminal in proptest::prelude::any::<bool>(),
        ) {
            let lines = vec![
                format!("guardrail: held job \"{}\" on h: {}. Incident 7.", crate::text::cap(&command, 400), crate::text::cap(&path, 300)),
                "  To let it continue: guardrail approve 7".to_string(),
            ];
            let m = String::from_utf8(render(&lines, terminal)).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            proptest::prop_assert!(m.len() <= MESSAGE_MAX && m.ends_with('\n'));
            proptest::prop_assert!(!m.chars().any(|c| c != '\r' && c != '\n' && crate::text::is_unsafe(c)), "{:?}", m);
            proptest::prop_assert!(m.contains("guardrail approve 7"), "the approve line fits: {:?}", m);
        }
    }

    #[test]
    fn our_own_stderr_is_found_through_pidfd_getfd() {
        // The test runner's fd 2 is a pipe or a terminal, writable either way; the kernels the
        // tests run on all have pidfd_getfd (5.6).
        assert_eq!(probe(), None);
        let t = target(std::process::id()).expect("pidfd_getfd works on ourselves");
        assert!(t.is_some());
    }
}
