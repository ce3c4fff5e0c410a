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
    /// `path` with every symlink resolved (realpath), if it exists: which program a name like
    /// `/sbin/reboot` really runs. In-memory hosts have no symlinks: the path itself.
    fn canonical(&self, path: &Path) -> Option<PathBuf> {
        self.identity(path).map(|_| path.to_path_buf())
    }
    /// Expand a documented glob (`*` as a whole component) into existing paths.
    fn glob(&self, pattern: &str) -> Vec<PathBuf>;
    /// Mount points of other filesystems (from /proc/self/mountinfo), for protect_mount_points
    /// and for extending a declared directory to the roots of filesystems mounted below it.
    fn mount_points(&self) -> Vec<PathBuf>;
    /// Uid of a user name (a numeric string is taken as the uid itself by callers).
    fn uid(&self, user: &str) -> Option<u32>;
    /// cgroup v2 id (inode of the cgroup dir under /sys/fs/cgroup) of a unit name or cgroup
    /// path; None if not running. A unit name is only looked up among system units (see
    /// [`find_system_unit`]), never in a tree a user created or was delegated.
    fn cgroup_id(&self, unit_or_cgroup: &str) -> Option<u64>;
    /// The directories a declared path (target, data directory, protected root; `*` components
    /// in targets) stands for on this host, and what was left out and why. Unlike
    /// [`Resolver::identity`], this must not let a user redirect the path: see
    /// [`SystemResolver`]. The default (for in-memory hosts, which have no symlinks or owners)
    /// is [`Resolver::glob`] for patterns and [`Resolver::identity`] for paths.
    fn declared(&self, pattern: &str) -> Declared {
        let paths = if components(pattern).any(|c| c == "*") {
            self.glob(pattern)
        } else {
            vec![normalize(Path::new(pattern))]
        };
        Declared {
            found: paths
                .into_iter()
                .filter_map(|p| self.identity(&p).map(|id| (p, id)))
                .collect(),
            skipped: Vec::new(),
        }
    }
}

/// What a declared path resolved to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Declared {
    /// Real paths (no symlink in them but trusted ones, see [`SystemResolver`]) and their
    /// identities (st_dev as userspace sees it, st_ino).
    pub found: Vec<(PathBuf, (u64, u64))>,
    /// Matches or paths left out, each with the reason (for a warning).
    pub skipped: Vec<Skipped>,
}

/// A path a declared directory was not resolved to, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// The real host: `stat(2)`, directory listings, `/proc/self/mountinfo`, `/etc/passwd` and
/// `/sys/fs/cgroup`.
///
/// Users are looked up in `/etc/passwd` only (no NSS): a directory-service user can be named by
/// its numeric uid instead.
///
/// Declared directories ([`Resolver::declared`]) are resolved one component at a time with
/// `lstat`, because the agent runs as root and every user can plant a symlink in their own
/// directories (`~/.cache -> /` would otherwise make the whole root filesystem a target):
/// - a symlink matched by a `*`, or met anywhere below one, is skipped;
/// - a symlink written literally (before any `*`) in the path is followed only when the link and the directory it
///   sits in are owned by root and the directory is not group- or world-writable (Debian's
///   `/var/run -> /run`, merged-/usr `/bin -> usr/bin`); its target is resolved by the same
///   rules;
/// - a glob match must be a directory owned by root or by the user whose directory the first `*`
///   matched: the user of that name in `/etc/passwd`, or the owner of that directory when its
///   parent is root's and not group- or world-writable (so only root could have made it, as
///   `/home/<name>`).
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

    fn canonical(&self, path: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(path).ok()
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
        find_system_unit(root, unit_or_cgroup)
            .and_then(|p| std::fs::symlink_metadata(p).ok())
            .map(|m| m.ino())
    }

    fn declared(&self, pattern: &str) -> Declared {
        let mut out = Declared::default();
        let rest: Vec<String> = components(pattern).map(str::to_string).collect();
        let mut work = vec![Walk {
            dir: PathBuf::from("/"),
            rest,
            star: None,
            hops: 0,
        }];
        while let Some(w) = work.pop() {
            self.step(w, &mut work, &mut out);
        }
        out.found.sort();
        out.found.dedup();
        out.skipped.sort_by(|a, b| a.path.cmp(&b.path));
        out.skipped.dedup();
        out
    }
}

/// Whether the cgroup directory `p` was made by root: its parent is root's. A user can create
/// cgroups only inside a subtree delegated to it (`user@UID.service`, a `Delegate=yes` unit with
/// `User=`), whose directories it owns; an absolute cgroup path of the policy that points into such
/// a subtree must not give the user's cgroups its rule (units match by ancestor too).
fn made_by_root(p: &Path) -> bool {
    p.parent()
        .and_then(|parent| std::fs::metadata(parent).ok())
        .is_some_and(|m| m.uid() == 0)
}

/// Cgroup trees systemd delegates to users or containers: a unit name found there is somebody's
/// own cgroup, not the system unit.
const UNTRUSTED_SLICES: &[&str] = &["user.slice", "machine.slice"];

/// The cgroup of system unit `unit` below the cgroup2 mount `root`, if it runs.
///
/// Only cgroups only root can create are looked at: `system.slice/<unit>` first, then `<unit>`
/// directly below the root (`init.scope`) or in a `*.slice` reached from the root through
/// `*.slice` directories only (`system.slice/system-getty.slice/getty@tty1.service`, a unit with
/// `Slice=backup.slice`), at most 4 levels deep, every directory on the way owned by root.
/// `user.slice` and `machine.slice` are never entered: user managers (`user@UID.service`,
/// `systemd-run --user`) and containers get their trees delegated there, so a user could name a
/// cgroup `ssh.service`. A service's own delegated subtree is never entered either: it is not a
/// slice.
pub fn find_system_unit(root: &Path, unit: &str) -> Option<PathBuf> {
    let owned_dir =
        |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.uid() == 0);
    if unit.is_empty() || unit.contains('/') || unit.starts_with('.') {
        return None;
    }
    let direct = root.join("system.slice").join(unit);
    if owned_dir(&root.join("system.slice")) && owned_dir(&direct) {
        return Some(direct);
    }
    let mut level = vec![root.to_path_buf()];
    for _ in 0..4 {
        let mut next = Vec::new();
        for dir in &level {
            let candidate = dir.join(unit);
            if owned_dir(&candidate) {
                return Some(candidate);
            }
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut slices: Vec<PathBuf> = rd
                .filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.ends_with(".slice") && !UNTRUSTED_SLICES.contains(&n.as_ref())
                })
                .map(|e| e.path())
                .filter(|p| owned_dir(p))
                .collect();
            slices.sort();
            next.extend(slices);
        }
        level = next;
    }
    None
}

/// One partial resolution of a declared path: `dir` is a real directory reached so far, `rest`
/// the components still to resolve.
struct Walk {
    dir: PathBuf,
    rest: Vec<String>,
    /// Where the first `*` matched: (its parent directory, the name it matched).
    star: Option<(PathBuf, String)>,
    /// Symlinks followed so far (a loop ends at 16, like a bounded ELOOP).
    hops: u32,
}

impl SystemResolver {
    /// Resolves the next component of `w`, pushing what remains to `work`.
    fn step(&self, w: Walk, work: &mut Vec<Walk>, out: &mut Declared) {
        let Some((comp, rest)) = w.rest.split_first() else {
            self.finish(w, out);
            return;
        };
        if comp == ".." {
            // Only from a followed symlink's target: `dir` holds no symlink, so `..` is lexical.
            let dir = w
                .dir
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or(w.dir.clone());
            work.push(Walk {
                dir,
                rest: rest.to_vec(),
                ..w
            });
            return;
        }
        if comp == "." {
            work.push(Walk {
                rest: rest.to_vec(),
                ..w
            });
            return;
        }
        if comp == "*" {
            let Ok(rd) = std::fs::read_dir(&w.dir) else {
                return;
            };
            let mut names: Vec<String> = rd
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect();
            // Reverse so that the stack pops them in name order.
            names.sort();
            for name in names.into_iter().rev() {
                let p = w.dir.join(&name);
                let Ok(m) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                if m.file_type().is_symlink() {
                    out.skipped.push(Skipped {
                        path: p,
                        reason: "is a symlink: a glob never follows one".to_string(),
                    });
                    continue;
                }
                if !m.is_dir() {
                    // Only directories hold deletions; files in a globbed directory are noise.
                    continue;
                }
                let star = w.star.clone().or(Some((w.dir.clone(), name)));
                work.push(Walk {
                    dir: p,
                    rest: rest.to_vec(),
                    star,
                    hops: w.hops,
                });
            }
            return;
        }
        let p = w.dir.join(comp);
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            return;
        };
        if !m.file_type().is_symlink() {
            if rest.is_empty() || m.is_dir() {
                work.push(Walk {
                    dir: p,
                    rest: rest.to_vec(),
                    ..w
                });
            }
            return;
        }
        if w.star.is_some() {
            // Below a `*` the path is whatever the matched directory's owner made it.
            out.skipped.push(Skipped {
                path: p,
                reason: "is a symlink: a glob match never goes through one".to_string(),
            });
            return;
        }
        let parent_ok =
            std::fs::symlink_metadata(&w.dir).is_ok_and(|d| d.uid() == 0 && d.mode() & 0o022 == 0);
        if m.uid() != 0 || !parent_ok {
            out.skipped.push(Skipped {
                path: p,
                reason: format!(
                    "is a symlink that root does not control (link owned by uid {}, in {}): declared paths follow only root's symlinks in directories only root can write",
                    m.uid(),
                    w.dir.display()
                ),
            });
            return;
        }
        if w.hops >= 16 {
            out.skipped.push(Skipped {
                path: p,
                reason: "too many levels of symlinks".to_string(),
            });
            return;
        }
        let Ok(target) = std::fs::read_link(&p) else {
            return;
        };
        let t = target.to_string_lossy();
        let (dir, mut comps) = if t.starts_with('/') {
            (PathBuf::from("/"), Vec::new())
        } else {
            (w.dir.clone(), Vec::new())
        };
        comps.extend(components(&t).map(str::to_string));
        comps.extend(rest.iter().cloned());
        work.push(Walk {
            dir,
            rest: comps,
            star: w.star,
            hops: w.hops + 1,
        });
    }

    /// A fully resolved path: a glob match must belong to root or to the matched user.
    fn finish(&self, w: Walk, out: &mut Declared) {
        let Ok(m) = std::fs::symlink_metadata(&w.dir) else {
            return;
        };
        if let Some((parent, name)) = &w.star {
            let owner = m.uid();
            let user_uid = self.uid(name);
            let home_owner = std::fs::symlink_metadata(parent)
                .ok()
                .filter(|pm| pm.uid() == 0 && pm.mode() & 0o022 == 0)
                .and_then(|_| std::fs::symlink_metadata(parent.join(name)).ok())
                .map(|hm| hm.uid());
            if owner != 0 && Some(owner) != user_uid && Some(owner) != home_owner {
                out.skipped.push(Skipped {
                    path: w.dir,
                    reason: format!(
                        "is owned by uid {owner}, neither root nor the user {name:?} whose directory the glob matched"
                    ),
                });
                return;
            }
        }
        out.found.push((w.dir, (m.dev(), m.ino())));
    }
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

/// Identities (st_dev as userspace sees it, st_ino) a target must never have, each with the
/// kept directory it would swallow: `/`, and every directory in `kept` (protected roots, data
/// directories) with all its ancestors. A target there frees everything around the kept
/// directory; in the kernel's walk from inside it, the kept directory's own entry still wins, but
/// not in the tracepoint tier's approximations.
pub fn too_wide_for_targets<'a>(
    resolver: &dyn Resolver,
    kept: impl Iterator<Item = &'a Path>,
) -> BTreeMap<(u64, u64), PathBuf> {
    let mut out = BTreeMap::new();
    for k in std::iter::once(Path::new("/")).chain(kept) {
        for (real, _) in resolver.declared(&k.to_string_lossy()).found {
            for a in std::iter::once(real.clone()).chain(ancestors(&real)) {
                if let Some(id) = resolver.identity(&a) {
                    out.entry(id).or_insert_with(|| real.clone());
                }
            }
        }
    }
    out
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
