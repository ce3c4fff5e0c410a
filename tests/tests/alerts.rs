//! Alerts forwarded to monitoring, against the real daemons from Debian's packages, each started
//! by the test on loopback with its own configuration in a temporary directory and stopped by its
//! PID: rsyslog (imudp + imtcp, writing every message to a file), prometheus-alertmanager, and the
//! agent's own metrics endpoint, scraped and parsed as the Prometheus text format.
use std::{
    collections::BTreeMap,
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use guardrail_integration::{collectors::*, *};

const BUDGET: u64 = 20;
const FILES: usize = 400;

/// One sample of the Prometheus text exposition format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text format strictly enough that a malformed page fails the test: metric and label
/// names, quoted and escaped label values, numeric values, and a `# TYPE` before each family.
fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let is_name = |s: &str| {
        !s.is_empty()
            && s.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| err("TYPE without a kind"))?;
            if !matches!(
                kind,
                "counter" | "gauge" | "histogram" | "summary" | "untyped"
            ) {
                return Err(err("unknown TYPE"));
            }
            if types.insert(name.to_string(), kind.to_string()).is_some() {
                return Err(err("second TYPE for a family"));
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        if !is_name(name) {
            return Err(err("bad metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end: usize;
            loop {
                // label name
                let start = chars
                    .peek()
                    .map(|(i, _)| *i)
                    .ok_or_else(|| err("open labels"))?;
                if body[start..].starts_with('}') {
                    end = start + 1;
                    break;
                }
                let eq = body[start..]
                    .find('=')
                    .ok_or_else(|| err("label without ="))?
                    + start;
                let lname = &body[start..eq];
                if !is_name(lname) {
                    return Err(err("bad label name"));
                }
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(err("label value not quoted"));
                }
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(c @ ('\\' | '"')) => value.push(c),
                            _ => return Err(err("bad escape")),
                        },
                        Some('"') => break,
                        Some(c) => value.push(c),
                        None => return Err(err("unterminated label value")),
                    }
                }
                labels.insert(lname.to_string(), value);
                match chars.next() {
                    Some((_, ',')) => continue,
                    Some((i, '}')) => {
                        end = i + 1;
                        break;
                    }
                    _ => return Err(err("expected , or }")),
                }
            }
            rest = &body[end..];
        }
        let value_text = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before the value"))?;
        let value_text = value_text.split(' ').next().unwrap_or(""); // optional timestamp
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().map_err(|_| err("bad value"))?,
        };
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(name);
        if !types.contains_key(family) && !types.contains_key(name) {
            return Err(err("sample without a TYPE line"));
        }
        if types
            .get(name)
            .or(types.get(family))
            .is_some_and(|t| t == "counter")
            && !name.ends_with("_total")
        {
            return Err(err("a counter not named *_total"));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(samples)
}

/// A scraped page: `value("name", &[("label", "v")])` finds the series with exactly those labels.
struct Scrape(Vec<Sample>);

impl Scrape {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.0
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in the scrape:\n{:#?}", self.0))
    }
}

fn scrape(port: u16) -> Scrape {
    let (code, body) = http_get(port, "/metrics").expect("the metrics endpoint answers");
    assert_eq!(code, 200, "GET /metrics");
    Scrape(parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}\n{body}")))
}

/// Parses RFC 5424 structured data (`[id k="v" ...]...`) into SD-ID -> params.
fn parse_sd(sd: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = sd.chars().peekable();
    while chars.next() == Some('[') {
        let mut id = String::new();
        while let Some(&c) = chars.peek() {
            if c == ' ' || c == ']' {
                break;
            }
            id.push(c);
            chars.next();
        }
        let mut params = BTreeMap::new();
        loop {
            match chars.next() {
                Some(']') => break,
                Some(' ') => {}
                other => panic!("bad structured data at {other:?}: {sd}"),
            }
            let mut name = String::new();
            for c in chars.by_ref() {
                if c == '=' {
                    break;
                }
                name.push(c);
            }
            assert_eq!(chars.next(), Some('"'), "quoted value in {sd}");
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().expect("escaped char")),
                    Some('"') => break,
                    Some(c) => value.push(c),
                    None => panic!("unterminated value in {sd}"),
                }
            }
            params.insert(name, value);
        }
        out.insert(id, params);
    }
    out
}

/// A scratch tree with a victim directory, a cgroup for the test's jobs, and an agent whose
/// policy gives those jobs BUDGET deletions and forwards alerts as `alerts_toml` says.
struct Scenario {
    agent: Agent,
    cg: TestCgroup,
    s: tempfile::TempDir,
}

fn scenario(alerts_toml: &str) -> Scenario {
    require_root();
    let s = scratch();
    let target = s.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir target");
    fill(&s.path().join("victim"), FILES);
    let cg = TestCgroup::new();
    let text = policy_with(BUDGET, &[&target], &[], &cg, alerts_toml);
    let agent = Agent::start(&text).expect("agent starts");
    Scenario { agent, cg, s }
}

fn syslog_toml(remote: &str) -> String {
    format!(
        "[alerts.syslog]\nenabled = true\nformat = \"rfc5424\"\nfacility = \"local3\"\napp_name = \"guardrail-test\"\nremote = \"{remote}\"\n"
    )
}

fn no_syslog() -> &'static str {
    "[alerts.syslog]\nenabled = false\n"
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn approve(agent: &Agent, id: u64) {
    agent.cli_ok(&["approve", &id.to_string(), "--for-job"]);
}

#[test]
fn a_hold_is_one_rfc5424_line_in_rsyslog_with_every_field() {
    let _k = kernel_lock();
    let rs = Rsyslog::start();
    let Scenario { agent, cg, s } = scenario(&syslog_toml(&format!("tcp://127.0.0.1:{}", rs.tcp)));
    wait_for("agent_started in rsyslog", Duration::from_secs(10), || {
        rs.with_msgid("agent_started").pop()
    });
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent.wait_hold(Duration::from_secs(60)).expect("held");
    let held = wait_for("the held line in rsyslog", Duration::from_secs(10), || {
        rs.with_msgid("held").pop()
    });
    // rsyslog's own parse: an RFC 5424 message (protocol version 1) with our header fields.
    assert_eq!(held["protocol-version"], "1", "{held}");
    assert_eq!(held["app-name"], "guardrail-test");
    assert_eq!(held["procid"], agent.pid().to_string());
    assert_eq!(held["hostname"], hostname());
    // local3 (19) and crit (2): someone must approve or deny.
    assert_eq!(held["syslogfacility"], "19");
    assert_eq!(held["syslogseverity"], "2");
    let msg = held["msg"].as_str().expect("msg");
    assert!(
        msg.trim_start()
            .starts_with("held job \"rm -rf victim\" on ")
            && msg.contains(&format!("guardrail approve {id}")),
        "the free text reads on its own: {msg}"
    );
    let sd = parse_sd(held["structured-data"].as_str().expect("structured data"));
    let f = &sd["guardrail@32473"];
    let pgid = job.pgid().to_string();
    assert_eq!(f["event"], "incident");
    assert_eq!(f["id"], id.to_string());
    assert_eq!(f["outcome"], "held");
    assert_eq!(f["action"], "hold");
    assert_eq!(f["kind"], "budget_crossed");
    assert_eq!(f["rule"], "test-job");
    assert_eq!(f["tier"], "tracepoint");
    assert_eq!(f["pgid"], pgid);
    assert!(
        f["pids"].split(',').any(|p| p == pgid),
        "pids {} include the job's leader",
        f["pids"]
    );
    assert_eq!(f["cmd"], "rm -rf victim");
    assert_eq!(f["exe"], "/usr/bin/rm");
    assert_eq!(f["user"], "root");
    assert_eq!(f["uid"], "0");
    assert_eq!(f["budget"], BUDGET.to_string());
    assert!(
        f["count"].parse::<u64>().expect("count") > BUDGET,
        "count {} crossed the budget",
        f["count"]
    );
    assert!(
        f["first_path"].contains("victim") || f["first_path"].starts_with("f0"),
        "first path {} is a victim file",
        f["first_path"]
    );
    assert!(
        ["remote", "local", "none", "unknown"].contains(&f["session_class"].as_str()),
        "session class {}",
        f["session_class"]
    );
    // The same incident in the JSON event log, with the schema's fields.
    let logged = agent
        .events()
        .into_iter()
        .find(|e| e["incident"]["id"] == id && e["incident"]["outcome"] == "held")
        .expect("the hold in the event log");
    assert_eq!(
        logged["incident"]["session"]["class"],
        f["session_class"].as_str()
    );
    assert_eq!(logged["incident"]["pgid"], job.pgid());
    assert_eq!(
        held["timereported"], logged["incident"]["time"],
        "the event's own time"
    );

    approve(&agent, id);
    assert!(
        job.wait(Duration::from_secs(60)).is_some(),
        "the approved job finishes"
    );
    let approved = wait_for("the approved line", Duration::from_secs(10), || {
        rs.with_msgid("approved").pop()
    });
    assert_eq!(approved["syslogseverity"], "5", "notice");
    // `guardrail events` reads the same timeline back from the JSON log.
    let out = Command::new(guardrail_bin())
        .args(["events", "--log"])
        .arg(&agent.event_log)
        .output()
        .expect("guardrail events");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "incident {id} held [rule test-job, tier tracepoint]: held job \"rm -rf victim\""
        )) && text.contains(&format!("incident {id} approved")),
        "guardrail events shows the hold and its approval:\n{text}"
    );
    let status = agent.stop().expect("agent stops");
    assert!(status.success());
    wait_for("agent_stopped", Duration::from_secs(10), || {
        rs.with_msgid("agent_stopped").pop()
    });
    assert_eq!(
        rs.with_msgid("held").len(),
        1,
        "exactly one line for the hold"
    );
}

#[test]
fn agent_events_reach_rsyslog_over_udp() {
    let _k = kernel_lock();
    let rs = Rsyslog::start();
    let Scenario { agent, .. } = scenario(&syslog_toml(&format!("udp://127.0.0.1:{}", rs.udp)));
    let started = wait_for("agent_started over UDP", Duration::from_secs(10), || {
        rs.with_msgid("agent_started").pop()
    });
    assert_eq!(started["protocol-version"], "1");
    assert_eq!(started["syslogseverity"], "6", "info");
    let sd = parse_sd(started["structured-data"].as_str().expect("sd"));
    assert_eq!(sd["guardrail@32473"]["tier"], "tracepoint");
    assert!(agent.stop().expect("stops").success());
    wait_for("agent_stopped over UDP", Duration::from_secs(10), || {
        rs.with_msgid("agent_stopped").pop()
    });
}

#[test]
fn alertmanager_alert_fires_on_hold_resolves_on_approve_and_metrics_move() {
    let _k = kernel_lock();
    let am = Alertmanager::start();
    let metrics_port = free_tcp_port();
    let textfile_dir = tempfile::tempdir().expect("temp dir");
    let textfile = textfile_dir.path().join("guardrail.prom");
    let Scenario { agent, cg, s } = scenario(&format!(
        "{}[alerts.prometheus]\nlisten = \"127.0.0.1:{metrics_port}\"\ntextfile = \"{}\"\n[alerts.alertmanager]\nurl = \"http://127.0.0.1:{}\"\n",
        no_syslog(),
        textfile.display(),
        am.port
    ));
    let before = scrape(metrics_port);
    assert_eq!(before.get("guardrail_up", &[]), 1.0);
    assert_eq!(before.get("guardrail_tier", &[("tier", "tracepoint")]), 1.0);
    assert_eq!(before.get("guardrail_tier", &[("tier", "lsm")]), 0.0);
    assert_eq!(before.get("guardrail_holds_open", &[]), 0.0);
    assert_eq!(
        before.value(
            "guardrail_incidents_total",
            &[("outcome", "held"), ("rule", "test-job")]
        ),
        None
    );

    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent.wait_hold(Duration::from_secs(60)).expect("held");
    let alert = wait_for("the alert in Alertmanager", Duration::from_secs(15), || {
        am.alert_for(id)
    });
    let labels = &alert["labels"];
    assert_eq!(labels["alertname"], "GuardrailJobHeld");
    assert_eq!(labels["host"], hostname());
    assert_eq!(labels["rule"], "test-job");
    assert_eq!(labels["severity"], "critical");
    assert_eq!(labels["incident"], id.to_string());
    assert_eq!(alert["status"]["state"], "active");
    assert_eq!(
        alert["annotations"]["approve"],
        format!("guardrail approve {id}")
    );

    let held = scrape(metrics_port);
    assert_eq!(held.get("guardrail_holds_open", &[]), 1.0);
    assert_eq!(
        held.get(
            "guardrail_incidents_total",
            &[("outcome", "held"), ("rule", "test-job")]
        ),
        1.0
    );
    assert!(held.get("guardrail_deletions_counted_total", &[("rule", "test-job")]) > BUDGET as f64);
    // The textfile is rewritten by its own delivery thread, soon after the event.
    wait_for(
        "the textfile shows the hold",
        Duration::from_secs(5),
        || {
            let prom = std::fs::read_to_string(&textfile).ok()?;
            let file = Scrape(parse_prometheus(&prom).expect("the textfile parses"));
            (file.get("guardrail_holds_open", &[]) == 1.0).then_some(())
        },
    );

    approve(&agent, id);
    assert!(
        job.wait(Duration::from_secs(60)).is_some(),
        "the approved job finishes"
    );
    // Resolved: Alertmanager no longer lists it as active (resolved alerts drop out of the
    // list, or show an endsAt in the past).
    wait_for("the alert resolved", Duration::from_secs(15), || {
        match am.alert_for(id) {
            None => Some(()),
            Some(a) if a["status"]["state"] != "active" => Some(()),
            Some(_) => None,
        }
    });
    let after = wait_for("metrics after approval", Duration::from_secs(5), || {
        let m = scrape(metrics_port);
        // Alertmanager can show the resolution a moment before the delivery thread counts it.
        (m.get("guardrail_holds_open", &[]) == 0.0
            && m.get(
                "guardrail_events_delivered_total",
                &[("destination", "alertmanager")],
            ) >= 2.0)
            .then_some(m)
    });
    assert_eq!(
        after.get(
            "guardrail_incidents_total",
            &[("outcome", "approved"), ("rule", "test-job")]
        ),
        1.0
    );
    assert_eq!(
        after.get(
            "guardrail_events_dropped_total",
            &[("destination", "alertmanager")]
        ),
        0.0
    );
}

/// An `alert` rule stops nothing: its crossing reaches Alertmanager under its own name, not as a
/// held job (the old agent named every unlisted outcome `GuardrailJobHeld`, so a routine crossing
/// paged like a hold).
#[test]
fn an_alert_rules_crossing_fires_as_a_budget_alert_and_the_job_finishes() {
    let _k = kernel_lock();
    let am = Alertmanager::start();
    let Scenario { agent, cg, s } = scenario(&format!(
        "action = \"alert\"\n{}[alerts.alertmanager]\nurl = \"http://127.0.0.1:{}\"\n",
        no_syslog(),
        am.port
    ));
    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    assert!(
        job.wait(Duration::from_secs(60)).is_some(),
        "the job is not stopped"
    );
    assert!(!s.path().join("victim").exists(), "every file deleted");
    let alert = wait_for("the alert in Alertmanager", Duration::from_secs(15), || {
        am.alerts()
            .into_iter()
            .find(|a| a["labels"]["rule"] == "test-job")
    });
    assert_eq!(alert["labels"]["alertname"], "GuardrailDeletionBudgetAlert");
    assert_eq!(alert["labels"]["host"], hostname());
    assert_eq!(alert["annotations"]["command"], "rm -rf victim");
    assert!(agent.holds().is_empty(), "nothing held");
    assert!(agent.stop().expect("stops").success());
}

#[test]
fn with_the_collectors_dead_the_job_is_still_held_and_the_loss_is_counted() {
    let _k = kernel_lock();
    let mut rs = Rsyslog::start();
    let mut am = Alertmanager::start();
    let metrics_port = free_tcp_port();
    let Scenario { agent, cg, s } = scenario(&format!(
        "{}[alerts.prometheus]\nlisten = \"127.0.0.1:{metrics_port}\"\n[alerts.alertmanager]\nurl = \"http://127.0.0.1:{}\"\n",
        syslog_toml(&format!("tcp://127.0.0.1:{}", rs.tcp)),
        am.port
    ));
    wait_for("agent_started delivered", Duration::from_secs(10), || {
        rs.with_msgid("agent_started").pop()
    });
    rs.stop();
    am.stop();

    let mut job = Job::spawn_in("rm -rf victim", s.path(), Some(&cg));
    let id = agent
        .wait_hold(Duration::from_secs(60))
        .expect("held with the collectors dead");
    assert!(
        wait_until(Duration::from_secs(10), || job.stopped()),
        "every process of the job is stopped"
    );
    let left = settle(&s.path().join("victim"), Duration::from_millis(700));
    assert!(
        FILES - left <= BUDGET as usize + 1,
        "{} files gone: the budget held while delivery failed",
        FILES - left
    );
    // The agent answers at once while its delivery threads retry.
    let t = Instant::now();
    assert_eq!(agent.holds().len(), 1);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "status took {:?}",
        t.elapsed()
    );
    agent.cli_ok(&["deny", &id.to_string()]);
    assert!(
        job.wait(Duration::from_secs(10)).is_some(),
        "the denied job ends"
    );
    let m = wait_for("losses counted", Duration::from_secs(30), || {
        let m = scrape(metrics_port);
        (m.get(
            "guardrail_events_dropped_total",
            &[("destination", "alertmanager")],
        ) >= 2.0
            && m.get(
                "guardrail_events_dropped_total",
                &[("destination", "syslog")],
            ) >= 1.0)
            .then_some(m)
    });
    assert_eq!(m.get("guardrail_holds_open", &[]), 0.0);
    assert_eq!(
        m.get(
            "guardrail_incidents_total",
            &[("outcome", "denied"), ("rule", "test-job")]
        ),
        1.0
    );
    assert!(
        agent.stop().expect("stops").success(),
        "the agent still stops cleanly"
    );
}

#[test]
fn events_subcommand_reads_filters_and_prints_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("events.jsonl");
    let old = r#"{"agent":{"time":"2020-01-01T00:00:00.000Z","host":"h1","kind":"agent_started","message":"guardrail agent started, tier lsm"}}"#;
    let new = r#"{"agent":{"time":"2999-01-01T00:00:00.000Z","host":"h1","kind":"policy_rejected","message":"policy rejected"}}"#;
    std::fs::write(&log, format!("{old}\n{new}\n")).expect("write log");
    let run = |args: &[&str]| {
        let out = Command::new(guardrail_bin())
            .arg("events")
            .arg("--log")
            .arg(&log)
            .args(args)
            .output()
            .expect("guardrail events runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let all = run(&[]);
    assert_eq!(
        all,
        "2020-01-01T00:00:00.000Z h1 agent_started: guardrail agent started, tier lsm\n2999-01-01T00:00:00.000Z h1 policy_rejected: policy rejected\n"
    );
    assert_eq!(run(&["--since", "1d", "--json"]), format!("{new}\n"));
    assert_eq!(
        run(&["--since", "2021-06-01T00:00:00+02:00"])
            .lines()
            .count(),
        1
    );
    let bad = Command::new(guardrail_bin())
        .args(["events", "--since", "whenever", "--log"])
        .arg(&log)
        .output()
        .expect("runs");
    assert!(!bad.status.success(), "a bad --since is an error");
}

#[test]
fn the_prometheus_parser_rejects_malformed_pages() {
    assert!(parse_prometheus("# TYPE a_total counter\na_total{x=\"1\"} 2\n").is_ok());
    assert!(parse_prometheus("a_total 2\n").is_err(), "no TYPE");
    assert!(
        parse_prometheus("# TYPE a counter\na 2\n").is_err(),
        "counter without _total"
    );
    assert!(
        parse_prometheus("# TYPE a gauge\na{x=1} 2\n").is_err(),
        "unquoted label"
    );
    assert!(
        parse_prometheus("# TYPE a gauge\na two\n").is_err(),
        "bad value"
    );
    let s = parse_prometheus("# TYPE a gauge\na{x=\"q\\\"\\\\\",y=\"\"} 1.5\n").expect("parses");
    assert_eq!(s[0].labels["x"], "q\"\\");
    assert_eq!(s[0].value, 1.5);
}

#[test]
fn events_follow_prints_lines_as_they_are_appended() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("events.jsonl");
    std::fs::write(&log, "").expect("create log");
    let mut child = Command::new(guardrail_bin())
        .args(["events", "--follow", "--log"])
        .arg(&log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("guardrail events --follow");
    let line = r#"{"agent":{"time":"2024-05-01T03:00:00.000Z","host":"h2","kind":"policy_reloaded","message":"policy reloaded (SIGHUP)"}}"#;
    // Written in two parts: a half-written line must not be printed half.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("open log");
    f.write_all(&line.as_bytes()[..40]).expect("append");
    std::thread::sleep(Duration::from_millis(400));
    f.write_all(&line.as_bytes()[40..]).expect("append");
    f.write_all(b"\n").expect("append");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut first);
        let _ = tx.send(first);
    });
    let got = rx.recv_timeout(Duration::from_secs(10));
    stop_child(&mut child);
    assert_eq!(
        got.expect("a line within 10s"),
        "2024-05-01T03:00:00.000Z h2 policy_reloaded: policy reloaded (SIGHUP)\n"
    );
}
