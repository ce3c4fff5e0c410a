//! The shutdown guard's kernel tables, compiled from the policy: the words the kernel recognises
//! in a shutdown program's argv (verbs, systemctl's options), the shutdown executables by file
//! identity, the action per session class, and whether logind's inhibitor lock is wanted.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use guardrail_common::*;
use guardrail_policy as gp;

use super::inhibit::Want;

pub(super) const SHUTDOWN_NAMES: &[&str] = &["shutdown", "reboot", "poweroff", "halt"];

pub(super) const MULTICALL_NAMES: &[&str] = &["systemctl", "init", "telinit"];

pub(super) const BIN_DIRS: &[&str] = &["/sbin", "/usr/sbin", "/bin", "/usr/bin"];

/// systemctl options (systemd 252-257) whose value may be the next word: `--message reboot`
/// and `-p reboot` do not make `reboot` the verb, and `--message x reboot` still reboots.
pub(super) const SYSTEMCTL_VALUE_OPTIONS: &[&str] = &[
    "-t",
    "--type",
    "--state",
    "-p",
    "--property",
    "-P",
    "--kill-whom",
    "--kill-value",
    "-s",
    "--signal",
    "--what",
    "--job-mode",
    "--root",
    "--image",
    "--image-policy",
    "-n",
    "--lines",
    "-o",
    "--output",
    "--preset-mode",
    "-H",
    "--host",
    "-M",
    "--machine",
    "--message",
    "--boot-loader-menu",
    "--boot-loader-entry",
    "--reboot-argument",
    "--timestamp",
    "--check-inhibitors",
    "--legend",
    "--plain",
    "--when",
    "--drop-in",
    "--capsule",
    "-C",
];

/// systemctl verbs that do not shut down. While looking for the verb, words that are neither
/// these nor a shutdown verb are skipped (they are values of options the table may not know), so
/// `systemctl --some-new-option value reboot` is still a reboot and `systemctl status reboot`
/// is not.
pub(super) const SYSTEMCTL_OTHER_VERBS: &[&str] = &[
    "list-units",
    "list-automounts",
    "list-paths",
    "list-sockets",
    "list-timers",
    "list-unit-files",
    "list-dependencies",
    "list-machines",
    "list-jobs",
    "is-active",
    "is-failed",
    "is-enabled",
    "is-system-running",
    "status",
    "show",
    "cat",
    "help",
    "stop",
    "reload",
    "restart",
    "try-restart",
    "reload-or-restart",
    "try-reload-or-restart",
    "condrestart",
    "force-reload",
    "kill",
    "clean",
    "freeze",
    "thaw",
    "set-property",
    "bind",
    "mount-image",
    "service-log-level",
    "service-log-target",
    "reset-failed",
    "whoami",
    "enable",
    "disable",
    "reenable",
    "preset",
    "preset-all",
    "mask",
    "unmask",
    "link",
    "revert",
    "add-wants",
    "add-requires",
    "edit",
    "get-default",
    "set-default",
    "cancel",
    "show-environment",
    "set-environment",
    "unset-environment",
    "import-environment",
    "daemon-reload",
    "daemon-reexec",
    "log-level",
    "log-target",
    "service-watchdogs",
    "default",
    "rescue",
    "emergency",
];

/// The words the kernel recognises in argv, with their flags.
pub(super) fn words() -> Vec<(&'static str, u32)> {
    let mut v: Vec<(&'static str, u32)> = Vec::new();
    for w in SHUTDOWN_NAMES {
        v.push((w, SD_W_ARGV0_SHUTDOWN));
    }
    v.push(("shutdown", SD_W_ARGV0_CANCELS));
    v.push(("-c", SD_W_OPT_CANCEL));
    // systemd's shutdown: the last of these wins over an earlier `-c`.
    for o in [
        "-r",
        "-h",
        "-H",
        "-P",
        "-k",
        "--reboot",
        "--halt",
        "--poweroff",
    ] {
        v.push((o, SD_W_OPT_ACTION));
    }
    for o in SYSTEMCTL_VALUE_OPTIONS {
        v.push((o, SD_W_OPT_VALUE));
    }
    for w in SYSTEMCTL_OTHER_VERBS {
        v.push((w, SD_W_VERB_OTHER));
    }
    v.push(("systemctl", SD_W_ARGV0_SYSTEMCTL));
    v.push(("init", SD_W_ARGV0_INIT));
    v.push(("telinit", SD_W_ARGV0_INIT));
    for w in [
        "reboot",
        "poweroff",
        "halt",
        "kexec",
        "soft-reboot",
        "suspend",
        "hibernate",
        "hybrid-sleep",
        "suspend-then-hibernate",
    ] {
        v.push((w, SD_W_VERB));
    }
    v.push(("start", SD_W_START));
    v.push(("isolate", SD_W_START));
    for t in [
        "reboot",
        "poweroff",
        "halt",
        "kexec",
        "ctrl-alt-del",
        "runlevel0",
        "runlevel6",
        "soft-reboot",
        "suspend",
        "hibernate",
    ] {
        // `isolate` adds .target itself; `start` needs it written.
        v.push((
            Box::leak(format!("{t}.target").into_boxed_str()),
            SD_W_TARGET,
        ));
        v.push((t, SD_W_TARGET));
    }
    v.push(("0", SD_W_RUNLEVEL));
    v.push(("6", SD_W_RUNLEVEL));
    v
}

pub(super) fn file_id(path: &Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    Some(FileId {
        dev: kernel_dev_from_user(m.dev()),
        ino: m.ino(),
    })
}

/// Shutdown programs on this host by identity: dedicated ones (whatever they link to) are
/// shutdowns on every exec; multi-call binaries (systemctl, busybox, systemd as init) are
/// judged by argv. The policy's extra `commands` are dedicated.
pub(super) fn shutdown_exes(policy: &gp::Policy) -> Vec<(FileId, u32, PathBuf)> {
    let mut v: Vec<(FileId, u32, PathBuf)> = Vec::new();
    for dir in BIN_DIRS {
        for name in SHUTDOWN_NAMES.iter().chain(MULTICALL_NAMES) {
            let p = Path::new(dir).join(name);
            let Ok(real) = std::fs::canonicalize(&p) else {
                continue;
            };
            let Some(id) = file_id(&real) else { continue };
            let base = real
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kind = if SHUTDOWN_NAMES.contains(&base.as_str()) {
                SD_EXE_ALWAYS
            } else if base == "systemctl" {
                SD_EXE_SYSTEMCTL
            } else {
                SD_EXE_MULTICALL
            };
            if !v.iter().any(|(i, _, _)| *i == id) {
                v.push((id, kind, real));
            }
        }
    }
    for c in &policy.shutdown.commands {
        if let Some(id) = file_id(c) {
            v.retain(|(i, _, _)| *i != id);
            v.push((id, SD_EXE_ALWAYS, c.clone()));
        }
    }
    v
}

pub(super) fn action(a: gp::ShutdownAction) -> u32 {
    match a {
        gp::ShutdownAction::Allow => SD_ALLOW,
        gp::ShutdownAction::Confirm => SD_CONFIRM,
        gp::ShutdownAction::Block => SD_BLOCK,
    }
}

/// The kernel's per-class answers, indexed by `SD_CLASS_*`: what `explain_shutdown` says for
/// each class when no exception applies (exceptions are matched in the kernel separately).
pub(super) fn class_actions(policy: &gp::Policy) -> [u32; SD_CLASSES] {
    let mut a = [SD_CONFIRM; SD_CLASSES];
    for (i, class) in [
        (SD_CLASS_LOCAL, gp::SessionClass::Local),
        (SD_CLASS_REMOTE, gp::SessionClass::Remote),
        (SD_CLASS_NONE, gp::SessionClass::None),
        (SD_CLASS_UNKNOWN, gp::SessionClass::Unknown),
    ] {
        a[i as usize] = action(gp::explain_shutdown(policy, class, None, None).action);
    }
    a
}

/// The logind lock is wanted when the kernel refuses anything: some class confirms or blocks,
/// and the policy enforces (audit mode never stops a request).
pub(super) fn inhibitor_want(
    policy: &gp::Shutdown,
    actions: &[u32; SD_CLASSES],
    audit: bool,
    host: &str,
) -> Want {
    if !policy.logind_inhibitor {
        return Want::No {
            reason: "turned off by the policy (shutdown.logind_inhibitor = false)".into(),
        };
    }
    if audit {
        return Want::No {
            reason: "audit mode (nothing is refused)".into(),
        };
    }
    if actions.contains(&SD_CONFIRM) {
        Want::Hold {
            why: format!("guardrail: remote shutdowns need `guardrail confirm {host}`"),
        }
    } else if actions.contains(&SD_BLOCK) {
        Want::Hold {
            why: "guardrail: the policy blocks shutdowns from some sessions".into(),
        }
    } else {
        Want::No {
            reason: "the policy allows every shutdown".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    pub(super) fn kernel_actions_follow_the_shipped_policy() {
        let checked = gp::check_str(
            "(embedded default)",
            gp::DEFAULT_POLICY,
            &gp::SystemResolver,
        );
        let policy = checked.policy.expect("the default policy is valid");
        let a = class_actions(&policy);
        // Shipped default: remote → confirm, local → allow, none → allow, unknown → like remote.
        assert_eq!(a[SD_CLASS_REMOTE as usize], SD_CONFIRM);
        assert_eq!(a[SD_CLASS_LOCAL as usize], SD_ALLOW);
        assert_eq!(a[SD_CLASS_NONE as usize], SD_ALLOW);
        assert_eq!(a[SD_CLASS_UNKNOWN as usize], SD_CONFIRM);
    }

    #[test]
    pub(super) fn the_logind_lock_follows_the_policy_switch() {
        let checked = gp::check_str(
            "(embedded default)",
            &format!(
                "{}\n",
                gp::DEFAULT_POLICY.replace("logind_inhibitor = true", "logind_inhibitor = false")
            ),
            &gp::SystemResolver,
        );
        let off = checked.policy.expect("valid");
        assert!(!off.shutdown.logind_inhibitor, "the switch is read");
        let a = class_actions(&off);
        assert_eq!(
            inhibitor_want(&off.shutdown, &a, false, "h"),
            Want::No {
                reason: "turned off by the policy (shutdown.logind_inhibitor = false)".into()
            }
        );
        let on = gp::check_str(
            "(embedded default)",
            gp::DEFAULT_POLICY,
            &gp::SystemResolver,
        )
        .policy
        .expect("valid");
        assert!(matches!(
            inhibitor_want(&on.shutdown, &a, false, "h"),
            Want::Hold { .. }
        ));
    }

    /// A word that is both a shutdown verb and an ordinary one would let `systemctl <it>` pass;
    /// a value option that is also a verb would hide the verb after it.
    #[test]
    pub(super) fn verb_and_option_flags_never_overlap() {
        let mut flags: HashMap<u64, u32> = HashMap::new();
        for (w, f) in words() {
            *flags.entry(word_hash(w.as_bytes())).or_default() |= f;
        }
        for (w, _) in words() {
            let f = flags[&word_hash(w.as_bytes())];
            assert!(
                f & SD_W_VERB_OTHER == 0 || f & (SD_W_VERB | SD_W_START | SD_W_TARGET) == 0,
                "{w}: {f:#x}"
            );
            assert!(f & SD_W_OPT_VALUE == 0 || w.starts_with('-'), "{w}");
        }
        // `-H` is `shutdown --halt` and `systemctl --host HOST`: which one applies depends on
        // argv[0], in the kernel.
        let h = flags[&word_hash(b"-H")];
        assert_eq!(
            h & (SD_W_OPT_ACTION | SD_W_OPT_VALUE),
            SD_W_OPT_ACTION | SD_W_OPT_VALUE
        );
        assert_eq!(flags[&word_hash(b"status")], SD_W_VERB_OTHER);
    }

    #[test]
    pub(super) fn words_are_flagged_once_each_with_all_their_meanings() {
        let mut flags: HashMap<u64, u32> = HashMap::new();
        for (w, f) in words() {
            *flags.entry(word_hash(w.as_bytes())).or_default() |= f;
        }
        let reboot = flags[&word_hash(b"reboot")];
        assert_eq!(
            reboot & (SD_W_ARGV0_SHUTDOWN | SD_W_VERB),
            SD_W_ARGV0_SHUTDOWN | SD_W_VERB
        );
        assert_eq!(flags[&word_hash(b"runlevel0.target")], SD_W_TARGET);
        assert_eq!(reboot & SD_W_VERB_OTHER, 0);
        assert!(!flags.contains_key(&word_hash(b"list-reboots")));
        // SD_WORDS holds 256 entries.
        assert!(flags.len() <= 256, "{} words", flags.len());
    }
}
