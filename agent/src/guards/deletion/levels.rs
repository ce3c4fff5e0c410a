//! Budgets above the job (`[deletion.session]`, `[deletion.user]`): how an incident names the
//! level whose budget a job's deletion took past its limit. The kernel counts and decides (see
//! `charge_levels` in the kernel programs); this only words what it reported.
use guardrail_common::{
    EVF_LEVEL_SESSION, EVF_LEVEL_UNIT, EVF_LEVEL_USER, EVF_NEVER_HOLD, EVF_REFUSED, Event,
    LEVEL_SESSION, LEVEL_UNIT, LEVEL_USER,
};

use crate::{host::procinfo, policy::LoadedPolicy};

/// The level named by an event's flags, if the crossing was a level's (not the job's own).
pub fn level_of(flags: u32) -> Option<u32> {
    if flags & EVF_LEVEL_SESSION != 0 {
        Some(LEVEL_SESSION)
    } else if flags & EVF_LEVEL_UNIT != 0 {
        Some(LEVEL_UNIT)
    } else if flags & EVF_LEVEL_USER != 0 {
        Some(LEVEL_USER)
    } else {
        None
    }
}

/// The event log's `level` value.
pub fn name(level: Option<u32>) -> &'static str {
    match level {
        None => "job",
        Some(LEVEL_SESSION) => "session",
        Some(LEVEL_UNIT) => "unit",
        Some(_) => "user",
    }
}

/// The level's budget in force (0 when the policy has none: a stale event).
pub fn budget(policy: &LoadedPolicy, level: u32) -> u64 {
    policy
        .kernel
        .levels
        .get(level as usize)
        .map_or(0, |p| p.budget)
}

/// Jobs the kernel counted at the level, when the event carries them.
pub fn jobs(ev: &Event) -> Option<u64> {
    if ev.flags & EVF_NEVER_HOLD != 0 {
        // `data_dir_id` names the never_hold unit then.
        None
    } else {
        Some(ev.data_dir_id as u64)
    }
}

/// "session 12 deleted 301 files outside targets in 1m across 57 jobs (budget 300 per
/// session)"; where the kernel refused the crossing deletion (lsm), "deleted 300 files ...; the
/// next was refused", so the text never claims a deletion that did not happen. `unit` is the unit the job runs in, for a service's crossing (the caller escapes the
/// whole reason where people read it, as for every reason).
pub fn reason(ev: &Event, policy: &LoadedPolicy, level: u32, unit: Option<&str>) -> String {
    let who = match level {
        LEVEL_SESSION => format!("session {}", ev.audit_session),
        LEVEL_UNIT => match unit {
            Some(u) => format!("unit {u}"),
            None => format!("cgroup {}", ev.cgroup_id),
        },
        _ => format!(
            "user {} (login uid {})",
            procinfo::user_name(ev.loginuid),
            ev.loginuid
        ),
    };
    let window = policy
        .kernel
        .levels
        .get(level as usize)
        .map(|p| std::time::Duration::from_nanos(p.window_ns))
        .unwrap_or_default();
    let across = match jobs(ev) {
        Some(n) => format!(" across {n} job{}", if n == 1 { "" } else { "s" }),
        None => String::new(),
    };
    let (deleted, refused) = if ev.flags & EVF_REFUSED != 0 {
        (ev.count.saturating_sub(1), "; the next was refused")
    } else {
        (ev.count, "")
    };
    format!(
        "{who} deleted {deleted} files outside targets in {}{across}{refused} (budget {} per {})",
        guardrail_policy::format_duration(window),
        budget(policy, level),
        name(Some(level)),
    )
}
