//! The event log and the fan-out: every incident and agent event goes to stdout, one JSON line in
//! the event log, and the forwarding destinations ([`Alerts`]). Delivery never blocks the kernel:
//! the kernel has already decided.
use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::PathBuf,
};

use anyhow::Result;
use serde::Serialize;

use super::Alerts;
use crate::{
    incident::{AgentEvent, Incident, Record, now_rfc3339},
    policy::LoadedPolicy,
};

/// Where incidents go: stdout, the JSON lines event log, and the forwarding destinations
/// (`alert`). Delivery never blocks the kernel: the kernel has already decided.
pub struct Sink {
    log_path: PathBuf,
    log: Option<File>,
    host: String,
    tier: String,
    alerts: Alerts,
}

impl Sink {
    pub fn new(policy: &LoadedPolicy, override_path: Option<PathBuf>, host: &str) -> Result<Self> {
        let log_path = override_path.unwrap_or_else(|| policy.policy.alerts.event_log.clone());
        let mut s = Sink {
            log_path,
            log: None,
            host: host.to_string(),
            tier: String::new(),
            alerts: Alerts::start(&policy.policy.alerts),
        };
        s.reopen();
        Ok(s)
    }

    /// Reopens the event log (after logrotate moved it). The log names users, commands, paths
    /// and remote hosts: what the agent creates is root-only (directories 0700, the file 0600),
    /// and a log other users could read (left by an older agent) loses its "other" bits. Group
    /// bits are the admin's choice (the packages give group adm read access).
    pub fn reopen(&mut self) {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if let Some(dir) = self.log_path.parent()
            && !dir.as_os_str().is_empty()
        {
            let _ = crate::host::dirs::create_private_dir(dir);
        }
        self.log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.log_path)
            .ok();
        if let Some(f) = &self.log
            && let Ok(meta) = f.metadata()
            && meta.permissions().mode() & 0o007 != 0
        {
            let _ = f.set_permissions(std::fs::Permissions::from_mode(
                meta.permissions().mode() & 0o7770,
            ));
        }
        if self.log.is_none() {
            eprintln!(
                "guardrail: cannot open the event log {}; events go to stdout only",
                self.log_path.display()
            );
        }
    }

    fn write_line(&mut self, line: &str) {
        if let Some(f) = self.log.as_mut() {
            let _ = f
                .write_all(line.as_bytes())
                .and_then(|_| f.write_all(b"\n"));
        }
    }

    /// The tier in force, for agent events and the `guardrail_tier` gauge.
    pub fn set_tier(&mut self, tier: &str) {
        self.tier = tier.to_string();
        self.alerts.set_tier(tier);
    }

    pub fn incident(&mut self, inc: &Incident) {
        println!("guardrail: {}", inc.one_line());
        let mut inc = inc.clone();
        if inc.action.is_empty() {
            inc.action = inc.action_for();
        }
        let rec = Record::Incident(Box::new(inc));
        if let Ok(json) = serde_json::to_string(&rec) {
            self.write_line(&json);
        }
        self.alerts.send(rec);
    }

    /// Any other record of the event log, as `{"<key>": value}` (job summaries).
    pub fn record<T: Serialize>(&mut self, key: &str, value: &T) {
        if let Ok(json) = serde_json::to_string(&serde_json::json!({ key: value })) {
            self.write_line(&json);
        }
    }

    pub fn agent_event(&mut self, kind: &str, message: &str) {
        let rec = Record::Agent(AgentEvent {
            time: now_rfc3339(),
            host: self.host.clone(),
            kind: kind.to_string(),
            message: message.to_string(),
            tier: self.tier.clone(),
        });
        if let Ok(json) = serde_json::to_string(&rec) {
            self.write_line(&json);
        }
        self.alerts.send(rec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink writing to `log_path` only (no syslog, no forwarding).
    fn test_sink(log_path: PathBuf) -> Sink {
        let gp = guardrail_policy::check_str(
            "(embedded default)",
            guardrail_policy::DEFAULT_POLICY,
            &guardrail_policy::SystemResolver,
        )
        .policy
        .expect("the embedded policy is valid");
        let mut cfg = gp.alerts.clone();
        cfg.syslog.enabled = false;
        cfg.alertmanager_url = None;
        cfg.prometheus_listen = None;
        cfg.prometheus_textfile = None;
        let mut s = Sink {
            log_path,
            log: None,
            host: "h".into(),
            tier: String::new(),
            alerts: Alerts::start(&cfg),
        };
        s.reopen();
        s
    }

    #[test]
    fn the_event_log_is_created_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("guardrail-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        let path = d.join("new/sub/events.jsonl");
        let mut s = test_sink(path.clone());
        s.agent_event("agent_started", "x");
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&path), 0o600);
        // The log's own directory is root's; a parent the agent had to make is an ordinary one
        // (a 0700 /var made /var/tmp unreachable for everyone else).
        assert_eq!(mode(&d.join("new/sub")), 0o700);
        assert_ne!(
            mode(&d.join("new")) & 0o005,
            0,
            "others may pass through the parent"
        );
        // A world-readable log from an older agent loses its "other" bits, keeps the group's.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        s.reopen();
        assert_eq!(mode(&path), 0o640);
        let _ = std::fs::remove_dir_all(&d);
    }
}
