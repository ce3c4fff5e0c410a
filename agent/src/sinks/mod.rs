//! Forwarding events to the monitoring admins already run: syslog, Prometheus metrics and
//! Alertmanager, and the JSON event log ([`eventlog::Sink`], which fans every record out).
//!
//! Enforcement never waits for delivery: the kernel has decided before an event exists. The
//! daemon hands each event to [`Alerts::send`], which only updates in-memory counters and offers
//! the event to each destination's bounded queue without blocking. Each destination has its own
//! delivery thread, so a dead Alertmanager cannot delay syslog; a full queue or a delivery that
//! still fails after its retries is counted in `guardrail_events_dropped_total{destination}`.
pub mod alertmanager;
pub mod cli;
pub mod eventlog;
pub mod metrics;
#[cfg(test)]
mod props;

pub mod syslog;

use std::{
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub use eventlog::Sink;
pub use metrics::Metrics;

pub use crate::incident::{AgentEvent, Record, Severity};

/// Events waiting per destination before new ones are dropped (and counted). Events are state
/// changes, not deletions, so 256 covers any burst a healthy collector can be late for.
const QUEUE: usize = 256;
/// Delays between delivery attempts of one event; after the last, the event is dropped.
const RETRY_DELAYS: &[Duration] = &[Duration::from_millis(200), Duration::from_millis(1000)];
/// How long a stopping agent waits for its queues to drain: a stop (SIGTERM or SIGINT to exit)
/// takes at most 2 s, detaching included, even while a destination is down and every event
/// waits through its retries.
const DRAIN: Duration = Duration::from_secs(1);

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
