//! Where the policy comes from (the embedded default or /etc/guardrail), how it is turned into
//! the kernel's tables, and how the agent notices that an admin edited it.
pub mod lastgood;

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use guardrail_policy as gp;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use guardrail_common::{DirRule, RuleParams};

pub const ETC_POLICY: &str = "/etc/guardrail/policy.toml";
pub const ETC_POLICY_DIR: &str = "/etc/guardrail/policy.d";

#[derive(Debug, Clone)]
pub enum PolicySource {
    /// The default compiled into the binary (same text as packaging/policy.toml).
    Embedded,
    File {
        main: PathBuf,
        dropins: Option<PathBuf>,
    },
}

/// What one policy looks like in the kernel's tables.
#[derive(Debug, Default, Clone)]
pub struct KernelPolicy {
    pub mode: u32,
    /// (kernel dev, ino) → rule.
    pub dirs: Vec<((u64, u64), DirRule)>,
    pub rules: Vec<RuleParams>,
    /// Budgets above the job, by `LEVEL_*` (`LEVEL_PARAMS`); missing entries are off.
    pub levels: Vec<RuleParams>,
    /// (kernel dev, ino) of an executable → rule id.
    pub exes: Vec<((u64, u64), u32)>,
    pub cgroups: Vec<(u64, u32)>,
    pub uids: Vec<(u32, u32)>,
    /// (cgroup id, index of the unit in `deletion.never_hold`) of the never_hold units running
    /// now (`NEVER_HOLD`).
    pub never_hold: Vec<(u64, u32)>,
}

/// A validated policy and its kernel tables.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    pub policy: gp::Policy,
    pub compiled: gp::Compiled,
    pub kernel: KernelPolicy,
    /// The shutdown guard's tables, compiled by the policy crate like the deletion guard's.
    pub shutdown_tables: gp::ShutdownTables,
    pub fingerprint: String,
    pub hold_timeout: Duration,
    pub deny_kills: bool,
    pub warnings: Vec<String>,
}

impl LoadedPolicy {
    pub fn summary(&self) -> String {
        let d = &self.policy.deletion;
        format!(
            "mode {}, budget {} per {}, {} declared directories, {} job rules, hold timeout {}",
            self.mode_name(),
            d.budget,
            gp::format_duration(d.window),
            self.kernel.dirs.len(),
            self.compiled.rule_names.len(),
            gp::format_duration(d.hold_timeout)
        )
    }

    pub fn mode_name(&self) -> &'static str {
        match self.policy.mode {
            gp::Mode::Enforce => "enforce",
            gp::Mode::Audit => "audit",
        }
    }

    pub fn rule_name(&self, rule: u32) -> String {
        self.compiled
            .rule_names
            .get(rule as usize)
            .cloned()
            .unwrap_or_else(|| format!("rule {rule}"))
    }

    pub fn rule_budget(&self, rule: u32) -> u64 {
        self.kernel
            .rules
            .get(rule as usize)
            .map(|r| r.budget)
            .unwrap_or(self.policy.deletion.budget)
    }

    pub fn rule_window(&self, rule: u32) -> Duration {
        self.kernel
            .rules
            .get(rule as usize)
            .map(|r| Duration::from_nanos(r.window_ns))
            .unwrap_or(self.policy.deletion.window)
    }
}

fn fingerprint(text: &str) -> String {
    // FNV-1a: only needs to tell "the file on disk is not the one in force".
    let mut h: u64 = 0xcbf29ce484222325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

impl PolicySource {
    pub fn from_args(policy: Option<&Path>, dir: Option<&Path>) -> Self {
        match policy {
            // Absolute, so the watcher knows the directory to watch.
            Some(p) => PolicySource::File {
                main: std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
                dropins: dir.map(|d| std::path::absolute(d).unwrap_or_else(|_| d.to_path_buf())),
            },
            None if Path::new(ETC_POLICY).exists() => PolicySource::File {
                main: PathBuf::from(ETC_POLICY),
                dropins: Some(
                    dir.map(Path::to_path_buf)
                        .unwrap_or_else(|| PathBuf::from(ETC_POLICY_DIR)),
                ),
            },
            None => PolicySource::Embedded,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PolicySource::Embedded => "(embedded default)".to_string(),
            PolicySource::File {
                main,
                dropins: Some(d),
            } if d.is_dir() => {
                format!("{} + {}/*.toml", main.display(), d.display())
            }
            PolicySource::File { main, .. } => main.display().to_string(),
        }
    }

    /// The text of every file, concatenated in merge order (for the fingerprint).
    fn text_on_disk(&self) -> Option<String> {
        match self {
            PolicySource::Embedded => Some(gp::DEFAULT_POLICY.to_string()),
            PolicySource::File { main, dropins } => {
                let mut text = std::fs::read_to_string(main).ok()?;
                if let Some(d) = dropins {
                    for f in dropin_files(d) {
                        text.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
                    }
                }
                Some(text)
            }
        }
    }

    pub fn fingerprint_on_disk(&self) -> Option<String> {
        self.text_on_disk().map(|t| fingerprint(&t))
    }

    /// Parses, validates and compiles; Err carries the rendered diagnostics.
    pub fn load(&self) -> std::result::Result<LoadedPolicy, String> {
        let resolver = gp::SystemResolver;
        let text = self.text_on_disk().unwrap_or_default();
        let checked = match self {
            PolicySource::Embedded => {
                gp::check_str("(embedded default)", gp::DEFAULT_POLICY, &resolver)
            }
            PolicySource::File { main, dropins } => {
                gp::check_files(main, dropins.as_deref(), &resolver)
            }
        };
        finish(checked, &text)
    }

    /// Every file of the policy as (name, text), in merge order, read now: what the agent keeps
    /// as the last good policy once it loaded.
    pub fn snapshot(&self) -> Option<Vec<(String, String)>> {
        match self {
            PolicySource::Embedded => Some(vec![(
                "(embedded default)".to_string(),
                gp::DEFAULT_POLICY.to_string(),
            )]),
            PolicySource::File { main, dropins } => {
                let mut files = vec![(
                    main.display().to_string(),
                    std::fs::read_to_string(main).ok()?,
                )];
                if let Some(d) = dropins {
                    // The same files, in the same order, as the policy library's check_files.
                    let mut names: Vec<PathBuf> = dropin_files(d)
                        .into_iter()
                        .filter(|p| {
                            !p.file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                        })
                        .collect();
                    names.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
                    for f in names {
                        files.push((f.display().to_string(), std::fs::read_to_string(&f).ok()?));
                    }
                }
                Some(files)
            }
        }
    }
}

/// Checks and compiles policy files given as (name, text): the last good policy.
pub fn load_sources(files: &[(String, String)]) -> std::result::Result<LoadedPolicy, String> {
    let text: String = files.iter().map(|(_, t)| t.as_str()).collect();
    finish(gp::check_sources(files, &gp::SystemResolver), &text)
}

fn finish(checked: gp::Checked, text: &str) -> std::result::Result<LoadedPolicy, String> {
    let resolver = gp::SystemResolver;
    let rendered: Vec<String> = checked.diagnostics.iter().map(|d| d.to_string()).collect();
    let Some(policy) = checked
        .policy
        .filter(|_| !checked.diagnostics.iter().any(|d| d.is_error()))
    else {
        return Err(if rendered.is_empty() {
            "the policy could not be read".to_string()
        } else {
            rendered.join("\n")
        });
    };
    let compiled = gp::compile(&policy, &resolver);
    let kernel = kernel_tables(&policy, &compiled);
    let shutdown_tables = gp::compile_shutdown(&policy, &resolver);
    Ok(LoadedPolicy {
        shutdown_tables,
        hold_timeout: policy.deletion.hold_timeout,
        deny_kills: policy.deletion.on_deny == gp::OnDeny::Kill,
        kernel,
        compiled,
        policy,
        fingerprint: fingerprint(text),
        warnings: rendered,
    })
}

fn kernel_tables(policy: &gp::Policy, c: &gp::Compiled) -> KernelPolicy {
    KernelPolicy {
        mode: match policy.mode {
            gp::Mode::Enforce => guardrail_common::MODE_ENFORCE,
            gp::Mode::Audit => guardrail_common::MODE_AUDIT,
        },
        dirs: c.dirs.iter().map(|(k, v)| (*k, *v)).collect(),
        rules: c.rules.clone(),
        levels: c.levels.clone(),
        exes: c.exes.clone(),
        cgroups: c.cgroups.clone(),
        uids: c.uids.clone(),
        never_hold: c.never_hold_cgroups.clone(),
    }
}

pub fn dropin_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension() == Some(OsStr::new("toml")))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Editors save by writing a temporary file and renaming it over the original (vim also
/// creates and deletes a probe file named `4913`): watch the directories, not the file, and
/// react to whole files appearing under the policy's names.
///
/// Declared directories (targets, data directories, protected roots) are keys of (dev, inode):
/// one that is removed, renamed or replaced keeps its entry until the tables are rebuilt, and
/// ext4 hands freed inode numbers out again, so a new directory could inherit a rule. So every
/// resolved declared directory is watched for `IN_DELETE_SELF | IN_MOVE_SELF`, and every
/// directory on the way to one (each glob's parents included) for a new entry of the name the
/// path needs next; any of these rebuilds the tables.
pub struct Watcher {
    inotify: Inotify,
    names: Vec<(PathBuf, Option<String>)>,
    /// Units the policy names: a rule matched by unit applies through the unit's cgroup id,
    /// which exists only while the unit runs, so the policy is compiled again when one starts.
    units: Vec<String>,
    /// Watches of the policy files and unit slices, never removed by [`Watcher::rearm`].
    fixed: Vec<WatchDescriptor>,
    /// Watches on the way to declared directories, and what each one is for.
    paths: BTreeMap<WatchDescriptor, PathWatch>,
    /// A directory change seen while the last one's reload is younger than [`DIR_RELOAD_GAP`].
    pending: Option<String>,
    last_dir_reload: Option<Instant>,
}

/// Least time between two reloads caused by directory changes: a user who can create entries
/// in a globbed directory must not make the agent rebuild its tables in a loop.
const DIR_RELOAD_GAP: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Default)]
struct PathWatch {
    dir: PathBuf,
    /// Names whose appearance here matters (`None`: any directory, for a `*`).
    next: Vec<Option<String>>,
}

impl LoadedPolicy {
    /// Every systemd unit the policy names (job rules, exemptions, data directory owners,
    /// never_hold units): each is matched by the cgroup id of a running unit.
    pub fn unit_names(&self) -> Vec<String> {
        let d = &self.policy.deletion;
        let mut units: Vec<String> = d
            .rules
            .iter()
            .filter_map(|r| match &r.matcher {
                gp::JobMatch::Unit(u) => Some(u.clone()),
                _ => None,
            })
            .chain(
                d.exemptions
                    .iter()
                    .flat_map(|e| e.who.units.iter().cloned()),
            )
            .chain(
                d.data_dirs
                    .iter()
                    .flat_map(|dd| dd.owners.units.iter().cloned()),
            )
            .chain(d.never_hold.iter().cloned())
            .collect();
        units.sort();
        units.dedup();
        units
    }

    /// Every declared directory as written (targets with their globs, data directories,
    /// protected roots).
    pub fn declared_patterns(&self) -> Vec<String> {
        let d = &self.policy.deletion;
        let mut v: Vec<String> = d
            .targets
            .iter()
            .chain(d.rules.iter().flat_map(|r| r.targets.iter()))
            .chain(d.data_dirs.iter().map(|dd| &dd.path))
            .chain(d.protected_roots.iter())
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// The directories to watch for one declared pattern: each directory the pattern's prefix
/// resolves to (as the policy resolves it), with the component that must appear in it next, and
/// the resolved directories themselves (with nothing to appear: only their own removal matters).
fn watch_points(pattern: &str) -> Vec<(PathBuf, Option<Option<String>>)> {
    let resolver = gp::SystemResolver;
    let comps: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let mut out = Vec::new();
    for i in 0..comps.len() {
        let prefix = format!("/{}", comps[..i].join("/"));
        let next = (comps[i] != "*").then(|| comps[i].to_string());
        for (dir, _) in gp::Resolver::declared(&resolver, &prefix).found {
            out.push((dir, Some(next.clone())));
        }
    }
    for (dir, _) in gp::Resolver::declared(&resolver, pattern).found {
        out.push((dir, None));
    }
    out
}

impl Watcher {
    pub fn new(source: &PolicySource, policy: &LoadedPolicy) -> Result<Option<Self>> {
        let inotify = Inotify::init().context("inotify_init")?;
        let units = policy.unit_names();
        let mut names = Vec::new();
        let mut fixed = Vec::new();
        if !units.is_empty() {
            // Services and transient units live in system.slice; the cgroup appears before the
            // unit's first process runs (a deletion in the moment between is judged by the rule
            // the job would have without the unit: a documented race).
            let root = gp::cgroup2_root();
            for dir in [root.join("system.slice"), root.clone()] {
                if dir.is_dir()
                    && let Ok(wd) = inotify
                        .watches()
                        .add(&dir, WatchMask::CREATE | WatchMask::ONLYDIR)
                {
                    fixed.push(wd);
                }
            }
        }
        if let PolicySource::File { main, dropins } = source {
            let mask = WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM
                | WatchMask::CREATE;
            let main_dir = main.parent().unwrap_or(Path::new("/")).to_path_buf();
            fixed.push(
                inotify
                    .watches()
                    .add(&main_dir, mask)
                    .with_context(|| format!("watching {}", main_dir.display()))?,
            );
            names.push((
                main_dir,
                main.file_name().map(|n| n.to_string_lossy().into_owned()),
            ));
            if let Some(d) = dropins
                && d.is_dir()
            {
                fixed.push(
                    inotify
                        .watches()
                        .add(d, mask)
                        .with_context(|| format!("watching {}", d.display()))?,
                );
                names.push((d.clone(), None));
            }
        }
        let mut w = Watcher {
            inotify,
            names,
            units,
            fixed,
            paths: BTreeMap::new(),
            pending: None,
            last_dir_reload: None,
        };
        w.rearm(policy);
        Ok((!w.fixed.is_empty() || !w.paths.is_empty()).then_some(w))
    }

    /// Watches the declared directories of `policy` (call after every reload: identities and
    /// glob matches change), and drops the watches no longer needed.
    pub fn rearm(&mut self, policy: &LoadedPolicy) {
        self.units = policy.unit_names();
        let mut paths: BTreeMap<WatchDescriptor, PathWatch> = BTreeMap::new();
        for pattern in policy.declared_patterns() {
            for (dir, next) in watch_points(&pattern) {
                let mut mask = WatchMask::DELETE_SELF | WatchMask::MOVE_SELF | WatchMask::MASK_ADD;
                if next.is_some() {
                    mask |= WatchMask::CREATE | WatchMask::MOVED_TO;
                }
                // The same inode gives the same descriptor, so an unchanged directory keeps its
                // watch (and its queued events) across a rearm.
                let Ok(wd) = self.inotify.watches().add(&dir, mask) else {
                    continue;
                };
                let e = paths.entry(wd).or_default();
                e.dir = dir;
                if let Some(n) = next
                    && !e.next.contains(&n)
                {
                    e.next.push(n);
                }
            }
        }
        for wd in self.paths.keys() {
            if !paths.contains_key(wd) && !self.fixed.contains(wd) {
                let _ = self.inotify.watches().remove(wd.clone());
            }
        }
        self.paths = paths;
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// Drains pending events when `ready`; returns why the policy must be loaded again, if it
    /// must now. Directory changes are coalesced: at most one reload per [`DIR_RELOAD_GAP`]
    /// (call this regularly so a deferred one happens).
    pub fn changed(&mut self, ready: bool) -> Option<String> {
        let mut buf = [0u8; 4096];
        let mut relevant = false;
        while ready && let Ok(events) = self.inotify.read_events(&mut buf) {
            let mut any = false;
            for ev in events {
                any = true;
                if ev.mask.contains(EventMask::Q_OVERFLOW) {
                    self.pending
                        .get_or_insert_with(|| "inotify queue overflowed".to_string());
                    continue;
                }
                let name = ev.name.map(|n| n.to_string_lossy().into_owned());
                if let Some(pw) = self.paths.get(&ev.wd) {
                    if ev
                        .mask
                        .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                    {
                        self.pending.get_or_insert_with(|| {
                            format!(
                                // Debug-quoted: below a `*`, names are a user's choice.
                                "declared directory {:?} was removed, renamed or replaced: directory identities resolved again",
                                pw.dir.to_string_lossy()
                            )
                        });
                    } else if let Some(n) = &name
                        && ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO)
                        && pw.next.iter().any(|want| match want {
                            Some(w) => w == n,
                            None => !n.starts_with('.') && ev.mask.contains(EventMask::ISDIR),
                        })
                    {
                        self.pending.get_or_insert_with(|| {
                            format!(
                                "{:?} appeared on the way to a declared directory: directory identities resolved again",
                                pw.dir.join(n).to_string_lossy()
                            )
                        });
                    }
                }
                let Some(name) = name else {
                    continue;
                };
                relevant |= self.units.contains(&name);
                relevant |= self.names.iter().any(|(_, want)| match want {
                    Some(w) => *w == name,
                    None => name.ends_with(".toml") && !name.starts_with('.'),
                });
            }
            if !any {
                break;
            }
        }
        if relevant {
            // The reload resolves every directory again too.
            self.pending = None;
            self.last_dir_reload = Some(Instant::now());
            return Some("policy file changed, or a unit it names started".to_string());
        }
        if self.pending.is_some()
            && self
                .last_dir_reload
                .is_none_or(|t| t.elapsed() >= DIR_RELOAD_GAP)
        {
            self.last_dir_reload = Some(Instant::now());
            return self.pending.take();
        }
        None
    }
}
