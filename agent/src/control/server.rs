//! The admin socket's server. The socket is 0666, so every byte on it is hostile until the
//! caller's credentials say otherwise, and no client may ever stall the agent's main loop (which
//! drains the kernel's ring, times holds out and reads SIGTERM).
//!
//! - An accept thread takes each connection, reads the caller's uid (SO_PEERCRED) and hands the
//!   connection to a thread of its own, at most [`PER_UID`] at once per uid and [`GLOBAL`] for all
//!   non-root callers together ([`ROOT`] more are kept for root); excess connections get an error
//!   line and are closed at once.
//! - The connection thread reads one request line with a deadline for the whole request
//!   ([`REQUEST_DEADLINE`], not per read) and a size cap ([`ipc::MAX_REQUEST`]), finds out who
//!   the caller is (uid, gid, supplementary groups, and its audit session through its pidfd), and
//!   passes the request to the main loop through a channel and an eventfd the loop polls.
//! - The main loop answers (`daemon.rs`, `answer`) and returns at once; the connection thread
//!   writes the answer, long fields clipped, with a deadline ([`SEND_DEADLINE`]) and closes.
//!
//! A client that dribbles, never sends a newline, streams gigabytes or never reads its answer
//! costs at most its own connection thread, for at most a few seconds.
use std::{
    collections::{HashMap, VecDeque},
    io::{Read, Write},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, Sender, SyncSender},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::control::ipc::{self, HoldInfo, Request, Response};

/// Connections served at once for one uid (other than root).
pub const PER_UID: usize = 4;
/// Connections served at once for all non-root callers together.
pub const GLOBAL: usize = 64;
/// Connections root may have at once; they do not count against [`GLOBAL`], so other users
/// cannot lock the admin out.
pub const ROOT: usize = 16;
/// The whole request line must arrive within this, however it is split into reads.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// The whole answer must be taken within this.
pub const SEND_DEADLINE: Duration = Duration::from_secs(2);
/// How long a connection waits for the main loop's answer (a reload may take a moment).
const ANSWER_WAIT: Duration = Duration::from_secs(15);
/// Longest text field in an answer (commands, paths, reasons), in bytes, before "…".
pub const MAX_FIELD: usize = 512;
/// Name of the group whose members may approve, deny and confirm like root.
pub const ADMIN_GROUP: &str = "guardrail";
/// Confirmations one uid may ask for per [`CONFIRM_PERIOD`].
pub const CONFIRMS_PER_PERIOD: usize = 5;
pub const CONFIRM_PERIOD: Duration = Duration::from_secs(60);

/// Who is asking, as the kernel tells it (never as the client says).
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    /// Primary gid at connect time.
    pub gid: u32,
    /// Supplementary groups at connect time (SO_PEERGROUPS).
    pub groups: Vec<u32>,
    /// The caller's pid (from its pidfd where the kernel gives one), 0 if unknown.
    pub pid: i32,
    /// The caller's audit session id, or why it is unknown.
    pub session: Result<u32, String>,
}

impl Peer {
    /// The caller's audit session, if it has one (not "unset", 4294967295).
    pub fn session_id(&self) -> Option<u32> {
        self.session
            .as_ref()
            .ok()
            .copied()
            .filter(|s| *s != u32::MAX)
    }

    /// "uid 1000 (audit session 7)" for the event log.
    pub fn describe(&self) -> String {
        match &self.session {
            Ok(u32::MAX) => format!("uid {} (no audit session)", self.uid),
            Ok(s) => format!("uid {} (audit session {s})", self.uid),
            Err(_) => format!("uid {} (audit session unknown)", self.uid),
        }
    }
}

/// One request for the main loop, and where its answer goes.
pub struct Incoming {
    pub request: Request,
    pub peer: Peer,
    reply: SyncSender<Response>,
}

impl Incoming {
    /// Hands the answer back to the connection thread; never blocks (the channel has room for
    /// exactly this one answer, and a connection that gave up just drops it).
    pub fn reply(self, resp: Response) {
        let _ = self.reply.try_send(resp);
    }
}

/// The server's end in the main loop: an fd to poll, and the requests waiting.
pub struct Server {
    rx: Receiver<Incoming>,
    wake: Arc<OwnedFd>,
    peer_pidfd: bool,
}

impl Server {
    /// Starts the accept thread on `listener`. Call it after the main thread blocked the
    /// signals it reads through signalfd: threads inherit the mask, so SIGTERM is never
    /// delivered to a connection thread.
    pub fn start(listener: UnixListener) -> Result<Server> {
        listener.set_nonblocking(false)?;
        // SAFETY: eventfd returns a new fd or -1; nothing else is passed.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let (tx, rx) = mpsc::channel();
        let peer_pidfd = kernel_has_peer_pidfd();
        let w = wake.clone();
        std::thread::Builder::new()
            .name("guardrail-accept".into())
            .spawn(move || accept_loop(listener, tx, w, peer_pidfd))
            .context("starting the admin socket's accept thread")?;
        Ok(Server {
            rx,
            wake,
            peer_pidfd,
        })
    }

    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// The requests waiting now (at most one per open connection, so at most
    /// [`GLOBAL`] + [`ROOT`]).
    pub fn take(&self) -> Vec<Incoming> {
        let mut counter = [0u8; 8];
        // SAFETY: reads 8 bytes into our buffer from our own non-blocking eventfd.
        unsafe { libc::read(self.wake.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
        self.rx.try_iter().collect()
    }

    /// `guardrail status`'s line on how a confirmation's session is checked.
    pub fn caller_check(&self) -> String {
        if self.peer_pidfd {
            "confirm checks the caller's audit session through its pidfd (SO_PEERPIDFD)".into()
        } else {
            "confirm checks the caller's audit session through its pid only (this kernel has no SO_PEERPIDFD, Linux 6.5+): a caller that exits and whose pid is reused at once could be taken for another session".into()
        }
    }
}

/// Connections open per uid, to cap them.
#[derive(Default)]
struct Slots {
    open: Mutex<HashMap<u32, usize>>,
}

struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

impl Slots {
    fn take(self: &Arc<Self>, uid: u32) -> Result<Slot, String> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mine = open.get(&uid).copied().unwrap_or(0);
        if uid == 0 {
            if mine >= ROOT {
                return Err(format!(
                    "root has {ROOT} requests open already; try again in a moment"
                ));
            }
        } else {
            let others: usize = open.iter().filter(|(u, _)| **u != 0).map(|(_, n)| n).sum();
            if mine >= PER_UID {
                return Err(format!(
                    "uid {uid} has {PER_UID} requests open already; try again in a moment"
                ));
            }
            if others >= GLOBAL {
                return Err(format!(
                    "the agent serves {GLOBAL} requests already; try again in a moment"
                ));
            }
        }
        *open.entry(uid).or_insert(0) += 1;
        Ok(Slot {
            slots: self.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

fn accept_loop(listener: UnixListener, tx: Sender<Incoming>, wake: Arc<OwnedFd>, pidfd: bool) {
    let slots = Arc::new(Slots::default());
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Out of fds or memory: do not spin; the main loop is unaffected.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Ok(cred) =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        else {
            continue;
        };
        let slot = match slots.take(cred.uid()) {
            Ok(s) => s,
            Err(why) => {
                // Never wait on a refused client: whatever fits in the buffer, then close.
                let _ = stream.set_nonblocking(true);
                let _ = (&stream).write_all(&answer_line(&Response::Error { message: why }));
                continue;
            }
        };
        let (tx, wake) = (tx.clone(), wake.clone());
        let spawned = std::thread::Builder::new()
            .name("guardrail-client".into())
            .spawn(move || {
                let _slot = slot;
                serve_one(stream, cred, &tx, &wake, pidfd);
            });
        if spawned.is_err() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn serve_one(
    stream: UnixStream,
    cred: nix::sys::socket::UnixCredentials,
    tx: &Sender<Incoming>,
    wake: &OwnedFd,
    pidfd: bool,
) {
    let resp = match read_request(&stream, Instant::now() + REQUEST_DEADLINE) {
        Err(ReadError::Closed) => return,
        Err(ReadError::TooLong) => Response::Error {
            message: format!(
                "request longer than {} bytes; connection closed",
                ipc::MAX_REQUEST
            ),
        },
        Err(ReadError::Timeout) => Response::Error {
            message: format!(
                "no complete request line within {}s; connection closed",
                REQUEST_DEADLINE.as_secs()
            ),
        },
        Ok(line) => match ipc::decode_request(&line) {
            Err(e) => Response::Error {
                message: e.to_string(),
            },
            Ok(request) => {
                let peer = peer_of(&stream, &cred, pidfd);
                let (reply, answer) = mpsc::sync_channel(1);
                let sent = tx.send(Incoming {
                    request,
                    peer,
                    reply,
                });
                if sent.is_err() {
                    Response::Error {
                        message: "the agent is stopping".into(),
                    }
                } else {
                    let one: u64 = 1;
                    // SAFETY: writes 8 bytes from a local to our own eventfd.
                    unsafe { libc::write(wake.as_raw_fd(), (&raw const one).cast(), 8) };
                    answer.recv_timeout(ANSWER_WAIT).unwrap_or(Response::Error {
                        message: format!(
                            "the agent did not answer within {}s",
                            ANSWER_WAIT.as_secs()
                        ),
                    })
                }
            }
        },
    };
    let mut resp = resp;
    clip_response(&mut resp);
    write_answer(&stream, &answer_line(&resp), Instant::now() + SEND_DEADLINE);
}

#[derive(Debug, PartialEq, Eq)]
enum ReadError {
    /// The client closed without sending anything.
    Closed,
    TooLong,
    Timeout,
}

/// Reads one request line: up to and including the first newline, or everything up to EOF.
/// The deadline is for the whole line, however the client splits it.
fn read_request(stream: &UnixStream, deadline: Instant) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::Timeout);
        }
        if stream.set_read_timeout(Some(left)).is_err() {
            return Err(ReadError::Closed);
        }
        match (&*stream).read(&mut chunk) {
            Ok(0) if line.is_empty() => return Err(ReadError::Closed),
            Ok(0) => return Ok(line),
            Ok(n) => {
                let end = chunk[..n]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(n, |i| i + 1);
                line.extend_from_slice(&chunk[..end]);
                if line.len() > ipc::MAX_REQUEST {
                    return Err(ReadError::TooLong);
                }
                if end < n || line.ends_with(b"\n") {
                    return Ok(line);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Err(ReadError::Closed),
        }
    }
}

fn answer_line(resp: &Response) -> Vec<u8> {
    let mut out = serde_json::to_vec(resp).unwrap_or_else(|_| {
        br#"{"response":"error","message":"the answer could not be encoded"}"#.to_vec()
    });
    out.push(b'\n');
    out
}

/// Writes the answer until done or the deadline passes (a client that never reads loses its
/// answer, nothing more), then closes.
fn write_answer(stream: &UnixStream, out: &[u8], deadline: Instant) {
    let mut off = 0;
    while off < out.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_write_timeout(Some(left)).is_err() {
            break;
        }
        match (&*stream).write(&out[off..]) {
            Ok(0) => break,
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Cuts `s` to [`MAX_FIELD`] bytes (at a character boundary) and marks the cut with "…".
pub fn clip(s: &mut String) {
    if s.len() <= MAX_FIELD {
        return;
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

fn clip_holds(holds: &mut [HoldInfo]) {
    for h in holds {
        for f in [
            &mut h.command,
            &mut h.first_path,
            &mut h.reason,
            &mut h.user,
            &mut h.session,
            &mut h.rule,
        ] {
            clip(f);
        }
    }
}

/// Clips every field a job controls in an answer: a 180 KB command line must not turn
/// `guardrail status` into a 180 KB answer.
pub fn clip_response(resp: &mut Response) {
    match resp {
        Response::Status(s) => {
            clip_holds(&mut s.holds);
            for x in &mut s.sessions {
                clip(&mut x.origin);
            }
        }
        Response::Holds { holds, .. } => clip_holds(holds),
        Response::Done { message } | Response::Error { message } => {
            // Messages can quote what the client sent (a host name): bounded like a request.
            if message.len() > ipc::MAX_REQUEST {
                let mut end = ipc::MAX_REQUEST;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
                message.push('…');
            }
        }
    }
}

/// Supplementary groups of the peer at connect time (SO_PEERGROUPS, Linux 4.13+); empty if the
/// kernel cannot tell.
fn peer_groups(fd: RawFd) -> Vec<u32> {
    let mut buf: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..3 {
        let mut len = (buf.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `buf` has room for `len` bytes; the kernel writes at most that and sets len.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size_of::<libc::gid_t>();
        if rc == 0 {
            buf.truncate(n);
            return buf;
        }
        // ERANGE: len says how much room the list needs (NGROUPS_MAX is 65536).
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE)
            || n <= buf.len()
            || n > 65536
        {
            break;
        }
        buf.resize(n, 0);
    }
    Vec::new()
}

/// The peer's pidfd (SO_PEERPIDFD, Linux 6.5+): a handle on the very process that connected,
/// which a reused pid cannot impersonate.
fn peer_pidfd(fd: RawFd) -> std::io::Result<OwnedFd> {
    let mut pidfd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes one int (a new fd) into `pidfd`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&raw mut pidfd).cast(),
            &mut len,
        )
    };
    if rc != 0 || pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

/// Whether this kernel gives SO_PEERPIDFD (tried once on a socketpair of our own).
fn kernel_has_peer_pidfd() -> bool {
    UnixStream::pair().is_ok_and(|(a, _b)| peer_pidfd(a.as_raw_fd()).is_ok())
}

fn read_session(pid: i32) -> Result<u32, String> {
    std::fs::read_to_string(format!("/proc/{pid}/sessionid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| "cannot read the caller's audit session id".to_string())
}

/// The pid behind `pidfd` and its audit session. The pid comes from the pidfd's fdinfo; the
/// session from /proc/PID; then the pidfd must still be alive: a process alive after the read was
/// alive during it, so the pid was not yet free for reuse and /proc/PID was the caller.
fn session_through_pidfd(pidfd: &OwnedFd) -> Result<(i32, u32), String> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
        .map_err(|e| format!("reading the caller's pidfd: {e}"))?;
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .ok_or("the caller's pidfd names no pid")?;
    if pid <= 0 {
        return Err("the caller has exited".into());
    }
    let session = read_session(pid)?;
    // SAFETY: pidfd_send_signal with signal 0 only checks that the process exists.
    let alive = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    } == 0;
    if !alive {
        return Err("the caller exited while its session was read".into());
    }
    Ok((pid, session))
}

fn peer_of(stream: &UnixStream, cred: &nix::sys::socket::UnixCredentials, pidfd: bool) -> Peer {
    let fd = stream.as_raw_fd();
    let (pid, session) = if pidfd {
        match peer_pidfd(fd) {
            Ok(p) => match session_through_pidfd(&p) {
                Ok((pid, s)) => (pid, Ok(s)),
                Err(e) => (0, Err(e)),
            },
            Err(e) => (0, Err(format!("the caller's pidfd: {e}"))),
        }
    } else {
        // Kernels before 6.5: the pid at connect time, which may have been reused since.
        (cred.pid(), read_session(cred.pid()))
    };
    Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        groups: peer_groups(fd),
        pid,
        session,
    }
}

/// Who may do what: root or the `guardrail` group approve, deny and confirm; everyone else sees
/// their own jobs only. Also the per-uid limits on confirmations and on logged refusals.
pub struct Gate {
    group: Option<u32>,
    confirms: HashMap<u32, VecDeque<Instant>>,
    refusals_logged: HashMap<u32, VecDeque<Instant>>,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Gate {
    pub fn new() -> Gate {
        let mut g = Gate {
            group: None,
            confirms: HashMap::new(),
            refusals_logged: HashMap::new(),
        };
        g.refresh();
        g
    }

    /// Looks the group up again (start-up and every reload: an admin may have created it).
    pub fn refresh(&mut self) {
        self.group = nix::unistd::Group::from_name(ADMIN_GROUP)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
    }

    #[cfg(test)]
    fn with_group(gid: Option<u32>) -> Gate {
        Gate {
            group: gid,
            confirms: HashMap::new(),
            refusals_logged: HashMap::new(),
        }
    }

    /// Root, or a member of the `guardrail` group (primary or supplementary).
    pub fn is_admin(&self, p: &Peer) -> bool {
        p.uid == 0
            || self
                .group
                .is_some_and(|g| p.gid == g || p.groups.contains(&g))
    }

    /// The answer to a caller who may not `what` ("approve").
    pub fn refusal(&self, what: &str) -> String {
        let hint = if self.group.is_none() {
            format!(" (this host has no {ADMIN_GROUP} group)")
        } else {
            String::new()
        };
        format!("{what} needs root or membership of the {ADMIN_GROUP} group{hint}; nothing changed")
    }

    /// Counts a confirmation by `uid`, or says why it is one too many.
    pub fn take_confirm(&mut self, uid: u32, now: Instant) -> Result<(), String> {
        if !take(&mut self.confirms, uid, now, CONFIRMS_PER_PERIOD) {
            return Err(format!(
                "too many confirmations from uid {uid}: at most {CONFIRMS_PER_PERIOD} a minute; nothing confirmed"
            ));
        }
        Ok(())
    }

    /// Whether a refused request from `uid` is still worth an event log line (at most five a
    /// minute per uid, so refusals cannot flood the log).
    pub fn log_refusal(&mut self, uid: u32, now: Instant) -> bool {
        take(&mut self.refusals_logged, uid, now, 5)
    }
}

/// Sliding window of [`CONFIRM_PERIOD`]: records `now` for `uid` if fewer than `max` are in it.
fn take(map: &mut HashMap<u32, VecDeque<Instant>>, uid: u32, now: Instant, max: usize) -> bool {
    map.retain(|_, q| {
        while q
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= CONFIRM_PERIOD)
        {
            q.pop_front();
        }
        !q.is_empty()
    });
    let q = map.entry(uid).or_default();
    if q.len() >= max {
        return false;
    }
    q.push_back(now);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            groups: groups.to_vec(),
            pid: 0,
            session: Err("test".into()),
        }
    }

    #[test]
    fn admins_are_root_and_the_group_only() {
        let g = Gate::with_group(Some(990));
        assert!(g.is_admin(&peer(0, 0, &[])));
        assert!(g.is_admin(&peer(1000, 1000, &[27, 990])));
        assert!(g.is_admin(&peer(1000, 990, &[])));
        assert!(!g.is_admin(&peer(1000, 1000, &[27])));
        let none = Gate::with_group(None);
        assert!(!none.is_admin(&peer(1000, 1000, &[990])));
        assert_eq!(
            none.refusal("approve"),
            "approve needs root or membership of the guardrail group (this host has no guardrail group); nothing changed"
        );
    }

    #[test]
    fn confirms_are_limited_per_uid_per_minute() {
        let mut g = Gate::with_group(None);
        let t = Instant::now();
        for _ in 0..CONFIRMS_PER_PERIOD {
            assert!(g.take_confirm(1000, t).is_ok());
        }
        assert!(g.take_confirm(1000, t).is_err());
        assert!(g.take_confirm(1001, t).is_ok(), "other uids keep theirs");
        assert!(g.take_confirm(1000, t + CONFIRM_PERIOD).is_ok());
    }

    #[test]
    fn slots_cap_each_uid_and_everyone_but_root() {
        let s = Arc::new(Slots::default());
        let mine: Vec<Slot> = (0..PER_UID).map(|_| s.take(1000).expect("slot")).collect();
        assert!(s.take(1000).is_err());
        drop(mine);
        assert!(s.take(1000).is_ok(), "slots come back when connections end");
        let many: Vec<Slot> = (0..GLOBAL as u32)
            .map(|i| s.take(2000 + i / PER_UID as u32).expect("slot"))
            .collect();
        assert!(s.take(5000).is_err(), "global cap");
        let root: Vec<Slot> = (0..ROOT).map(|_| s.take(0).expect("root slot")).collect();
        assert!(s.take(0).is_err());
        drop((many, root));
    }

    #[test]
    fn clip_cuts_long_fields_at_a_character() {
        let mut s = "é".repeat(400);
        clip(&mut s);
        assert!(s.len() <= MAX_FIELD + "…".len());
        assert!(s.ends_with('…'));
        let mut short = "rm -rf x".to_string();
        clip(&mut short);
        assert_eq!(short, "rm -rf x");
    }

    #[test]
    fn a_request_needs_a_line_within_the_deadline_and_the_cap() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        b.write_all(b"{\"request\":\"status\"}\n{\"more\"")
            .expect("write");
        assert_eq!(
            read_request(&a, Instant::now() + Duration::from_secs(1)),
            Ok(b"{\"request\":\"status\"}\n".to_vec())
        );

        let (a, mut b) = UnixStream::pair().expect("pair");
        b.write_all(b"{\"request\"").expect("write");
        let t = Instant::now();
        assert_eq!(
            read_request(&a, t + Duration::from_millis(300)),
            Err(ReadError::Timeout)
        );
        assert!(t.elapsed() < Duration::from_secs(1));

        let (a, mut b) = UnixStream::pair().expect("pair");
        let writer = std::thread::spawn(move || {
            let _ = b.write_all(&vec![b'x'; 64 * 1024]);
        });
        assert_eq!(
            read_request(&a, Instant::now() + Duration::from_secs(5)),
            Err(ReadError::TooLong)
        );
        drop(a);
        let _ = writer.join();

        let (a, b) = UnixStream::pair().expect("pair");
        drop(b);
        assert_eq!(
            read_request(&a, Instant::now() + Duration::from_secs(1)),
            Err(ReadError::Closed)
        );
    }

    #[test]
    fn the_kernel_gives_our_own_session_through_a_pidfd() {
        if !kernel_has_peer_pidfd() {
            return;
        }
        let (a, _b) = UnixStream::pair().expect("pair");
        let p = peer_pidfd(a.as_raw_fd()).expect("pidfd");
        let (pid, session) = session_through_pidfd(&p).expect("session");
        assert_eq!(pid, std::process::id() as i32);
        assert_eq!(Ok(session), read_session(pid));
    }
}
