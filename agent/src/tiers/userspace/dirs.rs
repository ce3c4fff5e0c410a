//! What the userspace tier knows about directories: their identity (device, inode), their
//! ancestors (walked like the kernel's `d_parent` walk, memoised per open handle) and the
//! scope a deletion in them has under a rule.
use std::{
    collections::HashMap,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    rc::Rc,
};

use guardrail_common::{DirRule, MAX_ANCESTORS, Scope, kernel_dev_from_user, scope_step};

/// A directory the deletion happened in: its path when it could be resolved, and the identities
/// of it and its ancestors on the same filesystem, nearest first (what the kernel's `d_parent`
/// walk visits).
#[derive(Clone, Debug, Default)]
pub(super) struct DirInfo {
    pub(super) path: Option<PathBuf>,
    pub(super) chain: Vec<(u64, u64)>,
}

/// A directory handle as resolved once: its place in the tree, and per rule what the nearest
/// declared ancestor says (filled as rules ask; emptied when a policy is installed).
pub(super) struct DirEntry {
    pub(super) info: Rc<DirInfo>,
    pub(super) verdicts: Vec<(u32, Scope)>,
}

/// The nearest declared ancestor's verdict for `rule` (what the kernel's walk finds).
pub(super) fn walk_scope(
    dirs: &HashMap<(u64, u64), DirRule>,
    chain: &[(u64, u64)],
    rule: u32,
) -> Scope {
    for d in chain {
        if let Some(dr) = dirs.get(d) {
            let s = scope_step(dr, rule);
            if s != Scope::Undecided {
                return s;
            }
        }
    }
    Scope::Undecided
}

pub(super) fn fstat_id(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    // SAFETY: fstat into a zeroed stat buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open; `st` is a valid out-pointer.
    (unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0)
        .then(|| (kernel_dev_from_user(st.st_dev), st.st_ino))
}

pub(super) fn kid(m: &std::fs::Metadata) -> (u64, u64) {
    (kernel_dev_from_user(m.dev()), m.ino())
}

/// The identities of `dir` and its ancestors up to its filesystem's root, nearest first.
pub(super) fn ancestor_chain(dir: &Path) -> Vec<(u64, u64)> {
    let mut chain = Vec::new();
    let mut dev = None;
    for p in dir.ancestors().take(MAX_ANCESTORS as usize) {
        let Ok(m) = std::fs::metadata(p) else { break };
        // The kernel's walk stops at the root of the deleted entry's filesystem.
        if dev.is_some_and(|d| d != m.dev()) {
            break;
        }
        dev = Some(m.dev());
        chain.push(kid(&m));
    }
    chain
}

/// A directory's file handle as `name_to_handle_at` encodes it. Unlike its inode number, which
/// the filesystem gives to a new file or directory once it is deleted, the handle names one object
/// for good: it carries the inode's generation (ext4, xfs, btrfs, tmpfs), which changes with
/// every reuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Handle {
    pub(super) handle_type: i32,
    pub(super) bytes: Vec<u8>,
}

/// The handle of the open directory `fd` (an `O_PATH` fd will do).
pub(super) fn handle_of(fd: BorrowedFd<'_>) -> Option<Handle> {
    const MAX: usize = libc::MAX_HANDLE_SZ as usize;
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; }, 4-aligned.
    let mut buf = [0u32; 2 + MAX / 4];
    buf[0] = MAX as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is an aligned `struct file_handle` with room for the MAX bytes it declares;
    // the empty path with AT_EMPTY_PATH names `fd` itself.
    let rc = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr() as *mut libc::file_handle,
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return None;
    }
    let len = (buf[0] as usize).min(MAX);
    // SAFETY: the kernel wrote `len` (at most MAX) bytes after the 8-byte header, inside `buf`.
    let bytes = unsafe { std::slice::from_raw_parts((buf.as_ptr() as *const u8).add(8), len) };
    Some(Handle {
        handle_type: buf[1] as i32,
        bytes: bytes.to_vec(),
    })
}

/// Directory identity → its ancestors (itself first), shared by every directory below it, so
/// that a new directory's walk up stops at the first ancestor already known.
///
/// Each entry is checked against the directory's file handle before it is used: an entry left
/// by a deleted directory would otherwise be found again by a *new* directory that the
/// filesystem gave the same inode number (ext4 does so at once), and that new directory would
/// inherit the deleted one's ancestors — a runaway outside a target judged as inside it after
/// a phase of deletions in the target (issue 4). A directory that is still the object the entry
/// was made for has the same ancestors (every rename of a directory empties the memo), since a
/// directory cannot be deleted while it has children.
#[derive(Default)]
pub(super) struct AncestorMemo {
    pub(super) map: HashMap<(u64, u64), MemoEntry>,
}

impl AncestorMemo {
    pub(super) fn clear(&mut self) {
        self.map.clear();
    }

    /// The identities of the open directory `fd` and its ancestors up to its filesystem's root,
    /// nearest first (what the kernel's `d_parent` walk visits): `fstat`, then `openat("..")`,
    /// until a directory whose entry is still its own.
    pub(super) fn chain_of(&mut self, fd: OwnedFd) -> Vec<(u64, u64)> {
        let mut walked: Vec<((u64, u64), Option<Handle>)> = Vec::new();
        let mut tail: Vec<(u64, u64)> = Vec::new();
        let mut cur = fd;
        let dotdot = c"..";
        while walked.len() < MAX_ANCESTORS as usize {
            let Some(id) = fstat_id(cur.as_fd()) else {
                break;
            };
            // The root is its own parent; another device is another filesystem.
            if walked.last().is_some_and(|(l, _)| *l == id || l.0 != id.0) {
                break;
            }
            let handle = handle_of(cur.as_fd());
            if let Some(e) = self.map.get(&id) {
                if handle.as_ref() == Some(&e.handle) {
                    tail = e.chain.clone();
                    break;
                }
                // A deleted directory's inode number, now another directory's.
                self.map.remove(&id);
            }
            walked.push((id, handle));
            // SAFETY: `cur` is an open directory fd, `dotdot` a NUL-terminated name.
            let up = unsafe {
                libc::openat(
                    cur.as_raw_fd(),
                    dotdot.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if up < 0 {
                break;
            }
            // SAFETY: a fresh fd owned by nobody else.
            cur = unsafe { OwnedFd::from_raw_fd(up) };
        }
        let mut chain: Vec<(u64, u64)> = walked.iter().map(|(id, _)| *id).collect();
        chain.extend(tail);
        chain.truncate(MAX_ANCESTORS as usize);
        if self.map.len() > ANCESTOR_MEMO_MAX {
            self.map.clear();
        }
        for (i, (id, handle)) in walked.into_iter().enumerate().take(chain.len()) {
            // Without a handle an entry could not be checked: such a directory is walked again.
            if let Some(handle) = handle {
                self.map.insert(
                    id,
                    MemoEntry {
                        handle,
                        chain: chain[i..].to_vec(),
                    },
                );
            }
        }
        chain
    }
}

pub(super) struct MemoEntry {
    pub(super) handle: Handle,
    pub(super) chain: Vec<(u64, u64)>,
}

/// Memoised directories at most (a filesystem-wide mark sees every directory on the host).
pub(super) const ANCESTOR_MEMO_MAX: usize = 65536;

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh private scratch directory of this test under /var/tmp (a disk filesystem, for
    /// its inode reuse), removed when dropped.
    pub(super) fn scratch(what: &str) -> crate::host::scratch::ScratchDir {
        crate::host::scratch::ScratchDir::in_parent(Path::new("/var/tmp"), &format!("unit-{what}"))
            .expect("mkdir scratch")
    }

    pub(super) fn chain_via_memo(memo: &mut AncestorMemo, dir: &Path) -> Vec<(u64, u64)> {
        let fd: OwnedFd = std::fs::File::open(dir).expect("open dir").into();
        memo.chain_of(fd)
    }

    #[test]
    pub(super) fn a_new_directory_never_inherits_a_deleted_directorys_ancestors() {
        let s = scratch("memo");
        let deep = s.path().join("target").join("build").join("d00");
        std::fs::create_dir_all(&deep).expect("mkdir");
        let mut memo = AncestorMemo::default();
        assert_eq!(chain_via_memo(&mut memo, &deep), ancestor_chain(&deep));
        let deleted: Vec<u64> = [deep.clone(), deep.parent().expect("build").to_path_buf()]
            .iter()
            .map(|p| std::fs::metadata(p).expect("stat").ino())
            .collect();
        std::fs::remove_dir(&deep).expect("rmdir d00");
        std::fs::remove_dir(deep.parent().expect("build")).expect("rmdir build");
        // New directories outside the target until one gets a deleted one's inode number (ext4
        // hands them out again at once); each is judged by where it is.
        let mut reused = false;
        for n in 0..64 {
            let fresh = s.path().join(format!("victim{n:02}"));
            std::fs::create_dir(&fresh).expect("mkdir victim");
            assert_eq!(
                chain_via_memo(&mut memo, &fresh),
                ancestor_chain(&fresh),
                "{} judged by its own ancestors",
                fresh.display()
            );
            if deleted.contains(&std::fs::metadata(&fresh).expect("stat").ino()) {
                reused = true;
                break;
            }
        }
        eprintln!("a deleted directory's inode number was given to a new one: {reused}");
        // A directory that is still itself keeps its entry.
        let target = s.path().join("target");
        let before = memo.map.len();
        assert_eq!(chain_via_memo(&mut memo, &target), ancestor_chain(&target));
        assert_eq!(
            memo.map.len(),
            before,
            "a valid entry is used, not walked again"
        );
    }
}
