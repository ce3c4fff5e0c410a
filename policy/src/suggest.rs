//! `guardrail policy suggest`: from the evidence in the event log (jobs that would have been held
//! in audit mode, or were held) to a proposed drop-in, the `audit2allow` / `aa-logprof`
//! convention. Pure: the caller reads the log and asks the host whether a directory exists; this
//! module decides and writes the TOML text.
//!
//! What it will and will not propose:
//! - a `[[deletion.rule]]` per system service (a `.service` unit reached through system slices
//!   only: a name in `user.slice` or `machine.slice` is the user's or the container's to choose)
//!   whose job crossed its budget with no login session and was not denied;
//! - targets: the narrowest common ancestors of the directories it deleted in, never `/`, a
//!   top-level directory, a protected root, a directory holding a protected root, a data
//!   directory or a mount point, and never a directory the evidence does not show;
//! - for people's jobs (a login session), for jobs it cannot attribute, for denied holds: a note,
//!   never a rule.
//!
//! Every string from the log is hostile text: in comments it is escaped to one printable line
//! (a newline in a file name must not end the comment and inject TOML), in values it is a TOML
//! basic string with every control or invisible character escaped.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::model::{Action, JobMatch, JobRule, Mode, Policy, format_duration};
use crate::resolver::glob_matches;

/// Directories considered per unit: the log is hostile input, the merge is quadratic.
const MAX_DIRS_PER_UNIT: usize = 64;
/// Incidents listed per rule in the comment (the rest are counted).
const MAX_EVIDENCE_SHOWN: usize = 8;
/// Characters of a command line or path shown in a comment.
const MAX_TEXT: usize = 200;
/// Slices whose trees are delegated to users and containers (as in `find_system_unit`).
const UNTRUSTED_SLICES: &[&str] = &["user.slice", "machine.slice"];

/// One job that crossed its budget, as the event log tells it: its incident's last record,
/// joined with the job's summary when the job has ended.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Evidence {
    pub incident: u64,
    pub time: String,
    /// budget_crossed | protected_root | data_dir | ...
    pub kind: String,
    /// The incident's final outcome (would_have_held, approved, denied, ...).
    pub outcome: String,
    /// Whose budget: job | session | unit | user (None: an older record, the job's own).
    pub level: Option<String>,
    /// The rule that judged it, by name.
    pub rule: String,
    pub unit: Option<String>,
    /// The cgroup v2 path of the process that crossed (None: not recorded).
    pub cgroup: Option<String>,
    /// remote | local | none | unknown ("" when not recorded: unknown).
    pub session_class: String,
    pub remote_host: Option<String>,
    pub user: String,
    pub command: String,
    pub pgid: u32,
    /// Deletions outside scope in the window when it crossed.
    pub count: u64,
    pub budget: u64,
    /// From the job's summary: deletions outside scope over its life, and the window's peak.
    pub total: Option<u64>,
    pub peak: Option<u64>,
    /// Deleted paths the agent recorded (the crossing deletion, the latest one of a held job).
    pub paths: Vec<String>,
}

/// A target the suggestion adds, with the incidents whose paths lie below it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Added {
    pub path: PathBuf,
    pub incidents: Vec<u64>,
}

/// A rule for one service.
#[derive(Clone, Debug, Serialize)]
pub struct Suggested {
    pub name: String,
    pub unit: String,
    /// The rule of the same name it replaces (a drop-in replaces a table of the same name in
    /// place), when the unit already had one.
    pub replaces: Option<String>,
    /// The rule whose budget, window, action and targets it starts from.
    pub base: String,
    /// Targets kept from `base` (as written, globs included).
    pub kept: Vec<PathBuf>,
    pub added: Vec<Added>,
    /// Directories the evidence shows that cannot be targets, and why.
    pub rejected: Vec<(PathBuf, String)>,
    /// Written out when the base is a named rule; None: the `[deletion]` defaults apply, as
    /// they did under the default rule.
    pub budget: Option<u64>,
    pub window: Option<Duration>,
    pub action: Option<Action>,
    pub mode: Option<Mode>,
    pub shared_budgets: Option<bool>,
    /// Indices into the evidence given to [`suggest`].
    pub evidence: Vec<usize>,
}

impl Suggested {
    /// Every target of the rule, in the order written.
    pub fn targets(&self) -> Vec<PathBuf> {
        self.kept
            .iter()
            .cloned()
            .chain(self.added.iter().map(|a| a.path.clone()))
            .collect()
    }

    /// The budget the rule will have (the default's when not written).
    pub fn effective_budget(&self, policy: &Policy) -> u64 {
        self.budget.unwrap_or(policy.deletion.budget)
    }
}

/// Evidence that is not turned into a rule, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Note {
    pub incidents: Vec<u64>,
    pub text: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Proposal {
    pub rules: Vec<Suggested>,
    pub notes: Vec<Note>,
}

impl Proposal {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.notes.is_empty()
    }
}

/// What the caller knows about the host.
pub struct Host<'a> {
    /// Mount points of other filesystems (never a target, nor an ancestor of one).
    pub mount_points: Vec<PathBuf>,
    /// Whether `path` is a directory now (lstat: a symlink is not). A deleted directory's
    /// evidence moves up to its nearest existing ancestor, the directory it was deleted from.
    pub is_dir: &'a dyn Fn(&Path) -> bool,
}

/// The system service a job ran in, from its cgroup path: the last `.service` or `.scope`
/// component, reached through system slices only. None for a scope (a login session or a
/// transient scope), for anything below `user.slice` or `machine.slice` (a user or a container
/// names those), and below another unit (a service's delegated subtree).
pub fn system_service(cgroup: &str) -> Option<&str> {
    let comps: Vec<&str> = cgroup.split('/').filter(|c| !c.is_empty()).collect();
    let i = comps
        .iter()
        .rposition(|c| c.ends_with(".service") || c.ends_with(".scope"))?;
    let unit = comps[i];
    let trusted = comps[..i]
        .iter()
        .all(|c| c.ends_with(".slice") && !UNTRUSTED_SLICES.contains(c));
    (unit.ends_with(".service") && unit.len() > ".service".len() && trusted).then_some(unit)
}

/// A deleted path as evidence: absolute, plain components only (a path cut short by the event's
/// depth limit, `...`, or with `.`/`..` shows nothing certain).
fn clean_path(p: &str) -> Option<PathBuf> {
    if !p.starts_with('/') || p.contains('\0') {
        return None;
    }
    let path = Path::new(p);
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) if n != "..." => out.push(n),
            _ => return None,
        }
    }
    (out != Path::new("/")).then_some(out)
}

/// The longest common ancestor of two absolute paths.
pub fn common_ancestor(a: &Path, b: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for (x, y) in a.components().zip(b.components()) {
        if x != y {
            break;
        }
        out.push(x.as_os_str());
    }
    if out.as_os_str().is_empty() {
        PathBuf::from("/")
    } else {
        out
    }
}

/// Why `dir` cannot be a target, if it cannot.
fn unacceptable(dir: &Path, kept: &[PathBuf], data_dirs: &[PathBuf]) -> Option<String> {
    // A directory named `*` would be a glob (every sibling), `[`.. a bad glob; a policy path
    // cannot name a non-UTF-8 or control character literally either.
    let literal = dir
        .to_str()
        .is_some_and(|s| !s.chars().any(|c| "*?[]{}".contains(c) || invisible(c)));
    if !literal {
        return Some("its name holds glob, control or non-UTF-8 characters".into());
    }
    let depth = dir
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    if depth == 0 {
        return Some("it is /".into());
    }
    if let Some(k) = kept.iter().find(|k| k.as_path() == dir) {
        return Some(format!("it is protected ({})", show(&k.to_string_lossy())));
    }
    if let Some(k) = kept.iter().find(|k| k.starts_with(dir)) {
        return Some(format!(
            "it holds the protected {}",
            show(&k.to_string_lossy())
        ));
    }
    if let Some(d) = data_dirs
        .iter()
        .find(|d| dir.starts_with(d) || d.starts_with(dir))
    {
        return Some(format!(
            "data directory {}: name the unit in its owners instead",
            show(&d.to_string_lossy())
        ));
    }
    if depth < 2 {
        return Some("a top-level directory: too wide for a rule".into());
    }
    None
}

/// The narrowest common ancestors of `dirs` that are acceptable targets: two directories are
/// merged into their common ancestor when that ancestor is acceptable, deepest first, until no
/// pair can be merged. Deterministic (sorted input, ties by path).
pub fn narrowest_ancestors(dirs: &[PathBuf], acceptable: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut set: BTreeSet<PathBuf> = dirs.iter().filter(|d| acceptable(d)).cloned().collect();
    loop {
        // A directory below another in the set adds nothing.
        let all: Vec<PathBuf> = set.iter().cloned().collect();
        set.retain(|d| !all.iter().any(|o| o != d && d.starts_with(o)));
        let v: Vec<&PathBuf> = set.iter().collect();
        let mut best: Option<(usize, PathBuf)> = None;
        for i in 0..v.len() {
            for j in i + 1..v.len() {
                let a = common_ancestor(v[i], v[j]);
                if !acceptable(&a) {
                    continue;
                }
                let depth = a.components().count();
                if best
                    .as_ref()
                    .is_none_or(|(d, p)| depth > *d || (depth == *d && a < *p))
                {
                    best = Some((depth, a));
                }
            }
        }
        match best {
            Some((_, a)) => {
                set.retain(|d| !d.starts_with(&a));
                set.insert(a);
            }
            None => return set.into_iter().collect(),
        }
    }
}

/// A rule name from a unit name: `suggested-` and the unit's stem, in plain characters.
fn rule_name(unit: &str, taken: &BTreeSet<String>) -> String {
    let stem = unit.strip_suffix(".service").unwrap_or(unit);
    let clean: String = stem
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "@._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let base = format!("suggested-{clean}");
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

fn is_person(e: &Evidence) -> bool {
    matches!(e.session_class.as_str(), "remote" | "local")
        || e.level
            .as_deref()
            .is_some_and(|l| l == "session" || l == "user")
}

/// Outcomes that say somebody (or the policy) decided the job must not go on: never learned.
fn refused_outcome(outcome: &str) -> Option<&'static str> {
    match outcome {
        "denied" => Some("an admin denied it"),
        "timed_out" => Some("nobody approved it before the hold timed out"),
        "killed" | "refused" | "blocked" => Some("the policy blocked it"),
        _ => None,
    }
}

/// Turns the evidence into a proposal. `evidence` in any order; output sorted by unit, then
/// incident, whatever the order of the log.
pub fn suggest(policy: &Policy, evidence: &[Evidence], host: &Host<'_>) -> Proposal {
    let mut out = Proposal::default();
    let mut order: Vec<usize> = (0..evidence.len()).collect();
    order.sort_by_key(|&i| evidence[i].incident);
    let mut services: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for i in order {
        let e = &evidence[i];
        let who = describe_job(e);
        match e.kind.as_str() {
            "budget_crossed" => {}
            "data_dir" => {
                out.notes.push(Note {
                    incidents: vec![e.incident],
                    text: format!(
                        "{who} was refused inside a data directory it is not named for ({}): if it should delete there, name it in that [[deletion.data_dir]]'s owners by hand",
                        first_path(e)
                    ),
                });
                continue;
            }
            // Protected roots are refused whatever the rule: nothing to learn.
            _ => continue,
        }
        if let Some(why) = refused_outcome(&e.outcome) {
            out.notes.push(Note {
                incidents: vec![e.incident],
                text: format!("{who}: not learned from, {why}"),
            });
            continue;
        }
        if is_person(e) {
            out.notes.push(Note {
                incidents: vec![e.incident],
                text: format!(
                    "{who} deleted {} ({}): a person's job gets no rule; approve such a hold when it is intended (`guardrail approve ID`)",
                    first_path(e),
                    crossing(e)
                ),
            });
            continue;
        }
        let service = e.cgroup.as_deref().and_then(system_service);
        match (service, e.unit.as_deref()) {
            // A service has no login session: an unknown one is not evidence of a service.
            (Some(s), Some(u)) if s == u && e.session_class == "none" => {
                services.entry(u.to_string()).or_default().push(i);
            }
            _ => out.notes.push(Note {
                incidents: vec![e.incident],
                text: format!(
                    "{who}: not attributable to a system service (cgroup {}): no rule",
                    e.cgroup
                        .as_deref()
                        .map(show)
                        .unwrap_or_else(|| "not recorded".into())
                ),
            }),
        }
    }

    let mut taken: BTreeSet<String> = policy
        .deletion
        .rules
        .iter()
        .map(|r| r.name.clone())
        .chain(policy.deletion.exemptions.iter().map(|x| x.name.clone()))
        .collect();
    let mut kept_dirs: Vec<PathBuf> = policy.deletion.protected_roots.clone();
    if policy.deletion.protect_mount_points {
        kept_dirs.extend(host.mount_points.iter().cloned());
    }
    let data_dirs: Vec<PathBuf> = policy
        .deletion
        .data_dirs
        .iter()
        .map(|d| d.path.clone())
        .collect();

    for (unit, idx) in services {
        let incidents: Vec<u64> = idx.iter().map(|&i| evidence[i].incident).collect();
        let existing = policy
            .deletion
            .rules
            .iter()
            .find(|r| matches!(&r.matcher, JobMatch::Unit(u) if *u == unit));
        let judged = evidence[idx[0]].rule.as_str();
        let judged_rule = policy.deletion.rules.iter().find(|r| r.name == judged);
        let base: Option<&JobRule> = match (existing, judged_rule) {
            (Some(r), _) => Some(r),
            (None, Some(r)) if matches!(r.matcher, JobMatch::User(_)) => Some(r),
            (None, Some(r)) => {
                out.notes.push(Note {
                    incidents,
                    text: format!(
                        "{} ran under rule {}, matched by {}, which takes precedence over a unit rule (or is the same cgroup): add the directories it deleted in ({}) to that rule's targets by hand if they are right",
                        show(&unit),
                        show_quoted(&r.name),
                        match &r.matcher {
                            JobMatch::Executable(_) => "executable",
                            JobMatch::Cgroup(_) => "cgroup",
                            _ => "identity",
                        },
                        idx.iter()
                            .map(|&i| first_path(&evidence[i]))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
                continue;
            }
            (None, None) => None,
        };
        let kept: Vec<PathBuf> = match base {
            Some(r) => r.targets.clone(),
            None => policy.deletion.targets.clone(),
        };
        let inside_kept = |d: &Path| {
            kept.iter().any(|k| {
                let k = k.to_string_lossy();
                std::iter::once(d)
                    .chain(d.ancestors().skip(1))
                    .any(|a| glob_matches(&k, a))
            })
        };
        // The directories it deleted from, moved up to the nearest one that still exists.
        let mut dirs: BTreeMap<PathBuf, BTreeSet<u64>> = BTreeMap::new();
        for &i in &idx {
            for p in evidence[i].paths.iter().filter_map(|p| clean_path(p)) {
                let mut d = p.parent().map(Path::to_path_buf).unwrap_or_default();
                while d != Path::new("/") && !(host.is_dir)(&d) {
                    d = d.parent().map(Path::to_path_buf).unwrap_or_default();
                }
                if dirs.len() < MAX_DIRS_PER_UNIT || dirs.contains_key(&d) {
                    dirs.entry(d).or_default().insert(evidence[i].incident);
                }
            }
        }
        let mut rejected = Vec::new();
        let mut candidates = Vec::new();
        for d in dirs.keys() {
            if inside_kept(d) {
                continue;
            }
            match unacceptable(d, &kept_dirs, &data_dirs) {
                Some(why) => rejected.push((d.clone(), why)),
                None => candidates.push(d.clone()),
            }
        }
        let merged = narrowest_ancestors(&candidates, |a| {
            unacceptable(a, &kept_dirs, &data_dirs).is_none()
        });
        let added: Vec<Added> = merged
            .into_iter()
            .map(|t| Added {
                incidents: dirs
                    .iter()
                    .filter(|(d, _)| d.starts_with(&t))
                    .flat_map(|(_, ids)| ids.iter().copied())
                    .collect::<BTreeSet<u64>>()
                    .into_iter()
                    .collect(),
                path: t,
            })
            .collect();
        if added.is_empty() {
            let why = if rejected.is_empty() {
                "no usable deleted path was recorded (the agent records only the deletion that crossed the budget)".to_string()
            } else {
                rejected
                    .iter()
                    .map(|(d, w)| format!("{}: {w}", show(&d.to_string_lossy())))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            out.notes.push(Note {
                incidents,
                text: format!("{}: no target to suggest: {why}", show(&unit)),
            });
            continue;
        }
        let (name, replaces) = match existing {
            Some(r) => (r.name.clone(), Some(r.name.clone())),
            None => {
                let n = rule_name(&unit, &taken);
                taken.insert(n.clone());
                (n, None)
            }
        };
        out.rules.push(Suggested {
            name,
            unit: unit.clone(),
            replaces,
            base: base
                .map(|r| r.name.clone())
                .unwrap_or_else(|| judged.to_string()),
            kept,
            added,
            rejected,
            budget: base.map(|r| r.budget),
            window: base.map(|r| r.window),
            action: base.map(|r| r.action),
            mode: base.map(|r| r.mode).filter(|m| *m == Mode::Audit),
            shared_budgets: base
                .map(|r| r.shared_budgets)
                .filter(|s| *s != policy.deletion.shared_budgets),
            evidence: idx,
        });
    }
    out
}

/// "job 4242 (`rm -rf x`, user root)".
fn describe_job(e: &Evidence) -> String {
    format!(
        "incident {} (pgid {}, user {}, {})",
        e.incident,
        e.pgid,
        show(&e.user),
        show_quoted(&e.command)
    )
}

fn first_path(e: &Evidence) -> String {
    e.paths
        .first()
        .map(|p| show(p))
        .unwrap_or_else(|| "no path recorded".into())
}

fn crossing(e: &Evidence) -> String {
    let mut s = format!("{} outside its targets, budget {}", e.count, e.budget);
    match e.session_class.as_str() {
        "remote" => s.push_str(&format!(
            ", remote login{}",
            e.remote_host
                .as_deref()
                .map(|h| format!(" from {}", show(h)))
                .unwrap_or_default()
        )),
        "local" => s.push_str(", local login"),
        _ => {}
    }
    s
}

/// Hostile text for a comment or a message: one line, printable, capped. Control characters,
/// line and paragraph separators, bidirectional and other invisible format characters are
/// written as `\u{..}`.
pub fn show(s: &str) -> String {
    let mut out = String::new();
    for (n, c) in s.chars().enumerate() {
        if n >= MAX_TEXT {
            out.push('…');
            break;
        }
        if invisible(c) || c == '\\' {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn show_quoted(s: &str) -> String {
    format!("\"{}\"", show(s).replace('"', "\\\""))
}

fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(c as u32, 0x61c | 0x200b..=0x200f | 0x2028..=0x202e | 0x2060..=0x2069 | 0xfeff)
}

/// A TOML basic string: quotes, backslashes and every invisible character escaped.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if invisible(c) => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Hold => "hold",
        Action::Block => "block",
        Action::Alert => "alert",
    }
}

/// The drop-in text. `source` names the event log (shown escaped).
pub fn render(p: &Proposal, evidence: &[Evidence], source: &str) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "# Suggested by `guardrail policy suggest` from {}.\n",
        show(source)
    ));
    t.push_str(
        "# Review it, then install it as /etc/guardrail/policy.d/50-suggested.toml and reload\n\
         # the agent (`systemctl reload guardrail`). Evidence: the kernel only counts deletions;\n\
         # the agent records the path of the deletion that crossed the budget (and the latest one\n\
         # a held job tried). The targets below are the narrowest directories holding those\n\
         # paths: a job that also deletes elsewhere is still counted there.\n",
    );
    for r in &p.rules {
        t.push('\n');
        t.push_str(&format!(
            "# {}: {} job(s) held or would have been held.\n",
            show(&r.unit),
            r.evidence.len()
        ));
        for e in r
            .evidence
            .iter()
            .take(MAX_EVIDENCE_SHOWN)
            .filter_map(|&i| evidence.get(i))
        {
            t.push_str(&format!(
                "#   incident {} at {}: {}, {} deletions outside its targets (budget {}, rule {})\n",
                e.incident,
                show(&e.time),
                show(&e.outcome),
                e.count,
                e.budget,
                show_quoted(&e.rule)
            ));
            if let (Some(total), Some(peak)) = (e.total, e.peak) {
                t.push_str(&format!(
                    "#     whole job: {total} deletions outside scope, peak {peak} in one window\n"
                ));
            }
            t.push_str(&format!(
                "#     user {}, command {}\n",
                show(&e.user),
                show_quoted(&e.command)
            ));
            for path in &e.paths {
                t.push_str(&format!("#     deleted {}\n", show(path)));
            }
        }
        if r.evidence.len() > MAX_EVIDENCE_SHOWN {
            t.push_str(&format!(
                "#   ... and {} more incidents\n",
                r.evidence.len() - MAX_EVIDENCE_SHOWN
            ));
        }
        for (d, why) in &r.rejected {
            t.push_str(&format!(
                "#   not a target: {} ({why})\n",
                show(&d.to_string_lossy())
            ));
        }
        match &r.replaces {
            Some(n) => t.push_str(&format!(
                "# Replaces rule {} (same name): its settings, its targets and the new ones.\n",
                show_quoted(n)
            )),
            None => t.push_str(&format!(
                "# A new rule: it ran under rule {}; budget, window and action as there, and\n\
                 # that rule's targets kept (a rule's targets are its only ones).\n",
                show_quoted(&r.base)
            )),
        }
        t.push_str("[[deletion.rule]]\n");
        t.push_str(&format!("name = {}\n", toml_str(&r.name)));
        t.push_str(&format!("match = {{ unit = {} }}\n", toml_str(&r.unit)));
        t.push_str("targets = [\n");
        for k in &r.kept {
            t.push_str(&format!(
                "    {},  # kept from rule {}\n",
                toml_str(&k.to_string_lossy()),
                show_quoted(&r.base)
            ));
        }
        for a in &r.added {
            let ids: Vec<String> = a.incidents.iter().map(u64::to_string).collect();
            t.push_str(&format!(
                "    {},  # new: incident {}\n",
                toml_str(&a.path.to_string_lossy()),
                ids.join(", ")
            ));
        }
        t.push_str("]\n");
        if let Some(b) = r.budget {
            t.push_str(&format!("budget = {b}\n"));
        }
        if let Some(w) = r.window {
            t.push_str(&format!("window = \"{}\"\n", format_duration(w)));
        }
        if let Some(a) = r.action {
            t.push_str(&format!("action = \"{}\"\n", action_name(a)));
        }
        if r.mode.is_some() {
            t.push_str("mode = \"audit\"\n");
        }
        if let Some(s) = r.shared_budgets {
            t.push_str(&format!("shared_budgets = {s}\n"));
        }
    }
    if !p.notes.is_empty() {
        t.push_str("\n# Not turned into rules:\n");
        for n in &p.notes {
            t.push_str(&format!("# - {}\n", n.text));
        }
    }
    t
}

#[cfg(test)]
mod tests;
