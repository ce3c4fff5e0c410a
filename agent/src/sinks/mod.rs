//! Forwarding events to the monitoring admins already run: syslog, Prometheus metrics and
//! Alertmanager (the JSON event log is written by `events::Sink` itself).
//!
//! Enforcement never waits for delivery: the kernel has decided before an event exists. The
//! daemon hands each event to [`Alerts::send`], which only updates in-memory counters and offers
//! the event to each destination's bounded queue without blocking. Each destination has its own
//! delivery thread, so a dead Alertmanager cannot delay syslog; a full queue or a delivery that
//! still fails after its retries is counted in `guardrail_events_dropped_total{destination}`.
pub mod alertmanager;
pub mod cli;
pub mod metrics;
#[cfg(test)]
mod props;

pub mod syslog;
pub mod timefmt;

use std::{
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::incident::{Incident, Outcome};
pub use metrics::Metrics;

/// Events waiting per destination before new ones are dropped (and counted). Events are state
/// changes, not deletions, so 256 covers any burst a healthy collector can be late for.
const QUEUE: usize = 256;
/// Delays between delivery attempts of one event; after the last, the event is dropped.
const RETRY_DELAYS: &[Duration] = &[Duration::from_millis(200), Duration::from_millis(1000)];
/// How long a stopping agent waits for its queues to drain: a stop (SIGTERM or SIGINT to exit)
/// takes at most 2 s, detaching included, even while a destination is down and every event
/// waits through its retries.
const DRAIN: Duration = Duration::from_secs(1);

/// Agent life-cycle events: agent_started, agent_stopped, tier_degraded, policy_reloaded,
/// policy_rejected, policy_fallback (a start on the last good policy).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentEvent {
    pub time: String,
    pub host: String,
    pub kind: String,
    pub message: String,
    #[serde(default)]
    pub tier: String,
}

/// One line of the event log: exactly one of the two keys is present.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Record {
    Incident(Box<Incident>),
    Agent(AgentEvent),
}

impl Record {
    pub fn time(&self) -> &str {
        match self {
            Record::Incident(i) => &i.time,
            Record::Agent(a) => &a.time,
        }
    }

    pub fn host(&self) -> &str {
        match self {
            Record::Incident(i) => &i.host,
            Record::Agent(a) => &a.host,
        }
    }

    /// The outcome of an incident or the kind of an agent event: RFC 5424 MSGID, metric label.
    pub fn name(&self) -> &str {
        match self {
            Record::Incident(i) => i.outcome.as_str(),
            Record::Agent(a) => &a.kind,
        }
    }

    pub fn severity(&self) -> Severity {
        match self {
            Record::Incident(i) => match &i.outcome {
                // Someone must act now (approve or deny), or a job was ended.
                Outcome::Held | Outcome::Killed => Severity::Crit,
                // A shutdown request that was let through is worth a line, not a page.
                _ if i.is_shutdown() && i.outcome != Outcome::Refused => Severity::Notice,
                Outcome::Refused
                | Outcome::ShutdownRefused
                | Outcome::TimedOut
                | Outcome::Denied
                | Outcome::EndedOnAgentStop => Severity::Warning,
                Outcome::WouldHaveHeld
                | Outcome::Alerted
                | Outcome::Reported
                | Outcome::WouldHaveRefused
                | Outcome::Approved
                | Outcome::Ended
                | Outcome::ContinuedOnAgentStop
                | Outcome::Confirmed
                | Outcome::Allowed
                | Outcome::AllowedByException
                | Outcome::ShutdownConfirmed
                | Outcome::Granted
                | Outcome::Other(_) => Severity::Notice,
            },
            Record::Agent(a) => match a.kind.as_str() {
                "policy_rejected" | "policy_fallback" | "tier_degraded" => Severity::Err,
                _ => Severity::Info,
            },
        }
    }

    /// The free text of syslog lines and `guardrail events`: complete on its own, since
    /// `tail /var/log/syslog` shows only this part. One line, the job's text escaped and its
    /// long fields capped, so the `guardrail approve N` tail survives any command line.
    pub fn summary(&self) -> String {
        let s = match self {
            Record::Incident(i) => incident_summary(i),
            Record::Agent(a) => a.message.clone(),
        };
        crate::text::escape_line(&s)
    }
}

fn incident_summary(i: &Incident) -> String {
    use crate::text::{REASON_MAX, cap, cap_command};
    // Capped copies of every field a job or a user controls; the rest is the agent's own text.
    let mut i = i.clone();
    i.command = cap_command(&i.command);
    i.reason = cap(&i.reason, REASON_MAX);
    i.user = cap(&i.user, 64);
    i.session.remote_host = i.session.remote_host.as_deref().map(|h| cap(h, 128));
    i.session.tty = i.session.tty.as_deref().map(|t| cap(t, 64));
    i.tty = i.tty.as_deref().map(|t| cap(t, 64));
    let i = &i;
    if i.is_shutdown() {
        return format!(
            "{} on {}: {} (user {}, {}). Incident {}",
            i.outcome.as_str().replace('_', " "),
            i.host,
            i.reason,
            i.user,
            session_words(i),
            i.id
        );
    }
    let who = format!("user {}, pgid {}, {}", i.user, i.pgid, session_words(i));
    match &i.outcome {
        Outcome::Held => format!(
            "held job \"{}\" on {}: {} ({who}). Incident {}: guardrail approve {} | guardrail deny {}",
            i.command, i.host, i.reason, i.id, i.id, i.id
        ),
        Outcome::Killed => format!(
            "killed job \"{}\" on {}: {} ({who}). Incident {}",
            i.command, i.host, i.reason, i.id
        ),
        Outcome::Refused => format!(
            "refused {} by job \"{}\" on {}: {} ({who}). Incident {}",
            i.op, i.command, i.host, i.reason, i.id
        ),
        Outcome::WouldHaveHeld | Outcome::WouldHaveRefused => format!(
            "audit mode: {} job \"{}\" on {}: {} ({who}). Incident {}",
            i.outcome.as_str().replace('_', " "),
            i.command,
            i.host,
            i.reason,
            i.id
        ),
        Outcome::Approved => format!(
            "incident {} approved{}: job \"{}\" (pgid {}) on {} resumed",
            i.id,
            i.decided_by
                .map(|u| format!(" by uid {u}"))
                .unwrap_or_default(),
            i.command,
            i.pgid,
            i.host
        ),
        Outcome::Denied | Outcome::TimedOut => format!(
            "incident {} {}{}: job \"{}\" (pgid {}) on {} ended",
            i.id,
            if i.outcome == Outcome::Denied {
                "denied"
            } else {
                "timed out"
            },
            i.decided_by_text
                .as_deref()
                .map(|b| format!(" ({b})"))
                .unwrap_or_default(),
            i.command,
            i.pgid,
            i.host
        ),
        Outcome::Ended => format!(
            "incident {} closed: held job \"{}\" (pgid {}) on {} ended by itself",
            i.id, i.command, i.pgid, i.host
        ),
        Outcome::EndedOnAgentStop | Outcome::ContinuedOnAgentStop => format!(
            "incident {} closed as the agent stopped: held job \"{}\" (pgid {}) on {} {} (deletion.on_agent_stop)",
            i.id,
            i.command,
            i.pgid,
            i.host,
            if i.outcome == Outcome::EndedOnAgentStop {
                "ended"
            } else {
                "continued"
            }
        ),
        other @ (Outcome::Alerted
        | Outcome::Reported
        | Outcome::Confirmed
        | Outcome::Allowed
        | Outcome::AllowedByException
        | Outcome::ShutdownRefused
        | Outcome::ShutdownConfirmed
        | Outcome::Granted
        | Outcome::Other(_)) => format!("incident {} {other} on {}: {}", i.id, i.host, i.reason),
    }
}

fn session_words(i: &Incident) -> String {
    let s = &i.session;
    // Incidents built without the session object (by hand, or read from an older log) still
    // name their session.
    if s.class.is_empty() {
        return i.session_text();
    }
    let mut out = match s.class.as_str() {
        "remote" => match &s.remote_host {
            Some(h) => format!("remote session from {h}"),
            None => "remote session".to_string(),
        },
        "local" => "local session".to_string(),
        "none" => "no login session".to_string(),
        _ => "session of unknown origin".to_string(),
    };
    if let Some(t) = &s.tty {
        out.push_str(&format!(" on {t}"));
    }
    out
}

/// Syslog severities (RFC 5424 §6.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Crit = 2,
    Err = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
}

impl Severity {
    /// The Alertmanager `severity` label.
    pub fn label(self) -> &'static str {
        match self {
            Severity::Crit | Severity::Err => "critical",
            Severity::Warning => "warning",
            Severity::Notice | Severity::Info => "info",
        }
    }
}

/// A destination's delivery: one event at a time, on its own thread.
pub trait Destination: Send {
    fn name(&self) -> &'static str;
    /// Delivers one event; an error is retried, then counted as a loss.
    fn deliver(&mut self, rec: &Record) -> anyhow::Result<()>;
    /// Called every `tick()` while the queue is idle (Alertmanager re-sends firing alerts).
    fn tick(&mut self) {}
    fn tick_interval(&self) -> Option<Duration> {
        None
    }
}

struct Worker {
    name: &'static str,
    tx: Option<SyncSender<Arc<Record>>>,
    thread: Option<JoinHandle<()>>,
}

/// The forwarding half of the sink: counters plus one queue and thread per destination.
pub struct Alerts {
    pub metrics: Arc<Mutex<Metrics>>,
    workers: Vec<Worker>,
}

impl Alerts {
    /// Starts the destinations the policy enables. A destination that cannot start (a metrics
    /// port in use) is reported and left out: enforcement matters more than monitoring.
    pub fn start(cfg: &guardrail_policy::Alerts) -> Alerts {
        let metrics = Arc::new(Mutex::new(Metrics::new()));
        let mut dests: Vec<Box<dyn Destination>> = Vec::new();
        if cfg.syslog.enabled {
            dests.push(Box::new(syslog::SyslogDestination::new(&cfg.syslog)));
        }
        if let Some(url) = &cfg.alertmanager_url {
            match alertmanager::AlertmanagerDestination::new(url) {
                Ok(d) => dests.push(Box::new(d)),
                Err(e) => eprintln!("guardrail: Alertmanager disabled: {e:#}"),
            }
        }
        if let Some(path) = &cfg.prometheus_textfile {
            dests.push(Box::new(metrics::Textfile::new(
                path.clone(),
                metrics.clone(),
            )));
        }
        if let Some(addr) = cfg.prometheus_listen {
            if let Err(e) = metrics::serve(addr, metrics.clone()) {
                eprintln!("guardrail: metrics endpoint on {addr} disabled: {e:#}");
            } else {
                println!("guardrail: metrics on http://{addr}/metrics");
            }
        }
        let mut workers = Vec::new();
        for d in dests {
            let name = d.name();
            metrics
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add_destination(name);
            let (tx, rx) = sync_channel(QUEUE);
            let m = metrics.clone();
            let thread = std::thread::Builder::new()
                .name(format!("alert-{name}"))
                .spawn(move || {
                    block_signals();
                    run_worker(d, rx, m)
                });
            match thread {
                Ok(t) => workers.push(Worker {
                    name,
                    tx: Some(tx),
                    thread: Some(t),
                }),
                Err(e) => eprintln!("guardrail: cannot start the {name} delivery thread: {e}"),
            }
        }
        Alerts { metrics, workers }
    }

    pub fn set_tier(&self, tier: &str) {
        self.lock().set_tier(tier);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Metrics> {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the event and offers it to every destination; never blocks.
    pub fn send(&self, rec: Record) {
        self.lock().observe(&rec);
        let rec = Arc::new(rec);
        for w in &self.workers {
            let Some(tx) = &w.tx else { continue };
            match tx.try_send(rec.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.lock().dropped(w.name);
                }
            }
        }
    }
}

impl Drop for Alerts {
    /// Lets the queues drain (the agent_stopped event is the last), for a bounded time.
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.tx = None;
        }
        let deadline = Instant::now() + DRAIN;
        for w in &mut self.workers {
            while w.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(t) = w.thread.take()
                && t.is_finished()
            {
                let _ = t.join();
            }
        }
    }
}

/// The daemon takes SIGTERM, SIGINT and SIGHUP through a signalfd, blocking them only in its
/// own thread; a thread of ours that left them unblocked would take SIGTERM's default action and
/// end the agent without detaching. Every helper thread calls this first.
pub fn block_signals() {
    let _ = nix::sys::signal::SigSet::all().thread_block();
}

fn run_worker(mut d: Box<dyn Destination>, rx: Receiver<Arc<Record>>, m: Arc<Mutex<Metrics>>) {
    let tick = d.tick_interval();
    let mut failing = false;
    loop {
        let rec = match tick {
            Some(t) => match rx.recv_timeout(t) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => {
                    d.tick();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        let mut result = d.deliver(&rec);
        for delay in RETRY_DELAYS {
            if result.is_ok() {
                break;
            }
            std::thread::sleep(*delay);
            result = d.deliver(&rec);
        }
        let mut metrics = m.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                metrics.delivered(d.name());
                if failing {
                    eprintln!("guardrail: {} delivery works again", d.name());
                    failing = false;
                }
            }
            Err(e) => {
                metrics.dropped(d.name());
                // One message per outage, not one per event: a dead collector must not flood
                // the agent's own log.
                if !failing {
                    eprintln!(
                        "guardrail: {} delivery failed, event dropped (counted in guardrail_events_dropped_total): {e:#}",
                        d.name()
                    );
                    failing = true;
                }
            }
        }
    }
}
