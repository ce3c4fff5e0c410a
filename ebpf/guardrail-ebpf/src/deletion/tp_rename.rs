//! The `tracepoint` tier's rename programs: a rename is remembered at `sys_enter_rename*` and
//! judged at `sys_exit_rename*` once it has succeeded. Moving an entry to another directory is
//! deleting it where it was (the source's scope decides, as for unlink); a rename within one
//! directory is not, though it may replace the destination.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user_str_bytes},
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
};
use guardrail_common::{EVF_TRACEPOINT, OP_RENAME};

use super::{
    DF_SCOPE_ONLY, Deletion, Verdict,
    judge::{job_total, judge},
    tracepoint::{AT_FDCWD, base_dentry, sys_arg, tp_stop_foreign},
};
use crate::kernel::offsets::offsets;

/// `renameat2` flags: the destination must not exist / the two entries swap places. Either way
/// nothing at the destination is destroyed.
pub(crate) const RENAME_NOREPLACE: u64 = 1;
pub(crate) const RENAME_EXCHANGE: u64 = 2;

/// A rename seen at `sys_enter_rename*`, judged at `sys_exit_rename*` once it has succeeded:
/// `mv` tries `renameat2(.., "dir/", RENAME_NOREPLACE)` first and fails (EEXIST) before the call
/// that moves the file, and a failed rename deletes nothing, so only the one that worked counts.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct PendingRename {
    pub(crate) old_dfd: i64,
    pub(crate) old_path: u64,
    pub(crate) new_dfd: i64,
    pub(crate) new_path: u64,
    pub(crate) flags: u64,
    /// Both paths name entries of one directory (see [`same_dir`]), decided at entry, from the
    /// strings the kernel is about to read.
    pub(crate) same_dir: u64,
}

/// Renames in flight, by thread id. A plain hash (no eviction): a rename that finds no room is
/// judged at entry instead, as a move (fail safe).
#[map]
pub(crate) static RENAMES: HashMap<u32, PendingRename> = HashMap::with_max_entries(8192, 0);

/// Scratch space for a rename's entry in `RENAMES`.
#[map]
pub(crate) static RENAME_INIT: PerCpuArray<PendingRename> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for the two path strings of a rename (too big for the BPF stack).
#[map]
pub(crate) static RENAME_PATHS: PerCpuArray<[[u8; 256]; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Whether the NUL-terminated path in `buf` is a bare name (no '/', not empty).
#[inline(always)]
fn bare_name(buf: &[u8; 256]) -> bool {
    let mut i = 0usize;
    while i < 255 {
        // SAFETY: `i < 255` (read unchecked: a bounds-check panic path is no valid BPF).
        let c = unsafe { *buf.get_unchecked(i) };
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

/// Whether a rename's two paths name entries of one directory: both are bare names (no '/')
/// starting from the same directory (the same dirfd, or the cwd, or two dirfds of one dentry).
/// Such a rename (`mv a b`, an editor's save-by-rename in its directory) leaves nothing
/// elsewhere: its source is not a deletion. Anything else (a path with a '/', even `d/a` against
/// `d/b`, which logrotate's absolute paths are; a path too long for the buffer; unreadable
/// memory; dirfds naming different directories) is a move, and its source is judged (fail safe:
/// at worst it counts). A leaf of the entry program, never under `judge`.
///
/// Deliberately simple for the verifier: comparing directory parts byte by byte (a common prefix,
/// then no '/') made 6.18's verifier walk past its million instructions.
#[inline(never)]
pub(crate) fn same_dir(old_dfd: i64, old: *const u8, new_dfd: i64, new: *const u8) -> bool {
    let Some(buf) = RENAME_PATHS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch value, valid for this run; user memory is read with fault
    // handling.
    let (a, b) = unsafe { (&mut (*buf)[0], &mut (*buf)[1]) };
    // SAFETY: as above.
    if unsafe { bpf_probe_read_user_str_bytes(old, a) }.is_err()
        || unsafe { bpf_probe_read_user_str_bytes(new, b) }.is_err()
    {
        return false;
    }
    if !bare_name(a) || !bare_name(b) {
        return false;
    }
    if old_dfd == new_dfd {
        return true;
    }
    // Two dirfds (or a dirfd and the cwd): one directory only if both open the same dentry.
    let o = offsets();
    let (x, y) = (base_dentry(&o, old_dfd, old), base_dentry(&o, new_dfd, new));
    !x.is_null() && x == y
}

/// `sys_enter_rename*`: remembers the rename for its exit.
#[inline(always)]
pub(crate) fn tp_rename_enter(
    old_dfd: i64,
    old_path: *const u8,
    new_dfd: i64,
    new_path: *const u8,
    flags: u64,
) -> u32 {
    // Built in per-CPU scratch space, not on the stack: see `tp_rename_judge`.
    let Some(p) = RENAME_INIT.get_ptr_mut(0) else {
        return 0;
    };
    let same = same_dir(old_dfd, old_path, new_dfd, new_path) as u64;
    // SAFETY: this CPU's scratch value, valid for this run; every field is written.
    let p = unsafe {
        *p = PendingRename {
            old_dfd,
            old_path: old_path as u64,
            new_dfd,
            new_path: new_path as u64,
            flags,
            same_dir: same,
        };
        &*p
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    if RENAMES.insert(&tid, p, 0).is_err() {
        // No room to wait for the result: judged now, whether or not it will succeed.
        tp_rename_judge(p);
    }
    0
}

/// `sys_exit_rename*`: a rename that succeeded is judged (see [`tp_rename_judge`]). The entry
/// is read in place and removed only at the end (a copy would not fit the frame: see
/// [`tp_rename_judge`]).
#[inline(always)]
pub(crate) fn tp_rename_exit(ctx: &TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(p) = RENAMES.get_ptr(&tid) else {
        return 0;
    };
    // sys_exit records: 8 bytes of common fields, the syscall number, then `ret` at 16.
    if sys_arg(ctx, 0) as i64 == 0 {
        // SAFETY: a map value pointer, valid for this run; its entry is removed only below.
        tp_rename_judge(unsafe { &*p });
    }
    let _ = RENAMES.remove(&tid);
    0
}

/// The directory a path starts from ([`base_dentry`]), in a leaf frame of its own so that the
/// whole offsets struct never sits in the rename program's frame.
#[inline(never)]
fn base_of(dfd: i64, path: *const u8) -> *const u8 {
    base_dentry(&offsets(), dfd, path)
}

/// What a rename deletes, as the LSM tier's `rename_verdict` judges it, with path strings:
/// - within one directory, the source is not a deletion; the destination counts unless the
///   call could not replace anything (RENAME_NOREPLACE, RENAME_EXCHANGE; `mv a b` uses the
///   former), since this tier cannot tell whether a file was there;
/// - a move to another directory is a deletion from the source's scope (outside the job's
///   targets it counts, in a foreign data directory it stops the job). Unless the call could not
///   replace anything, the destination is judged too: counted when the source was free (moved
///   out of a target), else only for a foreign data directory; one count per rename at most.
///
/// Its frame sits under judge -> emit, at the 512-byte stack limit on 6.1: one `Deletion`,
/// reused for the destination.
#[inline(always)]
pub(crate) fn tp_rename_judge(p: &PendingRename) {
    let (same, flags) = (p.same_dir != 0, p.flags);
    if same && flags & (RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
        return;
    }
    let mut d = Deletion {
        parent: core::ptr::null(),
        entry: core::ptr::null(),
        user_path: core::ptr::null(),
        op: OP_RENAME,
        tier_flags: EVF_TRACEPOINT,
    };
    if !same {
        d.parent = base_of(p.old_dfd, p.old_path as *const u8);
        d.user_path = p.old_path as *const u8;
        let before = job_total();
        let v = judge(&d);
        if v == Verdict::StopForeign {
            tp_stop_foreign(&d);
        }
        if v != Verdict::Allow || flags & RENAME_NOREPLACE != 0 {
            return;
        }
        if job_total() != before {
            d.tier_flags |= DF_SCOPE_ONLY;
        }
    }
    d.parent = base_of(p.new_dfd, p.new_path as *const u8);
    d.user_path = p.new_path as *const u8;
    if judge(&d) == Verdict::StopForeign {
        tp_stop_foreign(&d);
    }
}

/// A dirfd argument: an `int` in the kernel, whose 64-bit slot in the record may carry garbage
/// (AT_FDCWD arrives as 0xffffff9c): only its low 32 bits count.
#[inline(always)]
fn dfd_arg(ctx: &TracePointContext, n: usize) -> i64 {
    sys_arg(ctx, n) as i32 as i64
}

#[tracepoint(category = "syscalls", name = "sys_enter_rename")]
pub fn sys_enter_rename(ctx: TracePointContext) -> u32 {
    tp_rename_enter(
        AT_FDCWD,
        sys_arg(&ctx, 0) as *const u8,
        AT_FDCWD,
        sys_arg(&ctx, 1) as *const u8,
        0,
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_renameat")]
pub fn sys_enter_renameat(ctx: TracePointContext) -> u32 {
    tp_rename_enter(
        dfd_arg(&ctx, 0),
        sys_arg(&ctx, 1) as *const u8,
        dfd_arg(&ctx, 2),
        sys_arg(&ctx, 3) as *const u8,
        0,
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_renameat2")]
pub fn sys_enter_renameat2(ctx: TracePointContext) -> u32 {
    tp_rename_enter(
        dfd_arg(&ctx, 0),
        sys_arg(&ctx, 1) as *const u8,
        dfd_arg(&ctx, 2),
        sys_arg(&ctx, 3) as *const u8,
        sys_arg(&ctx, 4),
    )
}

#[tracepoint(category = "syscalls", name = "sys_exit_rename")]
pub fn sys_exit_rename(ctx: TracePointContext) -> u32 {
    tp_rename_exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_renameat")]
pub fn sys_exit_renameat(ctx: TracePointContext) -> u32 {
    tp_rename_exit(&ctx)
}

#[tracepoint(category = "syscalls", name = "sys_exit_renameat2")]
pub fn sys_exit_renameat2(ctx: TracePointContext) -> u32 {
    tp_rename_exit(&ctx)
}
