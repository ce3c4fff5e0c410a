//! What the shutdown guard asks of logind, from the policy: whether its block inhibitor lock is
//! wanted. The kernel tables themselves are compiled by the policy crate
//! (`guardrail_policy::compile_shutdown`) and installed as they are.
use guardrail_common::*;
use guardrail_policy as gp;

use super::inhibit::Want;

/// The logind lock is wanted when the kernel refuses anything: some class confirms or blocks,
/// and the policy enforces (audit mode never stops a request).
pub(super) fn inhibitor_want(
    policy: &gp::Shutdown,
    actions: &[u32; SD_CLASSES],
    audit: bool,
    host: &str,
) -> Want {
    if !policy.logind_inhibitor {
        return Want::No {
            reason: "turned off by the policy (shutdown.logind_inhibitor = false)".into(),
        };
    }
    if audit {
        return Want::No {
            reason: "audit mode (nothing is refused)".into(),
        };
    }
    if actions.contains(&SD_CONFIRM) {
        Want::Hold {
            why: format!("guardrail: remote shutdowns need `guardrail confirm {host}`"),
        }
    } else if actions.contains(&SD_BLOCK) {
        Want::Hold {
            why: "guardrail: the policy blocks shutdowns from some sessions".into(),
        }
    } else {
        Want::No {
            reason: "the policy allows every shutdown".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn the_logind_lock_follows_the_policy_switch() {
        let checked = gp::check_str(
            "(embedded default)",
            &format!(
                "{}\n",
                gp::DEFAULT_POLICY.replace("logind_inhibitor = true", "logind_inhibitor = false")
            ),
            &gp::SystemResolver,
        );
        let off = checked.policy.expect("valid");
        assert!(!off.shutdown.logind_inhibitor, "the switch is read");
        let a = gp::compile_shutdown(&off, &gp::SystemResolver).class_actions;
        assert_eq!(
            inhibitor_want(&off.shutdown, &a, false, "h"),
            Want::No {
                reason: "turned off by the policy (shutdown.logind_inhibitor = false)".into()
            }
        );
        let on = gp::check_str(
            "(embedded default)",
            gp::DEFAULT_POLICY,
            &gp::SystemResolver,
        )
        .policy
        .expect("valid");
        assert!(matches!(
            inhibitor_want(&on.shutdown, &a, false, "h"),
            Want::Hold { .. }
        ));
    }
}
