//! Process tagging (every tier): a process whose executable matches a rule carries that rule,
//! and its children inherit it.
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint},
    maps::{HashMap, LruHashMap},
    programs::RawTracePointContext,
};
use guardrail_common::*;

use super::{
    cache::bump_task_gen,
    maps::{UIDS, config},
};
use crate::kernel::{
    offsets::{kptr, kread, offsets},
    task::current_task,
};

#[map]
pub(crate) static EXES: HashMap<ExeKey, u32> =
    HashMap::with_max_entries(4096, super::maps::POLICY_TABLE);

/// Rule tag of a process whose executable (or an ancestor's, inherited at fork) matched a rule.
#[map]
pub(crate) static TASK_RULE: LruHashMap<u32, u32> = LruHashMap::with_max_entries(65536, 0);

/// Whether an exec may tag its process with the rule of its executable: only when root started
/// it (real and effective uid 0) or the user the policy names for that same rule (a data
/// directory's owner set listing both the program and its user). Any other user running an
/// exempt or owning program (logrotate with their own configuration, systemd-tmpfiles with their
/// own rules) gets nothing from it.
#[inline(always)]
pub(crate) fn exec_may_tag(o: &KernelOffsets, slot: u32, rule: u32) -> bool {
    let uid = bpf_get_current_uid_gid() as u32;
    let euid: u32 = match kptr(current_task(), o.task_cred) {
        Ok(cred) if o.task_cred != 0 && o.cred_euid != 0 => kread(cred, o.cred_euid).unwrap_or(1),
        _ => 1,
    };
    if uid == 0 && euid == 0 {
        return true;
    }
    // SAFETY: map value pointer valid for this run.
    match unsafe { UIDS.get(&UidKey { uid, slot }) } {
        Some(r) => *r == rule && uid != 0,
        None => false,
    }
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`: a
/// process whose new executable matches a rule is tagged with it; children inherit the tag.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    let o = offsets();
    if o.valid == 0 {
        return 0;
    }
    let Some(cfg) = config() else { return 0 };
    let task = current_task();
    let Ok(mm) = kptr(task, o.task_mm) else {
        return 0;
    };
    let Ok(exe) = kptr(mm, o.mm_exe_file) else {
        return 0;
    };
    let Ok(inode) = kptr(exe, o.file_f_inode) else {
        return 0;
    };
    let Ok(ino) = kread::<u64>(inode, o.inode_i_ino) else {
        return 0;
    };
    let Ok(sb) = kptr(inode, o.inode_i_sb) else {
        return 0;
    };
    let Ok(dev) = kread::<u32>(sb, o.sb_s_dev) else {
        return 0;
    };
    let key = ExeKey {
        dev: dev as u64,
        ino,
        slot: cfg.active_slot & 1,
        _pad: 0,
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    bump_task_gen();
    // SAFETY: map value pointer valid for this run.
    match unsafe { EXES.get(&key) }.copied() {
        Some(rule) if exec_may_tag(&o, key.slot, rule) => {
            let _ = TASK_RULE.insert(&tgid, &rule, 0);
        }
        // A program not on the list (a shell started from a pager or from a cleaner's script),
        // or a listed one run by a user it does not count for: the tag inherited at fork goes.
        _ => {
            let _ = TASK_RULE.remove(&tgid);
        }
    }
    0
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    let o = offsets();
    if o.valid == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: raw tracepoint arguments are the hook's arguments.
    let args = ctx.as_ptr() as *const u64;
    // SAFETY: the context holds the two task pointers.
    let child = unsafe { bpf_probe_read_kernel(args.add(1)) }.unwrap_or(0) as *const u8;
    if child.is_null() {
        return 0;
    }
    let Ok(child_tgid) = kread::<u32>(child, o.task_tgid) else {
        return 0;
    };
    if child_tgid == tgid {
        // A new thread: it shares its process's entry.
        return 0;
    }
    // Every new process is born here, so this is where its entry is made right: the parent's
    // rule, or none. Entries are never removed at exit; without the removal a process that got
    // an exited one's pid would inherit its rule (an exempt package manager's, say).
    bump_task_gen();
    // SAFETY: map value pointer valid for this run.
    match (unsafe { TASK_RULE.get(&tgid) }).copied() {
        Some(rule) => {
            let _ = TASK_RULE.insert(&child_tgid, &rule, 0);
        }
        None => {
            let _ = TASK_RULE.remove(&child_tgid);
        }
    }
    0
}
