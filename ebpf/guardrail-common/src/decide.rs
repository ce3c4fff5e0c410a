//! Pure decisions, compiled into the kernel programs *and* used by `guardrail policy explain`,
//! so that what explain prints is what the kernel decides.
use crate::{DIR_DATA, DIR_TARGET, DirRule, MAX_RULES, RuleParams};

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
