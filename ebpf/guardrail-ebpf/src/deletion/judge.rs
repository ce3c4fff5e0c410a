//! The verdict on one deletion: protected roots, scope (targets and data directories), the job's
//! budget and the levels above it, hold or block at the crossing, and a held job resuming itself.
//!
//! The `#[inline(never)]` leaves here are where they are for the verifier: the deepest chain
//! (tracepoint program -> judge -> emit) sits at the 512-byte stack limit on 6.1, so their shape
//! must not change.
use core::ptr::{addr_of_mut, read_volatile};

use aya_ebpf::helpers::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
    bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_ktime_get_ns,
};
use aya_ebpf::maps::HashMap;
use guardrail_common::*;

use super::{
    DF_SCOPE_ONLY, Deletion, Verdict,
    cache::cache_fill,
    levels::charge_levels,
    maps::{
        CGROUPS, DIRS, FOREIGN, HELD, JOB_INIT, JOBS, NEVER_HOLD, RULES, STOPPED_TASKS, UIDS,
        config,
    },
    report::{Report, emit, emit_refusal},
    scope::{host_machinery, pseudo_fs_deletion},
    tagging::TASK_RULE,
};
use crate::kernel::{
    atomic::{add_u32, cas, fetch_add, swap},
    events::next_incident,
    fs::dentry_identity,
    offsets::{kptr, offsets},
    signal::{SIGKILL, signal, stop_self},
    task::{current_task, is_current_agent, job_key},
};

#[inline(always)]
pub(crate) fn job_rule(slot: u32, tgid: u32, uid: u32) -> u32 {
    // SAFETY: map lookups return pointers into map values that stay valid for this program run.
    if let Some(r) = unsafe { TASK_RULE.get(&tgid) } {
        return *r;
    }
    if let Some(r) = unit_lookup(&CGROUPS, slot) {
        return r;
    }
    // SAFETY: as above.
    if let Some(r) = unsafe { UIDS.get(&UidKey { uid, slot }) } {
        return *r;
    }
    0
}

/// The current task's entry in a cgroup-keyed unit table: its own cgroup first, then its
/// ancestors from the deepest up, so a `Delegate=yes` unit's sub-cgroups count as the unit and
/// the nearest named cgroup wins. Only the global hierarchy's ids are compared: a user can make
/// sub-cgroups only inside a subtree delegated to it, which never contains a unit the policy
/// names (the resolver refuses cgroups whose parent is not root's).
#[inline(always)]
pub(crate) fn unit_lookup(map: &HashMap<CgroupKey, u32>, slot: u32) -> Option<u32> {
    // SAFETY: helper without preconditions.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: map lookups return pointers into map values that stay valid for this program run.
    if let Some(r) = unsafe {
        map.get(&CgroupKey {
            cgroup_id: cg,
            slot,
            _pad: 0,
        })
    } {
        return Some(*r);
    }
    let mut level = MAX_CGROUP_LEVELS;
    while level >= 1 {
        // SAFETY: helper without preconditions; 0 for a level below the task's own cgroup.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id != 0 && id != cg {
            // SAFETY: as above.
            if let Some(r) = unsafe {
                map.get(&CgroupKey {
                    cgroup_id: id,
                    slot,
                    _pad: 0,
                })
            } {
                return Some(*r);
            }
        }
        level -= 1;
    }
    None
}

/// A job of a `deletion.never_hold` unit (logind, journald, sshd, the bus...) past its budget:
/// stopping it would lock admins out or stop the host's logging, and an agent may not be there to
/// continue it, so the kernel never stops it. The LSM tier refuses this and every further
/// deletion outside scope for the rest of that job (JOB_DENIED: a restarted service is a new job);
/// the tracepoint tier cannot refuse, so it reports once and lets the job delete on without a
/// budget. Returns the incident id when this CPU is the one to report the crossing, else 0.
///
/// A leaf that `judge` calls and then emits for: on 6.1 the verifier rounds every frame up to 32
/// bytes and the deepest chain (tracepoint program -> judge -> emit -> memset) is already at the
/// 512-byte limit, so no frame may be added between judge and emit.
#[inline(never)]
pub(crate) fn never_hold_crossing(lsm: bool, job: *mut JobState) -> u64 {
    // SAFETY: field addresses of a valid map value (see `judge`).
    let (state_p, refused_p) =
        unsafe { (addr_of_mut!((*job).state), addr_of_mut!((*job).refused)) };
    let first = if lsm {
        fetch_add(refused_p, 1);
        // Exactly one CPU makes the change and reports it.
        cas(state_p, JOB_ACTIVE, JOB_DENIED)
    } else {
        // SAFETY: plain fields of the map value; two CPUs crossing at once may both report.
        unsafe {
            (*job).allowance = ALLOWANCE_UNLIMITED;
            (*job).incident == 0
        }
    };
    if !first {
        return 0;
    }
    let inc = next_incident();
    // SAFETY: as above.
    unsafe { (*job).incident = inc };
    inc
}

pub(crate) fn judge(d: &Deletion) -> Verdict {
    let o = offsets();
    if o.valid == 0 {
        return Verdict::Allow;
    }
    let Some(cfg) = config() else {
        return Verdict::Allow;
    };
    if cfg.policy_loaded == 0 {
        return Verdict::Allow;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == cfg.agent_tgid
        && is_current_agent(&o, cfg.agent_tgid, cfg.agent_start_lo, cfg.agent_start_hi)
    {
        return Verdict::Allow;
    }
    let slot = cfg.active_slot & 1;
    let audit = cfg.mode == MODE_AUDIT;
    let key = job_key(&o, current_task(), tgid);

    // 1. A protected root itself is never deleted, by anyone.
    if !d.entry.is_null() {
        if let Ok((dev, ino)) = dentry_identity(&o, d.entry) {
            // SAFETY: map value pointer valid for this run.
            if let Some(r) = unsafe {
                DIRS.get(&DirKey {
                    dev,
                    ino,
                    slot,
                    _pad: 0,
                })
            } {
                if r.kind & DIR_PROTECTED_ROOT != 0 {
                    let flags = if audit { EVF_AUDIT } else { EVF_REFUSED };
                    emit_refusal(
                        d,
                        &mut Report {
                            kind: EV_PROTECTED_ROOT,
                            flags,
                            rule: 0,
                            data_dir_id: 0,
                            count: 0,
                            incident: 0,
                        },
                        &key,
                    );
                    return if audit {
                        Verdict::Allow
                    } else {
                        Verdict::Refuse
                    };
                }
            }
        }
    }

    if host_machinery(&o, tgid) || pseudo_fs_deletion(&o, d) {
        return Verdict::Allow;
    }

    let uid = bpf_get_current_uid_gid() as u32;
    // The task's own rule decides scope and exemption (an exempt package manager run from a
    // script is exempt; a data directory's own daemon is its owner); the job's counters run
    // under the rule the job was created with.
    let rule = job_rule(slot, tgid, uid) & (MAX_RULES - 1);
    let Some(params) = RULES.get(slot * MAX_RULES + rule) else {
        return Verdict::Allow;
    };
    let rule_audit = audit || params.flags & RULE_FLAG_AUDIT != 0;

    // 2. The nearest declared ancestor decides: a target of this job's rule or a data directory.
    let mut dentry = d.parent;
    let mut i = 0;
    while i < MAX_ANCESTORS && !dentry.is_null() {
        let Ok((dev, ino)) = dentry_identity(&o, dentry) else {
            break;
        };
        // SAFETY: map value pointer valid for this run.
        if let Some(dr) = unsafe {
            DIRS.get(&DirKey {
                dev,
                ino,
                slot,
                _pad: 0,
            })
        } {
            match scope_step(dr, rule) {
                Scope::Undecided => {}
                Scope::InTarget | Scope::DataOwner => {
                    cache_fill(d.parent, i, d.tier_flags, dev, ino);
                    return Verdict::Allow;
                }
                Scope::DataForeign { data_dir_id } => {
                    if !rule_audit && d.tier_flags & EVF_TRACEPOINT != 0 {
                        // This tier cannot refuse: the hook holds the job after judge returns
                        // (acting here would add a frame under judge, at the stack limit).
                        if let Some(p) = FOREIGN.get_ptr_mut(0) {
                            // SAFETY: this CPU's scratch value, valid for this run.
                            unsafe { *p = [data_dir_id, rule] };
                            return Verdict::StopForeign;
                        }
                    }
                    let flags = if rule_audit { EVF_AUDIT } else { EVF_REFUSED };
                    emit_refusal(
                        d,
                        &mut Report {
                            kind: EV_DATA_DIR,
                            flags,
                            rule,
                            data_dir_id,
                            count: 0,
                            incident: 0,
                        },
                        &key,
                    );
                    return if rule_audit {
                        Verdict::Allow
                    } else {
                        Verdict::Refuse
                    };
                }
            }
        }
        let Ok(parent) = kptr(dentry, o.dentry_d_parent) else {
            break;
        };
        if parent == dentry {
            break;
        }
        dentry = parent;
        i += 1;
    }
    if params.action == ACTION_EXEMPT || d.tier_flags & DF_SCOPE_ONLY != 0 {
        return Verdict::Allow;
    }

    // 3. Outside scope: count against the job's budget.
    let existing = JOBS.get_ptr_mut(&key);
    // 1 when this deletion is the job's first counted one (for the levels' job counts).
    let mut new_job = 0u64;
    let job = match existing {
        Some(j) => j,
        None => {
            new_job = 1;
            // The new entry is built in per-CPU scratch space: the BPF stack (512 bytes for the
            // whole call chain) cannot spare a JobState.
            let Some(fresh) = JOB_INIT.get_ptr_mut(0) else {
                return Verdict::Allow;
            };
            // SAFETY: helper without preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            // SAFETY: `fresh` points to this CPU's scratch value; every field is written.
            unsafe {
                (*fresh) = JobState::default();
                (*fresh).state = JOB_ACTIVE;
                (*fresh).rule = rule;
                (*fresh).window_start_ns = now;
                (*fresh).first_ns = now;
                (*fresh).uid = uid;
                (*fresh).cgroup_id = bpf_get_current_cgroup_id();
                if let Ok(comm) = bpf_get_current_comm() {
                    (*fresh).comm = comm;
                }
                // BPF_NOEXIST: a racing CPU may have created it; either way look it up again.
                let _ = JOBS.insert(&key, &*fresh, 1);
            }
            // SAFETY: map value pointer valid for this run.
            match JOBS.get_ptr_mut(&key) {
                Some(j) => j,
                None => return Verdict::Allow,
            }
        }
    };
    // SAFETY: pointer into the map value, valid for this run.
    let rule = unsafe { (*job).rule } & (MAX_RULES - 1);
    let Some(params) = RULES.get(slot * MAX_RULES + rule) else {
        return Verdict::Allow;
    };
    let rule_audit = audit || params.flags & RULE_FLAG_AUDIT != 0;
    // `job` points into a map value that lives for this run; concurrent CPUs update its counters
    // only through atomics.
    // SAFETY: field addresses of a valid map value.
    let (state_p, count_p, refused_p, total_p) = unsafe {
        (
            addr_of_mut!((*job).state),
            addr_of_mut!((*job).count),
            addr_of_mut!((*job).refused),
            addr_of_mut!((*job).total),
        )
    };
    // SAFETY: as above.
    let mut state = unsafe { read_volatile(state_p) };
    if state == JOB_ACTIVE {
        state = restore_held(&key, job);
    }
    if state != JOB_ACTIVE {
        let n = fetch_add(refused_p, 1);
        if state == JOB_HELD {
            // Resumed without approval (`fg`, `kill -CONT`): the LSM tier refuses this deletion,
            // the tracepoint tier cannot; both stop the task again at once so the job waits for
            // the admin instead of failing through (or, in the tracepoint tier, deleting) the
            // rest of its work. The agent re-stops the whole job. A job that keeps resuming
            // itself in the tracepoint tier (a sibling looping `kill -CONT`, a ptracer swallowing
            // SIGSTOP) is killed at its SELF_RESUME_LIMIT-th deletion since the hold (the
            // crossing counted `refused` once). Not io_uring submissions: one io_uring_enter
            // submits a whole batch (up to 32) before the stop lands, with no resume in between.
            let kill = d.tier_flags & (EVF_TRACEPOINT | EVF_IO_URING) == EVF_TRACEPOINT
                && !first_stop_at_hold(job)
                && resumes(n, job) >= SELF_RESUME_LIMIT;
            let (stopped, first_kill) = if kill {
                (false, block_resumed(&key, job))
            } else {
                (stop_self(), false)
            };
            if first_kill || (!kill && (n == 0 || n.is_power_of_two())) {
                emit(
                    d,
                    &Report {
                        kind: EV_HELD_RETRY,
                        flags: if kill {
                            EVF_SIGNALLED | EVF_KILLED
                        } else {
                            EVF_SIGNALLED
                        },
                        rule,
                        data_dir_id: 0,
                        count: n + 1,
                        incident: 0,
                    },
                );
            }
            return if stopped {
                Verdict::Hold
            } else {
                Verdict::Refuse
            };
        }
        if state == JOB_BLOCKED && d.tier_flags & EVF_TRACEPOINT != 0 {
            signal(SIGKILL);
        }
        return Verdict::Refuse;
    }

    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: plain fields of the map value; races here only blur the window edge.
    let (start, allowance) = unsafe { ((*job).window_start_ns, (*job).allowance) };
    let mut elapsed = now.saturating_sub(start);
    if params.window_ns != 0 && elapsed >= params.window_ns {
        let old = swap(count_p, 0);
        // SAFETY: as above.
        unsafe {
            (*job).prev_count = if elapsed >= 2 * params.window_ns {
                0
            } else {
                old
            };
            (*job).window_start_ns = now;
        }
        elapsed = 0;
    }
    let n = fetch_add(count_p, 1) + 1;
    fetch_add(total_p, 1);
    // SAFETY: as above.
    let prev = unsafe { (*job).prev_count };
    let estimate = sliding_estimate(n, prev, elapsed, params.window_ns);
    // SAFETY: as above; a lost race only under-reports the peak by a little.
    unsafe {
        if estimate > (*job).peak {
            (*job).peak = estimate;
        }
    }
    let over_job = over_budget(n, prev, elapsed, params, allowance);
    // The levels above the job (its login session or service unit, the user who logged in) count
    // every deletion outside scope too, so that a job per file (`setsid rm` in a loop) does not
    // start a fresh budget each time. A level past its budget holds the job that crossed it,
    // unless an admin approved that job (every approval leaves a non-zero `allowance`): it goes
    // on under its own budget, and the level's next job is held.
    let mut level_hit = 0u64;
    if params.flags & RULE_FLAG_NO_LEVELS == 0 {
        level_hit = charge_levels(slot, new_job, now, rule_audit as u64);
        if allowance != 0 {
            level_hit = 0;
        }
    }
    if !over_job && level_hit == 0 {
        return Verdict::Allow;
    }

    // 4. Past the budget: the job's own first; else the level's action, count and job count.
    let (action, level_flags, count, jobs) = match level_hit_unpack(level_hit) {
        Some((level, action, jobs, count)) if !over_job => {
            (action, level_event_flag(level), count, jobs as u32)
        }
        _ => (params.action, 0, n, 0),
    };
    // SAFETY: as above.
    let already_reported = unsafe { (*job).incident } != 0;
    if rule_audit || action == ACTION_ALERT {
        if !already_reported {
            let inc = next_incident();
            // SAFETY: as above.
            unsafe { (*job).incident = inc };
            let flags = if rule_audit { EVF_AUDIT } else { EVF_ALERT };
            emit(
                d,
                &Report {
                    kind: EV_BUDGET_CROSSED,
                    flags: flags | level_flags,
                    rule,
                    data_dir_id: jobs,
                    count,
                    incident: inc,
                },
            );
        }
        return Verdict::Allow;
    }
    if let Some(unit) = unit_lookup(&NEVER_HOLD, slot) {
        let lsm = d.tier_flags & EVF_TRACEPOINT == 0;
        let inc = never_hold_crossing(lsm, job);
        if inc != 0 {
            emit(
                d,
                &Report {
                    kind: EV_BUDGET_CROSSED,
                    flags: level_flags
                        | if lsm {
                            EVF_NEVER_HOLD | EVF_REFUSED
                        } else {
                            EVF_NEVER_HOLD
                        },
                    rule,
                    data_dir_id: unit,
                    count,
                    incident: inc,
                },
            );
        }
        return if lsm { Verdict::Refuse } else { Verdict::Allow };
    }
    let new_state = if action == ACTION_BLOCK {
        JOB_BLOCKED
    } else {
        JOB_HELD
    };
    let mut stopped = false;
    if cas(state_p, JOB_ACTIVE, new_state) {
        // This CPU made the crossing: it alone reports it.
        let inc = next_incident();
        // SAFETY: helper without preconditions.
        let held_ns = unsafe { bpf_ktime_get_boot_ns() };
        // SAFETY: as above.
        unsafe {
            (*job).incident = inc;
            (*job).held_ns = held_ns;
        }
        remember_held(&key, new_state, rule, inc, held_ns);
        let mut flags = d.tier_flags | level_flags;
        if d.tier_flags & EVF_TRACEPOINT == 0 {
            flags |= EVF_REFUSED;
        }
        if new_state == JOB_HELD {
            stopped = stop_self();
            flags |= EVF_SIGNALLED;
        } else {
            flags |= EVF_BLOCKED;
            if d.tier_flags & EVF_TRACEPOINT != 0 {
                signal(SIGKILL);
                flags |= EVF_SIGNALLED;
            }
        }
        emit(
            d,
            &Report {
                kind: EV_BUDGET_CROSSED,
                flags,
                rule,
                data_dir_id: jobs,
                count,
                incident: inc,
            },
        );
    } else if new_state == JOB_HELD {
        // Crossed at the same moment on another CPU: this task's own first stop at the hold.
        if d.tier_flags & EVF_TRACEPOINT != 0 {
            first_stop_at_hold(job);
        }
        stopped = stop_self();
    } else if d.tier_flags & EVF_TRACEPOINT != 0 {
        signal(SIGKILL);
    }
    fetch_add(refused_p, 1);
    if stopped {
        Verdict::Hold
    } else {
        Verdict::Refuse
    }
}

/// A job found active in `JOBS` while `HELD` says it is held, denied or blocked (its counters were
/// evicted by a flood of new jobs, and the entry made afresh): the held state comes back before
/// the deletion is judged, so `kill -CONT` never buys a fresh budget. Returns the state to act on.
#[inline(never)]
pub(crate) fn restore_held(key: &JobKey, job: *mut JobState) -> u32 {
    // SAFETY: map value pointer valid for this run.
    let Some(h) = (unsafe { HELD.get(key) }) else {
        return JOB_ACTIVE;
    };
    let (held_state, incident, held_ns) = (h.state, h.incident, h.held_ns);
    if held_state == JOB_ACTIVE {
        return JOB_ACTIVE;
    }
    // SAFETY: `job` points into a JOBS value valid for this run.
    let state_p = unsafe { addr_of_mut!((*job).state) };
    if cas(state_p, JOB_ACTIVE, held_state) {
        // SAFETY: as above.
        unsafe {
            (*job).incident = incident;
            (*job).held_ns = held_ns;
        }
    }
    // SAFETY: as above.
    unsafe { read_volatile(state_p) }
}

/// A held job that resumed itself `SELF_RESUME_LIMIT` times (tracepoint tier): SIGKILL to this
/// task, and the job blocked (in `JOBS` and `HELD`), so that every further deletion of any of its
/// tasks kills that task too until the agent has killed the whole job. Returns whether this CPU
/// made the change (it alone reports it). A leaf: `judge` calls it beside `emit`, never above it.
#[inline(never)]
pub(crate) fn block_resumed(key: &JobKey, job: *mut JobState) -> bool {
    signal(SIGKILL);
    // SAFETY: field address of a valid map value (see `judge`).
    let state_p = unsafe { addr_of_mut!((*job).state) };
    if !cas(state_p, JOB_HELD, JOB_BLOCKED) {
        return false;
    }
    // SAFETY: plain fields of the map value.
    let h = unsafe {
        HeldJob {
            state: JOB_BLOCKED,
            rule: (*job).rule,
            incident: (*job).incident,
            held_ns: (*job).held_ns,
        }
    };
    let _ = HELD.insert(key, &h, 0);
    true
}

/// Records a crossing in `HELD`, where no flood of new jobs can evict it.
#[inline(never)]
pub(crate) fn remember_held(key: &JobKey, state: u32, rule: u32, incident: u64, held_ns: u64) {
    let h = HeldJob {
        state,
        rule,
        incident,
        held_ns,
    };
    // Full map (the agent alerts at 80 %): the JOBS entry still holds the job.
    let _ = HELD.insert(key, &h, 0);
    // The crossing task's own stop is the hold itself: any later stop of it is a resume.
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = STOPPED_TASKS.insert(&tid, &incident, 0);
}

/// Whether this refusal of a held job (tracepoint tier) is the task's first stop at the hold,
/// not a resume: the task was deleting when the job was held, and the tier cannot refuse that
/// deletion (see `HOLD_GRACE_NS`). Records the task and counts the free stop in the job. A leaf,
/// like `remember_held`.
#[inline(never)]
pub(crate) fn first_stop_at_hold(job: *mut JobState) -> bool {
    // SAFETY: plain fields of the map value (see `judge`).
    let (incident, held_ns, free_p) = unsafe {
        (
            read_volatile(addr_of_mut!((*job).incident)),
            read_volatile(addr_of_mut!((*job).held_ns)),
            addr_of_mut!((*job).free_stops),
        )
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if now.saturating_sub(held_ns) > HOLD_GRACE_NS {
        return false;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: map value read for this run.
    if incident != 0 && unsafe { STOPPED_TASKS.get(&tid) }.is_some_and(|seen| *seen == incident) {
        return false;
    }
    // SAFETY: as above.
    if unsafe { read_volatile(free_p) } >= FREE_STOPS_MAX {
        return false;
    }
    add_u32(free_p, 1);
    let _ = STOPPED_TASKS.insert(&tid, &incident, 0);
    true
}

/// Deletions a held job made by resuming itself: its refusals (`n`, read before this one's;
/// the crossing's own counts as the first) less its tasks' free first stops at the hold.
#[inline(always)]
pub(crate) fn resumes(n: u64, job: *mut JobState) -> u64 {
    // SAFETY: plain field of the map value.
    n.saturating_sub(u64::from(unsafe {
        read_volatile(addr_of_mut!((*job).free_stops))
    }))
}

/// The current job's deletions counted over its life (0: none yet). A rename reads it before and
/// after judging its source, to learn whether the source was counted (then its destination is
/// judged [`DF_SCOPE_ONLY`](super::DF_SCOPE_ONLY)). Another task of the job counting at the same
/// moment can only make a destination go uncounted. A leaf, called by the programs beside
/// `judge`, never under it.
#[inline(never)]
pub(crate) fn job_total() -> u64 {
    let o = offsets();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let key = job_key(&o, current_task(), tgid);
    // SAFETY: map value read for this run.
    match unsafe { JOBS.get(&key) } {
        Some(j) => j.total,
        None => 0,
    }
}
