//! The deletion guard's global configuration and how the kernel recognises the agent.

/// Whether a task whose thread group leader started at `start_ns` (`start_boottime`) with
/// `tgid` is the agent the configuration names: the tgid and the start time must both match, so
/// a process that inherits a dead agent's pid is not exempt.
#[inline(always)]
pub fn is_agent(tgid: u32, start_ns: u64, agent_tgid: u32, lo: u64, hi: u64) -> bool {
    agent_tgid != 0 && tgid == agent_tgid && start_ns != 0 && lo <= start_ns && start_ns < hi
}

/// Global mode: enforce.
pub const MODE_ENFORCE: u32 = 0;
/// Global mode: audit (nothing refused or stopped anywhere).
pub const MODE_AUDIT: u32 = 1;

/// The one element of the `CONFIG` array map, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Which policy slot is in force.
    pub active_slot: u32,
    /// `MODE_*`.
    pub mode: u32,
    /// The agent's own tgid: its deletions (state files) are never counted.
    pub agent_tgid: u32,
    /// Non-zero once a policy has been written: until then the kernel side allows everything
    /// (the agent writes the policy before it attaches, so this is a belt to the braces).
    pub policy_loaded: u32,
    /// Monotonic incident counter base; the kernel adds to `INCIDENTS` on each new hold.
    pub incident_base: u64,
    /// The agent's identity besides its tgid: its start time (`task_struct.start_boottime` of
    /// the thread group leader, ns) lies in `[agent_start_lo, agent_start_hi)`. A process that
    /// later gets a dead agent's pid started after it and is judged like any other. Both 0: no
    /// process is the agent.
    pub agent_start_lo: u64,
    pub agent_start_hi: u64,
    /// Bumped by the agent at every policy install: the tracepoint tier's scope cache
    /// (`deletion/cache.rs`) keeps a verdict only for the policy it was judged under.
    pub policy_gen: u64,
}
