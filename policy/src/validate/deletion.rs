//! The `[deletion]` section: budget, window and actions, `never_hold`, job rules and their
//! matches, exemptions, data directories and targets (with the checks that refuse what would
//! exempt everything), shared budgets, and the session and user levels.
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{Key, MODES, RawOwnersLike, V, defaults, quoted};
use crate::diag::Code;
use crate::model::*;
use crate::raw::*;
use crate::resolver::{components, pattern_covers};

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

pub(super) fn validate_deletion(
    d: &RawDeletion,
    span: &Range<usize>,
    v: &mut V<'_, '_, '_>,
) -> Deletion {
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
