//! Alertmanager: holds and refusals posted to its v2 API (`POST /api/v2/alerts`), labelled so
//! that a route can group by host and rule. A hold's alert fires until the hold ends (approved,
//! denied, timed out, or the job ended), then is resolved by sending it again with `endsAt`.
//!
//! Plain HTTP only: the agent has no TLS stack, and Alertmanager usually listens on the host or
//! behind a local proxy.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Destination, Record};
use crate::incident::{Incident, Kind, Outcome};
use crate::timefmt;

/// Firing alerts are re-sent this often, like Prometheus does, so Alertmanager's
/// resolve_timeout never closes a hold that is still open.
const RESEND: Duration = Duration::from_secs(60);
/// A firing alert's endsAt lies this far ahead of its last sending.
const FIRING_TTL_MS: i64 = 4 * 60_000;
/// One-shot incidents (a refusal, a killed job) stay active this long.
const ONE_SHOT_TTL_MS: i64 = 60 * 60_000;
const TIMEOUT: Duration = Duration::from_secs(3);

pub struct AlertmanagerDestination {
    host_port: String,
    path: String,
    /// Open holds: their alert, re-sent until the hold ends.
    firing: BTreeMap<u64, Value>,
}

impl AlertmanagerDestination {
    pub fn new(url: &str) -> Result<Self> {
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("{url}: only http:// URLs are supported (no TLS in the agent)");
        };
        let (host_port, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let host_port = if host_port.contains(':') && !host_port.ends_with(']') {
            host_port.to_string()
        } else {
            format!("{host_port}:80")
        };
        Ok(AlertmanagerDestination {
            host_port,
            path: format!("{prefix}/api/v2/alerts"),
            firing: BTreeMap::new(),
        })
    }

    fn post(&self, alerts: &[Value]) -> Result<()> {
        let body = serde_json::to_vec(alerts)?;
        let addr = self
            .host_port
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", self.host_port))?
            .next()
            .with_context(|| format!("no address for {}", self.host_port))?;
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
            .with_context(|| format!("connecting to Alertmanager at {addr}"))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        write!(
            s,
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: guardrail/{}\r\n\r\n",
            self.path,
            self.host_port,
            body.len(),
            env!("CARGO_PKG_VERSION")
        )?;
        s.write_all(&body)?;
        s.flush()?;
        let mut resp = Vec::new();
        s.take(64 * 1024).read_to_end(&mut resp)?;
        let text = String::from_utf8_lossy(&resp);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .with_context(|| format!("malformed HTTP answer from Alertmanager: {text:.80}"))?;
        if !(200..300).contains(&status) {
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
            bail!("Alertmanager answered {status}: {body:.200}");
        }
        Ok(())
    }
}

/// The alert name of an incident: what happened, whatever its later outcome.
pub fn alertname(i: &Incident) -> &'static str {
    if i.is_shutdown() {
        return "GuardrailShutdownRequest";
    }
    match &i.outcome {
        Outcome::WouldHaveHeld | Outcome::WouldHaveRefused => "GuardrailAuditWouldHaveStopped",
        Outcome::Killed => "GuardrailJobKilled",
        Outcome::Refused if i.kind == Kind::BudgetCrossed => "GuardrailJobBlocked",
        Outcome::Refused => "GuardrailDeletionRefused",
        // An `alert` rule's crossing stops nothing: it must not page as a hold.
        Outcome::Alerted => "GuardrailDeletionBudgetAlert",
        // A crossing the tier could only report (never_hold, or no job to stop).
        Outcome::Reported => "GuardrailDeletionReported",
        // A hold and the outcomes that close it keep the hold's name, so Alertmanager matches
        // the resolved alert to the firing one.
        Outcome::Held
        | Outcome::Approved
        | Outcome::Denied
        | Outcome::TimedOut
        | Outcome::Ended
        | Outcome::EndedOnAgentStop
        | Outcome::ContinuedOnAgentStop => "GuardrailJobHeld",
        // Shutdown outcomes (answered above), and unknown ones from another agent version.
        Outcome::Confirmed
        | Outcome::Allowed
        | Outcome::AllowedByException
        | Outcome::ShutdownRefused
        | Outcome::ShutdownConfirmed
        | Outcome::Granted
        | Outcome::Other(_) => "GuardrailJobHeld",
    }
}

/// The alert of an incident, ending at `ends_ms`. Annotations are read by people (in the UI,
/// in notifications): the job's text in them is escaped and capped like in a syslog line.
pub fn alert(i: &Incident, severity: &str, ends_ms: i64) -> Value {
    use crate::text::{REASON_MAX, cap, cap_command};
    let rec = Record::Incident(Box::new(i.clone()));
    json!({
        "labels": {
            "alertname": alertname(i),
            "host": i.host,
            "rule": i.rule,
            "severity": severity,
            "incident": i.id.to_string(),
            "kind": i.kind,
            "tier": i.tier,
        },
        "annotations": {
            "summary": rec.summary(),
            "reason": cap(&i.reason, REASON_MAX),
            "command": cap_command(&i.command),
            "user": cap(&i.user, 64),
            "session": cap(&i.session_text(), 256),
            "first_path": cap(&i.first_path, REASON_MAX),
            "approve": format!("guardrail approve {}", i.id),
            "deny": format!("guardrail deny {}", i.id),
        },
        "startsAt": i.time,
        "endsAt": timefmt::format_rfc3339(ends_ms),
    })
}

impl Destination for AlertmanagerDestination {
    fn name(&self) -> &'static str {
        "alertmanager"
    }

    fn deliver(&mut self, rec: &Record) -> Result<()> {
        let Record::Incident(i) = rec else {
            return Ok(());
        };
        let now = timefmt::now_ms();
        let outcome = i.outcome.as_str();
        let a = if i.outcome == Outcome::Held {
            let a = alert(i, rec.severity().label(), now + FIRING_TTL_MS);
            self.firing.insert(i.id, a.clone());
            a
        } else if i.outcome.closes_hold() {
            // The same labels as the firing alert (so Alertmanager matches it), ended now.
            let mut a = match self.firing.remove(&i.id) {
                Some(a) => a,
                None => {
                    let mut held = (**i).clone();
                    held.outcome = Outcome::Held;
                    alert(&held, "critical", now)
                }
            };
            a["endsAt"] = json!(timefmt::format_rfc3339(now));
            a["annotations"]["outcome"] = json!(outcome);
            a
        } else {
            let start = timefmt::parse_rfc3339(&i.time).unwrap_or(now);
            alert(i, rec.severity().label(), start + ONE_SHOT_TTL_MS)
        };
        self.post(&[a])
    }

    fn tick(&mut self) {
        if self.firing.is_empty() {
            return;
        }
        let ends = json!(timefmt::format_rfc3339(timefmt::now_ms() + FIRING_TTL_MS));
        for a in self.firing.values_mut() {
            a["endsAt"] = ends.clone();
        }
        let all: Vec<Value> = self.firing.values().cloned().collect();
        // A failure here is retried at the next tick; the loss of the first sending was counted.
        let _ = self.post(&all);
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(RESEND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let d = AlertmanagerDestination::new("http://127.0.0.1:9093").expect("valid");
        assert_eq!(
            (d.host_port.as_str(), d.path.as_str()),
            ("127.0.0.1:9093", "/api/v2/alerts")
        );
        let d = AlertmanagerDestination::new("http://am.example/prefix/").expect("valid");
        assert_eq!(
            (d.host_port.as_str(), d.path.as_str()),
            ("am.example:80", "/prefix/api/v2/alerts")
        );
        assert!(AlertmanagerDestination::new("https://am.example").is_err());
    }

    #[test]
    fn hold_alert_labels_group_by_host_and_rule() {
        let i = crate::sinks::syslog::tests::sample();
        let a = alert(&i, "critical", 0);
        assert_eq!(a["labels"]["alertname"], "GuardrailJobHeld");
        assert_eq!(a["labels"]["host"], "db-prod-1");
        assert_eq!(a["labels"]["rule"], "default");
        assert_eq!(a["labels"]["severity"], "critical");
        assert_eq!(a["labels"]["incident"], "7");
        assert_eq!(a["startsAt"], "2024-05-01T03:00:00.123Z");
        assert_eq!(a["endsAt"], "1970-01-01T00:00:00.000Z");
        assert_eq!(a["annotations"]["approve"], "guardrail approve 7");
    }

    /// Before, every outcome without an arm fell through to `GuardrailJobHeld`: an `alert`
    /// rule's crossing paged as a held job.
    #[test]
    fn crossings_that_stop_nothing_are_not_named_holds() {
        let mut i = crate::sinks::syslog::tests::sample();
        for (outcome, name) in [
            ("held", "GuardrailJobHeld"),
            ("approved", "GuardrailJobHeld"),
            ("alerted", "GuardrailDeletionBudgetAlert"),
            ("reported", "GuardrailDeletionReported"),
            ("killed", "GuardrailJobKilled"),
            ("would_have_held", "GuardrailAuditWouldHaveStopped"),
        ] {
            i.outcome = outcome.into();
            assert_eq!(alertname(&i), name, "{outcome}");
        }
    }

    #[test]
    fn a_closed_hold_reuses_the_firing_labels() {
        let mut d = AlertmanagerDestination::new("http://127.0.0.1:1").expect("valid");
        let mut i = crate::sinks::syslog::tests::sample();
        // Delivery fails (nothing listens on port 1) but the hold is remembered for re-sending.
        assert!(d.deliver(&Record::Incident(Box::new(i.clone()))).is_err());
        assert!(d.firing.contains_key(&7));
        i.outcome = "approved".into();
        assert!(d.deliver(&Record::Incident(Box::new(i))).is_err());
        assert!(d.firing.is_empty(), "the closed hold is no longer re-sent");
    }
}
