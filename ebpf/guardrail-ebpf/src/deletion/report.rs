//! Deletion events to the agent: sent only on state changes (a crossing, a refusal, a held job
//! resuming), refusals rate-limited per job and kind.
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
    bpf_probe_read_user_str_bytes,
};
use guardrail_common::*;

use super::{DF_SCOPE_ONLY, Deletion, maps::REFUSALS};
use crate::kernel::{
    atomic::fetch_add,
    events::EVENTS,
    offsets::{kptr, kread, offsets},
    task::{current_task, job_key},
};

/// What an event reports besides the deletion itself (BPF calls take at most five arguments).
#[derive(Clone, Copy)]
pub(crate) struct Report {
    pub(crate) kind: u32,
    pub(crate) flags: u32,
    pub(crate) rule: u32,
    pub(crate) data_dir_id: u32,
    pub(crate) count: u64,
    pub(crate) incident: u64,
}

/// Sends one event to the agent. Called only on state changes.
#[inline(never)]
pub(crate) fn emit(d: &Deletion, r: &Report) {
    let Report {
        kind,
        flags,
        rule,
        data_dir_id,
        count,
        incident,
    } = *r;
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        return;
    };
    let ev = entry.as_mut_ptr();
    let o = offsets();
    let task = current_task();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `ev` points to a reserved ring buffer record of the right size; every field is
    // written before submit.
    unsafe {
        (*ev).kind = kind;
        (*ev).flags = flags | (d.tier_flags & !DF_SCOPE_ONLY);
        (*ev).rule = rule;
        (*ev).data_dir_id = data_dir_id;
        (*ev).tgid = (pid_tgid >> 32) as u32;
        (*ev).pid = pid_tgid as u32;
        let key = job_key(&o, task, (pid_tgid >> 32) as u32);
        (*ev).pgid = key.pgid;
        (*ev).sid = key.sid;
        (*ev).uid = bpf_get_current_uid_gid() as u32;
        (*ev).loginuid = kread(task, o.task_loginuid).unwrap_or(u32::MAX);
        (*ev).audit_session = kread(task, o.task_sessionid).unwrap_or(u32::MAX);
        (*ev).op = d.op;
        (*ev).count = count;
        (*ev).incident = incident;
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        let mut i = 0;
        while i < EVENT_PATH_DEPTH {
            (*ev).path[i][0] = 0;
            i += 1;
        }
        // Innermost name first: the entry itself (LSM) or the path as passed (tracepoint),
        // then the names of the directories above.
        let mut level = 0usize;
        if !d.entry.is_null() {
            if let Ok(name) = kptr(d.entry, o.dentry_d_name_name) {
                let _ = bpf_probe_read_kernel_str_bytes(name, &mut (*ev).path[0]);
            }
            level = 1;
        } else if !d.user_path.is_null() {
            let _ = bpf_probe_read_user_str_bytes(d.user_path, &mut (*ev).path[0]);
            level = 1;
        }
        let mut dentry = d.parent;
        while level < EVENT_PATH_DEPTH && !dentry.is_null() {
            if let Ok(name) = kptr(dentry, o.dentry_d_name_name) {
                let _ = bpf_probe_read_kernel_str_bytes(name, &mut (*ev).path[level]);
            }
            let Ok(parent) = kptr(dentry, o.dentry_d_parent) else {
                break;
            };
            if parent == dentry {
                break;
            }
            dentry = parent;
            level += 1;
        }
    }
    entry.submit(0);
}

/// Reports a refusal (protected root, foreign data directory) once per job and kind, then at
/// the 2nd, 3rd, 5th, 9th, ... (powers of two): a foreign `rm -rf` of a large tree is a handful
/// of events with its running count, never one per file.
#[inline(never)]
pub(crate) fn emit_refusal(d: &Deletion, r: &mut Report, job: &JobKey) {
    let key = RefusalKey {
        sid: job.sid,
        pgid: job.pgid,
        kind: r.kind,
        _pad: 0,
    };
    // BPF_NOEXIST: a racing CPU may have created it.
    let _ = REFUSALS.insert(&key, &0, 1);
    let n = match REFUSALS.get_ptr_mut(&key) {
        Some(p) => fetch_add(p, 1),
        None => 0,
    };
    if n == 0 || n.is_power_of_two() {
        r.count = n + 1;
        emit(d, r);
    }
}
