//! Syslog: RFC 5424 with structured data (default) or RFC 3164, to the local socket or to a
//! remote collector over UDP or TCP, through the `syslog` crate's transports.
//!
//! The formatting is ours (a `syslog::LogFormat` implementation) because the crate's RFC 5424
//! formatter only takes a numeric MSGID and stamps the delivery time; an event carries the time it
//! happened and its outcome as MSGID.
use std::{
    fmt::Write as _,
    io::{BufWriter, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use guardrail_policy::{RemoteSyslog, Syslog, SyslogFormat, Transport};
use syslog::{LogFormat, Logger, LoggerBackend};

use super::{Destination, Record, Severity};
use crate::incident::Incident;

/// SD-ID of guardrail's structured data. 32473 is the private enterprise number RFC 5612 reserves
/// for documentation; a registered number can replace it without changing the parameters.
pub const SD_ID: &str = "guardrail@32473";
/// Long values are cut so a whole message (every parameter at its longest, the command at
/// `text::COMMAND_MAX`, the summary capped too) stays within rsyslog's default 8 KiB message
/// size and one UDP datagram, and the summary's `guardrail approve N` tail always arrives.
const MAX_VALUE: usize = 256;
/// The bound the property tests hold every message to.
#[cfg(test)]
pub(crate) const MESSAGE_BOUND: usize = 8000;
const LOCAL_SOCKET: &str = "/dev/log";
const TIMEOUT: Duration = Duration::from_secs(3);

/// How a formatted message is laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// RFC 5424 (network, or the local socket when asked for).
    Rfc5424,
    /// RFC 3164 with a host name, for a remote collector.
    Rfc3164,
    /// What syslog(3) writes to /dev/log: RFC 3164 without the host name.
    Local,
}

#[derive(Debug, Clone)]
pub struct Format {
    pub wire: Wire,
    pub facility: u8,
    pub app_name: String,
    pub pid: u32,
    /// RFC 6587 octet counting, for TCP (a plain stream has no message boundaries).
    pub octet_counted: bool,
}

impl Format {
    fn pri(&self, sev: Severity) -> u8 {
        self.facility * 8 + sev as u8
    }

    /// One complete message (without transport framing unless `octet_counted`).
    pub fn message(&self, rec: &Record) -> String {
        let sev = rec.severity();
        // Escaped and capped by `summary` itself: one line, whatever the job's text holds.
        let text = rec.summary();
        let line = match self.wire {
            Wire::Rfc5424 => format!(
                "<{}>1 {} {} {} {} {} {} {}",
                self.pri(sev),
                rec.time(),
                header_field(rec.host(), 255),
                header_field(&self.app_name, 48),
                self.pid,
                header_field(rec.name(), 32),
                structured_data(rec),
                text
            ),
            Wire::Rfc3164 => format!(
                "<{}>{} {} {}[{}]: {}",
                self.pri(sev),
                bsd_timestamp(rec.time()),
                header_field(rec.host(), 255),
                self.app_name,
                self.pid,
                text
            ),
            Wire::Local => format!(
                "<{}>{} {}[{}]: {}",
                self.pri(sev),
                bsd_timestamp(rec.time()),
                self.app_name,
                self.pid,
                text
            ),
        };
        if self.octet_counted {
            format!("{} {line}", line.len())
        } else {
            line
        }
    }
}

/// The crate's `Logger` calls this once per message; writing it in one `write!` makes it one
/// datagram on UDP and on the local socket.
impl LogFormat<&Record> for Format {
    fn format<W: Write>(
        &self,
        w: &mut W,
        _severity: syslog::Severity,
        rec: &Record,
    ) -> syslog::Result<()> {
        write!(w, "{}", self.message(rec)).map_err(syslog::Error::Write)
    }
}

/// A header field: printable US-ASCII without spaces, or "-" when empty (RFC 5424 §6).
fn header_field(s: &str, max: usize) -> String {
    let v: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if v.is_empty() { "-".to_string() } else { v }
}

/// A PARAM-VALUE: control and bidi characters escaped visibly (`text::escape_line`; a newline
/// would split the line in a log file), then `"`, `\` and `]` escaped (RFC 5424 §6.3.3), at most
/// `max` bytes. The cut falls between whole characters of the original, so it never separates
/// a backslash from the character it escapes (which would end the value early).
fn sd_value(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 24);
    let mut buf = [0u8; 4];
    for c in s.chars() {
        let piece = crate::text::escape_line(c.encode_utf8(&mut buf));
        let need: usize = piece
            .chars()
            .map(|c| c.len_utf8() + usize::from(matches!(c, '"' | '\\' | ']')))
            .sum();
        if out.len() + need > max {
            let _ = write!(out, "… ({} bytes)", s.len());
            break;
        }
        for c in piece.chars() {
            if matches!(c, '"' | '\\' | ']') {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// The structured data element: every schema field that has a value, as `name="value"`.
pub fn structured_data(rec: &Record) -> String {
    let mut sd = format!("[{SD_ID}");
    for (k, v) in sd_params(rec) {
        let max = if k == "cmd" {
            crate::text::COMMAND_MAX
        } else {
            MAX_VALUE
        };
        let _ = write!(sd, " {k}=\"{}\"", sd_value(&v, max));
    }
    sd.push(']');
    sd
}

pub fn sd_params(rec: &Record) -> Vec<(&'static str, String)> {
    let mut p: Vec<(&'static str, String)> = Vec::new();
    match rec {
        Record::Agent(a) => {
            p.push(("event", a.kind.clone()));
            if !a.tier.is_empty() {
                p.push(("tier", a.tier.clone()));
            }
        }
        Record::Incident(i) => incident_params(i, &mut p),
    }
    p
}

fn incident_params(i: &Incident, p: &mut Vec<(&'static str, String)>) {
    let mut put = |k: &'static str, v: String| {
        if !v.is_empty() {
            p.push((k, v));
        }
    };
    put("event", "incident".to_string());
    put("id", i.id.to_string());
    put("outcome", i.outcome.to_string());
    put("action", i.action.to_string());
    put("kind", i.kind.to_string());
    put("rule", i.rule.clone());
    put("tier", i.tier.clone());
    put("op", i.op.clone());
    put("pid", i.pid.to_string());
    put(
        "pids",
        i.pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    put("pgid", i.pgid.to_string());
    put("sid", i.sid.to_string());
    put("unit", i.unit.clone().unwrap_or_default());
    put("exe", i.executable.clone().unwrap_or_default());
    put("cmd", i.command.clone());
    put("user", i.user.clone());
    put("uid", i.uid.to_string());
    put(
        "session",
        i.session.id.map(|s| s.to_string()).unwrap_or_default(),
    );
    put("session_class", i.session.class.clone());
    put(
        "remote_host",
        i.session.remote_host.clone().unwrap_or_default(),
    );
    put("tty", i.session.tty.clone().unwrap_or_default());
    put("service", i.session.service.clone().unwrap_or_default());
    put("count", i.count.to_string());
    put("budget", i.budget.to_string());
    put("retries", i.retries.to_string());
    put("first_path", i.first_path.clone());
    put("last_path", i.last_path.clone());
    put(
        "decided_by",
        i.decided_by
            .map(|u| format!("uid {u}"))
            .or_else(|| i.decided_by_text.clone())
            .unwrap_or_default(),
    );
}

/// `Mmm dd hh:mm:ss` (RFC 3164 §4.1.2) of an RFC 3339 UTC time from the event.
fn bsd_timestamp(rfc3339: &str) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = rfc3339
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)));
    let day = rfc3339.get(8..10).and_then(|d| d.parse::<u32>().ok());
    match (month, day, rfc3339.get(11..19)) {
        (Some(m), Some(d), Some(t)) => format!("{m} {d:>2} {t}"),
        _ => "Jan  1 00:00:00".to_string(),
    }
}

/// Delivers to one syslog endpoint; reconnects after any failure.
pub struct SyslogDestination {
    format: Format,
    remote: Option<RemoteSyslog>,
    logger: Option<Logger<LoggerBackend, Format>>,
}

impl SyslogDestination {
    pub fn new(cfg: &Syslog) -> Self {
        let wire = match (cfg.format, &cfg.remote) {
            (SyslogFormat::Rfc3164, Some(_)) => Wire::Rfc3164,
            // On /dev/log, rsyslog's default parser (and journald) read the syslog(3) format and
            // would show an RFC 5424 header as part of the message: RFC 5424 goes over the
            // network, where collectors parse it; locally the event log has every field.
            (_, None) => Wire::Local,
            (SyslogFormat::Rfc5424, Some(_)) => Wire::Rfc5424,
        };
        let format = Format {
            wire,
            facility: cfg.facility_code,
            app_name: cfg.app_name.clone(),
            pid: std::process::id(),
            octet_counted: cfg
                .remote
                .as_ref()
                .is_some_and(|r| r.transport == Transport::Tcp),
        };
        SyslogDestination {
            format,
            remote: cfg.remote.clone(),
            logger: None,
        }
    }

    fn connect(&self) -> Result<Logger<LoggerBackend, Format>> {
        let f = self.format.clone();
        match &self.remote {
            None => syslog::unix_custom(f, LOCAL_SOCKET)
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| format!("connecting to {LOCAL_SOCKET}")),
            Some(r) => {
                let server = (r.host.as_str(), r.port);
                let what = format!("{:?} syslog {}:{}", r.transport, r.host, r.port);
                let res = match r.transport {
                    Transport::Udp => {
                        let ipv6 = std::net::ToSocketAddrs::to_socket_addrs(&server)
                            .ok()
                            .and_then(|mut a| a.next())
                            .is_some_and(|a| a.is_ipv6());
                        let local = if ipv6 { "[::]:0" } else { "0.0.0.0:0" };
                        syslog::udp(f, local, server)
                    }
                    // The crate's `tcp()` connects without a timeout: a collector that drops
                    // packets would hold this thread for minutes. Its backend takes any stream.
                    Transport::Tcp => {
                        let addr = std::net::ToSocketAddrs::to_socket_addrs(&server)
                            .with_context(|| format!("resolving {what}"))?
                            .next()
                            .with_context(|| format!("no address for {what}"))?;
                        let stream = TcpStream::connect_timeout(&addr, TIMEOUT)
                            .with_context(|| format!("connecting to {what}"))?;
                        stream.set_write_timeout(Some(TIMEOUT))?;
                        return Ok(Logger::new(LoggerBackend::Tcp(BufWriter::new(stream)), f));
                    }
                };
                res.map_err(|e| anyhow!("{e}"))
                    .with_context(|| format!("connecting to {what}"))
            }
        }
    }
}

impl Destination for SyslogDestination {
    fn name(&self) -> &'static str {
        "syslog"
    }

    fn deliver(&mut self, rec: &Record) -> Result<()> {
        if self.logger.is_none() {
            self.logger = Some(self.connect()?);
        }
        let Some(logger) = self.logger.as_mut() else {
            return Err(anyhow!("no syslog connection"));
        };
        // The severity is in our PRI; the crate's level only picks which method is called.
        let res = logger.notice(rec);
        if let Err(e) = res {
            self.logger = None;
            return Err(anyhow!("writing to syslog: {e}"));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sinks::AgentEvent;

    pub(crate) fn sample() -> Incident {
        let mut i = crate::incident::tests::sample_incident();
        i.outcome = "held".into();
        i.action = "hold".into();
        i
    }

    fn fmt(wire: Wire, octet_counted: bool) -> Format {
        Format {
            wire,
            facility: 10,
            app_name: "guardrail".into(),
            pid: 4242,
            octet_counted,
        }
    }

    #[test]
    fn rfc5424_header_and_structured_data() {
        let rec = Record::Incident(Box::new(sample()));
        let m = fmt(Wire::Rfc5424, false).message(&rec);
        // authpriv (10) * 8 + crit (2)
        assert!(
            m.starts_with("<82>1 2024-05-01T03:00:00.123Z db-prod-1 guardrail 4242 held [guardrail@32473 event=\"incident\" id=\"7\" outcome=\"held\""),
            "{m}"
        );
        assert!(m.contains(" cmd=\"rm -rf \\\"x\\\" y\\]\""), "escaped: {m}");
        assert!(m.contains(" remote_host=\"10.0.0.5\""), "{m}");
        assert!(
            m.ends_with("] held job \"rm -rf \"x\" y]\" on db-prod-1: 101 deletions outside the deletion targets within 1m (budget 100, rule default) (user alice, pgid 1234, remote session from 10.0.0.5 on pts/1). Incident 7: guardrail approve 7 | guardrail deny 7"),
            "{m}"
        );
        assert!(!m.contains('\n'));
    }

    #[test]
    fn tcp_frames_are_octet_counted() {
        let rec = Record::Agent(AgentEvent {
            time: "2024-05-01T03:00:00.123Z".into(),
            host: "h".into(),
            kind: "agent_started".into(),
            message: "guardrail agent started".into(),
            tier: "lsm".into(),
        });
        let m = fmt(Wire::Rfc5424, true).message(&rec);
        let (len, rest) = m.split_once(' ').expect("length prefix");
        assert_eq!(len.parse::<usize>().ok(), Some(rest.len()));
        assert!(rest.starts_with("<86>1 "), "authpriv.info: {rest}");
        assert!(rest.contains("[guardrail@32473 event=\"agent_started\" tier=\"lsm\"]"));
    }

    #[test]
    fn rfc3164_and_local_read_like_syslog3() {
        let rec = Record::Incident(Box::new(sample()));
        let m = fmt(Wire::Rfc3164, false).message(&rec);
        assert!(
            m.starts_with("<82>May  1 03:00:00 db-prod-1 guardrail[4242]: held job "),
            "{m}"
        );
        let l = fmt(Wire::Local, false).message(&rec);
        assert!(
            l.starts_with("<82>May  1 03:00:00 guardrail[4242]: held job "),
            "{l}"
        );
    }

    #[test]
    fn empty_values_are_left_out_and_newlines_escaped() {
        let mut i = sample();
        i.unit = None;
        i.command = "sh -c 'a\nb'".into();
        let sd = structured_data(&Record::Incident(Box::new(i)));
        assert!(!sd.contains("unit="), "{sd}");
        // The newline shown as `\n`, its backslash escaped for the SD-PARAM.
        assert!(sd.contains("cmd=\"sh -c 'a\\\\nb'\""), "{sd}");
    }
}
