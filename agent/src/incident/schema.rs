//! The incident schema's closed vocabularies: what happened ([`Outcome`]), what was crossed or
//! requested ([`Kind`]) and what guardrail did ([`Action`]). Typed, so that every destination's
//! `match` is exhaustive and a new outcome cannot be silently mislabelled in one of them.
//!
//! The JSON strings are exactly the ones the event log has always carried (README, "Schema"):
//! the log's format does not change. Each enum ends in `Other(String)`, an untagged catch-all,
//! so that a line written by an older or newer agent still reads, and is written back unchanged.
use serde::{Deserialize, Serialize};

/// Defines a string enum: unit variants with their exact JSON strings, plus `Other(String)`.
macro_rules! vocabulary {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v,)*
            /// A string this agent does not write (an older or newer agent's log line), kept as
            /// read.
            #[serde(untagged)]
            Other(String),
        }

        impl $name {
            /// Every variant this agent knows, for tests and documentation.
            pub const KNOWN: &[$name] = &[$($name::$v,)*];

            /// The JSON string.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$v => $s,)*
                    $name::Other(s) => s,
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $($s => $name::$v,)*
                    other => $name::Other(other.to_string()),
                }
            }
        }

        /// Empty until decided: an incident's builder fills it in.
        impl Default for $name {
            fn default() -> Self {
                $name::Other(String::new())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

vocabulary! {
    /// What became of the job or the request.
    Outcome {
        /// A deletion job stopped until an admin decides.
        Held = "held",
        /// Audit mode: the job would have been held.
        WouldHaveHeld = "would_have_held",
        /// An `alert` rule's crossing: reported, nothing stopped.
        Alerted = "alerted",
        /// A crossing the tier could only report (never_hold, or no job to stop).
        Reported = "reported",
        /// The kernel refused the deletion (or the shutdown request).
        Refused = "refused",
        /// Audit mode: the operation would have been refused.
        WouldHaveRefused = "would_have_refused",
        /// The job (or the shutdown program) was killed.
        Killed = "killed",
        /// An admin approved the hold.
        Approved = "approved",
        /// An admin denied the hold.
        Denied = "denied",
        /// The hold timed out.
        TimedOut = "timed_out",
        /// The held job ended by itself.
        Ended = "ended",
        /// The agent stopped and ended the held job (`deletion.on_agent_stop`).
        EndedOnAgentStop = "ended_on_agent_stop",
        /// The agent stopped and let the held job go on (`deletion.on_agent_stop`).
        ContinuedOnAgentStop = "continued_on_agent_stop",
        /// A shutdown request that used a confirmation pass.
        Confirmed = "confirmed",
        /// A shutdown request the policy allows.
        Allowed = "allowed",
        /// A shutdown request allowed because its unit is an exception.
        AllowedByException = "allowed_by_exception",
        /// Older agents' shutdown outcomes, still read from old logs.
        ShutdownRefused = "shutdown_refused",
        ShutdownConfirmed = "shutdown_confirmed",
        Granted = "granted",
    }
}

vocabulary! {
    /// What the incident is about.
    Kind {
        /// A job's deletions outside its targets went past its budget (or a level's).
        BudgetCrossed = "budget_crossed",
        /// A deletion of a protected root.
        ProtectedRoot = "protected_root",
        /// A deletion in a data directory.
        DataDir = "data_dir",
        /// A shutdown request.
        Shutdown = "shutdown",
        /// `guardrail confirm HOST`: a confirmation pass granted.
        ShutdownConfirmation = "shutdown_confirmation",
    }
}

vocabulary! {
    /// What guardrail did.
    Action {
        Hold = "hold",
        Block = "block",
        Refuse = "refuse",
        /// Audit mode: computed, stopped nothing.
        Audit = "audit",
        Approve = "approve",
        Deny = "deny",
        Timeout = "timeout",
        Close = "close",
        Allow = "allow",
        None = "none",
    }
}

impl Outcome {
    /// Whether this outcome closes a hold (the hold's alert is resolved, its gauge drops).
    pub fn closes_hold(&self) -> bool {
        match self {
            Outcome::Approved
            | Outcome::Denied
            | Outcome::TimedOut
            | Outcome::Ended
            | Outcome::EndedOnAgentStop
            | Outcome::ContinuedOnAgentStop => true,
            Outcome::Held
            | Outcome::WouldHaveHeld
            | Outcome::Alerted
            | Outcome::Reported
            | Outcome::Refused
            | Outcome::WouldHaveRefused
            | Outcome::Killed
            | Outcome::Confirmed
            | Outcome::Allowed
            | Outcome::AllowedByException
            | Outcome::ShutdownRefused
            | Outcome::ShutdownConfirmed
            | Outcome::Granted
            | Outcome::Other(_) => false,
        }
    }
}

impl Action {
    /// Not decided yet (the sink fills it in from the outcome).
    pub fn is_empty(&self) -> bool {
        self.as_str().is_empty()
    }
}

/// An approval a job got before its current hold, shown with that hold (the message, `holds`,
/// the event) so the admin sees the job is back, and how far it has gone in all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlierApproval {
    pub incident: u64,
    /// The N of `--more N`; None: for the rest of the job.
    pub more: Option<u64>,
    pub by_uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_session: Option<u32>,
    /// The job's deletions outside its targets counted when it was approved.
    pub total_at_approval: u64,
    pub time: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event log's strings, as written before these enums existed: they must not change.
    #[test]
    fn every_variant_round_trips_to_the_logs_exact_string() {
        let outcomes = [
            "held",
            "would_have_held",
            "alerted",
            "reported",
            "refused",
            "would_have_refused",
            "killed",
            "approved",
            "denied",
            "timed_out",
            "ended",
            "ended_on_agent_stop",
            "continued_on_agent_stop",
            "confirmed",
            "allowed",
            "allowed_by_exception",
            "shutdown_refused",
            "shutdown_confirmed",
            "granted",
        ];
        let kinds = [
            "budget_crossed",
            "protected_root",
            "data_dir",
            "shutdown",
            "shutdown_confirmation",
        ];
        let actions = [
            "hold", "block", "refuse", "audit", "approve", "deny", "timeout", "close", "allow",
            "none",
        ];
        fn check<T>(known: &[T], strings: &[&str])
        where
            T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug + Clone,
            T: for<'a> From<&'a str>,
        {
            assert_eq!(
                known.len(),
                strings.len(),
                "a variant without its test string"
            );
            for (v, s) in known.iter().zip(strings) {
                let json = serde_json::to_string(v).expect("serialize");
                assert_eq!(json, format!("\"{s}\""));
                let back: T = serde_json::from_str(&json).expect("deserialize");
                assert_eq!(&back, v);
                assert_eq!(T::from(s), *v);
            }
        }
        check(Outcome::KNOWN, &outcomes);
        check(Kind::KNOWN, &kinds);
        check(Action::KNOWN, &actions);
    }

    /// A line from another agent version reads and is written back unchanged; so is the empty
    /// string of an incident not decided yet.
    #[test]
    fn unknown_and_empty_strings_are_kept_as_read() {
        for s in ["some_future_outcome", ""] {
            let o: Outcome = serde_json::from_str(&format!("\"{s}\"")).expect("deserialize");
            assert_eq!(o, Outcome::Other(s.to_string()));
            assert_eq!(
                serde_json::to_string(&o).expect("serialize"),
                format!("\"{s}\"")
            );
        }
        assert_eq!(Outcome::default().as_str(), "");
        assert!(Action::default().is_empty());
    }
}
