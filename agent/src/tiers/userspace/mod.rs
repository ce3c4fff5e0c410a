//! The `userspace` tier: the last resort where no BPF program can run.
//!
//! Nothing here can refuse or delay a deletion. fanotify (or inotify) tells us about each deletion
//! *after* it happened; we count per job exactly like the kernel's `judge` (same tables, same
//! [`scope_step`] and [`over_budget`]) and stop the job from userspace (`killpg`) when it crosses
//! its budget. The deletions the job makes between the crossing and the moment the signal lands
//! (our read latency plus scheduling) are the blast radius.
//!
//! **Promise: at most [`PROMISED_OVERSHOOT`] files past the budget** for one runaway job deleting
//! as fast as it can, whatever its number of processes. Measured in release builds on this
//! project's busy shared 2-core host, 10,000 files, budget 100, repeated runs: `rm -rf` 1-183,
//! `find -delete` 1-30 (once 3635, before /proc scans left the hot path), 8 forked workers
//! 28-2086 (most runs under 250, the worst with the host under load); the previous implementation (debug build) went
//! 2,902 (`rm -rf`) and 3,317 (`find -delete`) past and never stopped the 8 workers. The promise
//! keeps a margin over the worst run seen. It holds while the agent gets a CPU: a host so loaded
//! that the watcher thread is not scheduled for tens of milliseconds
//! goes further. [`measure_blast_radius`] (`guardrail selftest --tier userspace`) measures the
//! host at hand.
//!
//! Why it is fast enough: per record the job is found first (pid → job, one read of
//! /proc/PID/stat per pid, in a small LRU; the rule once per job), and only a job whose verdict
//! can change has its directory resolved: a held job's queued overshoot, an exempt job (without
//! data directories) and names that are no protected root's need none. A directory handle is
//! resolved once (`open_by_handle_at`, `readlink`, then `..` walked from the open directory with
//! `fstat`, chains memoised per directory and checked by file handle, see [`AncestorMemo`]) and
//! cached with its per-rule scope verdict until a policy is installed or a directory is renamed.
//! Records are read 256 KiB at a time and each read judged at once. The reading thread runs at
//! nice [`NICE`].
//!
//! Differences from the kernel tiers, all of them stated in `Tier::Userspace` gaps:
//! - fanotify reports the deleting *process* (tgid), which we turn into a job by reading
//!   `/proc/PID/stat`. A process that exited before we read its events and that we never saw (a
//!   shell loop running one `rm` per file) counts for the "unknown job"
//!   (`JobKey { sid: 0, pgid: 0 }`, the default rule), which is never signalled itself; at its
//!   crossing, the one live job holding the directory open (or as cwd) is held as a guess.
//! - inotify reports no process at all: every deletion counts for the unknown job under the
//!   default rule; at its crossing, the jobs holding the directory open (or as cwd) are stopped as
//!   a guess (`EVF_GUESSED`).
//! - The sliding window is timed when we read an event, not when the kernel saw it.
//! - Scope is walked over the parent directory's ancestors (`..` from the reopened directory),
//!   stopping at the filesystem's root like the kernel's `d_parent` walk; a parent directory
//!   already deleted when we read its events (and never seen before) has no known ancestors, so
//!   its deletions count against the budget (as the tracepoint tier does for absolute paths).
//! - Deletions a held job made before the stop landed (still queued) are not judged by scope.
mod blast;
mod dirs;
mod fanotify;
pub mod forklog;
mod inotify;
mod judge;
mod procs;

use crate::tiers::userspace::forklog::ForkLog;
use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
    rc::Rc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use guardrail_common::{
    DIR_DATA, DIR_PROTECTED_ROOT, DirRule, Event, JOB_ACTIVE, JOB_HELD, JobKey, JobState,
    MAX_RULES, RuleParams, kernel_dev_from_user,
};

use crate::tiers::sensor::KernelPolicy;
pub use blast::measure_blast_radius;
use dirs::{AncestorMemo, DirEntry, DirInfo, kid};
use fanotify::{Fid, mark_filesystem, parse_fanotify};
use guardrail_policy::cgroup2_root;
use procs::{ProcCache, group_stopped, mountinfo};

/// Which notification API to watch with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    Fanotify,
    Inotify,
}

/// Files past the budget this tier promises at most, for one runaway job (any number of
/// processes) deleting as fast as it can: measured in release builds on a busy 2-core host
/// (`rm -rf`, `find -delete`, 8 forked workers over 10,000 files, budget 100; see README), with
/// margin. `guardrail selftest --tier userspace` measures it on the host at hand.
pub const PROMISED_OVERSHOOT: u64 = 5000;

/// The nice value of the thread that reads the events (where it may lower it: root).
pub const NICE: i32 = -10;

fn raise_priority() {
    // SAFETY: plain syscalls; `who` 0 is the calling thread on Linux.
    unsafe {
        if libc::getpriority(libc::PRIO_PROCESS, 0) > NICE {
            libc::setpriority(libc::PRIO_PROCESS, 0, NICE);
        }
    }
}

/// The job every deletion whose process is unknown counts for. Never signalled: `killpg(0)`
/// would stop the agent's own group.
pub const UNKNOWN_JOB: JobKey = JobKey { sid: 0, pgid: 0 };

/// How long what /proc said about a pid is trusted (pids are recycled, jobs change groups rarely).
const PROC_TTL: Duration = Duration::from_secs(2);
/// How long a directory's list of suspect jobs (cwd or open fd on it) is reused.
const SUSPECT_TTL: Duration = Duration::from_millis(200);
/// Reads per `process` call: a filesystem-wide mark also sees unrelated busy jobs (builds); the
/// caller polls again, so one call never starves the daemon's other work.
const MAX_READS_PER_CALL: usize = 16;
/// One read takes up to this much: thousands of records per syscall.
const READ_BUF: usize = 256 * 1024;
/// How often held jobs are checked for having stopped (a scan of /proc).
const STOP_CHECK_EVERY: Duration = Duration::from_millis(50);

// --- fanotify records (pure parsing, unit-tested) --------------------------------------------

// --- what we know about directories and processes --------------------------------------------

// --- the watcher -----------------------------------------------------------------------------

struct Marked {
    path: PathBuf,
    fsid: [i32; 2],
    /// Any fd on the filesystem: `open_by_handle_at` needs one.
    mount_fd: OwnedFd,
}

enum Mechanism {
    Fanotify {
        fd: OwnedFd,
        marked: Vec<Marked>,
        marked_devs: HashSet<u64>,
    },
    Inotify {
        inotify: ::inotify::Inotify,
        /// Watch → directory.
        dirs: HashMap<::inotify::WatchDescriptor, Rc<DirInfo>>,
    },
}

/// Policy tables as the kernel would hold them, keyed for lookups.
#[derive(Default)]
struct Tables {
    mode: u32,
    dirs: HashMap<(u64, u64), DirRule>,
    rules: Vec<RuleParams>,
    exes: HashMap<(u64, u64), u32>,
    cgroups: HashMap<u64, u32>,
    uids: HashMap<u32, u32>,
    /// The kernel's `NEVER_HOLD`: cgroup id of a never_hold unit → its index in the policy.
    never_hold: HashMap<u64, u32>,
    /// Protected roots by (parent identity) → names: the entry is gone when we hear of it, its
    /// parent usually is not.
    protected: HashMap<(u64, u64), HashSet<OsString>>,
    /// Every protected root's name: a deletion by another name is never a protected root, so
    /// its directory need not be resolved for that check.
    protected_names: HashSet<OsString>,
    /// Data directories refuse even exempt jobs: without any, an exempt job's deletions need no
    /// directory at all.
    has_data_dirs: bool,
    /// Protected roots whose path we could not find (their deletion goes unnoticed).
    unlocated: usize,
}

type Suspects = (Instant, Vec<(JobKey, u32)>);

/// Whom a deletion is counted for.
struct Who {
    key: JobKey,
    /// The process whose /proc entry describes the job (rule, reports).
    pid: Option<u32>,
    /// Not the reporting process's own job (a guess by the directory), or no process at all.
    guessed: bool,
}

/// Per-job state beyond the kernel's `JobState`.
#[derive(Default, Clone, Copy)]
struct JobExtra {
    /// Every member was seen stopped after the hold: further deletions are real retries, not
    /// the overshoot still in the queue.
    confirmed_stopped: bool,
}

pub struct Fallback {
    mech: Mechanism,
    tables: Tables,
    watch_roots: Vec<PathBuf>,
    jobs: HashMap<JobKey, JobState>,
    extra: HashMap<JobKey, JobExtra>,
    procs: ProcCache,
    /// Directory handle → where it is and what each rule's scope says there.
    dir_cache: HashMap<Fid, DirEntry>,
    /// Directory identity → its ancestors, checked by file handle.
    ancestors: AncestorMemo,
    /// Bumped by every policy install: rules cached per pid are recomputed.
    policy_gen: u64,
    buf: Vec<u8>,
    last_stop_check: Option<Instant>,

    /// Directory → (when, jobs holding it with one of their pids).
    suspects: HashMap<(u64, u64), Suspects>,
    cgroot: PathBuf,
    me: u32,
    my_pgid: u32,
    incidents: u64,
    lost: u64,
    /// Only this process group is judged (blast-radius measurement on a live host).
    only_pgid: Option<u32>,
    /// Deleted directory's handle → its parent's handle (from the deleting event's own FID).
    parent_of: HashMap<Fid, Fid>,
    pending: Vec<Seen>,
    /// Who forked whom (fanotify only, where the connector is allowed): names the job of a
    /// process that exited before its deletions were read. See [`crate::tiers::userspace::forklog`].
    forks: Option<ForkLog>,
    /// When a read last found the queue empty: everything deleted before then has been read.
    drained_at: Option<Instant>,
}

/// What one deletion looked like when we read it.
struct Seen {
    pid: Option<u32>,
    op: u32,
    is_dir: bool,
    name: Option<Vec<u8>>,
    /// The directory, once resolved (inotify knows it from the watch).
    dir: Option<Rc<DirInfo>>,
    /// fanotify: the directory's handle, resolved only when the verdict needs it.
    fid: Option<Fid>,
    /// When it was read: a directory not resolvable yet waits at most [`PENDING_MAX`].
    since: Instant,
    /// A rename's source: judged only as a protected root or a directory leaving (the
    /// destination's `MOVED_TO` counts for a rename over a file).
    moved_from: bool,
}

/// A record whose directory could not be reopened yet (deleted before we read it) waits in
/// `pending` for the event that deletes that directory to name its parent.
struct Deferred;

/// How long a record waits for its directory's own deletion event before it is judged with no
/// ancestors (against the budget).
const PENDING_MAX: Duration = Duration::from_millis(500);
/// How long it waits whatever the queue does.
const PENDING_HARD_MAX: Duration = Duration::from_secs(10);

impl Fallback {
    /// Watches the filesystems that hold the policy's paths (and the paths given) with fanotify
    /// (FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO with FAN_REPORT_DFID_NAME, FAN_MARK_FILESYSTEM;
    /// Linux >= 5.9, root) — it reports the deleting process's pid; with inotify (where fanotify
    /// is unavailable, or asked for): one watch per directory under `watch_roots` only, no
    /// process (see [`UNKNOWN_JOB`]).
    ///
    /// The calling thread reads the events: it is given a higher scheduling priority
    /// ([`NICE`]), because how soon it runs after a deletion is most of the blast radius.
    pub fn new(policy: &KernelPolicy, watch_roots: &[PathBuf], watch: Watch) -> Result<Self> {
        let mech = match watch {
            Watch::Inotify => Self::new_inotify()?,
            Watch::Fanotify => Self::new_fanotify()?,
        };
        raise_priority();
        // SAFETY: getpgid has no memory-safety preconditions.
        let my_pgid = unsafe { libc::getpgid(0) } as u32;
        // Subscribed before the first deletion is read, so every later fork is known. inotify
        // names no process: nothing to name a parent of.
        let forks = match watch {
            Watch::Fanotify => ForkLog::open().ok(),
            Watch::Inotify => None,
        };
        let mut f = Fallback {
            drained_at: None,
            forks,
            mech,
            tables: Tables::default(),
            watch_roots: watch_roots.to_vec(),
            jobs: HashMap::new(),
            extra: HashMap::new(),
            procs: ProcCache::new(),
            dir_cache: HashMap::new(),
            ancestors: AncestorMemo::default(),
            policy_gen: 0,
            buf: vec![0u8; READ_BUF],
            last_stop_check: None,

            suspects: HashMap::new(),
            cgroot: cgroup2_root(),
            me: std::process::id(),
            my_pgid,
            incidents: 0,
            lost: 0,
            only_pgid: None,
            parent_of: HashMap::new(),
            pending: Vec::new(),
        };
        f.install_policy(policy)?;
        if let Mechanism::Inotify { .. } = f.mech {
            for r in watch_roots {
                f.inotify_add_tree(r)?;
            }
        }
        Ok(f)
    }

    /// Swaps in new tables; job counters survive (as in the kernel). Marks filesystems the new
    /// policy needs that are not marked yet.
    pub fn install_policy(&mut self, policy: &KernelPolicy) -> Result<()> {
        if policy.rules.len() > MAX_RULES as usize {
            bail!(
                "the policy has {} rules; the tables hold {MAX_RULES}",
                policy.rules.len()
            );
        }
        let mut t = Tables {
            mode: policy.mode,
            dirs: policy.dirs.iter().copied().collect(),
            rules: policy.rules.clone(),
            exes: policy.exes.iter().copied().collect(),
            cgroups: policy.cgroups.iter().copied().collect(),
            uids: policy.uids.iter().copied().collect(),
            never_hold: policy.never_hold.iter().copied().collect(),
            ..Tables::default()
        };
        let mounts = mountinfo();
        // Protected roots are declared by identity; find their paths among the likely places
        // (mount points, top-level directories, the watched roots and their children).
        let want: HashSet<(u64, u64)> = t
            .dirs
            .iter()
            .filter(|(_, r)| r.kind & DIR_PROTECTED_ROOT != 0)
            .map(|(k, _)| *k)
            .collect();
        let mut candidates: Vec<PathBuf> = mounts.iter().map(|m| m.mount_point.clone()).collect();
        for base in std::iter::once(PathBuf::from("/")).chain(self.watch_roots.iter().cloned()) {
            candidates.push(base.clone());
            if let Ok(rd) = std::fs::read_dir(&base) {
                candidates.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        }
        let mut found = HashSet::new();
        for p in candidates {
            let (Ok(m), Some(parent), Some(name)) =
                (std::fs::symlink_metadata(&p), p.parent(), p.file_name())
            else {
                continue;
            };
            if !want.contains(&kid(&m)) {
                continue;
            }
            found.insert(kid(&m));
            if let Ok(pm) = std::fs::metadata(parent) {
                t.protected
                    .entry(kid(&pm))
                    .or_default()
                    .insert(name.to_os_string());
            }
        }
        // "/" has no parent: it cannot be deleted, only its contents.
        let root = std::fs::metadata("/").map(|m| kid(&m)).ok();
        t.unlocated = want
            .iter()
            .filter(|k| !found.contains(k) && Some(**k) != root)
            .count();
        if let Mechanism::Fanotify {
            fd,
            marked,
            marked_devs,
        } = &mut self.mech
        {
            let mut need: Vec<(u64, PathBuf)> = Vec::new();
            for (kdev, _) in t.dirs.keys() {
                if let Some(m) = mounts
                    .iter()
                    .filter(|m| kernel_dev_from_user(m.dev) == *kdev)
                    .min_by_key(|m| m.mount_point.as_os_str().len())
                {
                    need.push((*kdev, m.mount_point.clone()));
                }
            }
            for r in &self.watch_roots {
                let m = std::fs::metadata(r).with_context(|| format!("stat {}", r.display()))?;
                need.push((kernel_dev_from_user(m.dev()), r.clone()));
            }
            for (kdev, path) in need {
                if marked_devs.contains(&kdev) {
                    continue;
                }
                match mark_filesystem(fd.as_fd(), &path) {
                    Ok(m) => {
                        marked.push(m);
                        marked_devs.insert(kdev);
                    }
                    // Pseudo filesystems (proc, sysfs) have no file handles: nothing to delete.
                    Err(e) => {
                        log::warn!("not watching the filesystem of {}: {e:#}", path.display())
                    }
                }
            }
            if marked.is_empty() {
                bail!("fanotify could mark no filesystem holding the policy's paths");
            }
        }
        t.protected_names = t.protected.values().flatten().cloned().collect();
        t.has_data_dirs = t.dirs.values().any(|r| r.kind & DIR_DATA != 0);
        self.tables = t;
        // Scope verdicts and job rules were the old policy's.
        self.policy_gen += 1;
        for e in self.dir_cache.values_mut() {
            e.verdicts.clear();
        }
        Ok(())
    }

    /// What is watched, for the agent's "attached" line and status.
    pub fn watching(&self) -> Vec<String> {
        match &self.mech {
            Mechanism::Fanotify { marked, .. } => marked
                .iter()
                .map(|m| format!("fanotify on the filesystem of {}", m.path.display()))
                .collect(),
            Mechanism::Inotify { dirs, .. } => vec![format!(
                "inotify on {} directories below {}",
                dirs.len(),
                self.watch_roots
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
        }
    }

    /// Whether the job of a process that exited before its deletions were read is found by who
    /// forked it (the process events connector is ours).
    pub fn names_exited_processes(&self) -> bool {
        self.forks.is_some()
    }

    /// Forks lost to a full connector socket (their workers' deletions may go to the unknown
    /// job).
    pub fn forks_lost(&self) -> u64 {
        self.forks.as_ref().map_or(0, ForkLog::lost)
    }

    /// "fanotify" or "inotify".
    pub fn mechanism(&self) -> &'static str {
        match self.mech {
            Mechanism::Fanotify { .. } => "fanotify",
            Mechanism::Inotify { .. } => "inotify",
        }
    }

    /// Poll it for readiness, then call [`Fallback::process`].
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.mech {
            Mechanism::Fanotify { fd, .. } => fd.as_fd(),
            Mechanism::Inotify { inotify, .. } => inotify.as_fd(),
        }
    }

    /// Protected roots of the policy whose deletion this tier cannot notice (no path found).
    pub fn unlocated_protected_roots(&self) -> usize {
        self.tables.unlocated
    }

    /// Events the kernel dropped (queue overflow): deletions we never counted.
    pub fn lost_events(&self) -> u64 {
        self.lost
    }

    pub fn job(&self, key: &JobKey) -> Option<JobState> {
        self.jobs.get(key).copied()
    }

    pub fn set_job(&mut self, key: &JobKey, state: &JobState) {
        if state.state == JOB_ACTIVE {
            // Approved: later deletions are new work, not overshoot.
            self.extra.remove(key);
        }
        self.jobs.insert(*key, *state);
    }

    pub fn jobs(&self) -> Vec<(JobKey, JobState)> {
        self.jobs.iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub fn remove_job(&mut self, key: &JobKey) {
        self.jobs.remove(key);
        self.extra.remove(key);
    }

    /// Reads pending filesystem events, counts per job like the kernel's `judge`, stops jobs at
    /// their crossing, and returns one event per state change (never one per file).
    ///
    /// Per record, the job is found first (a pid cache), then only what can change its verdict
    /// is looked at: the directory handle is resolved (once per handle, cached with its ancestor
    /// chain and per-rule scope verdict) only for a job that is counting, or for a name that is
    /// a protected root's.
    pub fn process(&mut self) -> Vec<Event> {
        // Empty the connector's socket at every call, needed or not: the daemon calls this at
        // least twice a second, and a socket left full drops forks. (`job_of_ancestor` drains
        // again for forks that came in since.)
        if let Some(f) = self.forks.as_mut() {
            f.drain();
        }
        // Held jobs seen fully stopped: from now on their deletions are retries.
        if self
            .last_stop_check
            .is_none_or(|t| t.elapsed() >= STOP_CHECK_EVERY)
        {
            self.last_stop_check = Some(Instant::now());
            let held: Vec<JobKey> = self
                .jobs
                .iter()
                .filter(|(k, j)| j.state == JOB_HELD && **k != UNKNOWN_JOB)
                .map(|(k, _)| *k)
                .filter(|k| !self.extra.get(k).is_some_and(|e| e.confirmed_stopped))
                .collect();
            for k in held {
                if group_stopped(k.pgid) {
                    self.extra.entry(k).or_default().confirmed_stopped = true;
                }
            }
        }
        let mut out = Vec::new();
        let fan = match &self.mech {
            Mechanism::Fanotify { fd, .. } => Some(fd.as_raw_fd()),
            Mechanism::Inotify { .. } => None,
        };
        match fan {
            Some(raw) => {
                let mut buf = std::mem::take(&mut self.buf);
                // Judge each read as it comes: the sooner a crossing is seen, the sooner the
                // stop lands (every event read before judging is latency).
                for i in 0..MAX_READS_PER_CALL {
                    // SAFETY: reads into our own buffer of the given length.
                    let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
                    if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
                    {
                        self.drained_at = Some(Instant::now());
                    }
                    let records = if n > 0 {
                        parse_fanotify(&buf[..n as usize])
                    } else {
                        Vec::new()
                    };
                    self.link_parents(&records);
                    if i == 0 {
                        // Older records waiting for their directory: this read may name it.
                        for s in std::mem::take(&mut self.pending) {
                            self.judge_or_defer(s, &mut out);
                        }
                    }
                    if records.is_empty() {
                        break;
                    }
                    for r in records {
                        if let Some(s) = self.seen_of(r) {
                            self.judge_or_defer(s, &mut out);
                        }
                    }
                }
                self.buf = buf;
            }
            None => {
                for s in self.read_inotify() {
                    self.judge_or_defer(s, &mut out);
                }
            }
        }
        out
    }

    fn judge_or_defer(&mut self, mut s: Seen, out: &mut Vec<Event>) {
        match self.judge(&mut s) {
            Ok(ev) => out.extend(ev),
            Err(Deferred) => self.pending.push(s),
        }
    }
}

// --- measuring the blast radius --------------------------------------------------------------
