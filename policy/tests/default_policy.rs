//! The shipped policy and drop-in merging.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use guardrail_policy::*;

#[test]
fn shipped_default_is_clean_on_a_host_that_has_its_paths() {
    let c = check_str(POLICY_PATH, DEFAULT_POLICY, &common::host());
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    let p = c.policy.expect("loads");
    assert_eq!(p.mode, Mode::Enforce);
    let d = &p.deletion;
    assert!((100..=1000).contains(&d.budget));
    assert_eq!(d.window, Duration::from_secs(60));
    assert_eq!(d.action, Action::Hold);
    assert_eq!(d.hold_timeout, Duration::from_secs(1800));
    assert_eq!(d.on_deny, OnDeny::Kill);
    assert_eq!(d.on_agent_stop, OnAgentStop::End);
    assert!(d.protect_mount_points);
    // Budgets above the job: a loop of one job per file is stopped within the first few
    // hundred, above what one job may use plus some work by hand.
    assert!(d.session.enabled && d.user.enabled);
    assert_eq!((d.session.budget, d.user.budget), (500, 750));
    assert_eq!(d.session.window, Duration::from_secs(60));
    assert_eq!(d.user.window, Duration::from_secs(60));
    assert_eq!(
        (d.session.action, d.user.action),
        (Action::Hold, Action::Hold)
    );
    assert!(d.session.budget > d.budget && d.user.budget > d.session.budget);
    assert!(d.shared_budgets);
    // /run and /dev/shm: system daemons' state churn (logind rewrites files in /run/systemd at
    // every login) must never count against a budget.
    for t in [
        "/tmp",
        "/var/tmp",
        "/var/cache",
        "/home/*/.cache",
        "/run",
        "/dev/shm",
    ] {
        assert!(d.targets.contains(&PathBuf::from(t)), "{t}");
    }
    for r in ["/", "/etc", "/usr", "/etc/guardrail", "/var/lib/guardrail"] {
        assert!(d.protected_roots.contains(&PathBuf::from(r)), "{r}");
    }
    assert!(d.data_dirs.is_empty() && d.rules.is_empty());
    let exempt: Vec<&PathBuf> = d
        .exemptions
        .iter()
        .flat_map(|e| &e.who.executables)
        .collect();
    for x in [
        "dpkg",
        "apt",
        "apt-get",
        "rpm",
        "dnf",
        "systemd-tmpfiles",
        "logrotate",
    ] {
        assert!(
            exempt.iter().any(|p| p.file_name().is_some_and(|n| n == x)),
            "{x}"
        );
    }
    let s = &p.shutdown;
    assert_eq!(
        (s.remote, s.local, s.none, s.unknown),
        (
            ShutdownAction::Confirm,
            ShutdownAction::Allow,
            ShutdownAction::Allow,
            ShutdownAction::Confirm
        )
    );
    assert_eq!(s.serial_console, SessionClass::Local);
    assert_eq!(p.alerts.syslog.facility_code, 10);
    assert_eq!(p.alerts.prometheus_listen, None);
}

#[test]
fn shipped_default_on_an_empty_host_only_warns_about_paths() {
    let c = check_str(POLICY_PATH, DEFAULT_POLICY, &MemResolver::new());
    assert!(c.policy.is_some());
    assert!(!c.diagnostics.is_empty());
    assert!(
        c.diagnostics.iter().all(|d| d.code == Code::PathMissing),
        "{:#?}",
        c.diagnostics
    );
}

#[test]
fn shipped_commented_examples_are_valid_when_uncommented() {
    // Every commented TOML line in the examples, uncommented, must still check clean.
    let mut text = String::new();
    let mut in_example = false;
    for line in DEFAULT_POLICY.lines() {
        let t = line.trim_start_matches("# ");
        if t.starts_with("[[deletion.data_dir]]") || t.starts_with("[[deletion.rule]]") {
            in_example = line.starts_with('#');
        }
        let looks_like_toml = t.starts_with('[')
            || t.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.bytes().all(|c| c.is_ascii_lowercase() || c == b'_')
            });
        if in_example && line.starts_with("# ") && looks_like_toml {
            text.push_str(t);
            text.push('\n');
        } else if in_example && line.trim().is_empty() {
            continue;
        } else if !line.starts_with('#') {
            in_example = false;
            text.push_str(line);
            text.push('\n');
        }
    }
    let host = common::host()
        .with_path("/backup", 0x801, 9000)
        .with_cgroup("backup.service", 77);
    let c = check_str("uncommented.toml", &text, &host);
    assert!(c.diagnostics.is_empty(), "{text}\n{:#?}", c.diagnostics);
    let p = c.policy.expect("loads");
    assert_eq!(p.deletion.data_dirs.len(), 2);
    assert_eq!(p.deletion.rules.len(), 1);
    assert_eq!(p.deletion.rules[0].mode, Mode::Audit);
}

fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

#[test]
fn dropin_overrides_scalars_and_unions_lists() {
    let c = check_sources(
        &files(&[
            (POLICY_PATH, DEFAULT_POLICY),
            (
                "/etc/guardrail/policy.d/10-site.toml",
                "mode = \"audit\"\n[deletion]\nbudget = 50\ntargets = [\"/srv/releases\", \"/tmp\"]\nprotected_roots = [\"/srv/keep\"]\n[shutdown]\nlocal = \"confirm\"\n",
            ),
        ]),
        &common::host(),
    );
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    let p = c.policy.expect("loads");
    assert_eq!(p.mode, Mode::Audit);
    assert_eq!(p.deletion.budget, 50);
    assert_eq!(
        p.deletion.window,
        Duration::from_secs(60),
        "untouched scalars stay"
    );
    let t = &p.deletion.targets;
    assert_eq!(
        t.iter().filter(|x| *x == &PathBuf::from("/tmp")).count(),
        1,
        "union, no duplicates"
    );
    assert_eq!(t.last(), Some(&PathBuf::from("/srv/releases")));
    assert_eq!(
        t.len(),
        7,
        "the six shipped targets and the drop-in's new one"
    );
    assert!(
        p.deletion
            .protected_roots
            .contains(&PathBuf::from("/srv/keep"))
    );
    assert!(p.deletion.protected_roots.contains(&PathBuf::from("/etc")));
    assert_eq!(p.shutdown.local, ShutdownAction::Confirm);
    assert_eq!(p.shutdown.remote, ShutdownAction::Confirm);
    assert_eq!(p.sources.len(), 2);
}

#[test]
fn dropin_replaces_same_name_tables_and_appends_new_ones() {
    let main = "[deletion]\nprotected_roots = [\"/\"]\n[[deletion.rule]]\nname = \"deploy\"\nmatch = { user = \"alice\" }\ntargets = [\"/srv/releases\"]\nbudget = 0\n[[deletion.exempt]]\nname = \"package-managers\"\nexecutables = [\"/usr/bin/dpkg\"]\n";
    let dropin = "[[deletion.rule]]\nname = \"deploy\"\nmatch = { executable = \"/usr/bin/deploy\" }\nbudget = 10\n[[deletion.rule]]\nname = \"db\"\nmatch = { unit = \"postgresql@15-main.service\" }\n[[deletion.exempt]]\nname = \"package-managers\"\nexecutables = [\"/usr/bin/rpm\"]\n";
    let c = check_sources(
        &files(&[("main.toml", main), ("drop.toml", dropin)]),
        &common::host(),
    );
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    let p = c.policy.expect("loads");
    let r = &p.deletion.rules;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].name, "deploy");
    assert_eq!(r[0].matcher, JobMatch::Executable("/usr/bin/deploy".into()));
    assert_eq!(r[0].budget, 10);
    assert!(
        r[0].targets.is_empty(),
        "the whole table is replaced, not merged"
    );
    assert_eq!(r[1].name, "db");
    assert_eq!(
        r[1].budget, 300,
        "rule budget defaults to [deletion].budget"
    );
    assert_eq!(p.deletion.exemptions.len(), 1);
    assert_eq!(
        p.deletion.exemptions[0].who.executables,
        vec![PathBuf::from("/usr/bin/rpm")]
    );
}

#[test]
fn dropin_errors_point_into_the_dropin() {
    let c = check_sources(
        &files(&[
            (POLICY_PATH, DEFAULT_POLICY),
            (
                "/etc/guardrail/policy.d/20-bad.toml",
                "\n[deletion]\ntargets = [\"relative\"]\n",
            ),
        ]),
        &common::host(),
    );
    assert!(c.policy.is_none());
    let d = &c.diagnostics[0];
    assert_eq!(
        (d.code, d.file.as_str(), d.line, d.column),
        (
            Code::RelativePath,
            "/etc/guardrail/policy.d/20-bad.toml",
            3,
            12
        )
    );
}

#[test]
fn syntax_error_in_a_dropin_stops_there() {
    let c = check_sources(
        &files(&[(POLICY_PATH, DEFAULT_POLICY), ("d.toml", "[shutdown\n")]),
        &common::host(),
    );
    assert!(c.policy.is_none());
    assert_eq!(c.diagnostics.len(), 1);
    assert_eq!(
        (c.diagnostics[0].code, c.diagnostics[0].line),
        (Code::TomlSyntax, 1)
    );
}

#[test]
fn check_files_reads_dropins_in_name_order() {
    let dir = std::env::temp_dir().join(format!("guardrail-policy-test-{}", std::process::id()));
    let dropins = dir.join("policy.d");
    std::fs::create_dir_all(&dropins).expect("mkdir");
    std::fs::write(dir.join("policy.toml"), DEFAULT_POLICY).expect("write");
    std::fs::write(dropins.join("20-b.toml"), "[deletion]\nbudget = 20\n").expect("write");
    std::fs::write(dropins.join("10-a.toml"), "[deletion]\nbudget = 10\n").expect("write");
    std::fs::write(
        dropins.join("30-c.toml.disabled"),
        "[deletion]\nbudget = 30\n",
    )
    .expect("write");
    let c = check_files(&dir.join("policy.toml"), Some(&dropins), &common::host());
    std::fs::remove_dir_all(&dir).expect("cleanup");
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    let p = c.policy.expect("loads");
    assert_eq!(p.deletion.budget, 20);
    assert_eq!(p.sources.len(), 3);
    assert!(p.sources[1].ends_with("10-a.toml"));
}

#[test]
fn same_name_twice_in_one_file_is_an_error_but_across_files_replaces() {
    let one = "[[shutdown.exception]]\nname = \"a\"\nunits = [\"x.service\"]\n";
    let c = check_sources(
        &files(&[("m.toml", &format!("{one}{one}"))]),
        &common::host(),
    );
    assert_eq!(
        c.diagnostics
            .iter()
            .filter(|d| d.code == Code::Duplicate)
            .map(|d| (d.line, d.column))
            .collect::<Vec<_>>(),
        vec![(5, 8)]
    );
    let c = check_sources(&files(&[("m.toml", one), ("d.toml", one)]), &common::host());
    assert!(c.diagnostics.iter().all(|d| d.code != Code::Duplicate));
    assert_eq!(c.policy.expect("loads").shutdown.exceptions.len(), 1);
}

#[test]
fn shutdown_decisions() {
    let c = check_str(POLICY_PATH, DEFAULT_POLICY, &common::host());
    let p = c.policy.expect("loads");
    let d = explain_shutdown(&p, SessionClass::Remote, None, Some("/usr/sbin/reboot"));
    assert_eq!(
        (d.action, d.exception.as_deref()),
        (ShutdownAction::Confirm, None)
    );
    let d = explain_shutdown(
        &p,
        SessionClass::Remote,
        Some("unattended-upgrades.service"),
        None,
    );
    assert_eq!(
        (d.action, d.exception.as_deref()),
        (ShutdownAction::Allow, Some("unattended-upgrades"))
    );
    assert_eq!(
        explain_shutdown(&p, SessionClass::None, None, None).action,
        ShutdownAction::Allow
    );
    assert_eq!(
        explain_shutdown(&p, SessionClass::Unknown, None, None).action,
        ShutdownAction::Confirm
    );
    let d = explain_shutdown(&p, SessionClass::SerialConsole, None, None);
    assert_eq!(
        (d.class, d.action),
        (SessionClass::Local, ShutdownAction::Allow)
    );
    let mut p2 = p.clone();
    p2.shutdown.serial_console = SessionClass::Remote;
    assert_eq!(
        explain_shutdown(&p2, SessionClass::SerialConsole, None, None).action,
        ShutdownAction::Confirm
    );
    assert!(d.to_string().contains("local"));
}

#[test]
fn system_daemons_state_churn_is_free_under_the_default_policy() {
    // Every SSH login makes logind replace and remove files in /run/systemd; with /run
    // counted, a host with busy automation had logind itself held (and every login hung).
    let h = common::host();
    let c = check_str(POLICY_PATH, DEFAULT_POLICY, &h);
    let p = c.policy.expect("loads");
    let compiled = compile(&p, &h);
    let logind = JobSpec {
        unit: Some("systemd-logind.service".into()),
        exe: Some("/lib/systemd/systemd-logind".into()),
        user: Some("root".into()),
        cgroup: None,
    };
    for path in [
        "/run/systemd/sessions/42",
        "/run/systemd/users/1000",
        "/dev/shm/PostgreSQL.1804289383",
    ] {
        let e = explain(&compiled, std::path::Path::new(path), &logind, &h);
        assert_eq!(e.verdict, Verdict::InTarget, "{path}: {e:?}");
    }
    // Durable state next to it is still counted.
    let e = explain(
        &compiled,
        std::path::Path::new("/var/lib/systemd/linger/alice"),
        &logind,
        &h,
    );
    assert!(matches!(e.verdict, Verdict::Counted { .. }), "{e:?}");
    // ... but logind is in never_hold: explain says it is let go, not held for an admin.
    assert_eq!(e.never_held_unit.as_deref(), Some("systemd-logind.service"));
    let text = e.to_string();
    assert!(
        text.contains("systemd-logind.service is never held (deletion.never_hold)")
            && !text.contains("held for an admin"),
        "{text}"
    );
}

#[test]
fn never_hold_defaults_to_the_login_and_logging_services() {
    let shipped = check_str(POLICY_PATH, DEFAULT_POLICY, &common::host())
        .policy
        .expect("loads");
    for u in [
        "systemd-logind.service",
        "systemd-journald.service",
        "ssh.service",
        "init.scope",
    ] {
        assert!(shipped.deletion.never_hold.iter().any(|x| x == u), "{u}");
    }
    // A policy without the key gets the same list; an empty list holds everything.
    let without = check_str("p.toml", "[deletion]\nbudget = 10\n", &common::host())
        .policy
        .expect("loads");
    assert_eq!(without.deletion.never_hold, shipped.deletion.never_hold);
    let empty = check_str(
        "p.toml",
        "[deletion]\nbudget = 10\nnever_hold = []\n",
        &common::host(),
    )
    .policy
    .expect("loads");
    assert!(empty.deletion.never_hold.is_empty());
    // A name that is no job unit is an error at its position.
    let bad = check_str(
        "p.toml",
        "[deletion]\nbudget = 10\nnever_hold = [\"sshd\"]\n",
        &common::host(),
    );
    let d = bad
        .diagnostics
        .iter()
        .find(|d| d.code == Code::MatchesNothing)
        .expect("diagnosed");
    assert_eq!((d.line, d.column), (3, 15));
    assert!(d.message.contains("deletion.never_hold"), "{}", d.message);
}

#[test]
fn on_agent_stop_is_end_or_continue() {
    let load = |v: &str| {
        check_str(
            "p.toml",
            &format!("[deletion]\nprotected_roots = [\"/\"]\non_agent_stop = \"{v}\"\n"),
            &common::host(),
        )
    };
    let c = load("continue");
    assert!(
        !c.diagnostics.iter().any(|d| d.is_error()),
        "{:#?}",
        c.diagnostics
    );
    assert_eq!(
        c.policy.expect("loads").deletion.on_agent_stop,
        OnAgentStop::Continue
    );
    let bad = load("detach");
    let d = bad
        .diagnostics
        .iter()
        .find(|d| d.is_error())
        .expect("an error for a bad value");
    assert!(
        d.to_string()
            .contains("\"detach\" is not a valid value for deletion.on_agent_stop"),
        "{d}"
    );
    assert!(
        d.to_string()
            .contains("deletion.on_agent_stop is one of: end, continue"),
        "{d}"
    );
}
