//! The kernel's two clocks, read in one place. `CLOCK_MONOTONIC` is the base of
//! `bpf_ktime_get_ns` (job windows, confirmation passes, the alive promise, userspace-tier
//! events); `CLOCK_BOOTTIME` is the base of `bpf_ktime_get_boot_ns`, of
//! `task_struct.start_boottime` and /proc's `starttime` (when a hold began, who a process is).

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC` now, in ns: what the kernel programs compare windows and expiries with.
pub fn monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

/// `CLOCK_BOOTTIME` now, in ns: the clock of task start times and `JobState::held_ns`.
pub fn boottime_ns() -> u64 {
    read(libc::CLOCK_BOOTTIME)
}
