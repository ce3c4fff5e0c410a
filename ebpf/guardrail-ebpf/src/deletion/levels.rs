//! Budgets above the job: its login session or service unit, and the user who logged in, so that
//! a job per file (`setsid rm` in a loop) does not start a fresh budget each time.
use core::ptr::{addr_of_mut, read_volatile};

use aya_ebpf::{
    helpers::bpf_get_current_ancestor_cgroup_id,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
};
use guardrail_common::*;

use crate::kernel::{
    atomic::{fetch_add, swap},
    offsets::{OFFSETS, kread},
    task::current_task,
};

/// Budgets above the job (`LEVEL_*`), indexed by `slot * LEVELS + level`.
#[map]
pub(crate) static LEVEL_PARAMS: Array<RuleParams> =
    Array::with_max_entries(LEVELS * POLICY_SLOTS, 0);

/// Counters per login session, service unit and login user. LRU so that no number of sessions
/// can fill it and stop counting; an evicted entry only forgets counts (a hold is the job's, in
/// `HELD`). Unprivileged users cannot make audit sessions or units at will (services are keyed by
/// their top unit, not by a delegated sub-cgroup), so only root can push an entry out.
#[map]
pub(crate) static LEVEL_COUNTS: LruHashMap<LevelKey, LevelState> =
    LruHashMap::with_max_entries(LEVEL_CAPACITY, 0);

/// Scratch space for a new level entry.
#[map]
pub(crate) static LEVEL_INIT: PerCpuArray<LevelState> = PerCpuArray::with_max_entries(1, 0);

/// Counts one deletion outside scope at the levels above its job: its login session (audit
/// session id) or, for a service (no session), its unit; and the user who logged in (audit login
/// uid, across their sessions). Returns the first level now past its budget, packed (see
/// [`level_hit_pack`]), or 0. `alert` levels, and every level while `once` is set (audit), report
/// one crossing per window, not one per job.
///
/// A leaf of `judge`, like [`never_hold_crossing`](super::judge::never_hold_crossing): it reads
/// only the two offsets it needs (not the whole offsets struct) and keeps its key small, since its
/// frame sits where emit's does.
#[inline(never)]
pub(crate) fn charge_levels(slot: u32, new_job: u64, now: u64, once: u64) -> u64 {
    // SAFETY: as for `offsets`: single fields of the read-only global.
    let (session_off, loginuid_off) = unsafe {
        (
            read_volatile(core::ptr::addr_of!(OFFSETS.task_sessionid)),
            read_volatile(core::ptr::addr_of!(OFFSETS.task_loginuid)),
        )
    };
    let task = current_task();
    let session: u32 = kread(task, session_off).unwrap_or(AUDIT_SESSION_UNSET);
    let mut key = LevelKey {
        id: session as u64,
        level: LEVEL_SESSION,
        _pad: 0,
    };
    if session == AUDIT_SESSION_UNSET {
        // A service: its unit, the cgroup two levels down (system.slice/x.service), so that a
        // service's sub-cgroups (or a user's delegated ones) share one entry. A task in a
        // shallower cgroup (the root, a slice itself: a host or container without systemd puts
        // everything there) has no unit: counting it there would lump every unrelated process
        // together and hold whichever crossed, so it is budgeted per job only.
        // SAFETY: helper without preconditions; 0 when the cgroup is shallower.
        let top = unsafe { bpf_get_current_ancestor_cgroup_id(2) };
        if top == 0 {
            return 0;
        }
        key.level = LEVEL_UNIT;
        key.id = top;
        return charge_level(&key, slot, new_job, now, once);
    }
    let hit = charge_level(&key, slot, new_job, now, once);
    let loginuid: u32 = kread(task, loginuid_off).unwrap_or(u32::MAX);
    if loginuid == u32::MAX {
        return hit;
    }
    key.level = LEVEL_USER;
    key.id = loginuid as u64;
    let user_hit = charge_level(&key, slot, new_job, now, once);
    if hit != 0 { hit } else { user_hit }
}

/// One level's count: the same sliding window as a job's (see [`sliding_estimate`]).
#[inline(always)]
pub(crate) fn charge_level(key: &LevelKey, slot: u32, new_job: u64, now: u64, once: u64) -> u64 {
    let Some(p) = LEVEL_PARAMS.get(slot * LEVELS + (key.level % LEVELS)) else {
        return 0;
    };
    if p.flags & LEVEL_FLAG_ON == 0 {
        return 0;
    }
    let (budget, window, action) = (p.budget, p.window_ns, p.action);
    let st = match LEVEL_COUNTS.get_ptr_mut(key) {
        Some(st) => st,
        None => {
            let Some(fresh) = LEVEL_INIT.get_ptr_mut(0) else {
                return 0;
            };
            // SAFETY: this CPU's scratch value; every field is written.
            unsafe {
                (*fresh) = LevelState::default();
                (*fresh).window_start_ns = now;
                // BPF_NOEXIST: a racing CPU may have made it; either way look it up again.
                let _ = LEVEL_COUNTS.insert(key, &*fresh, 1);
            }
            match LEVEL_COUNTS.get_ptr_mut(key) {
                Some(st) => st,
                None => return 0,
            }
        }
    };
    // SAFETY: field addresses of a map value valid for this run; counters change by atomics.
    let (count_p, jobs_p, reported_p) = unsafe {
        (
            addr_of_mut!((*st).count),
            addr_of_mut!((*st).jobs),
            addr_of_mut!((*st).reported),
        )
    };
    // SAFETY: as above; races here only blur the window edge.
    let start = unsafe { (*st).window_start_ns };
    let mut elapsed = now.saturating_sub(start);
    if window != 0 && elapsed >= window {
        let old = swap(count_p, 0);
        let old_jobs = swap(jobs_p, 0);
        let stale = elapsed >= 2 * window;
        // SAFETY: as above.
        unsafe {
            (*st).prev_count = if stale { 0 } else { old };
            (*st).prev_jobs = if stale { 0 } else { old_jobs };
            (*st).window_start_ns = now;
        }
        swap(reported_p, 0);
        elapsed = 0;
    }
    let n = fetch_add(count_p, 1) + 1;
    let jobs = fetch_add(jobs_p, new_job) + new_job;
    // SAFETY: as above.
    let (prev, prev_jobs) = unsafe { ((*st).prev_count, (*st).prev_jobs) };
    let estimate = sliding_estimate(n, prev, elapsed, window);
    if estimate <= budget {
        return 0;
    }
    if (action == ACTION_ALERT || once != 0) && swap(reported_p, 1) != 0 {
        return 0;
    }
    level_hit_pack(key.level, action, jobs + prev_jobs, estimate)
}
