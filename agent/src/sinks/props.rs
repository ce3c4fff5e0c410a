//! Property tests of every formatter that carries a job's text: the journal line, the
//! `guardrail events` line, syslog (RFC 5424, 3164, local), the JSON event line, the Prometheus
//! exposition and the Alertmanager payload. Inputs are hostile strings (`text::strategies`):
//! terminal escapes, bidi overrides, newlines, SD and JSON metacharacters, 100 KB commands.
use std::collections::BTreeMap;

use proptest::prelude::*;

use super::{
    Record, alertmanager, cli,
    metrics::Metrics,
    syslog::{Format, SD_ID, Wire},
};
use crate::{
    incident::Incident,
    text::{self, is_unsafe, strategies},
};

/// An incident whose every job-controlled field is hostile.
fn incident() -> impl Strategy<Value = Incident> {
    (
        strategies::hostile(),
        strategies::hostile(),
        strategies::hostile(),
        strategies::hostile(),
        strategies::hostile(),
        prop_oneof![
            Just("held"),
            Just("killed"),
            Just("refused"),
            Just("approved"),
            Just("denied"),
            Just("ended")
        ],
        any::<bool>(),
    )
        .prop_map(|(command, path, user, remote, unit, outcome, shutdown)| {
            let mut i = crate::incident::tests::sample_incident();
            i.reason = format!("unlink of a protected root ({path})");
            i.command = command;
            i.first_path = path.clone();
            i.last_path = path;
            i.user = user;
            i.session.remote_host = Some(remote.clone());
            i.tty = Some(remote);
            i.unit = Some(unit.clone());
            i.executable = Some(unit);
            i.outcome = outcome.into();
            if shutdown {
                i.kind = "shutdown".into();
            }
            i
        })
}

fn no_raw_controls(s: &str) -> bool {
    !s.chars().any(is_unsafe)
}

/// RFC 5424 structured data read back: SD-ID -> params, or why it does not parse.
fn parse_sd(sd: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let rest = sd.strip_prefix(&format!("[{SD_ID}")).ok_or("no SD-ID")?;
    let mut params = BTreeMap::new();
    let mut chars = rest.char_indices();
    loop {
        match chars.next() {
            Some((i, ']')) => return Ok((params, &rest[i + 1..])),
            Some((_, ' ')) => {}
            other => return Err(format!("expected ' ' or ']' at {other:?}")),
        }
        let mut name = String::new();
        for (_, c) in chars.by_ref() {
            if c == '=' {
                break;
            }
            if !c.is_ascii_graphic() || matches!(c, '"' | ']') {
                return Err(format!("bad PARAM-NAME char {c:?}"));
            }
            name.push(c);
        }
        if chars.next().map(|x| x.1) != Some('"') {
            return Err(format!("{name}: value not quoted"));
        }
        let mut value = String::new();
        loop {
            match chars.next().map(|x| x.1) {
                Some('\\') => match chars.next().map(|x| x.1) {
                    Some(c @ ('"' | '\\' | ']')) => value.push(c),
                    other => return Err(format!("{name}: stray escape {other:?}")),
                },
                Some('"') => break,
                Some(']') => return Err(format!("{name}: raw ] in value")),
                Some(c) => value.push(c),
                None => return Err(format!("{name}: unterminated")),
            }
        }
        params.insert(name, value);
    }
}

fn fmt(wire: Wire) -> Format {
    Format {
        wire,
        facility: 10,
        app_name: "guardrail".into(),
        pid: 4242,
        octet_counted: false,
    }
}

/// A Prometheus sample line: `name{k="v",...} value`, values quoted with `\\`, `\"`, `\n` only.
fn sample_ok(line: &str) -> Result<(), String> {
    let (series, value) = line.rsplit_once(' ').ok_or("no value")?;
    value
        .parse::<f64>()
        .map_err(|e| format!("value {value}: {e}"))?;
    let Some((name, labels)) = series.split_once('{') else {
        return if series
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            Ok(())
        } else {
            Err(format!("bad name {series}"))
        };
    };
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("bad name {name}"));
    }
    let mut chars = labels.chars();
    loop {
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        if chars.next() != Some('"') {
            return Err("label value not quoted".into());
        }
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('\\' | '"' | 'n') => {}
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some('"') => break,
                Some('\n') => return Err("raw newline".into()),
                Some(_) => {}
                None => return Err("unterminated label value".into()),
            }
        }
        match chars.next() {
            Some(',') => continue,
            Some('}') if chars.next().is_none() => return Ok(()),
            other => return Err(format!("after a label: {other:?}")),
        }
    }
}

proptest! {
    #![proptest_config(strategies::config(48))]

    #[test]
    fn rfc5424_frames_hold_and_stay_bounded(i in incident()) {
        let id = i.id;
        let held = i.outcome == crate::incident::Outcome::Held && !i.is_shutdown();
        let command = i.command.clone();
        let m = fmt(Wire::Rfc5424).message(&Record::Incident(Box::new(i)));
        prop_assert!(m.len() <= super::syslog::MESSAGE_BOUND, "{} bytes", m.len());
        prop_assert!(!m.contains('\n') && !m.contains('\r'));
        // PRI VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID: printable ASCII, no spaces.
        let mut head = m.splitn(7, ' ');
        for _ in 0..6 {
            let f = head.next().unwrap_or("");
            prop_assert!(!f.is_empty() && f.chars().all(|c| c.is_ascii_graphic()), "{:?}", f);
        }
        let rest = head.next().unwrap_or("");
        let (params, msg) = parse_sd(rest).map_err(|e| TestCaseError::fail(format!("{e}: {rest:.300}")))?;
        // The command whole, or its escaped start and the full length.
        let cmd = params.get("cmd").cloned().unwrap_or_default();
        let full = text::escape_line(&command);
        let suffix = format!("… ({} bytes)", command.len());
        prop_assert!(
            cmd == full || cmd.strip_suffix(&suffix).is_some_and(|s| full.starts_with(s)),
            "cmd={:.200}", cmd
        );
        prop_assert!(cmd.len() <= text::COMMAND_MAX + suffix.len());
        for v in params.values() {
            prop_assert!(no_raw_controls(v), "{:?}", v);
        }
        let msg = msg.strip_prefix(' ').unwrap_or(msg);
        prop_assert!(no_raw_controls(msg), "{:?}", msg);
        if held {
            let tail = format!("guardrail approve {id} | guardrail deny {id}");
            prop_assert!(msg.ends_with(&tail), "{:.200}", msg);
        }
    }

    #[test]
    fn rfc3164_and_local_lines_are_one_safe_line(i in incident()) {
        let rec = Record::Incident(Box::new(i));
        for (wire, head) in [(Wire::Rfc3164, ">May  1 03:00:00 db-prod-1 guardrail[4242]: "),
                             (Wire::Local, ">May  1 03:00:00 guardrail[4242]: ")] {
            let m = fmt(wire).message(&rec);
            let pri_end = m.find('>').unwrap_or(0);
            prop_assert!(m.starts_with('<') && m[pri_end..].starts_with(head), "{:.200}", m);
            prop_assert!(no_raw_controls(&m), "{:.300}", m);
            prop_assert!(m.len() <= super::syslog::MESSAGE_BOUND, "{} bytes", m.len());
        }
    }

    #[test]
    fn journal_and_events_lines_are_one_safe_line(i in incident()) {
        let journal = i.one_line();
        prop_assert!(no_raw_controls(&journal), "{:.300}", journal);
        prop_assert!(journal.len() < 4096, "{} bytes", journal.len());
        let line = cli::text_line(&Record::Incident(Box::new(i)));
        prop_assert!(no_raw_controls(&line), "{:.300}", line);
        prop_assert!(line.len() < 4096, "{} bytes", line.len());
    }

    #[test]
    fn json_event_lines_are_one_valid_line_and_keep_every_byte(i in incident()) {
        let line = serde_json::to_string(&Record::Incident(Box::new(i.clone()))).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(!line.contains('\n') && !line.contains('\r'));
        let back: Record = serde_json::from_str(&line).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let Record::Incident(b) = back else { return Err(TestCaseError::fail("not an incident")) };
        prop_assert_eq!(&b.command, &i.command, "the event log keeps the whole command");
        prop_assert_eq!(&b.first_path, &i.first_path);
    }

    #[test]
    fn alertmanager_payload_is_valid_json_with_bounded_safe_annotations(i in incident()) {
        let body = serde_json::to_string(&[alertmanager::alert(&i, "critical", 0)]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let ann = v[0]["annotations"].as_object().cloned().unwrap_or_default();
        prop_assert!(ann.contains_key("command") && ann.contains_key("summary"));
        for (k, a) in &ann {
            let a = a.as_str().unwrap_or("");
            prop_assert!(no_raw_controls(a), "{}: {:.300}", k, a);
            prop_assert!(a.len() <= 3000, "{}: {} bytes", k, a.len());
        }
        prop_assert!(body.len() < 16_384, "{} bytes", body.len());
    }

    #[test]
    fn prometheus_exposition_is_one_sample_per_line(i in incident(), rule in strategies::hostile()) {
        let mut i = i;
        i.rule = rule;
        let mut m = Metrics::new();
        m.observe(&Record::Incident(Box::new(i)));
        let text = m.render();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            sample_ok(line).map_err(|e| TestCaseError::fail(format!("{e}: {line:.300}")))?;
        }
    }
}
