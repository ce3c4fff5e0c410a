//! `guardrail policy suggest --events FILE [--policy FILE] [--out FILE]`: learning mode writes the
//! rules (the `audit2allow` convention). Reads the event log (incidents and job summaries),
//! asks the policy library for a drop-in ([`guardrail_policy::suggest`]), checks the policy with
//! it in force with the code of `guardrail policy check`, and replays the jobs it learned from,
//! and an unscoped runaway of each unit, with the code of `guardrail policy test`.
//!
//! Exit codes: 0 a drop-in was suggested, 1 nothing to suggest, 2 bad input (an unreadable log,
//! a record that does not read, a policy with errors: a message naming file:line).
use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Result;
use guardrail_policy::{self as gp, Resolver, suggest as sg};

use crate::{
    guards::deletion::replay::{self, JobSummary},
    incident::Incident,
    policy::{self as policy_glue, PolicySource},
    text,
};

/// A record longer than this is not the agent's (its records are a few KiB).
const MAX_LINE: u64 = 4 << 20;
/// The runaway replayed against each suggested rule, at least (deletions in one window).
const RUNAWAY: u64 = 10_000;

const SUGGESTED: u8 = 0;
const NOTHING: u8 = 1;
const BAD_INPUT: u8 = 2;

pub fn run(events: &Path, policy: Option<&Path>, out: Option<&Path>) -> Result<ExitCode> {
    match suggest(events, policy, out) {
        Ok(code) => Ok(ExitCode::from(code)),
        Err(msg) => {
            for line in msg.lines() {
                eprintln!("guardrail: {}", text::escape_line(line));
            }
            Ok(ExitCode::from(BAD_INPUT))
        }
    }
}

/// What the log holds: every incident's last record, and job summaries by incident.
#[derive(Default)]
struct Log {
    incidents: BTreeMap<u64, Incident>,
    jobs: BTreeMap<u64, JobSummary>,
    warnings: Vec<String>,
}

fn read_log(path: &Path) -> std::result::Result<Log, String> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|e| format!("{name}: {e}"))?;
    let mut r = BufReader::new(file);
    let mut log = Log::default();
    let mut buf = Vec::new();
    for n in 1.. {
        buf.clear();
        let k = (&mut r)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .map_err(|e| format!("{name}:{n}: {e}"))?;
        if k == 0 {
            break;
        }
        let complete = buf.ends_with(b"\n");
        if !complete && k as u64 == MAX_LINE {
            return Err(format!(
                "{name}:{n}: a line longer than {MAX_LINE} bytes: not a guardrail event log"
            ));
        }
        let line = buf.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            // The agent was stopped in the middle of its last write: the rest still reads.
            Err(_) if !complete => {
                log.warnings
                    .push(format!("{name}:{n}: the last line is cut short; skipped"));
                continue;
            }
            Err(e) => {
                return Err(format!(
                    "{name}:{n}: not a JSON record ({e}): is this guardrail's event log (alerts.event_log)?"
                ));
            }
        };
        if let Some(j) = v.get("job") {
            let s: JobSummary = serde_json::from_value(j.clone())
                .map_err(|e| format!("{name}:{n}: a job summary that does not read: {e}"))?;
            if s.incident != 0 {
                log.jobs.insert(s.incident, s);
            }
        } else if let Some(i) = v.get("incident") {
            let inc: Incident = serde_json::from_value(i.clone())
                .map_err(|e| format!("{name}:{n}: an incident that does not read: {e}"))?;
            // The last record of an incident carries its final outcome.
            log.incidents.insert(inc.id, inc);
        }
    }
    Ok(log)
}

fn evidence(inc: &Incident, job: Option<&JobSummary>) -> sg::Evidence {
    let mut paths = vec![inc.first_path.clone()];
    if inc.last_path != inc.first_path {
        paths.push(inc.last_path.clone());
    }
    paths.retain(|p| !p.is_empty());
    sg::Evidence {
        incident: inc.id,
        time: inc.time.clone(),
        kind: inc.kind.as_str().to_string(),
        outcome: inc.outcome.as_str().to_string(),
        level: inc.level.clone(),
        rule: inc.rule.clone(),
        unit: inc.unit.clone(),
        cgroup: inc.cgroup.clone(),
        session_class: inc.session.class.clone(),
        remote_host: inc.session.remote_host.clone(),
        user: inc.user.clone(),
        command: inc.command.clone(),
        pgid: inc.pgid,
        count: inc.count,
        budget: inc.budget,
        total: job.map(|j| j.total.max(inc.count)),
        // The crossing's count is a floor for the peak (the userspace tier records no peak).
        peak: job.map(|j| j.peak.max(inc.count)),
        paths,
    }
}

/// The host as the system resolver sees it, except that a suggested unit that is not running
/// now (a oneshot service) gets a cgroup id of its own, so that the replay can match it by name.
struct WithUnits {
    fake: BTreeMap<String, u64>,
}

impl Resolver for WithUnits {
    fn identity(&self, path: &Path) -> Option<(u64, u64)> {
        gp::SystemResolver.identity(path)
    }
    fn glob(&self, pattern: &str) -> Vec<PathBuf> {
        gp::SystemResolver.glob(pattern)
    }
    fn mount_points(&self) -> Vec<PathBuf> {
        gp::SystemResolver.mount_points()
    }
    fn uid(&self, user: &str) -> Option<u32> {
        gp::SystemResolver.uid(user)
    }
    fn cgroup_id(&self, unit_or_cgroup: &str) -> Option<u64> {
        gp::SystemResolver
            .cgroup_id(unit_or_cgroup)
            .or_else(|| self.fake.get(unit_or_cgroup).copied())
    }
    fn declared(&self, pattern: &str) -> gp::Declared {
        gp::SystemResolver.declared(pattern)
    }
}

fn suggest(
    events: &Path,
    policy: Option<&Path>,
    out: Option<&Path>,
) -> std::result::Result<u8, String> {
    let log = read_log(events)?;
    for w in &log.warnings {
        eprintln!("guardrail: warning: {}", text::escape_line(w));
    }
    let source = PolicySource::from_args(policy, None);
    let current = source.load().map_err(|r| {
        format!(
            "the policy in force has errors ({}):\n{r}",
            source.describe()
        )
    })?;
    let files = source
        .snapshot()
        .ok_or_else(|| format!("cannot read the policy files of {}", source.describe()))?;

    let evidence: Vec<sg::Evidence> = log
        .incidents
        .values()
        .map(|i| evidence(i, log.jobs.get(&i.id)))
        .collect();
    let is_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    let host = sg::Host {
        mount_points: gp::SystemResolver.mount_points(),
        is_dir: &is_dir,
    };
    let proposal = sg::suggest(&current.policy, &evidence, &host);
    let crossed = evidence
        .iter()
        .filter(|e| e.kind == "budget_crossed")
        .count();

    // The report goes to stdout with --out, else to stderr (stdout is the drop-in).
    let to_stdout = out.is_some();
    let say = |line: &str| {
        let line = text::escape_line(line);
        if to_stdout {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    };
    say(&format!(
        "read {} incidents ({crossed} budget crossings) and {} job summaries from {}",
        log.incidents.len(),
        log.jobs.len(),
        events.display()
    ));
    if proposal.rules.is_empty() {
        for n in &proposal.notes {
            say(&format!("note: {}", n.text));
        }
        say("nothing to suggest: no system service was held or would have been held");
        return Ok(NOTHING);
    }

    let text = sg::render(&proposal, &evidence, &events.display().to_string());
    let dropin_name = out
        .map(|o| o.display().to_string())
        .unwrap_or_else(|| format!("{}/50-suggested.toml (proposed)", gp::DROPIN_DIR));
    let mut candidate = files.clone();
    candidate.push((dropin_name.clone(), text.clone()));

    // The check of `guardrail policy check`.
    let checked = gp::check_sources(&candidate, &gp::SystemResolver);
    let errors = checked.errors().count();
    for d in &checked.diagnostics {
        for l in d.to_string().lines() {
            say(l);
        }
    }
    if errors > 0 || checked.policy.is_none() {
        return Err(format!(
            "the suggested drop-in does not pass `guardrail policy check` ({errors} error(s)): nothing written"
        ));
    }
    say(&format!(
        "policy check: {} with the suggested drop-in: no errors, {} warning(s)",
        source.describe(),
        checked.warnings().count()
    ));

    // The replay of `guardrail policy test`, with the suggested units matched by name.
    let loaded = policy_glue::load_sources(&candidate)
        .map_err(|r| format!("the policy with the suggested drop-in does not load:\n{r}"))?;
    let fake: BTreeMap<String, u64> = proposal
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| gp::SystemResolver.cgroup_id(&r.unit).is_none())
        .map(|(n, r)| (r.unit.clone(), u64::MAX - n as u64))
        .collect();
    let resolver = WithUnits { fake };
    let compiled = gp::compile(&loaded.policy, &resolver);
    let mut learned = 0;
    let mut still_held = 0;
    let mut runaway_free = 0;
    for r in &proposal.rules {
        let spec = gp::JobSpec {
            unit: Some(r.unit.clone()),
            ..Default::default()
        };
        let (rule, _) = gp::job_rule(&compiled, &spec, &resolver);
        say(&format!(
            "{}: rule \"{}\"{}, targets {}",
            r.unit,
            r.name,
            r.replaces
                .as_ref()
                .map(|n| format!(" (replaces rule \"{n}\")"))
                .unwrap_or_default(),
            r.targets()
                .iter()
                .map(|t| t.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut peak_seen = 0;
        for &i in &r.evidence {
            let e = &evidence[i];
            learned += 1;
            let job = log.jobs.get(&e.incident).cloned();
            let mut s = job.unwrap_or_else(|| synthetic(e, e.count));
            s.peak = s.peak.max(e.count);
            peak_seen = peak_seen.max(s.peak);
            let mut free = !e.paths.is_empty();
            let mut where_ = Vec::new();
            for p in &e.paths {
                let ex = gp::explain(&compiled, Path::new(p), &spec, &resolver);
                let ok = matches!(
                    ex.verdict,
                    gp::Verdict::InTarget | gp::Verdict::Exempt | gp::Verdict::DataOwner { .. }
                );
                free &= ok;
                where_.push(format!(
                    "{p}: {}",
                    match (&ex.verdict, &ex.deciding_dir) {
                        (gp::Verdict::InTarget, Some(d)) =>
                            format!("inside target {} (free)", d.display()),
                        _ if ok => "free".to_string(),
                        _ => "still counted".to_string(),
                    }
                ));
            }
            // Its deletions lay in the directories its paths show: none counted any more.
            let recorded_peak = s.peak;
            if free {
                s.peak = 0;
            }
            let (_, verdict) = replay::judge_rule(&loaded, rule, &s);
            if verdict.starts_with("would") {
                still_held += 1;
            }
            say(&format!(
                "  incident {} (pgid {}, \"{}\"): recorded {}, peak {recorded_peak}; {}; with the drop-in: {}",
                e.incident,
                e.pgid,
                text::cap_command(&e.command),
                e.outcome,
                where_.join("; "),
                if verdict.starts_with("would") {
                    format!("{verdict}: STILL HELD")
                } else {
                    format!("{verdict}: not held")
                }
            ));
        }
        // Not a blanket exemption: the same unit deleting elsewhere is still counted.
        let budget = loaded.rule_budget(rule);
        let runaway = synthetic(
            &evidence[r.evidence[0]],
            RUNAWAY.max(peak_seen).max(budget.saturating_add(1)),
        );
        let (_, verdict) = replay::judge_rule(&loaded, rule, &runaway);
        if !verdict.starts_with("would") {
            runaway_free += 1;
        }
        say(&format!(
            "  an unscoped runaway in {} ({} deletions outside these targets in one window): {verdict}",
            r.unit, runaway.peak
        ));
    }
    // And a person's runaway, under the default rule.
    let person = sg::Evidence {
        command: "rm -rf /srv".into(),
        ..Default::default()
    };
    let (_, verdict) = replay::judge_rule(&loaded, 0, &synthetic(&person, RUNAWAY));
    say(&format!(
        "  an unscoped runaway in a login session (rule \"{}\", {RUNAWAY} deletions): {verdict}",
        loaded.rule_name(0)
    ));

    if still_held == 0 {
        say(&format!(
            "replay: with the drop-in in force, none of the {learned} job(s) it learned from would have been held"
        ));
    } else {
        say(&format!(
            "WARNING: {still_held} of the {learned} job(s) it learned from would still be held: their recorded paths are not all inside the suggested targets"
        ));
    }
    if runaway_free == 0 {
        say(
            "replay: an unscoped runaway in each of these units would still be held: the rules are scoped, not exemptions",
        );
    } else {
        say(&format!(
            "WARNING: in {runaway_free} unit(s) an unscoped runaway would not be held (the rule's budget is that high)"
        ));
    }
    for n in &proposal.notes {
        say(&format!("note: {}", n.text));
    }

    match out {
        Some(path) => {
            write_new(path, &text)?;
            say(&format!(
                "wrote {}: review it, copy it to {}/ and reload the agent (systemctl reload guardrail)",
                path.display(),
                gp::DROPIN_DIR
            ));
        }
        None => print!("{text}"),
    }
    Ok(SUGGESTED)
}

/// A job summary for a job the log has no summary of (still running, or a runaway to replay).
fn synthetic(e: &sg::Evidence, peak: u64) -> JobSummary {
    JobSummary {
        time: e.time.clone(),
        host: String::new(),
        pgid: e.pgid,
        sid: 0,
        rule: e.rule.clone(),
        uid: 0,
        user: e.user.clone(),
        cgroup_id: 0,
        comm: String::new(),
        total: peak,
        peak,
        refused: 0,
        incident: e.incident,
        duration_secs: 0,
    }
}

/// A new file, never an existing one (nor through a symlink someone left there).
fn write_new(path: &Path, text: &str) -> std::result::Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| {
            format!(
                "{}: {e}{}",
                path.display(),
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    " (not overwritten: remove it or choose another --out)"
                } else {
                    ""
                }
            )
        })?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}
