//! The incident a deletion event from the kernel becomes: path, job, session, level and the
//! reason in words. The deletion guard's own reading of its events; the schema it fills is
//! [`crate::incident::Incident`].

use guardrail_common::{
    EV_BUDGET_CROSSED, EV_DATA_DIR, EV_PROTECTED_ROOT, EVENT_PATH_DEPTH, EVF_IO_URING,
    EVF_TRACEPOINT, Event, OP_IO_URING_RENAME, OP_IO_URING_UNLINK, OP_RENAME, OP_RMDIR, OP_UNLINK,
};

use super::levels;
use crate::{
    host::procinfo,
    incident::{Action, Incident, Kind, Outcome, now_rfc3339, origin},
    policy::LoadedPolicy,
    tiers::probe::Tier,
};

pub fn incident_from_event(ev: &Event, host: &str, tier: Tier, policy: &LoadedPolicy) -> Incident {
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
    let level = levels::level_of(ev.flags).filter(|_| ev.kind == EV_BUDGET_CROSSED);
    // A process that exited before its event was read is found by its cgroup's id.
    let cgroup = cgroup_of(ev.tgid).or_else(|| cgroup_by_id(ev.cgroup_id));
    let unit = cgroup.as_deref().and_then(unit_in);
    let (kind, reason) = match ev.kind {
        EV_BUDGET_CROSSED if level.is_some() => (
            Kind::BudgetCrossed,
            levels::reason(ev, policy, level.unwrap_or_default(), unit.as_deref()),
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
            Some(l) => levels::budget(policy, l),
            None => policy.rule_budget(ev.rule),
        },
        level: (ev.kind == EV_BUDGET_CROSSED).then(|| levels::name(level).to_string()),
        level_jobs: level.and_then(|_| levels::jobs(ev)),
    }
}

/// A NUL-terminated kernel string, lossily.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
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
