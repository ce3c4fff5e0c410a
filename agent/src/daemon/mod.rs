//! `guardrail agent`: loads the policy, probes the kernel, attaches the tier's programs (or, where
//! no BPF can run, starts the userspace watcher), and then waits on four things: enforcement
//! events (state changes only), admin requests on the socket, signals, and a tick for hold
//! timeouts.
mod requests;

use std::{
    os::{
        fd::AsFd,
        unix::{fs::PermissionsExt, net::UnixListener},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use guardrail_common::{JOB_ACTIVE, JOB_DENIED};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::signal::Signal,
};

use crate::{
    control::server as control,
    host::procinfo,
    incident::Outcome,
    policy::{LoadedPolicy, PolicySource},
    tiers::{
        backend::{Backend, start_userspace},
        btf,
        probe::{self, Tier},
        sensor::Sensor,
        userspace,
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

pub(crate) struct Agent {
    pub(crate) host: String,
    pub(crate) tier: Tier,
    pub(crate) why: String,
    pub(crate) backend: Backend,
    pub(crate) policy: LoadedPolicy,
    pub(crate) source: PolicySource,
    pub(crate) last_reload_error: Option<String>,
    /// The deletion guard's open holds, approvals and kernel bookkeeping.
    pub(crate) deletion: crate::guards::deletion::Guard,
    pub(crate) sink: crate::sinks::Sink,
    /// Deletions the watcher's queue dropped, as last reported.
    pub(crate) lost_reported: u64,
    pub(crate) forks_lost_reported: u64,
    pub(crate) shutdown: crate::guards::shutdown::Guard,
    pub(crate) state_dir: PathBuf,
    /// Why the policy in force is not the one on disk (broken at start: the last good one or the
    /// embedded default runs instead); cleared when the policy on disk loads.
    pub(crate) policy_fallback: Option<String>,
}

pub fn run(args: AgentArgs) -> Result<()> {
    // main() blocked the stop signals first thing; a caller that did not gets them blocked now.
    if crate::host::lifecycle::signals().is_none() {
        crate::host::lifecycle::block_signals().context("blocking SIGINT, SIGTERM and SIGHUP")?;
    }
    let mut agent = match start(&args) {
        Ok(agent) => agent,
        Err(e) => {
            if let Some(sig) = crate::host::lifecycle::interrupted(&e) {
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
    let detach = match &mut agent.backend {
        Backend::Bpf { sensor, .. } if keep => {
            // From now on no agent writes refusal messages: the pinned shutdown programs refuse
            // without stopping the caller to wait for one.
            agent.shutdown.set_alive_until(sensor, 0);
            // Nor is any process the agent: a process that gets this pid is judged like any
            // other.
            if let Err(e) = sensor.forget_agent() {
                eprintln!("guardrail: could not clear the agent's identity: {e:#}");
            }
            let held = if agent.deletion.holds.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} held job(s) stay held for the next agent (`guardrail status` lists them meanwhile)",
                    agent.deletion.holds.len()
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
            false
        }
        _ => {
            // A deliberate stop: nothing will answer these holds any more, so each is resolved
            // now, by the policy's choice, while the programs still see the job's new state.
            let resolved = agent.with_deletion(|g, cx| g.release_holds_on_stop(cx));
            agent.sink.agent_event(
                "agent_stopped",
                &format!("guardrail agent stopped; programs detached{resolved}"),
            );
            true
        }
    };
    // The two slow parts of a stop side by side, not one after the other: detaching (each
    // program's detach waits for the kernel's grace periods) and the sinks' last delivery
    // (up to a second while a destination is down). A stop takes at most 2 s in all.
    let Agent { backend, sink, .. } = agent;
    std::thread::scope(|s| {
        // With no thread to be had, the closure and the sink are dropped here: in turn.
        let _ = std::thread::Builder::new().spawn_scoped(s, move || drop(sink));
        let mut backend = backend;
        if detach && let Backend::Bpf { sensor, .. } = &mut backend {
            sensor.unpin_everything();
        }
        // Dropping the backend detaches every program left (the watcher: its marks).
        drop(backend);
    });
    if detach {
        println!("guardrail: stopped; all programs detached");
    }
    result
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
/// checks too): Err([`crate::host::lifecycle::Interrupted`]) then.
fn start(args: &AgentArgs) -> Result<Agent> {
    use crate::host::lifecycle::check;
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
    let mut sink = crate::sinks::Sink::new(&policy, args.event_log.clone(), &host)?;
    sink.set_tier(&tier.to_string());
    let mut agent = Agent {
        host,
        tier,
        why,
        backend,
        policy,
        source,
        last_reload_error: None,
        deletion: Default::default(),
        sink,
        lost_reported: 0,
        forks_lost_reported: 0,
        shutdown,
        state_dir: args.state_dir.clone(),
        policy_fallback,
    };
    agent.announce();
    for (kind, msg) in notes {
        agent.sink.agent_event(kind, &msg);
    }
    if adopting {
        agent.with_deletion(|g, cx| g.adopt_holds(cx));
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
    /// Alerts when `JOBS` or `HELD` is 80 % full: past that, a flood of jobs evicts counters
    /// (JOBS) or a new hold may find no room (HELD, then only JOBS holds it).
    pub(crate) fn check_map_fill(&mut self) {
        if self
            .deletion
            .kernel_jobs
            .fill_checked
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.deletion.kernel_jobs.fill_checked = Some(Instant::now());
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
                self.deletion.kernel_jobs.jobs_full,
            ),
            (
                "HELD",
                held,
                guardrail_common::HELD_CAPACITY as usize,
                self.deletion.kernel_jobs.held_full,
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
        self.deletion.kernel_jobs.jobs_full = now_full[0];
        self.deletion.kernel_jobs.held_full = now_full[1];
    }

    pub(crate) fn announce(&mut self) {
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

    pub(crate) fn serve(&mut self, socket: &Path) -> Result<()> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = std::fs::remove_file(socket);
        let listener =
            UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        // Any local user may connect: each request is checked against the caller's credentials
        // (control.rs), and clients are served off this loop.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;

        // Blocked since the first instruction of main (crate::host::lifecycle): one signalfd for the
        // agent's whole life, so no signal falls between start-up and this loop.
        let signals =
            crate::host::lifecycle::signals().context("the stop signals are not blocked")?;
        let mut watcher = crate::policy::Watcher::new(&self.source, &self.policy)?;
        // The server's threads inherit the blocked stop signals and never take SIGTERM.
        let server = control::Server::start(listener)?;
        let mut gate = control::Gate::new();
        if let Backend::Bpf { sensor, .. } = &mut self.backend {
            self.shutdown.promise_to_answer(sensor);
        }
        crate::host::memory::release_freed_heap();
        println!("guardrail: ready, listening on {}", socket.display());
        crate::daemon::notify_ready();

        let mut last_tick = Instant::now();
        loop {
            // A stop read from the signalfd elsewhere (a wait inside a reload checks for one).
            if let Some(s) = crate::host::lifecycle::stop_noted() {
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
                            crate::host::lifecycle::note_stop(s);
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

    /// Runs one decision of the deletion guard with what it acts through: its own state and,
    /// lent for the call, the backend, the policy in force and the sinks.
    pub(crate) fn with_deletion<R>(
        &mut self,
        f: impl FnOnce(&mut crate::guards::deletion::Guard, &mut crate::guards::deletion::Ctx<'_>) -> R,
    ) -> R {
        let mut cx = crate::guards::deletion::Ctx {
            host: &self.host,
            tier: self.tier,
            policy: &self.policy,
            backend: &mut self.backend,
            sink: &mut self.sink,
        };
        f(&mut self.deletion, &mut cx)
    }
    pub(crate) fn drain_events(&mut self) {
        let (events, shutdowns) = self.backend.drain();
        if let Backend::Bpf { sensor, .. } = &mut self.backend {
            for ev in &shutdowns {
                self.shutdown.on_event(ev, sensor, &mut self.sink);
            }
        }
        for ev in events {
            self.with_deletion(|g, cx| g.on_event(cx, &ev));
        }
    }

    pub(crate) fn reload(&mut self, why: &str) {
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

    pub(crate) fn tier_degraded(&mut self, msg: String) {
        eprintln!("guardrail: {msg}");
        self.sink.agent_event("tier_degraded", &msg);
    }

    pub(crate) fn tick(&mut self) {
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
        self.drain_events();
        self.with_deletion(|g, cx| g.adopt_unrecorded(cx));
        self.check_map_fill();
        let expired: Vec<u64> = self
            .deletion
            .holds
            .iter()
            .filter(|(_, h)| h.since.elapsed() >= h.timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let _ =
                self.with_deletion(|g, cx| g.deny(cx, id, Outcome::TimedOut, "hold timeout", None));
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
                if !procinfo::pgid_alive(key.pgid)
                    && !self.deletion.holds.values().any(|h| h.key == key)
                {
                    let _ = self.backend.remove_job(&key);
                    self.deletion
                        .kernel_jobs
                        .blocked_reported
                        .remove(&job.incident);
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
        self.deletion
            .approvals
            .retain(|k| procinfo::pgid_alive(k.pgid));
        // Held jobs whose processes all ended are closed.
        let ended: Vec<u64> = self
            .deletion
            .holds
            .iter()
            .filter(|(_, h)| !procinfo::pgid_alive(h.key.pgid))
            .map(|(id, _)| *id)
            .collect();
        for id in ended {
            if let Some(h) = self.deletion.holds.remove(&id) {
                let mut inc = h.incident;
                inc.outcome = Outcome::Ended;
                self.sink.incident(&inc);
            }
        }
    }
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
