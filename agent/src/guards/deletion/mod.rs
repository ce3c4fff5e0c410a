//! The deletion guard, agent side: its decisions on the kernel's crossings, kills and refusals
//! ([`decide`], pure and table-tested; carried out by [`holds`]), the incident a kernel event becomes ([`report`]), the admin verbs on held jobs
//! ([`admin`]), what an approval grants ([`approval`]), how a crossing of a budget above the job
//! is worded ([`levels`]), and job summaries and their replay ([`replay`]).
pub mod admin;
pub mod approval;
pub mod decide;
pub mod holds;
pub mod levels;
pub mod replay;
pub mod report;

use std::{collections::BTreeMap, time::Instant};

use crate::{
    policy::LoadedPolicy,
    sinks::Sink,
    tiers::{backend::Backend, probe::Tier},
};

/// The deletion guard's own state: its open holds, the approvals each job had (shown with its
/// next hold), and what it remembers of the kernel's job table between ticks.
#[derive(Default)]
pub(crate) struct Guard {
    pub(crate) holds: BTreeMap<u64, holds::Hold>,
    pub(crate) approvals: approval::History,
    pub(crate) kernel_jobs: KernelJobs,
}

/// What the guard acts through, lent by the daemon for one decision: the tier's backend (the
/// kernel's maps, or the userspace watcher), the policy in force and the sinks.
pub(crate) struct Ctx<'a> {
    pub(crate) host: &'a str,
    pub(crate) tier: Tier,
    pub(crate) policy: &'a LoadedPolicy,
    pub(crate) backend: &'a mut Backend,
    pub(crate) sink: &'a mut Sink,
}

/// What the guard remembers about the kernel's job maps between ticks.
#[derive(Default)]
pub(crate) struct KernelJobs {
    /// Incidents of blocked jobs already reported (their crossing event, or found by a tick).
    pub(crate) blocked_reported: std::collections::BTreeSet<u64>,
    /// When the maps' fill was last measured (every 5 s: counting is one syscall per entry; the
    /// first tick after the agent was stalled measures at once, before ended jobs are removed).
    pub(crate) fill_checked: Option<Instant>,
    /// Whether `JOBS` / `HELD` were last reported 80 % full (reported again once below 50 %).
    pub(crate) jobs_full: bool,
    pub(crate) held_full: bool,
}
