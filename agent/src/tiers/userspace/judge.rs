//! The userspace tier's judgement of one deletion, as the kernel programs judge it: which
//! directory and scope it is in, which process and job made it (exactly, or by a guess from
//! the job's ancestors when the process is gone), the job's rule and budget, and the event
//! the daemon gets when a budget is crossed or a protected path is touched.
use std::{
    ffi::OsStr,
    os::{
        fd::{AsFd, AsRawFd},
        unix::ffi::OsStrExt,
    },
    rc::Rc,
    time::Instant,
};

use anyhow::Result;
use guardrail_common::{
    ACTION_ALERT, ACTION_BLOCK, ACTION_EXEMPT, ALLOWANCE_UNLIMITED, EV_BUDGET_CROSSED, EV_DATA_DIR,
    EV_HELD_RETRY, EV_PROTECTED_ROOT, EVENT_PATH_DEPTH, EVF_AUDIT, EVF_GUESSED, EVF_NEVER_HOLD,
    EVF_SIGNALLED, EVF_USERSPACE, Event, JOB_ACTIVE, JOB_BLOCKED, JOB_HELD, JobKey, JobState,
    MAX_ANCESTORS, MAX_RULES, MODE_AUDIT, NAME_LEN, OP_RENAME, RULE_FLAG_AUDIT, Scope, over_budget,
};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use super::dirs::{DirEntry, DirInfo, fstat_id, kid, walk_scope};
use super::fanotify::{Fid, open_by_handle};
use super::procs::{ProcDetails, proc_stat, read_details, read_proc};
use super::{
    Deferred, Fallback, Mechanism, PENDING_HARD_MAX, PENDING_MAX, PROC_TTL, SUSPECT_TTL, Seen,
    UNKNOWN_JOB, Who,
};
use crate::host::clock::monotonic_ns;

impl Fallback {
    /// The directory behind a handle: reopened with `open_by_handle_at` once per handle, its path
    /// read back from /proc/self/fd, its ancestors found by walking `..` from the open directory
    /// (memoised per directory identity). A deleted directory is known through its parent when
    /// its deletion event was read; else `None` (not yet known).
    pub(super) fn resolve_fid(&mut self, fid: &Fid) -> Option<Rc<DirInfo>> {
        self.resolve_depth(fid, 0)
    }

    pub(super) fn resolve_depth(&mut self, fid: &Fid, depth: u32) -> Option<Rc<DirInfo>> {
        if let Some(d) = self.dir_cache.get(fid) {
            return Some(d.info.clone());
        }
        let Mechanism::Fanotify { marked, .. } = &self.mech else {
            return None;
        };
        let m = marked.iter().find(|m| m.fsid == fid.fsid)?;
        let Some(fd) = open_by_handle(m.mount_fd.as_fd(), fid) else {
            // Deleted: judged by its parent's ancestors (its own identity is gone with it, so it
            // cannot itself be matched as a declared directory).
            return self.resolve_via_parent(fid, depth, None);
        };
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok();
        match path {
            Some(p) if !p.as_os_str().as_bytes().ends_with(b" (deleted)") => {
                let d = Rc::new(DirInfo {
                    chain: self.ancestors.chain_of(fd),
                    path: Some(p),
                });
                self.cache_dir(fid, d.clone());
                Some(d)
            }
            // Unlinked but still open somewhere (`rm -rf` holds a directory while it empties
            // it, then removes it): `..` leads nowhere, so its place is known only from its own
            // deletion event, which names the parent. Until that is read the record waits, like
            // one whose directory cannot be reopened at all; judged without it, a deletion deep
            // inside a target would count against the budget.
            _ => self.resolve_via_parent(fid, depth, fstat_id(fd.as_fd())),
        }
    }

    /// A deleted directory's place, from the parent its deletion event named (`None` until that
    /// event is read): the parent's chain, after `own` identity where the directory still has
    /// one (unlinked but open).
    pub(super) fn resolve_via_parent(
        &mut self,
        fid: &Fid,
        depth: u32,
        own: Option<(u64, u64)>,
    ) -> Option<Rc<DirInfo>> {
        let parent = self.parent_of.get(fid)?.clone();
        if depth >= MAX_ANCESTORS {
            return None;
        }
        let up = self.resolve_depth(&parent, depth + 1)?;
        let d = Rc::new(DirInfo {
            path: up.path.as_ref().map(|p| p.join("(deleted)")),
            chain: own.into_iter().chain(up.chain.iter().copied()).collect(),
        });
        self.cache_dir(fid, d.clone());
        Some(d)
    }

    pub(super) fn cache_dir(&mut self, fid: &Fid, info: Rc<DirInfo>) {
        if self.dir_cache.len() > 65536 {
            self.dir_cache.clear();
        }
        self.dir_cache.insert(
            fid.clone(),
            DirEntry {
                info,
                verdicts: Vec::new(),
            },
        );
    }

    /// The directory of a deletion, resolving its handle if needed. `Err(Deferred)` while the
    /// directory cannot be reopened and its deletion event may still come.
    pub(super) fn dir_of(&mut self, s: &mut Seen) -> Result<Rc<DirInfo>, Deferred> {
        if let Some(d) = &s.dir {
            return Ok(d.clone());
        }
        let d = match &s.fid {
            Some(fid) => match self.resolve_fid(fid) {
                Some(d) => d,
                // Its deletion event follows its contents' within moments, but the watcher can
                // lag far behind the deleters (a busy host): give up only once the queue was
                // found empty after the wait, i.e. everything deleted by then has been read.
                // (At most PENDING_HARD_MAX: a host deleting without pause never empties it.)
                None if s.since.elapsed() < PENDING_HARD_MAX
                    && (s.since.elapsed() < PENDING_MAX
                        || self.drained_at.is_none_or(|d| d < s.since + PENDING_MAX)) =>
                {
                    return Err(Deferred);
                }
                None => Rc::new(DirInfo::default()),
            },
            None => Rc::new(DirInfo::default()),
        };
        s.dir = Some(d.clone());
        Ok(d)
    }

    /// What the nearest declared ancestor of the deletion's directory says for `rule`, cached
    /// per directory handle.
    pub(super) fn scope_of(&mut self, s: &mut Seen, rule: u32) -> Result<Scope, Deferred> {
        let dir = self.dir_of(s)?;
        if let Some(fid) = &s.fid
            && let Some(e) = self.dir_cache.get_mut(fid)
        {
            if let Some((_, v)) = e.verdicts.iter().find(|(r, _)| *r == rule) {
                return Ok(*v);
            }
            let v = walk_scope(&self.tables.dirs, &e.info.chain, rule);
            e.verdicts.push((rule, v));
            return Ok(v);
        }
        Ok(walk_scope(&self.tables.dirs, &dir.chain, rule))
    }

    /// The job of a live (or recently seen) process: one read of /proc/PID/stat per pid and
    /// [`PROC_TTL`]; what we knew last for a process that has exited since.
    pub(super) fn job_of_pid(&mut self, pid: u32) -> Option<JobKey> {
        if let Some(p) = self.procs.get(pid)
            && p.read_at.elapsed() < PROC_TTL
        {
            return Some(p.key);
        }
        match read_proc(pid) {
            Some(new) => {
                let key = new.key;
                match self.procs.get(pid) {
                    // Same job: what we read about it (rule, identity) still holds.
                    Some(old) if old.key == new.key => {
                        old.read_at = new.read_at;
                        old.comm = new.comm;
                    }
                    _ => self.procs.insert(pid, new),
                }
                Some(key)
            }
            // Exited: what we knew last is the best we have.
            None => self.procs.get(pid).map(|p| p.key),
        }
    }

    /// The identity of a process we have a cache entry for, reading it once.
    pub(super) fn details_of(&mut self, pid: u32) -> Option<([u8; 16], Option<ProcDetails>)> {
        let cgroot = &self.cgroot;
        let p = self.procs.get(pid)?;
        if p.details.is_none() {
            p.details = read_details(pid, cgroot);
        }
        Some((p.comm, p.details.clone()))
    }

    /// The rule of a job that has no state yet, by its process: cached per pid and policy.
    pub(super) fn rule_of_pid(&mut self, pid: u32) -> u32 {
        let generation = self.policy_gen;
        if let Some(p) = self.procs.get(pid)
            && let Some((g, r)) = p.rule
            && g == generation
        {
            return r;
        }
        let rule = match self.details_of(pid) {
            Some((_, Some(d))) => self.rule_of(&d),
            _ => 0,
        };
        if let Some(p) = self.procs.get(pid) {
            p.rule = Some((generation, rule));
        }
        rule
    }

    /// Jobs with a live process whose cwd or an open fd is the directory `dir`: who is most
    /// likely deleting in it (`rm -r` and `find -delete` hold the directory open). A scan of
    /// /proc: only at the unknown job's crossing.
    pub(super) fn suspects_of(&mut self, dir: (u64, u64)) -> Vec<(JobKey, u32)> {
        if let Some((at, s)) = self.suspects.get(&dir)
            && at.elapsed() < SUSPECT_TTL
        {
            return s.clone();
        }
        let mut found: Vec<(JobKey, u32)> = Vec::new();
        let pids: Vec<u32> = std::fs::read_dir("/proc")
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        for pid in pids {
            if pid == self.me {
                continue;
            }
            let hit = std::fs::metadata(format!("/proc/{pid}/cwd")).is_ok_and(|m| kid(&m) == dir)
                || std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|rd| {
                    rd.flatten().any(|e| {
                        std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir() && kid(&m) == dir)
                    })
                });
            if !hit {
                continue;
            }
            if let Some((_, _, _, pgrp, sid)) = proc_stat(pid)
                && pgrp != self.my_pgid
                && !found.iter().any(|(k, _)| k.pgid == pgrp)
            {
                found.push((JobKey { sid, pgid: pgrp }, pid));
            }
        }
        if self.suspects.len() > 4096 {
            self.suspects.clear();
        }
        self.suspects.insert(dir, (Instant::now(), found.clone()));
        found
    }

    pub(super) fn rule_of(&self, p: &ProcDetails) -> u32 {
        // The kernel's order: executable tag, then cgroup, then user, then the default rule.
        if let Some(r) = p.exes.iter().find_map(|e| self.tables.exes.get(e)) {
            return *r;
        }
        if let Some(r) = p
            .cgroup_ancestors
            .iter()
            .find_map(|c| self.tables.cgroups.get(c))
        {
            return *r;
        }
        self.tables.uids.get(&p.uid).copied().unwrap_or(0)
    }

    /// The kernel's `judge`, after the fact. `Err(Deferred)` (before any state changed) when the
    /// verdict needs a directory that cannot be resolved yet.
    pub(super) fn judge(&mut self, s: &mut Seen) -> Result<Option<Event>, Deferred> {
        let audit = self.tables.mode == MODE_AUDIT;
        // 1. A protected root itself, deleted or renamed away. Only a protected root's name
        // needs its directory resolved for this.
        let protected = (s.op != OP_RENAME || s.moved_from)
            && s.name
                .as_ref()
                .is_some_and(|n| self.tables.protected_names.contains(OsStr::from_bytes(n)));
        if protected {
            let dir = self.dir_of(s)?;
            if let (Some(parent), Some(name)) = (dir.chain.first(), &s.name)
                && self
                    .tables
                    .protected
                    .get(parent)
                    .is_some_and(|names| names.contains(OsStr::from_bytes(name)))
            {
                let who = self.attribute(s)?;
                let key = who.key;
                let mut ev = self.event(s, &who, EV_PROTECTED_ROOT, 0);
                if audit {
                    ev.flags |= EVF_AUDIT;
                    return Ok(Some(ev));
                }
                if let Some(unit) = self.never_held(who.pid) {
                    // Reported, not stopped: see `never_held`.
                    ev.flags |= EVF_NEVER_HOLD;
                    ev.data_dir_id = unit;
                    return Ok(Some(ev));
                }
                // It is already gone: stop the job so that an admin looks before it goes on.
                let mut job = self.jobs.get(&key).copied().unwrap_or_default();
                if job.state == JOB_ACTIVE {
                    job.state = JOB_HELD;
                    self.incidents += 1;
                    job.incident = self.incidents;
                }
                ev.incident = job.incident;
                if self.stop(&key, Signal::SIGSTOP) {
                    ev.flags |= EVF_SIGNALLED;
                }
                self.jobs.insert(key, job);
                return Ok(Some(ev));
            }
        }
        // A file moved away from a directory is judged at its destination (MOVED_TO), like the
        // kernel judges a rename by what it replaces; a directory leaving takes its tree along.
        if s.moved_from && !s.is_dir {
            return Ok(None);
        }
        // 2. The job and its rule, before the directory: most verdicts need no directory.
        let who = self.attribute(s)?;
        let key = who.key;
        if let Some(only) = self.only_pgid
            && key.pgid != only
        {
            return Ok(None);
        }
        let known = self.jobs.get(&key).copied();
        let rule = match (known, who.pid) {
            (Some(j), _) => j.rule,
            (None, Some(pid)) => self.rule_of_pid(pid),
            (None, None) => 0,
        } & (MAX_RULES - 1);
        let Some(params) = self.tables.rules.get(rule as usize).copied() else {
            return Ok(None);
        };
        let rule_audit = audit || params.flags & RULE_FLAG_AUDIT != 0;
        if let Some(mut j) = known
            && j.state != JOB_ACTIVE
            && !(j.state == JOB_HELD && self.extra.get(&key).is_some_and(|e| e.confirmed_stopped))
        {
            // Stopped (or killed) and not yet seen stopped: this is the overshoot still queued
            // or in flight; nothing in it can change the job's verdict, so no directory is
            // resolved for it.
            j.refused += 1;
            self.jobs.insert(key, j);
            return Ok(None);
        }
        if params.action == ACTION_EXEMPT && !self.tables.has_data_dirs {
            return Ok(None);
        }

        // 3. The nearest declared ancestor decides.
        match self.scope_of(s, rule)? {
            Scope::Undecided => {}
            Scope::InTarget | Scope::DataOwner => return Ok(None),
            Scope::DataForeign { data_dir_id } => {
                let mut job = known.unwrap_or(JobState {
                    rule,
                    window_start_ns: monotonic_ns(),
                    ..JobState::default()
                });
                if job.state != JOB_ACTIVE {
                    // Already stopped for this: one event per state change.
                    job.refused += 1;
                    self.jobs.insert(key, job);
                    return Ok(None);
                }
                let mut ev = self.event(s, &who, EV_DATA_DIR, rule);
                ev.data_dir_id = data_dir_id;
                if rule_audit {
                    ev.flags |= EVF_AUDIT;
                    return Ok(Some(ev));
                }
                if self.never_held(who.pid).is_some() {
                    // Reported, not stopped (data_dir_id names the data directory here).
                    ev.flags |= EVF_NEVER_HOLD;
                    return Ok(Some(ev));
                }
                job.state = JOB_HELD;
                self.incidents += 1;
                job.incident = self.incidents;
                ev.incident = job.incident;
                if self.stop(&key, Signal::SIGSTOP) {
                    ev.flags |= EVF_SIGNALLED;
                }
                self.jobs.insert(key, job);
                return Ok(Some(ev));
            }
        }
        if params.action == ACTION_EXEMPT {
            return Ok(None);
        }

        // 4. Outside scope: count.
        let now = monotonic_ns();
        let mut job = known.unwrap_or(JobState {
            state: JOB_ACTIVE,
            rule,
            window_start_ns: now,
            ..JobState::default()
        });
        job.total += 1;
        if job.state != JOB_ACTIVE {
            let n = job.refused;
            job.refused += 1;
            self.jobs.insert(key, job);
            return Ok(match job.state {
                JOB_HELD => {
                    // Seen stopped, then deleting again: resumed without approval. Stop again.
                    self.stop(&key, Signal::SIGSTOP);
                    (n == 0 || n.is_power_of_two()).then(|| {
                        let mut ev = self.event(s, &who, EV_HELD_RETRY, rule);
                        ev.flags |= EVF_SIGNALLED;
                        ev.count = n + 1;
                        ev
                    })
                }
                _ => None,
            });
        }
        let mut elapsed = now.saturating_sub(job.window_start_ns);
        if params.window_ns != 0 && elapsed >= params.window_ns {
            job.prev_count = if elapsed >= 2 * params.window_ns {
                0
            } else {
                job.count
            };
            job.count = 0;
            job.window_start_ns = now;
            elapsed = 0;
        }
        job.count += 1;
        let n = job.count;
        if !over_budget(n, job.prev_count, elapsed, &params, job.allowance) {
            self.jobs.insert(key, job);
            return Ok(None);
        }

        // 5. Past the budget.
        let mut ev = self.event(s, &who, EV_BUDGET_CROSSED, rule);
        ev.count = n;
        // The unknown job has nobody to stop: it can only be reported (as the kernel's alert
        // action does), unless a guess names a job holding the directory.
        let mut target = key;
        if key == UNKNOWN_JOB && job.incident != 0 {
            // Reported (and the guessed job stopped) once already.
            self.jobs.insert(key, job);
            return Ok(None);
        }
        if key == UNKNOWN_JOB {
            let guess = s
                .dir
                .as_ref()
                .and_then(|d| d.chain.first().copied())
                .map(|d| self.suspects_of(d));
            match guess.as_deref() {
                Some([(k, pid)]) => {
                    target = *k;
                    ev.flags |= EVF_GUESSED;
                    ev.pgid = k.pgid;
                    ev.sid = k.sid;
                    ev.pid = *pid;
                    ev.tgid = *pid;
                }
                _ => {
                    // Several or no suspects: stopping a guess among many could stop the wrong
                    // job; report only, flagged like audit because nothing was stopped.
                    return Ok(self.report_once(key, job, ev, true));
                }
            }
        }
        if rule_audit || params.action == ACTION_ALERT {
            return Ok(self.report_once(key, job, ev, rule_audit));
        }
        // The job that would be stopped is a never_hold unit's: reported once, then free, as in
        // the kernel's tracepoint tier (this tier cannot refuse either).
        let stopped_pid = if target == key { who.pid } else { Some(ev.pid) };
        if let Some(unit) = self.never_held(stopped_pid) {
            ev.flags |= EVF_NEVER_HOLD;
            ev.data_dir_id = unit;
            if target == key {
                job.allowance = ALLOWANCE_UNLIMITED;
            }
            return Ok(self.report_once(key, job, ev, false));
        }
        let (state, sig) = if params.action == ACTION_BLOCK && target == key && !who.guessed {
            (JOB_BLOCKED, Signal::SIGKILL)
        } else {
            // A guessed job is only ever held: SIGSTOP can be undone, SIGKILL cannot.
            (JOB_HELD, Signal::SIGSTOP)
        };
        let stopped = self.stop(&target, sig);
        if stopped {
            ev.flags |= EVF_SIGNALLED;
        }
        self.incidents += 1;
        ev.incident = self.incidents;
        if target == key {
            job.state = state;
            job.incident = ev.incident;
            self.jobs.insert(key, job);
        } else {
            // The unknown job keeps counting; the guessed job is held under its own key.
            job.incident = ev.incident;
            self.jobs.insert(key, job);
            let mut held = self.jobs.get(&target).copied().unwrap_or(JobState {
                rule,
                window_start_ns: now,
                ..JobState::default()
            });
            held.state = JOB_HELD;
            held.incident = ev.incident;
            held.count = held.count.max(n);
            self.jobs.insert(target, held);
        }
        Ok(Some(ev))
    }

    /// The audit/alert path: one event per job until an approval clears its incident.
    pub(super) fn report_once(
        &mut self,
        key: JobKey,
        mut job: JobState,
        mut ev: Event,
        audit: bool,
    ) -> Option<Event> {
        let first = job.incident == 0;
        if first {
            self.incidents += 1;
            job.incident = self.incidents;
        }
        self.jobs.insert(key, job);
        first.then(|| {
            ev.incident = job.incident;
            if audit {
                ev.flags |= EVF_AUDIT;
            }
            ev
        })
    }

    /// The job of a deletion: the reporting process's group, else a dead process's last known
    /// group, else [`UNKNOWN_JOB`] (whose crossing stops a job guessed by the directory).
    pub(super) fn attribute(&mut self, s: &mut Seen) -> Result<Who, Deferred> {
        if let Some(pid) = s.pid
            && let Some(key) = self.job_of_pid(pid)
        {
            return Ok(Who {
                key,
                pid: Some(pid),
                guessed: false,
            });
        }
        // Exited before we read it and never seen: its nearest live ancestor's job, where that
        // is a job inside a session (see `job_of_ancestor`).
        if let Some(pid) = s.pid
            && let Some((key, ancestor)) = self.job_of_ancestor(pid)
        {
            return Ok(Who {
                key,
                pid: Some(ancestor),
                guessed: true,
            });
        }
        // No scan of /proc here (on a busy host that would be most of the watcher's time); the
        // unknown job's crossing guesses.
        Ok(Who {
            key: UNKNOWN_JOB,
            pid: None,
            guessed: true,
        })
    }

    /// The job of an exited process by who forked it: the nearest ancestor still alive, if its
    /// process group is a job inside a session. Not when that group is its session's own: a
    /// service's main process, sshd, a login shell (whose children are jobs of their own), a
    /// cron or ssh command's shell; holding a guess there could stop a whole service or the
    /// admin's own shell. A process on the way that called setsid() ends the walk.
    pub(super) fn job_of_ancestor(&mut self, pid: u32) -> Option<(JobKey, u32)> {
        let forks = self.forks.as_mut()?;
        forks.drain();
        let ancestors = forks.ancestors(pid);
        for a in ancestors {
            if a <= 1 || a == self.me {
                return None;
            }
            let Some((_, _, _, pgrp, session)) = proc_stat(a) else {
                // Exited too: try its parent.
                continue;
            };
            if pgrp == session || pgrp == self.my_pgid {
                return None;
            }
            let key = self.job_of_pid(a)?;
            return Some((key, a));
        }
        None
    }

    /// Incidents so far; the daemon takes ids from the same counter for incidents it makes.
    pub fn next_incident(&mut self) -> u64 {
        self.incidents += 1;
        self.incidents
    }

    /// Signals a job's process group; never our own group or the unknown job.
    /// The `deletion.never_hold` unit (its index in the policy) `pid` runs in: its cgroup or the
    /// nearest ancestor, by id, as the kernel's `NEVER_HOLD`. Such a job is never stopped, only
    /// reported.
    pub(super) fn never_held(&mut self, pid: Option<u32>) -> Option<u32> {
        let pid = pid?;
        if self.tables.never_hold.is_empty() {
            return None;
        }
        match self.details_of(pid) {
            Some((_, Some(d))) => d
                .cgroup_ancestors
                .iter()
                .find_map(|c| self.tables.never_hold.get(c).copied()),
            _ => None,
        }
    }

    pub(super) fn stop(&self, key: &JobKey, sig: Signal) -> bool {
        if key.pgid <= 1 || key.pgid == self.my_pgid || key.pgid == self.me {
            return false;
        }
        killpg(Pid::from_raw(key.pgid as i32), sig).is_ok()
    }

    pub(super) fn event(&mut self, s: &Seen, who: &Who, kind: u32, rule: u32) -> Event {
        let key = &who.key;
        let (comm, details) = who
            .pid
            .and_then(|pid| self.details_of(pid))
            .unwrap_or(([0; 16], None));
        let p = details.as_ref();
        let mut ev = Event::zeroed();
        ev.kind = kind;
        ev.flags = EVF_USERSPACE;
        if s.pid.is_none() || who.guessed {
            ev.flags |= EVF_GUESSED;
        }
        ev.rule = rule;
        ev.tgid = s.pid.unwrap_or(0);
        ev.pid = s.pid.unwrap_or(0);
        ev.pgid = key.pgid;
        ev.sid = key.sid;
        ev.uid = p.map(|p| p.uid).unwrap_or(u32::MAX);
        ev.loginuid = p.map(|p| p.loginuid).unwrap_or(u32::MAX);
        ev.audit_session = p.map(|p| p.sessionid).unwrap_or(u32::MAX);
        ev.op = s.op;
        ev.cgroup_id = p.and_then(|p| p.cgroup_id).unwrap_or(0);
        ev.ktime_ns = monotonic_ns();
        ev.comm = comm;
        let mut names: Vec<&[u8]> = Vec::new();
        if let Some(n) = &s.name {
            names.push(n);
        }
        if let Some(path) = s.dir.as_ref().and_then(|d| d.path.as_ref()) {
            let comps: Vec<&[u8]> = path
                .components()
                .rev()
                .filter_map(|c| match c {
                    std::path::Component::Normal(n) => Some(n.as_bytes()),
                    _ => None,
                })
                .collect();
            names.extend(comps);
        }
        for (slot, n) in ev
            .path
            .iter_mut()
            .zip(names.into_iter().take(EVENT_PATH_DEPTH))
        {
            let len = n.len().min(NAME_LEN - 1);
            slot[..len].copy_from_slice(&n[..len]);
        }
        ev
    }
}
