//! Stage 2: from the merged raw model to [`Policy`], with every diagnostic positioned.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::diag::{Code, Sink};
use crate::model::*;
use crate::raw::*;
use crate::resolver::{Resolver, components, pattern_covers};

/// Built-in values of keys the files leave out (the shipped policy writes them all out).
pub(crate) mod defaults {
    use std::time::Duration;
    pub const BUDGET: u64 = 300;
    pub const WINDOW: Duration = Duration::from_secs(60);
    pub const HOLD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
    /// `deletion.never_hold` when a policy does not say: what logins, logging and the bus need.
    pub const NEVER_HOLD: &[&str] = &[
        "init.scope",
        "systemd-logind.service",
        "systemd-journald.service",
        "systemd-udevd.service",
        "dbus.service",
        "dbus-broker.service",
        "ssh.service",
        "sshd.service",
        "guardrail.service",
    ];
    /// `[deletion.session]` and `[deletion.user]` when a section is there without a budget or
    /// window (a policy without the section has the level off).
    pub const SESSION_BUDGET: u64 = 500;
    pub const USER_BUDGET: u64 = 1000;
    pub const CONFIRM_WINDOW: Duration = Duration::from_secs(120);
    pub const EVENT_LOG: &str = "/var/log/guardrail/events.jsonl";
    pub const APP_NAME: &str = "guardrail";
    pub const FACILITY: &str = "authpriv";
}

/// Unit suffixes whose units run processes in their own cgroup.
const JOB_UNIT_SUFFIXES: &[&str] = &[".service", ".scope"];
/// Other unit types: valid systemd names, but no job ever runs in their cgroup.
const OTHER_UNIT_SUFFIXES: &[&str] = &[
    ".timer",
    ".socket",
    ".path",
    ".target",
    ".slice",
    ".mount",
    ".automount",
    ".swap",
    ".device",
];

/// Executables whose exemption exempts arbitrary commands ("wider than /").
const WIDE_EXECUTABLES: &[&str] = &[
    "sh",
    "bash",
    "dash",
    "zsh",
    "ksh",
    "mksh",
    "fish",
    "tcsh",
    "csh",
    "busybox",
    "env",
    "sudo",
    "su",
    "doas",
    "run0",
    "systemd-run",
    "python",
    "python3",
    "perl",
    "ruby",
    "node",
    "rm",
    "find",
    "xargs",
    "rsync",
    "unlink",
    "rmdir",
    "mv",
    "sshd",
    "sshd-session",
    "systemd",
    "init",
    "cron",
    "crond",
    "atd",
    "tmux",
    "screen",
];
/// Cgroups (and units) that hold every service or every login.
const WIDE_CGROUPS: &[&str] = &[
    "/",
    "/system.slice",
    "/user.slice",
    "/init.scope",
    "system.slice",
    "user.slice",
    "-.slice",
];

/// Which identity a rule, exemption or owner names (for the kernel's lookup tables).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Key {
    Unit(String),
    Exe(PathBuf),
    User(String),
    Cgroup(String),
}

impl From<&JobMatch> for Key {
    fn from(m: &JobMatch) -> Self {
        match m {
            JobMatch::Unit(u) => Key::Unit(u.clone()),
            JobMatch::Executable(p) => Key::Exe(p.clone()),
            JobMatch::User(u) => Key::User(u.clone()),
            JobMatch::Cgroup(c) => Key::Cgroup(c.clone()),
        }
    }
}

pub(crate) struct V<'r, 's, 'm> {
    pub sink: &'s mut Sink<'m>,
    pub resolver: &'r dyn Resolver,
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

impl V<'_, '_, '_> {
    fn push(
        &mut self,
        code: Code,
        span: &Range<usize>,
        msg: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.sink.push(code, span, msg, hint);
    }

    fn choice<T: Copy>(&mut self, s: &Str, field: &str, allowed: &[(&str, T)], default: T) -> T {
        let Some(s) = s else { return default };
        if let Some((_, v)) = allowed.iter().find(|(n, _)| *n == s.value) {
            return *v;
        }
        let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
        let hint = match crate::raw::closest(&s.value, &names) {
            Some(c) => format!(
                "did you mean \"{c}\"? {field} is one of: {}",
                names.join(", ")
            ),
            None => format!("{field} is one of: {}", names.join(", ")),
        };
        self.push(
            Code::BadEnumValue,
            &s.span,
            format!("{} is not a valid value for {field}", quoted(&s.value)),
            hint,
        );
        default
    }

    /// A positive duration of at most `max`.
    fn duration(&mut self, s: &Str, field: &str, default: Duration, max: Duration) -> Duration {
        let Some(s) = s else { return default };
        match parse_duration(&s.value) {
            Some(d) if d > max => {
                self.push(
                    Code::DurationTooLong,
                    &s.span,
                    format!(
                        "{field} {} is longer than its maximum, {}",
                        quoted(&s.value),
                        format_duration(max)
                    ),
                    format!("write at most \"{}\"", format_duration(max)),
                );
                default
            }
            Some(d) if !d.is_zero() => d,
            Some(_) => {
                self.push(
                    Code::BadDuration,
                    &s.span,
                    format!("{field} must not be zero"),
                    "use a positive duration such as \"1m\"",
                );
                default
            }
            None => {
                self.push(
                    Code::BadDuration,
                    &s.span,
                    format!("bad duration {} for {field}", quoted(&s.value)),
                    "write an integer and one unit: \"500ms\", \"90s\", \"10m\", \"1h\"",
                );
                default
            }
        }
    }

    fn budget(&mut self, b: &Option<Sp<i64>>, field: &str, default: u64) -> u64 {
        let Some(b) = b else { return default };
        if b.value < 0 || b.value as u64 > MAX_BUDGET {
            self.push(
                Code::BudgetOutOfRange,
                &b.span,
                format!("{field} {} is out of range", b.value),
                format!(
                    "budgets go from 0 (no deletion outside targets) to {MAX_BUDGET}; to only \
                     watch, use action = \"alert\""
                ),
            );
            return default;
        }
        b.value as u64
    }

    /// Checks an absolute path; `glob` allows `*` as a whole component.
    fn path(&mut self, s: &Sp<String>, field: &str, glob: bool) -> Option<PathBuf> {
        let v = &s.value;
        if v.is_empty() || v.contains('\0') {
            self.push(
                Code::BadPath,
                &s.span,
                format!("empty or invalid path in {field}"),
                "write an absolute path such as \"/var/tmp\"",
            );
            return None;
        }
        if !v.starts_with('/') {
            self.push(
                Code::RelativePath,
                &s.span,
                format!("relative path {} in {field}", quoted(v)),
                format!(
                    "policy paths must be absolute, e.g. \"/{}\"",
                    v.trim_start_matches("./")
                ),
            );
            return None;
        }
        for c in components(v) {
            if c == "." || c == ".." {
                self.push(
                    Code::BadPath,
                    &s.span,
                    format!("path {} in {field} contains `{c}`", quoted(v)),
                    "write the path without `.` or `..` components",
                );
                return None;
            }
            let globby = c.contains(['*', '?', '[', ']', '{', '}']);
            if globby && !(glob && c == "*") {
                let hint = if glob {
                    "only `*` as a whole path component is a glob, e.g. \"/home/*/.cache\""
                } else {
                    "globs are only allowed in targets; list the paths here"
                };
                self.push(
                    Code::BadGlob,
                    &s.span,
                    format!("unsupported glob {} in {field}", quoted(v)),
                    hint,
                );
                return None;
            }
        }
        Some(crate::resolver::normalize(Path::new(v)))
    }

    /// Warns about a declared directory (target, protected root, data directory) that does not
    /// resolve, or whose resolution left something out (W0008: what compile will skip).
    fn warn_declared(&mut self, s: &Sp<String>, p: &Path, field: &str) {
        let d = self.resolver.declared(&p.to_string_lossy());
        for sk in &d.skipped {
            self.push(
                Code::UnsafePath,
                &s.span,
                format!(
                    "{} in {field}: {} {}; it is left out",
                    quoted(&s.value),
                    // Quoted: below a `*`, names are whatever a user chose (escape sequences).
                    quoted(&sk.path.to_string_lossy()),
                    sk.reason
                ),
                "a user can point their own symlinks and directories anywhere; name the real \
                 directory, owned by root (or, below a `*`, by the user it belongs to)",
            );
        }
        if d.found.is_empty() && d.skipped.is_empty() {
            self.warn_missing(s, p, field);
        }
    }

    fn warn_missing(&mut self, s: &Sp<String>, p: &Path, field: &str) {
        let pat = p.to_string_lossy();
        let missing = if components(&pat).any(|c| c == "*") {
            self.resolver.declared(&pat).found.is_empty()
        } else {
            self.resolver.identity(p).is_none()
        };
        if missing {
            self.push(
                Code::PathMissing,
                &s.span,
                format!(
                    "{} in {field} does not exist on this host",
                    quoted(&s.value)
                ),
                "it is ignored until it exists and the policy is reloaded; check for a typo",
            );
        }
    }

    fn paths(
        &mut self,
        list: &StrList,
        field: &str,
        glob: bool,
        check_exists: bool,
    ) -> Vec<(PathBuf, Sp<String>)> {
        let mut out: Vec<(PathBuf, Sp<String>)> = Vec::new();
        for s in list.iter().flatten() {
            if let Some(p) = self.path(s, field, glob) {
                if check_exists {
                    self.warn_declared(s, &p, field);
                }
                if !out.iter().any(|(q, _)| *q == p) {
                    out.push((p, s.clone()));
                }
            }
        }
        out
    }

    fn unit(&mut self, s: &Sp<String>, field: &str) -> Option<String> {
        let v = &s.value;
        let bad = |msg: String, hint: &str| (msg, hint.to_string());
        let problem = if v.is_empty() {
            Some(bad(
                format!("empty unit name in {field}"),
                "name a unit such as \"backup.service\"",
            ))
        } else if v.contains('/') || v.chars().any(char::is_whitespace) {
            Some(bad(
                format!("{} in {field} is not a unit name", quoted(v)),
                "unit names have no `/` or spaces; to match a cgroup path use `cgroup`",
            ))
        } else if let Some(suf) = OTHER_UNIT_SUFFIXES.iter().find(|s| v.ends_with(*s)) {
            let stem = &v[..v.len() - suf.len()];
            Some(bad(
                format!(
                    "unit {} in {field} never runs a job: no process runs in a {suf} unit's cgroup",
                    quoted(v)
                ),
                &format!("name the service it starts, e.g. \"{stem}.service\""),
            ))
        } else if !JOB_UNIT_SUFFIXES.iter().any(|s| v.ends_with(s)) {
            Some(bad(
                format!(
                    "unit name {} in {field} has no unit suffix, so it matches no unit",
                    quoted(v)
                ),
                &format!("write the full unit name, e.g. \"{v}.service\""),
            ))
        } else if v.contains("@.") {
            Some(bad(
                format!(
                    "{} in {field} is a template: no process runs in a template itself",
                    quoted(v)
                ),
                "name an instance, e.g. \"postgresql@15-main.service\"",
            ))
        } else {
            None
        };
        match problem {
            Some((msg, hint)) => {
                self.push(Code::MatchesNothing, &s.span, msg, hint);
                None
            }
            None => Some(v.clone()),
        }
    }

    fn user(&mut self, s: &Sp<String>, field: &str) -> Option<String> {
        let v = &s.value;
        if v.is_empty() || v.contains([':', '/']) || v.chars().any(char::is_whitespace) {
            self.push(
                Code::MatchesNothing,
                &s.span,
                format!(
                    "{} in {field} is not a user name, so it matches no process",
                    quoted(v)
                ),
                "write a login name such as \"postgres\" or a numeric uid such as \"1000\"",
            );
            return None;
        }
        if v.parse::<u32>().is_err() && self.resolver.uid(v).is_none() {
            self.push(
                Code::UnknownUser,
                &s.span,
                format!("user {} in {field} is not known on this host", quoted(v)),
                "it matches nothing until the user exists; check for a typo",
            );
        }
        Some(v.clone())
    }

    fn cgroup(&mut self, s: &Sp<String>, field: &str) -> Option<String> {
        let v = &s.value;
        if v.is_empty() {
            self.push(
                Code::MatchesNothing,
                &s.span,
                format!("empty cgroup in {field}"),
                "write a cgroup path such as \"/system.slice/backup.service\"",
            );
            return None;
        }
        if !v.starts_with('/') {
            self.push(
                Code::RelativePath,
                &s.span,
                format!("relative cgroup path {} in {field}", quoted(v)),
                format!("cgroup paths are written from the cgroup root, e.g. \"/{v}\""),
            );
            return None;
        }
        if v.len() > 1 && v.ends_with('/') {
            return Some(v.trim_end_matches('/').to_string());
        }
        Some(v.clone())
    }

    fn exe(&mut self, s: &Sp<String>, field: &str) -> Option<PathBuf> {
        let p = self.path(s, field, false)?;
        self.warn_missing(s, &p, field);
        Some(p)
    }

    fn identities(
        &mut self,
        owners: Option<&RawOwnersLike<'_>>,
        field: &str,
    ) -> (Identities, Vec<(Key, Range<usize>)>) {
        let mut ids = Identities::default();
        let mut keys = Vec::new();
        let Some(o) = owners else { return (ids, keys) };
        for s in o.units.iter().copied().flatten() {
            if let Some(u) = self.unit(s, &format!("{field}.units"))
                && !ids.units.contains(&u)
            {
                keys.push((Key::Unit(u.clone()), s.span.clone()));
                ids.units.push(u);
            }
        }
        for s in o.executables.iter().copied().flatten() {
            if let Some(p) = self.exe(s, &format!("{field}.executables"))
                && !ids.executables.contains(&p)
            {
                keys.push((Key::Exe(p.clone()), s.span.clone()));
                ids.executables.push(p);
            }
        }
        for s in o.users.iter().copied().flatten() {
            if let Some(u) = self.user(s, &format!("{field}.users"))
                && !ids.users.contains(&u)
            {
                keys.push((Key::User(u.clone()), s.span.clone()));
                ids.users.push(u);
            }
        }
        for s in o.cgroups.iter().copied().flatten() {
            if let Some(c) = self.cgroup(s, &format!("{field}.cgroups"))
                && !ids.cgroups.contains(&c)
            {
                keys.push((Key::Cgroup(c.clone()), s.span.clone()));
                ids.cgroups.push(c);
            }
        }
        (ids, keys)
    }

    fn name(&mut self, name: &Str, table: &Range<usize>, what: &str) -> Option<String> {
        match name {
            None => {
                self.push(
                    Code::MissingKey,
                    table,
                    format!("{what} has no `name`"),
                    "add name = \"...\": names appear in alerts and let a drop-in replace the table",
                );
                None
            }
            Some(n) if n.value.trim().is_empty() => {
                self.push(
                    Code::BadValue,
                    &n.span,
                    format!("empty {what} name"),
                    "give it a short name such as \"nightly-update\"",
                );
                None
            }
            Some(n) => Some(n.value.clone()),
        }
    }
}

/// Borrowed view of the identity lists shared by owners and exemptions.
pub(crate) struct RawOwnersLike<'a> {
    units: Option<&'a Vec<Sp<String>>>,
    executables: Option<&'a Vec<Sp<String>>>,
    users: Option<&'a Vec<Sp<String>>>,
    cgroups: Option<&'a Vec<Sp<String>>>,
}

const MODES: &[(&str, Mode)] = &[("enforce", Mode::Enforce), ("audit", Mode::Audit)];
const ACTIONS: &[(&str, Action)] = &[
    ("hold", Action::Hold),
    ("block", Action::Block),
    ("alert", Action::Alert),
];
/// A level's action: a job action, or off.
const LEVEL_ACTIONS: &[(&str, Option<Action>)] = &[
    ("hold", Some(Action::Hold)),
    ("block", Some(Action::Block)),
    ("alert", Some(Action::Alert)),
    ("off", None),
];
const ON_DENY: &[(&str, OnDeny)] = &[("kill", OnDeny::Kill), ("refuse", OnDeny::Refuse)];
const ON_AGENT_STOP: &[(&str, OnAgentStop)] = &[
    ("end", OnAgentStop::End),
    ("continue", OnAgentStop::Continue),
];
const SHUTDOWN: &[(&str, ShutdownAction)] = &[
    ("allow", ShutdownAction::Allow),
    ("confirm", ShutdownAction::Confirm),
    ("block", ShutdownAction::Block),
];
const SERIAL: &[(&str, SessionClass)] = &[
    ("local", SessionClass::Local),
    ("remote", SessionClass::Remote),
];
const FORMATS: &[(&str, SyslogFormat)] = &[
    ("rfc5424", SyslogFormat::Rfc5424),
    ("rfc3164", SyslogFormat::Rfc3164),
];

pub(crate) fn validate(raw: &RawFile, sources: Vec<String>, v: &mut V<'_, '_, '_>) -> Policy {
    let mode = v.choice(&raw.mode, "mode", MODES, Mode::Enforce);
    let del = raw.deletion.clone().unwrap_or_default();
    // Whole-section findings (a missing list) point at the start of the main file.
    let deletion = validate_deletion(&del, &(0..0), v);
    let sd = raw.shutdown.clone().unwrap_or_default();
    let shutdown = validate_shutdown(&sd, v);
    let al = raw.alerts.clone().unwrap_or_default();
    let al = &al;
    let alerts = validate_alerts(al, v);
    Policy {
        mode,
        deletion,
        shutdown,
        alerts,
        sources,
    }
}

fn validate_deletion(d: &RawDeletion, span: &Range<usize>, v: &mut V<'_, '_, '_>) -> Deletion {
    let budget = v.budget(&d.budget, "deletion.budget", defaults::BUDGET);
    let window = v.duration(&d.window, "deletion.window", defaults::WINDOW, MAX_WINDOW);
    let action = v.choice(&d.action, "deletion.action", ACTIONS, Action::Hold);
    let hold_timeout = v.duration(
        &d.hold_timeout,
        "deletion.hold_timeout",
        defaults::HOLD_TIMEOUT,
        MAX_HOLD_TIMEOUT,
    );
    let on_deny = v.choice(&d.on_deny, "deletion.on_deny", ON_DENY, OnDeny::Kill);
    let on_agent_stop = v.choice(
        &d.on_agent_stop,
        "deletion.on_agent_stop",
        ON_AGENT_STOP,
        OnAgentStop::End,
    );
    let never_hold: Vec<String> = match &d.never_hold {
        None => defaults::NEVER_HOLD.iter().map(|u| u.to_string()).collect(),
        Some(list) => {
            let mut units: Vec<String> = Vec::new();
            for s in list {
                if let Some(u) = v.unit(s, "deletion.never_hold")
                    && !units.contains(&u)
                {
                    units.push(u);
                }
            }
            units
        }
    };
    let protect_mount_points = d.protect_mount_points.as_ref().is_none_or(|b| b.value);
    let shared_budgets = d.shared_budgets.as_ref().is_none_or(|b| b.value);
    let session = validate_level(
        d.session.as_ref(),
        "deletion.session",
        defaults::SESSION_BUDGET,
        v,
    );
    let user = validate_level(d.user.as_ref(), "deletion.user", defaults::USER_BUDGET, v);

    let targets = v.paths(&d.targets, "deletion.targets", true, true);
    let protected = v.paths(&d.protected_roots, "deletion.protected_roots", false, true);
    if !protected.iter().any(|(p, _)| p == Path::new("/")) {
        let at = d
            .protected_roots
            .as_ref()
            .and_then(|l| l.first())
            .map(|s| s.span.clone())
            .unwrap_or(span.clone());
        v.push(
            Code::RootUnprotected,
            &at,
            "\"/\" is not a protected root",
            "add \"/\" to deletion.protected_roots so `rm -rf /` (and a rename of /) is refused",
        );
    }

    // Data directories.
    let mut data_dirs = Vec::new();
    let mut data_paths: Vec<(PathBuf, Sp<String>)> = Vec::new();
    let mut owner_keys: Vec<(Key, Range<usize>)> = Vec::new();
    for (i, dd) in d.data_dir.iter().flatten().enumerate() {
        let field = format!("deletion.data_dir[{i}]");
        let Some(ps) = &dd.value.path else {
            v.push(
                Code::MissingKey,
                &dd.span,
                format!("{field} has no `path`"),
                "add path = \"/var/lib/...\"",
            );
            continue;
        };
        let Some(p) = v.path(ps, &format!("{field}.path"), false) else {
            continue;
        };
        v.warn_declared(ps, &p, &format!("{field}.path"));
        let o = dd.value.owners.as_ref().map(|o| RawOwnersLike {
            units: o.units.as_ref(),
            executables: o.executables.as_ref(),
            users: o.users.as_ref(),
            cgroups: o.cgroups.as_ref(),
        });
        let (owners, keys) = v.identities(o.as_ref(), &format!("{field}.owners"));
        owner_keys.extend(keys);
        data_paths.push((p.clone(), ps.clone()));
        data_dirs.push(DataDir { path: p, owners });
    }

    // Per-job rules.
    let mut rules = Vec::new();
    let mut names: BTreeMap<String, Range<usize>> = BTreeMap::new();
    let mut claimed: BTreeMap<Key, String> = BTreeMap::new();
    let mut rule_spans: Vec<Range<usize>> = Vec::new();
    let mut rule_targets: Vec<(PathBuf, Sp<String>, String)> = Vec::new();
    for r in d.rule.iter().flatten() {
        let rr = &r.value;
        let name = v.name(&rr.name, &r.span, "deletion.rule");
        let label = name.clone().unwrap_or_else(|| "?".to_string());
        let field = format!("deletion.rule[{label}]");
        if let (Some(n), Some(ns)) = (&name, &rr.name)
            && names.insert(n.clone(), ns.span.clone()).is_some()
        {
            v.push(
                Code::Duplicate,
                &ns.span,
                format!("two rules or exemptions are named {}", quoted(n)),
                "names must be unique across [[deletion.rule]] and [[deletion.exempt]]",
            );
        }
        let matcher = match &rr.matcher {
            None => {
                v.push(
                    Code::MissingKey,
                    &r.span,
                    format!("{field} has no `match`"),
                    "add match = { unit = \"name.service\" } (or executable, user, cgroup)",
                );
                None
            }
            Some(m) => validate_match(m, &r.span, &field, v),
        };
        if let Some(m) = &matcher {
            let key = Key::from(m);
            if let Some(other) = claimed.get(&key) {
                let ms = match_span(rr).unwrap_or(r.span.clone());
                v.push(
                    Code::Duplicate,
                    &ms,
                    format!("{field} matches the same process identity as {other}"),
                    "the kernel maps each identity to one rule: merge the two",
                );
            } else {
                claimed.insert(key, field.clone());
            }
        }
        let targets_r = v.paths(&rr.targets, &format!("{field}.targets"), true, true);
        for (p, s) in &targets_r {
            rule_targets.push((p.clone(), s.clone(), format!("{field}.targets")));
        }
        let budget_r = v.budget(&rr.budget, &format!("{field}.budget"), budget);
        let window_r = v.duration(&rr.window, &format!("{field}.window"), window, MAX_WINDOW);
        let action_r = v.choice(&rr.action, &format!("{field}.action"), ACTIONS, action);
        let mode_r = v.choice(&rr.mode, &format!("{field}.mode"), MODES, Mode::Enforce);
        let shared_r = rr
            .shared_budgets
            .as_ref()
            .map_or(shared_budgets, |b| b.value);
        rule_spans.push(r.span.clone());
        if let (Some(name), Some(matcher)) = (name, matcher) {
            rules.push(JobRule {
                name,
                matcher,
                targets: targets_r.into_iter().map(|(p, _)| p).collect(),
                budget: budget_r,
                window: window_r,
                action: action_r,
                mode: mode_r,
                shared_budgets: shared_r,
            });
        }
    }

    // Exemptions. Members of a several-member exemption that also own a data directory need a
    // rule id of their own (see compile).
    let mut shared_keys: Vec<Key> = Vec::new();
    let mut exemptions = Vec::new();
    for e in d.exempt.iter().flatten() {
        let ee = &e.value;
        let name = v.name(&ee.name, &e.span, "deletion.exempt");
        let label = name.clone().unwrap_or_else(|| "?".to_string());
        let field = format!("deletion.exempt[{label}]");
        if let (Some(n), Some(ns)) = (&name, &ee.name)
            && names.insert(n.clone(), ns.span.clone()).is_some()
        {
            v.push(
                Code::Duplicate,
                &ns.span,
                format!("two rules or exemptions are named {}", quoted(n)),
                "names must be unique across [[deletion.rule]] and [[deletion.exempt]]",
            );
        }
        let o = RawOwnersLike {
            units: ee.units.as_ref(),
            executables: ee.executables.as_ref(),
            users: ee.users.as_ref(),
            cgroups: ee.cgroups.as_ref(),
        };
        let (who, keys) = v.identities(Some(&o), &field);
        if keys.len() > 1 {
            shared_keys.extend(keys.iter().map(|(k, _)| k.clone()));
        }
        if who.is_empty() {
            v.push(
                Code::MatchesNothing,
                &e.span,
                format!("{field} names no executable, unit, user or cgroup"),
                "list what it exempts, e.g. executables = [\"/usr/bin/dpkg\"]",
            );
        }
        for (key, kspan) in &keys {
            if let Some(other) = claimed.get(key) {
                v.push(
                    Code::Duplicate,
                    kspan,
                    format!("{field} names the same process identity as {other}"),
                    "the kernel maps each identity to one rule: keep it in one place",
                );
            } else {
                claimed.insert(key.clone(), field.clone());
            }
            let wide = match key {
                Key::User(u) => u == "root" || u == "0",
                Key::Cgroup(c) | Key::Unit(c) => WIDE_CGROUPS.contains(&c.as_str()),
                Key::Exe(p) => p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| WIDE_EXECUTABLES.contains(&n)),
            };
            if wide {
                v.push(
                    Code::ExemptionTooWide,
                    kspan,
                    format!("{field} exempts {}: that covers arbitrary commands, which is like having no budget at all", quoted(v.sink.map.slice(kspan).trim_matches('"'))),
                    "exempt the specific program (e.g. \"/usr/bin/dpkg\") or unit, not a user, shell, interpreter or whole slice",
                );
            }
        }
        if let Some(name) = name {
            exemptions.push(Exemption { name, who });
        }
    }

    // Rule count: default + rules + exemptions + owners that are neither.
    let mut extra_owners: Vec<(Key, Range<usize>)> = Vec::new();
    for (k, s) in owner_keys {
        if (!claimed.contains_key(&k) || shared_keys.contains(&k))
            && !extra_owners.iter().any(|(x, _)| *x == k)
        {
            extra_owners.push((k, s));
        }
    }
    let mut ids: Vec<(Range<usize>, &str)> =
        rule_spans.iter().map(|s| (s.clone(), "rule")).collect();
    ids.extend(
        d.exempt
            .iter()
            .flatten()
            .map(|e| (e.span.clone(), "exemption")),
    );
    ids.extend(
        extra_owners
            .iter()
            .map(|(_, s)| (s.clone(), "data directory owner")),
    );
    if ids.len() + 1 > MAX_POLICY_RULES {
        let (s, what) = &ids[MAX_POLICY_RULES - 1];
        v.push(
            Code::TooManyRules,
            s,
            format!("too many rules: this {what} would be rule {} of at most {} (rules + exemptions + data directory owners that are neither, plus the default rule)", MAX_POLICY_RULES, MAX_POLICY_RULES - 1),
            "merge rules, or name data directory owners by the identity a rule already matches",
        );
    }

    // Target conflicts. Identities (as userspace sees them) a glob match must not have: `/`,
    // and the protected roots and data directories with their ancestors.
    let too_wide = crate::resolver::too_wide_for_targets(
        v.resolver,
        protected
            .iter()
            .chain(data_paths.iter())
            .map(|(p, _)| p.as_path()),
    );
    let all_targets: Vec<(PathBuf, Sp<String>, String)> = targets
        .iter()
        .map(|(p, s)| (p.clone(), s.clone(), "deletion.targets".to_string()))
        .chain(rule_targets)
        .collect();
    for (t, ts, field) in &all_targets {
        if let Some((_, ps)) = protected.iter().find(|(p, _)| p == t) {
            let _ = ps;
            v.push(Code::TargetConflict, &ts.span, format!("{} in {field} is also a protected root", quoted(&ts.value)), "a directory is either free to delete in (target) or kept (protected root); remove it from one list");
        }
        if data_paths.iter().any(|(p, _)| p == t) {
            v.push(Code::TargetConflict, &ts.span, format!("{} in {field} is also a data directory", quoted(&ts.value)), "a data directory only lets its owners delete; remove it from the targets, or name the job as an owner");
        }
        let tl = t.to_string_lossy();
        for (p, ps) in &protected {
            if p != t && crate::resolver::glob_matches(&tl, p) {
                v.push(Code::TargetConflict, &ps.span, format!("protected root {} is also matched by target {} ({field})", quoted(&ps.value), quoted(&ts.value)), "a directory is either free to delete in (target) or kept (protected root); narrow the glob or drop the protected root");
            }
        }
        // A target that is `/` or an ancestor of a kept directory: everything around the kept
        // directory, and in the tracepoint tier whatever its walk cannot tell apart, is free.
        let kept = protected
            .iter()
            .map(|(p, ps)| (p, ps, "protected root"))
            .chain(data_paths.iter().map(|(p, ps)| (p, ps, "data directory")));
        let mut inner: Option<(&Sp<String>, &str)> = None;
        for (p, ps, what) in kept {
            if p != t
                && !crate::resolver::glob_matches(&tl, p)
                && pattern_covers(&tl, &p.to_string_lossy())
            {
                inner = Some((ps, what));
                break;
            }
        }
        if t == Path::new("/") {
            v.push(
                Code::TargetTooWide,
                &ts.span,
                format!(
                    "{} in {field} makes the whole filesystem free to delete in",
                    quoted(&ts.value)
                ),
                "name the directories whose contents may go, e.g. \"/var/tmp\"",
            );
        } else if let Some((ps, what)) = inner {
            v.push(Code::TargetTooWide, &ts.span, format!("target {} in {field} holds the {what} {}", quoted(&ts.value), quoted(&ps.value)), "a target may not contain a protected root or data directory: name the directories below it that may be emptied instead");
        } else if components(&tl).any(|c| c == "*") {
            // The same rule for what a glob matches on this host (compile leaves those out).
            for (q, id) in v.resolver.declared(&tl).found {
                if let Some(k) = too_wide.get(&id) {
                    v.push(
                        Code::UnsafePath,
                        &ts.span,
                        format!(
                            "{} in {field} matches {}, which is / or holds {}; it is left out",
                            quoted(&ts.value),
                            quoted(&q.to_string_lossy()),
                            quoted(&k.to_string_lossy())
                        ),
                        "a target may not contain a protected root or data directory",
                    );
                }
            }
        }
    }

    // Budget 0 everywhere.
    if budget == 0 && rules.iter().all(|r| r.budget == 0) {
        let at = d
            .budget
            .as_ref()
            .map(|b| b.span.clone())
            .unwrap_or(span.clone());
        v.push(Code::NoDeletionBudget, &at, "every budget is 0: no job may delete anything outside its targets", "a single `rm` of a file in a home directory will be held; give [deletion] a budget of a few hundred per minute");
    }

    Deletion {
        budget,
        window,
        action,
        hold_timeout,
        on_deny,
        on_agent_stop,
        targets: targets.into_iter().map(|(p, _)| p).collect(),
        protected_roots: protected.into_iter().map(|(p, _)| p).collect(),
        protect_mount_points,
        data_dirs,
        rules,
        exemptions,
        never_hold,
        shared_budgets,
        session,
        user,
    }
}

/// `[deletion.session]` / `[deletion.user]`: absent is off; present, it counts with its own
/// budget, window and action (`action = "off"` switches a level off in a drop-in).
fn validate_level(
    l: Option<&RawLevel>,
    field: &str,
    default_budget: u64,
    v: &mut V<'_, '_, '_>,
) -> LevelBudget {
    let Some(l) = l else {
        return LevelBudget::off(default_budget, defaults::WINDOW);
    };
    let budget = v.budget(&l.budget, &format!("{field}.budget"), default_budget);
    let window = v.duration(
        &l.window,
        &format!("{field}.window"),
        defaults::WINDOW,
        MAX_WINDOW,
    );
    let action = v.choice(
        &l.action,
        &format!("{field}.action"),
        LEVEL_ACTIONS,
        Some(Action::Hold),
    );
    LevelBudget {
        enabled: action.is_some(),
        budget,
        window,
        action: action.unwrap_or(Action::Hold),
    }
}

fn match_span(r: &RawRule) -> Option<Range<usize>> {
    let m = r.matcher.as_ref()?;
    [&m.unit, &m.executable, &m.user, &m.cgroup]
        .into_iter()
        .flatten()
        .next()
        .map(|s| s.span.clone())
}

fn validate_match(
    mm: &RawMatch,
    table: &Range<usize>,
    field: &str,
    v: &mut V<'_, '_, '_>,
) -> Option<JobMatch> {
    let set: Vec<&str> = [
        ("unit", &mm.unit),
        ("executable", &mm.executable),
        ("user", &mm.user),
        ("cgroup", &mm.cgroup),
    ]
    .iter()
    .filter(|(_, x)| x.is_some())
    .map(|(n, _)| *n)
    .collect();
    if set.is_empty() {
        v.push(Code::MatchesNothing, table, format!("{field}.match is empty, so the rule matches nothing"), "name exactly one of unit, executable, user, cgroup: match = { unit = \"backup.service\" }");
        return None;
    }
    if set.len() > 1 {
        let mut spans: Vec<Range<usize>> = [&mm.unit, &mm.executable, &mm.user, &mm.cgroup]
            .into_iter()
            .flatten()
            .map(|s| s.span.clone())
            .collect();
        spans.sort_by_key(|s| s.start);
        let second = spans.get(1).cloned().unwrap_or(table.clone());
        v.push(
            Code::BadValue,
            &second,
            format!(
                "{field}.match names {}: a rule matches exactly one identity",
                set.join(" and ")
            ),
            "split it into one rule per identity",
        );
        return None;
    }
    let f = format!("{field}.match");
    if let Some(s) = &mm.unit {
        return v.unit(s, &format!("{f}.unit")).map(JobMatch::Unit);
    }
    if let Some(s) = &mm.executable {
        return v
            .exe(s, &format!("{f}.executable"))
            .map(JobMatch::Executable);
    }
    if let Some(s) = &mm.user {
        return v.user(s, &format!("{f}.user")).map(JobMatch::User);
    }
    if let Some(s) = &mm.cgroup {
        return v.cgroup(s, &format!("{f}.cgroup")).map(JobMatch::Cgroup);
    }
    None
}

fn validate_shutdown(s: &RawShutdown, v: &mut V<'_, '_, '_>) -> Shutdown {
    let remote = v.choice(
        &s.remote,
        "shutdown.remote",
        SHUTDOWN,
        ShutdownAction::Confirm,
    );
    let local = v.choice(&s.local, "shutdown.local", SHUTDOWN, ShutdownAction::Allow);
    let none = v.choice(&s.none, "shutdown.none", SHUTDOWN, ShutdownAction::Allow);
    let unknown = v.choice(
        &s.unknown,
        "shutdown.unknown",
        SHUTDOWN,
        ShutdownAction::Confirm,
    );
    let serial_console = v.choice(
        &s.serial_console,
        "shutdown.serial_console",
        SERIAL,
        SessionClass::Local,
    );
    let confirm_window = v.duration(
        &s.confirm_window,
        "shutdown.confirm_window",
        defaults::CONFIRM_WINDOW,
        MAX_CONFIRM_WINDOW,
    );
    let logind_inhibitor = s.logind_inhibitor.as_ref().is_none_or(|b| b.value);
    let mut commands = Vec::new();
    for c in s.commands.iter().flatten() {
        if let Some(p) = v.exe(c, "shutdown.commands")
            && !commands.contains(&p)
        {
            commands.push(p);
        }
    }
    let mut exceptions = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for e in s.exception.iter().flatten() {
        let name = v.name(&e.value.name, &e.span, "shutdown.exception");
        let label = name.clone().unwrap_or_else(|| "?".to_string());
        let field = format!("shutdown.exception[{label}]");
        if let (Some(n), Some(ns)) = (&name, &e.value.name) {
            if names.contains(n) {
                v.push(
                    Code::Duplicate,
                    &ns.span,
                    format!("two shutdown exceptions are named {}", quoted(n)),
                    "give each one its own name",
                );
            }
            names.push(n.clone());
        }
        let o = RawOwnersLike {
            units: e.value.units.as_ref(),
            executables: e.value.executables.as_ref(),
            users: None,
            cgroups: None,
        };
        let (who, _) = v.identities(Some(&o), &field);
        if who.is_empty() {
            v.push(
                Code::MatchesNothing,
                &e.span,
                format!("{field} names no unit or executable"),
                "list what may shut down, e.g. units = [\"unattended-upgrades.service\"]",
            );
        }
        if let Some(name) = name {
            exceptions.push(ShutdownException {
                name,
                units: who.units,
                executables: who.executables,
            });
        }
    }
    Shutdown {
        remote,
        local,
        none,
        unknown,
        serial_console,
        confirm_window,
        logind_inhibitor,
        commands,
        exceptions,
    }
}

fn validate_alerts(a: &RawAlerts, v: &mut V<'_, '_, '_>) -> Alerts {
    let sl = a.syslog.clone().unwrap_or_default();
    let enabled = sl.enabled.as_ref().is_none_or(|b| b.value);
    let format = v.choice(
        &sl.format,
        "alerts.syslog.format",
        FORMATS,
        SyslogFormat::Rfc5424,
    );
    let facility_code_list: Vec<(&str, u8)> = FACILITIES.to_vec();
    let default_fac = FACILITIES
        .iter()
        .find(|(n, _)| *n == defaults::FACILITY)
        .map(|f| f.1)
        .unwrap_or(10);
    let facility_code = v.choice(
        &sl.facility,
        "alerts.syslog.facility",
        &facility_code_list,
        default_fac,
    );
    let facility = FACILITIES
        .iter()
        .find(|(_, c)| *c == facility_code)
        .map(|f| f.0)
        .unwrap_or(defaults::FACILITY)
        .to_string();
    let app_name = match &sl.app_name {
        None => defaults::APP_NAME.to_string(),
        Some(s) => {
            let ok = !s.value.is_empty()
                && s.value.len() <= 48
                && s.value.bytes().all(|b| (33..=126).contains(&b));
            if !ok {
                v.push(Code::BadValue, &s.span, format!("syslog app_name {} is not 1 to 48 printable ASCII characters without spaces", quoted(&s.value)), "RFC 5424 APP-NAME: e.g. \"guardrail\"");
                defaults::APP_NAME.to_string()
            } else {
                s.value.clone()
            }
        }
    };
    let remote = sl
        .remote
        .as_ref()
        .filter(|s| !s.value.is_empty())
        .and_then(|s| {
            let r = parse_remote(&s.value);
            if r.is_none() {
                v.push(
                    Code::BadAddress,
                    &s.span,
                    format!("bad syslog remote {}", quoted(&s.value)),
                    "write \"udp://host:port\" or \"tcp://host:port\", e.g. \"udp://10.0.0.5:514\"",
                );
            }
            r
        });
    let syslog = Syslog {
        enabled,
        format,
        facility,
        facility_code,
        app_name,
        remote,
    };

    let event_log = match a.event_log.as_ref().and_then(|e| e.path.as_ref()) {
        None => PathBuf::from(defaults::EVENT_LOG),
        Some(s) => v
            .path(s, "alerts.event_log.path", false)
            .unwrap_or_else(|| PathBuf::from(defaults::EVENT_LOG)),
    };
    let pr = a.prometheus.clone().unwrap_or_default();
    let prometheus_listen = pr.listen.as_ref().filter(|s| !s.value.is_empty()).and_then(|s| {
        match s.value.parse::<std::net::SocketAddr>() {
            Ok(addr) => {
                if !addr.ip().is_loopback() {
                    v.push(Code::NotLoopback, &s.span, format!("metrics listener {} is not on a loopback address", quoted(&s.value)), "the metrics page names hosts, users and paths: listen on 127.0.0.1 and let a local scraper or proxy expose it");
                }
                Some(addr)
            }
            Err(_) => {
                v.push(Code::BadAddress, &s.span, format!("bad listen address {}", quoted(&s.value)), "write ip:port, e.g. \"127.0.0.1:9477\" or \"[::1]:9477\"");
                None
            }
        }
    });
    let prometheus_textfile = pr
        .textfile
        .as_ref()
        .filter(|s| !s.value.is_empty())
        .and_then(|s| v.path(s, "alerts.prometheus.textfile", false));
    let alertmanager_url = a
        .alertmanager
        .as_ref()
        .and_then(|m| m.url.as_ref())
        .filter(|s| !s.value.is_empty())
        .and_then(|s| {
            let rest = s
                .value
                .strip_prefix("http://")
                .or_else(|| s.value.strip_prefix("https://"));
            match rest {
                Some(r)
                    if !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace) =>
                {
                    Some(s.value.clone())
                }
                _ => {
                    v.push(
                        Code::BadAddress,
                        &s.span,
                        format!("bad Alertmanager URL {}", quoted(&s.value)),
                        "write its base URL, e.g. \"http://127.0.0.1:9093\"",
                    );
                    None
                }
            }
        });
    Alerts {
        syslog,
        event_log,
        prometheus_listen,
        prometheus_textfile,
        alertmanager_url,
    }
}

fn parse_remote(s: &str) -> Option<RemoteSyslog> {
    let (transport, rest) = if let Some(r) = s.strip_prefix("udp://") {
        (Transport::Udp, r)
    } else if let Some(r) = s.strip_prefix("tcp://") {
        (Transport::Tcp, r)
    } else {
        return None;
    };
    let (host, port) = rest.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', ' ']) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    Some(RemoteSyslog {
        transport,
        host: host.to_string(),
        port,
    })
}
