//! Fail safe: nothing a user controls widens what is free. These tests build real directory
//! trees (symlinks and owners matter, so [`SystemResolver`] resolves them) and need root to give
//! files away (`chown`), like the agent that runs as root.

use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, lchown, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use guardrail_common::{DIR_TARGET, kernel_dev_from_user};
use guardrail_policy::*;

fn require_root() -> tempfile::TempDir {
    let t = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        std::fs::metadata(t.path()).expect("stat").uid(),
        0,
        "these tests give files to other users: run them as root"
    );
    // Root's and only root's, like /home's parent.
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    t
}

fn mkdir(p: &Path) -> PathBuf {
    std::fs::create_dir_all(p).expect("mkdir");
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p.to_path_buf()
}

fn kid(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).expect("stat");
    (kernel_dev_from_user(m.dev()), m.ino())
}

fn policy_text(targets: &[String], protected: &[String], extra: &str) -> String {
    let q = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[deletion]\nprotected_roots = [\"/\"{}{}]\nprotect_mount_points = false\ntargets = [{}]\n{extra}",
        if protected.is_empty() { "" } else { ", " },
        q(protected),
        q(targets)
    )
}

/// `~/.cache -> /srv` (H5): the old resolver kept the link (`exists()` and `stat` follow it), so
/// /srv became a target for everyone. Now the match is skipped with a warning at the target, and
/// the real `.cache` of another user still counts.
#[test]
fn a_symlink_matched_by_a_glob_is_skipped_and_named() {
    let t = require_root();
    let srv = mkdir(&t.path().join("srv"));
    let home = mkdir(&t.path().join("home"));
    mkdir(&home.join("alice"));
    symlink(&srv, home.join("alice/.cache")).expect("symlink");
    let bob_cache = mkdir(&home.join("bob/.cache"));
    // A `*` component that is itself a symlink is skipped too.
    mkdir(&srv.join(".cache"));
    symlink(&srv, home.join("carol")).expect("symlink");

    let pattern = format!("{}/*/.cache", home.display());
    let d = SystemResolver.declared(&pattern);
    let found: Vec<&PathBuf> = d.found.iter().map(|(p, _)| p).collect();
    assert_eq!(found, vec![&bob_cache]);
    let skipped: Vec<PathBuf> = d.skipped.iter().map(|s| s.path.clone()).collect();
    assert_eq!(skipped, vec![home.join("alice/.cache"), home.join("carol")]);
    assert!(d.skipped[0].reason.contains("symlink"), "{:?}", d.skipped);

    let text = policy_text(std::slice::from_ref(&pattern), &[], "");
    let c = check_str("p.toml", &text, &SystemResolver);
    let w: Vec<(Code, usize, usize)> = c
        .warnings()
        .filter(|d| d.code == Code::UnsafePath)
        .map(|d| (d.code, d.line, d.column))
        .collect();
    assert_eq!(
        w,
        vec![(Code::UnsafePath, 4, 12), (Code::UnsafePath, 4, 12)]
    );
    assert!(
        c.diagnostics[0..]
            .iter()
            .any(|d| d.message.contains(&format!(
                "{:?}",
                home.join("alice/.cache").display().to_string()
            ))),
        "{:#?}",
        c.diagnostics
    );
    let p = c.policy.expect("warnings only");
    let compiled = compile(&p, &SystemResolver);
    assert!(!compiled.dirs.contains_key(&kid(&srv)), "srv is no target");
    assert_eq!(compiled.dirs[&kid(&bob_cache)].kind, DIR_TARGET);
    let kinds: Vec<&str> = compiled.warnings.iter().map(|w| w.kind).collect();
    assert_eq!(kinds, vec!["path-unsafe", "path-unsafe"]);
}

/// A glob match owned by someone other than root or the user whose directory the `*` matched is
/// skipped: that user's `.cache` may be anyone's directory moved or bind-mounted there.
#[test]
fn a_glob_match_owned_by_another_user_is_skipped() {
    let t = require_root();
    let home = mkdir(&t.path().join("home"));
    // dave's home belongs to root, his .cache to uid 4242: nobody's business of dave's.
    let dave = mkdir(&home.join("dave/.cache"));
    chown(&dave, Some(4242), Some(4242)).expect("chown");
    // erin (not in /etc/passwd) owns her home, made by root in a root-only parent: hers counts.
    let erin_home = mkdir(&home.join("erin"));
    let erin = mkdir(&erin_home.join(".cache"));
    chown(&erin_home, Some(4343), Some(4343)).expect("chown");
    chown(&erin, Some(4343), Some(4343)).expect("chown");
    // A user in /etc/passwd: root's .cache under a directory named "root" is root's anyway; a
    // directory named after user `nobody` (65534) may belong to nobody even in a parent others
    // can write to.
    let open = mkdir(&t.path().join("open"));
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let nobody = mkdir(&open.join("nobody/.cache"));
    chown(&nobody, Some(65534), Some(65534)).expect("chown");
    // ...but in that parent, a directory named like no user is nobody's only by its owner's say.
    let squat = mkdir(&open.join("squat/.cache"));
    chown(open.join("squat"), Some(4444), Some(4444)).expect("chown");
    chown(&squat, Some(4444), Some(4444)).expect("chown");

    let d = SystemResolver.declared(&format!("{}/*/.cache", home.display()));
    let found: Vec<&PathBuf> = d.found.iter().map(|(p, _)| p).collect();
    assert_eq!(found, vec![&erin]);
    assert_eq!(d.skipped.len(), 1, "{:?}", d.skipped);
    assert_eq!(d.skipped[0].path, dave);
    assert!(
        d.skipped[0].reason.contains("owned by uid 4242"),
        "{:?}",
        d.skipped
    );

    let d = SystemResolver.declared(&format!("{}/*/.cache", open.display()));
    let found: Vec<&PathBuf> = d.found.iter().map(|(p, _)| p).collect();
    let passwd_has_nobody = std::fs::read_to_string("/etc/passwd")
        .is_ok_and(|t| parse_passwd(&t, "nobody") == Some(65534));
    assert!(passwd_has_nobody, "this host has user nobody (65534)");
    assert_eq!(found, vec![&nobody]);
    assert_eq!(d.skipped.len(), 1, "{:?}", d.skipped);
    assert_eq!(d.skipped[0].path, squat);
}

/// A path written literally follows a symlink only when root controls it (`/var/run -> /run`);
/// a link a user owns, or one in a directory others can write to, is skipped.
#[test]
fn a_literal_path_follows_only_roots_symlinks() {
    let t = require_root();
    let real = mkdir(&t.path().join("real/x"));
    symlink("real", t.path().join("run")).expect("symlink");
    let d = SystemResolver.declared(&format!("{}/run/x", t.path().display()));
    assert_eq!(d.found.len(), 1, "{d:?}");
    assert_eq!(d.found[0].0, real);
    assert!(d.skipped.is_empty());

    // The same link owned by a user.
    symlink("real", t.path().join("users")).expect("symlink");
    lchown(t.path().join("users"), Some(4242), Some(4242)).expect("lchown");
    let d = SystemResolver.declared(&format!("{}/users/x", t.path().display()));
    assert!(d.found.is_empty(), "{d:?}");
    assert_eq!(d.skipped[0].path, t.path().join("users"));
    assert!(d.skipped[0].reason.contains("uid 4242"), "{d:?}");

    // Root's link, in a directory anyone can write to (a user could have replaced it).
    let open = mkdir(&t.path().join("open"));
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    symlink(t.path().join("real"), open.join("link")).expect("symlink");
    let d = SystemResolver.declared(&format!("{}/link/x", open.display()));
    assert!(d.found.is_empty(), "{d:?}");
    assert_eq!(d.skipped.len(), 1);

    // A loop ends.
    symlink("loop", t.path().join("loop")).expect("symlink");
    let d = SystemResolver.declared(&format!("{}/loop", t.path().display()));
    assert!(d.found.is_empty());
    assert!(d.skipped[0].reason.contains("too many"), "{d:?}");

    // The check names the skipped link at the target.
    let text = policy_text(&[format!("{}/users/x", t.path().display())], &[], "");
    let c = check_str("p.toml", &text, &SystemResolver);
    let w: Vec<(usize, usize)> = c
        .warnings()
        .filter(|d| d.code == Code::UnsafePath)
        .map(|d| (d.line, d.column))
        .collect();
    assert_eq!(w, vec![(4, 12)]);
}

/// A target may not be `/` or hold a protected root or data directory: written so, it is an
/// error at its position (E0018); a glob that matches one on this host (here through root's own
/// symlink, so no lexical check can see it) leaves that match out with a warning.
#[test]
fn a_target_never_holds_a_protected_root() {
    let t = require_root();
    let base = t.path().display().to_string();
    let inner = mkdir(&t.path().join("x/a/inner"));
    let other = mkdir(&t.path().join("x/b"));
    symlink("x/a", t.path().join("link")).expect("symlink");

    let text = policy_text(&[format!("{base}/x")], &[format!("{base}/x/a/inner")], "");
    let c = check_str("p.toml", &text, &SystemResolver);
    assert!(c.policy.is_none());
    let e: Vec<(Code, usize, usize)> = c.errors().map(|d| (d.code, d.line, d.column)).collect();
    assert_eq!(e, vec![(Code::TargetTooWide, 4, 12)]);

    let text = policy_text(
        &[format!("{base}/x/*")],
        &[format!("{base}/link/inner")],
        "",
    );
    let c = check_str("p.toml", &text, &SystemResolver);
    let w: Vec<(usize, usize)> = c
        .warnings()
        .filter(|d| d.code == Code::UnsafePath)
        .map(|d| (d.line, d.column))
        .collect();
    assert_eq!(w, vec![(4, 12)], "{:#?}", c.diagnostics);
    let p = c.policy.expect("warnings only");
    let compiled = compile(&p, &SystemResolver);
    let a = kid(&t.path().join("x/a"));
    assert_eq!(
        compiled.dirs.get(&a).map(|e| e.kind),
        None,
        "x/a is no target"
    );
    assert_eq!(compiled.dirs[&kid(&other)].kind, DIR_TARGET);
    assert!(
        compiled.dirs.contains_key(&kid(&inner)),
        "the protected root"
    );
    assert!(
        compiled
            .warnings
            .iter()
            .any(|w| w.kind == "target-too-wide" && w.subject.ends_with("/x/a\"")),
        "{:?}",
        compiled.warnings
    );
}

/// Units are found only where only root can make cgroups (H6): a cgroup named like a unit in a
/// user's delegated tree, in a container's, or inside a service's own subtree is not the unit.
/// The old lookup searched the whole tree 4 levels deep and took the first directory of that name.
#[test]
fn units_are_found_only_among_system_cgroups() {
    let t = require_root();
    let root = t.path();
    let user_tree = root.join("user.slice/user-1000.slice/user@1000.service/app.slice");
    mkdir(&user_tree.join("backup.service"));
    chown(user_tree.join("backup.service"), Some(1000), Some(1000)).expect("chown");
    mkdir(&root.join("machine.slice/machine-c1.scope/payload/ssh.service"));
    mkdir(&root.join("system.slice/docker.service/evil.slice/sshd.service"));
    assert_eq!(find_system_unit(root, "backup.service"), None);
    assert_eq!(find_system_unit(root, "ssh.service"), None);
    assert_eq!(find_system_unit(root, "sshd.service"), None);

    let getty = mkdir(&root.join("system.slice/system-getty.slice/getty@tty1.service"));
    let init = mkdir(&root.join("init.scope"));
    let custom = mkdir(&root.join("backup.slice/nightly.service"));
    assert_eq!(find_system_unit(root, "getty@tty1.service"), Some(getty));
    assert_eq!(find_system_unit(root, "init.scope"), Some(init));
    assert_eq!(find_system_unit(root, "nightly.service"), Some(custom));

    // system.slice wins over another slice; a slice a user owns is not entered.
    let sys = mkdir(&root.join("system.slice/nightly.service"));
    assert_eq!(find_system_unit(root, "nightly.service"), Some(sys));
    let theirs = mkdir(&root.join("theirs.slice"));
    mkdir(&theirs.join("cron.service"));
    chown(&theirs, Some(4242), Some(4242)).expect("chown");
    assert_eq!(find_system_unit(root, "cron.service"), None);
    assert_eq!(find_system_unit(root, "../init.scope"), None);
}

/// Durations are bounded by validation; compile saturates rather than wrap (L4: the old
/// `as_nanos() as u64` turned "18446744074s" into about 0.3 µs).
#[test]
fn compile_saturates_durations() {
    let h = MemResolver::new().with_tree(1, &["/tmp"]);
    let mut p = check_str("p.toml", &policy_text(&[], &[], ""), &h)
        .policy
        .expect("loads");
    p.deletion.window = Duration::from_secs(18_446_744_074);
    let c = compile(&p, &h);
    assert_eq!(c.rules[0].window_ns, u64::MAX);
    let c = check_str(
        "p.toml",
        &policy_text(&[], &[], "window = \"18446744074s\"\n"),
        &h,
    );
    let e: Vec<(Code, usize, usize)> = c.errors().map(|d| (d.code, d.line, d.column)).collect();
    assert_eq!(e, vec![(Code::DurationTooLong, 5, 10)]);
}
