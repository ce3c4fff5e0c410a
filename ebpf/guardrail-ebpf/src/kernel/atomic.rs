//! Atomic read-modify-write on map values (BPF_ATOMIC; see the crate doc for why SeqCst).
use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg};

/// Atomic add returning the previous value.
#[inline(always)]
pub(crate) fn fetch_add(p: *mut u64, v: u64) -> u64 {
    // SAFETY: callers pass pointers into map values, valid and aligned for this program run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) }
}

/// Atomic add on a 32-bit field (its previous value is not needed).
#[inline(always)]
pub(crate) fn add_u32(p: *mut u32, v: u32) {
    // SAFETY: as for fetch_add.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(p, v) };
}

#[inline(always)]
pub(crate) fn swap(p: *mut u64, v: u64) -> u64 {
    // SAFETY: as for fetch_add.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(p, v) }
}

/// Compare-and-swap; true when this CPU made the change.
#[inline(always)]
pub(crate) fn cas(p: *mut u32, old: u32, new: u32) -> bool {
    // SAFETY: as for fetch_add.
    unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
    }
    .1
}
