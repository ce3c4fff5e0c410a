//! guardrail's policy: parse, validate, explain and compile the admin's TOML into the tables the
//! kernel reads. A pure library: no BPF, no daemons; the host is only seen through [`Resolver`].
//!
//! # Files
//!
//! `/etc/guardrail/policy.toml`, then every `/etc/guardrail/policy.d/*.toml` in byte order of
//! file name. Merging: a later file wins for scalars; lists of paths and names (`targets`,
//! `protected_roots`, `shutdown.commands`) are unioned (a drop-in cannot remove an entry: edit
//! the main file for that); `[[deletion.rule]]`, `[[deletion.exempt]]` and
//! `[[shutdown.exception]]` with the same `name`, and `[[deletion.data_dir]]` with the same
//! `path`, replace the earlier table in place; new ones are appended. Two tables with the same
//! name in one file are an error (E0012).
//!
//! # Format
//!
//! ```toml
//! mode = "enforce"            # enforce | audit (compute and alert "would have", stop nothing);
//!                             # global audit overrides every rule's mode
//! [deletion]
//! budget = 300                # deletions outside targets per job per window, 0..=100000000
//! window = "1m"               # durations: integer + ms|s|m|h ("500ms", "90s", "10m", "1h"), > 0;
//!                             # window <= 24h (E0019 above)
//! action = "hold"             # hold | block | alert, when a job crosses its budget
//! hold_timeout = "30m"        # an unanswered hold is denied after this; <= 168h
//! on_deny = "kill"            # kill | refuse (resume, refusing deletions outside scope while it runs)
//! on_agent_stop = "end"       # end | continue: the held jobs when the agent is stopped (not restarted)
//! targets = ["/tmp", "/home/*/.cache"]  # free to delete in; `*` only as a whole component;
//!                             # never `/` or a directory holding a protected root or data dir
//!                             # (E0018); symlinks and foreign directories are left out (W0008,
//!                             # see SystemResolver)
//! protected_roots = ["/", "/etc"]       # these entries themselves are never deleted or renamed
//! protect_mount_points = true # other filesystems' mount points are protected roots too
//!
//! [[deletion.data_dir]]       # only its owners may delete below it; others refused from the 1st file
//! path = "/var/lib/postgresql"
//! owners = { units = ["postgresql@15-main.service"], executables = [], users = ["postgres"], cgroups = [] }
//!
//! [[deletion.rule]]           # a per-job scope
//! name = "nightly-update"
//! match = { unit = "nightly-update.service" }  # exactly one of unit | executable | user | cgroup
//! targets = ["/srv/releases"] # the ONLY targets of this job (global targets do not apply)
//! budget = 0                  # optional, default [deletion].budget
//! window = "1m"               # optional, default [deletion].window
//! action = "hold"             # optional, default [deletion].action
//! mode = "audit"              # optional, default enforce
//!
//! [[deletion.exempt]]         # no budget; protected roots and foreign data dirs still refuse
//! name = "package-managers"
//! executables = ["/usr/bin/dpkg"]
//! units = []
//! cgroups = []
//! users = []
//!
//! [shutdown]                  # allow | confirm | block, per session class
//! remote = "confirm"
//! local = "allow"
//! none = "allow"              # no login session (services, timers): allowed, with an alert
//! unknown = "confirm"         # a session the agent cannot classify: like remote
//! serial_console = "local"    # local | remote: how ttyS*/hvc0 sessions count (default local;
//!                             # say remote when the console is IPMI serial-over-LAN or a cloud console)
//! confirm_window = "2m"      # <= 1h
//! logind_inhibitor = true     # hold logind's block lock on shutdown (D-Bus requests to logind)
//! commands = []               # extra executables treated as shutdown commands
//! [[shutdown.exception]]      # allowed whatever the session
//! name = "unattended-upgrades"
//! units = ["unattended-upgrades.service"]
//! executables = []
//!
//! [alerts.syslog]
//! enabled = true
//! format = "rfc5424"          # rfc5424 | rfc3164
//! facility = "authpriv"       # kern user mail daemon auth syslog lpr news uucp cron authpriv ftp local0..local7
//! app_name = "guardrail"      # 1-48 printable ASCII, no spaces
//! remote = ""                 # "", "udp://host:port" or "tcp://host:port"
//! [alerts.event_log]
//! path = "/var/log/guardrail/events.jsonl"
//! [alerts.prometheus]
//! listen = ""                 # "" (off) or ip:port, loopback advised (W0005 otherwise)
//! textfile = ""               # "" (off) or a node_exporter textfile path
//! [alerts.alertmanager]
//! url = ""                    # "" (off) or "http(s)://host:port"
//! ```
//!
//! Keys left out take the values shown in the shipped file ([`DEFAULT_POLICY`]); lists left out
//! are empty.
//!
//! # Matching jobs
//!
//! A job's rule is chosen by executable (its identity, inherited by everything the matching
//! exec starts) > unit or cgroup > user > the default rule 0. Units must be `.service` or
//! `.scope` instances: other unit types (a `.timer`, a `.slice`, a template `foo@.service`) never
//! hold a job's processes, so naming one is E0006. A unit is a system unit: its cgroup is looked
//! up where only root can create cgroups (`system.slice/<unit>`, nested system slices, the root),
//! never in `user.slice` or `machine.slice`, whose trees are delegated to users and containers
//! ([`find_system_unit`]); to match a cgroup elsewhere, name its path with `cgroup`. A data
//! directory owner is any identity listed in `owners`; name it the way the job will actually be
//! matched (precedence above).
//!
//! "An exemption wider than `/`" (W0004) is one that covers arbitrary commands rather than a
//! specific program: user `root`/`0`; the root cgroup, `system.slice`, `user.slice`,
//! `init.scope`, `-.slice`; or an executable that is a shell, interpreter, privilege wrapper,
//! session manager or generic deletion tool (`bash`, `python3`, `env`, `sudo`, `rm`, `find`,
//! `rsync`, `tmux`, `sshd`, ...), since everything such a program starts inherits the exemption.
//!
//! # Stages
//!
//! 1. [`raw`](crate) parse: unknown keys, wrong types and TOML syntax errors, positioned (the
//!    TOML parser stops at the first such error in a file).
//! 2. Validation into [`Policy`], with every [`Diagnostic`] positioned at the offending value.
//!
//! Then [`compile`] into kernel tables and [`explain`] from those same tables.

mod compile;
mod diag;
mod explain;
mod model;
mod raw;
mod resolver;
mod shutdown_tables;
pub mod suggest;
mod validate;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use compile::{CompileWarning, Compiled, compile, kernel_identity};
pub use diag::{Code, Diagnostic, Severity};
pub use explain::{
    Explanation, JobSpec, MatchedBy, ShutdownDecision, Verdict, explain, explain_shutdown, job_rule,
};
pub use model::*;
pub use resolver::{
    Declared, MemResolver, Resolver, Skipped, SystemResolver, ancestors, cgroup2_root,
    find_system_unit, glob_matches, parse_mountinfo, parse_passwd, too_wide_for_targets,
};
pub use shutdown_tables::{ShutdownTables, compile_shutdown};

/// The shipped default policy (`packaging/policy.toml`, installed as
/// `/etc/guardrail/policy.toml`).
pub const DEFAULT_POLICY: &str = include_str!("../../packaging/policy.toml");

/// Where the agent reads its policy.
pub const POLICY_PATH: &str = "/etc/guardrail/policy.toml";
/// Where drop-ins live.
pub const DROPIN_DIR: &str = "/etc/guardrail/policy.d";

/// The result of a check: the policy when there is no error, and every diagnostic.
#[derive(Clone, Debug, Serialize)]
pub struct Checked {
    pub policy: Option<Policy>,
    pub diagnostics: Vec<Diagnostic>,
}

impl Checked {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| !d.is_error())
    }

    /// The policy, or every error.
    pub fn into_result(self) -> Result<(Policy, Vec<Diagnostic>), PolicyError> {
        match self.policy {
            Some(p) => Ok((p, self.diagnostics)),
            None => Err(PolicyError {
                diagnostics: self.diagnostics,
            }),
        }
    }
}

/// A policy that does not load.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{} error(s) in the policy{}", .diagnostics.iter().filter(|d| d.is_error()).count(), first_error(.diagnostics))]
pub struct PolicyError {
    pub diagnostics: Vec<Diagnostic>,
}

fn first_error(d: &[Diagnostic]) -> String {
    d.iter()
        .find(|d| d.is_error())
        .map(|d| format!(", first: {}:{}:{}: {}", d.file, d.line, d.column, d.message))
        .unwrap_or_default()
}

/// Checks one policy text (`name` is used in diagnostics).
pub fn check_str(name: &str, text: &str, resolver: &dyn Resolver) -> Checked {
    check_sources(&[(name.to_string(), text.to_string())], resolver)
}

/// Checks a main file and drop-ins given as (name, text), merged in the order given.
pub fn check_sources(files: &[(String, String)], resolver: &dyn Resolver) -> Checked {
    check_inner(
        files
            .iter()
            .map(|(n, t)| (n.clone(), Ok(t.clone())))
            .collect(),
        resolver,
    )
}

/// Reads and checks `main` and `dropin_dir/*.toml` (in byte order of file name; a missing
/// drop-in directory is not an error).
pub fn check_files(main: &Path, dropin_dir: Option<&Path>, resolver: &dyn Resolver) -> Checked {
    let mut files: Vec<(String, Result<String, String>)> = Vec::new();
    files.push((main.display().to_string(), read(main)));
    if let Some(dir) = dropin_dir {
        match std::fs::read_dir(dir) {
            Ok(rd) => {
                let mut names: Vec<PathBuf> = rd
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.extension().is_some_and(|e| e == "toml")
                            && !p
                                .file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                    })
                    .collect();
                names.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
                for p in names {
                    let text = read(&p);
                    files.push((p.display().to_string(), text));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => files.push((dir.display().to_string(), Err(e.to_string()))),
        }
    }
    check_inner(files, resolver)
}

fn read(p: &Path) -> Result<String, String> {
    std::fs::read(p)
        .map_err(|e| e.to_string())
        .and_then(|b| String::from_utf8(b).map_err(|_| "not UTF-8 text".to_string()))
}

fn check_inner(files: Vec<(String, Result<String, String>)>, resolver: &dyn Resolver) -> Checked {
    use raw::Merge;
    let mut map = diag::SourceMap::default();
    let bases: Vec<usize> = files
        .iter()
        .map(|(n, t)| map.add(n, t.as_deref().unwrap_or("")))
        .collect();
    let mut sink = diag::Sink::new(&map);
    let mut merged: Option<raw::RawFile> = None;
    let mut parse_failed = false;
    for ((name, text), base) in files.iter().zip(&bases) {
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                sink.push(
                    Code::ReadError,
                    &(*base..*base),
                    format!("cannot read {name}: {e}"),
                    "check that the file exists and is readable by root",
                );
                parse_failed = true;
                continue;
            }
        };
        match raw::parse_file(text, *base, &mut sink) {
            Some(r) => match merged.as_mut() {
                None => merged = Some(r),
                Some(m) => m.merge(r, &mut sink),
            },
            None => parse_failed = true,
        }
    }
    if parse_failed {
        // Later findings would be about a half-read policy: report what stopped the parse.
        return Checked {
            policy: None,
            diagnostics: sink.out,
        };
    }
    let merged = merged.unwrap_or_default();
    let names = files.iter().map(|(n, _)| n.clone()).collect();
    let mut v = validate::V {
        sink: &mut sink,
        resolver,
    };
    let policy = validate::validate(&merged, names, &mut v);
    let ok = !sink.has_errors();
    let mut diagnostics = sink.out;
    let order = |d: &Diagnostic| files.iter().position(|(n, _)| *n == d.file).unwrap_or(0);
    diagnostics.sort_by_key(|d| (order(d), d.line, d.column));
    Checked {
        policy: ok.then_some(policy),
        diagnostics,
    }
}
