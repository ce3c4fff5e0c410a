//! Signals the kernel sends to the current task: the hold (SIGSTOP) and the kill.
use aya_ebpf::helpers::bpf_send_signal;

use super::{
    offsets::{kread, offsets},
    task::{PF_IO_WORKER, PF_KTHREAD, current_task},
};

pub(crate) const SIGKILL: u32 = 9;

pub(crate) const SIGSTOP: u32 = 19;

/// Sends SIGSTOP to the current process; true when it is now pending for a task that will see it
/// on its way back to userspace (not a kernel thread, not an io_uring worker, whose requests would
/// otherwise complete with the restart code).
#[inline(always)]
pub(crate) fn stop_self() -> bool {
    let o = offsets();
    let flags: u32 = kread(current_task(), o.task_flags).unwrap_or(PF_KTHREAD);
    if flags & (PF_KTHREAD | PF_IO_WORKER) != 0 {
        signal(SIGSTOP);
        return false;
    }
    // SAFETY: bpf_send_signal targets the current process.
    (unsafe { bpf_send_signal(SIGSTOP) }) == 0
}

#[inline(always)]
pub(crate) fn signal(sig: u32) {
    // SAFETY: bpf_send_signal targets the current process; failures (kernel threads) are
    // ignored because the agent stops the whole job from userspace as well.
    let _ = unsafe { bpf_send_signal(sig) };
}
