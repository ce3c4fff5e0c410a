//! Incidents: what the agent records and forwards for every decision. One record per state
//! change (a hold, a refusal, an approval), never one per deleted file.
pub mod decode;
pub mod origin;
pub mod schema;

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::PathBuf,
};

use anyhow::Result;
use guardrail_common::{
    EV_BUDGET_CROSSED, EV_DATA_DIR, EV_PROTECTED_ROOT, EVENT_PATH_DEPTH, EVF_IO_URING,
    EVF_TRACEPOINT, Event, OP_IO_URING_RENAME, OP_IO_URING_UNLINK, OP_RENAME, OP_RMDIR, OP_UNLINK,
};
use serde::{Deserialize, Serialize};

pub use schema::{Action, Kind, Outcome};

use crate::{
    host::procinfo,
    incident::origin::Session,
    policy::LoadedPolicy,
    sinks::{self, AgentEvent, Record},
    text,
    tiers::probe::Tier,
};

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
    pub earlier_approvals: Vec<crate::guards::deletion::approval::EarlierApproval>,
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

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub fn now_rfc3339() -> String {
    sinks::timefmt::format_rfc3339(sinks::timefmt::now_ms())
}

impl Incident {
    pub fn from_event(ev: &Event, host: &str, tier: Tier, policy: &LoadedPolicy) -> Self {
        // Innermost name first in the event; the path reads outermost first. An absolute user
        // path (tracepoint tier) stands alone.
        let mut parts: Vec<String> = (0..EVENT_PATH_DEPTH)
            .map(|i| cstr(&ev.path[i]))
            .take_while(|s| !s.is_empty())
            .collect();
        let path = if parts.first().is_some_and(|p| p.starts_with('/')) {
            parts.swap_remove(0)
        } else {
            parts.reverse();
            let joined = parts
                .iter()
                .filter(|p| *p != "/")
                .cloned()
                .collect::<Vec<_>>()
                .join("/");
            // Cut short only when the walk did not reach the root (whose name is "/").
            let reached_root = parts.first().is_some_and(|p| p == "/");
            if parts.len() >= EVENT_PATH_DEPTH && !reached_root {
                format!(".../{joined}")
            } else if !reached_root && ev.flags & EVF_TRACEPOINT != 0 {
                // A relative path whose starting directory the kernel could not name: shown
                // as passed, never as if it were absolute (`policy suggest` reads these).
                joined
            } else {
                format!("/{joined}")
            }
        };
        let op = match ev.op {
            OP_UNLINK => "unlink",
            OP_RMDIR => "rmdir",
            OP_RENAME => "rename",
            OP_IO_URING_UNLINK => "io_uring unlinkat",
            OP_IO_URING_RENAME => "io_uring renameat",
            _ => "delete",
        };
        let rule = policy.rule_name(ev.rule);
        let level = crate::guards::deletion::levels::level_of(ev.flags)
            .filter(|_| ev.kind == EV_BUDGET_CROSSED);
        // A process that exited before its event was read is found by its cgroup's id.
        let cgroup = cgroup_of(ev.tgid).or_else(|| cgroup_by_id(ev.cgroup_id));
        let unit = cgroup.as_deref().and_then(unit_in);
        let (kind, reason) = match ev.kind {
            EV_BUDGET_CROSSED if level.is_some() => (
                Kind::BudgetCrossed,
                crate::guards::deletion::levels::reason(
                    ev,
                    policy,
                    level.unwrap_or_default(),
                    unit.as_deref(),
                ),
            ),
            EV_BUDGET_CROSSED => (
                Kind::BudgetCrossed,
                format!(
                    "{} deletions outside the deletion targets within {} (budget {}, rule {rule})",
                    ev.count,
                    guardrail_policy::format_duration(policy.rule_window(ev.rule)),
                    policy.rule_budget(ev.rule)
                ),
            ),
            EV_PROTECTED_ROOT => (
                Kind::ProtectedRoot,
                format!("{op} of a protected root ({path})"),
            ),
            EV_DATA_DIR => (
                Kind::DataDir,
                format!("{op} inside a data directory this job is not named for ({path})"),
            ),
            _ => (Kind::Other("other".into()), String::new()),
        };
        let command = procinfo::cmdline(ev.tgid).unwrap_or_else(|| cstr(&ev.comm));
        let none_if_unset = |v: u32| if v == u32::MAX { None } else { Some(v) };
        let tty = procinfo::tty_name(ev.tgid);
        let session = origin::classify(ev.tgid, none_if_unset(ev.audit_session), tty.clone());
        Incident {
            id: ev.incident,
            time: now_rfc3339(),
            host: host.to_string(),
            tier: tier.to_string(),
            kind,
            rule,
            outcome: Outcome::default(),
            reason,
            op: if ev.flags & EVF_IO_URING != 0 {
                format!("{op} (io_uring)")
            } else {
                op.to_string()
            },
            pid: ev.tgid,
            pgid: ev.pgid,
            sid: ev.sid,
            uid: ev.uid,
            user: procinfo::user_name(ev.uid),
            command,
            comm: cstr(&ev.comm),
            cgroup_id: ev.cgroup_id,
            audit_session: none_if_unset(ev.audit_session),
            loginuid: none_if_unset(ev.loginuid),
            tty,
            count: ev.count,
            first_path: path.clone(),
            last_path: path.clone(),
            path,
            retries: 0,
            decided_by: None,
            decided_by_text: None,
            decided_by_session: None,
            tier_gaps: tier.gaps().iter().map(|s| s.to_string()).collect(),
            action: Action::default(),
            pids: procinfo::pids_in_group(ev.pgid),
            unit,
            cgroup,
            executable: std::fs::read_link(format!("/proc/{}/exe", ev.tgid))
                .ok()
                .map(|p| p.display().to_string()),
            session,
            total_count: 0,
            earlier_approvals: Vec::new(),
            budget: match level {
                Some(l) => crate::guards::deletion::levels::budget(policy, l),
                None => policy.rule_budget(ev.rule),
            },
            level: (ev.kind == EV_BUDGET_CROSSED)
                .then(|| crate::guards::deletion::levels::name(level).to_string()),
            level_jobs: level.and_then(|_| crate::guards::deletion::levels::jobs(ev)),
        }
    }

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

/// The cgroup v2 path of a process.
fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The cgroup v2 path whose directory has inode `id` (a cgroup's id): breadth-first below the
/// cgroup2 mount, bounded. Only read when an incident's process has already exited.
fn cgroup_by_id(id: u64) -> Option<String> {
    use std::os::unix::fs::DirEntryExt;
    let root = guardrail_policy::cgroup2_root();
    if id <= 1 {
        return None;
    }
    let mut level = vec![root.clone()];
    let mut seen = 0usize;
    for _ in 0..8 {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                seen += 1;
                if seen > 50_000 {
                    return None;
                }
                if e.ino() == id {
                    let rel = e.path().strip_prefix(&root).ok()?.display().to_string();
                    return Some(format!("/{rel}"));
                }
                next.push(e.path());
            }
        }
        level = next;
    }
    None
}

/// The systemd unit of a cgroup path: its last `.service` or `.scope`.
fn unit_in(path: &str) -> Option<String> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_string)
}

/// Where incidents go: stdout, the JSON lines event log, and the forwarding destinations
/// (`alert`). Delivery never blocks the kernel: the kernel has already decided.
pub struct Sink {
    log_path: PathBuf,
    log: Option<File>,
    host: String,
    tier: String,
    alerts: sinks::Alerts,
}

impl Sink {
    pub fn new(policy: &LoadedPolicy, override_path: Option<PathBuf>, host: &str) -> Result<Self> {
        let log_path = override_path.unwrap_or_else(|| policy.policy.alerts.event_log.clone());
        let mut s = Sink {
            log_path,
            log: None,
            host: host.to_string(),
            tier: String::new(),
            alerts: sinks::Alerts::start(&policy.policy.alerts),
        };
        s.reopen();
        Ok(s)
    }

    /// Reopens the event log (after logrotate moved it). The log names users, commands, paths
    /// and remote hosts: what the agent creates is root-only (directories 0700, the file 0600),
    /// and a log other users could read (left by an older agent) loses its "other" bits. Group
    /// bits are the admin's choice (the packages give group adm read access).
    pub fn reopen(&mut self) {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        if let Some(dir) = self.log_path.parent()
            && !dir.as_os_str().is_empty()
        {
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
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
            alerts: sinks::Alerts::start(&cfg),
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
        assert_eq!(mode(&d.join("new")), 0o700);
        assert_eq!(mode(&d.join("new/sub")), 0o700);
        // A world-readable log from an older agent loses its "other" bits, keeps the group's.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        s.reopen();
        assert_eq!(mode(&path), 0o640);
        let _ = std::fs::remove_dir_all(&d);
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
