//! Stop signals from the agent's first instruction to its last.
//!
//! SIGINT, SIGTERM and SIGHUP are blocked at the very start of `main`, before any thread exists
//! (every thread inherits the mask) and before anything slow (BTF parse, program loads: seconds
//! under emulation). They are read from one signalfd: start-up checks it between its steps and
//! inside its loops ([`check`]), the daemon's poll loop waits on it. A stop asked for during
//! start-up is therefore never lost (before, the default disposition was restored only once the
//! agent was serving, so a SIGTERM in between was ignored and systemd waited for SIGKILL), and a
//! second SIGINT during clean-up cannot interrupt the clean-up half way: it stays queued, unread.
use std::sync::{
    OnceLock,
    atomic::{AtomicI32, Ordering},
};

use nix::sys::{
    signal::{SigSet, Signal},
    signalfd::{SfdFlags, SignalFd},
};

static SIGNALS: OnceLock<SignalFd> = OnceLock::new();
/// The stop signal read so far (0: none).
static STOP: AtomicI32 = AtomicI32::new(0);

fn mask() -> SigSet {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        mask.add(s);
    }
    mask
}

/// Blocks the agent's signals in the calling (main) thread and opens the signalfd. Call first
/// thing in `main`, before any thread is spawned.
pub fn block_signals() -> nix::Result<()> {
    let mask = mask();
    mask.thread_block()?;
    let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    let _ = SIGNALS.set(fd);
    Ok(())
}

/// The signalfd [`block_signals`] opened (None in the admin commands and in tests of modules).
pub fn signals() -> Option<&'static SignalFd> {
    SIGNALS.get()
}

/// Records a stop signal read by whoever drained the signalfd.
pub fn note_stop(sig: Signal) {
    let _ = STOP.compare_exchange(0, sig as i32, Ordering::SeqCst, Ordering::SeqCst);
}

/// Drains the signalfd and says whether a stop (SIGINT, SIGTERM) was asked for. A SIGHUP read
/// here, during start-up, asks for nothing more: the policy and the event log are being opened
/// fresh anyway.
pub fn stop_requested() -> Option<Signal> {
    if let Some(fd) = SIGNALS.get() {
        while let Ok(Some(info)) = fd.read_signal() {
            if let Ok(s @ (Signal::SIGINT | Signal::SIGTERM)) =
                Signal::try_from(info.ssi_signo as i32)
            {
                note_stop(s);
            }
        }
    }
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        n => Signal::try_from(n).ok(),
    }
}

/// The stop signal read so far, without reading the signalfd (the daemon's loop reads it).
pub fn stop_noted() -> Option<Signal> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        n => Signal::try_from(n).ok(),
    }
}

/// Start-up was stopped by a signal: the agent cleans up what it attached so far and exits 0.
#[derive(Debug)]
pub struct Interrupted(pub Signal);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} received during start-up", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// Between start-up steps: Err([`Interrupted`]) once a stop was asked for.
pub fn check() -> anyhow::Result<()> {
    match stop_requested() {
        Some(s) => Err(Interrupted(s).into()),
        None => Ok(()),
    }
}

/// Whether `e` (or what it wraps) is a stop during start-up.
pub fn interrupted(e: &anyhow::Error) -> Option<Signal> {
    e.chain()
        .find_map(|c| c.downcast_ref::<Interrupted>())
        .map(|i| i.0)
}
