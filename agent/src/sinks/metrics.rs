//! Prometheus metrics: counters kept in memory from the events themselves, served in the text
//! exposition format over a loopback HTTP endpoint and/or written to a node_exporter textfile.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};

use super::{Destination, Record};

const TIERS: &[&str] = &["lsm", "fmodret", "tracepoint", "userspace"];

#[derive(Debug, Default)]
pub struct Metrics {
    up: bool,
    start_time: f64,
    tier: String,
    incidents: BTreeMap<(String, String), u64>,
    deletions_counted: BTreeMap<String, u64>,
    deletions_refused: BTreeMap<String, u64>,
    holds_open: BTreeSet<u64>,
    shutdowns_refused: u64,
    shutdowns_confirmed: u64,
    reloads_ok: u64,
    reloads_failed: u64,
    events: BTreeMap<String, u64>,
    delivered: BTreeMap<String, u64>,
    dropped: BTreeMap<String, u64>,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            up: true,
            start_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            ..Default::default()
        }
    }

    /// Destinations show up with zero losses from the start, so a rate() has a baseline.
    pub fn add_destination(&mut self, name: &str) {
        self.delivered.entry(name.to_string()).or_default();
        self.dropped.entry(name.to_string()).or_default();
    }

    pub fn set_tier(&mut self, tier: &str) {
        self.tier = tier.to_string();
    }

    pub fn dropped(&mut self, dest: &str) {
        *self.dropped.entry(dest.to_string()).or_default() += 1;
    }

    pub fn delivered(&mut self, dest: &str) {
        *self.delivered.entry(dest.to_string()).or_default() += 1;
    }

    /// Counts one event. Deletions are counted from incidents (the kernel reports state changes,
    /// not each deletion): the count at each crossing, and each refusal.
    pub fn observe(&mut self, rec: &Record) {
        use crate::incident::{Kind, Outcome as O};
        *self.events.entry(rec.name().to_string()).or_default() += 1;
        match rec {
            Record::Agent(a) => match a.kind.as_str() {
                "policy_reloaded" => self.reloads_ok += 1,
                "policy_rejected" => self.reloads_failed += 1,
                "agent_stopped" => self.up = false,
                _ => {}
            },
            Record::Incident(i) => {
                *self
                    .incidents
                    .entry((i.outcome.to_string(), i.rule.clone()))
                    .or_default() += 1;
                if self.tier.is_empty() {
                    self.tier = i.tier.clone();
                }
                let rule = i.rule.clone();
                if i.is_shutdown() {
                    match &i.outcome {
                        O::Refused | O::Killed | O::ShutdownRefused => self.shutdowns_refused += 1,
                        O::Confirmed | O::ShutdownConfirmed => self.shutdowns_confirmed += 1,
                        O::Allowed
                        | O::AllowedByException
                        | O::WouldHaveRefused
                        | O::Granted
                        | O::Held
                        | O::WouldHaveHeld
                        | O::Alerted
                        | O::Reported
                        | O::Approved
                        | O::Denied
                        | O::TimedOut
                        | O::Ended
                        | O::EndedOnAgentStop
                        | O::ContinuedOnAgentStop
                        | O::Other(_) => {}
                    }
                    return;
                }
                match &i.outcome {
                    O::Held | O::Killed | O::WouldHaveHeld => {
                        *self.deletions_counted.entry(rule).or_default() += i.count;
                    }
                    O::Refused => {
                        if i.kind == Kind::BudgetCrossed {
                            *self.deletions_counted.entry(rule.clone()).or_default() += i.count;
                        }
                        *self.deletions_refused.entry(rule).or_default() += 1;
                    }
                    O::ShutdownRefused => self.shutdowns_refused += 1,
                    O::ShutdownConfirmed => self.shutdowns_confirmed += 1,
                    O::WouldHaveRefused
                    | O::Alerted
                    | O::Reported
                    | O::Approved
                    | O::Denied
                    | O::TimedOut
                    | O::Ended
                    | O::EndedOnAgentStop
                    | O::ContinuedOnAgentStop
                    | O::Confirmed
                    | O::Allowed
                    | O::AllowedByException
                    | O::Granted
                    | O::Other(_) => {}
                }
                if i.outcome == O::Held {
                    self.holds_open.insert(i.id);
                } else if i.outcome.closes_hold() {
                    self.holds_open.remove(&i.id);
                }
            }
        }
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(&mut o, "guardrail_up", "gauge", "1 while the agent runs.");
        let _ = writeln!(o, "guardrail_up {}", u8::from(self.up));
        head(
            &mut o,
            "guardrail_start_time_seconds",
            "gauge",
            "When the agent started, in seconds since the epoch.",
        );
        let _ = writeln!(o, "guardrail_start_time_seconds {:.3}", self.start_time);
        head(
            &mut o,
            "guardrail_tier",
            "gauge",
            "The enforcement tier in force (1) and the others (0).",
        );
        for t in TIERS {
            let _ = writeln!(
                o,
                "guardrail_tier{{tier=\"{t}\"}} {}",
                u8::from(self.tier == *t)
            );
        }
        head(
            &mut o,
            "guardrail_holds_open",
            "gauge",
            "Jobs held and waiting for guardrail approve or deny.",
        );
        let _ = writeln!(o, "guardrail_holds_open {}", self.holds_open.len());
        head(
            &mut o,
            "guardrail_incidents_total",
            "counter",
            "Incident events by outcome and rule.",
        );
        for ((outcome, rule), n) in &self.incidents {
            let _ = writeln!(
                o,
                "guardrail_incidents_total{{outcome=\"{}\",rule=\"{}\"}} {n}",
                esc(outcome),
                esc(rule)
            );
        }
        head(
            &mut o,
            "guardrail_deletions_counted_total",
            "counter",
            "Deletions counted against a budget, as reported when jobs crossed it, by rule.",
        );
        for (rule, n) in &self.deletions_counted {
            let _ = writeln!(
                o,
                "guardrail_deletions_counted_total{{rule=\"{}\"}} {n}",
                esc(rule)
            );
        }
        head(
            &mut o,
            "guardrail_deletions_refused_total",
            "counter",
            "Deletions refused (protected roots, data directories, blocked jobs), by rule.",
        );
        for (rule, n) in &self.deletions_refused {
            let _ = writeln!(
                o,
                "guardrail_deletions_refused_total{{rule=\"{}\"}} {n}",
                esc(rule)
            );
        }
        head(
            &mut o,
            "guardrail_shutdowns_refused_total",
            "counter",
            "Shutdown requests refused.",
        );
        let _ = writeln!(
            o,
            "guardrail_shutdowns_refused_total {}",
            self.shutdowns_refused
        );
        head(
            &mut o,
            "guardrail_shutdowns_confirmed_total",
            "counter",
            "Shutdown requests confirmed by naming the host.",
        );
        let _ = writeln!(
            o,
            "guardrail_shutdowns_confirmed_total {}",
            self.shutdowns_confirmed
        );
        head(
            &mut o,
            "guardrail_policy_reloads_total",
            "counter",
            "Policy reloads by result (ok: in force; failed: rejected, previous policy kept).",
        );
        let _ = writeln!(
            o,
            "guardrail_policy_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok
        );
        let _ = writeln!(
            o,
            "guardrail_policy_reloads_total{{result=\"failed\"}} {}",
            self.reloads_failed
        );
        head(
            &mut o,
            "guardrail_events_total",
            "counter",
            "Events produced, by outcome or agent event kind.",
        );
        for (kind, n) in &self.events {
            let _ = writeln!(o, "guardrail_events_total{{event=\"{}\"}} {n}", esc(kind));
        }
        head(
            &mut o,
            "guardrail_events_delivered_total",
            "counter",
            "Events delivered, by destination.",
        );
        for (d, n) in &self.delivered {
            let _ = writeln!(
                o,
                "guardrail_events_delivered_total{{destination=\"{}\"}} {n}",
                esc(d)
            );
        }
        head(
            &mut o,
            "guardrail_events_dropped_total",
            "counter",
            "Events lost: the destination's queue was full or delivery failed after retries.",
        );
        for (d, n) in &self.dropped {
            let _ = writeln!(
                o,
                "guardrail_events_dropped_total{{destination=\"{}\"}} {n}",
                esc(d)
            );
        }
        o
    }
}

/// A label value: backslash, double quote and newline escaped.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn render(m: &Mutex<Metrics>) -> String {
    m.lock().unwrap_or_else(|e| e.into_inner()).render()
}

/// Clients answered at the same time; one more is closed at once (the endpoint is loopback
/// only, and a scrape takes milliseconds).
const MAX_CLIENTS: usize = 32;
/// The whole request must arrive within this, however slowly it dribbles.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// Longest request read; a scraper's GET is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;

/// One client's place among [`MAX_CLIENTS`], given back when its thread ends (or never starts).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves GET /metrics on `addr` (loopback, checked by the policy): a thread accepts, and each
/// client gets a thread of its own with a deadline for the whole request, so a client that
/// sends slowly (or never) delays no one else.
pub fn serve(addr: SocketAddr, metrics: Arc<Mutex<Metrics>>) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            // The client threads inherit this mask.
            super::block_signals();
            let active = Arc::new(AtomicUsize::new(0));
            for stream in listener.incoming().flatten() {
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                let slot = Slot(active.clone());
                let metrics = metrics.clone();
                let _ = std::thread::Builder::new()
                    .name("metrics-client".into())
                    .spawn(move || {
                        let _slot = slot;
                        let _ = answer(stream, &metrics, Instant::now() + REQUEST_DEADLINE);
                    });
            }
        })
        .context("starting the metrics thread")?;
    Ok(())
}

fn answer(mut s: TcpStream, metrics: &Mutex<Metrics>, deadline: Instant) -> std::io::Result<()> {
    s.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < MAX_REQUEST {
        // The time left for the whole request, not a fresh timeout per read.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        _ if req.len() >= MAX_REQUEST => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request too large\n".to_string(),
        ),
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(metrics),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "guardrail serves /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

/// Rewrites the node_exporter textfile after every event, atomically (a temporary file in the
/// same directory, then rename), so node_exporter never reads half a file.
///
/// That directory is often writable by the prometheus user, so the temporary file gets a name
/// no one can guess and is created `O_EXCL|O_NOFOLLOW`: a file or symlink planted there is never
/// opened (a predictable `<path>.<pid>.tmp` opened with `File::create` let that user have root
/// truncate any file through a symlink). rename(2) replaces a symlink at `path` itself.
pub struct Textfile {
    path: PathBuf,
    metrics: Arc<Mutex<Metrics>>,
}

impl Textfile {
    pub fn new(path: PathBuf, metrics: Arc<Mutex<Metrics>>) -> Self {
        Textfile { path, metrics }
    }

    pub fn write(&self) -> Result<()> {
        let text = render(&self.metrics);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let (tmp, mut f) = create_temp(&self.path)?;
        let r = (|| -> Result<()> {
            // node_exporter runs as another user: readable whatever the agent's umask.
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .with_context(|| format!("chmod {}", tmp.display()))?;
            f.write_all(text.as_bytes())
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.sync_all()
                .with_context(|| format!("syncing {}", tmp.display()))?;
            std::fs::rename(&tmp, &self.path)
                .with_context(|| format!("renaming to {}", self.path.display()))
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }
}

/// A new file `<path>.<random>.tmp` beside `path`, mode 0644 (node_exporter reads it), created
/// `O_CREAT|O_EXCL|O_NOFOLLOW` under a fresh random name until one is free.
fn create_temp(path: &std::path::Path) -> Result<(PathBuf, std::fs::File)> {
    let mut last = None;
    for _ in 0..16 {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{:016x}.tmp", random_u64()));
        let tmp = PathBuf::from(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("creating {}", tmp.display())),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()))
        .with_context(|| format!("no free temporary name beside {}", path.display()))
}

/// 64 bits from the kernel's random pool (the clock and pid when it has none to give).
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is a writable buffer of the length passed.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, b.len(), 0) };
    if n == b.len() as isize {
        return u64::from_ne_bytes(b);
    }
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

impl Destination for Textfile {
    fn name(&self) -> &'static str {
        "textfile"
    }

    fn deliver(&mut self, _rec: &Record) -> Result<()> {
        self.write()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::AgentEvent;

    fn agent(kind: &str) -> Record {
        Record::Agent(AgentEvent {
            time: String::new(),
            host: "h".into(),
            kind: kind.into(),
            message: String::new(),
            tier: String::new(),
        })
    }

    /// Series name with labels -> value, from the text format.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    #[test]
    fn holds_counts_and_reloads_move() {
        let mut m = Metrics::new();
        m.set_tier("tracepoint");
        m.add_destination("syslog");
        let mut inc = crate::sinks::syslog::tests::sample();
        m.observe(&Record::Incident(Box::new(inc.clone())));
        let s = parse(&m.render());
        assert_eq!(s["guardrail_holds_open"], 1.0);
        assert_eq!(
            s["guardrail_deletions_counted_total{rule=\"default\"}"],
            101.0
        );
        assert_eq!(
            s["guardrail_incidents_total{outcome=\"held\",rule=\"default\"}"],
            1.0
        );
        assert_eq!(s["guardrail_tier{tier=\"tracepoint\"}"], 1.0);
        assert_eq!(s["guardrail_tier{tier=\"lsm\"}"], 0.0);
        assert_eq!(
            s["guardrail_events_dropped_total{destination=\"syslog\"}"],
            0.0
        );
        inc.outcome = "approved".into();
        m.observe(&Record::Incident(Box::new(inc)));
        m.observe(&agent("policy_reloaded"));
        m.observe(&agent("policy_rejected"));
        m.dropped("syslog");
        let s = parse(&m.render());
        assert_eq!(s["guardrail_holds_open"], 0.0);
        assert_eq!(
            s["guardrail_deletions_counted_total{rule=\"default\"}"], 101.0,
            "a decision counts no deletions"
        );
        assert_eq!(s["guardrail_policy_reloads_total{result=\"ok\"}"], 1.0);
        assert_eq!(s["guardrail_policy_reloads_total{result=\"failed\"}"], 1.0);
        assert_eq!(
            s["guardrail_events_dropped_total{destination=\"syslog\"}"],
            1.0
        );
        assert_eq!(s["guardrail_up"], 1.0);
        m.observe(&agent("agent_stopped"));
        assert_eq!(parse(&m.render())["guardrail_up"], 0.0);
    }

    #[test]
    fn shutdown_requests_count_as_shutdowns_not_deletions() {
        let mut m = Metrics::new();
        let mut i = crate::sinks::syslog::tests::sample();
        i.kind = "shutdown".into();
        i.rule = "shutdown".into();
        for outcome in ["refused", "killed", "confirmed", "allowed"] {
            i.outcome = outcome.into();
            m.observe(&Record::Incident(Box::new(i.clone())));
        }
        let s = parse(&m.render());
        assert_eq!(s["guardrail_shutdowns_refused_total"], 2.0);
        assert_eq!(s["guardrail_shutdowns_confirmed_total"], 1.0);
        assert!(!s.keys().any(|k| k.starts_with("guardrail_deletions_")));
        assert_eq!(s["guardrail_holds_open"], 0.0);
    }

    #[test]
    fn every_series_has_help_and_type() {
        let text = Metrics::new().render();
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has a TYPE line"
            );
            assert!(name.starts_with("guardrail_"), "{name}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
