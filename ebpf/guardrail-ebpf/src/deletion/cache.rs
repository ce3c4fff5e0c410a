//! The tracepoint tier's scope cache: `rm -rf` deletes a thousand entries of one directory in a
//! row, and each was judged by the same ancestor walk (a hash lookup per `d_parent` step) and the
//! same rule lookup (task tag, cgroup and its ancestors, uid). This per-CPU entry remembers the
//! last "inside a target or an owned data directory" verdict of a task, so the next deletion in
//! that directory is allowed after a few pointer reads instead.
//!
//! Only that verdict is cached (it is `Allow` whatever the budget or mode); a deletion that counts,
//! refuses or holds is always judged in full. The entry is used only when everything the verdict
//! depends on is unchanged, and is missed on any doubt:
//! - the rule: the task (tgid), its uid and its cgroup are part of the key, and `SCOPE_GEN` (bumped
//!   whenever a process is born or execs, the only times `TASK_RULE` changes or evicts) must match;
//! - the policy: the active slot and `Config::policy_gen` (the agent bumps it at every install);
//! - the directory's ancestry: the chain of dentries from the directory up to the deciding one is
//!   stored with each one's inode, and re-read on every hit: each `d_parent` link and `d_inode`
//!   must still be what was stored, and the deciding one must still have the declared (dev, ino).
//!   A directory renamed out of a target breaks its link at once, so there is no window as long as
//!   a rename hook would leave (and no dependency on any rename hook: the tier sees a rename on
//!   syscall entry, before it happens).
//!
//! Preemption: a task can be preempted inside a program (PREEMPT_RT or `preempt=full`) and another
//! task's program run on the same CPU. The entry has an owner lock taken by compare-and-swap; a
//! program that finds it taken does not use the cache at all (it judges in full), so no entry is
//! ever written by two tasks at once.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid},
    macros::map,
    maps::{Array, PerCpuArray},
};
use guardrail_common::*;

use super::maps::{DIRS, config};
use crate::kernel::{
    atomic::{cas, fetch_add},
    offsets::{OFFSETS, kptr, kread},
};

/// Deepest deciding ancestor the cache keeps (steps above the directory): deeper verdicts are not
/// cached (judged in full every time).
pub(crate) const CACHE_DEPTH: usize = 16;

/// [`cache_lookup`]: judge in full (the cache is not used for this deletion).
pub(crate) const CACHE_MISS: u32 = 0;
/// [`cache_lookup`]: the cached verdict holds: the deletion is allowed (in scope).
pub(crate) const CACHE_HIT: u32 = 1;

#[repr(C)]
pub(crate) struct ScopeCache {
    /// 1 while a task owns the entry (from lookup to release).
    lock: u32,
    /// 1 from a miss until release: the owner's `judge` may fill the entry.
    pending: u32,
    /// 1 when the fields below describe a verdict.
    valid: u32,
    /// Thread that owns the pending fill.
    tid: u32,
    tgid: u32,
    uid: u32,
    slot: u32,
    /// Steps from the directory to the deciding ancestor (`dentries[depth]`).
    depth: u32,
    cgroup: u64,
    task_gen: u64,
    policy_gen: u64,
    /// Identity of the deciding ancestor.
    top_dev: u64,
    top_ino: u64,
    dentries: [u64; CACHE_DEPTH + 1],
    inodes: [u64; CACHE_DEPTH + 1],
}

#[map]
pub(crate) static SCOPE_CACHE: PerCpuArray<ScopeCache> = PerCpuArray::with_max_entries(1, 0);

/// Bumped (atomically) whenever `TASK_RULE` may change: at every new process and every exec.
#[map]
pub(crate) static SCOPE_GEN: Array<u64> = Array::with_max_entries(1, 0);

/// Called by the tagging programs wherever they write `TASK_RULE`.
#[inline(always)]
pub(crate) fn bump_task_gen() {
    if let Some(g) = SCOPE_GEN.get_ptr_mut(0) {
        fetch_add(g, 1);
    }
}

/// The two dentry offsets the chain needs (not the whole offsets struct: this is a leaf).
#[inline(always)]
fn dentry_offsets() -> (u32, u32) {
    // SAFETY: single fields of the read-only global (see `offsets`).
    unsafe {
        (
            read_volatile(addr_of!(OFFSETS.dentry_d_parent)),
            read_volatile(addr_of!(OFFSETS.dentry_d_inode)),
        )
    }
}

/// (dev, ino) of an inode, as `dentry_identity` reads them.
#[inline(always)]
fn inode_identity(inode: *const u8) -> Result<(u64, u64), i32> {
    // SAFETY: as above.
    let (ino_off, sb_off, dev_off) = unsafe {
        (
            read_volatile(addr_of!(OFFSETS.inode_i_ino)),
            read_volatile(addr_of!(OFFSETS.inode_i_sb)),
            read_volatile(addr_of!(OFFSETS.sb_s_dev)),
        )
    };
    let ino: u64 = kread(inode, ino_off)?;
    let sb = kptr(inode, sb_off)?;
    let dev: u32 = kread(sb, dev_off)?;
    Ok((dev as u64, ino))
}

/// Whether the stored chain is still the directory's ancestry: every link and inode as stored,
/// and the deciding ancestor's identity unchanged.
#[inline(always)]
fn chain_holds(e: *mut ScopeCache) -> bool {
    let (parent_off, inode_off) = dentry_offsets();
    // SAFETY: `e` is this CPU's entry, owned by this task (lock held).
    let depth = unsafe { (*e).depth } as usize;
    let mut j = 0usize;
    while j <= CACHE_DEPTH {
        if j > depth {
            return false;
        }
        // SAFETY: as above; indices are bounded by the loop.
        let (d, want_inode) = unsafe { ((*e).dentries[j], (*e).inodes[j]) };
        let Ok(inode) = kptr(d as *const u8, inode_off) else {
            return false;
        };
        if inode as u64 != want_inode {
            return false;
        }
        if j == depth {
            // The same inode (pointer and number) as at the fill: the one DIRS declared. Its
            // device is not re-read (two more reads per deletion): an inode struct reused for
            // another file at the same address has another number, and one reused for the
            // same number on another filesystem would also need every dentry below it reused
            // at the same addresses, linked the same way.
            // SAFETY: as above.
            let want = unsafe { (*e).top_ino };
            // SAFETY: as above.
            let ino_off = unsafe { read_volatile(addr_of!(OFFSETS.inode_i_ino)) };
            return kread::<u64>(inode, ino_off) == Ok(want);
        }
        let Ok(p) = kptr(d as *const u8, parent_off) else {
            return false;
        };
        if j + 1 > CACHE_DEPTH {
            return false;
        }
        // SAFETY: as above; j + 1 <= CACHE_DEPTH.
        if p as u64 != unsafe { (*e).dentries[j + 1] } {
            return false;
        }
        j += 1;
    }
    false
}

/// Before `judge`, for a tracepoint-tier deletion whose directory is known: `CACHE_HIT` when the
/// cached verdict for this task and directory still holds (allow it without judging). Otherwise
/// `CACHE_MISS`; if the entry was free, this task now owns it with a pending fill that `judge`
/// completes through [`cache_fill`] and [`cache_release`] ends.
#[inline(never)]
pub(crate) fn cache_lookup(parent: *const u8) -> u32 {
    if parent.is_null() {
        return CACHE_MISS;
    }
    let Some(cfg) = config() else {
        return CACHE_MISS;
    };
    if cfg.policy_loaded == 0 {
        return CACHE_MISS;
    }
    let (Some(e), Some(g)) = (SCOPE_CACHE.get_ptr_mut(0), SCOPE_GEN.get_ptr_mut(0)) else {
        return CACHE_MISS;
    };
    // SAFETY: field address of this CPU's entry.
    if !cas(unsafe { addr_of_mut!((*e).lock) }, 0, 1) {
        // Another task owns it (this one preempted it): judge in full, touch nothing.
        return CACHE_MISS;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    let uid = bpf_get_current_uid_gid() as u32;
    // SAFETY: helper without preconditions.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: map value pointer valid for this run.
    let task_gen = unsafe { read_volatile(g) };
    let (slot, policy_gen) = (cfg.active_slot & 1, cfg.policy_gen);
    // SAFETY: this CPU's entry, owned by this task from the cas above.
    unsafe {
        if (*e).valid != 0
            && (*e).tgid == tgid
            && (*e).uid == uid
            && (*e).cgroup == cgroup
            && (*e).task_gen == task_gen
            && (*e).policy_gen == policy_gen
            && (*e).slot == slot
            && (*e).dentries[0] == parent as u64
            && chain_holds(e)
        {
            write_volatile(addr_of_mut!((*e).lock), 0);
            return CACHE_HIT;
        }
        // The key is taken now, before `judge` looks up the rule: a change after this point
        // moves a generation past the stored one and the entry misses.
        (*e).valid = 0;
        (*e).tid = tid;
        (*e).tgid = tgid;
        (*e).uid = uid;
        (*e).cgroup = cgroup;
        (*e).task_gen = task_gen;
        (*e).policy_gen = policy_gen;
        (*e).slot = slot;
        (*e).dentries[0] = parent as u64;
        (*e).pending = 1;
    }
    CACHE_MISS
}

/// Called by `judge` when the ancestor `depth` steps above `parent`, (`dev`, `ino`), put the
/// deletion in scope: records the chain if this task owns a pending fill for this directory and
/// the chain read now still leads there through undeclared directories (a rename racing the walk
/// leaves the entry invalid). Every other tier returns at once.
#[inline(never)]
pub(crate) fn cache_fill(parent: *const u8, depth: u32, tier_flags: u32, dev: u64, ino: u64) {
    if tier_flags != EVF_TRACEPOINT || depth as usize > CACHE_DEPTH {
        return;
    }
    let Some(cfg) = config() else { return };
    let Some(e) = SCOPE_CACHE.get_ptr_mut(0) else {
        return;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: this CPU's entry; written only by the task that holds its lock (checked here).
    unsafe {
        if read_volatile(addr_of!((*e).lock)) == 0
            || (*e).pending == 0
            || (*e).tid != tid
            || (*e).dentries[0] != parent as u64
            || (*e).slot != cfg.active_slot & 1
        {
            return;
        }
    }
    let slot = cfg.active_slot & 1;
    let (parent_off, inode_off) = dentry_offsets();
    let mut j = 0usize;
    while j <= CACHE_DEPTH {
        // SAFETY: as above; indices are bounded by the loop.
        let d = unsafe { (*e).dentries[j] } as *const u8;
        let Ok(inode) = kptr(d, inode_off) else {
            return;
        };
        let Ok((idev, iino)) = inode_identity(inode) else {
            return;
        };
        // SAFETY: as above.
        unsafe { (*e).inodes[j] = inode as u64 };
        if j == depth as usize {
            if (idev, iino) != (dev, ino) {
                return;
            }
            break;
        }
        // A declared directory below the deciding one (moved in since the walk): not cached.
        // SAFETY: map value pointer valid for this run.
        if unsafe {
            DIRS.get(&DirKey {
                dev: idev,
                ino: iino,
                slot,
                _pad: 0,
            })
        }
        .is_some()
        {
            return;
        }
        let Ok(p) = kptr(d, parent_off) else {
            return;
        };
        if j + 1 > CACHE_DEPTH {
            return;
        }
        // SAFETY: as above; j + 1 <= CACHE_DEPTH.
        unsafe { (*e).dentries[j + 1] = p as u64 };
        j += 1;
    }
    if j > CACHE_DEPTH {
        return;
    }
    // SAFETY: as above.
    unsafe {
        (*e).top_dev = dev;
        (*e).top_ino = ino;
        (*e).depth = depth;
        (*e).valid = 1;
    }
}

/// After `judge`: ends this task's ownership of the entry, if it has it.
#[inline(never)]
pub(crate) fn cache_release() {
    let Some(e) = SCOPE_CACHE.get_ptr_mut(0) else {
        return;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: this CPU's entry; only its owner (pending, same thread) clears it.
    unsafe {
        if read_volatile(addr_of!((*e).pending)) == 0 || (*e).tid != tid {
            return;
        }
        (*e).pending = 0;
        write_volatile(addr_of_mut!((*e).lock), 0);
    }
}
