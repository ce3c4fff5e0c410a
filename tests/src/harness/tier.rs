//! The tier a scenario needs. The host tests are written for the host kernel of the README
//! ("How the tiers are tested"): one that refuses BPF LSM and fmod_ret, so the agent runs the
//! tracepoint tier; the lsm and fmodret tiers are tested in the VM (`cargo xtask vm`). No host
//! test is gated (none is skipped anywhere): a scenario whose numbers hold for one tier only
//! states it with [`Agent::require_tier`], which fails the test with a message saying so when the
//! agent runs another tier, rather than letting it fail later on a count.
use std::fmt;

use crate::Agent;

/// A deletion tier, as the agent names it ("guardrail: tier NAME in force").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Lsm,
    Fmodret,
    Tracepoint,
    Userspace,
}

impl Tier {
    pub const ALL: [Tier; 4] = [Tier::Lsm, Tier::Fmodret, Tier::Tracepoint, Tier::Userspace];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Lsm => "lsm",
            Tier::Fmodret => "fmodret",
            Tier::Tracepoint => "tracepoint",
            Tier::Userspace => "userspace",
        }
    }

    /// The line the agent prints once the tier is attached.
    pub fn in_force_line(self) -> String {
        format!("guardrail: tier {} in force", self.name())
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the host kernel is, for the message of a test that cannot run on it.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r`.
    pub release: String,
    /// The active LSMs (/sys/kernel/security/lsm), empty where securityfs is not mounted.
    pub lsm: Vec<String>,
}

impl Kernel {
    pub fn host() -> Kernel {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let lsm = std::fs::read_to_string("/sys/kernel/security/lsm")
            .unwrap_or_default()
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        Kernel { release, lsm }
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel {} (LSMs: {})", self.release, self.lsm.join(","))
    }
}

impl Agent {
    /// The tier the agent said it attached, from its output.
    pub fn tier(&self) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| self.saw(&t.in_force_line()))
    }

    /// Fails the test unless the agent runs `tier`, naming what it runs instead and on which
    /// kernel: the scenario's bounds (files gone at a hold, a stop after the deletion rather than
    /// a refusal) are that tier's.
    pub fn require_tier(&self, tier: Tier) {
        let got = self.tier();
        assert!(
            got == Some(tier),
            "THIS SCENARIO NEEDS THE {} TIER, but the agent runs {} on {}. The host tests are \
             written for a host kernel that refuses BPF LSM and fmod_ret (README, \"How the \
             tiers are tested\"); the other tiers are tested in the VM (`cargo xtask vm`).\n\
             agent log:\n{}",
            tier.name().to_uppercase(),
            got.map_or("no tier yet".to_string(), |t| format!("tier {t}")),
            Kernel::host(),
            self.log()
        );
    }
}
