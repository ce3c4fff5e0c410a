//! Where the policy comes from (the embedded default or /etc/guardrail), how it is turned into
//! the kernel's tables, and how the agent notices that an admin edited it.
use std::{
    ffi::OsStr,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use guardrail_policy as gp;
use inotify::{Inotify, WatchMask};

use crate::sensor::KernelPolicy;

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

/// A validated policy and its kernel tables.
#[derive(Debug, Clone)]
pub struct LoadedPolicy {
    pub policy: gp::Policy,
    pub compiled: gp::Compiled,
    pub kernel: KernelPolicy,
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
    Ok(LoadedPolicy {
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
        exes: c.exes.clone(),
        cgroups: c.cgroups.clone(),
        uids: c.uids.clone(),
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
pub struct Watcher {
    inotify: Inotify,
    names: Vec<(PathBuf, Option<String>)>,
    /// Units the policy names: a rule matched by unit applies through the unit's cgroup id,
    /// which exists only while the unit runs, so the policy is compiled again when one starts.
    units: Vec<String>,
}

impl LoadedPolicy {
    /// Every systemd unit the policy names (job rules, exemptions, data directory owners).
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
            .collect();
        units.sort();
        units.dedup();
        units
    }
}

impl Watcher {
    pub fn new(source: &PolicySource, units: Vec<String>) -> Result<Option<Self>> {
        let inotify = Inotify::init().context("inotify_init")?;
        let mut names = Vec::new();
        if !units.is_empty() {
            // Services and transient units live in system.slice; the cgroup appears before the
            // unit's first process runs (a deletion in the moment between is judged by the rule
            // the job would have without the unit: a documented race).
            let root = gp::cgroup2_root();
            for dir in [root.join("system.slice"), root.clone()] {
                if dir.is_dir() {
                    let _ = inotify
                        .watches()
                        .add(&dir, WatchMask::CREATE | WatchMask::ONLYDIR);
                }
            }
        }
        let PolicySource::File { main, dropins } = source else {
            return Ok(if units.is_empty() {
                None
            } else {
                Some(Watcher {
                    inotify,
                    names,
                    units,
                })
            });
        };
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::CREATE;
        let main_dir = main.parent().unwrap_or(Path::new("/")).to_path_buf();
        inotify
            .watches()
            .add(&main_dir, mask)
            .with_context(|| format!("watching {}", main_dir.display()))?;
        names.push((
            main_dir,
            main.file_name().map(|n| n.to_string_lossy().into_owned()),
        ));
        if let Some(d) = dropins
            && d.is_dir()
        {
            inotify
                .watches()
                .add(d, mask)
                .with_context(|| format!("watching {}", d.display()))?;
            names.push((d.clone(), None));
        }
        Ok(Some(Watcher {
            inotify,
            names,
            units,
        }))
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// Drains pending events; true if one concerns the policy.
    pub fn changed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let mut relevant = false;
        while let Ok(events) = self.inotify.read_events(&mut buf) {
            let mut any = false;
            for ev in events {
                any = true;
                let Some(name) = ev.name.map(|n| n.to_string_lossy().into_owned()) else {
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
        relevant
    }
}
