//! Types shared by guardrail's kernel programs and its userspace.
//!
//! Everything that crosses the kernel/user boundary is `#[repr(C)]`, made only of fixed-width
//! integers and byte arrays (no `bool`, no `Option`, no enums), and padded explicitly so that the
//! layout is the same for `bpfel-unknown-none` and `x86_64-unknown-linux-gnu`. `tests/layout.rs`
//! pins every size and offset.
//!
//! The pure decision functions at the bottom ([`scope_step`], [`over_budget`]) are compiled into
//! the kernel programs *and* used by `guardrail policy explain`, so that what explain prints is
//! what the kernel decides.
#![no_std]

/// Number of job rules a policy may hold. Rule 0 is the default rule (the global budget and
/// targets); rule ids index bit masks in [`DirRule`], so this is the width of a `u64`.
pub const MAX_RULES: u32 = 64;

/// How many ancestors of a deleted entry the kernel walks looking for a declared directory.
/// Deeper entries are judged by their nearest 64 ancestors (the filesystem root is usually far
/// closer).
pub const MAX_ANCESTORS: u32 = 64;

/// Policy tables are double-buffered: the agent fills the inactive slot, then flips
/// [`Config::active_slot`], so no deletion is ever judged against a half-written policy.
pub const POLICY_SLOTS: u32 = 2;

// --- directory table -------------------------------------------------------------------------

/// Below this directory, deletions by jobs whose rule bit is in [`DirRule::target_rules`] are free.
pub const DIR_TARGET: u32 = 1 << 0;
/// Below this directory, only jobs whose rule bit is in [`DirRule::data_owner_rules`] may delete;
/// everybody else is refused from the first file.
pub const DIR_DATA: u32 = 1 << 1;
/// This entry itself may never be deleted or renamed away (its contents are judged as usual).
pub const DIR_PROTECTED_ROOT: u32 = 1 << 2;

/// Key of a declared directory: the kernel's identity of the inode (not its path), so bind
/// mounts, symlinks and chroots cannot dodge a rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirKey {
    /// `super_block.s_dev` in the kernel's internal encoding (`major << 20 | minor`), which is
    /// not `st_dev` as userspace sees it: see [`kernel_dev_from_user`].
    pub dev: u64,
    pub ino: u64,
    /// Which policy slot this entry belongs to (0 or 1).
    pub slot: u32,
    pub _pad: u32,
}

/// What the policy says about one directory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirRule {
    /// `DIR_*` bits.
    pub kind: u32,
    /// Index of the data directory in the policy (for messages), valid when `DIR_DATA` is set.
    pub data_dir_id: u32,
    /// Bit `r` set: this directory is a deletion target for jobs under rule `r`.
    pub target_rules: u64,
    /// Bit `r` set: jobs under rule `r` are named for this data directory and may delete in it.
    pub data_owner_rules: u64,
}

// --- rules -----------------------------------------------------------------------------------

/// Stop the job (SIGSTOP) and wait for an admin.
pub const ACTION_HOLD: u32 = 0;
/// Refuse (LSM) or kill (tracepoint tier) and alert, without waiting for anyone.
pub const ACTION_BLOCK: u32 = 1;
/// Count and alert only.
pub const ACTION_ALERT: u32 = 2;
/// Package managers and cleaners: no budget, but protected roots and foreign data directories
/// still refuse them.
pub const ACTION_EXEMPT: u32 = 3;

/// The rule is in audit mode: decisions are reported as "would have", nothing is refused.
pub const RULE_FLAG_AUDIT: u32 = 1 << 0;

/// Parameters of one job rule, in an array indexed by `slot * MAX_RULES + rule`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleParams {
    /// Deletions outside the rule's targets allowed per window.
    pub budget: u64,
    /// Length of the sliding window in nanoseconds.
    pub window_ns: u64,
    /// `ACTION_*`.
    pub action: u32,
    /// `RULE_FLAG_*`.
    pub flags: u32,
}

/// Key of the executable → rule table: the executable file's identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExeKey {
    pub dev: u64,
    pub ino: u64,
    pub slot: u32,
    pub _pad: u32,
}

/// Key of the cgroup (systemd unit) → rule table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub cgroup_id: u64,
    pub slot: u32,
    pub _pad: u32,
}

/// How many cgroup levels below the root the kernel looks at when it matches a job's cgroup
/// against units (`CGROUPS`, `NEVER_HOLD`): a unit at level 2 (`system.slice/x.service`) with
/// `Delegate=yes` sub-cgroups down to this level all count as the unit.
pub const MAX_CGROUP_LEVELS: i32 = 8;

/// Key of the uid → rule table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UidKey {
    pub uid: u32,
    pub slot: u32,
}

// --- global configuration --------------------------------------------------------------------

/// Whether a task whose thread group leader started at `start_ns` (`start_boottime`) with
/// `tgid` is the agent the configuration names: the tgid and the start time must both match, so
/// a process that inherits a dead agent's pid is not exempt.
#[inline(always)]
pub fn is_agent(tgid: u32, start_ns: u64, agent_tgid: u32, lo: u64, hi: u64) -> bool {
    agent_tgid != 0 && tgid == agent_tgid && start_ns != 0 && lo <= start_ns && start_ns < hi
}

/// Global mode: enforce.
pub const MODE_ENFORCE: u32 = 0;
/// Global mode: audit (nothing refused or stopped anywhere).
pub const MODE_AUDIT: u32 = 1;

/// The one element of the `CONFIG` array map, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Which policy slot is in force.
    pub active_slot: u32,
    /// `MODE_*`.
    pub mode: u32,
    /// The agent's own tgid: its deletions (state files) are never counted.
    pub agent_tgid: u32,
    /// Non-zero once a policy has been written: until then the kernel side allows everything
    /// (the agent writes the policy before it attaches, so this is a belt to the braces).
    pub policy_loaded: u32,
    /// Monotonic incident counter base; the kernel adds to `INCIDENTS` on each new hold.
    pub incident_base: u64,
    /// The agent's identity besides its tgid: its start time (`task_struct.start_boottime` of
    /// the thread group leader, ns) lies in `[agent_start_lo, agent_start_hi)`. A process that
    /// later gets a dead agent's pid started after it and is judged like any other. Both 0: no
    /// process is the agent.
    pub agent_start_lo: u64,
    pub agent_start_hi: u64,
}

// --- jobs ------------------------------------------------------------------------------------

/// A job is a process group within its session: what a shell calls a job. Both numbers are
/// global (initial pid namespace) so the agent can signal the group with `kill(-pgid)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey {
    pub sid: u32,
    pub pgid: u32,
}

/// Counting freely.
pub const JOB_ACTIVE: u32 = 0;
/// Crossed its budget under a `hold` rule: deletions outside scope are refused (LSM) or the job is
/// re-stopped (tracepoint) until an admin answers.
pub const JOB_HELD: u32 = 1;
/// Denied by an admin or by the hold timeout: refused until it ends.
pub const JOB_DENIED: u32 = 2;
/// Crossed its budget under a `block` rule: refused, never resumed.
pub const JOB_BLOCKED: u32 = 3;

/// Deletions a held job may make without approval in the tracepoint tier, which cannot refuse
/// them: each is let through and re-stops the job (SIGSTOP); the one that reaches this many (a
/// sibling looping `kill -CONT`, a ptracer swallowing SIGSTOP) gets SIGKILL and blocks the job.
/// So at most this many files go after the hold, per task deleting at that moment. The LSM tier
/// refuses every deletion of a held job and never needs it.
pub const SELF_RESUME_LIMIT: u64 = 8;

/// `JobState::allowance` value meaning "approved for the rest of the job".
pub const ALLOWANCE_UNLIMITED: u64 = u64::MAX / 4;

/// Per-job counters, in an LRU hash keyed by [`JobKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobState {
    /// `JOB_*`; changed with compare-and-swap so exactly one CPU reports a crossing.
    pub state: u32,
    /// The rule the job was judged under when it first deleted.
    pub rule: u32,
    /// Start of the current window (bpf_ktime_get_ns).
    pub window_start_ns: u64,
    /// Deletions counted in the current window (atomic add).
    pub count: u64,
    /// Deletions counted in the previous window, for the sliding estimate.
    pub prev_count: u64,
    /// Extra deletions granted by `guardrail approve --budget N`.
    pub allowance: u64,
    /// Attempts refused (or re-stopped) while held, denied or blocked.
    pub refused: u64,
    /// Total deletions counted over the job's life (never reset by the window).
    pub total: u64,
    /// Incident id assigned by the kernel at the crossing (0: none).
    pub incident: u64,
    /// Highest sliding-window estimate seen: what a replay compares with a candidate budget.
    pub peak: u64,
    /// Who the job was when it first deleted (for job summaries and replays).
    pub cgroup_id: u64,
    pub first_ns: u64,
    pub uid: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
    /// `CLOCK_BOOTTIME` (ns) when the job crossed its budget and was held or blocked (0: never):
    /// the hold's start, kept across agent restarts, and the age a job's processes must exceed
    /// to be the job that was held (a reused process group id is younger).
    pub held_ns: u64,
}

/// Capacity of the `JOBS` LRU map (counters of every job that deleted outside scope).
pub const JOBS_CAPACITY: u32 = 16384;
/// Capacity of the `HELD` map. Held, denied and blocked jobs are also kept there, in a plain
/// hash the kernel never evicts from: a flood of new jobs may push a held job's counters out of
/// the LRU map `JOBS`, but not the fact that it is held. The agent removes jobs that ended.
pub const HELD_CAPACITY: u32 = 4096;

/// Value of the `HELD` map (keyed by [`JobKey`]): what the kernel restores into a job's `JOBS`
/// entry when it finds it missing or active while this says otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldJob {
    /// `JOB_HELD`, `JOB_DENIED` or `JOB_BLOCKED`.
    pub state: u32,
    pub rule: u32,
    pub incident: u64,
    /// As [`JobState::held_ns`].
    pub held_ns: u64,
}

/// Key of the `REFUSALS` map: refusals of one kind (`EV_PROTECTED_ROOT`, `EV_DATA_DIR`) for one
/// job, counted so that the kernel reports the 1st, 2nd, 3rd, 5th, 9th, ... (powers of two),
/// never one event per refused file.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RefusalKey {
    pub sid: u32,
    pub pgid: u32,
    pub kind: u32,
    pub _pad: u32,
}

// --- budgets above the job ------------------------------------------------------------------

/// Levels a deletion is also counted at, besides its job (index into `LEVEL_PARAMS`, per slot).
/// A job runs either in a login session (audit session id set) or, with none, as a service: a
/// login session's deletions count for the session and for the user who logged in; a service's
/// for its unit.
pub const LEVEL_SESSION: u32 = 0;
/// A service (no audit session): its unit, i.e. its cgroup two levels below the root
/// (`system.slice/x.service`). A task in a shallower cgroup (the root, a slice) has no unit and
/// is budgeted per job only.
pub const LEVEL_UNIT: u32 = 1;
/// The user who logged in (audit login uid, which `su` and `sudo` do not change), across all
/// their sessions.
pub const LEVEL_USER: u32 = 2;
/// Number of levels.
pub const LEVELS: u32 = 3;

/// `RuleParams::flags` of a `LEVEL_PARAMS` entry: the level is counted and enforced. An entry
/// without it (all zero: never written) counts nothing, so a missing entry never holds anyone.
pub const LEVEL_FLAG_ON: u32 = 1 << 1;
/// `RuleParams::flags` of a job rule: its jobs are not counted at any level above the job
/// (`shared_budgets = false` in the policy).
pub const RULE_FLAG_NO_LEVELS: u32 = 1 << 2;

/// Capacity of the `LEVEL_COUNTS` LRU map.
pub const LEVEL_CAPACITY: u32 = 16384;

/// Key of the `LEVEL_COUNTS` map: one session, unit or user.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LevelKey {
    /// Audit session id, cgroup id or login uid.
    pub id: u64,
    /// `LEVEL_*`.
    pub level: u32,
    pub _pad: u32,
}

/// Counters of one level entry (LRU: evicting one forgets counts, never a hold, which lives in
/// the job's `HELD` entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LevelState {
    /// Start of the current window (bpf_ktime_get_ns).
    pub window_start_ns: u64,
    /// Deletions counted in the current window (atomic add).
    pub count: u64,
    /// Deletions counted in the previous window, for the sliding estimate.
    pub prev_count: u64,
    /// Jobs that began deleting outside scope in the current window, and in the previous one
    /// (for the incident's "across N jobs").
    pub jobs: u64,
    pub prev_jobs: u64,
    /// Non-zero once an `alert` crossing of this window was reported (one alert per window, not
    /// one per job).
    pub reported: u64,
}

/// What the level check returns to the judge, packed into one register (the judge's stack has
/// no room for a struct): 0 when no level crossed, else the level + 1 in bits 0-1, its action in
/// bits 2-3, the jobs count in bits 4-31 and the level's sliding count in bits 32-63.
#[inline(always)]
pub const fn level_hit_pack(level: u32, action: u32, jobs: u64, count: u64) -> u64 {
    let jobs = if jobs > 0x0fff_ffff {
        0x0fff_ffff
    } else {
        jobs
    };
    let count = if count > 0xffff_ffff {
        0xffff_ffff
    } else {
        count
    };
    ((level as u64 + 1) & 3) | ((action as u64 & 3) << 2) | (jobs << 4) | (count << 32)
}

/// `(level, action, jobs, count)` of a packed level hit; `None` for 0.
#[inline(always)]
pub const fn level_hit_unpack(hit: u64) -> Option<(u32, u32, u64, u64)> {
    if hit & 3 == 0 {
        return None;
    }
    Some((
        (hit & 3) as u32 - 1,
        ((hit >> 2) & 3) as u32,
        (hit >> 4) & 0x0fff_ffff,
        hit >> 32,
    ))
}

/// The event flag naming the level that crossed (`EVF_LEVEL_*`).
#[inline(always)]
pub const fn level_event_flag(level: u32) -> u32 {
    match level {
        LEVEL_SESSION => EVF_LEVEL_SESSION,
        LEVEL_UNIT => EVF_LEVEL_UNIT,
        _ => EVF_LEVEL_USER,
    }
}

// --- events ----------------------------------------------------------------------------------

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
/// ([`LEVEL_SESSION`]), its service's unit ([`LEVEL_UNIT`]) or the user who logged in
/// ([`LEVEL_USER`]). `count` is then the level's count and `data_dir_id` the number of jobs it
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

// --- kernel struct offsets, resolved from BTF at load time -----------------------------------

/// Byte offsets of the kernel struct fields the programs read, resolved by the agent from
/// /sys/kernel/btf/vmlinux and passed as a read-only global. Rust-built BPF has no CO-RE
/// relocations, so nothing here may be a compile-time constant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_tgid: u32,
    pub task_pid: u32,
    pub task_loginuid: u32,
    pub task_sessionid: u32,
    pub task_signal: u32,
    pub task_fs: u32,
    pub task_files: u32,
    pub task_mm: u32,
    pub task_real_parent: u32,
    /// `signal_struct.pids` (array of `struct pid *` indexed by `enum pid_type`).
    pub signal_pids: u32,
    /// `enum pid_type` values.
    pub pidtype_pgid: u32,
    pub pidtype_sid: u32,
    /// `struct pid.numbers[0].nr` (the initial namespace's number).
    pub pid_numbers_nr: u32,
    pub fs_pwd: u32,
    pub fs_root: u32,
    pub path_dentry: u32,
    pub path_mnt: u32,
    pub files_fdt: u32,
    pub fdt_fd: u32,
    pub fdt_max_fds: u32,
    pub file_f_path: u32,
    pub file_f_inode: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_inode: u32,
    /// `dentry.d_name.name`
    pub dentry_d_name_name: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub sb_s_dev: u32,
    pub mm_exe_file: u32,
    /// Offset of the `opcode` field in the io_uring submit tracepoint's record (0: absent).
    pub io_uring_opcode: u32,
    /// Non-zero once filled in; programs do nothing while it is zero.
    pub valid: u32,
    /// `task_struct.flags` (PF_KTHREAD, PF_IO_WORKER).
    pub task_flags: u32,
    /// `task_struct.group_leader`
    pub task_group_leader: u32,
    /// `task_struct.start_boottime` (0: the kernel has none; then no process counts as the
    /// agent).
    pub task_start_boottime: u32,
    /// `task_struct.cred` (the subjective credentials)
    pub task_cred: u32,
    /// `cred.euid`
    pub cred_euid: u32,
}

/// Offsets the deletion guard reads to tell pseudo filesystems (cgroupfs, sysfs, proc, bpffs,
/// devtmpfs...) from real ones, resolved from BTF like [`KernelOffsets`] (a separate read-only
/// global, so that struct's layout does not change).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsOffsets {
    /// `super_block.s_magic` (an `unsigned long`).
    pub sb_s_magic: u32,
    /// `super_block.s_type`: devtmpfs shares tmpfs's (or ramfs's) magic and is told apart by its
    /// type's name.
    pub sb_s_type: u32,
    /// `file_system_type.name`
    pub fstype_name: u32,
    /// Non-zero once filled in; nothing is taken for a pseudo filesystem while it is zero.
    pub valid: u32,
}

/// Superblock magics of the pseudo filesystems whose entries are kernel objects, not data:
/// removing an empty cgroup (systemd does at every unit stop), a sysfs or configfs object, a bpffs
/// pin is never counted as a deletion. Values from include/uapi/linux/magic.h.
pub const PSEUDO_FS_MAGICS: [u64; 9] = [
    0x6367_7270, // CGROUP2_SUPER_MAGIC
    0x0027_e0eb, // CGROUP_SUPER_MAGIC
    0x6265_6572, // SYSFS_MAGIC
    0x9fa0,      // PROC_SUPER_MAGIC
    0xcafe_4a11, // BPF_FS_MAGIC
    0x6462_6720, // DEBUGFS_MAGIC
    0x7472_6163, // TRACEFS_MAGIC
    0x7363_6673, // SECURITYFS_MAGIC
    0x6265_6570, // CONFIGFS_MAGIC
];
/// tmpfs and ramfs: devtmpfs is one of them underneath, named `devtmpfs` in its `s_type`.
pub const TMPFS_MAGIC: u64 = 0x0102_1994;
pub const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// Whether a superblock magic is one of [`PSEUDO_FS_MAGICS`].
#[inline(always)]
pub fn is_pseudo_fs_magic(magic: u64) -> bool {
    let mut i = 0;
    while i < PSEUDO_FS_MAGICS.len() {
        if PSEUDO_FS_MAGICS[i] == magic {
            return true;
        }
        i += 1;
    }
    false
}

/// The self-test program's answer: values read through the resolved offsets, compared by the
/// agent with what /proc says about the same task.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelftestAnswer {
    pub tgid: u32,
    pub pid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub loginuid: u32,
    pub sessionid: u32,
    pub cwd_dev: u64,
    pub cwd_ino: u64,
    pub exe_dev: u64,
    pub exe_ino: u64,
    /// Number of answers written (the program bumps it).
    pub hits: u64,
}

// --- conversions -----------------------------------------------------------------------------

/// Converts `st_dev` as userspace sees it (glibc `makedev` encoding) into the kernel's internal
/// `dev_t` (`MKDEV`: 12-bit major above a 20-bit minor), which is what `super_block.s_dev` holds.
pub const fn kernel_dev_from_user(st_dev: u64) -> u64 {
    let major = ((st_dev >> 8) & 0xfff) | ((st_dev >> 32) & !0xfff);
    let minor = (st_dev & 0xff) | ((st_dev >> 12) & !0xff);
    ((major & 0xfff) << 20) | (minor & 0xfffff)
}

/// Converts the kernel's internal `dev_t` back into userspace `st_dev` (glibc `makedev`).
pub const fn user_dev_from_kernel(kdev: u64) -> u64 {
    let major = (kdev >> 20) & 0xfff;
    let minor = kdev & 0xfffff;
    ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
}

// --- pure decisions, shared by the kernel programs and `policy explain` ----------------------

/// Where a walk over the ancestors of a deleted entry stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Keep walking: nothing decided yet.
    Undecided,
    /// Below a target of the job's rule: free.
    InTarget,
    /// Below a data directory the job is named for: free.
    DataOwner,
    /// Below a data directory the job is not named for: refused from the first file.
    DataForeign { data_dir_id: u32 },
}

/// One step of the ancestor walk: what directory `dir` (an ancestor of the deleted entry, nearest
/// first) means for a job under `rule`. The nearest ancestor that is either a data directory or a
/// target *of this rule* decides.
#[inline(always)]
pub fn scope_step(dir: &DirRule, rule: u32) -> Scope {
    let bit = 1u64 << (rule & (MAX_RULES - 1));
    if dir.kind & DIR_DATA != 0 {
        if dir.data_owner_rules & bit != 0 {
            return Scope::DataOwner;
        }
        return Scope::DataForeign {
            data_dir_id: dir.data_dir_id,
        };
    }
    if dir.kind & DIR_TARGET != 0 && dir.target_rules & bit != 0 {
        return Scope::InTarget;
    }
    Scope::Undecided
}

/// The sliding-window estimate of deletions in the last `window_ns`: the current window's count
/// plus the previous window's count weighted by how much of it still overlaps.
#[inline(always)]
pub fn sliding_estimate(count: u64, prev_count: u64, elapsed_ns: u64, window_ns: u64) -> u64 {
    if window_ns == 0 || elapsed_ns >= window_ns {
        return count;
    }
    // (prev * remaining) / window without overflowing for any realistic counts (< 2^32).
    let remaining = window_ns - elapsed_ns;
    let weighted =
        (prev_count.min(u32::MAX as u64) * (remaining >> 10)) / ((window_ns >> 10).max(1));
    count + weighted
}

/// Whether the `n`-th deletion of the current window (1-based, as returned by the atomic add)
/// goes past the job's budget.
#[inline(always)]
pub fn over_budget(
    n: u64,
    prev_count: u64,
    elapsed_ns: u64,
    params: &RuleParams,
    allowance: u64,
) -> bool {
    sliding_estimate(n, prev_count, elapsed_ns, params.window_ns)
        > params.budget.saturating_add(allowance)
}

// --- shutdown guard (issue 5) ------------------------------------------------------------------

/// Session classes the agent pushes into `SD_SESSIONS` (audit session id → class). A session id
/// missing from the map is [`SD_CLASS_UNKNOWN`]; an unset session id (`u32::MAX`: no login
/// session) is [`SD_CLASS_NONE`].
pub const SD_CLASS_LOCAL: u32 = 0;
pub const SD_CLASS_REMOTE: u32 = 1;
pub const SD_CLASS_NONE: u32 = 2;
pub const SD_CLASS_UNKNOWN: u32 = 3;
pub const SD_CLASSES: usize = 4;

/// Per-class answers in [`ShutdownConfig::action`].
pub const SD_ALLOW: u32 = 0;
pub const SD_CONFIRM: u32 = 1;
pub const SD_BLOCK: u32 = 2;

/// The audit session id of a task with no login session.
pub const AUDIT_SESSION_UNSET: u32 = u32::MAX;

/// Kinds of executable in `SD_EXES` (keyed by file identity, like [`ExeKey`] without a slot).
/// A dedicated shutdown program (sysvinit's `reboot`, a policy `commands` entry): every exec is a
/// shutdown request.
pub const SD_EXE_ALWAYS: u32 = 1;
/// A multi-call program (busybox, systemd as init/telinit): argv decides.
pub const SD_EXE_MULTICALL: u32 = 2;
/// systemd's systemctl: a multi-call program that acts as systemctl under any argv[0] it does not
/// recognise (`exec -a x systemctl reboot` reboots), so an unknown argv[0] is judged as systemctl.
pub const SD_EXE_SYSTEMCTL: u32 = 3;

/// Flags of a word in `SD_WORDS` (keyed by [`word_hash`]).
/// argv[0] basename that is a shutdown verb by itself: reboot, poweroff, halt, shutdown.
pub const SD_W_ARGV0_SHUTDOWN: u32 = 1 << 0;
/// argv[0] basename systemctl.
pub const SD_W_ARGV0_SYSTEMCTL: u32 = 1 << 1;
/// argv[0] basename init or telinit.
pub const SD_W_ARGV0_INIT: u32 = 1 << 2;
/// A systemctl verb that shuts down: reboot, poweroff, halt, kexec, soft-reboot, suspend, hibernate, ...
pub const SD_W_VERB: u32 = 1 << 3;
/// systemctl start / isolate.
pub const SD_W_START: u32 = 1 << 4;
/// A shutdown target: reboot.target, poweroff.target, ..., runlevel0.target, runlevel6.target.
pub const SD_W_TARGET: u32 = 1 << 5;
/// A runlevel that shuts down for init/telinit: 0, 6.
pub const SD_W_RUNLEVEL: u32 = 1 << 6;
/// argv[0] basename whose `-c` cancels a scheduled shutdown instead of asking for one: shutdown.
pub const SD_W_ARGV0_CANCELS: u32 = 1 << 7;
/// The option `-c` (cancel, for `shutdown`).
pub const SD_W_OPT_CANCEL: u32 = 1 << 8;
/// A `shutdown` option that chooses an action (`-r`, `-h`, `-P`, `--reboot`, ...). In systemd's
/// shutdown the last action option wins, so `shutdown -c -r now` reboots: a `-c` counts as a
/// cancel only when no action option follows it.
pub const SD_W_OPT_ACTION: u32 = 1 << 9;
/// A systemctl option whose value is the next word (`--message x`, `-p Name`): that word is
/// never the verb.
pub const SD_W_OPT_VALUE: u32 = 1 << 10;
/// A systemctl verb that does not shut down (`status`, `restart`, ...). Words that are neither
/// this nor a shutdown verb (values of options, unit names) are skipped while looking for the
/// verb, so an option value the table does not know cannot pose as one.
pub const SD_W_VERB_OTHER: u32 = 1 << 11;

/// Words of argv the kernel captures at execve (argv[0] included) and bytes kept of each.
pub const SD_ARGV_WORDS: usize = 6;
pub const SD_WORD_LEN: usize = 32;
/// Words of argv the kernel reads to find the verb and the options (only the first
/// [`SD_ARGV_WORDS`] are kept for the message): five or more options no longer hide the verb.
pub const SD_ARGV_SCAN: usize = 16;

/// What the kernel learnt about a command line at `sys_enter_execve*`, keyed by thread id, read
/// back at `bprm_check_security` / `sched_process_exec` of the same exec.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SdArgs {
    /// `SD_W_*` flags of argv[0]'s basename.
    pub argv0: u32,
    /// Flags of the first argument that is a known verb (not an option, not an option's value).
    pub verb: u32,
    /// Non-zero when a later non-option argument is a shutdown target.
    pub target: u32,
    /// Flags of the options (`-x`) seen, OR-ed.
    pub options: u32,
    /// The words themselves (argv[0] as a basename), NUL-padded, for the message.
    pub words: [[u8; SD_WORD_LEN]; SD_ARGV_WORDS],
}

/// The one element of `SD_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// `SD_ALLOW | SD_CONFIRM | SD_BLOCK` per `SD_CLASS_*`.
    pub action: [u32; SD_CLASSES],
    /// Non-zero once written by the agent: until then nothing is judged.
    pub enabled: u32,
    /// `MODE_AUDIT`: report what would have been refused, refuse nothing.
    pub mode: u32,
    /// The agent's tgid (never judged).
    pub agent_tgid: u32,
    /// Inode number of /proc/sysrq-trigger (procfs inode numbers are the same in every mount).
    pub sysrq_ino: u32,
    /// How long a process that used a confirmation pass may go on shutting down (ns): `poweroff`
    /// execs, then calls reboot(2); one confirmation covers both.
    pub cleared_ns: u64,
    /// Monotonic time (ns) until which the agent counts as running; it pushes this forward every
    /// tick. Past it (the agent crashed or is restarting and these programs stay pinned), a
    /// refused caller is not stopped to wait for a message no agent will write: the LSM tier
    /// just refuses, the tracepoint tier kills the program before its first instruction.
    pub alive_until_ns: u64,
    /// The agent's start time, as [`Config::agent_start_lo`]: `agent_tgid` alone is never
    /// enough to be let through.
    pub agent_start_lo: u64,
    pub agent_start_hi: u64,
}

/// Key of `SD_EXES` and `SD_EXCEPT_EXES`: an executable's identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Kernel-internal dev_t (see [`kernel_dev_from_user`]).
    pub dev: u64,
    pub ino: u64,
}

/// What the request was (`ShutdownEvent::op`).
pub const SD_OP_EXEC: u32 = 1;
pub const SD_OP_REBOOT: u32 = 2;
pub const SD_OP_SYSRQ: u32 = 3;
pub const SD_OP_SIGNAL: u32 = 4;

/// What the kernel did (`ShutdownEvent::outcome`).
pub const SD_OUT_ALLOWED: u32 = 0;
pub const SD_OUT_REFUSED: u32 = 1;
/// A confirmation pass was consumed and the request allowed.
pub const SD_OUT_CONFIRMED: u32 = 2;
/// Audit mode: it would have been refused.
pub const SD_OUT_WOULD_REFUSE: u32 = 3;
/// Tracepoint tier: the exec'd program was stopped before its first instruction; the agent tells
/// the terminal, then kills it.
pub const SD_OUT_STOPPED: u32 = 4;

/// Ring buffer record kind of a [`ShutdownEvent`] (first field, like [`Event::kind`]).
pub const EV_SHUTDOWN: u32 = 16;

/// One shutdown-class request, reported on every decision (they are rare).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ShutdownEvent {
    /// Always [`EV_SHUTDOWN`].
    pub kind: u32,
    /// `SD_OP_*`.
    pub op: u32,
    /// `SD_OUT_*`.
    pub outcome: u32,
    /// `SD_CLASS_*` the kernel judged with.
    pub class: u32,
    /// `SD_ALLOW | SD_CONFIRM | SD_BLOCK` for that class (after exceptions).
    pub action: u32,
    /// Non-zero when an exception (unit or executable) allowed it.
    pub exception: u32,
    pub tgid: u32,
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub loginuid: u32,
    pub audit_session: u32,
    /// Signal number (`SD_OP_SIGNAL`), 0 otherwise.
    pub signal: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
    pub ktime_ns: u64,
    pub comm: [u8; 16],
    /// `SD_OP_EXEC`: the command line as captured (argv[0] basename first).
    pub words: [[u8; SD_WORD_LEN]; SD_ARGV_WORDS],
}

/// Offsets only the shutdown programs read, resolved from BTF like [`KernelOffsets`] (a separate
/// read-only global, so the deletion guard's layout does not change).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SdOffsets {
    /// `linux_binprm.file`
    pub bprm_file: u32,
    /// `file.f_mode`
    pub file_f_mode: u32,
    /// `super_block.s_magic`
    pub sb_s_magic: u32,
    /// Non-zero once filled in.
    pub valid: u32,
}

/// FNV-1a over a word: how the kernel and the agent name argv words without comparing strings in
/// the kernel (the agent fills `SD_WORDS` with the hashes of the words it cares about).
#[inline(always)]
pub const fn word_hash_step(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(0x100000001b3)
}
pub const WORD_HASH_INIT: u64 = 0xcbf29ce484222325;

pub fn word_hash(w: &[u8]) -> u64 {
    let mut h = WORD_HASH_INIT;
    let mut i = 0;
    while i < w.len() {
        h = word_hash_step(h, w[i]);
        i += 1;
    }
    h
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (for every impl below): the types are #[repr(C)], made only of integers and integer
    // arrays with explicit padding fields, so every bit pattern is a valid value.
    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: see the module comment.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        super::DirKey,
        super::DirRule,
        super::RuleParams,
        super::ExeKey,
        super::CgroupKey,
        super::UidKey,
        super::Config,
        super::JobKey,
        super::JobState,
        super::HeldJob,
        super::RefusalKey,
        super::KernelOffsets,
        super::SelftestAnswer,
        super::SdArgs,
        super::ShutdownConfig,
        super::FileId,
        super::SdOffsets,
        super::ShutdownEvent,
        super::FsOffsets,
        super::LevelKey,
        super::LevelState
    );
}
