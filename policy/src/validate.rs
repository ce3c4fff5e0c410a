//! Stage 2: from the merged raw model to [`Policy`], with every diagnostic positioned.
//!
//! One file per section: deletion.rs, shutdown.rs, alerts.rs; fields.rs holds the validators of
//! single values that every section uses. This file holds what they share (the built-in defaults,
//! the validator state [`V`], the identity key) and the entry point.

use std::path::PathBuf;

use crate::diag::Sink;
use crate::model::*;
use crate::raw::*;
use crate::resolver::Resolver;

mod alerts;
mod deletion;
mod fields;
mod shutdown;

use alerts::validate_alerts;
use deletion::validate_deletion;
use shutdown::validate_shutdown;

/// Built-in values of keys the files leave out (the shipped policy writes them all out).
pub(crate) mod defaults {
    use std::time::Duration;
    pub const BUDGET: u64 = 300;
    pub const WINDOW: Duration = Duration::from_secs(60);
    pub const HOLD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
    /// `deletion.never_hold` when a policy does not say: what logins, logging and the bus need.
    pub const NEVER_HOLD: &[&str] = &[
        "init.scope",
        "systemd-logind.service",
        "systemd-journald.service",
        "systemd-udevd.service",
        "dbus.service",
        "dbus-broker.service",
        "ssh.service",
        "sshd.service",
        "guardrail.service",
    ];
    /// `[deletion.session]` and `[deletion.user]` when a section is there without a budget or
    /// window (a policy without the section has the level off).
    pub const SESSION_BUDGET: u64 = 500;
    pub const USER_BUDGET: u64 = 1000;
    pub const CONFIRM_WINDOW: Duration = Duration::from_secs(120);
    pub const EVENT_LOG: &str = "/var/log/guardrail/events.jsonl";
    pub const APP_NAME: &str = "guardrail";
    pub const FACILITY: &str = "authpriv";
}

/// Which identity a rule, exemption or owner names (for the kernel's lookup tables).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Key {
    Unit(String),
    Exe(PathBuf),
    User(String),
    Cgroup(String),
}

impl From<&JobMatch> for Key {
    fn from(m: &JobMatch) -> Self {
        match m {
            JobMatch::Unit(u) => Key::Unit(u.clone()),
            JobMatch::Executable(p) => Key::Exe(p.clone()),
            JobMatch::User(u) => Key::User(u.clone()),
            JobMatch::Cgroup(c) => Key::Cgroup(c.clone()),
        }
    }
}

pub(crate) struct V<'r, 's, 'm> {
    pub sink: &'s mut Sink<'m>,
    pub resolver: &'r dyn Resolver,
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// Borrowed view of the identity lists shared by owners and exemptions.
pub(crate) struct RawOwnersLike<'a> {
    units: Option<&'a Vec<Sp<String>>>,
    executables: Option<&'a Vec<Sp<String>>>,
    users: Option<&'a Vec<Sp<String>>>,
    cgroups: Option<&'a Vec<Sp<String>>>,
}

const MODES: &[(&str, Mode)] = &[("enforce", Mode::Enforce), ("audit", Mode::Audit)];

pub(crate) fn validate(raw: &RawFile, sources: Vec<String>, v: &mut V<'_, '_, '_>) -> Policy {
    let mode = v.choice(&raw.mode, "mode", MODES, Mode::Enforce);
    let del = raw.deletion.clone().unwrap_or_default();
    // Whole-section findings (a missing list) point at the start of the main file.
    let deletion = validate_deletion(&del, &(0..0), v);
    let sd = raw.shutdown.clone().unwrap_or_default();
    let shutdown = validate_shutdown(&sd, v);
    let al = raw.alerts.clone().unwrap_or_default();
    let al = &al;
    let alerts = validate_alerts(al, v);
    Policy {
        mode,
        deletion,
        shutdown,
        alerts,
        sources,
    }
}
