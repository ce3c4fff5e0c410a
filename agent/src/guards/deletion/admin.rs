//! What the admin's verbs do to held jobs: `approve` (with `--more N` or for the whole job),
//! `deny`, what `holds` lists, and how a stopping agent resolves every open hold by
//! `deletion.on_agent_stop`. Methods of the guard's state, which owns the open holds.
use std::time::Duration;

use anyhow::{Context, Result, bail};
use guardrail_common::{JOB_DENIED, JOB_HELD, JobState};
use nix::sys::signal::Signal;

use super::{Ctx, Guard};
use crate::{
    control::{ipc::HoldInfo, server as control},
    host::procinfo,
    incident::{self, Outcome},
    tiers::probe::Tier,
};

impl Guard {
    pub(crate) fn approve(
        &mut self,
        cx: &mut Ctx<'_>,
        id: u64,
        budget: Option<u64>,
        for_job: bool,
        by: &control::Peer,
    ) -> Result<String> {
        let grant = crate::guards::deletion::approval::Grant::from_request(budget, for_job)
            .map_err(|e| anyhow::anyhow!(e))?;
        // The hold record goes only once the kernel's maps say the job may go on: a failed write
        // leaves the job held *and* listed, with its timeout still running.
        let Some(h) = self.holds.get(&id) else {
            bail!("no open hold with id {id} (see `guardrail status`)")
        };
        let key = h.key;
        let mut job = cx.backend.job(&key)?.unwrap_or(JobState {
            state: JOB_HELD,
            ..Default::default()
        });
        let total_at_approval = job.total;
        let rule_budget = cx.policy.rule_budget(job.rule);
        grant.apply(&mut job, rule_budget, crate::host::clock::monotonic_ns());
        // A later hold counts its self-resumes (SELF_RESUME_LIMIT) afresh.
        job.refused = 0;
        job.free_stops = 0;
        cx.backend
            .set_job(&key, &job)
            .context("the job stays held")?;
        let Some(h) = self.holds.remove(&id) else {
            bail!("no open hold with id {id}")
        };
        let wrappers = procinfo::stopped_ancestors(h.key.pgid);
        procinfo::signal_job(h.key.pgid, Signal::SIGCONT);
        procinfo::continue_pids(&wrappers);
        let mut inc = h.incident;
        inc.outcome = Outcome::Approved;
        inc.decided_by = Some(by.uid);
        inc.decided_by_session = by.session_id();
        cx.sink.incident(&inc);
        self.approvals.record(
            key,
            crate::guards::deletion::approval::EarlierApproval {
                incident: id,
                more: match grant {
                    crate::guards::deletion::approval::Grant::More(n) => Some(n),
                    crate::guards::deletion::approval::Grant::RestOfJob => None,
                },
                by_uid: Some(by.uid),
                by_session: by.session_id(),
                total_at_approval,
                time: incident::now_rfc3339(),
            },
        );
        Ok(format!(
            "approved incident {id} on {} {}; job {} resumed",
            cx.host,
            grant.describe(),
            h.key.pgid
        ))
    }
    /// A deliberate stop (not a restart): every open hold is resolved by
    /// `deletion.on_agent_stop`, one incident each, so no job is left stopped with nobody to
    /// answer. "end" kills the job (as an unanswered hold's timeout does: a stop is no approval);
    /// "continue" lets it finish, as `guardrail off` does. Returns the agent event's tail.
    pub(crate) fn release_holds_on_stop(&mut self, cx: &mut Ctx<'_>) -> String {
        if self.holds.is_empty() {
            return String::new();
        }
        let end = cx.policy.policy.deletion.on_agent_stop == guardrail_policy::OnAgentStop::End;
        let setting = if end { "end" } else { "continue" };
        let holds = std::mem::take(&mut self.holds);
        let n = holds.len();
        let mut continued = Vec::new();
        for (id, h) in holds {
            let mut inc = h.incident;
            inc.decided_by_text = Some(format!(
                "agent stopped (deletion.on_agent_stop = \"{setting}\")"
            ));
            if !procinfo::pgid_alive(h.key.pgid) {
                inc.outcome = Outcome::Ended;
                cx.sink.incident(&inc);
                continue;
            }
            // The kernel's state first: a program still running for a moment must neither stop
            // a continued job again nor let an ended one delete on.
            let mut job = cx.backend.job(&h.key).ok().flatten().unwrap_or_default();
            if end {
                job.state = JOB_DENIED;
            } else {
                let rule_budget = cx.policy.rule_budget(job.rule);
                crate::guards::deletion::approval::Grant::RestOfJob.apply(
                    &mut job,
                    rule_budget,
                    crate::host::clock::monotonic_ns(),
                );
            }
            if let Err(e) = cx.backend.set_job(&h.key, &job) {
                eprintln!("guardrail: hold {id}: writing the job's state: {e:#}");
            }
            let wrappers = procinfo::stopped_ancestors(h.key.pgid);
            let what = if end {
                "the guardrail agent was stopped: this held job is ended (deletion.on_agent_stop = \"end\")"
            } else {
                "the guardrail agent was stopped: this held job continues (deletion.on_agent_stop = \"continue\")"
            };
            crate::guards::tell::tell_job(inc.pid, &[format!("guardrail: incident {id}: {what}")]);
            if end {
                procinfo::signal_job(h.key.pgid, Signal::SIGKILL);
                inc.outcome = Outcome::EndedOnAgentStop;
            } else {
                procinfo::signal_job(h.key.pgid, Signal::SIGCONT);
                continued.push(h.key.pgid);
                inc.outcome = Outcome::ContinuedOnAgentStop;
            }
            procinfo::continue_pids(&wrappers);
            cx.sink.incident(&inc);
        }
        // A stop already on its way when the state changed (sent by a program in that moment):
        // continue again until the jobs stay running.
        for _ in 0..10 {
            if continued.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            for pgid in &continued {
                let stopped = procinfo::pids_in_group(*pgid)
                    .iter()
                    .any(|p| procinfo::stat(*p).is_some_and(|s| s.state == 'T'));
                if stopped {
                    procinfo::signal_job(*pgid, Signal::SIGCONT);
                }
            }
        }
        let verb = if end { "ended" } else { "continued" };
        println!(
            "guardrail: {n} held job(s) {verb} as the agent stops (deletion.on_agent_stop = \"{setting}\")"
        );
        format!("; {n} held job(s) {verb} (deletion.on_agent_stop = \"{setting}\")")
    }
    /// `caller`: who denied (None for a timeout).
    pub(crate) fn deny(
        &mut self,
        cx: &mut Ctx<'_>,
        id: u64,
        outcome: Outcome,
        by: &str,
        caller: Option<&control::Peer>,
    ) -> Result<String> {
        let Some(h) = self.holds.get(&id) else {
            bail!("no open hold with id {id} (see `guardrail status`)")
        };
        let key = h.key;
        let mut job = cx.backend.job(&key)?.unwrap_or_default();
        job.state = JOB_DENIED;
        // On failure the record stays: the job is still held in the kernel, and listed.
        cx.backend
            .set_job(&key, &job)
            .context("the job stays held")?;
        let Some(h) = self.holds.remove(&id) else {
            bail!("no open hold with id {id}")
        };
        let kill_it = cx.policy.deny_kills || !cx.tier.refuses();
        // Found before the job goes: a wrapper stopped in sympathy (sudo) is continued after.
        let wrappers = procinfo::stopped_ancestors(h.key.pgid);
        if kill_it {
            procinfo::signal_job(h.key.pgid, Signal::SIGKILL);
        } else {
            // Keep refusing in the kernel while it runs on.
            procinfo::signal_job(h.key.pgid, Signal::SIGCONT);
        }
        procinfo::continue_pids(&wrappers);
        let mut inc = h.incident;
        inc.outcome = outcome;
        inc.decided_by_text = Some(by.to_string());
        if let Some(c) = caller {
            inc.decided_by = Some(c.uid);
            inc.decided_by_session = c.session_id();
        }
        cx.sink.incident(&inc);
        let what = if kill_it {
            "ended"
        } else {
            "resumed, with every further deletion outside scope refused"
        };
        Ok(format!(
            "denied incident {id} on {}: job {} {what}",
            cx.host, h.key.pgid
        ))
    }
    /// Open holds, all or only those of `only_uid`'s jobs (filtered before the /proc scan).
    pub(crate) fn hold_infos(
        &self,
        host: &str,
        tier: Tier,
        only_uid: Option<u32>,
    ) -> Vec<HoldInfo> {
        self.holds
            .values()
            .filter(|h| only_uid.is_none_or(|u| h.incident.uid == u))
            .map(|h| HoldInfo {
                id: h.incident.id,
                host: host.to_string(),
                rule: h.incident.rule.clone(),
                pgid: h.key.pgid,
                sid: h.key.sid,
                pids: procinfo::pids_in_group(h.key.pgid),
                user: h.incident.user.clone(),
                uid: h.incident.uid,
                command: h.incident.command.clone(),
                count: h.incident.count,
                first_path: h.incident.path.clone(),
                session: h.incident.session_text(),
                tier: tier.to_string(),
                reason: h.incident.reason.clone(),
                age_secs: h.since.elapsed().as_secs(),
                timeout_secs: h.timeout.as_secs(),
                total_count: h.incident.total_count,
                earlier_approvals: h.incident.earlier_approvals.clone(),
                audit_session: h.incident.audit_session,
            })
            .collect()
    }
}
