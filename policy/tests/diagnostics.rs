//! Every diagnostic code, with its exact position.

mod common;

use guardrail_policy::{Code, Severity, check_files, check_str};

const PRE: &str = "[deletion]\nprotected_roots = [\"/\"]\n";

/// (code, policy text, expected (line, column) of every diagnostic with that code)
/// (code, policy text, positions)
type Case = (Code, String, Vec<(usize, usize)>);

fn cases() -> Vec<Case> {
    let p = |s: &str| format!("{PRE}{s}");
    let mut too_many = String::from(PRE);
    for i in 0..64 {
        too_many.push_str(&format!(
            "[[deletion.rule]]\nname = \"r{i}\"\nmatch = {{ user = \"{}\" }}\n",
            1000 + i
        ));
    }
    vec![
        (Code::UnknownKey, p("budgte = 3\n"), vec![(3, 1)]),
        (Code::UnknownKey, "[shutdown]\nremote = \"allow\"\n[[shutdown.exception]]\nname = \"x\"\nunit = [\"a.service\"]\n".into(), vec![(5, 1)]),
        (Code::WrongType, p("budget = \"3\"\n"), vec![(3, 10)]),
        (Code::WrongType, p("targets = \"/tmp\"\n"), vec![(3, 11)]),
        (Code::RelativePath, p("targets = [\"tmp\"]\n"), vec![(3, 12)]),
        (Code::RelativePath, p("[[deletion.rule]]\nname = \"x\"\nmatch = { executable = \"bin/deploy\" }\n"), vec![(5, 24)]),
        (Code::RelativePath, p("[[deletion.rule]]\nname = \"x\"\nmatch = { cgroup = \"system.slice/x.service\" }\n"), vec![(5, 20)]),
        (Code::BadDuration, p("window = \"5 min\"\n"), vec![(3, 10)]),
        (Code::BadDuration, p("hold_timeout = \"0s\"\n"), vec![(3, 16)]),
        (Code::BadDuration, "[shutdown]\nconfirm_window = \"1.5m\"\n".into(), vec![(2, 18)]),
        (Code::TargetConflict, "[deletion]\nprotected_roots = [\"/\", \"/srv\"]\ntargets = [\"/tmp\", \"/srv\"]\n".into(), vec![(3, 20)]),
        (Code::TargetConflict, p("targets = [\"/tmp\"]\n[[deletion.data_dir]]\npath = \"/tmp\"\n"), vec![(3, 12)]),
        (Code::TargetConflict, p("[[deletion.data_dir]]\npath = \"/srv/db\"\n[[deletion.rule]]\nname = \"x\"\nmatch = { user = \"alice\" }\ntargets = [\"/srv/db\"]\n"), vec![(8, 12)]),
        (Code::TargetConflict, "[deletion]\nprotected_roots = [\"/\", \"/home/alice/.cache\"]\ntargets = [\"/home/*/.cache\"]\n".into(), vec![(2, 25)]),
        (Code::MatchesNothing, p("[[deletion.rule]]\nname = \"x\"\nmatch = {}\n"), vec![(3, 1)]),
        (Code::MatchesNothing, p("[[deletion.rule]]\nname = \"x\"\nmatch = { unit = \"backup\" }\n"), vec![(5, 18)]),
        (Code::MatchesNothing, p("[[deletion.rule]]\nname = \"x\"\nmatch = { unit = \"backup.timer\" }\n"), vec![(5, 18)]),
        (Code::MatchesNothing, p("[[deletion.rule]]\nname = \"x\"\nmatch = { unit = \"postgresql@.service\" }\n"), vec![(5, 18)]),
        (Code::MatchesNothing, p("[[deletion.rule]]\nname = \"x\"\nmatch = { user = \"\" }\n"), vec![(5, 18)]),
        (Code::MatchesNothing, p("[[deletion.exempt]]\nname = \"x\"\nexecutables = []\n"), vec![(3, 1)]),
        (Code::TomlSyntax, "[deletion\nbudget = 3\n".into(), vec![(1, 10)]),
        (Code::TomlSyntax, p("targets = [\"/tmp\"\n"), vec![(4, 1)]),
        (Code::BadEnumValue, p("action = \"stop\"\n"), vec![(3, 10)]),
        (Code::BadEnumValue, "mode = \"enforcing\"\n".into(), vec![(1, 8)]),
        (Code::BadEnumValue, "[shutdown]\nremote = \"ask\"\nserial_console = \"none\"\n".into(), vec![(2, 10), (3, 18)]),
        (Code::BadEnumValue, "[alerts.syslog]\nfacility = \"local9\"\n".into(), vec![(2, 12)]),
        (Code::BudgetOutOfRange, p("budget = -1\n"), vec![(3, 10)]),
        (Code::BudgetOutOfRange, p("[deletion.session]\nbudget = -1\n"), vec![(4, 10)]),
        (Code::BadEnumValue, p("[deletion.user]\naction = \"stop\"\n"), vec![(4, 10)]),
        (Code::BadDuration, p("[deletion.session]\nwindow = \"0s\"\n"), vec![(4, 10)]),
        (Code::UnknownKey, p("[deletion.session]\nbudgte = 3\n"), vec![(4, 1)]),
        (Code::WrongType, p("shared_budgets = \"no\"\n"), vec![(3, 18)]),
        (Code::BudgetOutOfRange, p("budget = 1000000000\n"), vec![(3, 10)]),
        (Code::BudgetOutOfRange, p("[[deletion.rule]]\nname = \"x\"\nmatch = { user = \"alice\" }\nbudget = -5\n"), vec![(6, 10)]),
        (Code::TooManyRules, too_many, vec![(3 + 63 * 3, 1)]),
        (Code::BadGlob, p("targets = [\"/home/*.cache\"]\n"), vec![(3, 12)]),
        (Code::BadGlob, "[deletion]\nprotected_roots = [\"/\", \"/home/*\"]\n".into(), vec![(2, 25)]),
        (Code::Duplicate, p("[[deletion.rule]]\nname = \"x\"\nmatch = { user = \"alice\" }\n[[deletion.rule]]\nname = \"x\"\nmatch = { user = \"postgres\" }\n"), vec![(7, 8)]),
        (Code::Duplicate, p("[[deletion.rule]]\nname = \"a\"\nmatch = { user = \"alice\" }\n[[deletion.rule]]\nname = \"b\"\nmatch = { user = \"alice\" }\n"), vec![(8, 18)]),
        (Code::Duplicate, p("[[deletion.rule]]\nname = \"a\"\nmatch = { executable = \"/usr/bin/dpkg\" }\n[[deletion.exempt]]\nname = \"b\"\nexecutables = [\"/usr/bin/dpkg\"]\n"), vec![(8, 16)]),
        (Code::MissingKey, p("[[deletion.rule]]\nmatch = { user = \"alice\" }\n"), vec![(3, 1)]),
        (Code::MissingKey, p("[[deletion.rule]]\nname = \"x\"\n"), vec![(3, 1)]),
        (Code::MissingKey, p("[[deletion.data_dir]]\nowners = { users = [\"postgres\"] }\n"), vec![(3, 1)]),
        (Code::BadAddress, "[alerts.syslog]\nremote = \"syslog.example:514\"\n".into(), vec![(2, 10)]),
        (Code::BadAddress, "[alerts.prometheus]\nlisten = \"localhost\"\n".into(), vec![(2, 10)]),
        (Code::BadAddress, "[alerts.alertmanager]\nurl = \"127.0.0.1:9093\"\n".into(), vec![(2, 7)]),
        (Code::BadPath, p("targets = [\"/var/../etc\"]\n"), vec![(3, 12)]),
        (Code::BadPath, p("targets = [\"\"]\n"), vec![(3, 12)]),
        (Code::BadValue, "[alerts.syslog]\napp_name = \"guard rail\"\n".into(), vec![(2, 12)]),
        (Code::BadValue, p("[[deletion.rule]]\nname = \"x\"\nmatch = { user = \"alice\", unit = \"a.service\" }\n"), vec![(5, 34)]),
        (Code::PathMissing, p("targets = [\"/tmp\", \"/nonexistent\"]\n"), vec![(3, 20)]),
        (Code::PathMissing, p("targets = [\"/nohome/*/.cache\"]\n"), vec![(3, 12)]),
        (Code::TargetTooWide, "[deletion]\nprotected_roots = [\"/\", \"/srv/keep\"]\ntargets = [\"/srv\"]\n".into(), vec![(3, 12)]),
        (Code::TargetTooWide, "[deletion]\nprotected_roots = [\"/\", \"/home/alice/.cache\"]\ntargets = [\"/home/*/.cache\"]\n".into(), vec![]),
        (Code::TargetTooWide, "[deletion]\nprotected_roots = [\"/\", \"/home/alice/.cache/x\"]\ntargets = [\"/home/*/.cache\"]\n".into(), vec![(3, 12)]),
        (Code::TargetTooWide, p("targets = [\"/tmp\", \"/\"]\n"), vec![(3, 20)]),
        (Code::TargetTooWide, p("targets = [\"/var\"]\n[[deletion.data_dir]]\npath = \"/var/lib/postgresql\"\n"), vec![(3, 12)]),
        (Code::TargetTooWide, p("[[deletion.data_dir]]\npath = \"/srv/db\"\n[[deletion.rule]]\nname = \"x\"\nmatch = { user = \"alice\" }\ntargets = [\"/srv\"]\n"), vec![(8, 12)]),
        (Code::DurationTooLong, p("window = \"25h\"\nhold_timeout = \"169h\"\n"), vec![(3, 10), (4, 16)]),
        (Code::DurationTooLong, p("window = \"24h\"\nhold_timeout = \"168h\"\n"), vec![]),
        (Code::DurationTooLong, p("[[deletion.rule]]\nname = \"x\"\nmatch = { user = \"alice\" }\nwindow = \"18446744074s\"\n"), vec![(6, 10)]),
        (Code::DurationTooLong, "[shutdown]\nconfirm_window = \"61m\"\n".into(), vec![(2, 18)]),
        (Code::DurationTooLong, "[shutdown]\nconfirm_window = \"1h\"\n".into(), vec![]),
        (Code::NoDeletionBudget, p("budget = 0\n"), vec![(3, 10)]),
        (Code::NoDeletionBudget, p("budget = 0\n[[deletion.rule]]\nname = \"x\"\nmatch = { user = \"alice\" }\nbudget = 10\n"), vec![]),
        (Code::ExemptionTooWide, p("[[deletion.exempt]]\nname = \"x\"\nexecutables = [\"/usr/bin/dpkg\", \"/bin/bash\"]\n"), vec![(5, 33)]),
        (Code::ExemptionTooWide, p("[[deletion.exempt]]\nname = \"x\"\ncgroups = [\"/\"]\nusers = [\"root\"]\n"), vec![(5, 12), (6, 10)]),
        (Code::NotLoopback, "[alerts.prometheus]\nlisten = \"0.0.0.0:9477\"\n".into(), vec![(2, 10)]),
        (Code::NotLoopback, "[alerts.prometheus]\nlisten = \"127.0.0.1:9477\"\n".into(), vec![]),
        (Code::UnknownUser, p("[[deletion.rule]]\nname = \"x\"\nmatch = { user = \"nosuchuser\" }\n"), vec![(5, 18)]),
        (Code::RootUnprotected, "[deletion]\nprotected_roots = [\"/etc\"]\n".into(), vec![(2, 20)]),
    ]
}

#[test]
fn every_code_at_its_position() {
    let host = common::host();
    let mut seen = std::collections::BTreeSet::new();
    for (code, text, want) in cases() {
        let c = check_str("/etc/guardrail/policy.toml", &text, &host);
        let got: Vec<(usize, usize)> = c
            .diagnostics
            .iter()
            .filter(|d| d.code == code)
            .map(|d| (d.line, d.column))
            .collect();
        assert_eq!(
            got, want,
            "{code} in:\n{text}\ndiagnostics:\n{:#?}",
            c.diagnostics
        );
        for d in &c.diagnostics {
            assert_eq!(d.file, "/etc/guardrail/policy.toml");
            assert!(!d.message.is_empty() && !d.hint.is_empty(), "{d}");
        }
        if code.severity() == Severity::Error && !want.is_empty() {
            assert!(
                c.policy.is_none(),
                "{code}: an error must reject the policy"
            );
        }
        if code.severity() == Severity::Warning && c.errors().count() == 0 {
            assert!(
                c.policy.is_some(),
                "{code}: a warning must not reject the policy"
            );
        }
        if !want.is_empty() {
            seen.insert(code);
        }
    }
    // ReadError is covered below; UnsafePath in policy/tests/failsafe.rs (it needs a real
    // filesystem); ProtectedInTarget is no longer emitted (E0018 took its place); every other
    // code by the table.
    seen.insert(Code::ReadError);
    seen.insert(Code::UnsafePath);
    seen.insert(Code::ProtectedInTarget);
    let missing: Vec<_> = Code::ALL.iter().filter(|c| !seen.contains(c)).collect();
    assert!(missing.is_empty(), "codes without a test: {missing:?}");
}

#[test]
fn read_error() {
    let c = check_files(
        std::path::Path::new("/nonexistent/guardrail/policy.toml"),
        None,
        &common::host(),
    );
    assert!(c.policy.is_none());
    assert_eq!(c.diagnostics.len(), 1);
    let d = &c.diagnostics[0];
    assert_eq!((d.code, d.line, d.column), (Code::ReadError, 1, 1));
    assert_eq!(d.file, "/nonexistent/guardrail/policy.toml");
}

#[test]
fn codes_are_stable_and_unique() {
    let ids: std::collections::BTreeSet<_> = Code::ALL.iter().map(|c| c.id()).collect();
    let names: std::collections::BTreeSet<_> = Code::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(ids.len(), Code::ALL.len());
    assert_eq!(names.len(), Code::ALL.len());
    assert_eq!(Code::RelativePath.id(), "E0003");
    assert_eq!(Code::UnknownKey.name(), "unknown-key");
    for c in Code::ALL {
        assert_eq!(c.id().starts_with('E'), c.severity() == Severity::Error);
    }
}

#[test]
fn renders_like_a_compiler() {
    let text = "mode = \"enforce\"\n\n[deletion]\nbudget = 300\nwindow = \"1m\"\nprotected_roots = [\"/\"]\ntargets = [\"tmp\"]\n";
    let c = check_str("/etc/guardrail/policy.toml", text, &common::host());
    assert_eq!(c.diagnostics.len(), 1, "{:#?}", c.diagnostics);
    let want = "error[E0003]: relative path \"tmp\" in deletion.targets
  --> /etc/guardrail/policy.toml:7:12
   |
 7 | targets = [\"tmp\"]
   |            ^^^^^
   = hint: policy paths must be absolute, e.g. \"/tmp\"";
    assert_eq!(c.diagnostics[0].to_string(), want);
}

#[test]
fn renders_wide_line_numbers() {
    let mut text = String::from(PRE);
    for _ in 0..10 {
        text.push('\n');
    }
    text.push_str("action = \"stop\"\n");
    let c = check_str("p.toml", &text, &common::host());
    let s = c.diagnostics[0].to_string();
    assert!(
        s.contains(
            "\n   --> p.toml:13:10\n    |\n 13 | action = \"stop\"\n    |          ^^^^^^\n"
        ),
        "{s}"
    );
}

#[test]
fn json_form() {
    let c = check_str(
        "p.toml",
        &format!("{PRE}targets = [\"tmp\"]\n"),
        &common::host(),
    );
    let v = serde_json::to_value(&c.diagnostics[0]).expect("serializes");
    assert_eq!(v["code"], "E0003");
    assert_eq!(v["name"], "relative-path");
    assert_eq!(v["severity"], "error");
    assert_eq!(v["file"], "p.toml");
    assert_eq!(v["line"], 3);
    assert_eq!(v["column"], 12);
    assert_eq!(v["text"], "\"tmp\"");
    assert!(v["hint"].as_str().is_some_and(|h| h.contains("/tmp")));
    let whole = serde_json::to_value(&c).expect("serializes");
    assert!(whole["policy"].is_null());
}

#[test]
fn unknown_key_suggests() {
    let c = check_str(
        "p.toml",
        &format!("{PRE}protect_mountpoints = true\n"),
        &common::host(),
    );
    assert!(
        c.diagnostics[0]
            .hint
            .contains("did you mean `protect_mount_points`"),
        "{}",
        c.diagnostics[0]
    );
    assert_eq!(c.diagnostics[0].text, "protect_mountpoints");
}

#[test]
fn wrong_type_in_plain_words() {
    let c = check_str("p.toml", &format!("{PRE}budget = \"3\"\n"), &common::host());
    assert_eq!(
        c.diagnostics[0].message,
        "wrong type: string \"3\", expected an integer"
    );
}
