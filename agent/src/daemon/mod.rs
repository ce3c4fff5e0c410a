//! `guardrail agent`: loads the policy, probes the kernel, attaches the tier's programs (or, where
//! no BPF can run, starts the userspace watcher), and then waits on four things: enforcement
//! events (state changes only), admin requests on the socket, signals, and a tick for hold
//! timeouts.
pub mod lifecycle;

use std::{
    collections::BTreeMap,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::{fs::PermissionsExt, net::UnixListener},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, RingBuf};
use guardrail_common::{
    ALLOWANCE_UNLIMITED, EV_BUDGET_CROSSED, EV_DATA_DIR, EV_HELD_RETRY, EV_PROTECTED_ROOT,
    EVF_AUDIT, EVF_SIGNALLED, EVF_TRACEPOINT, EVF_USERSPACE, Event, JOB_ACTIVE, JOB_BLOCKED,
    JOB_DENIED, JOB_HELD, JobKey, JobState,
};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::signal::Signal,
};

use crate::{
    control::{
        ipc::{HoldInfo, Request, Response, StatusInfo},
        server as control,
    },
    host::procinfo,
    incident::{self, Incident},
    policy::{LoadedPolicy, PolicySource},
    text,
    tiers::{
        btf,
        probe::{self, Tier},
        sensor::{KernelPolicy, Sensor},
        userspace::{self, Fallback},
    },
};

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Policy file (default: /etc/guardrail/policy.toml if it exists, else the embedded default).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Drop-in directory merged after the policy file, in name order.
    #[arg(long)]
    pub policy_dir: Option<PathBuf>,
    /// Admin socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Force a tier instead of probing (for tests of the weaker tiers on a stronger kernel).
    /// `userspace` is the last resort the probe picks when no BPF program can run.
    #[arg(long, value_parser = ["auto", "lsm", "fmodret", "tracepoint", "userspace"], default_value = "auto")]
    pub tier: String,
    /// JSON lines event log (default from the policy's [alerts.event_log]).
    #[arg(long)]
    pub event_log: Option<PathBuf>,
    /// bpffs directory where programs and job state are pinned, so that enforcement goes on
    /// while the agent is down (crash, restart, upgrade) and the next agent adopts it.
    #[arg(long, default_value = "/sys/fs/bpf/guardrail")]
    pub pin_dir: PathBuf,
    /// On SIGTERM, leave the programs pinned and enforcing, and held jobs held for the next agent
    /// (default: detach, unless systemd is restarting this unit, and resolve every open hold by
    /// `deletion.on_agent_stop`).
    #[arg(long)]
    pub keep_enforcing_when_stopped: bool,
    /// Where the agent keeps its state: the last policy that loaded (`last-good.json`), which a
    /// start whose policy has errors runs on.
    #[arg(long, default_value = crate::policy::lastgood::STATE_DIR)]
    pub state_dir: PathBuf,
}

struct Hold {
    incident: Incident,
    key: JobKey,
    since: Instant,
    timeout: Duration,
}

/// What enforces: the kernel programs (with their event ring), or the userspace watcher. The
/// policy, jobs, holds, approve/deny/timeout, summaries and events work the same over either.
enum Backend {
    Bpf {
        sensor: Box<Sensor>,
        ring: RingBuf<MapData>,
    },
    Userspace(Box<Fallback>),
}

impl Backend {
    fn install_policy(&mut self, p: &KernelPolicy) -> Result<()> {
        match self {
            Backend::Bpf { sensor, .. } => sensor.install_policy(p),
            Backend::Userspace(f) => f.install_policy(p),
        }
    }

    fn job(&mut self, key: &JobKey) -> Result<Option<JobState>> {
        match self {
            Backend::Bpf { sensor, .. } => sensor.job(key),
            Backend::Userspace(f) => Ok(f.job(key)),
        }
    }

    fn set_job(&mut self, key: &JobKey, state: &JobState) -> Result<()> {
        match self {
            Backend::Bpf { sensor, .. } => sensor.set_job(key, state),
            Backend::Userspace(f) => {
                f.set_job(key, state);
                Ok(())
            }
        }
    }

    fn jobs(&mut self) -> Result<Vec<(JobKey, JobState)>> {
        match self {
            Backend::Bpf { sensor, .. } => sensor.jobs(),
            Backend::Userspace(f) => Ok(f.jobs()),
        }
    }

    fn remove_job(&mut self, key: &JobKey) -> Result<()> {
        match self {
            Backend::Bpf { sensor, .. } => sensor.remove_job(key),
            Backend::Userspace(f) => {
                f.remove_job(key);
                Ok(())
            }
        }
    }

    /// Programs attached, or what the watcher watches.
    fn attached(&self) -> Vec<String> {
        match self {
            Backend::Bpf { sensor, .. } => {
                sensor.attached().iter().map(|s| s.to_string()).collect()
            }
            Backend::Userspace(f) => f.watching(),
        }
    }

    /// A fresh incident id from the counter the enforcement side numbers incidents with.
    fn next_incident(&mut self) -> u64 {
        match self {
            Backend::Bpf { sensor, .. } => {
                let mut id = 0;
                if let Some(m) = sensor.ebpf_mut().map_mut("INCIDENTS")
                    && let Ok(mut a) = aya::maps::Array::<_, u64>::try_from(m)
                {
                    id = a.get(&0, 0).unwrap_or(0) + 1;
                    let _ = a.set(0, id, 0);
                }
                id
            }
            Backend::Userspace(f) => f.next_incident(),
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Backend::Bpf { ring, .. } => ring.as_fd(),
            Backend::Userspace(f) => f.as_fd(),
        }
    }

    /// Events ready now (state changes only).
    /// Deletion events, and the shutdown guard's records (same ring buffer, told apart by kind).
    fn drain(&mut self) -> (Vec<Event>, Vec<guardrail_common::ShutdownEvent>) {
        use crate::incident::decode::KernelEvent;
        match self {
            Backend::Bpf { ring, .. } => {
                let mut out = Vec::new();
                let mut shutdowns = Vec::new();
                while let Some(item) = ring.next() {
                    match crate::incident::decode::decode(&item) {
                        Some(KernelEvent::Shutdown(ev)) => shutdowns.push(ev),
                        Some(KernelEvent::Deletion(ev)) => out.push(ev),
                        // Not a whole record of a known layout: nothing to act on.
                        None => {}
                    }
                }
                (out, shutdowns)
            }
            Backend::Userspace(f) => (f.process(), Vec::new()),
        }
    }
}

/// The userspace tier's watcher: fanotify marks on the filesystem of `/` and on every filesystem
/// holding a path the policy declares (`Fallback::install_policy` adds those). Where fanotify is
/// unavailable, inotify over the policy's data directories and protected roots other than `/`
/// (inotify watches are per directory: a whole filesystem is out of reach).
fn start_userspace(policy: &LoadedPolicy) -> Result<Fallback> {
    match Fallback::new(
        &policy.kernel,
        &[PathBuf::from("/")],
        userspace::Watch::Fanotify,
    ) {
        Ok(f) => Ok(f),
        Err(e) => {
            let d = &policy.policy.deletion;
            let roots: Vec<PathBuf> = policy
                .compiled
                .data_dirs
                .iter()
                .chain(d.protected_roots.iter())
                .filter(|p| p.as_os_str() != "/" && p.is_dir())
                .cloned()
                .collect();
            if roots.is_empty() {
                return Err(e.context(
                    "fanotify is unavailable and the policy declares no directory inotify could watch",
                ));
            }
            eprintln!(
                "guardrail: fanotify unavailable ({e:#}); inotify on the declared directories only"
            );
            Fallback::new(&policy.kernel, &roots, userspace::Watch::Inotify)
        }
    }
}

struct Agent {
    host: String,
    tier: Tier,
    why: String,
    backend: Backend,
    policy: LoadedPolicy,
    source: PolicySource,
    last_reload_error: Option<String>,
    holds: BTreeMap<u64, Hold>,
    sink: incident::Sink,
    /// Deletions the watcher's queue dropped, as last reported.
    lost_reported: u64,
    forks_lost_reported: u64,
    shutdown: crate::guards::shutdown::Guard,
    /// Kernel bookkeeping the agent keeps in step with (adoption of unrecorded holds, map fill).
    kernel_jobs: KernelJobs,
    state_dir: PathBuf,
    /// Why the policy in force is not the one on disk (broken at start: the last good one or the
    /// embedded default runs instead); cleared when the policy on disk loads.
    policy_fallback: Option<String>,
    /// Approvals per job, shown with the job's next hold (`approve --more N` that ran out).
    approvals: crate::guards::deletion::approval::History,
}

/// What the daemon remembers about the kernel's job maps between ticks.
#[derive(Default)]
struct KernelJobs {
    /// Incidents of blocked jobs already reported (their crossing event, or found by a tick).
    blocked_reported: std::collections::BTreeSet<u64>,
    /// When the maps' fill was last measured (every 5 s: counting is one syscall per entry; the
    /// first tick after the agent was stalled measures at once, before ended jobs are removed).
    fill_checked: Option<Instant>,
    /// Whether `JOBS` / `HELD` were last reported 80 % full (reported again once below 50 %).
    jobs_full: bool,
    held_full: bool,
}

pub fn run(args: AgentArgs) -> Result<()> {
    // main() blocked the stop signals first thing; a caller that did not gets them blocked now.
    if crate::daemon::lifecycle::signals().is_none() {
        crate::daemon::lifecycle::block_signals().context("blocking SIGINT, SIGTERM and SIGHUP")?;
    }
    let mut agent = match start(&args) {
        Ok(agent) => agent,
        Err(e) => {
            if let Some(sig) = crate::daemon::lifecycle::interrupted(&e) {
                stopped_during_startup(&args, sig);
                return Ok(());
            }
            return Err(e);
        }
    };
    let socket = crate::control::ipc::socket_path(args.socket.as_deref());
    let result = agent.serve(&socket);
    let _ = std::fs::remove_file(&socket);
    let keep = args.keep_enforcing_when_stopped || systemd_restart_pending();
    match &mut agent.backend {
        Backend::Bpf { sensor, .. } if keep => {
            // From now on no agent writes refusal messages: the pinned shutdown programs refuse
            // without stopping the caller to wait for one.
            agent.shutdown.set_alive_until(sensor, 0);
            // Nor is any process the agent: a process that gets this pid is judged like any
            // other.
            if let Err(e) = sensor.forget_agent() {
                eprintln!("guardrail: could not clear the agent's identity: {e:#}");
            }
            let held = if agent.holds.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} held job(s) stay held for the next agent (`guardrail status` lists them meanwhile)",
                    agent.holds.len()
                )
            };
            agent.sink.agent_event(
                "agent_stopped",
                &format!("guardrail agent stopped; programs stay pinned and enforcing until the next agent adopts them{held}"),
            );
            println!(
                "guardrail: stopped; programs stay pinned in {} and keep enforcing",
                args.pin_dir.display()
            );
        }
        _ => {
            // A deliberate stop: nothing will answer these holds any more, so each is resolved
            // now, by the policy's choice, while the programs still see the job's new state.
            let resolved = agent.release_holds_on_stop();
            if let Backend::Bpf { sensor, .. } = &mut agent.backend {
                sensor.unpin_everything();
            }
            // Dropping the backend detaches every program (the watcher: its marks).
            agent.sink.agent_event(
                "agent_stopped",
                &format!("guardrail agent stopped; programs detached{resolved}"),
            );
            println!("guardrail: stopped; all programs detached");
        }
    }
    result
}

/// The `Instant` a hold began, from the kernel's `CLOCK_BOOTTIME` stamp (0: now).
/// A crossing the kernel made as a hold (tracepoint tier, no `EVF_BLOCKED`) for a job now found
/// blocked: between the crossing and the agent's reading of it, the job resumed itself
/// `SELF_RESUME_LIMIT` times and the kernel killed it (its kill event follows).
fn resumed_before_read(ev: &Event) -> bool {
    ev.flags & guardrail_common::EVF_TRACEPOINT != 0
        && ev.flags & guardrail_common::EVF_BLOCKED == 0
}

fn held_since(held_ns: u64) -> Instant {
    let now = crate::host::clock::boottime_ns();
    if held_ns == 0 || held_ns > now {
        return Instant::now();
    }
    Instant::now()
        .checked_sub(Duration::from_nanos(now - held_ns))
        .unwrap_or_else(Instant::now)
}

/// A stop asked for during start-up: what was attached so far is detached (the sensor dropped on
/// the way out took its unpinned links along), or kept pinned exactly when a running agent's
/// stop would keep it (a systemd restart, `--keep-enforcing-when-stopped`).
fn stopped_during_startup(args: &AgentArgs, sig: Signal) {
    if args.keep_enforcing_when_stopped || systemd_restart_pending() {
        println!(
            "guardrail: {sig} received during start-up; stopped, whatever is pinned in {} stays",
            args.pin_dir.display()
        );
    } else {
        // Holds a previous agent left pinned (this one may have adopted them already) are
        // resolved as a running agent's stop resolves its own: never left stopped with no pins
        // to find them by.
        let source = PolicySource::from_args(args.policy.as_deref(), args.policy_dir.as_deref());
        let end = source
            .load()
            .map_or(guardrail_policy::OnAgentStop::default(), |p| {
                p.policy.deletion.on_agent_stop
            })
            == guardrail_policy::OnAgentStop::End;
        if end {
            for h in crate::control::offline::pinned_holds(&args.pin_dir).unwrap_or_default() {
                procinfo::signal_job(h.pgid, Signal::SIGKILL);
                println!(
                    "guardrail: held job {} (incident {}) ended as the agent stops (deletion.on_agent_stop = \"end\")",
                    h.pgid, h.incident
                );
            }
            crate::tiers::sensor::unpin_dir(&args.pin_dir);
        } else {
            for l in crate::tiers::pins::switch_off(&args.pin_dir).lines {
                println!("guardrail: {l}");
            }
        }
        println!("guardrail: {sig} received during start-up; stopped, all programs detached");
    }
}

/// Everything up to serving: policy, probe, programs attached and pinned (or the watcher
/// started), event sink, holds adopted. Checks for a stop between steps (and each program load
/// checks too): Err([`crate::daemon::lifecycle::Interrupted`]) then.
fn start(args: &AgentArgs) -> Result<Agent> {
    use crate::daemon::lifecycle::check;
    let host = procinfo::hostname();
    let source = PolicySource::from_args(args.policy.as_deref(), args.policy_dir.as_deref());
    let (policy, policy_fallback) =
        crate::policy::lastgood::policy_at_start(&source, &args.state_dir)?;
    check()?;
    crate::host::mounts::mount_kernel_filesystems();
    check()?;
    let offsets = btf::resolve_offsets(Path::new(btf::VMLINUX_BTF)).map(|mut o| {
        o.io_uring_opcode = btf::io_uring_opcode_offset().unwrap_or(0);
        o
    });
    check()?;
    let report = probe::probe(offsets.as_ref().ok());
    check()?;
    let tier = Tier::from_name(&args.tier).unwrap_or(report.tier);
    let why = if args.tier == "auto" {
        report.why()
    } else {
        format!("forced by --tier {}; probe: {}", args.tier, report.why())
    };
    // Agent events to record once the event log is open.
    let mut notes: Vec<(&str, String)> = Vec::new();
    if let Some(why) = &policy_fallback {
        notes.push(("policy_fallback", why.clone()));
    }
    let mut adopting = false;
    // The shutdown guard decides in the kernel: it has no userspace tier.
    let mut shutdown = crate::guards::shutdown::Guard::new(&host, tier, &policy);
    let backend = if tier == Tier::Userspace {
        // Programs a previous BPF agent pinned would go on enforcing unseen beside the watcher
        // (and the jobs they hold would wait for an agent that cannot answer): switch them off.
        if args.pin_dir.join("links").is_dir() || args.pin_dir.join("maps").is_dir() {
            let r = crate::tiers::pins::switch_off(&args.pin_dir);
            let msg = format!(
                "programs of a previous BPF agent were pinned in {}; the userspace tier cannot adopt them, so they were switched off: {}{}",
                args.pin_dir.display(),
                r.lines.join("; "),
                if r.problems.is_empty() {
                    String::new()
                } else {
                    format!(" (problems: {})", r.problems.join("; "))
                }
            );
            eprintln!("guardrail: WARNING: {msg}");
            notes.push(("tier_degraded", msg));
        }
        check()?;
        // The policy is in the watcher's tables before its first event is read.
        Backend::Userspace(Box::new(start_userspace(&policy)?))
    } else {
        let offsets = offsets.context("resolving kernel struct offsets from BTF")?;
        let (pin_dir, unpinned) = crate::tiers::pins::usable_pin_dir(&args.pin_dir);
        if let Some(msg) = unpinned {
            eprintln!("guardrail: WARNING: {msg}");
            notes.push(("tier_degraded", msg));
        }
        adopting = pin_dir.as_deref().is_some_and(Sensor::had_pinned_state);
        let mut sensor = Sensor::with_pins(&offsets, pin_dir.as_deref())?;
        check()?;
        // The policy is in the maps before any program is attached: there is no moment with
        // programs running and no policy.
        sensor.install_policy(&policy.kernel)?;
        shutdown.install(&mut sensor, &policy)?;
        sensor.attach(tier)?;
        shutdown.attach(&mut sensor, tier)?;
        check()?;
        // The shutdown programs are pinned with the deletion hooks: a restart leaves neither
        // guard down.
        sensor.pin_links()?;
        let ring = sensor.take_events()?;
        Backend::Bpf {
            sensor: Box::new(sensor),
            ring,
        }
    };
    check()?;
    let mut sink = incident::Sink::new(&policy, args.event_log.clone(), &host)?;
    sink.set_tier(&tier.to_string());
    let mut agent = Agent {
        host,
        tier,
        why,
        backend,
        policy,
        source,
        last_reload_error: None,
        holds: BTreeMap::new(),
        sink,
        lost_reported: 0,
        forks_lost_reported: 0,
        shutdown,
        kernel_jobs: KernelJobs::default(),
        state_dir: args.state_dir.clone(),
        policy_fallback,
        approvals: Default::default(),
    };
    agent.announce();
    for (kind, msg) in notes {
        agent.sink.agent_event(kind, &msg);
    }
    if adopting {
        agent.adopt_holds();
    }
    if let Backend::Bpf { sensor, .. } = &mut agent.backend {
        let answered = agent.shutdown.adopt_stopped(sensor, &mut agent.sink);
        if answered > 0 {
            println!("guardrail: answered {answered} shutdown callers stopped while no agent ran");
        }
    }
    check()?;
    Ok(agent)
}

/// Whether systemd is restarting this unit (restart, try-restart, reload-or-restart: a package
/// upgrade does this) rather than stopping it: a restart must leave no gap, a stop detaches.
fn systemd_restart_pending() -> bool {
    let Ok(cgroup) = std::fs::read_to_string("/proc/self/cgroup") else {
        return false;
    };
    let Some(unit) = cgroup
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .find(|c| c.ends_with(".service"))
        .map(str::to_string)
    else {
        return false;
    };
    let Ok(out) = std::process::Command::new("systemctl")
        .args(["list-jobs", "--no-legend", "--plain"])
        .output()
    else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        let mut f = l.split_whitespace();
        let _id = f.next();
        f.next() == Some(unit.as_str()) && f.next().is_some_and(|t| t.contains("restart"))
    })
}

impl Agent {
    /// Holds left by a previous agent (crash, restart, upgrade) are open holds again: same
    /// incident ids, the job still stopped, the kernel still refusing or re-stopping it, and the
    /// hold's original start (a restart never extends it past `hold_timeout`).
    fn adopt_holds(&mut self) {
        let Ok(jobs) = self.backend.jobs() else {
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
            if let Some(unit) = pids.iter().find_map(|p| self.never_hold_unit(*p)) {
                self.release_never_held(key, job, &unit);
                continue;
            }
            self.adopt_job(key, &job, "adopted from the previous agent", false);
        }
    }

    /// Makes `job`, which the kernel holds, an open hold of this agent. Only when a live process
    /// of the same session started before the hold: a process group id reused by a newer job is
    /// never stopped (its stale entry is dropped instead). `report`: the incident was never
    /// reported (its event was lost) and goes to the sinks now.
    fn adopt_job(&mut self, key: JobKey, job: &JobState, how: &str, report: bool) -> bool {
        if !crate::host::identity::job_predates(&key, job.held_ns) {
            let _ = self.backend.remove_job(&key);
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
            self.next_local_incident()
        };
        let inc = Incident {
            id,
            time: incident::now_rfc3339(),
            host: self.host.clone(),
            tier: self.tier.to_string(),
            kind: "budget_crossed".into(),
            rule: self.policy.rule_name(job.rule),
            outcome: "held".into(),
            reason: format!(
                "{} deletions outside the deletion targets (budget {}, rule {}); {how}",
                job.count,
                self.policy.rule_budget(job.rule),
                self.policy.rule_name(job.rule)
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
            self.sink.incident(&inc);
        }
        let timeout = self.policy.hold_timeout;
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
    fn adopt_unrecorded(&mut self) {
        if !matches!(self.backend, Backend::Bpf { .. }) {
            return;
        }
        self.drain_events();
        let Ok(jobs) = self.backend.jobs() else {
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
                    host: self.host.clone(),
                    tier: self.tier.to_string(),
                    kind: "budget_crossed".into(),
                    rule: self.policy.rule_name(job.rule),
                    pgid: key.pgid,
                    sid: key.sid,
                    uid: job.uid,
                    user: procinfo::user_name(job.uid),
                    count: job.count,
                    ..Default::default()
                };
                inc.outcome = if self.tier.refuses() {
                    "refused"
                } else {
                    "killed"
                }
                .into();
                inc.reason = format!(
                    "{} deletions outside the deletion targets (rule {}); found blocked by the kernel, its crossing event was lost",
                    job.count, inc.rule
                );
                self.sink.incident(&inc);
            }
        }
    }

    /// Alerts when `JOBS` or `HELD` is 80 % full: past that, a flood of jobs evicts counters
    /// (JOBS) or a new hold may find no room (HELD, then only JOBS holds it).
    fn check_map_fill(&mut self) {
        if self
            .kernel_jobs
            .fill_checked
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.kernel_jobs.fill_checked = Some(Instant::now());
        let Backend::Bpf { sensor, .. } = &mut self.backend else {
            return;
        };
        let Ok((jobs, held)) = sensor.job_map_fill() else {
            return;
        };
        let checks = [
            (
                "JOBS",
                jobs,
                guardrail_common::JOBS_CAPACITY as usize,
                self.kernel_jobs.jobs_full,
            ),
            (
                "HELD",
                held,
                guardrail_common::HELD_CAPACITY as usize,
                self.kernel_jobs.held_full,
            ),
        ];
        let mut now_full = [false; 2];
        for (i, (name, n, cap, was)) in checks.into_iter().enumerate() {
            now_full[i] = if n * 10 >= cap * 8 {
                if !was {
                    self.tier_degraded(format!(
                        "the kernel's {name} map is {} % full ({n} of {cap} jobs): a flood of new jobs{}",
                        n * 100 / cap,
                        if name == "JOBS" {
                            " evicts the counters of running ones (held jobs stay held)"
                        } else {
                            " may leave a new hold in the evictable JOBS map only"
                        }
                    ));
                }
                true
            } else {
                was && n * 2 >= cap
            };
        }
        self.kernel_jobs.jobs_full = now_full[0];
        self.kernel_jobs.held_full = now_full[1];
    }

    /// Lets a held job of a never_hold unit go, as the kernel would have decided it: refused from
    /// here on where the tier refuses, free elsewhere.
    fn release_never_held(&mut self, key: JobKey, mut job: JobState, unit: &str) {
        if self.tier.refuses() {
            job.state = JOB_DENIED;
        } else {
            job.state = JOB_ACTIVE;
            job.allowance = ALLOWANCE_UNLIMITED;
        }
        let _ = self.backend.set_job(&key, &job);
        procinfo::signal_job(key.pgid, Signal::SIGCONT);
        println!(
            "guardrail: job {} of {unit} was left held by the previous agent; continued, never held (deletion.never_hold)",
            key.pgid
        );
    }

    fn announce(&mut self) {
        println!("guardrail {} on {}", crate::VERSION, self.host);
        println!("guardrail: tier {} in force: {}", self.tier, self.why);
        for gap in self.tier.gaps() {
            println!("guardrail: tier {} cannot: {gap}", self.tier);
        }
        println!(
            "guardrail: policy {} in force ({})",
            self.source.describe(),
            self.policy.summary()
        );
        for w in &self.policy.warnings {
            println!("{w}");
        }
        println!("guardrail: attached {}", self.backend.attached().join(", "));
        if let Some(why) = crate::guards::tell::probe() {
            eprintln!("guardrail: {why}");
        }
        match &self.backend {
            Backend::Bpf { sensor, .. } => {
                let ids: Vec<String> = sensor.attached_ids().iter().map(u32::to_string).collect();
                println!("guardrail: program ids {}", ids.join(" "));
            }
            Backend::Userspace(f) => {
                println!(
                    "guardrail: userspace tier watching with {}: deletions are seen after they happen",
                    f.mechanism()
                );
                println!(
                    "guardrail: userspace tier stops a runaway job at most {} files past its budget (measured bound; `guardrail selftest --tier userspace` measures this host)",
                    userspace::PROMISED_OVERSHOOT
                );
                if f.names_exited_processes() {
                    println!(
                        "guardrail: userspace tier names the job of a process that exited before its deletions were read by who forked it (process events connector)"
                    );
                } else if f.mechanism() == "fanotify" {
                    println!(
                        "guardrail: WARNING: the process events connector refused us (needs CAP_NET_ADMIN): deletions by processes that exited before they were read count for an unknown job"
                    );
                }
                if f.unlocated_protected_roots() > 0 {
                    println!(
                        "guardrail: WARNING: {} protected root(s) have no path this tier can watch: their deletion goes unnoticed",
                        f.unlocated_protected_roots()
                    );
                }
            }
        }
        self.sink.agent_event(
            "agent_started",
            &format!("guardrail agent started, tier {} ({})", self.tier, self.why),
        );
    }

    fn serve(&mut self, socket: &Path) -> Result<()> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(socket);
        let listener =
            UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        // Any local user may connect: each request is checked against the caller's credentials
        // (control.rs), and clients are served off this loop.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;

        // Blocked since the first instruction of main (crate::daemon::lifecycle): one signalfd for the
        // agent's whole life, so no signal falls between start-up and this loop.
        let signals =
            crate::daemon::lifecycle::signals().context("the stop signals are not blocked")?;
        let mut watcher = crate::policy::Watcher::new(&self.source, &self.policy)?;
        // The server's threads inherit the blocked stop signals and never take SIGTERM.
        let server = control::Server::start(listener)?;
        let mut gate = control::Gate::new();
        if let Backend::Bpf { sensor, .. } = &mut self.backend {
            self.shutdown.promise_to_answer(sensor);
        }
        println!("guardrail: ready, listening on {}", socket.display());
        crate::daemon::notify_ready();

        let mut last_tick = Instant::now();
        loop {
            // A stop read from the signalfd elsewhere (a wait inside a reload checks for one).
            if let Some(s) = crate::daemon::lifecycle::stop_noted() {
                println!("guardrail: {s} received, detaching");
                return Ok(());
            }
            let (ring_ready, sock_ready, sig_ready, watch_ready, sessions_ready) = {
                let mut fds = vec![
                    PollFd::new(self.backend.as_fd(), PollFlags::POLLIN),
                    PollFd::new(server.wake_fd(), PollFlags::POLLIN),
                    PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                ];
                let mut watch_index = usize::MAX;
                if let Some(w) = watcher.as_ref() {
                    watch_index = fds.len();
                    fds.push(PollFd::new(w.as_fd(), PollFlags::POLLIN));
                }
                // Logins (utmp, logind's session files) for the shutdown guard's classifier.
                let mut sessions_index = usize::MAX;
                if let Some(fd) = self.shutdown.inotify_fd() {
                    sessions_index = fds.len();
                    fds.push(PollFd::new(fd, PollFlags::POLLIN));
                }
                match poll(&mut fds, PollTimeout::from(250u16)) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e).context("poll"),
                }
                let ready = |i: usize| {
                    fds.get(i)
                        .and_then(|f| f.revents())
                        .is_some_and(|r| !r.is_empty())
                };
                (
                    ready(0),
                    ready(1),
                    ready(2),
                    ready(watch_index),
                    ready(sessions_index),
                )
            };
            if ring_ready {
                self.drain_events();
            }
            if sock_ready {
                for incoming in server.take() {
                    let resp =
                        self.answer(incoming.request.clone(), &incoming.peer, &mut gate, &server);
                    incoming.reply(resp);
                }
            }
            if sig_ready {
                while let Ok(Some(info)) = signals.read_signal() {
                    match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGHUP) => {
                            self.reload("SIGHUP");
                            if let Some(w) = watcher.as_mut() {
                                w.rearm(&self.policy);
                            }
                            self.sink.reopen();
                            gate.refresh();
                        }
                        Ok(s) => {
                            crate::daemon::lifecycle::note_stop(s);
                            println!("guardrail: {s} received, detaching");
                            return Ok(());
                        }
                        Err(_) => {}
                    }
                }
            }
            // Also when not ready: a directory change may wait for its turn (Watcher::changed).
            if let Some(w) = watcher.as_mut()
                && let Some(why) = w.changed(watch_ready)
            {
                self.reload(&why);
                w.rearm(&self.policy);
            }
            if sessions_ready && let Backend::Bpf { sensor, .. } = &mut self.backend {
                self.shutdown.tick(sensor, true);
            }
            if last_tick.elapsed() >= Duration::from_millis(500) {
                last_tick = Instant::now();
                // The watcher also has timed work (records waiting for their directory).
                if matches!(self.backend, Backend::Userspace(_)) {
                    self.drain_events();
                }
                self.tick();
            }
        }
    }

    fn drain_events(&mut self) {
        let (events, shutdowns) = self.backend.drain();
        if let Backend::Bpf { sensor, .. } = &mut self.backend {
            for ev in &shutdowns {
                self.shutdown.on_event(ev, sensor, &mut self.sink);
            }
        }
        for ev in events {
            self.on_event(&ev);
        }
    }

    fn reload(&mut self, why: &str) {
        match self.source.load() {
            Ok(new) => match self.backend.install_policy(&new.kernel) {
                Ok(()) => {
                    if let Backend::Bpf { sensor, .. } = &mut self.backend
                        && let Err(e) = self.shutdown.install(sensor, &new)
                    {
                        eprintln!("guardrail: shutdown tables not updated: {e:#}");
                    }
                    println!("guardrail: policy reloaded ({why}): {}", new.summary());
                    for w in &new.warnings {
                        println!("{w}");
                    }
                    self.sink.agent_event(
                        "policy_reloaded",
                        &format!("policy reloaded ({why}): {}", new.summary()),
                    );
                    self.policy = new;
                    self.last_reload_error = None;
                    if self.policy_fallback.take().is_some() {
                        println!(
                            "guardrail: the policy {} is in force again",
                            self.source.describe()
                        );
                    }
                    if let Err(e) = crate::policy::lastgood::save(&self.state_dir, &self.source) {
                        eprintln!("guardrail: WARNING: the last good policy was not saved: {e:#}");
                    }
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    eprintln!(
                        "guardrail: policy reload failed, previous policy stays in force: {msg}"
                    );
                    self.sink.agent_event("policy_rejected", &msg);
                    self.last_reload_error = Some(msg);
                }
            },
            Err(report) => {
                eprintln!(
                    "guardrail: policy rejected ({why}); the previous policy stays in force:\n{report}"
                );
                self.sink.agent_event(
                    "policy_rejected",
                    &format!(
                        "policy rejected ({why}); previous policy stays in force: {}",
                        report.lines().next().unwrap_or("")
                    ),
                );
                self.last_reload_error = Some(report);
            }
        }
    }

    fn on_event(&mut self, ev: &Event) {
        let mut inc = Incident::from_event(ev, &self.host, self.tier, &self.policy);
        match ev.kind {
            EV_BUDGET_CROSSED if ev.flags & EVF_AUDIT != 0 => {
                inc.outcome = "would_have_held".into();
                self.sink.incident(&inc);
            }
            // An `alert` rule: reported once per job, nothing stopped (the rule's action is
            // checked too, for event sources that do not set the flag; not for a level's crossing,
            // which has its own action and always sets the flag).
            EV_BUDGET_CROSSED
                if ev.flags & guardrail_common::EVF_ALERT != 0
                    || crate::guards::deletion::levels::level_of(ev.flags).is_none()
                        && self
                            .policy
                            .kernel
                            .rules
                            .get(ev.rule as usize)
                            .is_some_and(|r| r.action == guardrail_common::ACTION_ALERT) =>
            {
                inc.outcome = "alerted".into();
                self.sink.incident(&inc);
            }
            EV_BUDGET_CROSSED if ev.flags & guardrail_common::EVF_NEVER_HOLD != 0 => {
                self.never_held(inc, ev);
            }
            EV_BUDGET_CROSSED => {
                let key = JobKey {
                    sid: ev.sid,
                    pgid: ev.pgid,
                };
                let state = self
                    .backend
                    .job(&key)
                    .ok()
                    .flatten()
                    .map(|j| j.state)
                    .unwrap_or(JOB_HELD);
                if state == JOB_BLOCKED && resumed_before_read(ev) {
                    self.end_resumed(inc, key, None);
                    return;
                }
                if state == JOB_BLOCKED {
                    self.kernel_jobs.blocked_reported.insert(inc.id);
                    inc.outcome = if self.tier.refuses() {
                        "refused".into()
                    } else {
                        "killed".into()
                    };
                    self.sink.incident(&inc);
                    return;
                }
                if self.holds.contains_key(&inc.id) {
                    // Already adopted by a tick that found the job held before this event.
                    return;
                }
                inc.outcome = "held".into();
                self.hold(inc, key);
            }
            EV_PROTECTED_ROOT | EV_DATA_DIR => {
                if ev.flags & EVF_AUDIT != 0 {
                    inc.outcome = "would_have_refused".into();
                    self.sink.incident(&inc);
                } else if ev.flags & EVF_USERSPACE != 0 {
                    // Seen after the fact: the watcher stopped the job (its state is held, with
                    // this incident id), unless it could name no job to stop.
                    let key = JobKey {
                        sid: ev.sid,
                        pgid: ev.pgid,
                    };
                    if ev.flags & EVF_SIGNALLED != 0 {
                        inc.outcome = "held".into();
                        self.hold(inc, key);
                    } else {
                        inc.outcome = "reported".into();
                        self.sink.incident(&inc);
                    }
                } else if ev.flags & EVF_TRACEPOINT != 0 && ev.flags & EVF_SIGNALLED != 0 {
                    // The tracepoint tier cannot refuse: the kernel held (or, under a `block`
                    // rule, killed) the job right after this first deletion, with an incident id.
                    self.stopped_foreign(inc, ev);
                } else if ev.flags & EVF_TRACEPOINT != 0 {
                    // Seen after the fact and nothing stopped (a never_hold unit's job): the
                    // deletion happened, so it is not "refused".
                    inc.outcome = "reported".into();
                    inc.reason = format!(
                        "{} (tracepoint tier: the file is gone, the job was not stopped)",
                        inc.reason
                    );
                    self.sink.incident(&inc);
                } else {
                    inc.outcome = "refused".into();
                    self.sink.incident(&inc);
                }
            }
            EV_HELD_RETRY if ev.flags & guardrail_common::EVF_KILLED != 0 => {
                self.killed_resumed(inc, ev);
            }
            EV_HELD_RETRY => {
                // A held job was resumed without approval and tried again: the kernel re-stopped
                // the task, we re-stop the whole job. Only while it is still held: a retry read
                // after the job was let go (approved or denied) was made before that, and its task
                // has been continued with the job.
                let key = JobKey {
                    sid: ev.sid,
                    pgid: ev.pgid,
                };
                let still_held = self
                    .backend
                    .job(&key)
                    .ok()
                    .flatten()
                    .is_some_and(|j| j.state == JOB_HELD);
                if !still_held {
                    return;
                }
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
            _ => {}
        }
    }

    /// A held job resumed itself `SELF_RESUME_LIMIT` times without approval (tracepoint tier: a
    /// sibling looping `kill -CONT`, a ptracer swallowing SIGSTOP): the kernel killed the task
    /// and blocked the job. The rest of the job is killed here and the hold closed, saying why.
    /// With no open hold (its crossing event was lost), the tick reports the blocked job.
    fn killed_resumed(&mut self, inc: Incident, ev: &Event) {
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
        self.end_resumed(out, key, Some(wrappers));
    }

    /// Ends a job held and then killed by the kernel for resuming itself: the rest of the job is
    /// killed (a wrapper stopped in sympathy is continued) and the incident says why. Called on
    /// the kill event for an open hold, or on the crossing itself when the agent read it only
    /// after the kill (under load: the held job resumed itself faster than the agent read).
    fn end_resumed(&mut self, mut out: Incident, key: JobKey, wrappers: Option<Vec<u32>>) {
        let wrappers = wrappers.unwrap_or_else(|| procinfo::stopped_ancestors(key.pgid));
        procinfo::signal_job(key.pgid, Signal::SIGKILL);
        procinfo::continue_pids(&wrappers);
        self.kernel_jobs.blocked_reported.insert(out.id);
        out.outcome = "killed".into();
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
        self.sink.incident(&out);
    }

    /// A tracepoint-tier deletion in a foreign data directory: the kernel let it through (it cannot
    /// refuse), then stopped the job (JOB_HELD) or killed it (JOB_BLOCKED). The outcome says what
    /// really happened: the file is gone, the job is held or killed.
    fn stopped_foreign(&mut self, mut inc: Incident, ev: &Event) {
        let key = JobKey {
            sid: ev.sid,
            pgid: ev.pgid,
        };
        let dir = self
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
        let state = self
            .backend
            .job(&key)
            .ok()
            .flatten()
            .map(|j| j.state)
            .unwrap_or(JOB_HELD);
        if state == JOB_BLOCKED && resumed_before_read(ev) {
            self.end_resumed(inc, key, None);
            return;
        }
        if state == JOB_BLOCKED {
            self.kernel_jobs.blocked_reported.insert(inc.id);
            inc.reason = inc.reason.replacen("stopped after", "killed after", 1);
            inc.outcome = "killed".into();
            self.sink.incident(&inc);
            return;
        }
        if let Some(h) = self.holds.get_mut(&inc.id) {
            // Already adopted by a tick that found the job held before this event: give the
            // hold its real reason.
            h.incident.reason = inc.reason;
            return;
        }
        inc.outcome = "held".into();
        self.hold(inc, key);
    }

    fn next_local_incident(&mut self) -> u64 {
        // Incidents from the kernel count up from 1; ones the agent makes for tracepoint-tier
        // protected paths take the kernel counter too, so ids never collide.
        self.backend.next_incident()
    }

    fn hold(&mut self, mut inc: Incident, key: JobKey) {
        // Stop the whole job, not only the task the kernel signalled.
        procinfo::signal_job(key.pgid, Signal::SIGSTOP);
        let timeout = self.policy.hold_timeout;
        // A job approved before and held again: what it has done in all, and the approvals.
        let job = self.backend.job(&key).ok().flatten();
        inc.total_count = job.map_or(inc.count, |j| j.total.max(inc.count));
        inc.earlier_approvals = self.approvals.of(&key);
        let budget = job.map_or(inc.budget, |j| self.policy.rule_budget(j.rule));
        // The command and the reason (a path) are the job's text: capped and escaped.
        let lines = crate::guards::deletion::approval::hold_lines(
            format!(
                "guardrail: held job \"{}\" on {}: {}. Incident {}.",
                text::cap(&inc.command, 400),
                self.host,
                text::cap(&inc.reason, 300),
                inc.id
            ),
            inc.id,
            budget,
            crate::guards::deletion::approval::held_again(inc.total_count, &inc.earlier_approvals),
        );
        crate::guards::tell::tell_job(inc.pid, &lines);
        self.sink.incident(&inc);
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

    fn tier_degraded(&mut self, msg: String) {
        eprintln!("guardrail: {msg}");
        self.sink.agent_event("tier_degraded", &msg);
    }

    fn tick(&mut self) {
        if let Backend::Userspace(f) = &self.backend {
            let (lost, forks_lost) = (f.lost_events(), f.forks_lost());
            if lost > self.lost_reported {
                self.lost_reported = lost;
                self.tier_degraded(format!(
                    "the userspace watcher's event queue overflowed ({lost} times): deletions went uncounted"
                ));
            }
            if forks_lost > self.forks_lost_reported {
                self.forks_lost_reported = forks_lost;
                self.tier_degraded(format!(
                    "the process events connector overflowed ({forks_lost} times): a worker that exits before its deletions are read may count for an unknown job"
                ));
            }
        }
        if let Backend::Bpf { sensor, .. } = &mut self.backend {
            self.shutdown.tick(sensor, false);
        }
        self.adopt_unrecorded();
        self.check_map_fill();
        let expired: Vec<u64> = self
            .holds
            .iter()
            .filter(|(_, h)| h.since.elapsed() >= h.timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let _ = self.deny(id, "timed_out", "hold timeout", None);
        }
        // Jobs whose process group is gone: forget them, so a recycled pgid starts afresh.
        if let Ok(jobs) = self.backend.jobs() {
            let now = crate::host::clock::monotonic_ns();
            for (key, job) in jobs {
                // The watcher's unknown job (deletions by processes it could not name) is no
                // process group: it lives as long as the agent.
                if key == userspace::UNKNOWN_JOB && matches!(self.backend, Backend::Userspace(_)) {
                    continue;
                }
                if !procinfo::pgid_alive(key.pgid) && !self.holds.values().any(|h| h.key == key) {
                    let _ = self.backend.remove_job(&key);
                    self.kernel_jobs.blocked_reported.remove(&job.incident);
                    // One summary per job that deleted outside scope, for `policy test`.
                    if job.total >= crate::guards::deletion::replay::SUMMARY_MIN_DELETIONS {
                        let summary = crate::guards::deletion::replay::JobSummary::new(
                            &key,
                            &job,
                            &self.host,
                            &self.policy,
                            now,
                        );
                        self.sink.record("job", &summary);
                    }
                }
            }
        }
        self.approvals.retain(|k| procinfo::pgid_alive(k.pgid));
        // Held jobs whose processes all ended are closed.
        let ended: Vec<u64> = self
            .holds
            .iter()
            .filter(|(_, h)| !procinfo::pgid_alive(h.key.pgid))
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            if let Some(h) = self.holds.remove(&id) {
                let mut inc = h.incident;
                inc.outcome = "ended".into();
                self.sink.incident(&inc);
            }
        }
    }

    /// A job of a `deletion.never_hold` unit (logind, sshd, journald...) crossed its budget. The
    /// kernel (or the watcher) decided alone and stopped nothing, so this holds while no agent
    /// runs: where the tier can refuse (lsm) the job's further deletions outside scope are refused
    /// until it ends; elsewhere the crossing is only reported and the job deletes on. Nothing is
    /// signalled from here.
    fn never_held(&mut self, mut inc: Incident, ev: &Event) {
        let refused = ev.flags & guardrail_common::EVF_REFUSED != 0;
        // Named by the kernel (the unit's index in the policy): the job may be gone by now.
        let unit = self
            .policy
            .compiled
            .never_hold
            .get(ev.data_dir_id as usize)
            .cloned()
            .or_else(|| self.never_hold_unit(ev.tgid))
            .unwrap_or_else(|| "its unit".to_string());
        if inc.unit.is_none() {
            inc.unit = Some(unit.clone());
        }
        let what = if refused {
            "not stopped, every further deletion of this job outside scope refused"
        } else {
            "not stopped, only reported: this tier cannot refuse"
        };
        inc.outcome = if refused { "refused" } else { "reported" }.into();
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
        self.sink.incident(&inc);
    }

    /// The never_hold unit a process runs in: its own cgroup or the nearest one above it (a
    /// `Delegate=yes` unit's sub-cgroup) whose id is in the kernel's `NEVER_HOLD` table. Matched
    /// by id like the kernel does, never by name: names below a delegated unit are the job's.
    fn never_hold_unit(&self, pid: u32) -> Option<String> {
        let path = crate::host::cgroup::path_of(pid)?;
        let root = guardrail_policy::cgroup2_root();
        crate::host::cgroup::ancestor_ids(&root, &path)
            .into_iter()
            .find(|(id, _)| {
                self.policy
                    .compiled
                    .never_hold_cgroups
                    .iter()
                    .any(|(x, _)| x == id)
            })
            .map(|(_, name)| name)
    }

    fn approve(
        &mut self,
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
        let mut job = self.backend.job(&key)?.unwrap_or(JobState {
            state: JOB_HELD,
            ..Default::default()
        });
        let total_at_approval = job.total;
        let rule_budget = self.policy.rule_budget(job.rule);
        grant.apply(&mut job, rule_budget, crate::host::clock::monotonic_ns());
        // A later hold counts its self-resumes (SELF_RESUME_LIMIT) afresh.
        job.refused = 0;
        self.backend
            .set_job(&key, &job)
            .context("the job stays held")?;
        let Some(h) = self.holds.remove(&id) else {
            bail!("no open hold with id {id}")
        };
        let wrappers = procinfo::stopped_ancestors(h.key.pgid);
        procinfo::signal_job(h.key.pgid, Signal::SIGCONT);
        procinfo::continue_pids(&wrappers);
        let mut inc = h.incident;
        inc.outcome = "approved".into();
        inc.decided_by = Some(by.uid);
        inc.decided_by_session = by.session_id();
        self.sink.incident(&inc);
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
            self.host,
            grant.describe(),
            h.key.pgid
        ))
    }

    /// A deliberate stop (not a restart): every open hold is resolved by
    /// `deletion.on_agent_stop`, one incident each, so no job is left stopped with nobody to
    /// answer. "end" kills the job (as an unanswered hold's timeout does: a stop is no approval);
    /// "continue" lets it finish, as `guardrail off` does. Returns the agent event's tail.
    fn release_holds_on_stop(&mut self) -> String {
        if self.holds.is_empty() {
            return String::new();
        }
        let end = self.policy.policy.deletion.on_agent_stop == guardrail_policy::OnAgentStop::End;
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
                inc.outcome = "ended".into();
                self.sink.incident(&inc);
                continue;
            }
            // The kernel's state first: a program still running for a moment must neither stop
            // a continued job again nor let an ended one delete on.
            let mut job = self.backend.job(&h.key).ok().flatten().unwrap_or_default();
            if end {
                job.state = JOB_DENIED;
            } else {
                let rule_budget = self.policy.rule_budget(job.rule);
                crate::guards::deletion::approval::Grant::RestOfJob.apply(
                    &mut job,
                    rule_budget,
                    crate::host::clock::monotonic_ns(),
                );
            }
            if let Err(e) = self.backend.set_job(&h.key, &job) {
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
                inc.outcome = "ended_on_agent_stop".into();
            } else {
                procinfo::signal_job(h.key.pgid, Signal::SIGCONT);
                continued.push(h.key.pgid);
                inc.outcome = "continued_on_agent_stop".into();
            }
            procinfo::continue_pids(&wrappers);
            self.sink.incident(&inc);
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
    fn deny(
        &mut self,
        id: u64,
        outcome: &str,
        by: &str,
        caller: Option<&control::Peer>,
    ) -> Result<String> {
        let Some(h) = self.holds.get(&id) else {
            bail!("no open hold with id {id} (see `guardrail status`)")
        };
        let key = h.key;
        let mut job = self.backend.job(&key)?.unwrap_or_default();
        job.state = JOB_DENIED;
        // On failure the record stays: the job is still held in the kernel, and listed.
        self.backend
            .set_job(&key, &job)
            .context("the job stays held")?;
        let Some(h) = self.holds.remove(&id) else {
            bail!("no open hold with id {id}")
        };
        let kill_it = self.policy.deny_kills || !self.tier.refuses();
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
        inc.outcome = outcome.into();
        inc.decided_by_text = Some(by.to_string());
        if let Some(c) = caller {
            inc.decided_by = Some(c.uid);
            inc.decided_by_session = c.session_id();
        }
        self.sink.incident(&inc);
        let what = if kill_it {
            "ended"
        } else {
            "resumed, with every further deletion outside scope refused"
        };
        Ok(format!(
            "denied incident {id} on {}: job {} {what}",
            self.host, h.key.pgid
        ))
    }

    /// Open holds, all or only those of `only_uid`'s jobs (filtered before the /proc scan).
    fn hold_infos(&self, only_uid: Option<u32>) -> Vec<HoldInfo> {
        self.holds
            .values()
            .filter(|h| only_uid.is_none_or(|u| h.incident.uid == u))
            .map(|h| HoldInfo {
                id: h.incident.id,
                host: self.host.clone(),
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
                tier: self.tier.to_string(),
                reason: h.incident.reason.clone(),
                age_secs: h.since.elapsed().as_secs(),
                timeout_secs: h.timeout.as_secs(),
                total_count: h.incident.total_count,
                earlier_approvals: h.incident.earlier_approvals.clone(),
                audit_session: h.incident.audit_session,
            })
            .collect()
    }

    /// One admin request, from `peer` (credentials from the kernel, see control.rs). Returns at
    /// once: nothing here waits on the client.
    fn answer(
        &mut self,
        req: Request,
        peer: &control::Peer,
        gate: &mut control::Gate,
        server: &control::Server,
    ) -> Response {
        let admin = gate.is_admin(peer);
        let what = match &req {
            Request::Approve { id, .. } => Some(format!("approve incident {id}")),
            Request::Deny { id } => Some(format!("deny incident {id}")),
            Request::Confirm { .. } => Some("confirm a shutdown".to_string()),
            _ => None,
        };
        if let Some(what) = &what
            && !admin
        {
            let verb = what.split(' ').next().unwrap_or("this");
            if gate.log_refusal(peer.uid, Instant::now()) {
                self.sink.agent_event(
                    "request_refused",
                    &format!(
                        "{} asked to {what}: refused, not root nor in the {} group",
                        peer.describe(),
                        control::ADMIN_GROUP
                    ),
                );
            }
            return Response::Error {
                message: gate.refusal(verb),
            };
        }
        if matches!(req, Request::Reload) && peer.uid != 0 {
            return Response::Error {
                message: "only root may reload (try sudo)".into(),
            };
        }
        // What a caller who is not an admin sees: their own jobs and session only.
        let view = (!admin).then_some(peer);
        let result = match req {
            Request::Status => return Response::Status(Box::new(self.status(view, server))),
            Request::Holds => {
                return Response::Holds {
                    holds: self.hold_infos(view.map(|p| p.uid)),
                    filtered: view.map(|_| filtered_note()),
                };
            }
            Request::SessionHolds => {
                // Only the caller's own audit session, as the kernel reports it for the caller:
                // a process without one (a service, cron without pam_loginuid) gets none.
                let mine = peer.session_id();
                let mut holds = self.hold_infos(view.map(|p| p.uid));
                holds.retain(|h| mine.is_some() && h.audit_session == mine);
                let note = match mine {
                    Some(s) => format!("only the holds of your audit session ({s}) are shown"),
                    None => "your process has no audit session (not started from a login), so no hold is yours to pick: name one, `guardrail approve ID` (see `guardrail holds`)".to_string(),
                };
                return Response::Holds {
                    holds,
                    filtered: Some(note),
                };
            }
            Request::Approve {
                id,
                budget,
                for_job,
            } => self.approve(id, budget, for_job, peer),
            Request::Deny { id } => {
                self.deny(id, "denied", &format!("uid {}", peer.uid), Some(peer))
            }
            Request::Confirm { host, session } => {
                if let Err(e) = gate.take_confirm(peer.uid, Instant::now()) {
                    if gate.log_refusal(peer.uid, Instant::now()) {
                        self.sink.agent_event(
                            "request_refused",
                            &format!("{} asked to confirm a shutdown: {e}", peer.describe()),
                        );
                    }
                    return Response::Error { message: e };
                }
                match &mut self.backend {
                    Backend::Bpf { sensor, .. } => {
                        self.shutdown
                            .confirm(&host, session, peer, sensor, &mut self.sink)
                    }
                    Backend::Userspace(_) => Err(anyhow::anyhow!(
                        "the shutdown guard needs BPF, and this host runs the userspace tier: nothing to confirm"
                    )),
                }
            }
            Request::Reload => {
                self.reload("guardrail reload");
                gate.refresh();
                match &self.last_reload_error {
                    None => Ok("policy reloaded".to_string()),
                    Some(e) => Err(anyhow::anyhow!(
                        "policy rejected, previous policy stays in force:\n{e}"
                    )),
                }
            }
        };
        match result {
            Ok(message) => Response::Done { message },
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        }
    }

    /// `view`: the caller, when they may see only their own jobs and session.
    fn status(&self, view: Option<&control::Peer>, server: &control::Server) -> StatusInfo {
        let on_disk = self.source.fingerprint_on_disk();
        let mut sessions = self.shutdown.sessions();
        if let Some(p) = view {
            sessions.retain(|s| Some(s.id) == p.session_id());
        }
        StatusInfo {
            host: self.host.clone(),
            version: crate::VERSION.to_string(),
            tier: self.tier.to_string(),
            why: self.why.clone(),
            gaps: self.tier.gaps().iter().map(|s| s.to_string()).collect(),
            mode: self.policy.mode_name().to_string(),
            policy_source: self.source.describe(),
            policy_in_force: self.policy.fingerprint.clone(),
            policy_on_disk_differs: on_disk.is_some_and(|f| f != self.policy.fingerprint),
            last_reload_error: self.last_reload_error.clone(),
            policy_fallback: self.policy_fallback.clone(),
            attached: self.backend.attached(),
            holds: self.hold_infos(view.map(|p| p.uid)),
            sessions,
            shutdown_inhibitor: self.shutdown.inhibitor_status(),
            job_messages: crate::guards::tell::status(),
            filtered: view.map(|_| filtered_note()),
            caller_check: server.caller_check(),
        }
    }
}

/// What `status` and `holds` say to a caller who is neither root nor in the admin group.
fn filtered_note() -> String {
    format!(
        "only your own jobs and session are shown (not root, not in the {} group)",
        control::ADMIN_GROUP
    )
}

// Silence "unused" for states only read through the kernel.
const _: [u32; 2] = [JOB_ACTIVE, JOB_DENIED];

/// Tells systemd (Type=notify) that the programs are attached and the policy is in force.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let p = path.to_string_lossy();
    let res = if let Some(abstract_name) = p.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
            .and_then(|a| sock.send_to_addr(b"READY=1\n", &a))
    } else {
        sock.send_to(b"READY=1\n", &*p)
    };
    if let Err(e) = res {
        eprintln!("guardrail: telling systemd we are ready failed: {e}");
    }
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
