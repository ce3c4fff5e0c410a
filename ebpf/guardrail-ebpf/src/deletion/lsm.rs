//! The `lsm` tier's deletion programs: inode_unlink, inode_rmdir and inode_rename refuse (EPERM)
//! or hold (restart after SIGSTOP) a deletion before it happens. Their bodies are shared with the
//! fmod_ret tier (fmodret.rs).
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{macros::lsm, programs::LsmContext};
use guardrail_common::*;

use super::{
    DF_SCOPE_ONLY, Deletion, Verdict,
    judge::{job_total, judge},
    scope::is_protected_entry,
};
use crate::kernel::{
    EPERM,
    offsets::{OFFSETS, kptr, offsets},
};

/// Restart the syscall after the signal that is pending (our SIGSTOP) has been dealt with: the
/// deletion waits, stopped before it happens, and is judged again when the job continues.
/// Never seen by userspace as long as a signal is pending when the syscall returns.
pub(crate) const ERESTARTNOINTR: i32 = 513;

#[inline(always)]
pub(crate) fn lsm_verdict(v: Verdict) -> i32 {
    match v {
        Verdict::Allow => 0,
        Verdict::Refuse => -EPERM,
        Verdict::Hold => -ERESTARTNOINTR,
        // Never returned for the LSM tier; refusing is what this tier does for it.
        Verdict::StopForeign => -EPERM,
    }
}

/// `int inode_unlink(struct inode *dir, struct dentry *dentry)`
#[lsm(hook = "inode_unlink")]
pub fn inode_unlink(ctx: LsmContext) -> i32 {
    lsm_remove(&ctx, OP_UNLINK)
}

/// `int inode_rmdir(struct inode *dir, struct dentry *dentry)`
#[lsm(hook = "inode_rmdir")]
pub fn inode_rmdir(ctx: LsmContext) -> i32 {
    lsm_remove(&ctx, OP_RMDIR)
}

/// The body of `inode_unlink`/`inode_rmdir`, shared with the fmod_ret tier.
#[inline(always)]
pub(crate) fn lsm_remove(ctx: &LsmContext, op: u32) -> i32 {
    let entry: *const u8 = ctx.arg(1);
    let o = offsets();
    let parent = kptr(entry, o.dentry_d_parent).unwrap_or(core::ptr::null());
    let d = Deletion {
        parent,
        entry,
        user_path: core::ptr::null(),
        op,
        tier_flags: 0,
    };
    lsm_verdict(judge(&d))
}

/// `int inode_rename(struct inode *old_dir, struct dentry *old_dentry, struct inode *new_dir,
/// struct dentry *new_dentry)`: moving an entry (file or directory) to another directory deletes
/// it where it was; a rename that replaces an existing entry destroys it; renaming a protected
/// root away is refused.
#[lsm(hook = "inode_rename")]
pub fn inode_rename(ctx: LsmContext) -> i32 {
    rename_verdict(&ctx)
}

/// The body of `inode_rename`, shared with the fmod_ret tier (`security_inode_rename` takes the
/// same four arguments first).
///
/// Its frame sits under judge -> emit, at the 512-byte stack limit on 6.1: one `Deletion`,
/// reused for the destination, and single offsets read here (not the whole offsets struct).
#[inline(always)]
pub(crate) fn rename_verdict(ctx: &LsmContext) -> i32 {
    let old_dentry: *const u8 = ctx.arg(1);
    let new_dentry: *const u8 = ctx.arg(3);
    // SAFETY: single fields of the read-only global, as in `offsets`.
    let (parent_off, inode_off) = unsafe {
        (
            read_volatile(addr_of!(OFFSETS.dentry_d_parent)),
            read_volatile(addr_of!(OFFSETS.dentry_d_inode)),
        )
    };
    let old_parent = kptr(old_dentry, parent_off).unwrap_or(core::ptr::null());
    let new_parent = kptr(new_dentry, parent_off).unwrap_or(core::ptr::null());
    let replaces = kptr(new_dentry, inode_off).is_ok();
    // The source: moving an entry out of its directory is deleting it there (`mv` of files out
    // of a non-target directory into a target, where deleting them is free, would otherwise cost
    // nothing; a foreign job emptying a data directory by moving its files away likewise), so
    // it is judged like a deletion from the source's scope whenever the parent changes, file or
    // directory (a directory takes its whole tree along). Free when the source is in scope (a
    // target of the job, a data directory it owns): a move between two subdirectories of one
    // target costs nothing. A rename within one directory (an editor's save-by-rename,
    // logrotate's x.1 -> x.2) leaves nothing elsewhere and is never judged for its source,
    // except that a protected root cannot be renamed at all.
    let mut d = Deletion {
        parent: old_parent,
        entry: old_dentry,
        user_path: core::ptr::null(),
        op: OP_RENAME,
        tier_flags: 0,
    };
    if old_parent != new_parent || protected_entry(old_dentry) {
        let before = job_total();
        let v = judge(&d);
        if v != Verdict::Allow {
            return lsm_verdict(v);
        }
        // A move whose source counted is one deletion, not two: its destination is judged
        // only for what refuses it (a protected root, a foreign data directory).
        if job_total() != before {
            d.tier_flags = DF_SCOPE_ONLY;
        }
    }
    // The destination: replacing an existing entry destroys it, judged as a deletion there.
    // Either refusal refuses the rename.
    if replaces {
        d.parent = new_parent;
        d.entry = new_dentry;
        return lsm_verdict(judge(&d));
    }
    0
}

/// [`is_protected_entry`] in a leaf frame of its own, so that the whole offsets struct never
/// sits in the rename program's frame.
#[inline(never)]
fn protected_entry(dentry: *const u8) -> bool {
    is_protected_entry(&offsets(), dentry)
}
