//! Who forked whom, from the kernel's process events connector (netlink `NETLINK_CONNECTOR`,
//! `CN_IDX_PROC`), for the userspace tier.
//!
//! fanotify names the deleting process by pid, and the tier turns a pid into a job by reading
//! /proc. A worker that deleted its share and exited before the watcher read its events has no
//! /proc entry any more: without more, its deletions count for nobody's job, and a runaway made of
//! short-lived forked workers (`xargs -P`, a script forking one `rm` per file, a program forking
//! workers) runs to the end whenever the watcher is not scheduled for a while. The connector
//! queues one message per fork in our socket as it happens, so the parent of an exited worker
//! is still known; its nearest live ancestor is the best guess of the job (a non-interactive
//! shell or program keeps its children in its process group).
//!
//! Needs CAP_NET_ADMIN in the initial network namespace (the agent runs as root); without it the
//! tier works as before and says so.
use std::{
    collections::{HashMap, VecDeque},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// `CN_IDX_PROC` / `CN_VAL_PROC` (linux/connector.h).
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
/// `PROC_CN_MCAST_LISTEN` (linux/cn_proc.h).
const PROC_CN_MCAST_LISTEN: u32 = 1;
/// `PROC_EVENT_FORK`.
const PROC_EVENT_FORK: u32 = 0x1;
/// `PROC_EVENT_SID`: a process made itself a session leader (setsid).
const PROC_EVENT_SID: u32 = 0x80;

const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
/// Offset of `struct proc_event` in a datagram, and of its union (after `what`, `cpu` and the
/// 8-aligned `timestamp_ns`).
const EVENT_AT: usize = NLMSG_HDRLEN + CN_MSG_LEN;
const UNION_AT: usize = EVENT_AT + 16;

/// Forks remembered, oldest forgotten first: a runaway's workers are a handful of recent ones.
const REMEMBERED: usize = 65536;
/// Receive buffer asked for: room for tens of thousands of forks while the watcher is busy.
const RCVBUF: libc::c_int = 16 << 20;

/// What the connector told us about one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Born {
    parent: u32,
    /// It called setsid(): it left its parent's session and process group.
    own_session: bool,
}

pub struct ForkLog {
    sock: OwnedFd,
    born: HashMap<u32, Born>,
    order: VecDeque<u32>,
    /// Times the socket overflowed (ENOBUFS): forks were lost.
    lost: u64,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl ForkLog {
    /// Subscribes to process events.
    pub fn open() -> std::io::Result<ForkLog> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_CONNECTOR,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // Best effort: FORCE needs CAP_NET_ADMIN, the plain one is capped by rmem_max.
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt with an int value of the right size.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&RCVBUF as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
        }
        // SAFETY: zeroed sockaddr_nl is valid; we fill the fields we need.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = CN_IDX_PROC;
        // SAFETY: binding our socket to a valid sockaddr_nl of the given size.
        if unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // nlmsghdr + cn_msg + the operation.
        let len = NLMSG_HDRLEN + CN_MSG_LEN + 4;
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len of the data
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: sending our own buffer of its length on our socket (to the kernel: no address
        // needed, the socket is bound and the kernel is the default peer).
        if unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ForkLog {
            sock,
            born: HashMap::new(),
            order: VecDeque::new(),
            lost: 0,
        })
    }

    /// Reads every message queued so far.
    pub fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: receiving into our own buffer of its length.
            let n =
                unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::ENOBUFS) => {
                        self.lost += 1;
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => return,
                }
            }
            if n == 0 {
                return;
            }
            self.parse(&buf[..n as usize]);
        }
    }

    /// One datagram: netlink messages, each a cn_msg carrying one proc_event.
    fn parse(&mut self, mut b: &[u8]) {
        while b.len() >= NLMSG_HDRLEN {
            let Some(len) = u32_at(b, 0).map(|l| l as usize) else {
                return;
            };
            if len < NLMSG_HDRLEN || len > b.len() {
                return;
            }
            self.event(&b[..len]);
            // NLMSG_ALIGN: messages start on 4-byte boundaries.
            let next = (len + 3) & !3;
            b = b.get(next..).unwrap_or(&[]);
        }
    }

    fn event(&mut self, m: &[u8]) {
        if u32_at(m, NLMSG_HDRLEN) != Some(CN_IDX_PROC) {
            return;
        }
        match u32_at(m, EVENT_AT) {
            Some(PROC_EVENT_FORK) => {
                // parent_pid, parent_tgid, child_pid, child_tgid
                let (Some(parent_tgid), Some(child_pid), Some(child_tgid)) = (
                    u32_at(m, UNION_AT + 4),
                    u32_at(m, UNION_AT + 8),
                    u32_at(m, UNION_AT + 12),
                ) else {
                    return;
                };
                if child_pid == child_tgid && child_tgid != parent_tgid {
                    self.remember(
                        child_tgid,
                        Born {
                            parent: parent_tgid,
                            own_session: false,
                        },
                    );
                }
            }
            Some(PROC_EVENT_SID) => {
                // process_pid, process_tgid
                if let Some(tgid) = u32_at(m, UNION_AT + 4)
                    && let Some(b) = self.born.get_mut(&tgid)
                {
                    b.own_session = true;
                }
            }
            _ => {}
        }
    }

    fn remember(&mut self, tgid: u32, born: Born) {
        // A reused pid: the newest fork is the one that counts.
        if self.born.insert(tgid, born).is_none() {
            self.order.push_back(tgid);
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.born.remove(&old);
            }
        }
    }

    /// The ancestors of `tgid` the connector saw being forked, nearest first, up to the first one
    /// forked before we listened. Stops at a process that called setsid (it left its parent's
    /// job: its parent is not its job).
    pub fn ancestors(&self, tgid: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut p = tgid;
        for _ in 0..16 {
            match self.born.get(&p) {
                Some(b) if !b.own_session => {
                    out.push(b.parent);
                    p = b.parent;
                }
                _ => break,
            }
        }
        out
    }

    /// Times forks were lost to a full socket.
    pub fn lost(&self) -> u64 {
        self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fork_msg(parent_tgid: u32, child_pid: u32, child_tgid: u32) -> Vec<u8> {
        let mut m = vec![0u8; UNION_AT + 16];
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].copy_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m[EVENT_AT..EVENT_AT + 4].copy_from_slice(&PROC_EVENT_FORK.to_ne_bytes());
        m[UNION_AT..UNION_AT + 4].copy_from_slice(&parent_tgid.to_ne_bytes());
        m[UNION_AT + 4..UNION_AT + 8].copy_from_slice(&parent_tgid.to_ne_bytes());
        m[UNION_AT + 8..UNION_AT + 12].copy_from_slice(&child_pid.to_ne_bytes());
        m[UNION_AT + 12..UNION_AT + 16].copy_from_slice(&child_tgid.to_ne_bytes());
        m
    }

    fn sid_msg(tgid: u32) -> Vec<u8> {
        let mut m = fork_msg(0, 0, 0);
        m[EVENT_AT..EVENT_AT + 4].copy_from_slice(&PROC_EVENT_SID.to_ne_bytes());
        m[UNION_AT..UNION_AT + 4].copy_from_slice(&tgid.to_ne_bytes());
        m[UNION_AT + 4..UNION_AT + 8].copy_from_slice(&tgid.to_ne_bytes());
        m
    }

    fn empty() -> ForkLog {
        ForkLog {
            // Any fd: parse() never touches it.
            sock: std::fs::File::open("/dev/null").expect("/dev/null").into(),
            born: HashMap::new(),
            order: VecDeque::new(),
            lost: 0,
        }
    }

    #[test]
    fn parses_forks_threads_and_setsid() {
        let mut f = empty();
        // Two messages in one datagram: sh 100 forks 200, 200 forks worker 300.
        let mut d = fork_msg(100, 200, 200);
        d.extend(fork_msg(200, 300, 300));
        f.parse(&d);
        // A thread of 300 is no new process.
        f.parse(&fork_msg(300, 301, 300));
        assert_eq!(f.ancestors(300), vec![200, 100]);
        assert_eq!(f.ancestors(301), Vec::<u32>::new());
        // 200 calls setsid: its children are no longer in 100's job.
        f.parse(&sid_msg(200));
        assert_eq!(f.ancestors(300), vec![200]);
    }

    #[test]
    fn the_real_connector_reports_our_own_forks() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the process events connector needs root; run the tests through `cargo xtask test` as root"
        );
        let mut f = ForkLog::open().expect("subscribe to the proc connector as root");
        // A child that forks a grandchild; both exit at once.
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", "/bin/true & echo $!; wait"])
            .output()
            .expect("run sh");
        let grandchild: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("pid");
        f.drain();
        let up = f.ancestors(grandchild);
        assert!(
            up.first().is_some_and(|p| *p != grandchild) && up.get(1) == Some(&std::process::id()),
            "ancestors of {grandchild}: {up:?} (we are {})",
            std::process::id()
        );
    }
}
