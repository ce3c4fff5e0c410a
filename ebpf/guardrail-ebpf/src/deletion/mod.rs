//! The deletion guard: mass deletions are counted per job in the kernel and held (or blocked) at
//! the budget, in every tier.
//!
//! - judge.rs: the verdict (scope, budget, hold/block, self-resume); levels.rs: budgets above the
//!   job; scope.rs: what never counts; report.rs: events to the agent.
//! - lsm.rs (`lsm` and, through fmodret.rs, `fmodret` tiers), tracepoint.rs, tp_rename.rs and
//!   io_uring.rs (`tracepoint` tier): the programs, each turning a hook's arguments into a [`Deletion`].
//! - cache.rs: the tracepoint tier's cache of in-scope verdicts per directory.
//! - tagging.rs: process tagging by executable (every tier); maps.rs: the shared tables.
pub(crate) mod cache;
pub(crate) mod io_uring;
pub(crate) mod judge;
pub(crate) mod levels;
pub(crate) mod lsm;
pub(crate) mod maps;
pub(crate) mod report;
pub(crate) mod scope;
pub(crate) mod tagging;
pub(crate) mod tp_rename;
pub(crate) mod tracepoint;

/// What the caller must do with the deletion.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Allow,
    /// LSM: return -EPERM. Tracepoint: the deletion goes through; `signal` stops the job.
    Refuse,
    /// The job is held and SIGSTOP is pending for this task: the LSM tier restarts the syscall
    /// after the stop (it runs again, and is judged again, when the job continues), so an approved
    /// job loses nothing. Where that is not safe it degrades to `Refuse`.
    Hold,
    /// Tracepoint tier only: the deletion was in a data directory the job is not named for and has
    /// gone through; the hook stops (or, under a `block` rule, kills) the job right after it, see
    /// [`tp_stop_foreign`](tracepoint::tp_stop_foreign). `FOREIGN` holds the data directory and
    /// rule.
    StopForeign,
}

/// In [`Deletion::tier_flags`], never reported: judge this deletion for what refuses it (a
/// protected root, a foreign data directory) but do not count it against any budget. A rename
/// that both moves its source out of scope and replaces its destination deletes two entries;
/// the source's count is the rename's one.
pub(crate) const DF_SCOPE_ONLY: u32 = 1 << 31;

pub(crate) struct Deletion {
    /// Dentry of the directory the entry is deleted from (null: unknown, e.g. io_uring in the
    /// tracepoint tier).
    pub(crate) parent: *const u8,
    /// Dentry of the entry itself, when the hook has it (LSM).
    pub(crate) entry: *const u8,
    /// User pointer to the path as passed to the syscall (tracepoint tier), for the event.
    pub(crate) user_path: *const u8,
    pub(crate) op: u32,
    /// EVF_TRACEPOINT for the tracepoint tier; [`DF_SCOPE_ONLY`].
    pub(crate) tier_flags: u32,
}
