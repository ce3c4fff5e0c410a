//! What the deletion guard does with one kernel event, as a pure function of the event's kind
//! and flags, the rule's action and the job's state in the kernel's table: no signals, no
//! sinks, no maps. [`super::holds`] carries the decision out; the table below is its test.
use guardrail_common::{
    ACTION_ALERT, EV_BUDGET_CROSSED, EV_DATA_DIR, EV_HELD_RETRY, EV_PROTECTED_ROOT, EVF_ALERT,
    EVF_AUDIT, EVF_KILLED, EVF_NEVER_HOLD, EVF_SIGNALLED, EVF_TRACEPOINT, EVF_USERSPACE, Event,
    JOB_BLOCKED, JOB_HELD,
};

use super::{holds::resumed_before_read, levels};
use crate::incident::Outcome;

/// The guard's answer to one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Only an incident with this outcome: nothing to stop or continue.
    Report(Outcome),
    /// A tracepoint-tier refusal that could not refuse and stopped nothing (a never_hold unit's
    /// job): reported, saying the file is gone.
    ReportedAfterTheFact,
    /// A never_hold unit's job crossed its budget: reported (or refused where the tier refuses),
    /// never held.
    NeverHeld,
    /// The kernel held the job and this is the crossing: stop the whole job and open a hold
    /// (`unless_open`: not when a tick adopted it already under the same incident).
    Hold { unless_open: bool },
    /// The kernel blocked the job at its crossing (a `block` rule, a denied job): refused where
    /// the tier refuses, killed elsewhere.
    Blocked,
    /// The job resumed itself past the limit before this crossing was read: kill what is left
    /// and say why.
    KilledBeforeRead,
    /// A tracepoint-tier deletion in a foreign data directory: the kernel stopped (or killed)
    /// the job after that one file.
    StoppedForeign,
    /// The kernel killed a held job for resuming itself: close its hold, kill the rest.
    KilledResumed,
    /// A held job resumed without approval tried again: stop the whole job again.
    StopAgain,
    /// Nothing to do (a retry read after the job was let go; an unknown kind).
    Nothing,
}

/// Decides. `rule_alerts`: the event's rule has action `alert` (checked for sources that do not
/// set `EVF_ALERT`); `job_state`: the job's `JOB_*` in the kernel's table, asked only when the
/// decision depends on it (one map lookup).
pub(crate) fn decide(
    ev: &Event,
    rule_alerts: bool,
    job_state: impl FnOnce() -> Option<u32>,
) -> Decision {
    let f = ev.flags;
    match ev.kind {
        EV_BUDGET_CROSSED if f & EVF_AUDIT != 0 => Decision::Report(Outcome::WouldHaveHeld),
        // A level's crossing has its own action and always sets the flag.
        EV_BUDGET_CROSSED if f & EVF_ALERT != 0 || levels::level_of(f).is_none() && rule_alerts => {
            Decision::Report(Outcome::Alerted)
        }
        EV_BUDGET_CROSSED if f & EVF_NEVER_HOLD != 0 => Decision::NeverHeld,
        EV_BUDGET_CROSSED => match job_state().unwrap_or(JOB_HELD) {
            JOB_BLOCKED if resumed_before_read(ev) => Decision::KilledBeforeRead,
            JOB_BLOCKED => Decision::Blocked,
            _ => Decision::Hold { unless_open: true },
        },
        EV_PROTECTED_ROOT | EV_DATA_DIR => {
            if f & EVF_AUDIT != 0 {
                Decision::Report(Outcome::WouldHaveRefused)
            } else if f & EVF_USERSPACE != 0 {
                // Seen after the fact: the watcher stopped the job, unless it could name none.
                if f & EVF_SIGNALLED != 0 {
                    Decision::Hold { unless_open: false }
                } else {
                    Decision::Report(Outcome::Reported)
                }
            } else if f & EVF_TRACEPOINT != 0 && f & EVF_SIGNALLED != 0 {
                Decision::StoppedForeign
            } else if f & EVF_TRACEPOINT != 0 {
                Decision::ReportedAfterTheFact
            } else {
                Decision::Report(Outcome::Refused)
            }
        }
        EV_HELD_RETRY if f & EVF_KILLED != 0 => Decision::KilledResumed,
        // Only while still held: a retry read after the job was let go (approved or denied) was
        // made before that, and its task has been continued with the job.
        EV_HELD_RETRY if job_state() == Some(JOB_HELD) => Decision::StopAgain,
        _ => Decision::Nothing,
    }
}

/// Whether the event's rule has action `alert`.
pub(crate) fn rule_alerts(rules: &[guardrail_common::RuleParams], rule: u32) -> bool {
    rules
        .get(rule as usize)
        .is_some_and(|r| r.action == ACTION_ALERT)
}

#[cfg(test)]
mod tests {
    use guardrail_common::{EVF_BLOCKED, JOB_ACTIVE, JOB_DENIED};

    use super::*;

    fn ev(kind: u32, flags: u32) -> Event {
        let mut e = Event::zeroed();
        e.kind = kind;
        e.flags = flags;
        e
    }

    /// Every path through [`decide`]: (kind, flags, rule is `alert`, job state) → decision.
    #[test]
    fn every_event_gets_the_decision_its_tier_and_state_call_for() {
        use Decision as D;
        const TP: u32 = EVF_TRACEPOINT | EVF_SIGNALLED;
        let level_flag = guardrail_common::EVF_LEVEL_SESSION;
        let table: &[(u32, u32, bool, Option<u32>, D)] = &[
            (
                EV_BUDGET_CROSSED,
                EVF_AUDIT,
                false,
                None,
                D::Report(Outcome::WouldHaveHeld),
            ),
            (
                EV_BUDGET_CROSSED,
                EVF_ALERT,
                false,
                None,
                D::Report(Outcome::Alerted),
            ),
            (
                EV_BUDGET_CROSSED,
                0,
                true,
                None,
                D::Report(Outcome::Alerted),
            ),
            // A level's crossing under an `alert` job rule holds: the level's action decides.
            (
                EV_BUDGET_CROSSED,
                level_flag,
                true,
                Some(JOB_HELD),
                D::Hold { unless_open: true },
            ),
            (EV_BUDGET_CROSSED, EVF_NEVER_HOLD, false, None, D::NeverHeld),
            (
                EV_BUDGET_CROSSED,
                0,
                false,
                Some(JOB_HELD),
                D::Hold { unless_open: true },
            ),
            // No entry (gone already): held, as the kernel said.
            (
                EV_BUDGET_CROSSED,
                0,
                false,
                None,
                D::Hold { unless_open: true },
            ),
            // LSM: blocked is a refusal, never a self-resume.
            (EV_BUDGET_CROSSED, 0, false, Some(JOB_BLOCKED), D::Blocked),
            (
                EV_BUDGET_CROSSED,
                TP | EVF_BLOCKED,
                false,
                Some(JOB_BLOCKED),
                D::Blocked,
            ),
            (
                EV_BUDGET_CROSSED,
                TP,
                false,
                Some(JOB_BLOCKED),
                D::KilledBeforeRead,
            ),
            (
                EV_DATA_DIR,
                EVF_AUDIT,
                false,
                None,
                D::Report(Outcome::WouldHaveRefused),
            ),
            (
                EV_PROTECTED_ROOT,
                EVF_AUDIT | TP,
                false,
                None,
                D::Report(Outcome::WouldHaveRefused),
            ),
            (
                EV_DATA_DIR,
                EVF_USERSPACE | EVF_SIGNALLED,
                false,
                None,
                D::Hold { unless_open: false },
            ),
            (
                EV_DATA_DIR,
                EVF_USERSPACE,
                false,
                None,
                D::Report(Outcome::Reported),
            ),
            (EV_DATA_DIR, TP, false, None, D::StoppedForeign),
            (EV_PROTECTED_ROOT, TP, false, None, D::StoppedForeign),
            (
                EV_DATA_DIR,
                EVF_TRACEPOINT,
                false,
                None,
                D::ReportedAfterTheFact,
            ),
            (
                EV_PROTECTED_ROOT,
                0,
                false,
                None,
                D::Report(Outcome::Refused),
            ),
            (EV_DATA_DIR, 0, false, None, D::Report(Outcome::Refused)),
            (EV_HELD_RETRY, EVF_KILLED, false, None, D::KilledResumed),
            (EV_HELD_RETRY, 0, false, Some(JOB_HELD), D::StopAgain),
            (EV_HELD_RETRY, 0, false, Some(JOB_ACTIVE), D::Nothing),
            (EV_HELD_RETRY, 0, false, Some(JOB_DENIED), D::Nothing),
            (EV_HELD_RETRY, 0, false, None, D::Nothing),
            (999, 0, false, Some(JOB_HELD), D::Nothing),
        ];
        for (kind, flags, alerts, state, want) in table {
            let got = decide(&ev(*kind, *flags), *alerts, || *state);
            assert_eq!(
                &got, want,
                "kind {kind} flags {flags:#x} alert {alerts} state {state:?}"
            );
        }
    }

    /// The job's state is read only where it matters (one map lookup per event at most).
    #[test]
    fn the_kernel_is_asked_only_when_the_decision_depends_on_it() {
        let asked = std::cell::Cell::new(0);
        let state = || {
            asked.set(asked.get() + 1);
            Some(JOB_HELD)
        };
        decide(&ev(EV_BUDGET_CROSSED, EVF_AUDIT), false, state);
        decide(
            &ev(EV_DATA_DIR, EVF_TRACEPOINT | EVF_SIGNALLED),
            false,
            state,
        );
        assert_eq!(asked.get(), 0);
        decide(&ev(EV_BUDGET_CROSSED, 0), false, state);
        decide(&ev(EV_HELD_RETRY, 0), false, state);
        assert_eq!(asked.get(), 2);
    }
}
