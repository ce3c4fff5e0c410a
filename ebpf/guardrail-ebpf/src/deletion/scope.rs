//! What is never a deletion to count: the host's own machinery (PID 1, kernel threads) and kernel
//! objects of pseudo filesystems; and whether an entry is a protected root.
use aya_ebpf::helpers::bpf_probe_read_user_str_bytes;
use guardrail_common::*;

use super::{
    Deletion,
    maps::{DIRS, PATHBUF, config},
};
use crate::kernel::{
    fs::dentry_identity,
    offsets::{fs_offsets, kptr, kread},
    task::{PF_KTHREAD, current_task},
};

/// PID 1 and kernel threads (kdevtmpfs, nfsd, kworkers) are the host's own machinery: they are
/// never counted, stopped or refused (but a protected root is still refused, per operation). The
/// tgid is the initial namespace's, so a container's init is not PID 1 here; PF_KTHREAD cannot be
/// set by userspace. An unreadable flags word counts as a user task.
#[inline(always)]
pub(crate) fn host_machinery(o: &KernelOffsets, tgid: u32) -> bool {
    if tgid == 1 {
        return true;
    }
    let flags: u32 = kread(current_task(), o.task_flags).unwrap_or(0);
    flags & PF_KTHREAD != 0
}

/// Whether `dir` (a directory dentry) is on a pseudo filesystem whose entries are kernel objects
/// (an empty cgroup, a sysfs or configfs object, a bpffs pin, a devtmpfs node): removing them is
/// not a deletion of data. Unknown (null, unreadable) is not a pseudo filesystem.
#[inline(always)]
pub(crate) fn on_pseudo_fs(o: &KernelOffsets, dir: *const u8) -> bool {
    let f = fs_offsets();
    if f.valid == 0 || dir.is_null() {
        return false;
    }
    let Ok(inode) = kptr(dir, o.dentry_d_inode) else {
        return false;
    };
    let Ok(sb) = kptr(inode, o.inode_i_sb) else {
        return false;
    };
    let Ok(magic) = kread::<u64>(sb, f.sb_s_magic) else {
        return false;
    };
    if is_pseudo_fs_magic(magic) {
        return true;
    }
    if magic != TMPFS_MAGIC && magic != RAMFS_MAGIC {
        return false;
    }
    let Ok(ty) = kptr(sb, f.sb_s_type) else {
        return false;
    };
    let Ok(name) = kptr(ty, f.fstype_name) else {
        return false;
    };
    // "devtmpfs" and its NUL, read as one little-endian word and a byte.
    let word: u64 = kread(name, 0).unwrap_or(0);
    let nul: u8 = kread(name, 8).unwrap_or(1);
    word == u64::from_le_bytes(*b"devtmpfs") && nul == 0
}

/// Whether this deletion removes a kernel object of a pseudo filesystem (see [`on_pseudo_fs`]).
/// LSM: the directory the entry is in, exact. Tracepoint tier: the directory the syscall starts
/// from (cwd or dirfd), trusted only for a path of one component: a longer path can leave that
/// filesystem (`..`, or /proc's magic links such as `self/root/...`), and an absolute path starts
/// from the root, whose filesystem tells nothing; both are judged as usual. io_uring requests in
/// the tracepoint tier have no known directory and always count.
#[inline(always)]
pub(crate) fn pseudo_fs_deletion(o: &KernelOffsets, d: &Deletion) -> bool {
    if !d.entry.is_null() {
        let dir = if d.parent.is_null() {
            d.entry
        } else {
            d.parent
        };
        return on_pseudo_fs(o, dir);
    }
    if d.user_path.is_null() || !on_pseudo_fs(o, d.parent) {
        return false;
    }
    let Some(buf) = PATHBUF.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: `buf` is this CPU's scratch value; user memory is read with fault handling.
    let Ok(path) = (unsafe { bpf_probe_read_user_str_bytes(d.user_path, &mut *buf) }) else {
        return false;
    };
    // A path that filled the buffer may go on past it: not known to be one component.
    if path.len() >= 255 {
        return false;
    }
    let mut i = 0usize;
    while i < 256 {
        // SAFETY: as above; the index is bounded by the array.
        let c = unsafe { (*buf)[i] };
        if c == 0 {
            return i > 0;
        }
        if c == b'/' {
            return false;
        }
        i += 1;
    }
    false
}

#[inline(always)]
pub(crate) fn is_protected_entry(o: &KernelOffsets, dentry: *const u8) -> bool {
    let Some(cfg) = config() else { return false };
    let Ok((dev, ino)) = dentry_identity(o, dentry) else {
        return false;
    };
    // SAFETY: map value pointer valid for this run.
    match unsafe {
        DIRS.get(&DirKey {
            dev,
            ino,
            slot: cfg.active_slot & 1,
            _pad: 0,
        })
    } {
        Some(r) => r.kind & DIR_PROTECTED_ROOT != 0,
        None => false,
    }
}
