//! The `[alerts]` section: syslog (local or remote), the event log, Prometheus and Alertmanager.
use std::path::PathBuf;

use super::{V, defaults, quoted};
use crate::diag::Code;
use crate::model::*;
use crate::raw::*;

const FORMATS: &[(&str, SyslogFormat)] = &[
    ("rfc5424", SyslogFormat::Rfc5424),
    ("rfc3164", SyslogFormat::Rfc3164),
];

pub(super) fn validate_alerts(a: &RawAlerts, v: &mut V<'_, '_, '_>) -> Alerts {
    let sl = a.syslog.clone().unwrap_or_default();
    let enabled = sl.enabled.as_ref().is_none_or(|b| b.value);
    let format = v.choice(
        &sl.format,
        "alerts.syslog.format",
        FORMATS,
        SyslogFormat::Rfc5424,
    );
    let facility_code_list: Vec<(&str, u8)> = FACILITIES.to_vec();
    let default_fac = FACILITIES
        .iter()
        .find(|(n, _)| *n == defaults::FACILITY)
        .map(|f| f.1)
        .unwrap_or(10);
    let facility_code = v.choice(
        &sl.facility,
        "alerts.syslog.facility",
        &facility_code_list,
        default_fac,
    );
    let facility = FACILITIES
        .iter()
        .find(|(_, c)| *c == facility_code)
        .map(|f| f.0)
        .unwrap_or(defaults::FACILITY)
        .to_string();
    let app_name = match &sl.app_name {
        None => defaults::APP_NAME.to_string(),
        Some(s) => {
            let ok = !s.value.is_empty()
                && s.value.len() <= 48
                && s.value.bytes().all(|b| (33..=126).contains(&b));
            if !ok {
                v.push(Code::BadValue, &s.span, format!("syslog app_name {} is not 1 to 48 printable ASCII characters without spaces", quoted(&s.value)), "RFC 5424 APP-NAME: e.g. \"guardrail\"");
                defaults::APP_NAME.to_string()
            } else {
                s.value.clone()
            }
        }
    };
    let remote = sl
        .remote
        .as_ref()
        .filter(|s| !s.value.is_empty())
        .and_then(|s| {
            let r = parse_remote(&s.value);
            if r.is_none() {
                v.push(
                    Code::BadAddress,
                    &s.span,
                    format!("bad syslog remote {}", quoted(&s.value)),
                    "write \"udp://host:port\" or \"tcp://host:port\", e.g. \"udp://10.0.0.5:514\"",
                );
            }
            r
        });
    let syslog = Syslog {
        enabled,
        format,
        facility,
        facility_code,
        app_name,
        remote,
    };

    let event_log = match a.event_log.as_ref().and_then(|e| e.path.as_ref()) {
        None => PathBuf::from(defaults::EVENT_LOG),
        Some(s) => v
            .path(s, "alerts.event_log.path", false)
            .unwrap_or_else(|| PathBuf::from(defaults::EVENT_LOG)),
    };
    let pr = a.prometheus.clone().unwrap_or_default();
    let prometheus_listen = pr.listen.as_ref().filter(|s| !s.value.is_empty()).and_then(|s| {
        match s.value.parse::<std::net::SocketAddr>() {
            Ok(addr) => {
                if !addr.ip().is_loopback() {
                    v.push(Code::NotLoopback, &s.span, format!("metrics listener {} is not on a loopback address", quoted(&s.value)), "the metrics page names hosts, users and paths: listen on 127.0.0.1 and let a local scraper or proxy expose it");
                }
                Some(addr)
            }
            Err(_) => {
                v.push(Code::BadAddress, &s.span, format!("bad listen address {}", quoted(&s.value)), "write ip:port, e.g. \"127.0.0.1:9477\" or \"[::1]:9477\"");
                None
            }
        }
    });
    let prometheus_textfile = pr
        .textfile
        .as_ref()
        .filter(|s| !s.value.is_empty())
        .and_then(|s| v.path(s, "alerts.prometheus.textfile", false));
    let alertmanager_url = a
        .alertmanager
        .as_ref()
        .and_then(|m| m.url.as_ref())
        .filter(|s| !s.value.is_empty())
        .and_then(|s| {
            let rest = s
                .value
                .strip_prefix("http://")
                .or_else(|| s.value.strip_prefix("https://"));
            match rest {
                Some(r)
                    if !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace) =>
                {
                    Some(s.value.clone())
                }
                _ => {
                    v.push(
                        Code::BadAddress,
                        &s.span,
                        format!("bad Alertmanager URL {}", quoted(&s.value)),
                        "write its base URL, e.g. \"http://127.0.0.1:9093\"",
                    );
                    None
                }
            }
        });
    Alerts {
        syslog,
        event_log,
        prometheus_listen,
        prometheus_textfile,
        alertmanager_url,
    }
}

fn parse_remote(s: &str) -> Option<RemoteSyslog> {
    let (transport, rest) = if let Some(r) = s.strip_prefix("udp://") {
        (Transport::Udp, r)
    } else if let Some(r) = s.strip_prefix("tcp://") {
        (Transport::Tcp, r)
    } else {
        return None;
    };
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', ' ']) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    Some(RemoteSyslog {
        transport,
        host: host.to_string(),
        port,
    })
}
