//! Incident ids for the agent, from the kernel's own counter.
//!
//! Deletion programs number their incidents with an atomic add on `INCIDENTS`. The agent makes
//! incidents too (shutdown refusals, a hold it adopts with no id). A userspace read-then-write of
//! the counter is not atomic with the kernel's add: a crossing numbered in between took the same
//! id, and two incidents (two `guardrail approve N` targets) shared one number. The agent instead
//! runs this program with `BPF_PROG_TEST_RUN` (a socket filter: every kernel since 4.12 can
//! test-run one, and it is never attached), so every id comes from the same atomic add.
use aya_ebpf::{macros::socket_filter, programs::SkBuffContext};

/// Returns the next incident id (ids stay far below 2^32; 0 means the counter was unreadable).
#[socket_filter]
pub fn incident_id(_ctx: SkBuffContext) -> i64 {
    match crate::kernel::events::INCIDENTS.get_ptr_mut(0) {
        Some(p) => (crate::kernel::atomic::fetch_add(p, 1) + 1) as u32 as i64,
        None => 0,
    }
}
