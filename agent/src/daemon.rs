//! `guardrail agent`: loads the policy, probes the kernel, attaches the tier's programs, and then
//! waits on four things: kernel events (state changes only), admin requests on the socket,
//! signals, and a one-second tick for hold timeouts.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{AsFd, AsRawFd},
        unix::{fs::PermissionsExt, net::UnixListener},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use guardrail_common::{
    ALLOWANCE_UNLIMITED, EV_BUDGET_CROSSED, EV_DATA_DIR, EV_HELD_RETRY, EV_PROTECTED_ROOT,
    EVF_AUDIT, EVF_SIGNALLED, EVF_TRACEPOINT, Event, JOB_ACTIVE, JOB_BLOCKED, JOB_DENIED, JOB_HELD,
    JobKey, JobState,
};
use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        signal::{SigSet, Signal, killpg},
        signalfd::{SfdFlags, SignalFd},
    },
    unistd::Pid,
};

use crate::{
    btf,
    events::{self, Incident},
    ipc::{HoldInfo, Request, Response, StatusInfo},
    policy_glue::{LoadedPolicy, PolicySource},
    probe::{self, Tier},
    procinfo,
    sensor::Sensor,
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
    #[arg(long, value_parser = ["auto", "lsm", "tracepoint"], default_value = "auto")]
    pub tier: String,
    /// JSON lines event log (default from the policy's [alerts.event_log]).
    #[arg(long)]
    pub event_log: Option<PathBuf>,
}

struct Hold {
    incident: Incident,
    key: JobKey,
    since: Instant,
    timeout: Duration,
}

struct Agent {
    host: String,
    tier: Tier,
    why: String,
    sensor: Sensor,
    policy: LoadedPolicy,
    source: PolicySource,
    last_reload_error: Option<String>,
    holds: BTreeMap<u64, Hold>,
    sink: events::Sink,
    shutdown: crate::shutdown::Guard,
}

pub fn run(args: AgentArgs) -> Result<()> {
    let host = procinfo::hostname();
    let source = PolicySource::from_args(args.policy.as_deref(), args.policy_dir.as_deref());
    let policy = source.load().map_err(|report| {
        eprintln!("{report}");
        anyhow::anyhow!(
            "the policy {} has errors; refusing to start without a valid policy",
            source.describe()
        )
    })?;
    crate::mount_kernel_filesystems();
    let offsets = btf::resolve_offsets(Path::new(btf::VMLINUX_BTF)).map(|mut o| {
        o.io_uring_opcode = btf::io_uring_opcode_offset().unwrap_or(0);
        o
    });
    let report = probe::probe(offsets.as_ref().ok());
    let tier = match args.tier.as_str() {
        "lsm" => Tier::Lsm,
        "tracepoint" => Tier::Tracepoint,
        _ => report.tier,
    };
    let why = if args.tier == "auto" {
        report.why()
    } else {
        format!("forced by --tier {}; probe: {}", args.tier, report.why())
    };
    if tier == Tier::Userspace {
        bail!(
            "no BPF enforcement is possible on this kernel ({why}); the userspace last resort is not implemented yet"
        );
    }
    let offsets = offsets.context("resolving kernel struct offsets from BTF")?;
    let mut sensor = Sensor::new(&offsets)?;
    // The policy is in the maps before any program is attached: there is no moment with
    // programs running and no policy.
    sensor.install_policy(&policy.kernel)?;
    let mut shutdown = crate::shutdown::Guard::new(&host, tier, &policy);
    shutdown.install(&mut sensor, &policy)?;
    sensor.attach(tier)?;
    for prog in shutdown.attach(&mut sensor, tier)? {
        sensor.note_attached(prog);
    }
    let sink = events::Sink::new(&policy, args.event_log.clone(), &host)?;
    let mut agent = Agent {
        host,
        tier,
        why,
        sensor,
        policy,
        source,
        last_reload_error: None,
        holds: BTreeMap::new(),
        sink,
        shutdown,
    };
    agent.announce();
    let socket = crate::ipc::socket_path(args.socket.as_deref());
    let result = agent.serve(&socket);
    let _ = std::fs::remove_file(&socket);
    // Dropping the sensor detaches every program and frees the maps.
    agent.sink.agent_event(
        "agent_stopped",
        "guardrail agent stopped; programs detached",
    );
    println!("guardrail: stopped; all programs detached");
    result
}

impl Agent {
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
        println!("guardrail: attached {}", self.sensor.attached().join(", "));
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
        // Any local user may ask for status; approve and deny check the caller is root.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
        listener.set_nonblocking(true)?;

        let mut mask = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            mask.add(s);
        }
        mask.thread_block()?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK)?;
        let mut ring = self.sensor.take_events()?;
        let mut watcher = crate::policy_glue::Watcher::new(&self.source)?;
        println!("guardrail: ready, listening on {}", socket.display());
        crate::notify_ready();

        let mut last_tick = Instant::now();
        loop {
            let (ring_ready, sock_ready, sig_ready, watch_ready, sessions_ready) = {
                let mut fds = vec![
                    PollFd::new(ring.as_fd(), PollFlags::POLLIN),
                    PollFd::new(listener.as_fd(), PollFlags::POLLIN),
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
                while let Some(item) = ring.next() {
                    if let Some(ev) = crate::shutdown::parse_event(&item) {
                        drop(item);
                        self.shutdown
                            .on_event(&ev, &mut self.sensor, &mut self.sink);
                        continue;
                    }
                    if item.len() >= std::mem::size_of::<Event>() {
                        // SAFETY: the kernel wrote a whole `Event` (same #[repr(C)] layout, checked by
                        // the layout tests); read_unaligned copes with the ring buffer's alignment.
                        let ev: Event =
                            unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
                        drop(item);
                        self.on_event(&ev);
                    }
                }
            }
            if sock_ready {
                while let Ok((stream, _)) = listener.accept() {
                    if let Err(e) = self.on_client(stream) {
                        log::warn!("admin request failed: {e:#}");
                    }
                }
            }
            if sig_ready {
                while let Ok(Some(info)) = signals.read_signal() {
                    match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGHUP) => {
                            self.reload("SIGHUP");
                            self.sink.reopen();
                        }
                        Ok(s) => {
                            println!("guardrail: {s} received, detaching");
                            return Ok(());
                        }
                        Err(_) => {}
                    }
                }
            }
            if watch_ready
                && let Some(w) = watcher.as_mut()
                && w.changed()
            {
                self.reload("policy file changed");
            }
            if sessions_ready {
                self.shutdown.tick(&mut self.sensor, true);
            }
            if last_tick.elapsed() >= Duration::from_millis(500) {
                last_tick = Instant::now();
                self.tick();
            }
        }
    }

    fn reload(&mut self, why: &str) {
        match self.source.load() {
            Ok(new) => match self.sensor.install_policy(&new.kernel) {
                Ok(()) => {
                    if let Err(e) = self.shutdown.install(&mut self.sensor, &new) {
                        eprintln!("guardrail: shutdown tables not updated: {e:#}");
                    }
                    println!("guardrail: policy reloaded ({why}): {}", new.summary());
                    self.sink.agent_event(
                        "policy_reloaded",
                        &format!("policy reloaded ({why}): {}", new.summary()),
                    );
                    self.policy = new;
                    self.last_reload_error = None;
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
            EV_BUDGET_CROSSED => {
                let key = JobKey {
                    sid: ev.sid,
                    pgid: ev.pgid,
                };
                let state = self
                    .sensor
                    .job(&key)
                    .ok()
                    .flatten()
                    .map(|j| j.state)
                    .unwrap_or(JOB_HELD);
                if state == JOB_BLOCKED {
                    inc.outcome = if self.tier == Tier::Lsm {
                        "refused".into()
                    } else {
                        "killed".into()
                    };
                    self.sink.incident(&inc);
                    return;
                }
                inc.outcome = "held".into();
                self.hold(inc, key);
            }
            EV_PROTECTED_ROOT | EV_DATA_DIR => {
                if ev.flags & EVF_AUDIT != 0 {
                    inc.outcome = "would_have_refused".into();
                    self.sink.incident(&inc);
                } else if ev.flags & EVF_TRACEPOINT != 0 && ev.flags & EVF_SIGNALLED != 0 {
                    // The tracepoint tier could not refuse: the job was stopped right after.
                    let key = JobKey {
                        sid: ev.sid,
                        pgid: ev.pgid,
                    };
                    inc.id = self.next_local_incident();
                    inc.outcome = "held".into();
                    let mut job = self.sensor.job(&key).ok().flatten().unwrap_or_default();
                    job.state = JOB_HELD;
                    job.incident = inc.id;
                    let _ = self.sensor.set_job(&key, &job);
                    self.hold(inc, key);
                } else {
                    inc.outcome = "refused".into();
                    self.sink.incident(&inc);
                }
            }
            EV_HELD_RETRY => {
                // A held job was resumed without approval and tried again: the kernel re-stopped
                // the task, we re-stop the whole job.
                let _ = killpg(Pid::from_raw(ev.pgid as i32), Signal::SIGSTOP);
                if let Some(h) = self
                    .holds
                    .values_mut()
                    .find(|h| h.key.pgid == ev.pgid && h.key.sid == ev.sid)
                {
                    h.incident.retries = ev.count;
                }
            }
            _ => {}
        }
    }

    fn next_local_incident(&mut self) -> u64 {
        // Incidents from the kernel count up from 1; ones the agent makes for tracepoint-tier
        // protected paths take the kernel counter too, so ids never collide.
        let mut cfg_id = 0;
        if let Some(m) = self.sensor.ebpf_mut().map_mut("INCIDENTS")
            && let Ok(mut a) = aya::maps::Array::<_, u64>::try_from(m)
        {
            cfg_id = a.get(&0, 0).unwrap_or(0) + 1;
            let _ = a.set(0, cfg_id, 0);
        }
        cfg_id
    }

    fn hold(&mut self, inc: Incident, key: JobKey) {
        // Stop the whole job, not only the task the kernel signalled.
        let _ = killpg(Pid::from_raw(key.pgid as i32), Signal::SIGSTOP);
        let timeout = self.policy.hold_timeout;
        let msg = format!(
            "\r\nguardrail: held job \"{}\" on {}: {}. Incident {}.\r\n  To let it continue: guardrail approve {}\r\n  To end it:          guardrail deny {}\r\n",
            inc.command, self.host, inc.reason, inc.id, inc.id, inc.id
        );
        procinfo::tell_job(inc.pid, &msg);
        self.sink.incident(&inc);
        println!(
            "guardrail: incident {} held: {} ({})",
            inc.id, inc.command, inc.reason
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

    fn tick(&mut self) {
        self.shutdown.tick(&mut self.sensor, false);
        let expired: Vec<u64> = self
            .holds
            .iter()
            .filter(|(_, h)| h.since.elapsed() >= h.timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let _ = self.deny(id, "timed_out", "hold timeout");
        }
        // Jobs whose process group is gone: forget them, so a recycled pgid starts afresh.
        if let Ok(jobs) = self.sensor.jobs() {
            for (key, _) in jobs {
                if !procinfo::pgid_alive(key.pgid) && !self.holds.values().any(|h| h.key == key) {
                    let _ = self.sensor.remove_job(&key);
                }
            }
        }
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

    fn approve(&mut self, id: u64, budget: Option<u64>, for_job: bool, by: u32) -> Result<String> {
        let Some(h) = self.holds.remove(&id) else {
            bail!("no open hold with id {id} (see `guardrail status`)")
        };
        let mut job = self.sensor.job(&h.key)?.unwrap_or(JobState {
            state: JOB_HELD,
            ..Default::default()
        });
        let extra = if for_job {
            ALLOWANCE_UNLIMITED
        } else {
            budget.unwrap_or_else(|| self.policy.rule_budget(job.rule).max(1))
        };
        job.allowance = job.allowance.saturating_add(extra).min(ALLOWANCE_UNLIMITED);
        // The budget counts again from here; what it did before the hold was approved.
        job.count = 0;
        job.prev_count = 0;
        job.incident = 0;
        job.state = JOB_ACTIVE;
        self.sensor.set_job(&h.key, &job)?;
        let _ = killpg(Pid::from_raw(h.key.pgid as i32), Signal::SIGCONT);
        let mut inc = h.incident;
        inc.outcome = "approved".into();
        inc.decided_by = Some(by);
        self.sink.incident(&inc);
        let how = if for_job {
            "for the rest of the job".to_string()
        } else {
            format!("for {extra} more deletions")
        };
        Ok(format!(
            "approved incident {id} on {} {how}; job {} resumed",
            self.host, h.key.pgid
        ))
    }

    fn deny(&mut self, id: u64, outcome: &str, by: &str) -> Result<String> {
        let Some(h) = self.holds.remove(&id) else {
            bail!("no open hold with id {id} (see `guardrail status`)")
        };
        let mut job = self.sensor.job(&h.key)?.unwrap_or_default();
        job.state = JOB_DENIED;
        self.sensor.set_job(&h.key, &job)?;
        let pg = Pid::from_raw(h.key.pgid as i32);
        let kill_it = self.policy.deny_kills || self.tier != Tier::Lsm;
        if kill_it {
            let _ = killpg(pg, Signal::SIGKILL);
        } else {
            // Keep refusing in the kernel while it runs on.
            let _ = killpg(pg, Signal::SIGCONT);
        }
        let mut inc = h.incident;
        inc.outcome = outcome.into();
        inc.decided_by_text = Some(by.to_string());
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

    fn hold_infos(&self) -> Vec<HoldInfo> {
        self.holds
            .values()
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
            })
            .collect()
    }

    fn on_client(&mut self, stream: std::os::unix::net::UnixStream) -> Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let cred =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        let resp = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
            Ok(req) => self.answer(req, cred.uid(), cred.pid()),
        };
        let mut out = serde_json::to_string(&resp)?;
        out.push('\n');
        (&stream).write_all(out.as_bytes())?;
        Ok(())
    }

    fn answer(&mut self, req: Request, uid: u32, pid: i32) -> Response {
        let admin_only = matches!(
            req,
            Request::Approve { .. } | Request::Deny { .. } | Request::Reload
        );
        if admin_only && uid != 0 {
            return Response::Error {
                message: "only root may approve, deny or reload (try sudo)".into(),
            };
        }
        let result = match req {
            Request::Status => return Response::Status(Box::new(self.status())),
            Request::Holds => {
                return Response::Holds {
                    holds: self.hold_infos(),
                };
            }
            Request::Approve {
                id,
                budget,
                for_job,
            } => self.approve(id, budget, for_job, uid),
            Request::Deny { id } => self.deny(id, "denied", &format!("uid {uid}")),
            Request::Confirm { host, session } => {
                self.shutdown
                    .confirm(&host, session, pid, uid, &mut self.sensor, &mut self.sink)
            }
            Request::Reload => {
                self.reload("guardrail reload");
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

    fn status(&self) -> StatusInfo {
        let on_disk = self.source.fingerprint_on_disk();
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
            attached: self
                .sensor
                .attached()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            holds: self.hold_infos(),
        }
    }
}

// Silence "unused" for states only read through the kernel.
const _: [u32; 2] = [JOB_ACTIVE, JOB_DENIED];
const _: fn(&dyn AsRawFd) = |_| {};
