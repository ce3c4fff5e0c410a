//! Incidents: what the agent records and forwards for every decision. One record per state
//! change (a hold, a refusal, an approval), never one per deleted file.
use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use guardrail_common::{
    EV_BUDGET_CROSSED, EV_DATA_DIR, EV_PROTECTED_ROOT, EVENT_PATH_DEPTH, EVF_IO_URING, Event,
    OP_IO_URING_RENAME, OP_IO_URING_UNLINK, OP_RENAME, OP_RMDIR, OP_UNLINK,
};
use serde::{Deserialize, Serialize};

use crate::{policy_glue::LoadedPolicy, probe::Tier, procinfo};

/// The stable event schema (documented in README.md, "Events").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Incident {
    pub id: u64,
    pub time: String,
    pub host: String,
    pub tier: String,
    /// budget_crossed | protected_root | data_dir
    pub kind: String,
    pub rule: String,
    pub outcome: String,
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
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
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
            if parts.len() >= EVENT_PATH_DEPTH {
                format!(".../{joined}")
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
        let (kind, reason) = match ev.kind {
            EV_BUDGET_CROSSED => (
                "budget_crossed",
                format!(
                    "{} deletions outside the deletion targets within {} (budget {}, rule {rule})",
                    ev.count,
                    guardrail_policy::format_duration(policy.rule_window(ev.rule)),
                    policy.rule_budget(ev.rule)
                ),
            ),
            EV_PROTECTED_ROOT => (
                "protected_root",
                format!("{op} of a protected root ({path})"),
            ),
            EV_DATA_DIR => (
                "data_dir",
                format!("{op} inside a data directory this job is not named for ({path})"),
            ),
            _ => ("other", String::new()),
        };
        let command = procinfo::cmdline(ev.tgid).unwrap_or_else(|| cstr(&ev.comm));
        let none_if_unset = |v: u32| if v == u32::MAX { None } else { Some(v) };
        Incident {
            id: ev.incident,
            time: now_rfc3339(),
            host: host.to_string(),
            tier: tier.to_string(),
            kind: kind.to_string(),
            rule,
            outcome: String::new(),
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
            tty: procinfo::tty_name(ev.tgid),
            count: ev.count,
            path,
            retries: 0,
            decided_by: None,
            decided_by_text: None,
            tier_gaps: tier.gaps().iter().map(|s| s.to_string()).collect(),
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

    pub fn one_line(&self) -> String {
        format!(
            "incident {} {} on {}: {} — job \"{}\" (pgid {}, user {}, {}), tier {}",
            self.id,
            self.outcome,
            self.host,
            self.reason,
            self.command,
            self.pgid,
            self.user,
            self.session_text(),
            self.tier
        )
    }
}

/// Where incidents go. Delivery never blocks the kernel: the kernel has already decided.
pub struct Sink {
    log_path: PathBuf,
    log: Option<File>,
    host: String,
}

#[derive(Serialize)]
struct AgentRecord<'a> {
    time: String,
    host: &'a str,
    kind: &'a str,
    message: &'a str,
}

impl Sink {
    pub fn new(policy: &LoadedPolicy, override_path: Option<PathBuf>, host: &str) -> Result<Self> {
        let log_path = override_path.unwrap_or_else(|| policy.policy.alerts.event_log.clone());
        let mut s = Sink {
            log_path,
            log: None,
            host: host.to_string(),
        };
        s.reopen();
        Ok(s)
    }

    /// Reopens the event log (after logrotate moved it).
    pub fn reopen(&mut self) {
        if let Some(dir) = self.log_path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        self.log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .ok();
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

    pub fn incident(&mut self, inc: &Incident) {
        println!("guardrail: {}", inc.one_line());
        if let Ok(json) = serde_json::to_string(&serde_json::json!({ "incident": inc })) {
            self.write_line(&json);
        }
    }

    /// Any other record of the event log, as `{"<key>": value}` (job summaries).
    pub fn record<T: Serialize>(&mut self, key: &str, value: &T) {
        if let Ok(json) = serde_json::to_string(&serde_json::json!({ key: value })) {
            self.write_line(&json);
        }
    }

    pub fn agent_event(&mut self, kind: &str, message: &str) {
        let rec = AgentRecord {
            time: now_rfc3339(),
            host: &self.host,
            kind,
            message,
        };
        if let Ok(json) = serde_json::to_string(&serde_json::json!({ "agent": rec })) {
            self.write_line(&json);
        }
    }
}
