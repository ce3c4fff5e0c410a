//! The tier in force behind one interface: the kernel programs (with their event ring) or the
//! userspace watcher. The daemon installs the policy, reads and updates jobs, and drains events
//! through [`Backend`] without asking which tier it runs.
use std::{
    os::fd::{AsFd, BorrowedFd},
    path::PathBuf,
};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use guardrail_common::{Event, JobKey, JobState};

use crate::{
    policy::LoadedPolicy,
    tiers::{
        sensor::{KernelPolicy, Sensor},
        userspace::{self, Fallback},
    },
};

/// What enforces: the kernel programs (with their event ring), or the userspace watcher. The
/// policy, jobs, holds, approve/deny/timeout, summaries and events work the same over either.
pub(crate) enum Backend {
    Bpf {
        sensor: Box<Sensor>,
        ring: RingBuf<MapData>,
    },
    Userspace(Box<Fallback>),
}

impl Backend {
    pub(crate) fn install_policy(&mut self, p: &KernelPolicy) -> Result<()> {
        match self {
            Backend::Bpf { sensor, .. } => sensor.install_policy(p),
            Backend::Userspace(f) => f.install_policy(p),
        }
    }

    pub(crate) fn job(&mut self, key: &JobKey) -> Result<Option<JobState>> {
        match self {
            Backend::Bpf { sensor, .. } => sensor.job(key),
            Backend::Userspace(f) => Ok(f.job(key)),
        }
    }

    pub(crate) fn set_job(&mut self, key: &JobKey, state: &JobState) -> Result<()> {
        match self {
            Backend::Bpf { sensor, .. } => sensor.set_job(key, state),
            Backend::Userspace(f) => {
                f.set_job(key, state);
                Ok(())
            }
        }
    }

    pub(crate) fn jobs(&mut self) -> Result<Vec<(JobKey, JobState)>> {
        match self {
            Backend::Bpf { sensor, .. } => sensor.jobs(),
            Backend::Userspace(f) => Ok(f.jobs()),
        }
    }

    pub(crate) fn remove_job(&mut self, key: &JobKey) -> Result<()> {
        match self {
            Backend::Bpf { sensor, .. } => sensor.remove_job(key),
            Backend::Userspace(f) => {
                f.remove_job(key);
                Ok(())
            }
        }
    }

    /// Programs attached, or what the watcher watches.
    pub(crate) fn attached(&self) -> Vec<String> {
        match self {
            Backend::Bpf { sensor, .. } => {
                sensor.attached().iter().map(|s| s.to_string()).collect()
            }
            Backend::Userspace(f) => f.watching(),
        }
    }

    /// A fresh incident id from the counter the enforcement side numbers incidents with.
    pub(crate) fn next_incident(&mut self) -> u64 {
        match self {
            Backend::Bpf { sensor, .. } => crate::tiers::sensor::next_incident_or_log(sensor),
            Backend::Userspace(f) => f.next_incident(),
        }
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Backend::Bpf { ring, .. } => ring.as_fd(),
            Backend::Userspace(f) => f.as_fd(),
        }
    }

    /// Events ready now (state changes only).
    /// Deletion events, and the shutdown guard's records (same ring buffer, told apart by kind).
    pub(crate) fn drain(&mut self) -> (Vec<Event>, Vec<guardrail_common::ShutdownEvent>) {
        use crate::tiers::decode::KernelEvent;
        match self {
            Backend::Bpf { ring, .. } => {
                let mut out = Vec::new();
                let mut shutdowns = Vec::new();
                while let Some(item) = ring.next() {
                    match crate::tiers::decode::decode(&item) {
                        Some(KernelEvent::Shutdown(ev)) => shutdowns.push(ev),
                        Some(KernelEvent::Deletion(ev)) => out.push(ev),
                        // Not a whole record of a known layout: nothing to act on.
                        None => {}
                    }
                }
                (out, shutdowns)
            }
            Backend::Userspace(f) => (f.process(), Vec::new()),
        }
    }
}

/// The userspace tier's watcher: fanotify marks on the filesystem of `/` and on every filesystem
/// holding a path the policy declares (`Fallback::install_policy` adds those). Where fanotify is
/// unavailable, inotify over the policy's data directories and protected roots other than `/`
/// (inotify watches are per directory: a whole filesystem is out of reach).
pub(crate) fn start_userspace(policy: &LoadedPolicy) -> Result<Fallback> {
    match Fallback::new(
        &policy.kernel,
        &[PathBuf::from("/")],
        userspace::Watch::Fanotify,
    ) {
        Ok(f) => Ok(f),
        Err(e) => {
            let d = &policy.policy.deletion;
            let roots: Vec<PathBuf> = policy
                .compiled
                .data_dirs
                .iter()
                .chain(d.protected_roots.iter())
                .filter(|p| p.as_os_str() != "/" && p.is_dir())
                .cloned()
                .collect();
            if roots.is_empty() {
                return Err(e.context(
                    "fanotify is unavailable and the policy declares no directory inotify could watch",
                ));
            }
            eprintln!(
                "guardrail: fanotify unavailable ({e:#}); inotify on the declared directories only"
            );
            Fallback::new(&policy.kernel, &roots, userspace::Watch::Inotify)
        }
    }
}
