//! The agent's own memory: start-up (the kernel's BTF parsed to resolve offsets and attach
//! points, the BPF object relocated and loaded) allocates tens of MiB that are freed once the
//! programs are attached, but glibc keeps freed heap in its arenas, where it stays resident for
//! the agent's whole life. Handing it back keeps the idle agent small.

/// Returns freed heap to the kernel (glibc `malloc_trim`); a no-op elsewhere.
pub fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Caps glibc's malloc arenas at two: every thread that allocates would otherwise get an arena
/// of its own (up to 8 per CPU), each keeping its freed memory resident. The agent's threads
/// (admin clients, sinks) allocate little and rarely, so contention does not matter. Called
/// first thing in `main`, before any thread starts.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt has no preconditions; M_ARENA_MAX takes a count.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
