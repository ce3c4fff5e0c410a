//! Decoding one record of the kernel programs' events ring buffer, in one place: the daemon and
//! `guardrail selftest` both read the ring through [`decode`].
//!
//! Each record is exactly one `#[repr(C)]` struct of guardrail-common, told apart by its first
//! field (`kind`): [`ShutdownEvent`] for `EV_SHUTDOWN`, [`Event`] for everything else. The ring
//! buffer reports each record's exact reserved size, so a record of any other length is not
//! ours to read (a layout mismatch or a corrupted ring) and is dropped rather than half-read.
use guardrail_common::{EV_SHUTDOWN, Event, ShutdownEvent};

/// What one ring buffer record says.
#[derive(Clone, Copy, Debug)]
pub enum KernelEvent {
    /// Deletion guard: a budget crossed, a refusal, a retry of a held job, ...
    Deletion(Event),
    /// Shutdown guard: one shutdown-class request and what the kernel did with it.
    Shutdown(ShutdownEvent),
}

/// The event in `item`, if it is a whole record of a known layout (never panics).
pub fn decode(item: &[u8]) -> Option<KernelEvent> {
    let kind = u32::from_ne_bytes(item.get(..4)?.try_into().ok()?);
    if kind == EV_SHUTDOWN {
        read::<ShutdownEvent>(item).map(KernelEvent::Shutdown)
    } else {
        read::<Event>(item).map(KernelEvent::Deletion)
    }
}

/// A `T` copied out of `item` when `item` is exactly its size.
fn read<T: Plain>(item: &[u8]) -> Option<T> {
    if item.len() != std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `item` holds exactly size_of::<T>() bytes; `T: Plain` has no padding and is valid
    // for every bit pattern (integers and byte arrays only); read_unaligned copes with the ring
    // buffer's alignment.
    Some(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const T) })
}

/// `#[repr(C)]` records made only of integers and integer arrays, without padding: any bytes of
/// the right length are a valid value. Checked for each by the tests below.
trait Plain: Copy {}
impl Plain for Event {}
impl Plain for ShutdownEvent {}

#[cfg(test)]
mod tests {
    use super::*;
    use guardrail_common::{EV_BUDGET_CROSSED, EV_DATA_DIR};
    use proptest::prelude::*;
    use std::mem::size_of;

    /// The bytes of a record, as the kernel would lay them out.
    fn bytes_of<T: Plain>(v: &T) -> Vec<u8> {
        let mut out = vec![0u8; size_of::<T>()];
        // SAFETY: T has no padding (see `no_padding`), so every byte of `v` is initialised.
        unsafe {
            std::ptr::copy_nonoverlapping(
                v as *const T as *const u8,
                out.as_mut_ptr(),
                size_of::<T>(),
            )
        };
        out
    }

    #[test]
    fn no_padding() {
        // Sum of the fields' sizes: 12 u32, 4 u64, comm, the path names.
        let event =
            12 * 4 + 4 * 8 + 16 + guardrail_common::EVENT_PATH_DEPTH * guardrail_common::NAME_LEN;
        assert_eq!(size_of::<Event>(), event);
        let shutdown =
            14 * 4 + 2 * 8 + 16 + guardrail_common::SD_ARGV_WORDS * guardrail_common::SD_WORD_LEN;
        assert_eq!(size_of::<ShutdownEvent>(), shutdown);
    }

    #[test]
    fn known_records_decode() {
        let mut e = Event::zeroed();
        e.kind = EV_DATA_DIR;
        e.pgid = 4242;
        e.count = 7;
        e.comm[..2].copy_from_slice(b"rm");
        let Some(KernelEvent::Deletion(d)) = decode(&bytes_of(&e)) else {
            panic!("an Event decodes as a deletion event");
        };
        assert_eq!(
            (d.kind, d.pgid, d.count, &d.comm[..3]),
            (EV_DATA_DIR, 4242, 7, &b"rm\0"[..])
        );
        let mut raw = vec![0u8; size_of::<ShutdownEvent>()];
        raw[..4].copy_from_slice(&EV_SHUTDOWN.to_ne_bytes());
        raw[24..28].copy_from_slice(&99u32.to_ne_bytes()); // tgid
        let Some(KernelEvent::Shutdown(s)) = decode(&raw) else {
            panic!("EV_SHUTDOWN decodes as a shutdown event");
        };
        assert_eq!((s.kind, s.tgid), (EV_SHUTDOWN, 99));
        // A shutdown kind at the size of an Event, and the other way round: neither.
        let mut wrong = bytes_of(&e);
        wrong[..4].copy_from_slice(&EV_SHUTDOWN.to_ne_bytes());
        assert!(decode(&wrong).is_none());
        raw[..4].copy_from_slice(&EV_BUDGET_CROSSED.to_ne_bytes());
        assert!(decode(&raw).is_none());
        assert!(decode(&[]).is_none() && decode(&[1, 0, 0]).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any bytes (often of exactly one record's size): no panic, and a record exactly when
        /// the length is the one its kind says.
        #[test]
        fn arbitrary_bytes_never_panic(item in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..800),
            proptest::collection::vec(any::<u8>(), size_of::<Event>()),
            proptest::collection::vec(any::<u8>(), size_of::<ShutdownEvent>()),
        ], shutdown_kind in any::<bool>()) {
            let mut item = item;
            if shutdown_kind && item.len() >= 4 {
                item[..4].copy_from_slice(&EV_SHUTDOWN.to_ne_bytes());
            }
            let got = match decode(&item) {
                None => "none",
                Some(KernelEvent::Deletion(_)) => "deletion",
                Some(KernelEvent::Shutdown(_)) => "shutdown",
            };
            let shutdown = item.get(..4) == Some(&EV_SHUTDOWN.to_ne_bytes()[..]);
            let want = if item.len() < 4 {
                "none"
            } else if shutdown {
                if item.len() == size_of::<ShutdownEvent>() { "shutdown" } else { "none" }
            } else if item.len() == size_of::<Event>() {
                "deletion"
            } else {
                "none"
            };
            prop_assert_eq!(got, want, "{} bytes", item.len());
        }

        /// A whole record of either layout decodes to the same bytes; one byte more or less is
        /// rejected.
        #[test]
        fn valid_records_round_trip(
            body in proptest::collection::vec(any::<u8>(), size_of::<Event>()),
            kind in prop_oneof![1u32..16, 17u32..u32::MAX],
            shutdown in any::<bool>(),
            extra in any::<u8>(),
        ) {
            let mut item = body;
            if shutdown {
                item.truncate(size_of::<ShutdownEvent>());
                item[..4].copy_from_slice(&EV_SHUTDOWN.to_ne_bytes());
            } else {
                item[..4].copy_from_slice(&kind.to_ne_bytes());
            }
            let back = match decode(&item) {
                Some(KernelEvent::Deletion(e)) if !shutdown => bytes_of(&e),
                Some(KernelEvent::Shutdown(s)) if shutdown => bytes_of(&s),
                other => return Err(TestCaseError::fail(format!("{other:?} for {} bytes", item.len()))),
            };
            prop_assert_eq!(&back, &item);
            let mut longer = item.clone();
            longer.push(extra);
            prop_assert!(decode(&longer).is_none());
            prop_assert!(decode(&item[..item.len() - 1]).is_none());
        }
    }
}
