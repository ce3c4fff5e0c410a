//! io_uring deletions in the `tracepoint` tier (the `lsm` tier sees them in its inode hooks).
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use guardrail_common::*;

use super::{Deletion, judge::judge};
use crate::kernel::offsets::offsets;

pub(crate) const IORING_OP_RENAMEAT: u8 = 35;

pub(crate) const IORING_OP_UNLINKAT: u8 = 36;

/// io_uring requests never pass the syscall tracepoints; the submit tracepoint shows the opcode
/// (its offset in the record is resolved from the tracepoint's format file). No path is known
/// here, so io_uring deletions always count against the budget in this tier.
#[tracepoint(category = "io_uring", name = "io_uring_submit_req")]
pub fn io_uring_submit_req(ctx: TracePointContext) -> u32 {
    let o = offsets();
    if o.io_uring_opcode == 0 {
        return 0;
    }
    // SAFETY: reading inside the tracepoint record.
    let opcode: u8 = unsafe { ctx.read_at::<u8>(o.io_uring_opcode as usize) }.unwrap_or(0);
    let op = match opcode {
        IORING_OP_UNLINKAT => OP_IO_URING_UNLINK,
        IORING_OP_RENAMEAT => OP_IO_URING_RENAME,
        _ => return 0,
    };
    let d = Deletion {
        parent: core::ptr::null(),
        entry: core::ptr::null(),
        user_path: core::ptr::null(),
        op,
        tier_flags: EVF_TRACEPOINT | EVF_IO_URING,
    };
    let _ = judge(&d);
    0
}
