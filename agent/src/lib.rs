//! The agent, as a library: the `guardrail` binary (main.rs) is only its command line, and the
//! integration tests drive the userspace tier and the cgroup helpers through the same modules.
//!
//! The tree follows the data path, kernel event → decode → guard decision → incident → sinks,
//! and every module uses only the ones listed before it (checked by the `layering` test):
//! - [`text`], [`timefmt`]: escaping and capping job text; wall-clock times.
//! - [`host`]: facts about the host and its processes (/proc, cgroups, clocks, login sessions,
//!   mounts) and the agent's own stop signals.
//! - [`policy`]: where the policy comes from and the kernel tables it compiles to.
//! - [`tiers`]: how deletions and shutdowns are seen and stopped: the kernel tiers (`lsm`,
//!   `fmod_ret`, `tracepoint`: [`tiers::probe`] picks one, [`tiers::sensor`] loads and attaches
//!   it, [`tiers::pins`] keeps it across restarts, [`tiers::decode`] reads its ring buffer) and
//!   the `userspace` tier ([`tiers::userspace`]).
//! - [`incident`]: the incident schema and the event log's records.
//! - [`sinks`]: where incidents go: stdout and the event log ([`sinks::Sink`]), syslog,
//!   Alertmanager, metrics.
//! - [`control`]: the admin socket (protocol, server) and `status` with no agent running.
//! - [`guards`]: the two guards' agent side: [`guards::deletion`] (a pure decision per kernel
//!   event, holds, approvals, budgets above the job, job summaries) and [`guards::shutdown`]
//!   (session classes, refusals, confirmation passes, the logind inhibitor); [`guards::tell`]
//!   writes to a job's terminal.
//! - [`daemon`]: `guardrail agent`, the wiring of all the above and its poll loop.
//! - [`commands`]: the other subcommands that do work of their own (`selftest`, `generate`,
//!   `off`, `policy suggest`).
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

#[cfg(test)]
mod layering;

// The paths the integration tests (tests/) name, from before the modules had folders.
pub use host::cgroup;
pub use tiers::{sensor, userspace as fallback};

pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("GUARDRAIL_COMMIT"),
    ")"
);
