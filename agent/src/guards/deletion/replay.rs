//! Job summaries and `guardrail policy test --events FILE [--policy NEW]`.
//!
//! The kernel never reports single deletions, so the agent writes one summary per job that
//! deleted outside scope when the job ends: its identity, total and the peak of its sliding
//! window. Replaying a week of summaries through a candidate policy tells which jobs the new
//! budgets, rules and actions would have held, blocked or let through, before it is enforced.
use std::{collections::BTreeMap, path::Path, process::ExitCode};

use anyhow::{Context, Result};
use guardrail_common::{
    ACTION_ALERT, ACTION_BLOCK, ACTION_EXEMPT, JobKey, JobState, RULE_FLAG_AUDIT,
};
use serde::{Deserialize, Serialize};

use crate::{host::procinfo, incident::Incident, policy::LoadedPolicy};

/// Jobs with fewer deletions outside scope than this are not summarised (quiet when nothing is
/// wrong).
pub const SUMMARY_MIN_DELETIONS: u64 = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSummary {
    pub time: String,
    pub host: String,
    pub pgid: u32,
    pub sid: u32,
    pub rule: String,
    pub uid: u32,
    pub user: String,
    pub cgroup_id: u64,
    pub comm: String,
    /// Deletions outside scope over the job's life.
    pub total: u64,
    /// Highest number of deletions outside scope within one window.
    pub peak: u64,
    pub refused: u64,
    /// Incident the job raised (0: none).
    pub incident: u64,
    pub duration_secs: u64,
}

impl JobSummary {
    pub fn new(
        key: &JobKey,
        job: &JobState,
        host: &str,
        policy: &LoadedPolicy,
        now_ns: u64,
    ) -> Self {
        let end = job
            .comm
            .iter()
            .position(|c| *c == 0)
            .unwrap_or(job.comm.len());
        JobSummary {
            time: crate::incident::now_rfc3339(),
            host: host.to_string(),
            pgid: key.pgid,
            sid: key.sid,
            rule: policy.rule_name(job.rule),
            uid: job.uid,
            user: procinfo::user_name(job.uid),
            cgroup_id: job.cgroup_id,
            comm: String::from_utf8_lossy(&job.comm[..end]).into_owned(),
            total: job.total,
            peak: job.peak,
            refused: job.refused,
            incident: job.incident,
            duration_secs: now_ns.saturating_sub(job.first_ns) / 1_000_000_000,
        }
    }
}

#[derive(Serialize)]
struct Replayed {
    job: JobSummary,
    recorded: String,
    candidate_rule: String,
    candidate: String,
}

/// What the candidate policy would have done with a job of this peak.
fn judge(policy: &LoadedPolicy, s: &JobSummary) -> (String, String) {
    let c = &policy.compiled;
    // The kernel's precedence, less the executable (not in the summary): cgroup, then user.
    let rule = c
        .cgroups
        .iter()
        .find(|(id, _)| *id == s.cgroup_id)
        .map(|(_, r)| *r)
        .or_else(|| {
            c.uids
                .iter()
                .find(|(uid, _)| *uid == s.uid)
                .map(|(_, r)| *r)
        })
        .unwrap_or(0);
    judge_rule(policy, rule, s)
}

/// What the candidate policy would have done with a job of this peak under `rule` (`policy
/// suggest` knows the rule by the job's unit when its cgroup is gone).
pub(crate) fn judge_rule(policy: &LoadedPolicy, rule: u32, s: &JobSummary) -> (String, String) {
    let name = policy.rule_name(rule);
    let Some(p) = policy.kernel.rules.get(rule as usize) else {
        return (name, "no such rule".into());
    };
    let audit = p.flags & RULE_FLAG_AUDIT != 0;
    let verdict = if p.action == ACTION_EXEMPT {
        "exempt".to_string()
    } else if s.peak > p.budget {
        let what = match p.action {
            ACTION_BLOCK => "block",
            ACTION_ALERT => "alert",
            _ => "hold",
        };
        format!(
            "would {}{what} (peak {} > budget {} per {})",
            if audit { "report (audit) a " } else { "" },
            s.peak,
            p.budget,
            guardrail_policy::format_duration(std::time::Duration::from_nanos(p.window_ns))
        )
    } else {
        format!("within budget (peak {} <= {})", s.peak, p.budget)
    };
    (name, verdict)
}

pub fn run(events: &Path, policy: &LoadedPolicy, json: bool) -> Result<ExitCode> {
    let text =
        std::fs::read_to_string(events).with_context(|| format!("reading {}", events.display()))?;
    let mut jobs = Vec::new();
    let mut incidents: BTreeMap<u64, Incident> = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let Some(j) = v.get("job") {
            if let Ok(s) = serde_json::from_value::<JobSummary>(j.clone()) {
                jobs.push(s);
            }
        } else if let Some(i) = v.get("incident")
            && let Ok(inc) = serde_json::from_value::<Incident>(i.clone())
        {
            // The last record of an incident carries its final outcome.
            incidents.insert(inc.id, inc);
        }
    }
    let mut out = Vec::new();
    for job in jobs {
        let recorded = match incidents.get(&job.incident) {
            Some(inc) if job.incident != 0 => format!("incident {}: {}", inc.id, inc.outcome),
            _ => "no incident".to_string(),
        };
        let (candidate_rule, candidate) = judge(policy, &job);
        out.push(Replayed {
            job,
            recorded,
            candidate_rule,
            candidate,
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for r in &out {
            println!(
                "{} {} pgid {} ({}, user {}): {} deletions outside scope, peak {} — recorded: {}; candidate rule {}: {}",
                r.job.time,
                r.job.host,
                r.job.pgid,
                r.job.comm,
                r.job.user,
                r.job.total,
                r.job.peak,
                r.recorded,
                r.candidate_rule,
                r.candidate
            );
        }
        let would = out
            .iter()
            .filter(|r| r.candidate.starts_with("would"))
            .count();
        println!(
            "replayed {} jobs from {}: the candidate would act on {would}, {} within budget or exempt",
            out.len(),
            events.display(),
            out.len() - would
        );
        if !policy.compiled.exes.is_empty() {
            println!(
                "note: executable rules cannot be replayed (summaries record the cgroup and uid, not the executable)"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
