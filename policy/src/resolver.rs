//! How the policy meets the host: identities of paths, globs, mount points, users and cgroups.
//!
//! [`compile`](crate::compile), [`explain`](crate::explain) and the path warnings of
//! [`check_files`](crate::check_files) only see the host through [`Resolver`], so they are pure
//! and testable with [`MemResolver`].

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// The host facts a policy needs.
pub trait Resolver {
    /// Identity of the directory or file at `path`, following symlinks (stat): (st_dev as
    /// userspace sees it, st_ino); None if absent.
    fn identity(&self, path: &Path) -> Option<(u64, u64)>;
    /// Expand a documented glob (`*` as a whole component) into existing paths.
    fn glob(&self, pattern: &str) -> Vec<PathBuf>;
    /// Mount points of other filesystems (from /proc/self/mountinfo), for protect_mount_points
    /// and for extending a declared directory to the roots of filesystems mounted below it.
    fn mount_points(&self) -> Vec<PathBuf>;
    /// Uid of a user name (a numeric string is taken as the uid itself by callers).
    fn uid(&self, user: &str) -> Option<u32>;
    /// cgroup v2 id (inode of the cgroup dir under /sys/fs/cgroup) of a unit name or cgroup
    /// path; None if not running.
    fn cgroup_id(&self, unit_or_cgroup: &str) -> Option<u64>;
}

/// The real host: `stat(2)`, directory listings, `/proc/self/mountinfo`, `/etc/passwd` and
/// `/sys/fs/cgroup`.
///
/// Users are looked up in `/etc/passwd` only (no NSS): a directory-service user can be named by
/// its numeric uid instead.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

/// Where cgroup v2 is mounted: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a
/// hybrid one (the BPF helper `bpf_get_current_cgroup_id` always speaks of the v2 hierarchy).
pub fn cgroup2_root() -> PathBuf {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| cgroup2_mount(&text))
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

/// The mount point of the first cgroup2 filesystem in a mountinfo text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? == "cgroup2" {
            Some(PathBuf::from(left.split_whitespace().nth(4)?))
        } else {
            None
        }
    })
}

impl Resolver for SystemResolver {
    fn identity(&self, path: &Path) -> Option<(u64, u64)> {
        let m = std::fs::metadata(path).ok()?;
        Some((m.dev(), m.ino()))
    }

    fn glob(&self, pattern: &str) -> Vec<PathBuf> {
        let mut current = vec![PathBuf::from("/")];
        for comp in components(pattern) {
            let mut next = Vec::new();
            for dir in &current {
                if comp == "*" {
                    let Ok(rd) = std::fs::read_dir(dir) else {
                        continue;
                    };
                    let mut names: Vec<PathBuf> = rd
                        .filter_map(Result::ok)
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .map(|e| e.path())
                        .collect();
                    names.sort();
                    next.extend(names);
                } else {
                    let p = dir.join(comp);
                    if std::fs::symlink_metadata(&p).is_ok() {
                        next.push(p);
                    }
                }
            }
            current = next;
        }
        current.retain(|p| p.exists());
        current
    }

    fn mount_points(&self) -> Vec<PathBuf> {
        let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return Vec::new();
        };
        parse_mountinfo(&text)
    }

    fn uid(&self, user: &str) -> Option<u32> {
        let text = std::fs::read_to_string("/etc/passwd").ok()?;
        parse_passwd(&text, user)
    }

    fn cgroup_id(&self, unit_or_cgroup: &str) -> Option<u64> {
        let root_buf = cgroup2_root();
        let root = root_buf.as_path();
        if unit_or_cgroup.starts_with('/') {
            let p = root.join(unit_or_cgroup.trim_start_matches('/'));
            return made_by_root(&p)
                .then(|| std::fs::metadata(p).ok())
                .flatten()
                .filter(|m| m.is_dir())
                .map(|m| m.ino());
        }
        // Services usually sit in system.slice; scopes and user services deeper.
        let direct = root.join("system.slice").join(unit_or_cgroup);
        if made_by_root(&direct)
            && let Ok(m) = std::fs::metadata(&direct)
        {
            return Some(m.ino());
        }
        find_dir_named(root, unit_or_cgroup, 4)
            .filter(|p| made_by_root(p))
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.ino())
    }
}

/// Whether the cgroup directory `p` was made by root: its parent is root's. A user can create
/// cgroups only inside a subtree delegated to it (`user@UID.service`, a `Delegate=yes` unit with
/// `User=`), whose directories it owns; a cgroup it names like a unit the policy knows (say
/// `sshd.service`, on a host where that unit is not running) must not take that unit's rule or its
/// never_hold, for itself and, as units match by ancestor, every cgroup below it.
fn made_by_root(p: &Path) -> bool {
    p.parent()
        .and_then(|parent| std::fs::metadata(parent).ok())
        .is_some_and(|m| m.uid() == 0)
}

fn find_dir_named(dir: &Path, name: &str, depth: u32) -> Option<PathBuf> {
    if depth == 0 {
        return None;
    }
    let mut subdirs = Vec::new();
    for e in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if e.file_name() == name {
            return Some(e.path());
        }
        subdirs.push(e.path());
    }
    subdirs.sort();
    subdirs
        .into_iter()
        .find_map(|d| find_dir_named(&d, name, depth - 1))
}

/// Mount points (field 5) of `/proc/self/mountinfo`, unescaped, without `/`, deduplicated,
/// shallowest first.
pub fn parse_mountinfo(text: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_octal)
        .filter(|p| p != "/")
        .map(PathBuf::from)
        .collect();
    v.sort_by_key(|p| (p.components().count(), p.clone()));
    v.dedup();
    v
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Uid of `user` in a passwd(5) text.
pub fn parse_passwd(text: &str, user: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == user).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// An in-memory host for tests and for `explain` against a recorded host.
#[derive(Clone, Debug, Default)]
pub struct MemResolver {
    pub paths: BTreeMap<PathBuf, (u64, u64)>,
    pub mounts: Vec<PathBuf>,
    pub users: BTreeMap<String, u32>,
    pub cgroups: BTreeMap<String, u64>,
}

impl MemResolver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `path` and every missing ancestor, all on `dev`, with fresh inode numbers.
    pub fn with_tree(mut self, dev: u64, paths: &[&str]) -> Self {
        for p in paths {
            let mut acc = PathBuf::from("/");
            self.add_once(&acc, dev);
            for c in components(p) {
                acc.push(c);
                self.add_once(&acc, dev);
            }
        }
        self
    }

    fn add_once(&mut self, p: &Path, dev: u64) {
        if !self.paths.contains_key(p) {
            let ino = self.paths.len() as u64 + 2;
            self.paths.insert(p.to_path_buf(), (dev, ino));
        }
    }

    /// Sets the identity of one path.
    pub fn with_path(mut self, path: &str, dev: u64, ino: u64) -> Self {
        self.paths.insert(PathBuf::from(path), (dev, ino));
        self
    }

    /// Declares `path` a mount point of a filesystem on `dev` whose root inode is `root_ino`;
    /// paths already known below it are moved onto `dev`.
    pub fn with_mount(mut self, path: &str, dev: u64, root_ino: u64) -> Self {
        let mp = PathBuf::from(path);
        let below: Vec<PathBuf> = self
            .paths
            .keys()
            .filter(|p| p.starts_with(&mp) && **p != mp)
            .cloned()
            .collect();
        for (i, p) in below.into_iter().enumerate() {
            self.paths.insert(p, (dev, root_ino + 1 + i as u64));
        }
        self.paths.insert(mp.clone(), (dev, root_ino));
        self.mounts.push(mp);
        self
    }

    pub fn with_user(mut self, name: &str, uid: u32) -> Self {
        self.users.insert(name.to_string(), uid);
        self
    }

    pub fn with_cgroup(mut self, unit_or_cgroup: &str, id: u64) -> Self {
        self.cgroups.insert(unit_or_cgroup.to_string(), id);
        self
    }
}

impl Resolver for MemResolver {
    fn identity(&self, path: &Path) -> Option<(u64, u64)> {
        self.paths.get(&normalize(path)).copied()
    }

    fn glob(&self, pattern: &str) -> Vec<PathBuf> {
        self.paths
            .keys()
            .filter(|p| glob_matches(pattern, p))
            .cloned()
            .collect()
    }

    fn mount_points(&self) -> Vec<PathBuf> {
        self.mounts.clone()
    }

    fn uid(&self, user: &str) -> Option<u32> {
        self.users.get(user).copied()
    }

    fn cgroup_id(&self, unit_or_cgroup: &str) -> Option<u64> {
        self.cgroups.get(unit_or_cgroup).copied()
    }
}

// --- path helpers ------------------------------------------------------------------------------

/// The normal components of a path string (no root, no empty components).
pub(crate) fn components(p: &str) -> impl Iterator<Item = &str> {
    p.split('/').filter(|c| !c.is_empty())
}

/// `/a//b/` → `/a/b`, lexically (no `..` handling: policy paths with `..` are rejected).
pub(crate) fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        if let Component::Normal(n) = c {
            out.push(n);
        }
    }
    out
}

/// Whether `path` matches `pattern`, where a `*` component matches any one component.
pub fn glob_matches(pattern: &str, path: &Path) -> bool {
    let pc: Vec<&str> = components(pattern).collect();
    let Some(s) = path.to_str() else { return false };
    let xc: Vec<&str> = components(s).collect();
    pc.len() == xc.len() && pc.iter().zip(&xc).all(|(p, x)| *p == "*" || p == x)
}

/// Whether `pattern` (with `*` components) names `path` or one of its ancestors.
pub(crate) fn pattern_covers(pattern: &str, path: &str) -> bool {
    let pc: Vec<&str> = components(pattern).collect();
    let xc: Vec<&str> = components(path).collect();
    pc.len() <= xc.len() && pc.iter().zip(&xc).all(|(p, x)| *p == "*" || p == x)
}

/// `path`'s lexical ancestors, nearest first, ending with `/`.
pub fn ancestors(path: &Path) -> Vec<PathBuf> {
    let n = normalize(path);
    n.ancestors().skip(1).map(Path::to_path_buf).collect()
}

#[cfg(test)]
mod cgroup_tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory\n\
                      40 25 0:35 / /sys/fs/cgroup/unified rw,relatime shared:19 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount("22 1 0:5 / /proc rw - proc proc rw\n"), None);
    }
}
