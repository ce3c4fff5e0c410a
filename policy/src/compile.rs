//! From [`Policy`] to the tables the kernel reads, through a [`Resolver`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use guardrail_common::{
    ACTION_EXEMPT, DIR_DATA, DIR_PROTECTED_ROOT, DIR_TARGET, DirRule, LEVEL_FLAG_ON,
    RULE_FLAG_AUDIT, RULE_FLAG_NO_LEVELS, RuleParams, kernel_dev_from_user,
};
use serde::Serialize;

use crate::model::{Identities, JobMatch, LevelBudget, Mode, Policy};
use crate::resolver::{Resolver, components, normalize};
use crate::validate::Key;

/// Something the policy names that this host could not resolve; the rest compiles without it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CompileWarning {
    /// `path-missing`, `glob-empty`, `exe-missing`, `unit-not-running`, `cgroup-missing`,
    /// `user-unknown`, `identity-shared`, `too-many-rules`, `path-unsafe` (a symlink or a
    /// directory of someone else, left out), `target-too-wide` (a glob match that is `/` or holds
    /// a protected root or data directory, left out).
    pub kind: &'static str,
    /// The path, unit, user or cgroup.
    pub subject: String,
    pub message: String,
}

impl fmt::Display for CompileWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "warning[{}]: {}: {}",
            self.kind, self.subject, self.message
        )
    }
}

/// The kernel's view of a policy, ready to be written into one policy slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// `MODE_*` semantics: global audit overrides every rule.
    pub mode: Mode,
    /// Declared directories by (kernel dev, ino).
    pub dirs: BTreeMap<(u64, u64), DirRule>,
    /// Indexed by rule id; 0 is the default rule.
    pub rules: Vec<RuleParams>,
    /// The budgets above the job, indexed by `LEVEL_*` (session, unit, user): the kernel's
    /// `LEVEL_PARAMS` for this slot. An entry without `LEVEL_FLAG_ON` counts nothing.
    pub levels: Vec<RuleParams>,
    /// Same index as `rules`: `default`, rule and exemption names, `owner:user:postgres`, ...
    pub rule_names: Vec<String>,
    /// (kernel dev, ino) of an executable → rule id.
    pub exes: Vec<((u64, u64), u32)>,
    /// cgroup id → rule id.
    pub cgroups: Vec<(u64, u32)>,
    /// uid → rule id.
    pub uids: Vec<(u32, u32)>,
    /// Data directory paths by `data_dir_id`, for messages.
    pub data_dirs: Vec<PathBuf>,
    /// `deletion.never_hold`: units whose jobs are never stopped (the one list explain and the
    /// agent's messages read).
    pub never_hold: Vec<String>,
    /// (cgroup id, index in `never_hold`) of the `never_hold` units running now, for the kernel's
    /// `NEVER_HOLD` table (a job in one of them or below is never stopped, whether or not an agent
    /// runs; the kernel reports the index, so the unit is named even after the job exited).
    /// Units not running are simply absent: the agent compiles again when one starts.
    pub never_hold_cgroups: Vec<(u64, u32)>,
    pub warnings: Vec<CompileWarning>,
}

impl Compiled {
    /// The rule id a job identity maps to, if any (exact table lookups).
    pub fn rule_for_exe(&self, kdev_ino: (u64, u64)) -> Option<u32> {
        self.exes
            .iter()
            .find(|(k, _)| *k == kdev_ino)
            .map(|(_, r)| *r)
    }
    pub fn rule_for_cgroup(&self, id: u64) -> Option<u32> {
        self.cgroups.iter().find(|(k, _)| *k == id).map(|(_, r)| *r)
    }
    pub fn rule_for_uid(&self, uid: u32) -> Option<u32> {
        self.uids.iter().find(|(k, _)| *k == uid).map(|(_, r)| *r)
    }
    /// The directory table entry of a path, resolved the way the kernel keys it.
    pub fn dir_of(&self, path: &Path, resolver: &dyn Resolver) -> Option<DirRule> {
        let (dev, ino) = resolver.identity(path)?;
        self.dirs.get(&(kernel_dev_from_user(dev), ino)).copied()
    }
}

/// Identity of `path` as the kernel keys it.
pub fn kernel_identity(resolver: &dyn Resolver, path: &Path) -> Option<(u64, u64)> {
    resolver
        .identity(path)
        .map(|(d, i)| (kernel_dev_from_user(d), i))
}

fn bit(rule: u32) -> u64 {
    1u64 << (rule & 63)
}

struct Builder<'a> {
    resolver: &'a dyn Resolver,
    out: Compiled,
}

impl Builder<'_> {
    fn warn(&mut self, kind: &'static str, subject: impl Into<String>, message: impl Into<String>) {
        self.out.warnings.push(CompileWarning {
            kind,
            subject: subject.into(),
            message: message.into(),
        });
    }

    /// Identities (as the kernel keys them) of a declared path; a glob expands to every
    /// existing match. What [`Resolver::declared`] left out becomes a `path-unsafe` warning.
    fn declared(&mut self, p: &Path) -> Vec<(PathBuf, (u64, u64))> {
        let s = p.to_string_lossy();
        let d = self.resolver.declared(&s);
        for sk in &d.skipped {
            // Quoted: below a `*`, names are whatever a user chose (escape sequences).
            self.warn(
                "path-unsafe",
                format!("{:?}", sk.path.to_string_lossy()),
                format!("{}; left out of {s}", sk.reason),
            );
        }
        if d.found.is_empty() && d.skipped.is_empty() {
            if components(&s).any(|c| c == "*") {
                self.warn("glob-empty", s.to_string(), "matches nothing on this host");
            } else {
                self.warn("path-missing", s.to_string(), "does not exist; ignored");
            }
        }
        d.found
            .into_iter()
            .map(|(q, (dev, ino))| (q, (kernel_dev_from_user(dev), ino)))
            .collect()
    }

    /// Identities of a target's directories, without those that are `/` or hold a protected
    /// root or a data directory (`too_wide`): freeing one would free what the policy keeps.
    fn targets(
        &mut self,
        p: &Path,
        too_wide: &BTreeMap<(u64, u64), PathBuf>,
    ) -> Vec<(PathBuf, (u64, u64))> {
        let mut v = self.declared(p);
        v.retain(|(q, id)| match too_wide.get(id) {
            None => true,
            Some(inner) => {
                self.warn(
                    "target-too-wide",
                    format!("{:?}", q.to_string_lossy()),
                    format!(
                        "is / or holds the protected root or data directory {}; never a target \
                         (left out of {})",
                        inner.display(),
                        p.display()
                    ),
                );
                false
            }
        });
        v
    }

    fn entry(&mut self, id: (u64, u64)) -> &mut DirRule {
        self.out.dirs.entry(id).or_default()
    }

    fn add_rule(&mut self, name: String, params: RuleParams) -> u32 {
        self.out.rules.push(params);
        self.out.rule_names.push(name);
        (self.out.rules.len() - 1) as u32
    }

    /// Maps one identity to `rule` in the exe / cgroup / uid tables.
    fn map_identity(&mut self, m: &JobMatch, rule: u32) {
        match m {
            JobMatch::Executable(p) => match kernel_identity(self.resolver, p) {
                Some(id) => {
                    if let Some(other) = self.out.rule_for_exe(id) {
                        if other != rule {
                            self.warn("identity-shared", p.to_string_lossy(), format!("is the same file as an executable of rule {other}; rule {other} keeps it"));
                        }
                    } else {
                        self.out.exes.push((id, rule));
                    }
                }
                None => self.warn(
                    "exe-missing",
                    p.to_string_lossy(),
                    "executable does not exist; its rule is inactive until reload",
                ),
            },
            JobMatch::Unit(u) | JobMatch::Cgroup(u) => match self.resolver.cgroup_id(u) {
                Some(id) => {
                    if let Some(other) = self.out.rule_for_cgroup(id) {
                        if other != rule {
                            self.warn("identity-shared", u.clone(), format!("is the same cgroup as one of rule {other}; rule {other} keeps it"));
                        }
                    } else {
                        self.out.cgroups.push((id, rule));
                    }
                }
                None => self.warn(
                    if matches!(m, JobMatch::Unit(_)) {
                        "unit-not-running"
                    } else {
                        "cgroup-missing"
                    },
                    u.clone(),
                    "has no cgroup now; the agent maps it when it starts",
                ),
            },
            JobMatch::User(u) => match u.parse::<u32>().ok().or_else(|| self.resolver.uid(u)) {
                Some(uid) => {
                    if self.out.rule_for_uid(uid).is_none() {
                        self.out.uids.push((uid, rule));
                    }
                }
                None => self.warn("user-unknown", u.clone(), "no such user; ignored"),
            },
        }
    }
}

fn matches_of(ids: &Identities) -> Vec<JobMatch> {
    ids.matches()
}

/// Compiles a validated policy into kernel tables.
///
/// Rule ids: 0 is the default rule (`[deletion]`); 1..=n the `[[deletion.rule]]`s in order; then
/// one per `[[deletion.exempt]]` (action [`ACTION_EXEMPT`]); then one per data-directory owner
/// identity that is neither a rule's match nor an exemption's member (it behaves like the default
/// rule, global targets included, but is recognisable by the kernel), or that is one member of an
/// exemption with several members (it gets its own exempt rule, `<exemption>:owner:...`, so the
/// other members do not become owners too). A job's rule is chosen by
/// executable (inherited from the exec that matched) > unit/cgroup > user > default.
pub fn compile(policy: &Policy, resolver: &dyn Resolver) -> Compiled {
    let d = &policy.deletion;
    let audit_all = policy.mode == Mode::Audit;
    let flags = |m: Mode| {
        if audit_all || m == Mode::Audit {
            RULE_FLAG_AUDIT
        } else {
            0
        }
    };
    let mut b = Builder {
        resolver,
        out: Compiled {
            mode: policy.mode,
            never_hold: d.never_hold.clone(),
            ..Compiled::default()
        },
    };

    for (i, u) in d.never_hold.iter().enumerate() {
        if let Some(id) = resolver.cgroup_id(u)
            && !b.out.never_hold_cgroups.iter().any(|(x, _)| *x == id)
        {
            b.out.never_hold_cgroups.push((id, i as u32));
        }
    }

    let no_levels = |shared: bool| if shared { 0 } else { RULE_FLAG_NO_LEVELS };
    // Session and unit share `[deletion.session]`: a service is budgeted per unit instead of per
    // login session.
    let level = |l: &LevelBudget| RuleParams {
        budget: l.budget,
        window_ns: nanos(l.window),
        action: l.action.kernel(),
        flags: if l.enabled {
            LEVEL_FLAG_ON | flags(Mode::Enforce)
        } else {
            0
        },
    };
    b.out.levels = vec![level(&d.session), level(&d.session), level(&d.user)];
    let default = RuleParams {
        budget: d.budget,
        window_ns: nanos(d.window),
        action: d.action.kernel(),
        flags: flags(Mode::Enforce) | no_levels(d.shared_budgets),
    };
    b.add_rule("default".to_string(), default);

    let mut by_key: BTreeMap<Key, u32> = BTreeMap::new();
    let mut jobs: Vec<(Vec<JobMatch>, u32)> = Vec::new();
    for r in &d.rules {
        let id = b.add_rule(
            r.name.clone(),
            RuleParams {
                budget: r.budget,
                window_ns: nanos(r.window),
                action: r.action.kernel(),
                flags: flags(r.mode) | no_levels(r.shared_budgets),
            },
        );
        by_key.entry(Key::from(&r.matcher)).or_insert(id);
        jobs.push((vec![r.matcher.clone()], id));
    }
    // Members of an exemption with several members that are also data directory owners get a
    // rule id of their own (same exempt parameters): ownership is per rule id, and the other
    // members must not become owners too.
    let mut exempt_jobs: Vec<(Vec<JobMatch>, u32)> = Vec::new();
    let mut shared: BTreeMap<Key, (u32, String)> = BTreeMap::new();
    for e in &d.exemptions {
        let id = b.add_rule(
            e.name.clone(),
            RuleParams {
                budget: 0,
                window_ns: default.window_ns,
                action: ACTION_EXEMPT,
                flags: flags(Mode::Enforce),
            },
        );
        let ms = matches_of(&e.who);
        for m in &ms {
            if ms.len() > 1 {
                shared.entry(Key::from(m)).or_insert((id, e.name.clone()));
            } else {
                by_key.entry(Key::from(m)).or_insert(id);
            }
        }
        exempt_jobs.push((ms, id));
    }
    // Data directory owners that are not otherwise a rule.
    let mut owner_rules: Vec<u32> = Vec::new();
    let mut data_owner_bits: Vec<u64> = Vec::new();
    for dd in &d.data_dirs {
        let mut bits = 0u64;
        for m in matches_of(&dd.owners) {
            let key = Key::from(&m);
            let id = match by_key.get(&key) {
                Some(id) => *id,
                None => {
                    if b.out.rules.len() >= guardrail_common::MAX_RULES as usize {
                        b.warn(
                            "too-many-rules",
                            format!("{m:?}"),
                            "no rule id left for this data directory owner",
                        );
                        continue;
                    }
                    let suffix = match &m {
                        JobMatch::Unit(u) => format!("owner:unit:{u}"),
                        JobMatch::Executable(p) => format!("owner:executable:{}", p.display()),
                        JobMatch::User(u) => format!("owner:user:{u}"),
                        JobMatch::Cgroup(c) => format!("owner:cgroup:{c}"),
                    };
                    let id = match shared.get(&key) {
                        Some((eid, ename)) => {
                            let params = b.out.rules[*eid as usize];
                            b.add_rule(format!("{ename}:{suffix}"), params)
                        }
                        None => {
                            let id = b.add_rule(suffix, default);
                            owner_rules.push(id);
                            id
                        }
                    };
                    by_key.insert(key, id);
                    jobs.push((vec![m.clone()], id));
                    id
                }
            };
            bits |= bit(id);
        }
        data_owner_bits.push(bits);
    }
    for (mut ms, id) in exempt_jobs {
        ms.retain(|m| by_key.get(&Key::from(m)).is_none_or(|x| *x == id));
        jobs.push((ms, id));
    }
    // Identity tables. Executables first so that an identity shared with a unit keeps nothing
    // surprising; each table is exact-match in the kernel.
    for (ms, id) in &jobs {
        for m in ms {
            b.map_identity(m, *id);
        }
    }

    // Targets: rule 0 and the owner rules share the global targets.
    let mut global_bits = bit(0);
    for id in &owner_rules {
        global_bits |= bit(*id);
    }
    let too_wide: BTreeMap<(u64, u64), PathBuf> = crate::resolver::too_wide_for_targets(
        resolver,
        d.protected_roots
            .iter()
            .chain(d.data_dirs.iter().map(|dd| &dd.path))
            .map(PathBuf::as_path),
    )
    .into_iter()
    .map(|((dev, ino), p)| ((kernel_dev_from_user(dev), ino), p))
    .collect();
    let mut declared: Vec<(PathBuf, (u64, u64))> = Vec::new();
    for t in &d.targets {
        for (p, id) in b.targets(t, &too_wide) {
            let e = b.entry(id);
            e.kind |= DIR_TARGET;
            e.target_rules |= global_bits;
            declared.push((p, id));
        }
    }
    for (i, r) in d.rules.iter().enumerate() {
        let rb = bit(i as u32 + 1);
        for t in &r.targets {
            for (p, id) in b.targets(t, &too_wide) {
                let e = b.entry(id);
                e.kind |= DIR_TARGET;
                e.target_rules |= rb;
                declared.push((p, id));
            }
        }
    }
    for (i, dd) in d.data_dirs.iter().enumerate() {
        b.out.data_dirs.push(dd.path.clone());
        for (p, id) in b.declared(&dd.path) {
            let e = b.entry(id);
            if e.kind & DIR_DATA == 0 {
                e.data_dir_id = i as u32;
            }
            e.kind |= DIR_DATA;
            e.data_owner_rules |= data_owner_bits[i];
            declared.push((p, id));
        }
    }
    for p in &d.protected_roots {
        for (_, id) in b.declared(p) {
            b.entry(id).kind |= DIR_PROTECTED_ROOT;
        }
    }

    // Filesystems mounted below a declared directory: the kernel's walk stops at their root, so
    // their root carries what the walk above it would have found.
    let mut mounts: Vec<PathBuf> = resolver
        .mount_points()
        .iter()
        .map(|m| normalize(m))
        .collect();
    mounts.sort_by_key(|m| (m.components().count(), m.clone()));
    mounts.dedup();
    let mount_set: Vec<PathBuf> = mounts.clone();
    for m in &mounts {
        let Some(mid) = kernel_identity(resolver, m) else {
            continue;
        };
        if d.protect_mount_points {
            b.entry(mid).kind |= DIR_PROTECTED_ROOT;
        }
        if !declared.iter().any(|(p, _)| m.starts_with(p) && p != m) {
            continue;
        }
        let combined = combined_scope(&b.out.dirs, resolver, m, mid, &mount_set);
        if combined.kind & (DIR_TARGET | DIR_DATA) != 0 {
            let e = b.entry(mid);
            let protected = e.kind & DIR_PROTECTED_ROOT;
            *e = DirRule {
                kind: combined.kind | protected,
                ..combined
            };
        }
    }
    b.out
}

/// A duration in nanoseconds for the kernel, saturating (validation bounds every duration far
/// below `u64::MAX` ns, about 584 years; a plain `as u64` would wrap to almost nothing).
fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What the ancestor walk from inside the filesystem mounted at `m` would decide if it could go
/// on past the mount root, folded into one entry: target bits met before the nearest data
/// directory, then that data directory (rules already free by a nearer target become owners: the
/// verdict, free, is the same).
fn combined_scope(
    dirs: &BTreeMap<(u64, u64), DirRule>,
    resolver: &dyn Resolver,
    m: &Path,
    mid: (u64, u64),
    mounts: &[PathBuf],
) -> DirRule {
    let mut targets = 0u64;
    let mut chain: Vec<Option<(u64, u64)>> = vec![Some(mid)];
    for a in crate::resolver::ancestors(m) {
        let is_mount = mounts.contains(&a);
        chain.push(kernel_identity(resolver, &a));
        if is_mount {
            // Its entry already folds in everything above it.
            break;
        }
    }
    for id in chain.into_iter().flatten() {
        let Some(e) = dirs.get(&id) else { continue };
        if e.kind & DIR_DATA != 0 {
            return DirRule {
                kind: DIR_DATA | if targets != 0 { DIR_TARGET } else { 0 },
                data_dir_id: e.data_dir_id,
                target_rules: targets,
                data_owner_rules: e.data_owner_rules | targets,
            };
        }
        if e.kind & DIR_TARGET != 0 {
            targets |= e.target_rules;
        }
    }
    DirRule {
        kind: if targets != 0 { DIR_TARGET } else { 0 },
        data_dir_id: 0,
        target_rules: targets,
        data_owner_rules: 0,
    }
}
