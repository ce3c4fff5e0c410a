//! Compilation into kernel tables and `explain` over them, on an in-memory host.

mod common;

use std::path::Path;

use guardrail_common::*;
use guardrail_policy::*;

const K: u64 = kernel_dev_from_user(0x801);

const POLICY: &str = r#"
[deletion]
budget = 300
window = "1m"
targets = ["/tmp", "/home/*/.cache"]
protected_roots = ["/", "/etc"]
protect_mount_points = true
[[deletion.data_dir]]
path = "/var/lib/postgresql"
owners = { units = ["postgresql@15-main.service"], users = ["postgres"] }
[[deletion.rule]]
name = "nightly-update"
match = { unit = "nightly-update.service" }
targets = ["/srv/releases"]
budget = 0
mode = "audit"
[[deletion.rule]]
name = "deploy"
match = { executable = "/usr/bin/deploy" }
targets = ["/srv/releases"]
budget = 5
window = "10s"
action = "block"
[[deletion.exempt]]
name = "pkg"
executables = ["/usr/bin/dpkg"]
"#;

fn host() -> MemResolver {
    common::host()
        .with_tree(
            0x801,
            &[
                "/srv/releases/cache",
                "/srv/releases/v1",
                "/etc/passwd",
                "/var/lib/postgresql/15/base",
                "/home/alice/notes",
            ],
        )
        .with_mount("/srv/releases/cache", 0x812, 2)
        .with_mount("/mnt/backup", 0x811, 2)
}

fn setup() -> (Policy, Compiled, MemResolver) {
    let h = host();
    let c = check_str("p.toml", POLICY, &h);
    assert!(c.diagnostics.is_empty(), "{:#?}", c.diagnostics);
    let p = c.policy.expect("loads");
    let compiled = compile(&p, &h);
    (p, compiled, h)
}

fn id(h: &MemResolver, p: &str) -> (u64, u64) {
    kernel_identity(h, Path::new(p)).expect(p)
}

fn bits(ids: &[u32]) -> u64 {
    ids.iter().fold(0, |a, i| a | 1 << i)
}

#[test]
fn rule_ids_and_params() {
    let (_, c, _) = setup();
    assert_eq!(
        c.rule_names,
        vec![
            "default",
            "nightly-update",
            "deploy",
            "pkg",
            "owner:unit:postgresql@15-main.service",
            "owner:user:postgres"
        ]
    );
    assert_eq!(
        c.rules[0],
        RuleParams {
            budget: 300,
            window_ns: 60_000_000_000,
            action: ACTION_HOLD,
            flags: 0
        }
    );
    assert_eq!(
        c.rules[1],
        RuleParams {
            budget: 0,
            window_ns: 60_000_000_000,
            action: ACTION_HOLD,
            flags: RULE_FLAG_AUDIT
        }
    );
    assert_eq!(
        c.rules[2],
        RuleParams {
            budget: 5,
            window_ns: 10_000_000_000,
            action: ACTION_BLOCK,
            flags: 0
        }
    );
    assert_eq!(c.rules[3].action, ACTION_EXEMPT);
    assert_eq!(
        c.rules[4], c.rules[0],
        "owner rules behave like the default rule"
    );
    assert_eq!(c.rules[5], c.rules[0]);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn identity_tables() {
    let (_, c, h) = setup();
    let mut exes = c.exes.clone();
    exes.sort();
    let mut want = vec![(id(&h, "/usr/bin/deploy"), 2), (id(&h, "/usr/bin/dpkg"), 3)];
    want.sort();
    assert_eq!(exes, want);
    assert_eq!(exes[0].0.0, K, "exe keys carry the kernel's dev encoding");
    let mut cg = c.cgroups.clone();
    cg.sort();
    assert_eq!(cg, vec![(5001, 1), (5002, 4)]);
    assert_eq!(c.uids, vec![(105, 5)]);
}

#[test]
fn directory_bits() {
    let (_, c, h) = setup();
    let d = |p: &str| {
        c.dirs
            .get(&id(&h, p))
            .copied()
            .unwrap_or_else(|| panic!("{p} not in dirs"))
    };
    let global = bits(&[0, 4, 5]);
    assert_eq!(
        d("/tmp"),
        DirRule {
            kind: DIR_TARGET,
            data_dir_id: 0,
            target_rules: global,
            data_owner_rules: 0
        }
    );
    // Glob expansion: each existing match.
    assert_eq!(d("/home/alice/.cache").target_rules, global);
    assert_eq!(d("/home/bob/.cache").target_rules, global);
    assert!(!c.dirs.contains_key(&id(&h, "/home/alice")));
    assert_eq!(
        d("/srv/releases"),
        DirRule {
            kind: DIR_TARGET,
            data_dir_id: 0,
            target_rules: bits(&[1, 2]),
            data_owner_rules: 0
        }
    );
    assert_eq!(
        d("/var/lib/postgresql"),
        DirRule {
            kind: DIR_DATA,
            data_dir_id: 0,
            target_rules: 0,
            data_owner_rules: bits(&[4, 5])
        }
    );
    assert_eq!(d("/").kind, DIR_PROTECTED_ROOT);
    assert_eq!(d("/etc").kind, DIR_PROTECTED_ROOT);
    assert_eq!(
        c.dirs.get(&id(&h, "/mnt/backup")).map(|e| e.kind),
        Some(DIR_PROTECTED_ROOT)
    );
    // A filesystem mounted below a target carries the target's bits on its root.
    let m = id(&h, "/srv/releases/cache");
    assert_eq!(m.0, kernel_dev_from_user(0x812));
    assert_eq!(
        c.dirs[&m],
        DirRule {
            kind: DIR_TARGET | DIR_PROTECTED_ROOT,
            data_dir_id: 0,
            target_rules: bits(&[1, 2]),
            data_owner_rules: 0
        }
    );
    assert_eq!(c.dirs.len(), 9);
}

#[test]
fn mount_points_unprotected_when_asked() {
    let h = host();
    let text = POLICY.replace(
        "protect_mount_points = true",
        "protect_mount_points = false",
    );
    let p = check_str("p.toml", &text, &h).policy.expect("loads");
    let c = compile(&p, &h);
    assert!(!c.dirs.contains_key(&id(&h, "/mnt/backup")));
    assert_eq!(c.dirs[&id(&h, "/srv/releases/cache")].kind, DIR_TARGET);
}

#[test]
fn mount_below_a_data_dir() {
    // data dir /srv/db owned by nobody, a filesystem mounted at /srv/db/disk: the mount root must
    // refuse everyone. (A target /srv around the data directory is refused: E0018.)
    let h = common::host()
        .with_tree(0x801, &["/srv/db/disk"])
        .with_mount("/srv/db/disk", 0x813, 2);
    let text = "[deletion]\nprotected_roots = [\"/\"]\ntargets = [\"/srv\"]\nprotect_mount_points = false\n[[deletion.data_dir]]\npath = \"/srv/db\"\n";
    let refused = check_str("p.toml", text, &h);
    assert!(refused.policy.is_none());
    assert!(
        refused
            .errors()
            .any(|d| d.code == guardrail_policy::Code::TargetTooWide
                && (d.line, d.column) == (3, 12)),
        "{:#?}",
        refused.diagnostics
    );
    let text = text.replace("targets = [\"/srv\"]", "targets = [\"/tmp\"]");
    let p = check_str("p.toml", &text, &h).policy.expect("loads");
    let c = compile(&p, &h);
    let e = c.dirs[&id(&h, "/srv/db/disk")];
    assert_eq!((e.kind, e.data_owner_rules), (DIR_DATA, 0));
    let ex = explain(&c, Path::new("/srv/db/disk/x"), &JobSpec::default(), &h);
    assert_eq!(ex.verdict, Verdict::DataForeign { data_dir_id: 0 });
}

#[test]
fn nonexistent_paths_and_identities_are_warnings() {
    let h = MemResolver::new().with_tree(0x801, &["/tmp"]);
    let text = "[deletion]\nprotected_roots = [\"/\"]\ntargets = [\"/tmp\", \"/nope\", \"/x/*/y\"]\n[[deletion.rule]]\nname = \"a\"\nmatch = { unit = \"a.service\" }\n[[deletion.rule]]\nname = \"b\"\nmatch = { user = \"ghost\" }\n[[deletion.rule]]\nname = \"c\"\nmatch = { executable = \"/usr/bin/none\" }\n";
    let c = check_str("p.toml", text, &h);
    let p = c.policy.expect("warnings only");
    let compiled = compile(&p, &h);
    let kinds: Vec<&str> = compiled.warnings.iter().map(|w| w.kind).collect();
    assert_eq!(
        kinds,
        vec![
            "unit-not-running",
            "user-unknown",
            "exe-missing",
            "path-missing",
            "glob-empty"
        ]
    );
    assert_eq!(compiled.dirs.len(), 2, "/ and /tmp");
}

fn job(unit: Option<&str>, exe: Option<&str>, user: Option<&str>) -> JobSpec {
    JobSpec {
        unit: unit.map(Into::into),
        exe: exe.map(Into::into),
        user: user.map(Into::into),
        cgroup: None,
    }
}

#[test]
fn explain_verdicts() {
    let (_, c, h) = setup();
    let ex = |p: &str, j: &JobSpec| explain(&c, Path::new(p), j, &h);
    let nightly = job(Some("nightly-update.service"), None, None);
    let default = job(None, None, Some("alice"));
    let postgres = job(None, None, Some("postgres"));
    let pg_unit = job(Some("postgresql@15-main.service"), None, Some("postgres"));
    let dpkg = job(None, Some("/usr/bin/dpkg"), Some("root"));
    let deploy = job(
        Some("nightly-update.service"),
        Some("/usr/bin/deploy"),
        None,
    );

    let e = ex("/srv/releases/v1/file", &nightly);
    assert_eq!((e.rule, &e.verdict, e.audit), (1, &Verdict::InTarget, true));
    assert_eq!(e.deciding_dir.as_deref(), Some(Path::new("/srv/releases")));
    let e = ex("/tmp/x", &nightly);
    assert_eq!(
        e.verdict,
        Verdict::Counted {
            budget: 0,
            window: "1m".into(),
            action: Action::Hold
        },
        "per-job targets replace the global ones"
    );
    assert_eq!(ex("/tmp/x", &default).verdict, Verdict::InTarget);
    assert_eq!(
        ex("/home/alice/.cache/thumbs/1.png", &default).verdict,
        Verdict::InTarget
    );
    assert_eq!(
        ex("/home/alice/notes", &default).verdict,
        Verdict::Counted {
            budget: 300,
            window: "1m".into(),
            action: Action::Hold
        }
    );
    let e = ex("/var/lib/postgresql/15/base/1234", &postgres);
    assert_eq!(
        (e.rule, &e.verdict),
        (5, &Verdict::DataOwner { data_dir_id: 0 })
    );
    assert_eq!(
        ex("/var/lib/postgresql/15/base", &pg_unit).rule,
        4,
        "unit beats user"
    );
    assert_eq!(
        ex("/tmp/x", &postgres).verdict,
        Verdict::InTarget,
        "owner rules keep the global targets"
    );
    let e = ex("/var/lib/postgresql/15/base/1234", &default);
    assert_eq!(e.verdict, Verdict::DataForeign { data_dir_id: 0 });
    assert_eq!(
        e.data_dir.as_deref(),
        Some(Path::new("/var/lib/postgresql"))
    );
    assert_eq!(
        ex("/var/lib/postgresql/15", &dpkg).verdict,
        Verdict::DataForeign { data_dir_id: 0 },
        "exempt jobs are still refused in foreign data dirs"
    );
    assert_eq!(ex("/etc", &dpkg).verdict, Verdict::ProtectedRoot);
    assert_eq!(ex("/etc/passwd", &dpkg).verdict, Verdict::Exempt);
    assert_eq!(
        ex("/etc/passwd", &default).verdict,
        Verdict::Counted {
            budget: 300,
            window: "1m".into(),
            action: Action::Hold
        }
    );
    let e = ex("/srv/releases/cache/x", &deploy);
    assert_eq!(
        (e.rule, &e.matched_by),
        (2, &MatchedBy::Executable("/usr/bin/deploy".into())),
        "executable beats unit"
    );
    assert_eq!(
        e.verdict,
        Verdict::InTarget,
        "across the mount, through the mount root's entry"
    );
    assert_eq!(
        e.deciding_dir.as_deref(),
        Some(Path::new("/srv/releases/cache"))
    );
    assert_eq!(
        ex("/srv/releases/cache", &deploy).verdict,
        Verdict::ProtectedRoot
    );
    assert_eq!(ex("/mnt/backup", &default).verdict, Verdict::ProtectedRoot);
}

#[test]
fn explanation_reads_well() {
    let (_, c, h) = setup();
    let e = explain(
        &c,
        Path::new("/var/lib/postgresql/15/base/1"),
        &job(None, None, Some("alice")),
        &h,
    );
    let s = e.to_string();
    assert!(s.contains("rule:     #0 \"default\""), "{s}");
    assert!(s.contains("decided:  by /var/lib/postgresql"), "{s}");
    assert!(s.contains("REFUSED from the first file"), "{s}");
    let e = explain(
        &c,
        Path::new("/tmp/x"),
        &job(Some("nightly-update.service"), None, None),
        &h,
    );
    let s = e.to_string();
    assert!(
        s.contains("\"nightly-update\" (matched by unit nightly-update.service)"),
        "{s}"
    );
    assert!(s.contains("counted: 0 deletions per 1m"), "{s}");
    assert!(s.contains("audit"), "{s}");
    let j = serde_json::to_value(&e).expect("serializes");
    assert_eq!(j["verdict"]["verdict"], "counted");
    assert_eq!(j["rule"], 1);
}

#[test]
fn global_audit_marks_every_rule() {
    let h = host();
    let p = check_str("p.toml", &format!("mode = \"audit\"\n{POLICY}"), &h)
        .policy
        .expect("loads");
    let c = compile(&p, &h);
    assert!(c.rules.iter().all(|r| r.flags & RULE_FLAG_AUDIT != 0));
    assert_eq!(c.mode, Mode::Audit);
}

#[test]
fn shipped_default_compiles() {
    let h = common::host();
    let p = check_str(POLICY_PATH, DEFAULT_POLICY, &h)
        .policy
        .expect("loads");
    let c = compile(&p, &h);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(
        c.rule_names,
        vec!["default", "package-managers", "cleaners"]
    );
    assert_eq!(c.exes.len(), 7);
    let e = explain(
        &c,
        Path::new("/usr/lib/libc.so.6"),
        &job(None, Some("/usr/bin/apt-get"), Some("root")),
        &h,
    );
    assert_eq!(e.verdict, Verdict::Exempt);
    let e = explain(
        &c,
        Path::new("/usr"),
        &job(None, Some("/usr/bin/apt-get"), Some("root")),
        &h,
    );
    assert_eq!(e.verdict, Verdict::ProtectedRoot);
}

#[test]
fn an_owner_inside_a_shared_exemption_gets_its_own_rule() {
    // Found by the property test: owners are rule ids, so an owner that shares an exemption with
    // others must not make the others owners.
    let h = common::host();
    let text = "[deletion]\nprotected_roots = [\"/\"]\n[[deletion.data_dir]]\npath = \"/srv/db\"\nowners = { users = [\"postgres\"] }\n[[deletion.exempt]]\nname = \"ex\"\nusers = [\"postgres\", \"alice\"]\n";
    let p = check_str("p.toml", text, &h).policy.expect("loads");
    let c = compile(&p, &h);
    assert_eq!(
        c.rule_names,
        vec!["default", "ex", "ex:owner:user:postgres"]
    );
    assert_eq!(c.rules[2].action, ACTION_EXEMPT);
    let mut uids = c.uids.clone();
    uids.sort();
    assert_eq!(uids, vec![(105, 2), (1000, 1)]);
    let x = |u: &str| explain(&c, Path::new("/srv/db/x"), &job(None, None, Some(u)), &h).verdict;
    assert_eq!(x("postgres"), Verdict::DataOwner { data_dir_id: 0 });
    assert_eq!(x("alice"), Verdict::DataForeign { data_dir_id: 0 });
}

/// `never_hold` units become the kernel's `NEVER_HOLD` table: the cgroup ids of the units running
/// now, each once; a unit not running is simply absent (no warning: the shipped list names units
/// most hosts lack), and the agent compiles again when it starts.
#[test]
fn never_hold_units_compile_to_the_cgroup_ids_of_running_units() {
    let mut h = host();
    h.cgroups.insert("systemd-logind.service".into(), 4242);
    h.cgroups.insert("init.scope".into(), 7);
    let text = "[deletion]\nbudget = 10\nnever_hold = [\"init.scope\", \"systemd-logind.service\", \"sshd.service\"]\n";
    let c = check_str("p.toml", text, &h);
    let p = c.policy.expect("loads");
    let compiled = compile(&p, &h);
    assert_eq!(compiled.never_hold_cgroups, vec![(7, 0), (4242, 1)]);
    assert_eq!(
        compiled.never_hold.len(),
        3,
        "explain still names all three"
    );
    assert!(
        !compiled
            .warnings
            .iter()
            .any(|w| w.subject == "sshd.service"),
        "{:?}",
        compiled.warnings
    );
}

/// Budgets above the job: absent, every level is off; present, session and unit share
/// `[deletion.session]`, the user has its own, and `shared_budgets = false` keeps a rule's jobs
/// out of them.
#[test]
fn level_budgets_compile_into_level_params() {
    let (_, c, _) = setup();
    assert_eq!(c.levels.len(), LEVELS as usize);
    assert!(
        c.levels.iter().all(|l| l.flags & LEVEL_FLAG_ON == 0),
        "no section, no level: {:?}",
        c.levels
    );
    assert!(c.rules.iter().all(|r| r.flags & RULE_FLAG_NO_LEVELS == 0));

    let text = format!(
        "{POLICY}\n[deletion.session]\nbudget = 40\nwindow = \"30s\"\n[deletion.user]\nbudget = 90\naction = \"block\"\n"
    )
    .replace(
        "action = \"block\"\n[[deletion.exempt]]",
        "action = \"block\"\nshared_budgets = false\n[[deletion.exempt]]",
    );
    let h = host();
    let checked = check_str("p.toml", &text, &h);
    assert!(checked.diagnostics.is_empty(), "{:#?}", checked.diagnostics);
    let c = compile(&checked.policy.expect("loads"), &h);
    let session = RuleParams {
        budget: 40,
        window_ns: 30_000_000_000,
        action: ACTION_HOLD,
        flags: LEVEL_FLAG_ON,
    };
    assert_eq!(c.levels[LEVEL_SESSION as usize], session);
    assert_eq!(c.levels[LEVEL_UNIT as usize], session);
    assert_eq!(
        c.levels[LEVEL_USER as usize],
        RuleParams {
            budget: 90,
            window_ns: 60_000_000_000,
            action: ACTION_BLOCK,
            flags: LEVEL_FLAG_ON,
        }
    );
    let deploy = c
        .rule_names
        .iter()
        .position(|n| n == "deploy")
        .expect("deploy");
    assert_eq!(
        c.rules[deploy].flags & RULE_FLAG_NO_LEVELS,
        RULE_FLAG_NO_LEVELS
    );
    assert_eq!(c.rules[0].flags & RULE_FLAG_NO_LEVELS, 0, "default shares");

    // A drop-in can switch a level off.
    let files = vec![
        ("p.toml".to_string(), text.clone()),
        (
            "d.toml".to_string(),
            "[deletion.user]\naction = \"off\"\n".to_string(),
        ),
    ];
    let checked = check_sources(&files, &h);
    assert!(checked.diagnostics.is_empty(), "{:#?}", checked.diagnostics);
    let c = compile(&checked.policy.expect("loads"), &h);
    assert_eq!(c.levels[LEVEL_USER as usize].flags & LEVEL_FLAG_ON, 0);
    assert_eq!(c.levels[LEVEL_SESSION as usize], session);
}

/// `explain` names the budgets above the job a counted deletion also counts for.
#[test]
fn explain_names_the_shared_budgets() {
    let h = host();
    let text = format!("{POLICY}\n[deletion.session]\nbudget = 40\n");
    let checked = check_str("p.toml", &text, &h);
    assert!(checked.diagnostics.is_empty(), "{:#?}", checked.diagnostics);
    let c = compile(&checked.policy.expect("loads"), &h);
    let ex = explain(&c, Path::new("/etc/passwd"), &JobSpec::default(), &h);
    assert_eq!(
        ex.shared_budgets,
        vec![
            "its login session (a service: its unit): 40 per 1m, then hold the job that crosses it"
        ]
    );
    assert!(
        ex.to_string()
            .ends_with("\nalso:     counted for its login session (a service: its unit): 40 per 1m, then hold the job that crosses it"),
        "{ex}"
    );
    // In a target: free, nothing shared.
    let ex = explain(&c, Path::new("/tmp/x"), &JobSpec::default(), &h);
    assert!(ex.shared_budgets.is_empty());
}
