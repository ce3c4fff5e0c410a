//! Reads of dentries and inodes shared by the deletion programs.
use guardrail_common::KernelOffsets;

use super::offsets::{kptr, kread};

#[inline(always)]
pub(crate) fn dentry_identity(o: &KernelOffsets, dentry: *const u8) -> Result<(u64, u64), i32> {
    let inode = kptr(dentry, o.dentry_d_inode)?;
    let ino: u64 = kread(inode, o.inode_i_ino)?;
    let sb = kptr(inode, o.inode_i_sb)?;
    let dev: u32 = kread(sb, o.sb_s_dev)?;
    Ok((dev as u64, ino))
}
