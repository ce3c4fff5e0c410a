//! The `lsm` tier's deletion programs: inode_unlink, inode_rmdir and inode_rename refuse (EPERM)
//! or hold (restart after SIGSTOP) a deletion before it happens. Their bodies are shared with the
//! fmod_ret tier (fmodret.rs).
use aya_ebpf::{macros::lsm, programs::LsmContext};
use guardrail_common::*;

use super::{Deletion, Verdict, judge::judge, scope::is_protected_entry};
use crate::kernel::{
    EPERM,
    fs::is_dir,
    offsets::{kptr, offsets},
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
/// struct dentry *new_dentry)`: a rename that replaces an existing entry destroys it; a rename
/// that moves a directory to another parent takes its whole tree out of where it was; renaming a
/// protected root away is refused.
#[lsm(hook = "inode_rename")]
pub fn inode_rename(ctx: LsmContext) -> i32 {
    rename_verdict(&ctx)
}

/// The body of `inode_rename`, shared with the fmod_ret tier (`security_inode_rename` takes the
/// same four arguments first).
#[inline(always)]
pub(crate) fn rename_verdict(ctx: &LsmContext) -> i32 {
    let o = offsets();
    let old_dentry: *const u8 = ctx.arg(1);
    let new_dentry: *const u8 = ctx.arg(3);
    let old_parent = kptr(old_dentry, o.dentry_d_parent).unwrap_or(core::ptr::null());
    let new_parent = kptr(new_dentry, o.dentry_d_parent).unwrap_or(core::ptr::null());
    // The source: judged like a deletion when it is a protected root, or when a directory
    // leaves its parent for another one.
    let source_is_dir_move = old_parent != new_parent && is_dir(&o, old_dentry);
    let source = Deletion {
        parent: old_parent,
        entry: old_dentry,
        user_path: core::ptr::null(),
        op: OP_RENAME,
        tier_flags: 0,
    };
    if source_is_dir_move || is_protected_entry(&o, old_dentry) {
        let v = judge(&source);
        if v != Verdict::Allow {
            return lsm_verdict(v);
        }
    }
    // The destination: replacing an existing entry destroys it.
    let replaces = kptr(new_dentry, o.dentry_d_inode).is_ok();
    if replaces {
        let dest = Deletion {
            parent: new_parent,
            entry: new_dentry,
            user_path: core::ptr::null(),
            op: OP_RENAME,
            tier_flags: 0,
        };
        return lsm_verdict(judge(&dest));
    }
    0
}
