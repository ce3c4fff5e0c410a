//! The current task and what the programs read from it: its job (process group within its
//! session) and whether it is the agent itself.
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_current_task};
use guardrail_common::{JobKey, KernelOffsets, is_agent};

use super::offsets::{kptr, kread};

pub(crate) const PF_IO_WORKER: u32 = 0x10;

pub(crate) const PF_KTHREAD: u32 = 0x0020_0000;

#[inline(always)]
pub(crate) fn current_task() -> *const u8 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_task() as *const u8 }
}

/// Global (initial namespace) number of a `struct pid *` of the task's signal struct.
#[inline(always)]
pub(crate) fn task_pid_of_type(
    o: &KernelOffsets,
    task: *const u8,
    pidtype: u32,
) -> Result<u32, i32> {
    let signal = kptr(task, o.task_signal)?;
    let pid = kptr(signal, o.signal_pids + 8 * pidtype)?;
    kread::<u32>(pid, o.pid_numbers_nr)
}

/// The job of the current task: its process group within its session. Tasks with no process
/// group of their own (pgid 0 or 1: children of a bare init, kernel threads) are each their own
/// job, keyed by their tgid, so that unrelated processes are never lumped together.
#[inline(always)]
pub(crate) fn job_key(o: &KernelOffsets, task: *const u8, tgid: u32) -> JobKey {
    let pgid = task_pid_of_type(o, task, o.pidtype_pgid).unwrap_or(0);
    let sid = task_pid_of_type(o, task, o.pidtype_sid).unwrap_or(0);
    JobKey {
        sid,
        pgid: if pgid <= 1 { tgid } else { pgid },
    }
}

/// Whether the current task belongs to the agent named by (`agent_tgid`, start time range): the
/// start time of its thread group leader must match too, so a process that got a dead agent's
/// pid is judged like any other.
#[inline(always)]
pub(crate) fn is_current_agent(o: &KernelOffsets, agent_tgid: u32, lo: u64, hi: u64) -> bool {
    if o.task_start_boottime == 0 || o.task_group_leader == 0 {
        return false;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Ok(leader) = kptr(current_task(), o.task_group_leader) else {
        return false;
    };
    let start: u64 = kread(leader, o.task_start_boottime).unwrap_or(0);
    is_agent(tgid, start, agent_tgid, lo, hi)
}
