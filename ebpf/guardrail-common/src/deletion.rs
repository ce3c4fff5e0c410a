//! The deletion guard's tables: limits, the directory table, rules and the unit/user keys, the
//! job state and the budgets above the job (levels).
use crate::{EVF_LEVEL_SESSION, EVF_LEVEL_UNIT, EVF_LEVEL_USER};

/// Number of job rules a policy may hold. Rule 0 is the default rule (the global budget and
/// targets); rule ids index bit masks in [`DirRule`], so this is the width of a `u64`.
pub const MAX_RULES: u32 = 64;

/// How many ancestors of a deleted entry the kernel walks looking for a declared directory.
/// Deeper entries are judged by their nearest 64 ancestors (the filesystem root is usually far
/// closer).
pub const MAX_ANCESTORS: u32 = 64;

/// Policy tables are double-buffered: the agent fills the inactive slot, then flips
/// [`Config::active_slot`](crate::Config::active_slot), so no deletion is ever judged against a half-written policy.
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
    /// not `st_dev` as userspace sees it: see [`kernel_dev_from_user`](crate::kernel_dev_from_user).
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

/// The tracepoint tier cannot refuse, so every task of a job that was deleting when the job was
/// held gets one deletion through and is stopped right after: `xargs -P 16 rm` stops 16 tasks
/// at its hold without anyone resuming anything. A task's first stop within this long after the
/// hold (`CLOCK_BOOTTIME`) is therefore not a resume; at most [`FREE_STOPS_MAX`] per hold are
/// (a job forking a new task per file while something resumes it gets no more than that).
pub const HOLD_GRACE_NS: u64 = 2_000_000_000;
/// See [`HOLD_GRACE_NS`].
pub const FREE_STOPS_MAX: u32 = 64;

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
    /// Tracepoint tier: this hold's first stops of tasks that were deleting when the job was held
    /// (see [`HOLD_GRACE_NS`]): not resumes, so not counted towards [`SELF_RESUME_LIMIT`].
    pub free_stops: u32,
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

/// Capacity of the `LEVEL_COUNTS` LRU map: one entry per login session, service unit and login
/// user that deleted outside scope within a window. 8192 is far past a busy host's sessions and
/// units; only root can make entries at will (see `LEVEL_COUNTS`), and an eviction only forgets
/// counts.
pub const LEVEL_CAPACITY: u32 = 8192;

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
