//! The agent, as a library: the `guardrail` binary (main.rs) is only its command line, and the
//! integration tests drive the userspace tier and the cgroup helpers through the same modules.
//!
//! The tree follows the data path, kernel event → decode → guard decision → incident → sinks:
//! - [`tiers`]: how deletions and shutdowns are seen and stopped: the kernel tiers (`lsm`,
//!   `fmod_ret`, `tracepoint`: [`tiers::probe`] picks one, [`tiers::sensor`] loads and attaches
//!   it, [`tiers::pins`] keeps it across restarts) and the `userspace` tier ([`tiers::userspace`]).
//! - [`incident`]: the incident schema, and the one decoder of the kernel's ring buffer.
//! - [`guards`]: the two guards' agent side: [`guards::deletion`] (holds, approvals, budgets
//!   above the job, job summaries) and [`guards::shutdown`] (session classes, refusals,
//!   confirmation passes, the logind inhibitor); [`guards::tell`] writes to a job's terminal.
//! - [`sinks`]: where incidents go besides the event log: syslog, Alertmanager, metrics.
//! - [`control`]: the admin socket (protocol, server) and `status` with no agent running.
//! - [`daemon`]: `guardrail agent`, the wiring of all the above and its poll loop.
//! - [`policy`]: where the policy comes from and how it becomes the kernel's tables.
//! - [`host`]: facts about the host and its processes (/proc, cgroups, clocks, login sessions).
//! - [`commands`]: the other subcommands that do work of their own (`selftest`, `generate`).
pub mod commands;
pub mod control;
pub mod daemon;
pub mod guards;
pub mod host;
pub mod incident;
pub mod policy;
pub mod sinks;
pub mod text;
pub mod tiers;
pub mod timefmt;

// The paths the integration tests (tests/) name, from before the modules had folders.
pub use host::cgroup;
pub use tiers::{sensor, userspace as fallback};

pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("GUARDRAIL_COMMIT"),
    ")"
);
