//! Capability probe and self-test: the agent checks that BPF LSM programs really run on this
//! kernel, and compares what the offsets read here with /proc.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{lsm, map, tracepoint},
    maps::Array,
    programs::{LsmContext, TracePointContext},
};
use guardrail_common::*;

use crate::kernel::{
    atomic::fetch_add,
    fs::dentry_identity,
    offsets::{kptr, kread, offsets},
    task::{current_task, task_pid_of_type},
};

/// tgid whose `getpgid` call the self-test program answers.
#[map]
pub(crate) static SELFTEST_TARGET: Array<u32> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static SELFTEST: Array<SelftestAnswer> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static PROBE_LSM_HITS: Array<u64> = Array::with_max_entries(1, 0);

/// Attached for a moment by the capability probe: a hit from the agent's own `stat` proves that
/// this kernel runs BPF LSM programs (loading alone does not: the hook must really fire).
#[lsm(hook = "inode_getattr")]
pub fn probe_lsm(_ctx: LsmContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(t) = SELFTEST_TARGET.get(0) {
        if *t == tgid && tgid != 0 {
            if let Some(p) = PROBE_LSM_HITS.get_ptr_mut(0) {
                fetch_add(p, 1);
            }
        }
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_getpgid")]
pub fn selftest_getpgid(_ctx: TracePointContext) -> u32 {
    let o = offsets();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match SELFTEST_TARGET.get(0) {
        Some(t) if *t == tgid && tgid != 0 => {}
        _ => return 0,
    }
    let Some(ans) = SELFTEST.get_ptr_mut(0) else {
        return 0;
    };
    let task = current_task();
    // SAFETY: `ans` points into the one-element array map, valid for this run.
    unsafe {
        (*ans).tgid = kread(task, o.task_tgid).unwrap_or(0);
        (*ans).pid = kread(task, o.task_pid).unwrap_or(0);
        (*ans).pgid = task_pid_of_type(&o, task, o.pidtype_pgid).unwrap_or(0);
        (*ans).sid = task_pid_of_type(&o, task, o.pidtype_sid).unwrap_or(0);
        (*ans).loginuid = kread(task, o.task_loginuid).unwrap_or(0);
        (*ans).sessionid = kread(task, o.task_sessionid).unwrap_or(0);
        if let Ok(fs) = kptr(task, o.task_fs) {
            if let Ok(cwd) = kptr(fs, o.fs_pwd + o.path_dentry) {
                if let Ok((dev, ino)) = dentry_identity(&o, cwd) {
                    (*ans).cwd_dev = dev;
                    (*ans).cwd_ino = ino;
                }
            }
        }
        if let Ok(mm) = kptr(task, o.task_mm) {
            if let Ok(exe) = kptr(mm, o.mm_exe_file) {
                if let Ok(inode) = kptr(exe, o.file_f_inode) {
                    (*ans).exe_ino = kread(inode, o.inode_i_ino).unwrap_or(0);
                    if let Ok(sb) = kptr(inode, o.inode_i_sb) {
                        (*ans).exe_dev = kread::<u32>(sb, o.sb_s_dev).unwrap_or(0) as u64;
                    }
                }
            }
        }
        (*ans).hits += 1;
    }
    0
}
