//! Deletion events (kernel → agent ring buffer): kinds, flags, the record and operations.

/// A job crossed its budget (held, blocked or, in audit, would have been).
pub const EV_BUDGET_CROSSED: u32 = 1;
/// Deletion of a protected root refused (LSM) or observed (tracepoint).
pub const EV_PROTECTED_ROOT: u32 = 2;
/// Deletion in a data directory by a job not named for it.
pub const EV_DATA_DIR: u32 = 3;
/// A held job tried to delete again (it was resumed without approval).
pub const EV_HELD_RETRY: u32 = 4;
/// Answer of the offsets self-test program.
pub const EV_SELFTEST: u32 = 5;

/// The event was observed by the tracepoint tier (it could not refuse, only stop).
pub const EVF_TRACEPOINT: u32 = 1 << 0;
/// The operation was refused in the kernel (LSM tier).
pub const EVF_REFUSED: u32 = 1 << 1;
/// Audit mode: nothing was refused or stopped.
pub const EVF_AUDIT: u32 = 1 << 2;
/// A stop signal was sent from the kernel.
pub const EVF_SIGNALLED: u32 = 1 << 3;
/// The deletion came through io_uring (no path is known in the tracepoint tier).
pub const EVF_IO_URING: u32 = 1 << 4;
/// Seen from userspace after the deletion happened (the `userspace` tier: fanotify or inotify);
/// any stop was sent by the agent, later than a kernel tier would have.
pub const EVF_USERSPACE: u32 = 1 << 5;
/// The job was inferred, not reported by the kernel: inotify names no process, and a process may
/// exit before the agent reads who it was. `pgid`/`sid` are a guess (or 0: nobody).
pub const EVF_GUESSED: u32 = 1 << 6;
/// The crossing is under an `alert` rule: reported, nothing stopped.
pub const EVF_ALERT: u32 = 1 << 7;
/// The job is in a `deletion.never_hold` unit (its cgroup or an ancestor is in `NEVER_HOLD`): the
/// kernel did not stop it. LSM tier: refused from here on for the rest of that job; other tiers:
/// reported, and the job deletes on without a budget.
pub const EVF_NEVER_HOLD: u32 = 1 << 8;

/// The crossing is a level's, not the job's own budget: the job's login session
/// ([`LEVEL_SESSION`](crate::LEVEL_SESSION)), its service's unit ([`LEVEL_UNIT`](crate::LEVEL_UNIT)) or the user who logged in
/// ([`LEVEL_USER`](crate::LEVEL_USER)). `count` is then the level's count and `data_dir_id` the number of jobs it
/// counted (unless [`EVF_NEVER_HOLD`] is set too).
pub const EVF_LEVEL_SESSION: u32 = 1 << 9;
pub const EVF_LEVEL_UNIT: u32 = 1 << 10;
pub const EVF_LEVEL_USER: u32 = 1 << 11;
/// With `EV_HELD_RETRY`: the held job resumed itself `SELF_RESUME_LIMIT` times; the kernel sent
/// SIGKILL to the task and blocked the job (tracepoint tier). (Bits 9-11 are left to the
/// budgets-above-the-job work, which numbers its level flags there.)
pub const EVF_KILLED: u32 = 1 << 12;
/// With a crossing (`EV_BUDGET_CROSSED`, `EV_DATA_DIR`): the kernel blocked the job there (a
/// `block` action), it did not hold it. A job found blocked whose crossing lacks this flag was held
/// and then killed for resuming itself (tracepoint tier) before the agent read the crossing.
pub const EVF_BLOCKED: u32 = 1 << 13;

/// Path components carried by an event (innermost first), each up to `NAME_LEN` bytes.
pub const EVENT_PATH_DEPTH: usize = 6;
pub const NAME_LEN: usize = 48;

/// What the kernel tells the agent, on state changes only (never one per deleted file).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub kind: u32,
    pub flags: u32,
    pub rule: u32,
    /// The data directory's index for `EV_DATA_DIR`; with [`EVF_NEVER_HOLD`], the never_hold
    /// unit's index in the policy's list (the value of its `NEVER_HOLD` entry), so the agent names
    /// the unit even when the job has exited before the event is read.
    pub data_dir_id: u32,
    pub tgid: u32,
    pub pid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub uid: u32,
    /// Audit login uid (u32::MAX when unset).
    pub loginuid: u32,
    /// Audit session id (u32::MAX when unset): the login session the job came from.
    pub audit_session: u32,
    /// Syscall or LSM hook that saw it (`OP_*`).
    pub op: u32,
    pub count: u64,
    pub incident: u64,
    pub cgroup_id: u64,
    pub ktime_ns: u64,
    pub comm: [u8; 16],
    /// Names of the entry and its parents, innermost first, NUL-padded.
    pub path: [[u8; NAME_LEN]; EVENT_PATH_DEPTH],
}

impl Event {
    pub const fn zeroed() -> Self {
        Event {
            kind: 0,
            flags: 0,
            rule: 0,
            data_dir_id: 0,
            tgid: 0,
            pid: 0,
            pgid: 0,
            sid: 0,
            uid: 0,
            loginuid: 0,
            audit_session: 0,
            op: 0,
            count: 0,
            incident: 0,
            cgroup_id: 0,
            ktime_ns: 0,
            comm: [0; 16],
            path: [[0; NAME_LEN]; EVENT_PATH_DEPTH],
        }
    }
}

pub const OP_UNLINK: u32 = 1;
pub const OP_RMDIR: u32 = 2;
pub const OP_RENAME: u32 = 3;
pub const OP_IO_URING_UNLINK: u32 = 4;
pub const OP_IO_URING_RENAME: u32 = 5;
