//! What `guardrail approve` grants, what a job approved before carries into its next hold, and
//! what a held job is told.
//!
//! A bare `guardrail approve ID` lets the job finish: the hold message says "to let it continue",
//! and an admin who reads that and approves means "finish what you were doing", not "300 more
//! files, then stop again half way" (issue #17: a `pip install --upgrade` of 1,012 files was held
//! twice). `--more N` is the narrower grant, for a job the admin wants to look at again.
use std::collections::HashMap;

use guardrail_common::{ALLOWANCE_UNLIMITED, JOB_ACTIVE, JobKey, JobState};

/// What one approval lets the job do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// No budget for the rest of this job (its process group in its session); a new job is judged
    /// afresh.
    RestOfJob,
    /// Exactly N more deletions outside its targets, then held again.
    More(u64),
}

impl Grant {
    /// From the request's fields: `budget` is `--more N` (`--budget N` in older CLIs); nothing
    /// (or `--for-job`) is the rest of the job.
    pub fn from_request(budget: Option<u64>, for_job: bool) -> Result<Grant, String> {
        match (budget, for_job) {
            (Some(_), true) => {
                Err("either --more N or --for-job, not both; nothing approved".to_string())
            }
            (Some(n), false) => Ok(Grant::More(n)),
            (None, _) => Ok(Grant::RestOfJob),
        }
    }

    /// Writes the grant into the job's kernel state and lets it run. The window counts afresh
    /// from here: the kernel holds again when count > budget + allowance, so the count starts
    /// where N more reach that line.
    pub fn apply(self, job: &mut JobState, rule_budget: u64, now_ns: u64) {
        match self {
            Grant::RestOfJob => {
                job.allowance = ALLOWANCE_UNLIMITED;
                job.count = 0;
            }
            Grant::More(n) => {
                job.allowance = n.saturating_sub(rule_budget).min(ALLOWANCE_UNLIMITED);
                job.count = rule_budget.saturating_sub(n);
                // The kernel lets an approved job past its session's and user's budgets by its
                // non-zero allowance: one more on both sides keeps the job's own line where it
                // was.
                if job.allowance == 0 {
                    job.allowance = 1;
                    job.count += 1;
                }
            }
        }
        job.prev_count = 0;
        job.window_start_ns = now_ns;
        job.incident = 0;
        job.held_ns = 0;
        job.state = JOB_ACTIVE;
    }

    /// "for the rest of the job", "for 100 more deletions".
    pub fn describe(self) -> String {
        match self {
            Grant::RestOfJob => "for the rest of the job".to_string(),
            Grant::More(n) => format!("for {n} more deletions"),
        }
    }
}

// The record itself is part of the incident schema (crate::incident::EarlierApproval); what it
// says is the approval's business.
pub use crate::incident::EarlierApproval;

impl EarlierApproval {
    /// "incident 1 approved for 100 more deletions by uid 0 at 396 deletions".
    pub fn describe(&self) -> String {
        let grant = match self.more {
            Some(n) => Grant::More(n),
            None => Grant::RestOfJob,
        };
        let by = self
            .by_uid
            .map_or(String::new(), |u| format!(" by uid {u}"));
        format!(
            "incident {} approved {}{by} at {} deletions",
            self.incident,
            grant.describe(),
            self.total_at_approval
        )
    }
}

/// Approvals per job, for the job's next hold. Forgotten when the job ends (a process group id
/// reused later is a new job).
#[derive(Default)]
pub struct History {
    jobs: HashMap<JobKey, Vec<EarlierApproval>>,
}

impl History {
    pub fn record(&mut self, key: JobKey, a: EarlierApproval) {
        let v = self.jobs.entry(key).or_default();
        // Bounded: a job approved a thousand times keeps its latest few.
        if v.len() >= 16 {
            v.remove(0);
        }
        v.push(a);
    }

    pub fn of(&self, key: &JobKey) -> Vec<EarlierApproval> {
        self.jobs.get(key).cloned().unwrap_or_default()
    }

    /// Drops the jobs `alive` says have ended.
    pub fn retain(&mut self, mut alive: impl FnMut(&JobKey) -> bool) {
        self.jobs.retain(|k, _| alive(k));
    }
}

/// The lines a held job's terminal gets (the caller caps and escapes the job's own text).
/// `budget`: the rule's budget, offered as the N of `--more N`.
pub fn hold_lines(head: String, id: u64, budget: u64, again: Option<String>) -> Vec<String> {
    let mut lines = vec![head];
    if let Some(a) = again {
        lines.push(format!("  {a}"));
    }
    let more = budget.max(1);
    let choices = [
        (
            "To let it finish (no limit for the rest of this job):".to_string(),
            format!("guardrail approve {id}"),
        ),
        (
            format!("To let it delete {more} more, then hold it again:"),
            format!("guardrail approve {id} --more {more}"),
        ),
        ("To end it:".to_string(), format!("guardrail deny {id}")),
    ];
    let width = choices.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    for (label, command) in choices {
        lines.push(format!("  {label:<width$} {command}"));
    }
    lines
}

/// "Held again: 401 deletions outside its targets in all; incident 1 approved for 100 more
/// deletions by uid 0 at 101 deletions." (None for a first hold).
pub fn held_again(total: u64, earlier: &[EarlierApproval]) -> Option<String> {
    if earlier.is_empty() {
        return None;
    }
    let list: Vec<String> = earlier.iter().map(EarlierApproval::describe).collect();
    Some(format!(
        "Held again: {total} deletions outside its targets in all; {}.",
        list.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_approve_is_the_rest_of_the_job() {
        assert_eq!(Grant::from_request(None, false), Ok(Grant::RestOfJob));
        assert_eq!(Grant::from_request(None, true), Ok(Grant::RestOfJob));
        assert_eq!(Grant::from_request(Some(5), false), Ok(Grant::More(5)));
        assert!(Grant::from_request(Some(5), true).is_err());
        let mut j = JobState {
            count: 101,
            ..Default::default()
        };
        Grant::RestOfJob.apply(&mut j, 100, 7);
        assert_eq!(
            (j.allowance, j.count, j.state),
            (ALLOWANCE_UNLIMITED, 0, JOB_ACTIVE)
        );
        // N more reach the kernel's line (count > budget + allowance) exactly.
        for (n, budget) in [(30, 100), (100, 100), (300, 100), (0, 100)] {
            Grant::More(n).apply(&mut j, budget, 7);
            assert_eq!(budget + j.allowance - j.count, n, "{n} more of {budget}");
        }
    }

    #[test]
    fn a_second_hold_names_the_earlier_approval_and_the_total() {
        let a = EarlierApproval {
            incident: 1,
            more: Some(100),
            by_uid: Some(0),
            by_session: None,
            total_at_approval: 101,
            time: String::new(),
        };
        assert_eq!(held_again(202, &[]), None);
        assert_eq!(
            held_again(202, &[a]).as_deref(),
            Some(
                "Held again: 202 deletions outside its targets in all; incident 1 approved for 100 more deletions by uid 0 at 101 deletions."
            )
        );
        let lines = hold_lines("head".into(), 2, 300, None);
        assert_eq!(
            lines[1],
            "  To let it finish (no limit for the rest of this job): guardrail approve 2"
        );
        assert!(lines[2].ends_with("guardrail approve 2 --more 300"));
        assert!(lines[3].ends_with("guardrail deny 2"));
    }
}
