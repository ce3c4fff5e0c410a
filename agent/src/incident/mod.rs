//! Incidents: what the agent records and forwards for every decision. One record per state
//! change (a hold, a refusal, an approval), never one per deleted file.
pub mod origin;
pub mod record;
pub mod schema;

use serde::{Deserialize, Serialize};

pub use crate::timefmt::now_rfc3339;
pub use record::{AgentEvent, Record, Severity};
pub use schema::{Action, EarlierApproval, Kind, Outcome};

use crate::{incident::origin::Session, text};

/// The stable event schema (documented in README.md, "Events"). Fields are only ever added (with
/// a default, so older log lines still read), never renamed or removed. `Default` lets code that
/// builds an incident by hand (shutdown requests) end its literal with `..Default::default()`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Incident {
    pub id: u64,
    pub time: String,
    pub host: String,
    pub tier: String,
    /// budget_crossed | protected_root | data_dir
    pub kind: Kind,
    pub rule: String,
    pub outcome: Outcome,
    pub reason: String,
    pub op: String,
    pub pid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub uid: u32,
    pub user: String,
    pub command: String,
    pub comm: String,
    pub cgroup_id: u64,
    pub audit_session: Option<u32>,
    pub loginuid: Option<u32>,
    pub tty: Option<String>,
    pub count: u64,
    pub path: String,
    pub retries: u64,
    pub decided_by: Option<u32>,
    pub decided_by_text: Option<String>,
    /// What the tier in force cannot do, so nobody reads more into the incident than it says.
    pub tier_gaps: Vec<String>,
    /// What guardrail did: hold | block | refuse | audit (compute, stop nothing) | approve |
    /// deny | timeout | close.
    #[serde(default)]
    pub action: Action,
    /// The job's processes when the event was made.
    #[serde(default)]
    pub pids: Vec<u32>,
    /// The systemd unit (service or scope) of the process that crossed.
    #[serde(default)]
    pub unit: Option<String>,
    /// The cgroup v2 path of that process (`/system.slice/backup.service`): whether `unit` is a
    /// system service or a name a user chose in a delegated tree (`policy suggest` needs to know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default)]
    pub executable: Option<String>,
    #[serde(default)]
    pub session: Session,
    /// The rule's budget of deletions outside its targets per window.
    #[serde(default)]
    pub budget: u64,
    /// The path of the deletion that made the incident, and of the latest one seen since
    /// (a held job that tried again).
    #[serde(default)]
    pub first_path: String,
    #[serde(default)]
    pub last_path: String,
    /// The audit session of whoever approved, denied or confirmed (with `decided_by`, their
    /// uid), as the kernel reported it for the control socket's caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by_session: Option<u32>,
    /// The job's deletions outside its targets over its whole life so far (`count` is the
    /// window's): what a job held again after an approval has done in all. 0: not known.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub total_count: u64,
    /// Approvals this job got before this hold (`guardrail approve ID --more N` that ran out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_approvals: Vec<EarlierApproval>,
    /// For `budget_crossed`: whose budget was crossed: `job` (the job's own), `session` (its login
    /// session's), `unit` (its service unit's) or `user` (the user who logged in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// For a level's crossing: how many jobs the level counted (in its last two windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level_jobs: Option<u64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Incident {
    /// What guardrail did, from the outcome (filled in when the daemon leaves it empty).
    pub fn action_for(&self) -> Action {
        use Outcome as O;
        if self.is_shutdown() {
            return match &self.outcome {
                O::Refused | O::ShutdownRefused => Action::Refuse,
                O::Killed => Action::Block,
                O::Confirmed | O::ShutdownConfirmed | O::Granted => Action::Approve,
                O::WouldHaveRefused => Action::Audit,
                O::Allowed
                | O::AllowedByException
                | O::Held
                | O::WouldHaveHeld
                | O::Alerted
                | O::Reported
                | O::Approved
                | O::Denied
                | O::TimedOut
                | O::Ended
                | O::EndedOnAgentStop
                | O::ContinuedOnAgentStop
                | O::Other(_) => Action::Allow,
            };
        }
        match &self.outcome {
            O::Held => Action::Hold,
            O::Killed => Action::Block,
            O::Refused if self.kind == Kind::BudgetCrossed => Action::Block,
            O::Refused | O::ShutdownRefused => Action::Refuse,
            O::WouldHaveHeld | O::WouldHaveRefused => Action::Audit,
            O::Approved | O::ShutdownConfirmed => Action::Approve,
            O::Denied => Action::Deny,
            O::TimedOut => Action::Timeout,
            O::Ended => Action::Close,
            O::ContinuedOnAgentStop => Action::Approve,
            O::EndedOnAgentStop => Action::Deny,
            O::Alerted
            | O::Reported
            | O::Confirmed
            | O::Allowed
            | O::AllowedByException
            | O::Granted
            | O::Other(_) => Action::None,
        }
    }

    /// A shutdown request (kinds `shutdown`, `shutdown_confirmation`), not a deletion.
    pub fn is_shutdown(&self) -> bool {
        match &self.kind {
            Kind::Shutdown | Kind::ShutdownConfirmation => true,
            Kind::BudgetCrossed | Kind::ProtectedRoot | Kind::DataDir => false,
            // An older or newer agent's shutdown kind.
            Kind::Other(k) => k.starts_with("shutdown"),
        }
    }

    pub fn session_text(&self) -> String {
        match (self.audit_session, &self.tty) {
            (Some(s), Some(t)) => format!("audit session {s} on {t}"),
            (Some(s), None) => format!("audit session {s}, no tty"),
            (None, Some(t)) => format!("no login session, {t}"),
            (None, None) => "no login session".to_string(),
        }
    }

    /// The agent's stdout (the journal) line: one line whatever the job's text holds.
    pub fn one_line(&self) -> String {
        let line = format!(
            "incident {} {} on {}: {} — job \"{}\" (pgid {}, user {}, {}), tier {}",
            self.id,
            self.outcome,
            self.host,
            text::cap(&self.reason, text::REASON_MAX),
            text::cap_command(&self.command),
            self.pgid,
            text::cap(&self.user, 64),
            text::cap(&self.session_text(), 256),
            self.tier
        );
        text::escape_line(&line)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An incident as a hold on a remote session makes it, for the formatter tests.
    pub(crate) fn sample_incident() -> Incident {
        Incident {
            id: 7,
            time: "2024-05-01T03:00:00.123Z".into(),
            host: "db-prod-1".into(),
            tier: "tracepoint".into(),
            kind: "budget_crossed".into(),
            rule: "default".into(),
            outcome: Outcome::default(),
            reason:
                "101 deletions outside the deletion targets within 1m (budget 100, rule default)"
                    .into(),
            op: "unlink".into(),
            pid: 1240,
            pgid: 1234,
            sid: 1200,
            uid: 1000,
            user: "alice".into(),
            command: "rm -rf \"x\" y]".into(),
            comm: "rm".into(),
            cgroup_id: 42,
            audit_session: Some(3),
            loginuid: Some(1000),
            tty: Some("pts/1".into()),
            count: 101,
            path: "/srv/www/x/f00100".into(),
            retries: 0,
            decided_by: None,
            decided_by_text: None,
            decided_by_session: None,
            level: None,
            level_jobs: None,
            tier_gaps: vec![],
            action: Action::default(),
            pids: vec![1234, 1240],
            unit: Some("session-3.scope".into()),
            cgroup: None,
            executable: Some("/usr/bin/rm".into()),
            session: Session {
                id: Some(3),
                class: "remote".into(),
                remote_host: Some("10.0.0.5".into()),
                tty: Some("pts/1".into()),
                service: Some("sshd".into()),
            },
            budget: 100,
            first_path: "/srv/www/x/f00100".into(),
            last_path: "/srv/www/x/f00100".into(),
            total_count: 0,
            earlier_approvals: Vec::new(),
        }
    }

    #[test]
    fn log_lines_keep_the_envelope_and_read_back() {
        let rec = Record::Incident(Box::new(sample_incident()));
        let line = serde_json::to_string(&rec).expect("serialises");
        assert!(line.starts_with("{\"incident\":{\"id\":7,"), "{line}");
        let back: Record = serde_json::from_str(&line).expect("reads back");
        assert!(
            matches!(back, Record::Incident(i) if i.session.remote_host.as_deref() == Some("10.0.0.5"))
        );
        // A line written before the fields were added still reads.
        let old = r#"{"agent":{"time":"2024-05-01T03:00:00.000Z","host":"h","kind":"agent_started","message":"m"}}"#;
        assert!(serde_json::from_str::<Record>(old).is_ok());
    }
}
