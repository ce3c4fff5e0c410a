//! The remote-shutdown guard, agent side: fills the kernel's shutdown tables from the policy,
//! classifies sessions and pushes their classes, turns the kernel's decisions into messages and
//! incidents, and grants confirmation passes (`guardrail confirm HOST`).
//!
//! The kernel decides alone (ebpf/guardrail-ebpf/src/shutdown.rs); the agent is never asked
//! during a request. What it adds is words: the refusal message on the requester's terminal and
//! the incident for the alert pipeline.
pub mod inhibit;
mod request;
mod tables;

use std::{
    collections::HashMap,
    os::fd::{AsFd, BorrowedFd},
    os::unix::fs::MetadataExt,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf,
    maps::{Array, HashMap as BpfHashMap},
};
use guardrail_common::*;
use guardrail_policy as gp;
use inotify::{Inotify, WatchMask};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    host::{
        procinfo,
        session::{self, Class, Origin},
    },
    incident::{Incident, Kind, Outcome, now_rfc3339},
    policy::LoadedPolicy,
    sinks::Sink,
    text,
    tiers::{probe::Tier, sensor::Sensor},
};
use guardrail_policy::cgroup2_root;
use inhibit::Inhibitor;
use request::{op_name, request_text, session_of, session_text, stat_of, state_of};
use tables::inhibitor_want;

/// How long the process that used a pass may finish its own request (`poweroff` execs, then
/// calls reboot(2)).
const CLEARED: Duration = Duration::from_secs(10);
/// How long start-up and reloads wait for logind to grant the inhibitor (emulated machines are
/// slow; a later success is picked up by tick()).
const INHIBIT_TAKE_WAIT: Duration = Duration::from_secs(10);

/// How far ahead each tick (every 500 ms) promises the kernel that an agent is running to write
/// refusal messages (`ShutdownConfig::alive_until_ns`). Long enough for a busy main loop, short
/// enough that after a crash refused callers are not stopped for long.
const ALIVE_FOR: Duration = Duration::from_secs(5);

// Pass expiries are compared with bpf_ktime_get_ns() (CLOCK_MONOTONIC) in the kernel.
use crate::host::clock::monotonic_ns;

/// A confirmation window as the message says it ("2 minutes").
pub fn window_text(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        60 => "1 minute".to_string(),
        s if s % 60 == 0 => format!("{} minutes", s / 60),
        1 => "1 second".to_string(),
        s => format!("{s} seconds"),
    }
}

pub struct Guard {
    host: String,
    tier: Tier,
    policy: gp::Shutdown,
    audit: bool,
    /// Classes pushed into the kernel, by audit session id.
    known: HashMap<u32, Origin>,
    inotify: Option<Inotify>,
    last_scan: std::time::Instant,
    /// Process groups of callers that may have stopped themselves in sympathy with the task the
    /// kernel stopped (sudo suspends itself when its command stops), with when to give up.
    resume: Vec<(u32, std::time::Instant)>,
    /// logind's block lock on shutdown, for requests sent to logind over D-Bus (no exec).
    inhibitor: Inhibitor,
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

impl Guard {
    pub fn new(host: &str, tier: Tier, policy: &LoadedPolicy) -> Guard {
        let inotify = Inotify::init().ok().inspect(|i| {
            // Logins appear here before their first command (sshd writes utmp for a pty; logind
            // creates its session file).
            let _ = i
                .watches()
                .add(session::UTMP, WatchMask::MODIFY | WatchMask::CLOSE_WRITE);
            let _ = i.watches().add(
                session::LOGIND_SESSIONS,
                WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::CLOSE_WRITE,
            );
        });
        Guard {
            host: host.to_string(),
            tier,
            policy: policy.policy.shutdown.clone(),
            audit: policy.policy.mode == gp::Mode::Audit,
            known: HashMap::new(),
            inotify,
            last_scan: std::time::Instant::now(),
            resume: Vec::new(),
            inhibitor: Inhibitor::new(),
        }
    }

    /// `guardrail status`'s line on the logind inhibitor.
    pub fn inhibitor_status(&self) -> String {
        self.inhibitor.status()
    }

    pub fn inotify_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inotify.as_ref().map(|i| i.as_fd())
    }

    /// Writes the policy's shutdown tables; called before attach and on every reload.
    pub fn install(&mut self, sensor: &mut Sensor, policy: &LoadedPolicy) -> Result<()> {
        self.policy = policy.policy.shutdown.clone();
        self.audit = policy.policy.mode == gp::Mode::Audit;
        let ebpf = sensor.ebpf_mut();
        {
            let mut m: BpfHashMap<_, u64, u32> = BpfHashMap::try_from(
                ebpf.map_mut("SD_WORDS")
                    .ok_or_else(|| anyhow!("no SD_WORDS"))?,
            )?;
            for (h, f) in &policy.shutdown_tables.words {
                m.insert(h, f, 0)?;
            }
        }
        {
            let mut m: BpfHashMap<_, FileId, u32> = BpfHashMap::try_from(
                ebpf.map_mut("SD_EXES")
                    .ok_or_else(|| anyhow!("no SD_EXES"))?,
            )?;
            let old: Vec<FileId> = m.keys().filter_map(|k| k.ok()).collect();
            for k in old {
                let _ = m.remove(&k);
            }
            for (id, kind, _) in &policy.shutdown_tables.exes {
                m.insert(id, kind, 0).context("writing SD_EXES")?;
            }
        }
        {
            let mut m: BpfHashMap<_, FileId, u32> = BpfHashMap::try_from(
                ebpf.map_mut("SD_EXCEPT_EXES")
                    .ok_or_else(|| anyhow!("no SD_EXCEPT_EXES"))?,
            )?;
            let old: Vec<FileId> = m.keys().filter_map(|k| k.ok()).collect();
            for k in old {
                let _ = m.remove(&k);
            }
            for id in &policy.shutdown_tables.except_exes {
                m.insert(id, 1, 0)?;
            }
        }
        self.refresh_exception_units(sensor);
        let cfg = ShutdownConfig {
            action: policy.shutdown_tables.class_actions,
            enabled: 1,
            mode: if self.audit { MODE_AUDIT } else { MODE_ENFORCE },
            agent_tgid: std::process::id(),
            sysrq_ino: std::fs::metadata("/proc/sysrq-trigger")
                .map(|m| m.ino() as u32)
                .unwrap_or(0),
            cleared_ns: CLEARED.as_nanos() as u64,
            alive_until_ns: monotonic_ns() + ALIVE_FOR.as_nanos() as u64,
            agent_start_lo: crate::host::identity::own_start_range().0,
            agent_start_hi: crate::host::identity::own_start_range().1,
        };
        let mut a: Array<_, ShutdownConfig> = Array::try_from(
            sensor
                .ebpf_mut()
                .map_mut("SD_CONFIG")
                .ok_or_else(|| anyhow!("no SD_CONFIG"))?,
        )?;
        a.set(0, cfg, 0)?;
        // Serial consoles may map differently now: push every known session again (overwriting,
        // never removing, so no session is unclassified for a moment).
        let known: Vec<(u32, Origin)> = self.known.drain().collect();
        for (s, o) in known {
            self.push(sensor, s, o);
        }
        self.scan(sensor);
        // Taken before READY=1 at start-up, so a started unit means a held lock where logind
        // runs; a failure is reported in `guardrail status` and retried by tick().
        self.inhibitor.set_want(inhibitor_want(
            &self.policy,
            &policy.shutdown_tables.class_actions,
            self.audit,
            &self.host,
        ));
        self.inhibitor.take_now(INHIBIT_TAKE_WAIT);
        Ok(())
    }

    /// Renews the promise that an agent answers refused callers for the next [`ALIVE_FOR`]: at
    /// ready (loading the programs can take longer than that under emulation) and every tick.
    pub fn promise_to_answer(&self, sensor: &mut Sensor) {
        self.set_alive_until(sensor, monotonic_ns() + ALIVE_FOR.as_nanos() as u64);
    }

    /// Tells the pinned programs until when an agent will answer their events; `0` when this
    /// agent exits and leaves them enforcing.
    pub fn set_alive_until(&self, sensor: &mut Sensor, until_ns: u64) {
        if let Some(m) = sensor.ebpf_mut().map_mut("SD_CONFIG")
            && let Ok(mut a) = Array::<_, ShutdownConfig>::try_from(m)
            && let Ok(mut cfg) = a.get(&0, 0)
        {
            cfg.alive_until_ns = until_ns;
            if until_ns == 0 {
                // The agent is going: its pid exempts nobody from now on.
                cfg.agent_tgid = 0;
                cfg.agent_start_lo = 0;
                cfg.agent_start_hi = 0;
            }
            let _ = a.set(0, cfg, 0);
        }
    }

    /// Unit exceptions are matched by the unit's cgroup, which exists only while it runs.
    fn refresh_exception_units(&self, sensor: &mut Sensor) {
        let root = cgroup2_root();
        let ids: Vec<u64> = self
            .policy
            .exceptions
            .iter()
            .flat_map(|e| e.units.iter())
            .flat_map(|u| [root.join("system.slice").join(u), root.join(u)])
            .filter_map(|p| std::fs::metadata(p).ok().map(|m| m.ino()))
            .collect();
        if let Some(m) = sensor.ebpf_mut().map_mut("SD_EXCEPT_CGROUPS")
            && let Ok(mut m) = BpfHashMap::<_, u64, u32>::try_from(m)
        {
            let old: Vec<u64> = m.keys().filter_map(|k| k.ok()).collect();
            for k in old.iter().filter(|k| !ids.contains(k)) {
                let _ = m.remove(k);
            }
            for id in ids {
                let _ = m.insert(id, 1, 0);
            }
        }
    }

    /// Loads and attaches the shutdown programs of `tier` through the sensor, so they are pinned
    /// (and survive an agent restart) with the deletion hooks.
    pub fn attach(&self, sensor: &mut Sensor, tier: Tier) -> Result<()> {
        sensor.attach_tracepoint("sd_execve", "syscalls", "sys_enter_execve")?;
        sensor.attach_tracepoint("sd_execveat", "syscalls", "sys_enter_execveat")?;
        sensor.attach_tracepoint("sd_execve_exit", "syscalls", "sys_exit_execve")?;
        sensor.attach_tracepoint("sd_execveat_exit", "syscalls", "sys_exit_execveat")?;
        match tier {
            Tier::Lsm => {
                let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
                for (prog, hook) in [
                    ("sd_bprm_check", "bprm_check_security"),
                    ("sd_capable", "capable"),
                    ("sd_file_open", "file_open"),
                    ("sd_task_kill", "task_kill"),
                ] {
                    sensor.attach_lsm(prog, hook, &btf)?;
                }
                sensor.attach_raw_tracepoint("sd_exec_done", "sched_process_exec")?;
            }
            Tier::FModRet => {
                let btf = Btf::from_sys_fs().context("reading kernel BTF")?;
                for (prog, func) in [
                    ("fm_bprm_check", "security_bprm_check"),
                    ("fm_capable", "security_capable"),
                    ("fm_file_open", "security_file_open"),
                    ("fm_task_kill", "security_task_kill"),
                ] {
                    sensor.attach_fmodret(prog, func, &btf)?;
                }
                sensor.attach_raw_tracepoint("sd_exec_done", "sched_process_exec")?;
            }
            Tier::Tracepoint => sensor.attach_raw_tracepoint("sd_exec_tp", "sched_process_exec")?,
            Tier::Userspace => {}
        }
        Ok(())
    }

    fn push(&mut self, sensor: &mut Sensor, session: u32, origin: Origin) {
        let class = match origin.class {
            Class::Local => SD_CLASS_LOCAL,
            Class::Remote => SD_CLASS_REMOTE,
            Class::None => SD_CLASS_NONE,
            Class::Serial => match self.policy.serial_console {
                gp::SessionClass::Remote => SD_CLASS_REMOTE,
                _ => SD_CLASS_LOCAL,
            },
        };
        if let Some(m) = sensor.ebpf_mut().map_mut("SD_SESSIONS")
            && let Ok(mut m) = BpfHashMap::<_, u32, u32>::try_from(m)
        {
            let _ = m.insert(session, class, 0);
        }
        // The description carries an address from the session's environment: the user's text.
        println!(
            "guardrail: session {session} is {} ({})",
            origin.class.name(),
            text::cap(&origin.describe(), 256)
        );
        self.known.insert(session, origin);
    }

    /// The sessions classified so far, by id.
    pub fn sessions(&self) -> Vec<crate::control::ipc::SessionInfo> {
        let mut v: Vec<crate::control::ipc::SessionInfo> = self
            .known
            .iter()
            .map(|(id, o)| crate::control::ipc::SessionInfo {
                id: *id,
                class: o.class.name().to_string(),
                origin: o.describe(),
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Classifies `session` remote in the kernel only (no log line, not remembered): for
    /// `guardrail selftest`, whose forged session no classifier would call remote.
    pub fn mark_remote_quietly(&self, sensor: &mut Sensor, session: u32) -> Result<()> {
        let m = sensor
            .ebpf_mut()
            .map_mut("SD_SESSIONS")
            .ok_or_else(|| anyhow!("no SD_SESSIONS"))?;
        BpfHashMap::<_, u32, u32>::try_from(m)?.insert(session, SD_CLASS_REMOTE, 0)?;
        Ok(())
    }

    fn forget(&mut self, sensor: &mut Sensor, session: u32) {
        self.known.remove(&session);
        if let Some(m) = sensor.ebpf_mut().map_mut("SD_SESSIONS")
            && let Ok(mut m) = BpfHashMap::<_, u32, u32>::try_from(m)
        {
            let _ = m.remove(&session);
        }
    }

    /// Classifies every live session not classified yet; forgets ended ones.
    pub fn scan(&mut self, sensor: &mut Sensor) {
        self.last_scan = std::time::Instant::now();
        let live = session::live_sessions();
        let ended: Vec<u32> = self
            .known
            .keys()
            .filter(|s| !live.contains_key(s))
            .copied()
            .collect();
        for s in ended {
            self.forget(sensor, s);
        }
        for (s, pids) in &live {
            if !self.known.contains_key(s)
                && let Some(o) = session::classify(*s, pids)
            {
                self.push(sensor, *s, o);
            }
        }
    }

    /// The kernel's SIGSTOP is only meant to hold the refused task while the agent writes to its
    /// terminal, but a caller that waits with WUNTRACED (sudo, with or without its own pty) sees
    /// the stop and suspends itself and its process group. For a few seconds after a refusal,
    /// continue the caller's process group if it stopped.
    fn resume_callers(&mut self) {
        let now = std::time::Instant::now();
        self.resume.retain(|(_, until)| *until > now);
        for (pgid, _) in &self.resume {
            let stopped = procinfo::pids_in_group(*pgid)
                .iter()
                .any(|p| state_of(*p).is_some_and(|c| c == 'T'));
            if stopped {
                let _ = nix::sys::signal::killpg(Pid::from_raw(*pgid as i32), Signal::SIGCONT);
            }
        }
    }

    /// Periodic work: drain inotify, rescan sessions, refresh unit exceptions, keep the logind
    /// inhibitor as wanted.
    pub fn tick(&mut self, sensor: &mut Sensor, woken: bool) {
        self.promise_to_answer(sensor);
        if !self.resume.is_empty() {
            self.resume_callers();
        }
        self.inhibitor.tick();
        if let Some(i) = self.inotify.as_mut() {
            let mut buf = [0u8; 4096];
            while let Ok(mut evs) = i.read_events(&mut buf) {
                if evs.next().is_none() {
                    break;
                }
            }
        }
        if woken || self.last_scan.elapsed() >= Duration::from_secs(1) {
            self.scan(sensor);
            self.refresh_exception_units(sensor);
            prune_passes(sensor, monotonic_ns());
        }
    }

    /// What the kernel reported: a new session id, or a decision.
    pub fn on_event(&mut self, ev: &ShutdownEvent, sensor: &mut Sensor, sink: &mut Sink) {
        let session = ev.audit_session;
        if session != AUDIT_SESSION_UNSET && !self.known.contains_key(&session) {
            let pids = session::live_sessions()
                .remove(&session)
                .unwrap_or_default();
            if let Some(o) = session::classify(session, &pids) {
                self.push(sensor, session, o);
            }
        }
        if ev.op == 0 {
            return;
        }
        if ev.outcome == SD_OUT_CONFIRMED {
            // The pass is spent; its request may still be on its way to logind.
            self.inhibitor.pass_used(session, CLEARED);
        }
        self.refine_host(session);
        let origin = self.origin(session);
        let (cmd, verb) = request_text(ev);
        let class_name = match ev.class {
            SD_CLASS_LOCAL => "local",
            SD_CLASS_REMOTE => "remote",
            SD_CLASS_NONE => "none",
            _ => "unknown",
        };
        let outcome = match ev.outcome {
            SD_OUT_REFUSED => Outcome::Refused,
            SD_OUT_STOPPED => Outcome::Killed,
            SD_OUT_CONFIRMED => Outcome::Confirmed,
            SD_OUT_WOULD_REFUSE => Outcome::WouldHaveRefused,
            _ if ev.exception != 0 => Outcome::AllowedByException,
            _ => Outcome::Allowed,
        };
        let reason = format!(
            "shutdown request \"{cmd}\" judged as class {class_name} ({}, session {}): {outcome}",
            origin.describe(),
            session_text(session)
        );
        // Recorded while the task still exists (its terminal is read from /proc) and before the
        // caller can see the outcome.
        let mut inc = self.incident(ev, Kind::Shutdown, outcome, &reason, &cmd, sensor);
        inc.op = op_name(ev.op).to_string();
        sink.incident(&inc);
        if !matches!(ev.outcome, SD_OUT_REFUSED | SD_OUT_STOPPED) {
            return;
        }
        forget_stopped(sensor, ev.tgid);
        let msg = self.refusal_message(&cmd, &verb, session, ev.action, class_name);
        // The kernel stopped the task: it still holds its terminal and stderr.
        // The task is killed or continued right after: the message must be on its terminal
        // first.
        crate::guards::tell::tell_job_and_wait(
            ev.tgid,
            std::slice::from_ref(&msg),
            Duration::from_millis(500),
        );
        println!("{}", text::escape_line(&msg));
        let pid = Pid::from_raw(ev.tgid as i32);
        if ev.outcome == SD_OUT_STOPPED {
            // Tracepoint tier: the program was loaded but never ran; it must not.
            let _ = kill(pid, Signal::SIGKILL);
        } else {
            // LSM and fmodret tiers: the request already failed with EPERM; let the caller
            // report it.
            let _ = kill(pid, Signal::SIGCONT);
        }
        // The callers up the tree, within the same audit session: sudo's pty monitor is the
        // parent, sudo itself (which suspends) the grandparent.
        let until = std::time::Instant::now() + Duration::from_secs(3);
        let mut p = ev.ppid;
        for _ in 0..4 {
            let Some((_, ppid, pgid)) = stat_of(p) else {
                break;
            };
            if p <= 1 || session_of(p) != Some(ev.audit_session) {
                break;
            }
            if pgid > 1 && !self.resume.iter().any(|(g, _)| *g == pgid) {
                self.resume.push((pgid, until));
            }
            p = ppid;
        }
        self.resume_callers();
    }

    /// Answers callers that pinned programs stopped while no agent read their events (the previous
    /// agent crashed or was restarting): message, incident, then kill or continue, as if the
    /// event had just arrived. Entries whose process is gone or running are dropped.
    pub fn adopt_stopped(&mut self, sensor: &mut Sensor, sink: &mut Sink) -> usize {
        let entries: Vec<(u32, ShutdownEvent)> = match stopped_map(sensor) {
            Some(m) => m.iter().filter_map(|r| r.ok()).collect(),
            None => return 0,
        };
        let mut answered = 0;
        for (tgid, ev) in entries {
            // The same task, still waiting: stopped, with the command name the kernel saw (a
            // reused pid would have to be stopped and have the same name to be mistaken).
            let waiting = state_of(tgid) == Some('T')
                && std::fs::read(format!("/proc/{tgid}/comm")).is_ok_and(|c| {
                    c.strip_suffix(b"\n").unwrap_or(&c) == cstr(&ev.comm).as_bytes()
                });
            if waiting {
                self.on_event(&ev, sensor, sink);
                answered += 1;
            }
            forget_stopped(sensor, tgid);
        }
        answered
    }

    /// A remote session classified at its first exec may not have shown its client address yet
    /// (sshd's environment has none; the shell's appears after exec): look again.
    fn refine_host(&mut self, session: u32) {
        let Some(o) = self.known.get(&session) else {
            return;
        };
        if o.class != Class::Remote || o.host.is_some() {
            return;
        }
        let pids = session::live_sessions()
            .remove(&session)
            .unwrap_or_default();
        let host = session::remote_host(&pids);
        if let Some(o) = self.known.get_mut(&session) {
            o.host = host;
        }
    }

    fn origin(&self, session: u32) -> Origin {
        if session == AUDIT_SESSION_UNSET {
            return Origin {
                class: Class::None,
                service: String::new(),
                host: None,
                tty: None,
            };
        }
        self.known.get(&session).cloned().unwrap_or(Origin {
            class: Class::None,
            service: "an unclassified session".to_string(),
            host: None,
            tty: None,
        })
    }

    fn refusal_message(
        &self,
        cmd: &str,
        verb: &str,
        session: u32,
        action: u32,
        class: &str,
    ) -> String {
        let from = match (self.known.get(&session), session) {
            (_, AUDIT_SESSION_UNSET) => "no login session".to_string(),
            (Some(o), s) => format!("{} (session {s})", text::cap(&o.describe(), 256)),
            (None, s) => format!("an unclassified session (session {s})"),
        };
        let h = &self.host;
        let cmd = text::cap_command(cmd);
        if action == SD_BLOCK {
            format!(
                "guardrail: refused \"{cmd}\" on {h}, requested from {from}: the policy blocks shutdowns from {class} sessions."
            )
        } else {
            format!(
                "guardrail: refused \"{cmd}\" on {h}, requested from {from}. To {verb} {h}, run: guardrail confirm {h}, then repeat the command within {}.",
                window_text(self.policy.confirm_window)
            )
        }
    }

    fn incident(
        &self,
        ev: &ShutdownEvent,
        kind: Kind,
        outcome: Outcome,
        reason: &str,
        cmd: &str,
        sensor: &mut Sensor,
    ) -> Incident {
        Incident {
            id: crate::tiers::sensor::next_incident_or_log(sensor),
            time: now_rfc3339(),
            host: self.host.clone(),
            tier: self.tier.to_string(),
            kind,
            rule: "shutdown".to_string(),
            outcome,
            reason: reason.to_string(),
            op: String::new(),
            pid: ev.tgid,
            pgid: 0,
            sid: 0,
            uid: ev.uid,
            user: procinfo::user_name(ev.uid),
            command: cmd.to_string(),
            comm: cstr(&ev.comm),
            cgroup_id: ev.cgroup_id,
            audit_session: Some(ev.audit_session).filter(|s| *s != AUDIT_SESSION_UNSET),
            loginuid: Some(ev.loginuid).filter(|s| *s != u32::MAX),
            tty: procinfo::tty_name(ev.tgid),
            count: 0,
            path: String::new(),
            retries: 0,
            decided_by: None,
            decided_by_text: None,
            tier_gaps: self.tier.gaps().iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// `guardrail confirm NAME` from `caller` (its session found by the kernel, through its
    /// pidfd), which says it runs in audit session `claimed`.
    pub fn confirm(
        &mut self,
        name: &str,
        claimed: u32,
        caller: &crate::control::server::Peer,
        sensor: &mut Sensor,
        sink: &mut Sink,
    ) -> Result<String> {
        let (peer_pid, uid) = (caller.pid, caller.uid);
        if name != self.host {
            bail!(
                "\"{name}\" is not this host's name (this is {}); nothing confirmed",
                self.host
            );
        }
        // Trust the kernel, not the client: the caller's own session id.
        let actual = caller
            .session
            .clone()
            .map_err(|e| anyhow!("{e}; nothing confirmed"))?;
        if actual != claimed {
            bail!("the caller runs in audit session {actual}, not {claimed}; nothing confirmed");
        }
        if actual == AUDIT_SESSION_UNSET {
            bail!("this process has no login session (no audit session id); nothing to confirm");
        }
        let window = self.policy.confirm_window;
        let expiry = monotonic_ns() + window.as_nanos() as u64;
        let mut m: BpfHashMap<_, u32, u64> = BpfHashMap::try_from(
            sensor
                .ebpf_mut()
                .map_mut("SD_PASSES")
                .ok_or_else(|| anyhow!("no SD_PASSES"))?,
        )?;
        m.insert(actual, expiry, 0)
            .context("writing the confirmation pass")?;
        // logind would refuse the confirmed request if it goes through logind (systemd >= 257
        // applies block locks to root too): the lock is off while the pass is open.
        self.inhibitor
            .pass_granted(actual, std::time::Instant::now() + window);
        if !self.known.contains_key(&actual) {
            self.scan(sensor);
        }
        let origin = self.origin(actual);
        let reason = format!(
            "shutdown confirmed by name from session {actual} ({}): one request within {}",
            origin.describe(),
            window_text(window)
        );
        let ev = ShutdownEvent {
            kind: EV_SHUTDOWN,
            op: 0,
            outcome: 0,
            class: 0,
            action: 0,
            exception: 0,
            tgid: peer_pid as u32,
            pid: peer_pid as u32,
            ppid: 0,
            uid,
            loginuid: u32::MAX,
            audit_session: actual,
            signal: 0,
            _pad: 0,
            cgroup_id: 0,
            ktime_ns: 0,
            comm: [0; 16],
            words: [[0; SD_WORD_LEN]; SD_ARGV_WORDS],
        };
        let cmd = procinfo::cmdline(peer_pid as u32).unwrap_or_else(|| "guardrail confirm".into());
        let mut inc = self.incident(
            &ev,
            Kind::ShutdownConfirmation,
            Outcome::Granted,
            &reason,
            &cmd,
            sensor,
        );
        inc.decided_by = Some(uid);
        inc.decided_by_session = Some(actual);
        sink.incident(&inc);
        Ok(format!(
            "confirmed: the next shutdown request from this session (session {actual}) on {} within {} goes through, once",
            self.host,
            window_text(window)
        ))
    }
}

/// Deletes the confirmation passes whose window has passed (unused: a used pass is deleted by
/// the kernel). SD_PASSES is a plain hash map of 1024 entries; without this, 1024 sessions that
/// confirmed and never shut down would fill it and every later confirm would fail.
fn prune_passes(sensor: &mut Sensor, now_ns: u64) -> usize {
    let Some(m) = sensor.ebpf_mut().map_mut("SD_PASSES") else {
        return 0;
    };
    let Ok(mut m) = BpfHashMap::<_, u32, u64>::try_from(m) else {
        return 0;
    };
    let expired: Vec<u32> = m
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, until)| *until <= now_ns)
        .map(|(s, _)| s)
        .collect();
    for s in &expired {
        let _ = m.remove(s);
    }
    expired.len()
}

/// (state, ppid, pgid) from /proc/PID/stat.
fn stopped_map(
    sensor: &mut Sensor,
) -> Option<BpfHashMap<&mut aya::maps::MapData, u32, ShutdownEvent>> {
    let m = sensor.ebpf_mut().map_mut("SD_STOPPED")?;
    BpfHashMap::try_from(m).ok()
}

/// The caller was answered: the next agent must not answer it again.
fn forget_stopped(sensor: &mut Sensor, tgid: u32) {
    if let Some(mut m) = stopped_map(sensor) {
        let _ = m.remove(&tgid);
    }
}
