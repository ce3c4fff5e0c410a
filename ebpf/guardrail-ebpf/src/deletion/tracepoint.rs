//! The `tracepoint` tier's deletion programs: syscall tracepoints see deletions on kernels that
//! refuse BPF LSM. They cannot refuse, so the job is stopped (or killed) by a signal from the
//! kernel, which lands after the current syscall.
use core::ptr::{addr_of_mut, read_volatile};

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_boot_ns, bpf_ktime_get_ns,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use guardrail_common::*;

use super::{
    Deletion, Verdict,
    cache::{CACHE_HIT, cache_lookup, cache_release},
    judge::{
        block_resumed, first_stop_at_hold, judge, remember_held, restore_held, resumes, unit_lookup,
    },
    maps::{FOREIGN, JOB_INIT, JOBS, NEVER_HOLD, RULES, config},
    report::{Report, emit, emit_refusal},
};
use crate::kernel::{
    atomic::{cas, fetch_add},
    events::next_incident,
    offsets::{kptr, kread, offsets},
    signal::{SIGKILL, signal, stop_self},
    task::{current_task, job_key},
};

pub(crate) const AT_FDCWD: i64 = -100;

/// Syscall tracepoint records: 8 bytes of common fields, the syscall number, then each argument
/// as a 64-bit slot.
#[inline(always)]
pub(crate) fn sys_arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: reading inside the tracepoint record; failures read as 0.
    unsafe { ctx.read_at::<u64>(16 + 8 * n) }.unwrap_or(0)
}

/// The directory a syscall's relative path starts from: the file behind `dfd`, or the cwd.
/// Absolute paths start from the root, whose ancestors tell nothing: the tracepoint tier then
/// judges by the task's cwd is NOT done; see the tier's documented approximations.
#[inline(always)]
pub(crate) fn base_dentry(o: &KernelOffsets, dfd: i64, path: *const u8) -> *const u8 {
    let task = current_task();
    let first: u8 = {
        let mut b = [0u8; 1];
        // SAFETY: user memory read with fault handling.
        match unsafe { aya_ebpf::helpers::bpf_probe_read_user_buf(path, &mut b) } {
            Ok(()) => b[0],
            Err(_) => 0,
        }
    };
    if first == b'/' {
        return core::ptr::null();
    }
    if dfd == AT_FDCWD {
        let Ok(fs) = kptr(task, o.task_fs) else {
            return core::ptr::null();
        };
        return kptr(fs, o.fs_pwd + o.path_dentry).unwrap_or(core::ptr::null());
    }
    let Ok(files) = kptr(task, o.task_files) else {
        return core::ptr::null();
    };
    let Ok(fdt) = kptr(files, o.files_fdt) else {
        return core::ptr::null();
    };
    let max: u32 = kread(fdt, o.fdt_max_fds).unwrap_or(0);
    if dfd < 0 || dfd as u64 >= max as u64 {
        return core::ptr::null();
    }
    let Ok(fd_array) = kptr(fdt, o.fdt_fd) else {
        return core::ptr::null();
    };
    let Ok(file) = kptr(fd_array, (dfd as u32) * 8) else {
        return core::ptr::null();
    };
    kptr(file, o.file_f_path + o.path_dentry).unwrap_or(core::ptr::null())
}

#[inline(always)]
pub(crate) fn tp_delete(dfd: i64, path: *const u8, op: u32) -> u32 {
    let o = offsets();
    let parent = base_dentry(&o, dfd, path);
    let d = Deletion {
        parent,
        entry: core::ptr::null(),
        user_path: path,
        op,
        tier_flags: EVF_TRACEPOINT,
    };
    // A run of deletions in one directory inside a target: allowed from the cache (see cache.rs).
    if cache_lookup(parent) == CACHE_HIT {
        return 0;
    }
    let v = judge(&d);
    cache_release();
    if v == Verdict::StopForeign {
        tp_stop_foreign(&d);
    }
    0
}

/// A deletion in a data directory the job is not named for, seen by the tracepoint tier after the
/// fact (the file is gone): the job is held from this first file, like a budget crossing (JOB_HELD,
/// `HELD` entry, incident from the kernel counter, SIGSTOP to this task; the agent stops the rest of
/// the job), or killed under a `block` rule. A job already held is stopped again, a blocked or
/// denied one killed. A job approved `--for-job` (no budget) deletes on. A `never_hold` unit's job
/// is never stopped: the deletion is only reported (rate-limited, like a refusal).
///
/// Called by the hook after `judge` has returned, so its frame sits where judge's was: the chain
/// (program -> this -> emit_refusal -> emit) is no deeper than (program -> judge -> emit_refusal
/// -> emit).
#[inline(never)]
pub(crate) fn tp_stop_foreign(d: &Deletion) {
    let Some(f) = FOREIGN.get(0) else { return };
    let (data_dir_id, rule) = (f[0], f[1] & (MAX_RULES - 1));
    let Some(cfg) = config() else { return };
    let slot = cfg.active_slot & 1;
    let Some(params) = RULES.get(slot * MAX_RULES + rule) else {
        return;
    };
    let o = offsets();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let key = job_key(&o, current_task(), tgid);
    if unit_lookup(&NEVER_HOLD, slot).is_some() {
        emit_refusal(
            d,
            &mut Report {
                kind: EV_DATA_DIR,
                flags: EVF_NEVER_HOLD,
                rule,
                data_dir_id,
                count: 0,
                incident: 0,
            },
            &key,
        );
        return;
    }
    let job = match JOBS.get_ptr_mut(&key) {
        Some(j) => j,
        None => {
            let Some(fresh) = JOB_INIT.get_ptr_mut(0) else {
                return;
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
                (*fresh).uid = bpf_get_current_uid_gid() as u32;
                (*fresh).cgroup_id = bpf_get_current_cgroup_id();
                if let Ok(comm) = bpf_get_current_comm() {
                    (*fresh).comm = comm;
                }
                let _ = JOBS.insert(&key, &*fresh, 1);
            }
            match JOBS.get_ptr_mut(&key) {
                Some(j) => j,
                None => return,
            }
        }
    };
    // SAFETY: field address of a valid map value.
    let state_p = unsafe { addr_of_mut!((*job).state) };
    // SAFETY: as above.
    let mut state = unsafe { read_volatile(state_p) };
    if state == JOB_ACTIVE {
        state = restore_held(&key, job);
    }
    if state == JOB_ACTIVE {
        // SAFETY: plain field of the map value.
        if unsafe { (*job).allowance } == ALLOWANCE_UNLIMITED {
            return;
        }
        let new_state = if params.action == ACTION_BLOCK {
            JOB_BLOCKED
        } else {
            JOB_HELD
        };
        if cas(state_p, JOB_ACTIVE, new_state) {
            // This CPU made the change: it alone reports it.
            let inc = next_incident();
            // SAFETY: helper without preconditions.
            let held_ns = unsafe { bpf_ktime_get_boot_ns() };
            // SAFETY: plain fields of the map value.
            unsafe {
                (*job).incident = inc;
                (*job).held_ns = held_ns;
            }
            remember_held(&key, new_state, rule, inc, held_ns);
            // Counted like a budget crossing, so that self-resumes count alike (see `judge`).
            // SAFETY: field address of a valid map value.
            fetch_add(unsafe { addr_of_mut!((*job).refused) }, 1);
            if new_state == JOB_HELD {
                stop_self();
            } else {
                signal(SIGKILL);
            }
            emit(
                d,
                &Report {
                    kind: EV_DATA_DIR,
                    flags: if new_state == JOB_HELD {
                        EVF_SIGNALLED
                    } else {
                        EVF_SIGNALLED | EVF_BLOCKED
                    },
                    rule,
                    data_dir_id,
                    count: 1,
                    incident: inc,
                },
            );
            return;
        }
        // SAFETY: as above.
        state = unsafe { read_volatile(state_p) };
    }
    if state == JOB_HELD {
        // Resumed without approval: stopped again, and the agent told (as `judge` does) so that
        // it re-stops the whole job; killed at SELF_RESUME_LIMIT, as in `judge`.
        // SAFETY: field address of a valid map value.
        let n = fetch_add(unsafe { addr_of_mut!((*job).refused) }, 1);
        let kill = !first_stop_at_hold(job) && resumes(n, job) >= SELF_RESUME_LIMIT;
        let first_kill = if kill {
            block_resumed(&key, job)
        } else {
            stop_self();
            false
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
    } else if state == JOB_BLOCKED || state == JOB_DENIED {
        signal(SIGKILL);
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_unlinkat")]
pub fn sys_enter_unlinkat(ctx: TracePointContext) -> u32 {
    let flags = sys_arg(&ctx, 2);
    let op = if flags & 0x200 != 0 {
        OP_RMDIR
    } else {
        OP_UNLINK
    };
    tp_delete(sys_arg(&ctx, 0) as i64, sys_arg(&ctx, 1) as *const u8, op)
}

#[tracepoint(category = "syscalls", name = "sys_enter_unlink")]
pub fn sys_enter_unlink(ctx: TracePointContext) -> u32 {
    tp_delete(AT_FDCWD, sys_arg(&ctx, 0) as *const u8, OP_UNLINK)
}

#[tracepoint(category = "syscalls", name = "sys_enter_rmdir")]
pub fn sys_enter_rmdir(ctx: TracePointContext) -> u32 {
    tp_delete(AT_FDCWD, sys_arg(&ctx, 0) as *const u8, OP_RMDIR)
}
