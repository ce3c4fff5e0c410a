//! Unit tests of `policy suggest`'s logic: targets, trust, notes, escaping, determinism.
use super::*;
use crate::{MemResolver, check_sources};

fn policy(extra: &str) -> Policy {
    let text = format!(
        r#"mode = "audit"
[deletion]
budget = 300
targets = ["/tmp"]
protected_roots = ["/", "/srv", "/var", "/var/lib", "/etc"]
protect_mount_points = false
{extra}
"#
    );
    let r = MemResolver::default();
    check_sources(&[("p.toml".into(), text)], &r)
        .policy
        .expect("test policy loads")
}

fn service(id: u64, unit: &str, paths: &[&str]) -> Evidence {
    Evidence {
        incident: id,
        time: "2026-12-07T05:00:00Z".into(),
        kind: "budget_crossed".into(),
        outcome: "would_have_held".into(),
        rule: "default".into(),
        unit: Some(unit.into()),
        cgroup: Some(format!("/system.slice/{unit}")),
        session_class: "none".into(),
        user: "root".into(),
        command: "/usr/local/bin/deploy".into(),
        pgid: 100 + id as u32,
        count: 301,
        budget: 300,
        paths: paths.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}

fn all_dirs() -> impl Fn(&Path) -> bool {
    |_| true
}

fn run(p: &Policy, ev: &[Evidence]) -> Proposal {
    let is_dir = all_dirs();
    suggest(
        p,
        ev,
        &Host {
            mount_points: vec![],
            is_dir: &is_dir,
        },
    )
}

#[test]
fn narrowest_common_ancestor_of_siblings() {
    let p = policy("");
    let ev = [
        service(1, "deploy.service", &["/srv/app/releases/v1/a.txt"]),
        service(2, "deploy.service", &["/srv/app/releases/v2/lib/b.so"]),
    ];
    let out = run(&p, &ev);
    assert_eq!(out.rules.len(), 1);
    let r = &out.rules[0];
    assert_eq!(r.name, "suggested-deploy");
    assert_eq!(r.unit, "deploy.service");
    assert_eq!(
        r.added,
        vec![Added {
            path: "/srv/app/releases".into(),
            incidents: vec![1, 2]
        }]
    );
    assert_eq!(r.kept, vec![PathBuf::from("/tmp")]);
    assert_eq!(r.budget, None, "under the default rule: the defaults apply");
}

#[test]
fn never_root_a_protected_root_or_its_ancestor() {
    let p = policy("");
    // Common ancestors would be /, /srv (protected) and /var (holds /var/lib): no merge.
    let ev = [
        service(1, "x.service", &["/srv/a/f", "/srv/b/g"]),
        service(2, "x.service", &["/opt/q/h", "/var/cache/z/i"]),
        service(3, "x.service", &["/var/lib/f"]),
    ];
    let out = run(&p, &ev);
    let r = &out.rules[0];
    let added: Vec<&Path> = r.added.iter().map(|a| a.path.as_path()).collect();
    assert_eq!(
        added,
        [
            Path::new("/opt/q"),
            Path::new("/srv/a"),
            Path::new("/srv/b"),
            Path::new("/var/cache/z")
        ]
    );
    assert_eq!(r.rejected.len(), 1, "{:?}", r.rejected);
    assert_eq!(r.rejected[0].0, Path::new("/var/lib"));
    for t in r.targets() {
        assert!(t != Path::new("/") && t != Path::new("/srv") && t != Path::new("/var"));
    }
}

#[test]
fn only_a_top_level_or_protected_dir_gives_a_note_not_a_rule() {
    let p = policy("");
    let out = run(&p, &[service(5, "y.service", &["/srv/file", "/data/x"])]);
    assert!(out.rules.is_empty());
    assert_eq!(out.notes.len(), 1);
    assert!(
        out.notes[0].text.contains("no target to suggest"),
        "{}",
        out.notes[0].text
    );
}

#[test]
fn people_get_notes_not_rules() {
    let p = policy("");
    let mut e = service(3, "session-4.scope", &["/srv/app/build/x"]);
    e.cgroup = Some("/user.slice/user-1000.slice/session-4.scope".into());
    e.session_class = "remote".into();
    e.remote_host = Some("10.0.0.9".into());
    e.user = "alice".into();
    let out = run(&p, &[e]);
    assert!(out.rules.is_empty());
    assert_eq!(out.notes.len(), 1);
    assert!(out.notes[0].text.contains("a person's job gets no rule"));
    assert!(out.notes[0].text.contains("from 10.0.0.9"));
}

#[test]
fn a_unit_a_user_named_is_not_trusted() {
    let p = policy("");
    // A user's own manager may name a cgroup after a real service.
    let mut e = service(4, "backup.service", &["/srv/db/x"]);
    e.cgroup =
        Some("/user.slice/user-1000.slice/user@1000.service/app.slice/backup.service".into());
    let mut f = service(5, "backup.service", &["/srv/db/y"]);
    f.cgroup = None;
    // No evidence of a session's class is not evidence of a service.
    let mut g = service(6, "backup.service", &["/srv/db/z"]);
    g.session_class = "unknown".into();
    let out = run(&p, &[e, f, g]);
    assert!(out.rules.is_empty());
    assert_eq!(out.notes.len(), 3);
    assert_eq!(
        system_service("/system.slice/backup.service"),
        Some("backup.service")
    );
    assert_eq!(
        system_service("/a.slice/b.slice/c@1.service/x"),
        Some("c@1.service")
    );
    assert_eq!(
        system_service("/system.slice/docker.service/evil.service"),
        None
    );
    assert_eq!(system_service("/machine.slice/x.service"), None);
    assert_eq!(system_service("/system.slice/run-1.scope"), None);
}

#[test]
fn denied_holds_are_not_learned() {
    let p = policy("");
    let mut e = service(9, "z.service", &["/srv/app/x/y"]);
    e.outcome = "denied".into();
    let out = run(&p, &[e]);
    assert!(out.rules.is_empty());
    assert!(out.notes[0].text.contains("an admin denied it"));
}

#[test]
fn an_existing_unit_rule_is_replaced_with_its_settings() {
    let p = policy(
        r#"[[deletion.rule]]
name = "nightly"
match = { unit = "nightly.service" }
targets = ["/srv/app/cache"]
budget = 20
window = "10m"
action = "block"
"#,
    );
    let mut e = service(2, "nightly.service", &["/srv/app/logs/old/x.log"]);
    e.rule = "nightly".into();
    let ev = [e];
    let out = run(&p, &ev);
    let r = &out.rules[0];
    assert_eq!(r.name, "nightly");
    assert_eq!(r.replaces.as_deref(), Some("nightly"));
    assert_eq!(r.budget, Some(20));
    assert_eq!(r.action, Some(Action::Block));
    let text = render(&out, &ev, "events.jsonl");
    assert!(
        text.contains("budget = 20\nwindow = \"10m\"\naction = \"block\"\n"),
        "{text}"
    );
    assert!(
        text.contains("\"/srv/app/logs/old\",  # new: incident 2\n"),
        "{text}"
    );
}

#[test]
fn a_deleted_directory_moves_up_to_the_existing_parent() {
    let p = policy("");
    let is_dir = |d: &Path| !d.starts_with("/srv/app/releases/v1");
    let out = suggest(
        &p,
        &[service(1, "d.service", &["/srv/app/releases/v1/lib/x"])],
        &Host {
            mount_points: vec![],
            is_dir: &is_dir,
        },
    );
    assert_eq!(out.rules[0].added[0].path, Path::new("/srv/app/releases"));
}

#[test]
fn hostile_text_stays_in_its_comment_and_the_output_checks() {
    let p = policy("");
    let mut e = service(
        7,
        "evil.service",
        &[
            "/srv/app/x\n[[deletion.exempt]]\nname = \"all\"/f",
            "/srv/app/.../y",
            "/srv/app/ok\u{202e}/z",
            "/srv/app/ok/z",
        ],
    );
    e.command = "rm -rf \u{202e}x\r\n[alerts]".into();
    let ev = [e];
    let out = run(&p, &ev);
    let text = render(&out, &ev, "ev\nil.jsonl");
    for line in text.lines() {
        assert!(
            line.is_empty()
                || line.starts_with('#')
                || [
                    "[[deletion.rule]]",
                    "name = ",
                    "match = ",
                    "targets = ",
                    "    \"",
                    "]"
                ]
                .iter()
                .any(|p| line.starts_with(p)),
            "line escaped its place: {line:?}"
        );
    }
    assert!(!text.contains('\u{202e}') && !text.contains('\r'));
    assert_eq!(out.rules[0].added.len(), 1);
    assert_eq!(out.rules[0].added[0].path, Path::new("/srv/app/ok"));
    assert_eq!(
        out.rules[0].rejected.len(),
        2,
        "{:?}",
        out.rules[0].rejected
    );
    // The drop-in checks with the main policy, and adds that one rule only.
    let main = "[deletion]\ntargets = [\"/tmp\"]\nprotected_roots = [\"/\", \"/srv\"]\n";
    let checked = check_sources(
        &[
            ("main.toml".into(), main.into()),
            ("d.toml".into(), text.clone()),
        ],
        &MemResolver::default(),
    );
    assert!(
        checked.errors().next().is_none(),
        "{:?}\n{text}",
        checked.diagnostics
    );
    let pol = checked.policy.expect("loads");
    assert_eq!(pol.deletion.rules.len(), 1);
    assert_eq!(
        pol.deletion.rules[0].targets,
        vec![PathBuf::from("/tmp"), PathBuf::from("/srv/app/ok")]
    );
    assert!(pol.deletion.exemptions.is_empty());
}

#[test]
fn a_directory_named_star_is_never_a_glob_target() {
    let p = policy("");
    let out = run(
        &p,
        &[service(8, "g.service", &["/srv/app/*/f", "/srv/app/[a]/g"])],
    );
    assert!(out.rules.is_empty(), "{:?}", out.rules);
    assert!(out.notes[0].text.contains("glob"), "{}", out.notes[0].text);
}

#[test]
fn output_is_deterministic_whatever_the_log_order() {
    let p = policy("");
    let a = service(1, "b.service", &["/srv/b/x/1"]);
    let b = service(2, "a.service", &["/srv/a/y/2"]);
    let c = service(3, "b.service", &["/srv/b/z/3"]);
    let one = [a.clone(), b.clone(), c.clone()];
    let two = [c, a, b];
    assert_eq!(
        render(&run(&p, &one), &one, "x"),
        render(&run(&p, &two), &two, "x")
    );
    let out = run(&p, &one);
    assert_eq!(out.rules[0].unit, "a.service");
    assert_eq!(out.rules[1].added[0].path, Path::new("/srv/b"));
}
