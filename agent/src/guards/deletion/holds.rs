//! The deletion guard's decisions on what the kernel reports: a crossing becomes a hold (the job
//! stopped, an incident, a message to its terminal), a kill or a refusal becomes an incident, a
//! job the kernel holds that the agent has no record of (a restart, a crossing the ring dropped)
//! is adopted, and a job that may never be held is released. Methods of the guard's state
//! ([`Guard`]), acting through what the daemon lends them ([`Ctx`]).
use std::time::{Duration, Instant};

use guardrail_common::{
    ALLOWANCE_UNLIMITED, Event, JOB_ACTIVE, JOB_BLOCKED, JOB_DENIED, JOB_HELD, JobKey, JobState,
};
use nix::sys::signal::Signal;

use super::{
    Ctx, Guard,
    decide::{Decision, decide, rule_alerts},
};
use crate::{
    host::procinfo,
    incident::{self, Incident, Kind, Outcome},
    policy::LoadedPolicy,
    text,
    tiers::backend::Backend,
};

pub(crate) struct Hold {
    pub(crate) incident: Incident,
    pub(crate) key: JobKey,
    pub(crate) since: Instant,
    pub(crate) timeout: Duration,
}

/// A crossing the kernel made as a hold (tracepoint tier, no `EVF_BLOCKED`) for a job now found
/// blocked: between the crossing and the agent's reading of it, the job resumed itself
/// `SELF_RESUME_LIMIT` times and the kernel killed it (its kill event follows).
pub(crate) fn resumed_before_read(ev: &Event) -> bool {
    ev.flags & guardrail_common::EVF_TRACEPOINT != 0
        && ev.flags & guardrail_common::EVF_BLOCKED == 0
}

/// The `Instant` a hold began, from the kernel's `CLOCK_BOOTTIME` stamp (0: now).
pub(crate) fn held_since(held_ns: u64) -> Instant {
    let now = crate::host::clock::boottime_ns();
    if held_ns == 0 || held_ns > now {
        return Instant::now();
    }
    Instant::now()
        .checked_sub(Duration::from_nanos(now - held_ns))
        .unwrap_or_else(Instant::now)
}

impl Guard {
    /// Holds left by a previous agent (crash, restart, upgrade) are open holds again: same
    /// incident ids, the job still stopped, the kernel still refusing or re-stopping it, and the
    /// hold's original start (a restart never extends it past `hold_timeout`).
    pub(crate) fn adopt_holds(&mut self, cx: &mut Ctx<'_>) {
        let Ok(jobs) = cx.backend.jobs() else {
            return;
        };
        for (key, job) in jobs {
            if job.state != JOB_HELD || !procinfo::pgid_alive(key.pgid) {
                continue;
            }
            // This version's kernel programs never hold a never_hold unit's job; one an older
            // agent left held is let go rather than adopted (kept stopped, then killed at the
            // hold timeout).
            let pids = procinfo::pids_in_group(key.pgid);
            if let Some(unit) = pids.iter().find_map(|p| never_hold_unit(cx.policy, *p)) {
                self.release_never_held(cx, key, job, &unit);
                continue;
            }
            self.adopt_job(cx, key, &job, "adopted from the previous agent", false);
        }
    }
    /// Makes `job`, which the kernel holds, an open hold of this agent. Only when a live process
    /// of the same session started before the hold: a process group id reused by a newer job is
    /// never stopped (its stale entry is dropped instead). `report`: the incident was never
    /// reported (its event was lost) and goes to the sinks now.
    pub(crate) fn adopt_job(
        &mut self,
        cx: &mut Ctx<'_>,
        key: JobKey,
        job: &JobState,
        how: &str,
        report: bool,
    ) -> bool {
        if !crate::host::identity::job_predates(&key, job.held_ns) {
            let _ = cx.backend.remove_job(&key);
            return false;
        }
        let end = job
            .comm
            .iter()
            .position(|c| *c == 0)
            .unwrap_or(job.comm.len());
        let comm = String::from_utf8_lossy(&job.comm[..end]).into_owned();
        let pid = procinfo::pids_in_group(key.pgid)
            .first()
            .copied()
            .unwrap_or(key.pgid);
        let id = if job.incident != 0 {
            job.incident
        } else {
            self.next_local_incident(cx)
        };
        let inc = Incident {
            id,
            time: incident::now_rfc3339(),
            host: cx.host.to_string(),
            tier: cx.tier.to_string(),
            kind: Kind::BudgetCrossed,
            rule: cx.policy.rule_name(job.rule),
            outcome: Outcome::Held,
            reason: format!(
                "{} deletions outside the deletion targets (budget {}, rule {}); {how}",
                job.count,
                cx.policy.rule_budget(job.rule),
                cx.policy.rule_name(job.rule)
            ),
            pid,
            pgid: key.pgid,
            sid: key.sid,
            uid: job.uid,
            user: procinfo::user_name(job.uid),
            command: procinfo::cmdline(pid).unwrap_or(comm.clone()),
            comm,
            count: job.count,
            total_count: job.total,
            audit_session: std::fs::read_to_string(format!("/proc/{pid}/sessionid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|s| *s != u32::MAX),
            ..Default::default()
        };
        println!(
            "guardrail: adopted open hold {} (pgid {}): {how}",
            inc.id, key.pgid
        );
        procinfo::signal_job(key.pgid, Signal::SIGSTOP);
        if report {
            cx.sink.incident(&inc);
        }
        let timeout = cx.policy.hold_timeout;
        self.holds.insert(
            inc.id,
            Hold {
                incident: inc,
                key,
                since: held_since(job.held_ns),
                timeout,
            },
        );
        true
    }
    /// A job the kernel holds or blocked, whose crossing event never reached the agent (ring
    /// full, agent stalled): adopted as a hold with an id and a timeout (blocked: reported), so
    /// no job is ever left stopped with no record. Jobs held for under a second are left to the
    /// event still on its way.
    pub(crate) fn adopt_unrecorded(&mut self, cx: &mut Ctx<'_>) {
        // The daemon drains the ring buffer first: a crossing already reported is not adopted.
        if !matches!(cx.backend, Backend::Bpf { .. }) {
            return;
        }
        let Ok(jobs) = cx.backend.jobs() else {
            return;
        };
        let now = crate::host::clock::boottime_ns();
        for (key, job) in jobs {
            let settled = job.held_ns != 0 && now.saturating_sub(job.held_ns) >= 1_000_000_000;
            if !settled || !procinfo::pgid_alive(key.pgid) {
                continue;
            }
            let recorded =
                self.holds.contains_key(&job.incident) || self.holds.values().any(|h| h.key == key);
            if job.state == JOB_HELD && !recorded {
                self.adopt_job(
                    cx,
                    key,
                    &job,
                    "found held by the kernel, its crossing event was lost",
                    true,
                );
            } else if job.state == JOB_BLOCKED
                && !self.kernel_jobs.blocked_reported.contains(&job.incident)
                && crate::host::identity::job_predates(&key, job.held_ns)
            {
                self.kernel_jobs.blocked_reported.insert(job.incident);
                let mut inc = Incident {
                    id: job.incident,
                    time: incident::now_rfc3339(),
                    host: cx.host.to_string(),
                    tier: cx.tier.to_string(),
                    kind: Kind::BudgetCrossed,
                    rule: cx.policy.rule_name(job.rule),
                    pgid: key.pgid,
                    sid: key.sid,
                    uid: job.uid,
                    user: procinfo::user_name(job.uid),
                    count: job.count,
                    ..Default::default()
                };
                inc.outcome = if cx.tier.refuses() {
                    Outcome::Refused
                } else {
                    Outcome::Killed
                };
                inc.reason = format!(
                    "{} deletions outside the deletion targets (rule {}); found blocked by the kernel, its crossing event was lost",
                    job.count, inc.rule
                );
                cx.sink.incident(&inc);
            }
        }
    }
    /// Lets a held job of a never_hold unit go, as the kernel would have decided it: refused from
    /// here on where the tier refuses, free elsewhere.
    pub(crate) fn release_never_held(
        &mut self,
        cx: &mut Ctx<'_>,
        key: JobKey,
        mut job: JobState,
        unit: &str,
    ) {
        if cx.tier.refuses() {
            job.state = JOB_DENIED;
        } else {
            job.state = JOB_ACTIVE;
            job.allowance = ALLOWANCE_UNLIMITED;
        }
        let _ = cx.backend.set_job(&key, &job);
        procinfo::signal_job(key.pgid, Signal::SIGCONT);
        println!(
            "guardrail: job {} of {unit} was left held by the previous agent; continued, never held (deletion.never_hold)",
            key.pgid
        );
    }
    /// Carries out [`decide`]'s decision on one kernel event.
    pub(crate) fn on_event(&mut self, cx: &mut Ctx<'_>, ev: &Event) {
        let mut inc = super::report::incident_from_event(ev, cx.host, cx.tier, cx.policy);
        let key = JobKey {
            sid: ev.sid,
            pgid: ev.pgid,
        };
        let alerts = rule_alerts(&cx.policy.kernel.rules, ev.rule);
        let decision = {
            let backend = &mut *cx.backend;
            decide(ev, alerts, || {
                backend.job(&key).ok().flatten().map(|j| j.state)
            })
        };
        match decision {
            Decision::Report(outcome) => {
                inc.outcome = outcome;
                cx.sink.incident(&inc);
            }
            Decision::ReportedAfterTheFact => {
                // The deletion happened, so it is not "refused".
                inc.outcome = Outcome::Reported;
                inc.reason = format!(
                    "{} (tracepoint tier: the file is gone, the job was not stopped)",
                    inc.reason
                );
                cx.sink.incident(&inc);
            }
            Decision::NeverHeld => self.never_held(cx, inc, ev),
            Decision::KilledBeforeRead => self.end_resumed(cx, inc, key, None),
            Decision::Blocked => {
                self.kernel_jobs.blocked_reported.insert(inc.id);
                inc.outcome = if cx.tier.refuses() {
                    Outcome::Refused
                } else {
                    Outcome::Killed
                };
                cx.sink.incident(&inc);
            }
            Decision::Hold { unless_open } => {
                if unless_open && self.holds.contains_key(&inc.id) {
                    // Already adopted by a tick that found the job held before this event.
                    return;
                }
                inc.outcome = Outcome::Held;
                self.hold(cx, inc, key);
            }
            Decision::StoppedForeign => self.stopped_foreign(cx, inc, ev),
            Decision::KilledResumed => self.killed_resumed(cx, inc, ev),
            Decision::StopAgain => {
                // The kernel re-stopped the task; the whole job is stopped again here.
                procinfo::signal_job(ev.pgid, Signal::SIGSTOP);
                if let Some(h) = self
                    .holds
                    .values_mut()
                    .find(|h| h.key.pgid == ev.pgid && h.key.sid == ev.sid)
                {
                    h.incident.retries = ev.count;
                    h.incident.last_path = inc.path.clone();
                }
            }
            Decision::Nothing => {}
        }
    }
    /// A held job resumed itself `SELF_RESUME_LIMIT` times without approval (tracepoint tier: a
    /// sibling looping `kill -CONT`, a ptracer swallowing SIGSTOP): the kernel killed the task
    /// and blocked the job. The rest of the job is killed here and the hold closed, saying why.
    /// With no open hold (its crossing event was lost), the tick reports the blocked job.
    pub(crate) fn killed_resumed(&mut self, cx: &mut Ctx<'_>, inc: Incident, ev: &Event) {
        let key = JobKey {
            sid: ev.sid,
            pgid: ev.pgid,
        };
        // Found before the job goes: a wrapper stopped in sympathy (sudo) is continued after.
        let wrappers = procinfo::stopped_ancestors(key.pgid);
        let Some(id) = self
            .holds
            .iter()
            .find(|(_, h)| h.key == key)
            .map(|(id, _)| *id)
        else {
            // No hold to close: the kernel had already blocked the job when the agent read its
            // crossing (parallel tasks deleting at the hold reached the limit first), so it was
            // reported as killed, not held. Its tasks stopped at the hold would wait forever,
            // and their parent with them: the job still ends whole (seen with 16 parallel rm).
            procinfo::signal_job(key.pgid, Signal::SIGKILL);
            procinfo::continue_pids(&wrappers);
            return;
        };
        let Some(h) = self.holds.remove(&id) else {
            return;
        };
        let mut out = h.incident;
        out.retries = ev.count;
        out.last_path = inc.path;
        self.end_resumed(cx, out, key, Some(wrappers));
    }
    /// The job's state in the kernel's table (`JOB_*`), if it has an entry there.
    fn kernel_state(&mut self, cx: &mut Ctx<'_>, key: &JobKey) -> Option<u32> {
        cx.backend.job(key).ok().flatten().map(|j| j.state)
    }

    /// Ends a job held and then killed by the kernel for resuming itself: the rest of the job is
    /// killed (a wrapper stopped in sympathy is continued) and the incident says why. Called on
    /// the kill event for an open hold, or on the crossing itself when the agent read it only
    /// after the kill (under load: the held job resumed itself faster than the agent read).
    pub(crate) fn end_resumed(
        &mut self,
        cx: &mut Ctx<'_>,
        mut out: Incident,
        key: JobKey,
        wrappers: Option<Vec<u32>>,
    ) {
        let wrappers = wrappers.unwrap_or_else(|| procinfo::stopped_ancestors(key.pgid));
        procinfo::signal_job(key.pgid, Signal::SIGKILL);
        procinfo::continue_pids(&wrappers);
        self.kernel_jobs.blocked_reported.insert(out.id);
        out.outcome = Outcome::Killed;
        if out.retries == 0 {
            out.retries = guardrail_common::SELF_RESUME_LIMIT;
        }
        out.reason = format!(
            "{}; resumed itself {} times without approval; killed",
            out.reason,
            guardrail_common::SELF_RESUME_LIMIT
        );
        println!(
            "guardrail: incident {}: held job {} resumed itself {} times without approval; killed",
            out.id,
            key.pgid,
            guardrail_common::SELF_RESUME_LIMIT
        );
        cx.sink.incident(&out);
    }
    /// A tracepoint-tier deletion in a foreign data directory: the kernel let it through (it cannot
    /// refuse), then stopped the job (JOB_HELD) or killed it (JOB_BLOCKED). The outcome says what
    /// really happened: the file is gone, the job is held or killed.
    pub(crate) fn stopped_foreign(&mut self, cx: &mut Ctx<'_>, mut inc: Incident, ev: &Event) {
        let key = JobKey {
            sid: ev.sid,
            pgid: ev.pgid,
        };
        let dir = cx
            .policy
            .compiled
            .data_dirs
            .get(ev.data_dir_id as usize)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(unknown)".into());
        inc.reason = format!(
            "stopped after 1 file: a foreign deletion in data directory {dir} ({} {}; tracepoint tier: the file is gone)",
            inc.op, inc.path
        );
        let state = self.kernel_state(cx, &key).unwrap_or(JOB_HELD);
        if state == JOB_BLOCKED && resumed_before_read(ev) {
            self.end_resumed(cx, inc, key, None);
            return;
        }
        if state == JOB_BLOCKED {
            self.kernel_jobs.blocked_reported.insert(inc.id);
            inc.reason = inc.reason.replacen("stopped after", "killed after", 1);
            inc.outcome = Outcome::Killed;
            cx.sink.incident(&inc);
            return;
        }
        if let Some(h) = self.holds.get_mut(&inc.id) {
            // Already adopted by a tick that found the job held before this event: give the
            // hold its real reason.
            h.incident.reason = inc.reason;
            return;
        }
        inc.outcome = Outcome::Held;
        self.hold(cx, inc, key);
    }
    pub(crate) fn next_local_incident(&mut self, cx: &mut Ctx<'_>) -> u64 {
        // Incidents from the kernel count up from 1; ones the agent makes for tracepoint-tier
        // protected paths take the kernel counter too, so ids never collide.
        cx.backend.next_incident()
    }
    pub(crate) fn hold(&mut self, cx: &mut Ctx<'_>, mut inc: Incident, key: JobKey) {
        // Stop the whole job, not only the task the kernel signalled.
        procinfo::signal_job(key.pgid, Signal::SIGSTOP);
        let timeout = cx.policy.hold_timeout;
        // A job approved before and held again: what it has done in all, and the approvals.
        let job = cx.backend.job(&key).ok().flatten();
        inc.total_count = job.map_or(inc.count, |j| j.total.max(inc.count));
        inc.earlier_approvals = self.approvals.of(&key);
        let budget = job.map_or(inc.budget, |j| cx.policy.rule_budget(j.rule));
        // The command and the reason (a path) are the job's text: capped and escaped.
        let lines = crate::guards::deletion::approval::hold_lines(
            format!(
                "guardrail: held job \"{}\" on {}: {}. Incident {}.",
                text::cap(&inc.command, 400),
                cx.host,
                text::cap(&inc.reason, 300),
                inc.id
            ),
            inc.id,
            budget,
            crate::guards::deletion::approval::held_again(inc.total_count, &inc.earlier_approvals),
        );
        crate::guards::tell::tell_job(inc.pid, &lines);
        cx.sink.incident(&inc);
        println!(
            "guardrail: incident {} held: {} ({})",
            inc.id,
            text::cap_command(&inc.command),
            text::escape_line(&inc.reason)
        );
        self.holds.insert(
            inc.id,
            Hold {
                incident: inc,
                key,
                since: Instant::now(),
                timeout,
            },
        );
    }
    /// A job of a `deletion.never_hold` unit (logind, sshd, journald...) crossed its budget. The
    /// kernel (or the watcher) decided alone and stopped nothing, so this holds while no agent
    /// runs: where the tier can refuse (lsm) the job's further deletions outside scope are refused
    /// until it ends; elsewhere the crossing is only reported and the job deletes on. Nothing is
    /// signalled from here.
    pub(crate) fn never_held(&mut self, cx: &mut Ctx<'_>, mut inc: Incident, ev: &Event) {
        let refused = ev.flags & guardrail_common::EVF_REFUSED != 0;
        // Named by the kernel (the unit's index in the policy): the job may be gone by now.
        let unit = cx
            .policy
            .compiled
            .never_hold
            .get(ev.data_dir_id as usize)
            .cloned()
            .or_else(|| never_hold_unit(cx.policy, ev.tgid))
            .unwrap_or_else(|| "its unit".to_string());
        if inc.unit.is_none() {
            inc.unit = Some(unit.clone());
        }
        let what = if refused {
            "not stopped, every further deletion of this job outside scope refused"
        } else {
            "not stopped, only reported: this tier cannot refuse"
        };
        inc.outcome = if refused {
            Outcome::Refused
        } else {
            Outcome::Reported
        };
        inc.reason = format!(
            "{}; {unit} is never held (deletion.never_hold): {what}",
            inc.reason
        );
        println!(
            "guardrail: incident {} not held: {} ({})",
            inc.id,
            text::cap_command(&inc.command),
            text::escape_line(&inc.reason)
        );
        cx.sink.incident(&inc);
    }
}

/// The never_hold unit a process runs in: its own cgroup or the nearest one above it (a
/// `Delegate=yes` unit's sub-cgroup) whose id is in the kernel's `NEVER_HOLD` table. Matched
/// by id like the kernel does, never by name: names below a delegated unit are the job's.
pub(crate) fn never_hold_unit(policy: &LoadedPolicy, pid: u32) -> Option<String> {
    let path = crate::host::cgroup::path_of(pid)?;
    let root = guardrail_policy::cgroup2_root();
    crate::host::cgroup::ancestor_ids(&root, &path)
        .into_iter()
        .find(|(id, _)| {
            policy
                .compiled
                .never_hold_cgroups
                .iter()
                .any(|(x, _)| x == id)
        })
        .map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use guardrail_common::{EVF_BLOCKED, EVF_SIGNALLED, EVF_TRACEPOINT, Event};

    use super::resumed_before_read;

    #[test]
    fn a_blocked_job_was_killed_for_resuming_only_if_its_crossing_held_it() {
        let ev = |flags| {
            let mut e = Event::zeroed();
            e.flags = flags;
            e
        };
        assert!(resumed_before_read(&ev(EVF_TRACEPOINT | EVF_SIGNALLED)));
        assert!(!resumed_before_read(&ev(EVF_TRACEPOINT
            | EVF_SIGNALLED
            | EVF_BLOCKED)));
        // LSM and fmod_ret refuse: a held job never resumes into a kill there.
        assert!(!resumed_before_read(&ev(0)));
    }
}
