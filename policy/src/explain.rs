//! `guardrail policy explain`: what the kernel would decide for one path and one job, computed
//! from the compiled tables with the kernel's own decision function
//! ([`guardrail_common::scope_step`]).

use std::fmt;
use std::path::{Path, PathBuf};

use guardrail_common::{
    ACTION_EXEMPT, DIR_PROTECTED_ROOT, LEVEL_FLAG_ON, LEVEL_SESSION, LEVEL_USER, MAX_ANCESTORS,
    RULE_FLAG_AUDIT, RULE_FLAG_NO_LEVELS, Scope, scope_step,
};
use serde::Serialize;

use crate::compile::{Compiled, kernel_identity};
use crate::model::{Action, Mode, Policy, SessionClass, ShutdownAction, format_duration};
use crate::resolver::{Resolver, normalize};

/// The job doing the deletion, as `explain` is told about it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JobSpec {
    /// systemd unit the job runs in (`backup.service`).
    pub unit: Option<String>,
    /// Executable that started the job (or its nearest ancestor that matched a rule).
    pub exe: Option<String>,
    /// User name or numeric uid.
    pub user: Option<String>,
    /// cgroup v2 path (`/system.slice/backup.service`).
    pub cgroup: Option<String>,
}

/// Which identity chose the rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "by", content = "value", rename_all = "lowercase")]
pub enum MatchedBy {
    Executable(String),
    Unit(String),
    Cgroup(String),
    User(String),
    /// Nothing matched: rule 0.
    Default,
}

/// What happens to a deletion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The entry itself is a protected root: refused.
    ProtectedRoot,
    /// Below a target of the job's rule: free.
    InTarget,
    /// Below a data directory the job owns: free.
    DataOwner { data_dir_id: u32 },
    /// Below a data directory the job does not own: refused from the first file.
    DataForeign { data_dir_id: u32 },
    /// An exempt job outside data directories: free, not counted.
    Exempt,
    /// Counted against the rule's budget.
    Counted {
        budget: u64,
        window: String,
        action: Action,
    },
}

impl Verdict {
    /// Refused by the kernel (in enforce mode).
    pub fn refused(&self) -> bool {
        matches!(self, Verdict::ProtectedRoot | Verdict::DataForeign { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub path: PathBuf,
    pub rule: u32,
    pub rule_name: String,
    pub matched_by: MatchedBy,
    pub verdict: Verdict,
    /// The directory that decided (the entry itself for a protected root); None when no declared
    /// directory decided.
    pub deciding_dir: Option<PathBuf>,
    /// The data directory's declared path, for data verdicts.
    pub data_dir: Option<PathBuf>,
    /// Audit mode (global or the rule's): nothing is refused or stopped, only reported.
    pub audit: bool,
    /// Ancestors examined, nearest first (path, whether it is in the directory table).
    pub walked: Vec<(PathBuf, bool)>,
    /// Paths of the walk that do not exist on this host (skipped).
    pub unresolved: Vec<PathBuf>,
    /// The job's unit, when it is in `deletion.never_hold`: the job is never stopped.
    pub never_held_unit: Option<String>,
    /// For a counted deletion: the budgets above the job it also counts for, in words
    /// ("its login session (a service: its unit): 500 per 1m, then hold").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared_budgets: Vec<String>,
}

/// The rule a job runs under: executable > unit/cgroup > user > default.
pub fn job_rule(compiled: &Compiled, job: &JobSpec, resolver: &dyn Resolver) -> (u32, MatchedBy) {
    if let Some(exe) = &job.exe
        && let Some(r) =
            kernel_identity(resolver, Path::new(exe)).and_then(|id| compiled.rule_for_exe(id))
    {
        return (r, MatchedBy::Executable(exe.clone()));
    }
    if let Some(unit) = &job.unit
        && let Some(r) = resolver
            .cgroup_id(unit)
            .and_then(|id| compiled.rule_for_cgroup(id))
    {
        return (r, MatchedBy::Unit(unit.clone()));
    }
    if let Some(cg) = &job.cgroup
        && let Some(r) = resolver
            .cgroup_id(cg)
            .and_then(|id| compiled.rule_for_cgroup(id))
    {
        return (r, MatchedBy::Cgroup(cg.clone()));
    }
    if let Some(user) = &job.user {
        let uid = user.parse::<u32>().ok().or_else(|| resolver.uid(user));
        if let Some(r) = uid.and_then(|u| compiled.rule_for_uid(u)) {
            return (r, MatchedBy::User(user.clone()));
        }
    }
    (0, MatchedBy::Default)
}

/// Explains what the kernel would decide for deleting `path` by `job`.
pub fn explain(
    compiled: &Compiled,
    path: &Path,
    job: &JobSpec,
    resolver: &dyn Resolver,
) -> Explanation {
    let path = normalize(path);
    let (rule, matched_by) = job_rule(compiled, job, resolver);
    let params = compiled
        .rules
        .get(rule as usize)
        .copied()
        .unwrap_or_default();
    let audit = compiled.mode == Mode::Audit || params.flags & RULE_FLAG_AUDIT != 0;
    let rule_name = compiled
        .rule_names
        .get(rule as usize)
        .cloned()
        .unwrap_or_default();
    let mut ex = Explanation {
        path: path.clone(),
        rule,
        rule_name,
        matched_by,
        verdict: Verdict::Exempt,
        deciding_dir: None,
        data_dir: None,
        audit,
        walked: Vec::new(),
        unresolved: Vec::new(),
        never_held_unit: job.unit.clone().filter(|u| compiled.never_hold.contains(u)),
        shared_budgets: Vec::new(),
    };
    // The entry itself.
    if let Some(id) = kernel_identity(resolver, &path)
        && compiled
            .dirs
            .get(&id)
            .is_some_and(|d| d.kind & DIR_PROTECTED_ROOT != 0)
    {
        ex.verdict = Verdict::ProtectedRoot;
        ex.deciding_dir = Some(path);
        return ex;
    }
    let mounts: Vec<PathBuf> = resolver
        .mount_points()
        .iter()
        .map(|m| normalize(m))
        .collect();
    let mut scope = Scope::Undecided;
    for dir in crate::resolver::ancestors(&path)
        .into_iter()
        .take(MAX_ANCESTORS as usize)
    {
        let Some(id) = kernel_identity(resolver, &dir) else {
            ex.unresolved.push(dir);
            continue;
        };
        let entry = compiled.dirs.get(&id);
        ex.walked.push((dir.clone(), entry.is_some()));
        if let Some(e) = entry {
            scope = scope_step(e, rule);
            if scope != Scope::Undecided {
                ex.deciding_dir = Some(dir);
                break;
            }
        }
        if mounts.contains(&dir) {
            // The kernel's walk stops at a filesystem's root.
            break;
        }
    }
    ex.verdict = match scope {
        Scope::InTarget => Verdict::InTarget,
        Scope::DataOwner => Verdict::DataOwner {
            data_dir_id: data_id(compiled, ex.deciding_dir.as_deref(), resolver),
        },
        Scope::DataForeign { data_dir_id } => Verdict::DataForeign { data_dir_id },
        Scope::Undecided if params.action == ACTION_EXEMPT => Verdict::Exempt,
        Scope::Undecided => Verdict::Counted {
            budget: params.budget,
            window: format_duration(std::time::Duration::from_nanos(params.window_ns)),
            action: match params.action {
                guardrail_common::ACTION_BLOCK => Action::Block,
                guardrail_common::ACTION_ALERT => Action::Alert,
                _ => Action::Hold,
            },
        },
    };
    if matches!(ex.verdict, Verdict::Counted { .. }) && params.flags & RULE_FLAG_NO_LEVELS == 0 {
        ex.shared_budgets = level_lines(compiled);
    }
    if let Verdict::DataOwner { data_dir_id } | Verdict::DataForeign { data_dir_id } = ex.verdict {
        ex.data_dir = compiled.data_dirs.get(data_dir_id as usize).cloned();
    }
    ex
}

/// The levels in force, as `explain` prints them (session and unit share their numbers).
fn level_lines(compiled: &Compiled) -> Vec<String> {
    [
        (LEVEL_SESSION, "its login session (a service: its unit)"),
        (LEVEL_USER, "the user who logged in, across their sessions"),
    ]
    .iter()
    .filter_map(|(level, who)| {
        let p = compiled.levels.get(*level as usize)?;
        if p.flags & LEVEL_FLAG_ON == 0 {
            return None;
        }
        let action = match p.action {
            guardrail_common::ACTION_BLOCK => "block",
            guardrail_common::ACTION_ALERT => "alert",
            _ => "hold",
        };
        Some(format!(
            "{who}: {} per {}, then {action} the job that crosses it",
            p.budget,
            format_duration(std::time::Duration::from_nanos(p.window_ns))
        ))
    })
    .collect()
}

fn data_id(compiled: &Compiled, dir: Option<&Path>, resolver: &dyn Resolver) -> u32 {
    dir.and_then(|d| compiled.dir_of(d, resolver))
        .map(|e| e.data_dir_id)
        .unwrap_or(0)
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "path:     {}", self.path.display())?;
        let by = match &self.matched_by {
            MatchedBy::Executable(e) => format!("matched by executable {e}"),
            MatchedBy::Unit(u) => format!("matched by unit {u}"),
            MatchedBy::Cgroup(c) => format!("matched by cgroup {c}"),
            MatchedBy::User(u) => format!("matched by user {u}"),
            MatchedBy::Default => "no rule matched the job: default rule".to_string(),
        };
        writeln!(f, "rule:     #{} \"{}\" ({by})", self.rule, self.rule_name)?;
        match &self.deciding_dir {
            Some(d) => writeln!(f, "decided:  by {}", d.display())?,
            None => writeln!(f, "decided:  no declared directory above it")?,
        }
        let would = if self.audit { "would be " } else { "" };
        let data = self
            .data_dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let outcome = match &self.verdict {
            Verdict::ProtectedRoot => format!("{would}REFUSED: it is a protected root (its contents are judged as usual)"),
            Verdict::InTarget => "free: inside a target of this rule".to_string(),
            Verdict::DataOwner { .. } => format!("free: inside data directory {data}, which this job owns"),
            Verdict::DataForeign { .. } => format!("{would}REFUSED from the first file: inside data directory {data}, which this job is not named for"),
            Verdict::Exempt => "free: the job is exempt from the budget (protected roots and foreign data directories still refuse it)".to_string(),
            Verdict::Counted { budget, window, action } => {
                let never_held = self.never_held_unit.as_ref().map(|u| {
                    format!("the job is never stopped: {u} is never held (deletion.never_hold); every further deletion of this job outside scope is refused (lsm tier) or only reported (other tiers)")
                });
                let a = match (action, &never_held) {
                    (Action::Hold | Action::Block, Some(n)) => n.as_str(),
                    (Action::Hold, None) => "the job is held for an admin",
                    (Action::Block, None) => "the job is blocked",
                    (Action::Alert, _) => "an alert is sent",
                };
                format!("counted: {budget} deletions per {window} outside targets, then {would_a}{a}", would_a = if self.audit { "(audit: would be) " } else { "" })
            }
        };
        write!(f, "outcome:  {outcome}")?;
        for l in &self.shared_budgets {
            write!(f, "\nalso:     counted for {l}")?;
        }
        if self.audit {
            write!(
                f,
                "\nmode:     audit: nothing is refused or stopped, decisions are only reported"
            )?;
        }
        if !self.unresolved.is_empty() {
            let v: Vec<String> = self
                .unresolved
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            write!(f, "\nnote:     not on this host, skipped: {}", v.join(", "))?;
        }
        Ok(())
    }
}

/// The answer to a shutdown request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShutdownDecision {
    /// The class the request was judged as (a serial console becomes local or remote).
    pub class: SessionClass,
    pub action: ShutdownAction,
    /// The `[[shutdown.exception]]` that allowed it.
    pub exception: Option<String>,
    /// Audit mode: the action is only reported.
    pub audit: bool,
}

impl fmt::Display for ShutdownDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = match self.action {
            ShutdownAction::Allow => "allowed (with an alert)",
            ShutdownAction::Confirm => "held until confirmed with the host name",
            ShutdownAction::Block => "blocked",
        };
        let class = serde_json::to_value(self.class)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        write!(
            f,
            "shutdown from a {class} session: {}{a}",
            if self.audit { "(audit) would be " } else { "" }
        )?;
        if let Some(e) = &self.exception {
            write!(f, " by exception \"{e}\"")?;
        }
        Ok(())
    }
}

/// What a shutdown request from `class`, made by a process in `unit` running `exe`, gets.
/// Exceptions win over the class; a serial console is first mapped through
/// `[shutdown].serial_console`.
pub fn explain_shutdown(
    policy: &Policy,
    class: SessionClass,
    unit: Option<&str>,
    exe: Option<&str>,
) -> ShutdownDecision {
    let s = &policy.shutdown;
    let class = if class == SessionClass::SerialConsole {
        s.serial_console
    } else {
        class
    };
    let audit = policy.mode == Mode::Audit;
    let exe = exe.map(|e| normalize(Path::new(e)));
    for e in &s.exceptions {
        let by_unit = unit.is_some_and(|u| e.units.iter().any(|x| x == u));
        let by_exe = exe.as_ref().is_some_and(|x| e.executables.contains(x));
        if by_unit || by_exe {
            return ShutdownDecision {
                class,
                action: ShutdownAction::Allow,
                exception: Some(e.name.clone()),
                audit,
            };
        }
    }
    let action = match class {
        SessionClass::Local => s.local,
        SessionClass::Remote => s.remote,
        SessionClass::None => s.none,
        SessionClass::Unknown | SessionClass::SerialConsole => s.unknown,
    };
    ShutdownDecision {
        class,
        action,
        exception: None,
        audit,
    }
}
