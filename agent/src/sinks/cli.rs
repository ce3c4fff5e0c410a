//! `guardrail events [--follow] [--since DURATION|TIME] [--json]`: reads the JSON lines event log.
use std::{
    fs::File,
    io::{BufRead, BufReader, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Result, bail};

use super::Record;
use crate::timefmt;

#[derive(Debug, Clone, clap::Args)]
pub struct EventsArgs {
    /// Keep reading as events arrive (follows the log across rotation).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only events since a duration ago (`90s`, `10m`, `2h`, `1d`) or an RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Print the log's JSON lines as they are.
    #[arg(long)]
    pub json: bool,
    /// Event log (default: the policy's [alerts.event_log] path).
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Policy whose event log to read (default /etc/guardrail/policy.toml, or the embedded one).
    #[arg(long)]
    pub policy: Option<PathBuf>,
}

/// One event for a terminal: time, host, then the same words syslog gets. One line, escaped:
/// the log holds the job's text as it was.
pub fn text_line(rec: &Record) -> String {
    let line = match rec {
        Record::Incident(i) => format!(
            "{} {} incident {} {} [rule {}, tier {}]: {}",
            rec.time(),
            rec.host(),
            i.id,
            i.outcome,
            i.rule,
            i.tier,
            rec.summary()
        ),
        Record::Agent(a) => format!("{} {} {}: {}", a.time, a.host, a.kind, a.message),
    };
    crate::text::escape_line(&line)
}

/// Whether a log line is shown: parsed, and not older than `since` (ms since the epoch).
/// Lines that do not parse are shown raw with --json and skipped otherwise.
fn select(line: &str, since: Option<i64>, json: bool) -> Option<String> {
    let rec = serde_json::from_str::<Record>(line).ok();
    if let Some(since) = since {
        let t = rec
            .as_ref()
            .and_then(|r| timefmt::parse_rfc3339(r.time()))?;
        if t < since {
            return None;
        }
    }
    if json {
        Some(line.to_string())
    } else {
        rec.map(|r| text_line(&r))
    }
}

fn default_log(policy: Option<&Path>) -> PathBuf {
    let source = crate::policy::PolicySource::from_args(policy, None);
    match source.load() {
        Ok(p) => p.policy.alerts.event_log,
        Err(_) => {
            eprintln!(
                "guardrail: the policy {} has errors; reading the default event log",
                source.describe()
            );
            PathBuf::from("/var/log/guardrail/events.jsonl")
        }
    }
}

pub fn run(args: EventsArgs) -> Result<ExitCode> {
    let since = match &args.since {
        None => None,
        Some(s) => match timefmt::parse_since(s, timefmt::now_ms()) {
            Some(t) => Some(t),
            None => bail!("--since {s:?}: write a duration (10m, 2h, 1d) or an RFC 3339 time"),
        },
    };
    let path = args
        .log
        .clone()
        .unwrap_or_else(|| default_log(args.policy.as_deref()));
    let open = |p: &Path| {
        File::open(p).map_err(|e| {
            // The log names users, commands and remote hosts: the agent keeps it from others.
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (the event log is readable by root only, and by group adm where the packages set it up)"
            } else {
                ""
            };
            anyhow::Error::new(e).context(format!("opening {}{hint}", p.display()))
        })
    };
    let mut file = match open(&path) {
        Ok(f) => f,
        Err(e) if !args.follow => return Err(e),
        Err(_) => loop {
            std::thread::sleep(Duration::from_millis(250));
            if let Ok(f) = open(&path) {
                break f;
            }
        },
    };
    let mut reader = BufReader::new(file.try_clone()?);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n > 0 && line.ends_with('\n') {
            if let Some(out) = select(line.trim_end(), since, args.json) {
                println!("{out}");
            }
            continue;
        }
        if !args.follow {
            // A last line without its newline is still being written; show it anyway.
            if let Some(out) = select(line.trim_end(), since, args.json).filter(|_| n > 0) {
                println!("{out}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        // A partial line: rewind so it is read whole next time.
        if n > 0 {
            reader.seek(SeekFrom::Current(-(n as i64)))?;
        }
        std::thread::sleep(Duration::from_millis(250));
        // logrotate moved the file away (a new inode at the path) or truncated it: start over.
        let pos = reader.stream_position()?;
        let rotated = match (std::fs::metadata(&path), file.metadata()) {
            (Ok(now), Ok(ours)) => now.ino() != ours.ino() || now.len() < pos,
            _ => false,
        };
        if rotated && let Ok(f) = open(&path) {
            file = f;
            reader = BufReader::new(file.try_clone()?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_filters_by_time_and_keeps_json() {
        let old = r#"{"agent":{"time":"2020-01-01T00:00:00.000Z","host":"h","kind":"agent_started","message":"started"}}"#;
        let since = timefmt::parse_rfc3339("2021-01-01T00:00:00Z");
        assert_eq!(select(old, since, false), None);
        assert_eq!(
            select(old, None, false).as_deref(),
            Some("2020-01-01T00:00:00.000Z h agent_started: started")
        );
        assert_eq!(select(old, None, true).as_deref(), Some(old));
        assert_eq!(select("garbage", None, false), None);
    }

    #[test]
    fn incidents_written_by_the_sink_read_back() {
        let i = crate::sinks::syslog::tests::sample();
        let line =
            serde_json::to_string(&serde_json::json!({ "incident": i })).expect("serialises");
        let text = select(&line, None, false).expect("parses");
        assert!(
            text.starts_with("2024-05-01T03:00:00.123Z db-prod-1 incident 7 held [rule default, tier tracepoint]: held job"),
            "{text}"
        );
    }
}
