//! The ring buffer both guards report through, and the kernel's incident counter (the one place
//! incident ids are allocated).
use aya_ebpf::{
    macros::map,
    maps::{Array, RingBuf},
};

use super::atomic::fetch_add;

#[map]
pub(crate) static INCIDENTS: Array<u64> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

pub(crate) fn next_incident() -> u64 {
    match INCIDENTS.get_ptr_mut(0) {
        Some(p) => fetch_add(p, 1) + 1,
        None => 1,
    }
}
