//! Field validators shared by every section: choices, durations, budgets, paths, units, users,
//! cgroups, executables and identity lists, each pushing a positioned diagnostic when it refuses
//! a value.
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Key, RawOwnersLike, V, quoted};
use crate::diag::Code;
use crate::model::*;
use crate::raw::*;
use crate::resolver::components;

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

impl V<'_, '_, '_> {
    pub(super) fn push(
        &mut self,
        code: Code,
        span: &Range<usize>,
        msg: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.sink.push(code, span, msg, hint);
    }

    pub(super) fn choice<T: Copy>(
        &mut self,
        s: &Str,
        field: &str,
        allowed: &[(&str, T)],
        default: T,
    ) -> T {
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
    pub(super) fn duration(
        &mut self,
        s: &Str,
        field: &str,
        default: Duration,
        max: Duration,
    ) -> Duration {
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

    pub(super) fn budget(&mut self, b: &Option<Sp<i64>>, field: &str, default: u64) -> u64 {
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
    pub(super) fn path(&mut self, s: &Sp<String>, field: &str, glob: bool) -> Option<PathBuf> {
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
    pub(super) fn warn_declared(&mut self, s: &Sp<String>, p: &Path, field: &str) {
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

    pub(super) fn warn_missing(&mut self, s: &Sp<String>, p: &Path, field: &str) {
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

    pub(super) fn paths(
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

    pub(super) fn unit(&mut self, s: &Sp<String>, field: &str) -> Option<String> {
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

    pub(super) fn user(&mut self, s: &Sp<String>, field: &str) -> Option<String> {
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

    pub(super) fn cgroup(&mut self, s: &Sp<String>, field: &str) -> Option<String> {
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

    pub(super) fn exe(&mut self, s: &Sp<String>, field: &str) -> Option<PathBuf> {
        let p = self.path(s, field, false)?;
        self.warn_missing(s, &p, field);
        Some(p)
    }

    pub(super) fn identities(
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

    pub(super) fn name(&mut self, name: &Str, table: &Range<usize>, what: &str) -> Option<String> {
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
