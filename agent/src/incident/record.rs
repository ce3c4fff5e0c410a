//! The records of the event log: an incident or an agent life-cycle event, one per line, and
//! what every destination derives from them (name, severity, the one-line summary). Defined here,
//! beside the incident they wrap, so the data path reads one way: incident → sinks.
use serde::{Deserialize, Serialize};

use super::{Incident, Outcome};

/// Agent life-cycle events: agent_started, agent_stopped, tier_degraded, policy_reloaded,
/// policy_rejected, policy_fallback (a start on the last good policy).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentEvent {
    pub time: String,
    pub host: String,
    pub kind: String,
    pub message: String,
    #[serde(default)]
    pub tier: String,
}

/// One line of the event log: exactly one of the two keys is present.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Record {
    Incident(Box<Incident>),
    Agent(AgentEvent),
}

impl Record {
    pub fn time(&self) -> &str {
        match self {
            Record::Incident(i) => &i.time,
            Record::Agent(a) => &a.time,
        }
    }

    pub fn host(&self) -> &str {
        match self {
            Record::Incident(i) => &i.host,
            Record::Agent(a) => &a.host,
        }
    }

    /// The outcome of an incident or the kind of an agent event: RFC 5424 MSGID, metric label.
    pub fn name(&self) -> &str {
        match self {
            Record::Incident(i) => i.outcome.as_str(),
            Record::Agent(a) => &a.kind,
        }
    }

    pub fn severity(&self) -> Severity {
        match self {
            Record::Incident(i) => match &i.outcome {
                // Someone must act now (approve or deny), or a job was ended.
                Outcome::Held | Outcome::Killed => Severity::Crit,
                // A shutdown request that was let through is worth a line, not a page.
                _ if i.is_shutdown() && i.outcome != Outcome::Refused => Severity::Notice,
                Outcome::Refused
                | Outcome::ShutdownRefused
                | Outcome::TimedOut
                | Outcome::Denied
                | Outcome::EndedOnAgentStop => Severity::Warning,
                Outcome::WouldHaveHeld
                | Outcome::Alerted
                | Outcome::Reported
                | Outcome::WouldHaveRefused
                | Outcome::Approved
                | Outcome::Ended
                | Outcome::ContinuedOnAgentStop
                | Outcome::Confirmed
                | Outcome::Allowed
                | Outcome::AllowedByException
                | Outcome::ShutdownConfirmed
                | Outcome::Granted
                | Outcome::Other(_) => Severity::Notice,
            },
            Record::Agent(a) => match a.kind.as_str() {
                "policy_rejected" | "policy_fallback" | "tier_degraded" => Severity::Err,
                _ => Severity::Info,
            },
        }
    }

    /// The free text of syslog lines and `guardrail events`: complete on its own, since
    /// `tail /var/log/syslog` shows only this part. One line, the job's text escaped and its
    /// long fields capped, so the `guardrail approve N` tail survives any command line.
    pub fn summary(&self) -> String {
        let s = match self {
            Record::Incident(i) => incident_summary(i),
            Record::Agent(a) => a.message.clone(),
        };
        crate::text::escape_line(&s)
    }
}

fn incident_summary(i: &Incident) -> String {
    use crate::text::{REASON_MAX, cap, cap_command};
    // Capped copies of every field a job or a user controls; the rest is the agent's own text.
    let mut i = i.clone();
    i.command = cap_command(&i.command);
    i.reason = cap(&i.reason, REASON_MAX);
    i.user = cap(&i.user, 64);
    i.session.remote_host = i.session.remote_host.as_deref().map(|h| cap(h, 128));
    i.session.tty = i.session.tty.as_deref().map(|t| cap(t, 64));
    i.tty = i.tty.as_deref().map(|t| cap(t, 64));
    let i = &i;
    if i.is_shutdown() {
        return format!(
            "{} on {}: {} (user {}, {}). Incident {}",
            i.outcome.as_str().replace('_', " "),
            i.host,
            i.reason,
            i.user,
            session_words(i),
            i.id
        );
    }
    let who = format!("user {}, pgid {}, {}", i.user, i.pgid, session_words(i));
    match &i.outcome {
        Outcome::Held => format!(
            "held job \"{}\" on {}: {} ({who}). Incident {}: guardrail approve {} | guardrail deny {}",
            i.command, i.host, i.reason, i.id, i.id, i.id
        ),
        Outcome::Killed => format!(
            "killed job \"{}\" on {}: {} ({who}). Incident {}",
            i.command, i.host, i.reason, i.id
        ),
        Outcome::Refused => format!(
            "refused {} by job \"{}\" on {}: {} ({who}). Incident {}",
            i.op, i.command, i.host, i.reason, i.id
        ),
        Outcome::WouldHaveHeld | Outcome::WouldHaveRefused => format!(
            "audit mode: {} job \"{}\" on {}: {} ({who}). Incident {}",
            i.outcome.as_str().replace('_', " "),
            i.command,
            i.host,
            i.reason,
            i.id
        ),
        Outcome::Approved => format!(
            "incident {} approved{}: job \"{}\" (pgid {}) on {} resumed",
            i.id,
            i.decided_by
                .map(|u| format!(" by uid {u}"))
                .unwrap_or_default(),
            i.command,
            i.pgid,
            i.host
        ),
        Outcome::Denied | Outcome::TimedOut => format!(
            "incident {} {}{}: job \"{}\" (pgid {}) on {} ended",
            i.id,
            if i.outcome == Outcome::Denied {
                "denied"
            } else {
                "timed out"
            },
            i.decided_by_text
                .as_deref()
                .map(|b| format!(" ({b})"))
                .unwrap_or_default(),
            i.command,
            i.pgid,
            i.host
        ),
        Outcome::Ended => format!(
            "incident {} closed: held job \"{}\" (pgid {}) on {} ended by itself",
            i.id, i.command, i.pgid, i.host
        ),
        Outcome::EndedOnAgentStop | Outcome::ContinuedOnAgentStop => format!(
            "incident {} closed as the agent stopped: held job \"{}\" (pgid {}) on {} {} (deletion.on_agent_stop)",
            i.id,
            i.command,
            i.pgid,
            i.host,
            if i.outcome == Outcome::EndedOnAgentStop {
                "ended"
            } else {
                "continued"
            }
        ),
        other @ (Outcome::Alerted
        | Outcome::Reported
        | Outcome::Confirmed
        | Outcome::Allowed
        | Outcome::AllowedByException
        | Outcome::ShutdownRefused
        | Outcome::ShutdownConfirmed
        | Outcome::Granted
        | Outcome::Other(_)) => format!("incident {} {other} on {}: {}", i.id, i.host, i.reason),
    }
}

fn session_words(i: &Incident) -> String {
    let s = &i.session;
    // Incidents built without the session object (by hand, or read from an older log) still
    // name their session.
    if s.class.is_empty() {
        return i.session_text();
    }
    let mut out = match s.class.as_str() {
        "remote" => match &s.remote_host {
            Some(h) => format!("remote session from {h}"),
            None => "remote session".to_string(),
        },
        "local" => "local session".to_string(),
        "none" => "no login session".to_string(),
        _ => "session of unknown origin".to_string(),
    };
    if let Some(t) = &s.tty {
        out.push_str(&format!(" on {t}"));
    }
    out
}

/// Syslog severities (RFC 5424 §6.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Crit = 2,
    Err = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
}

impl Severity {
    /// The Alertmanager `severity` label.
    pub fn label(self) -> &'static str {
        match self {
            Severity::Crit | Severity::Err => "critical",
            Severity::Warning => "warning",
            Severity::Notice | Severity::Info => "info",
        }
    }
}
