//! What every program shares, whatever the guard: kernel struct reads through BTF-resolved
//! offsets, the current task, atomics on map values, signals to the current task, and the event
//! ring buffer with the incident counter.
pub(crate) mod atomic;
pub(crate) mod events;
pub(crate) mod fs;
pub(crate) mod offsets;
pub(crate) mod signal;
pub(crate) mod task;

pub(crate) const EPERM: i32 = 1;
