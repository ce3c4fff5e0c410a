//! The shutdown guard's kernel tables, compiled from the policy like the deletion guard's
//! ([`crate::compile`]): the words the kernel recognises in a shutdown program's argv (verbs,
//! systemctl's options), the shutdown executables by file identity, the executables of the
//! policy's exceptions, and the answer per session class. The agent writes them into the maps
//! as they are; nothing here reads a map.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use guardrail_common::{
    FileId, SD_ALLOW, SD_BLOCK, SD_CLASS_LOCAL, SD_CLASS_NONE, SD_CLASS_REMOTE, SD_CLASS_UNKNOWN,
    SD_CLASSES, SD_CONFIRM, SD_EXE_ALWAYS, SD_EXE_MULTICALL, SD_EXE_SYSTEMCTL, SD_W_ARGV0_CANCELS,
    SD_W_ARGV0_INIT, SD_W_ARGV0_SHUTDOWN, SD_W_ARGV0_SYSTEMCTL, SD_W_OPT_ACTION, SD_W_OPT_CANCEL,
    SD_W_OPT_VALUE, SD_W_RUNLEVEL, SD_W_START, SD_W_TARGET, SD_W_VERB, SD_W_VERB_OTHER,
    kernel_dev_from_user, word_hash,
};

use crate::{Policy, Resolver, SessionClass, ShutdownAction, explain_shutdown};

/// What the shutdown guard's maps hold for one policy.
#[derive(Debug, Clone, Default)]
pub struct ShutdownTables {
    /// `SD_WORDS`: word hash → every meaning of the word (`SD_W_*`, or-ed).
    pub words: BTreeMap<u64, u32>,
    /// `SD_EXES`: shutdown programs on this host by identity, their kind (`SD_EXE_*`) and the
    /// path they were found at (for `status`).
    pub exes: Vec<(FileId, u32, PathBuf)>,
    /// `SD_EXCEPT_EXES`: the executables `[[shutdown.exception]]` names.
    pub except_exes: Vec<FileId>,
    /// `SD_CONFIG.action`: the answer per `SD_CLASS_*` when no exception applies.
    pub class_actions: [u32; SD_CLASSES],
}

/// Compiles the shutdown tables; identities come from `resolver` (the host's, or a test's).
pub fn compile_shutdown(policy: &Policy, resolver: &dyn Resolver) -> ShutdownTables {
    let mut word_flags = BTreeMap::new();
    for (w, f) in words() {
        *word_flags.entry(word_hash(w.as_bytes())).or_default() |= f;
    }
    let file_id = |p: &Path| {
        resolver.identity(p).map(|(dev, ino)| FileId {
            dev: kernel_dev_from_user(dev),
            ino,
        })
    };
    ShutdownTables {
        words: word_flags,
        exes: shutdown_exes(policy, resolver),
        except_exes: policy
            .shutdown
            .exceptions
            .iter()
            .flat_map(|e| e.executables.iter())
            .filter_map(|x| file_id(x))
            .collect(),
        class_actions: class_actions(policy),
    }
}

pub(crate) const SHUTDOWN_NAMES: &[&str] = &["shutdown", "reboot", "poweroff", "halt"];

pub(crate) const MULTICALL_NAMES: &[&str] = &["systemctl", "init", "telinit"];

pub(crate) const BIN_DIRS: &[&str] = &["/sbin", "/usr/sbin", "/bin", "/usr/bin"];

/// systemctl options (systemd 252-257) whose value may be the next word: `--message reboot`
/// and `-p reboot` do not make `reboot` the verb, and `--message x reboot` still reboots.
pub(crate) const SYSTEMCTL_VALUE_OPTIONS: &[&str] = &[
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
pub(crate) const SYSTEMCTL_OTHER_VERBS: &[&str] = &[
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
fn words() -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = Vec::new();
    for w in SHUTDOWN_NAMES {
        v.push((w.to_string(), SD_W_ARGV0_SHUTDOWN));
    }
    v.push(("shutdown".to_string(), SD_W_ARGV0_CANCELS));
    v.push(("-c".to_string(), SD_W_OPT_CANCEL));
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
        v.push((o.to_string(), SD_W_OPT_ACTION));
    }
    for o in SYSTEMCTL_VALUE_OPTIONS {
        v.push((o.to_string(), SD_W_OPT_VALUE));
    }
    for w in SYSTEMCTL_OTHER_VERBS {
        v.push((w.to_string(), SD_W_VERB_OTHER));
    }
    v.push(("systemctl".to_string(), SD_W_ARGV0_SYSTEMCTL));
    v.push(("init".to_string(), SD_W_ARGV0_INIT));
    v.push(("telinit".to_string(), SD_W_ARGV0_INIT));
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
        v.push((w.to_string(), SD_W_VERB));
    }
    v.push(("start".to_string(), SD_W_START));
    v.push(("isolate".to_string(), SD_W_START));
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
        v.push((format!("{t}.target"), SD_W_TARGET));
        v.push((t.to_string(), SD_W_TARGET));
    }
    v.push(("0".to_string(), SD_W_RUNLEVEL));
    v.push(("6".to_string(), SD_W_RUNLEVEL));
    v
}

/// Shutdown programs on this host by identity: dedicated ones (whatever they link to) are
/// shutdowns on every exec; multi-call binaries (systemctl, busybox, systemd as init) are
/// judged by argv. The policy's extra `commands` are dedicated.
fn shutdown_exes(policy: &Policy, resolver: &dyn Resolver) -> Vec<(FileId, u32, PathBuf)> {
    let file_id = |p: &Path| {
        resolver.identity(p).map(|(dev, ino)| FileId {
            dev: kernel_dev_from_user(dev),
            ino,
        })
    };
    let mut v: Vec<(FileId, u32, PathBuf)> = Vec::new();
    for dir in BIN_DIRS {
        for name in SHUTDOWN_NAMES.iter().chain(MULTICALL_NAMES) {
            let Some(real) = resolver.canonical(&Path::new(dir).join(name)) else {
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

fn action(a: ShutdownAction) -> u32 {
    match a {
        ShutdownAction::Allow => SD_ALLOW,
        ShutdownAction::Confirm => SD_CONFIRM,
        ShutdownAction::Block => SD_BLOCK,
    }
}

/// The kernel's per-class answers, indexed by `SD_CLASS_*`: what `explain_shutdown` says for
/// each class when no exception applies (exceptions are matched in the kernel separately).
fn class_actions(policy: &Policy) -> [u32; SD_CLASSES] {
    let mut a = [SD_CONFIRM; SD_CLASSES];
    for (i, class) in [
        (SD_CLASS_LOCAL, SessionClass::Local),
        (SD_CLASS_REMOTE, SessionClass::Remote),
        (SD_CLASS_NONE, SessionClass::None),
        (SD_CLASS_UNKNOWN, SessionClass::Unknown),
    ] {
        a[i as usize] = action(explain_shutdown(policy, class, None, None).action);
    }
    a
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn kernel_actions_follow_the_shipped_policy() {
        let checked = crate::check_str(
            "(embedded default)",
            crate::DEFAULT_POLICY,
            &crate::SystemResolver,
        );
        let policy = checked.policy.expect("the default policy is valid");
        let a = class_actions(&policy);
        // Shipped default: remote → confirm, local → allow, none → allow, unknown → like remote.
        assert_eq!(a[SD_CLASS_REMOTE as usize], SD_CONFIRM);
        assert_eq!(a[SD_CLASS_LOCAL as usize], SD_ALLOW);
        assert_eq!(a[SD_CLASS_NONE as usize], SD_ALLOW);
        assert_eq!(a[SD_CLASS_UNKNOWN as usize], SD_CONFIRM);
    }

    /// A word that is both a shutdown verb and an ordinary one would let `systemctl <it>` pass;
    /// a value option that is also a verb would hide the verb after it.
    #[test]
    fn verb_and_option_flags_never_overlap() {
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
    fn words_are_flagged_once_each_with_all_their_meanings() {
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

    /// The tables the agent installs are the ones compiled here: the word map holds every word
    /// with all its meanings, the class answers follow the policy.
    #[test]
    fn compiled_tables_hold_every_word_and_class() {
        let policy = crate::check_str(
            "(embedded default)",
            crate::DEFAULT_POLICY,
            &crate::SystemResolver,
        )
        .policy
        .expect("valid");
        let t = compile_shutdown(&policy, &crate::SystemResolver);
        assert_eq!(t.class_actions, class_actions(&policy));
        for (w, f) in words() {
            assert_eq!(t.words[&word_hash(w.as_bytes())] & f, f, "{w}");
        }
    }
}
