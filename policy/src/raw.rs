//! Stage 1: the file as written, with the position of every key and value.
//!
//! Every struct denies unknown keys; every leaf, and every `[[array]]` table, is wrapped in [`Sp`]
//! so stage 2 can point at it. Tables that may be implicit (`[alerts.syslog]` without `[alerts]`,
//! dotted keys like `match.unit = ...`) are not wrapped: the TOML deserializer has no span for
//! them and would reject the file.
//! Enumerations, durations and paths are kept as strings here: stage 2 checks them, so a bad
//! value is reported with the list of good ones and every bad value in a file is reported, not
//! just the first.

use std::ops::Range;

use serde::{Deserialize, Deserializer};

use crate::diag::{Code, Sink};

/// A value and the byte range it was written at, in the [`crate::diag::SourceMap`]'s offset space.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sp<T> {
    pub span: Range<usize>,
    pub value: T,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Sp<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = toml::Spanned::<T>::deserialize(d)?;
        let span = s.span();
        Ok(Sp {
            span,
            value: s.into_inner(),
        })
    }
}

/// Moves spans from one file's offsets to the source map's.
pub(crate) trait Rebase {
    fn rebase(&mut self, base: usize);
}

impl<T: Rebase> Rebase for Sp<T> {
    fn rebase(&mut self, base: usize) {
        self.span = self.span.start + base..self.span.end + base;
        self.value.rebase(base);
    }
}
impl<T: Rebase> Rebase for Option<T> {
    fn rebase(&mut self, base: usize) {
        if let Some(v) = self {
            v.rebase(base);
        }
    }
}
impl<T: Rebase> Rebase for Vec<T> {
    fn rebase(&mut self, base: usize) {
        for v in self {
            v.rebase(base);
        }
    }
}
impl Rebase for String {
    fn rebase(&mut self, _: usize) {}
}
impl Rebase for i64 {
    fn rebase(&mut self, _: usize) {}
}
impl Rebase for bool {
    fn rebase(&mut self, _: usize) {}
}

macro_rules! raw_struct {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Debug, Default, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct $name {
            $($(#[$fm])* pub $field: $ty,)*
        }
        impl Rebase for $name {
            fn rebase(&mut self, base: usize) {
                $(self.$field.rebase(base);)*
            }
        }
    };
}

pub(crate) type Str = Option<Sp<String>>;
pub(crate) type StrList = Option<Vec<Sp<String>>>;

raw_struct!(RawFile {
    mode: Str,
    deletion: Option<RawDeletion>,
    shutdown: Option<RawShutdown>,
    alerts: Option<RawAlerts>,
});

raw_struct!(RawDeletion {
    budget: Option<Sp<i64>>,
    window: Str,
    action: Str,
    hold_timeout: Str,
    on_deny: Str,
    on_agent_stop: Str,
    targets: StrList,
    protected_roots: StrList,
    protect_mount_points: Option<Sp<bool>>,
    never_hold: StrList,
    shared_budgets: Option<Sp<bool>>,
    session: Option<RawLevel>,
    user: Option<RawLevel>,
    data_dir: Option<Vec<Sp<RawDataDir>>>,
    rule: Option<Vec<Sp<RawRule>>>,
    exempt: Option<Vec<Sp<RawExempt>>>,
});

raw_struct!(RawLevel {
    budget: Option<Sp<i64>>,
    window: Str,
    action: Str,
});

raw_struct!(RawDataDir {
    path: Str,
    owners: Option<RawOwners>,
});

raw_struct!(RawOwners {
    units: StrList,
    executables: StrList,
    users: StrList,
    cgroups: StrList,
});

raw_struct!(RawRule {
    name: Str,
    #[serde(rename = "match")]
    matcher: Option<RawMatch>,
    targets: StrList,
    budget: Option<Sp<i64>>,
    window: Str,
    action: Str,
    mode: Str,
    shared_budgets: Option<Sp<bool>>,
});

raw_struct!(RawMatch {
    unit: Str,
    executable: Str,
    user: Str,
    cgroup: Str,
});

raw_struct!(RawExempt {
    name: Str,
    executables: StrList,
    units: StrList,
    cgroups: StrList,
    users: StrList,
});

raw_struct!(RawShutdown {
    remote: Str,
    local: Str,
    none: Str,
    unknown: Str,
    serial_console: Str,
    confirm_window: Str,
    logind_inhibitor: Option<Sp<bool>>,
    commands: StrList,
    exception: Option<Vec<Sp<RawException>>>,
});

raw_struct!(RawException {
    name: Str,
    units: StrList,
    executables: StrList,
});

raw_struct!(RawAlerts {
    syslog: Option<RawSyslog>,
    event_log: Option<RawEventLog>,
    prometheus: Option<RawPrometheus>,
    alertmanager: Option<RawAlertmanager>,
});

raw_struct!(RawSyslog {
    enabled: Option<Sp<bool>>,
    format: Str,
    facility: Str,
    app_name: Str,
    remote: Str,
});

raw_struct!(RawEventLog { path: Str });

raw_struct!(RawPrometheus {
    listen: Str,
    textfile: Str,
});

raw_struct!(RawAlertmanager { url: Str });

/// Parses one file; on failure reports one diagnostic (TOML and serde stop at the first error).
pub(crate) fn parse_file(text: &str, base: usize, sink: &mut Sink<'_>) -> Option<RawFile> {
    match toml::from_str::<RawFile>(text) {
        Ok(mut raw) => {
            raw.rebase(base);
            Some(raw)
        }
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let span = span.start + base..span.end + base;
            let msg = e.message().trim().to_string();
            let (code, message, hint) = classify(&msg, sink.map.slice(&span));
            sink.push(code, &span, message, hint);
            None
        }
    }
}

fn classify(msg: &str, text: &str) -> (Code, String, String) {
    let first_line = msg.lines().next().unwrap_or(msg);
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or("");
        let expected: Vec<&str> = rest
            .split('`')
            .skip(1)
            .collect::<Vec<_>>()
            .chunks(2)
            .filter_map(|c| c.get(1).copied())
            .collect();
        let hint = match closest(key, &expected) {
            Some(s) => format!(
                "did you mean `{s}`? keys allowed here: {}",
                expected.join(", ")
            ),
            None => format!("keys allowed here: {}", expected.join(", ")),
        };
        return (Code::UnknownKey, format!("unknown key `{key}`"), hint);
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        return (
            Code::WrongType,
            format!("wrong type: {}", plain_types(rest)),
            "see the format in the shipped /etc/guardrail/policy.toml: paths and names are \
             quoted strings, lists are [\"...\"], budgets are unquoted integers"
                .to_string(),
        );
    }
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let key = rest.split('`').next().unwrap_or("");
        return (
            Code::MissingKey,
            format!("missing key `{key}`"),
            format!("add `{key} = ...` to this table"),
        );
    }
    if msg.contains("number too large") || msg.contains("out of range") {
        return (
            Code::BudgetOutOfRange,
            format!("number {text} is out of range"),
            format!("budgets go from 0 to {}", crate::model::MAX_BUDGET),
        );
    }
    (
        Code::TomlSyntax,
        format!("TOML syntax error: {}", first_line),
        msg.lines().skip(1).collect::<Vec<_>>().join("; ").trim().to_string().if_empty(
            "check quoting and brackets; strings need double quotes, tables [name], lists [a, b]",
        ),
    )
}

trait IfEmpty {
    fn if_empty(self, other: &str) -> String;
}
impl IfEmpty for String {
    fn if_empty(self, other: &str) -> String {
        if self.is_empty() {
            other.to_string()
        } else {
            self
        }
    }
}

/// The candidate nearest to `word` by edit distance, if near enough to be a typo.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// --- merging drop-ins ---------------------------------------------------------------------------

fn scalar<T>(a: &mut Option<T>, b: Option<T>) {
    if b.is_some() {
        *a = b;
    }
}

fn union(a: &mut StrList, b: StrList) {
    let Some(b) = b else { return };
    let a = a.get_or_insert_with(Vec::new);
    for item in b {
        if !a.iter().any(|x| x.value == item.value) {
            a.push(item);
        }
    }
}

/// Tables keyed by `key`: a later one with the same key replaces the earlier in place; a new key
/// appends. Two with the same key in the same file are an error.
fn keyed<T>(
    a: &mut Option<Vec<Sp<T>>>,
    b: Option<Vec<Sp<T>>>,
    key: fn(&T) -> Option<&Sp<String>>,
    what: &str,
    sink: &mut Sink<'_>,
) {
    let Some(b) = b else { return };
    let a = a.get_or_insert_with(Vec::new);
    for item in b {
        let Some(k) = key(&item.value) else {
            a.push(item);
            continue;
        };
        let existing = a
            .iter()
            .position(|x| key(&x.value).is_some_and(|xk| xk.value == k.value));
        match existing {
            Some(i) => {
                let same_file = key(&a[i].value).is_some_and(|xk| {
                    sink.map.file_index(xk.span.start) == sink.map.file_index(k.span.start)
                });
                if same_file {
                    let span = k.span.clone();
                    sink.push(
                        Code::Duplicate,
                        &span,
                        format!("{what} {} is declared twice in this file", k.value),
                        "give each one its own name (a drop-in with the same name replaces the \
                         earlier one)",
                    );
                    a.push(item);
                } else {
                    a[i] = item;
                }
            }
            None => a.push(item),
        }
    }
}

fn section<T: Merge>(a: &mut Option<T>, b: Option<T>, sink: &mut Sink<'_>) {
    match (a.as_mut(), b) {
        (_, None) => {}
        (None, Some(b)) => *a = Some(b),
        (Some(a), Some(b)) => a.merge(b, sink),
    }
}

pub(crate) trait Merge {
    fn merge(&mut self, other: Self, sink: &mut Sink<'_>);
}

impl Merge for RawFile {
    fn merge(&mut self, o: Self, sink: &mut Sink<'_>) {
        scalar(&mut self.mode, o.mode);
        section(&mut self.deletion, o.deletion, sink);
        section(&mut self.shutdown, o.shutdown, sink);
        section(&mut self.alerts, o.alerts, sink);
    }
}

impl Merge for RawDeletion {
    fn merge(&mut self, o: Self, sink: &mut Sink<'_>) {
        scalar(&mut self.budget, o.budget);
        scalar(&mut self.window, o.window);
        scalar(&mut self.action, o.action);
        scalar(&mut self.hold_timeout, o.hold_timeout);
        scalar(&mut self.on_deny, o.on_deny);
        scalar(&mut self.on_agent_stop, o.on_agent_stop);
        union(&mut self.targets, o.targets);
        union(&mut self.protected_roots, o.protected_roots);
        scalar(&mut self.protect_mount_points, o.protect_mount_points);
        union(&mut self.never_hold, o.never_hold);
        scalar(&mut self.shared_budgets, o.shared_budgets);
        section(&mut self.session, o.session, sink);
        section(&mut self.user, o.user, sink);
        keyed(
            &mut self.data_dir,
            o.data_dir,
            |d| d.path.as_ref(),
            "data_dir",
            sink,
        );
        keyed(&mut self.rule, o.rule, |r| r.name.as_ref(), "rule", sink);
        keyed(
            &mut self.exempt,
            o.exempt,
            |r| r.name.as_ref(),
            "exemption",
            sink,
        );
    }
}

impl Merge for RawLevel {
    fn merge(&mut self, o: Self, _: &mut Sink<'_>) {
        scalar(&mut self.budget, o.budget);
        scalar(&mut self.window, o.window);
        scalar(&mut self.action, o.action);
    }
}

impl Merge for RawShutdown {
    fn merge(&mut self, o: Self, sink: &mut Sink<'_>) {
        scalar(&mut self.remote, o.remote);
        scalar(&mut self.local, o.local);
        scalar(&mut self.none, o.none);
        scalar(&mut self.unknown, o.unknown);
        scalar(&mut self.serial_console, o.serial_console);
        scalar(&mut self.confirm_window, o.confirm_window);
        scalar(&mut self.logind_inhibitor, o.logind_inhibitor);
        union(&mut self.commands, o.commands);
        keyed(
            &mut self.exception,
            o.exception,
            |r| r.name.as_ref(),
            "exception",
            sink,
        );
    }
}

impl Merge for RawAlerts {
    fn merge(&mut self, o: Self, sink: &mut Sink<'_>) {
        section(&mut self.syslog, o.syslog, sink);
        section(&mut self.event_log, o.event_log, sink);
        section(&mut self.prometheus, o.prometheus, sink);
        section(&mut self.alertmanager, o.alertmanager, sink);
    }
}

impl Merge for RawSyslog {
    fn merge(&mut self, o: Self, _: &mut Sink<'_>) {
        scalar(&mut self.enabled, o.enabled);
        scalar(&mut self.format, o.format);
        scalar(&mut self.facility, o.facility);
        scalar(&mut self.app_name, o.app_name);
        scalar(&mut self.remote, o.remote);
    }
}

impl Merge for RawEventLog {
    fn merge(&mut self, o: Self, _: &mut Sink<'_>) {
        scalar(&mut self.path, o.path);
    }
}

impl Merge for RawPrometheus {
    fn merge(&mut self, o: Self, _: &mut Sink<'_>) {
        scalar(&mut self.listen, o.listen);
        scalar(&mut self.textfile, o.textfile);
    }
}

impl Merge for RawAlertmanager {
    fn merge(&mut self, o: Self, _: &mut Sink<'_>) {
        scalar(&mut self.url, o.url);
    }
}

/// serde's type names in words an admin knows.
fn plain_types(s: &str) -> String {
    let s = s.replace("expected a borrowed string", "expected a string");
    let s = s.replace("expected i64", "expected an integer");
    let s = s.replace("a sequence", "a list");
    let s = s.replace("sequence", "list");
    match s.find("expected struct ") {
        Some(i) => format!("{}expected a table", &s[..i]),
        None => s,
    }
}
