//! guardrail's kernel programs.
//!
//! Two tiers share one object and one set of maps:
//! - `lsm`: BPF LSM hooks on inode_unlink/inode_rmdir/inode_rename refuse a deletion with EPERM
//!   before it happens.
//! - `tracepoint`: syscall tracepoints see the same deletions on kernels that refuse BPF LSM; they
//!   cannot refuse, so they stop the job with a signal sent from the kernel (it lands after the
//!   current syscall: at most one file past the budget per deleting task).
//!
//! - `fmodret`: the `lsm` tier's programs attached as fmod_ret (BPF_MODIFY_RETURN) to the kernel's
//!   `security_*` functions, for kernels that build BPF LSM but leave it out of the active LSM list
//!   (Ubuntu). Same bodies, same verdicts (see fmodret.rs).
//!
//! The kernel counts and decides; userspace hears only of state changes (a crossing, a refusal of
//! a protected path), never of each deleted file.
//!
//! Every kernel struct field is read through offsets the agent resolved from the running kernel's
//! BTF (`OFFSETS`), because Rust-built BPF carries no CO-RE relocations.
#![no_std]
#![no_main]
// The BPF target's `core` has no Atomic* types with read-modify-write methods; the intrinsics
// lower to BPF_ATOMIC instructions (fetch-add and cmpxchg need -mcpu=v3, kernel >= 5.12).
// They use SeqCst on purpose: LLVM 22's BPF backend lowers a *relaxed* fetch-add whose result is
// used to a plain `lock +=` without BPF_FETCH, silently returning the addend instead of the old
// value (seen in llvm-objdump); SeqCst yields `atomic_fetch_add`.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Linted with Debian's clippy for bpfel (`cargo xtask test`). Two lints are allowed on purpose:
// the programs' shape is what the verifier accepted on every kernel we test, and the deepest call
// chain (sys_enter_unlinkat → judge → emit) sits at the 512-byte stack limit on 6.1, so rewrites
// that only please a linter are not worth an unproven stack layout.
#![allow(
    clippy::collapsible_if,
    reason = "nested ifs follow the order of kernel reads; collapsing them reshapes verified code"
)]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys are passed by reference so that no copy of them lands on the BPF stack"
)]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd, atomic_xchg},
    ptr::{addr_of_mut, read_volatile},
};

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_str_bytes, bpf_send_signal,
    },
    macros::{lsm, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{LsmContext, RawTracePointContext, TracePointContext},
};
use guardrail_common::*;

mod fmodret;
mod incident_id;
mod shutdown;

pub(crate) const EPERM: i32 = 1;
/// Restart the syscall after the signal that is pending (our SIGSTOP) has been dealt with: the
/// deletion waits, stopped before it happens, and is judged again when the job continues.
/// Never seen by userspace as long as a signal is pending when the syscall returns.
const ERESTARTNOINTR: i32 = 513;
const PF_IO_WORKER: u32 = 0x10;
const PF_KTHREAD: u32 = 0x0020_0000;
const SIGKILL: u32 = 9;
const SIGSTOP: u32 = 19;
const AT_FDCWD: i64 = -100;
const IORING_OP_RENAMEAT: u8 = 35;
const IORING_OP_UNLINKAT: u8 = 36;

/// Resolved by the agent from /sys/kernel/btf/vmlinux before load.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    task_tgid: 0,
    task_pid: 0,
    task_loginuid: 0,
    task_sessionid: 0,
    task_signal: 0,
    task_fs: 0,
    task_files: 0,
    task_mm: 0,
    task_real_parent: 0,
    signal_pids: 0,
    pidtype_pgid: 0,
    pidtype_sid: 0,
    pid_numbers_nr: 0,
    fs_pwd: 0,
    fs_root: 0,
    path_dentry: 0,
    path_mnt: 0,
    files_fdt: 0,
    fdt_fd: 0,
    fdt_max_fds: 0,
    file_f_path: 0,
    file_f_inode: 0,
    dentry_d_parent: 0,
    dentry_d_inode: 0,
    dentry_d_name_name: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    sb_s_dev: 0,
    mm_exe_file: 0,
    io_uring_opcode: 0,
    valid: 0,
    task_flags: 0,
    task_group_leader: 0,
    task_start_boottime: 0,
    task_cred: 0,
    cred_euid: 0,
};

/// Resolved by the agent from /sys/kernel/btf/vmlinux before load (zero: no filesystem is taken
/// for a pseudo filesystem).
#[unsafe(no_mangle)]
static FS_OFFSETS: FsOffsets = FsOffsets {
    sb_s_magic: 0,
    sb_s_type: 0,
    fstype_name: 0,
    valid: 0,
};

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static DIRS: HashMap<DirKey, DirRule> = HashMap::with_max_entries(65536, 0);
#[map]
static RULES: Array<RuleParams> = Array::with_max_entries(MAX_RULES * POLICY_SLOTS, 0);
#[map]
static EXES: HashMap<ExeKey, u32> = HashMap::with_max_entries(4096, 0);
#[map]
static CGROUPS: HashMap<CgroupKey, u32> = HashMap::with_max_entries(8192, 0);
#[map]
static UIDS: HashMap<UidKey, u32> = HashMap::with_max_entries(4096, 0);
/// `deletion.never_hold` units by cgroup id (slot-keyed like CGROUPS; the value is the unit's index
/// in the policy, reported in the event): a job in one of them, or below one, is never stopped by
/// the kernel, with or without an agent.
#[map]
static NEVER_HOLD: HashMap<CgroupKey, u32> = HashMap::with_max_entries(1024, 0);
/// Rule tag of a process whose executable (or an ancestor's, inherited at fork) matched a rule.
#[map]
static TASK_RULE: LruHashMap<u32, u32> = LruHashMap::with_max_entries(65536, 0);
#[map]
static JOBS: LruHashMap<JobKey, JobState> = LruHashMap::with_max_entries(JOBS_CAPACITY, 0);
/// Held, denied and blocked jobs, in a map nothing evicts (see [`HeldJob`]).
#[map]
static HELD: HashMap<JobKey, HeldJob> = HashMap::with_max_entries(HELD_CAPACITY, 0);
/// Refusals (protected root, foreign data directory) per job and kind, for rate limiting.
#[map]
static REFUSALS: LruHashMap<RefusalKey, u64> = LruHashMap::with_max_entries(16384, 0);
/// Budgets above the job (`LEVEL_*`), indexed by `slot * LEVELS + level`.
#[map]
static LEVEL_PARAMS: Array<RuleParams> = Array::with_max_entries(LEVELS * POLICY_SLOTS, 0);
/// Counters per login session, service unit and login user. LRU so that no number of sessions
/// can fill it and stop counting; an evicted entry only forgets counts (a hold is the job's, in
/// `HELD`). Unprivileged users cannot make audit sessions or units at will (services are keyed by
/// their top unit, not by a delegated sub-cgroup), so only root can push an entry out.
#[map]
static LEVEL_COUNTS: LruHashMap<LevelKey, LevelState> =
    LruHashMap::with_max_entries(LEVEL_CAPACITY, 0);
/// Scratch space for a new level entry.
#[map]
static LEVEL_INIT: PerCpuArray<LevelState> = PerCpuArray::with_max_entries(1, 0);
/// What `judge` found for a tracepoint-tier deletion in a foreign data directory, for the hook to
/// act on after it returns: `[data_dir_id, rule]` (per CPU; `judge` has no stack to spare).
#[map]
static FOREIGN: PerCpuArray<[u32; 2]> = PerCpuArray::with_max_entries(1, 0);
/// Scratch space for a new job's entry (too big for the BPF stack).
#[map]
static JOB_INIT: PerCpuArray<JobState> = PerCpuArray::with_max_entries(1, 0);
#[map]
static INCIDENTS: Array<u64> = Array::with_max_entries(1, 0);
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
/// Scratch space for the user path of a tracepoint-tier deletion (too big for the BPF stack).
#[map]
static PATHBUF: PerCpuArray<[u8; 256]> = PerCpuArray::with_max_entries(1, 0);
/// tgid whose `getpgid` call the self-test program answers.
#[map]
static SELFTEST_TARGET: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static SELFTEST: Array<SelftestAnswer> = Array::with_max_entries(1, 0);
#[map]
static PROBE_LSM_HITS: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn offsets() -> KernelOffsets {
    // SAFETY: OFFSETS is a plain read-only global; the volatile read stops the compiler from
    // folding the zero initialiser, since the loader rewrites .rodata before load.
    unsafe { read_volatile(&OFFSETS) }
}

/// Reads a `T` at `base + off` from kernel memory.
#[inline(always)]
pub(crate) fn kread<T>(base: *const u8, off: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel copies with fault handling; a bad address is an Err, never
    // a fault.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T) }
}

#[inline(always)]
pub(crate) fn kptr(base: *const u8, off: u32) -> Result<*const u8, i32> {
    let p: *const u8 = kread(base, off)?;
    if p.is_null() { Err(-1) } else { Ok(p) }
}

/// Global (initial namespace) number of a `struct pid *` of the task's signal struct.
#[inline(always)]
fn task_pid_of_type(o: &KernelOffsets, task: *const u8, pidtype: u32) -> Result<u32, i32> {
    let signal = kptr(task, o.task_signal)?;
    let pid = kptr(signal, o.signal_pids + 8 * pidtype)?;
    kread::<u32>(pid, o.pid_numbers_nr)
}

/// The job of the current task: its process group within its session. Tasks with no process
/// group of their own (pgid 0 or 1: children of a bare init, kernel threads) are each their own
/// job, keyed by their tgid, so that unrelated processes are never lumped together.
#[inline(always)]
fn job_key(o: &KernelOffsets, task: *const u8, tgid: u32) -> JobKey {
    let pgid = task_pid_of_type(o, task, o.pidtype_pgid).unwrap_or(0);
    let sid = task_pid_of_type(o, task, o.pidtype_sid).unwrap_or(0);
    JobKey {
        sid,
        pgid: if pgid <= 1 { tgid } else { pgid },
    }
}

#[inline(always)]
pub(crate) fn current_task() -> *const u8 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_task() as *const u8 }
}

#[inline(always)]
fn dentry_identity(o: &KernelOffsets, dentry: *const u8) -> Result<(u64, u64), i32> {
    let inode = kptr(dentry, o.dentry_d_inode)?;
    let ino: u64 = kread(inode, o.inode_i_ino)?;
    let sb = kptr(inode, o.inode_i_sb)?;
    let dev: u32 = kread(sb, o.sb_s_dev)?;
    Ok((dev as u64, ino))
}

/// Atomic add returning the previous value.
#[inline(always)]
fn fetch_add(p: *mut u64, v: u64) -> u64 {
    // SAFETY: callers pass pointers into map values, valid and aligned for this program run.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, v) }
}

#[inline(always)]
fn swap(p: *mut u64, v: u64) -> u64 {
    // SAFETY: as for fetch_add.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(p, v) }
}

/// Compare-and-swap; true when this CPU made the change.
#[inline(always)]
fn cas(p: *mut u32, old: u32, new: u32) -> bool {
    // SAFETY: as for fetch_add.
    unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
    }
    .1
}

fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

// --- the deletion decision -------------------------------------------------------------------

/// What the caller must do with the deletion.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allow,
    /// LSM: return -EPERM. Tracepoint: the deletion goes through; `signal` stops the job.
    Refuse,
    /// The job is held and SIGSTOP is pending for this task: the LSM tier restarts the syscall
    /// after the stop (it runs again, and is judged again, when the job continues), so an approved
    /// job loses nothing. Where that is not safe it degrades to `Refuse`.
    Hold,
    /// Tracepoint tier only: the deletion was in a data directory the job is not named for and has
    /// gone through; the hook stops (or, under a `block` rule, kills) the job right after it, see
    /// [`tp_stop_foreign`]. `FOREIGN` holds the data directory and rule.
    StopForeign,
}

struct Deletion {
    /// Dentry of the directory the entry is deleted from (null: unknown, e.g. io_uring in the
    /// tracepoint tier).
    parent: *const u8,
    /// Dentry of the entry itself, when the hook has it (LSM).
    entry: *const u8,
    /// User pointer to the path as passed to the syscall (tracepoint tier), for the event.
    user_path: *const u8,
    op: u32,
    /// EVF_TRACEPOINT for the tracepoint tier.
    tier_flags: u32,
}

#[inline(always)]
fn job_rule(slot: u32, tgid: u32, uid: u32) -> u32 {
    // SAFETY: map lookups return pointers into map values that stay valid for this program run.
    if let Some(r) = unsafe { TASK_RULE.get(&tgid) } {
        return *r;
    }
    if let Some(r) = unit_lookup(&CGROUPS, slot) {
        return r;
    }
    // SAFETY: as above.
    if let Some(r) = unsafe { UIDS.get(&UidKey { uid, slot }) } {
        return *r;
    }
    0
}

/// The current task's entry in a cgroup-keyed unit table: its own cgroup first, then its
/// ancestors from the deepest up, so a `Delegate=yes` unit's sub-cgroups count as the unit and
/// the nearest named cgroup wins. Only the global hierarchy's ids are compared: a user can make
/// sub-cgroups only inside a subtree delegated to it, which never contains a unit the policy
/// names (the resolver refuses cgroups whose parent is not root's).
#[inline(always)]
fn unit_lookup(map: &HashMap<CgroupKey, u32>, slot: u32) -> Option<u32> {
    // SAFETY: helper without preconditions.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: map lookups return pointers into map values that stay valid for this program run.
    if let Some(r) = unsafe {
        map.get(&CgroupKey {
            cgroup_id: cg,
            slot,
            _pad: 0,
        })
    } {
        return Some(*r);
    }
    let mut level = MAX_CGROUP_LEVELS;
    while level >= 1 {
        // SAFETY: helper without preconditions; 0 for a level below the task's own cgroup.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id != 0 && id != cg {
            // SAFETY: as above.
            if let Some(r) = unsafe {
                map.get(&CgroupKey {
                    cgroup_id: id,
                    slot,
                    _pad: 0,
                })
            } {
                return Some(*r);
            }
        }
        level -= 1;
    }
    None
}

/// PID 1 and kernel threads (kdevtmpfs, nfsd, kworkers) are the host's own machinery: they are
/// never counted, stopped or refused (but a protected root is still refused, per operation). The
/// tgid is the initial namespace's, so a container's init is not PID 1 here; PF_KTHREAD cannot be
/// set by userspace. An unreadable flags word counts as a user task.
#[inline(always)]
fn host_machinery(o: &KernelOffsets, tgid: u32) -> bool {
    if tgid == 1 {
        return true;
    }
    let flags: u32 = kread(current_task(), o.task_flags).unwrap_or(0);
    flags & PF_KTHREAD != 0
}

#[inline(always)]
fn fs_offsets() -> FsOffsets {
    // SAFETY: as for `offsets`.
    unsafe { read_volatile(&FS_OFFSETS) }
}

/// Whether `dir` (a directory dentry) is on a pseudo filesystem whose entries are kernel objects
/// (an empty cgroup, a sysfs or configfs object, a bpffs pin, a devtmpfs node): removing them is
/// not a deletion of data. Unknown (null, unreadable) is not a pseudo filesystem.
#[inline(always)]
fn on_pseudo_fs(o: &KernelOffsets, dir: *const u8) -> bool {
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
fn pseudo_fs_deletion(o: &KernelOffsets, d: &Deletion) -> bool {
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

/// A job of a `deletion.never_hold` unit (logind, journald, sshd, the bus...) past its budget:
/// stopping it would lock admins out or stop the host's logging, and an agent may not be there to
/// continue it, so the kernel never stops it. The LSM tier refuses this and every further
/// deletion outside scope for the rest of that job (JOB_DENIED: a restarted service is a new job);
/// the tracepoint tier cannot refuse, so it reports once and lets the job delete on without a
/// budget. Returns the incident id when this CPU is the one to report the crossing, else 0.
///
/// A leaf that `judge` calls and then emits for: on 6.1 the verifier rounds every frame up to 32
/// bytes and the deepest chain (tracepoint program -> judge -> emit -> memset) is already at the
/// 512-byte limit, so no frame may be added between judge and emit.
#[inline(never)]
fn never_hold_crossing(lsm: bool, job: *mut JobState) -> u64 {
    // SAFETY: field addresses of a valid map value (see `judge`).
    let (state_p, refused_p) =
        unsafe { (addr_of_mut!((*job).state), addr_of_mut!((*job).refused)) };
    let first = if lsm {
        fetch_add(refused_p, 1);
        // Exactly one CPU makes the change and reports it.
        cas(state_p, JOB_ACTIVE, JOB_DENIED)
    } else {
        // SAFETY: plain fields of the map value; two CPUs crossing at once may both report.
        unsafe {
            (*job).allowance = ALLOWANCE_UNLIMITED;
            (*job).incident == 0
        }
    };
    if !first {
        return 0;
    }
    let inc = next_incident();
    // SAFETY: as above.
    unsafe { (*job).incident = inc };
    inc
}

fn judge(d: &Deletion) -> Verdict {
    let o = offsets();
    if o.valid == 0 {
        return Verdict::Allow;
    }
    let Some(cfg) = config() else {
        return Verdict::Allow;
    };
    if cfg.policy_loaded == 0 {
        return Verdict::Allow;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == cfg.agent_tgid
        && is_current_agent(&o, cfg.agent_tgid, cfg.agent_start_lo, cfg.agent_start_hi)
    {
        return Verdict::Allow;
    }
    let slot = cfg.active_slot & 1;
    let audit = cfg.mode == MODE_AUDIT;
    let key = job_key(&o, current_task(), tgid);

    // 1. A protected root itself is never deleted, by anyone.
    if !d.entry.is_null() {
        if let Ok((dev, ino)) = dentry_identity(&o, d.entry) {
            // SAFETY: map value pointer valid for this run.
            if let Some(r) = unsafe {
                DIRS.get(&DirKey {
                    dev,
                    ino,
                    slot,
                    _pad: 0,
                })
            } {
                if r.kind & DIR_PROTECTED_ROOT != 0 {
                    let flags = if audit { EVF_AUDIT } else { EVF_REFUSED };
                    emit_refusal(
                        d,
                        &mut Report {
                            kind: EV_PROTECTED_ROOT,
                            flags,
                            rule: 0,
                            data_dir_id: 0,
                            count: 0,
                            incident: 0,
                        },
                        &key,
                    );
                    return if audit {
                        Verdict::Allow
                    } else {
                        Verdict::Refuse
                    };
                }
            }
        }
    }

    if host_machinery(&o, tgid) || pseudo_fs_deletion(&o, d) {
        return Verdict::Allow;
    }

    let uid = bpf_get_current_uid_gid() as u32;
    // The task's own rule decides scope and exemption (an exempt package manager run from a
    // script is exempt; a data directory's own daemon is its owner); the job's counters run
    // under the rule the job was created with.
    let rule = job_rule(slot, tgid, uid) & (MAX_RULES - 1);
    let Some(params) = RULES.get(slot * MAX_RULES + rule) else {
        return Verdict::Allow;
    };
    let rule_audit = audit || params.flags & RULE_FLAG_AUDIT != 0;

    // 2. The nearest declared ancestor decides: a target of this job's rule or a data directory.
    let mut dentry = d.parent;
    let mut i = 0;
    while i < MAX_ANCESTORS && !dentry.is_null() {
        let Ok((dev, ino)) = dentry_identity(&o, dentry) else {
            break;
        };
        // SAFETY: map value pointer valid for this run.
        if let Some(dr) = unsafe {
            DIRS.get(&DirKey {
                dev,
                ino,
                slot,
                _pad: 0,
            })
        } {
            match scope_step(dr, rule) {
                Scope::Undecided => {}
                Scope::InTarget | Scope::DataOwner => return Verdict::Allow,
                Scope::DataForeign { data_dir_id } => {
                    if !rule_audit && d.tier_flags & EVF_TRACEPOINT != 0 {
                        // This tier cannot refuse: the hook holds the job after judge returns
                        // (acting here would add a frame under judge, at the stack limit).
                        if let Some(p) = FOREIGN.get_ptr_mut(0) {
                            // SAFETY: this CPU's scratch value, valid for this run.
                            unsafe { *p = [data_dir_id, rule] };
                            return Verdict::StopForeign;
                        }
                    }
                    let flags = if rule_audit { EVF_AUDIT } else { EVF_REFUSED };
                    emit_refusal(
                        d,
                        &mut Report {
                            kind: EV_DATA_DIR,
                            flags,
                            rule,
                            data_dir_id,
                            count: 0,
                            incident: 0,
                        },
                        &key,
                    );
                    return if rule_audit {
                        Verdict::Allow
                    } else {
                        Verdict::Refuse
                    };
                }
            }
        }
        let Ok(parent) = kptr(dentry, o.dentry_d_parent) else {
            break;
        };
        if parent == dentry {
            break;
        }
        dentry = parent;
        i += 1;
    }
    if params.action == ACTION_EXEMPT {
        return Verdict::Allow;
    }

    // 3. Outside scope: count against the job's budget.
    let existing = JOBS.get_ptr_mut(&key);
    // 1 when this deletion is the job's first counted one (for the levels' job counts).
    let mut new_job = 0u64;
    let job = match existing {
        Some(j) => j,
        None => {
            new_job = 1;
            // The new entry is built in per-CPU scratch space: the BPF stack (512 bytes for the
            // whole call chain) cannot spare a JobState.
            let Some(fresh) = JOB_INIT.get_ptr_mut(0) else {
                return Verdict::Allow;
            };
            // SAFETY: helper without preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            // SAFETY: `fresh` points to this CPU's scratch value; every field is written.
            unsafe {
                (*fresh) = JobState::default();
                (*fresh).state = JOB_ACTIVE;
                (*fresh).rule = rule;
                (*fresh).window_start_ns = now;
                (*fresh).first_ns = now;
                (*fresh).uid = uid;
                (*fresh).cgroup_id = bpf_get_current_cgroup_id();
                if let Ok(comm) = bpf_get_current_comm() {
                    (*fresh).comm = comm;
                }
                // BPF_NOEXIST: a racing CPU may have created it; either way look it up again.
                let _ = JOBS.insert(&key, &*fresh, 1);
            }
            // SAFETY: map value pointer valid for this run.
            match JOBS.get_ptr_mut(&key) {
                Some(j) => j,
                None => return Verdict::Allow,
            }
        }
    };
    // SAFETY: pointer into the map value, valid for this run.
    let rule = unsafe { (*job).rule } & (MAX_RULES - 1);
    let Some(params) = RULES.get(slot * MAX_RULES + rule) else {
        return Verdict::Allow;
    };
    let rule_audit = audit || params.flags & RULE_FLAG_AUDIT != 0;
    // `job` points into a map value that lives for this run; concurrent CPUs update its counters
    // only through atomics.
    // SAFETY: field addresses of a valid map value.
    let (state_p, count_p, refused_p, total_p) = unsafe {
        (
            addr_of_mut!((*job).state),
            addr_of_mut!((*job).count),
            addr_of_mut!((*job).refused),
            addr_of_mut!((*job).total),
        )
    };
    // SAFETY: as above.
    let mut state = unsafe { read_volatile(state_p) };
    if state == JOB_ACTIVE {
        state = restore_held(&key, job);
    }
    if state != JOB_ACTIVE {
        let n = fetch_add(refused_p, 1);
        if state == JOB_HELD {
            // Resumed without approval (`fg`, `kill -CONT`): the LSM tier refuses this deletion,
            // the tracepoint tier cannot; both stop the task again at once so the job waits for
            // the admin instead of failing through (or, in the tracepoint tier, deleting) the
            // rest of its work. The agent re-stops the whole job. A job that keeps resuming
            // itself in the tracepoint tier (a sibling looping `kill -CONT`, a ptracer swallowing
            // SIGSTOP) is killed at its SELF_RESUME_LIMIT-th deletion since the hold (the
            // crossing counted `refused` once). Not io_uring submissions: one io_uring_enter
            // submits a whole batch (up to 32) before the stop lands, with no resume in between.
            let kill = d.tier_flags & (EVF_TRACEPOINT | EVF_IO_URING) == EVF_TRACEPOINT
                && n >= SELF_RESUME_LIMIT;
            let (stopped, first_kill) = if kill {
                (false, block_resumed(&key, job))
            } else {
                (stop_self(), false)
            };
            if first_kill || (!kill && (n == 0 || n.is_power_of_two())) {
                emit(
                    d,
                    &Report {
                        kind: EV_HELD_RETRY,
                        flags: if kill {
                            EVF_SIGNALLED | EVF_KILLED
                        } else {
                            EVF_SIGNALLED
                        },
                        rule,
                        data_dir_id: 0,
                        count: n + 1,
                        incident: 0,
                    },
                );
            }
            return if stopped {
                Verdict::Hold
            } else {
                Verdict::Refuse
            };
        }
        if state == JOB_BLOCKED && d.tier_flags & EVF_TRACEPOINT != 0 {
            signal(SIGKILL);
        }
        return Verdict::Refuse;
    }

    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: plain fields of the map value; races here only blur the window edge.
    let (start, allowance) = unsafe { ((*job).window_start_ns, (*job).allowance) };
    let mut elapsed = now.saturating_sub(start);
    if params.window_ns != 0 && elapsed >= params.window_ns {
        let old = swap(count_p, 0);
        // SAFETY: as above.
        unsafe {
            (*job).prev_count = if elapsed >= 2 * params.window_ns {
                0
            } else {
                old
            };
            (*job).window_start_ns = now;
        }
        elapsed = 0;
    }
    let n = fetch_add(count_p, 1) + 1;
    fetch_add(total_p, 1);
    // SAFETY: as above.
    let prev = unsafe { (*job).prev_count };
    let estimate = sliding_estimate(n, prev, elapsed, params.window_ns);
    // SAFETY: as above; a lost race only under-reports the peak by a little.
    unsafe {
        if estimate > (*job).peak {
            (*job).peak = estimate;
        }
    }
    let over_job = over_budget(n, prev, elapsed, params, allowance);
    // The levels above the job (its login session or service unit, the user who logged in) count
    // every deletion outside scope too, so that a job per file (`setsid rm` in a loop) does not
    // start a fresh budget each time. A level past its budget holds the job that crossed it,
    // unless an admin approved that job (every approval leaves a non-zero `allowance`): it goes
    // on under its own budget, and the level's next job is held.
    let mut level_hit = 0u64;
    if params.flags & RULE_FLAG_NO_LEVELS == 0 {
        level_hit = charge_levels(slot, new_job, now, rule_audit as u64);
        if allowance != 0 {
            level_hit = 0;
        }
    }
    if !over_job && level_hit == 0 {
        return Verdict::Allow;
    }

    // 4. Past the budget: the job's own first; else the level's action, count and job count.
    let (action, level_flags, count, jobs) = match level_hit_unpack(level_hit) {
        Some((level, action, jobs, count)) if !over_job => {
            (action, level_event_flag(level), count, jobs as u32)
        }
        _ => (params.action, 0, n, 0),
    };
    // SAFETY: as above.
    let already_reported = unsafe { (*job).incident } != 0;
    if rule_audit || action == ACTION_ALERT {
        if !already_reported {
            let inc = next_incident();
            // SAFETY: as above.
            unsafe { (*job).incident = inc };
            let flags = if rule_audit { EVF_AUDIT } else { EVF_ALERT };
            emit(
                d,
                &Report {
                    kind: EV_BUDGET_CROSSED,
                    flags: flags | level_flags,
                    rule,
                    data_dir_id: jobs,
                    count,
                    incident: inc,
                },
            );
        }
        return Verdict::Allow;
    }
    if let Some(unit) = unit_lookup(&NEVER_HOLD, slot) {
        let lsm = d.tier_flags & EVF_TRACEPOINT == 0;
        let inc = never_hold_crossing(lsm, job);
        if inc != 0 {
            emit(
                d,
                &Report {
                    kind: EV_BUDGET_CROSSED,
                    flags: level_flags
                        | if lsm {
                            EVF_NEVER_HOLD | EVF_REFUSED
                        } else {
                            EVF_NEVER_HOLD
                        },
                    rule,
                    data_dir_id: unit,
                    count,
                    incident: inc,
                },
            );
        }
        return if lsm { Verdict::Refuse } else { Verdict::Allow };
    }
    let new_state = if action == ACTION_BLOCK {
        JOB_BLOCKED
    } else {
        JOB_HELD
    };
    let mut stopped = false;
    if cas(state_p, JOB_ACTIVE, new_state) {
        // This CPU made the crossing: it alone reports it.
        let inc = next_incident();
        // SAFETY: helper without preconditions.
        let held_ns = unsafe { bpf_ktime_get_boot_ns() };
        // SAFETY: as above.
        unsafe {
            (*job).incident = inc;
            (*job).held_ns = held_ns;
        }
        remember_held(&key, new_state, rule, inc, held_ns);
        let mut flags = d.tier_flags | level_flags;
        if d.tier_flags & EVF_TRACEPOINT == 0 {
            flags |= EVF_REFUSED;
        }
        if new_state == JOB_HELD {
            stopped = stop_self();
            flags |= EVF_SIGNALLED;
        } else {
            flags |= EVF_BLOCKED;
            if d.tier_flags & EVF_TRACEPOINT != 0 {
                signal(SIGKILL);
                flags |= EVF_SIGNALLED;
            }
        }
        emit(
            d,
            &Report {
                kind: EV_BUDGET_CROSSED,
                flags,
                rule,
                data_dir_id: jobs,
                count,
                incident: inc,
            },
        );
    } else if new_state == JOB_HELD {
        stopped = stop_self();
    } else if d.tier_flags & EVF_TRACEPOINT != 0 {
        signal(SIGKILL);
    }
    fetch_add(refused_p, 1);
    if stopped {
        Verdict::Hold
    } else {
        Verdict::Refuse
    }
}

/// Counts one deletion outside scope at the levels above its job: its login session (audit
/// session id) or, for a service (no session), its unit; and the user who logged in (audit login
/// uid, across their sessions). Returns the first level now past its budget, packed (see
/// [`level_hit_pack`]), or 0. `alert` levels, and every level while `once` is set (audit), report
/// one crossing per window, not one per job.
///
/// A leaf of `judge`, like [`never_hold_crossing`]: it reads only the two offsets it needs (not
/// the whole offsets struct) and keeps its key small, since its frame sits where emit's does.
#[inline(never)]
fn charge_levels(slot: u32, new_job: u64, now: u64, once: u64) -> u64 {
    // SAFETY: as for `offsets`: single fields of the read-only global.
    let (session_off, loginuid_off) = unsafe {
        (
            read_volatile(core::ptr::addr_of!(OFFSETS.task_sessionid)),
            read_volatile(core::ptr::addr_of!(OFFSETS.task_loginuid)),
        )
    };
    let task = current_task();
    let session: u32 = kread(task, session_off).unwrap_or(AUDIT_SESSION_UNSET);
    let mut key = LevelKey {
        id: session as u64,
        level: LEVEL_SESSION,
        _pad: 0,
    };
    if session == AUDIT_SESSION_UNSET {
        // A service: its unit, the cgroup two levels down (system.slice/x.service), so that a
        // service's sub-cgroups (or a user's delegated ones) share one entry. A task in a
        // shallower cgroup (the root, a slice itself: a host or container without systemd puts
        // everything there) has no unit: counting it there would lump every unrelated process
        // together and hold whichever crossed, so it is budgeted per job only.
        // SAFETY: helper without preconditions; 0 when the cgroup is shallower.
        let top = unsafe { bpf_get_current_ancestor_cgroup_id(2) };
        if top == 0 {
            return 0;
        }
        key.level = LEVEL_UNIT;
        key.id = top;
        return charge_level(&key, slot, new_job, now, once);
    }
    let hit = charge_level(&key, slot, new_job, now, once);
    let loginuid: u32 = kread(task, loginuid_off).unwrap_or(u32::MAX);
    if loginuid == u32::MAX {
        return hit;
    }
    key.level = LEVEL_USER;
    key.id = loginuid as u64;
    let user_hit = charge_level(&key, slot, new_job, now, once);
    if hit != 0 { hit } else { user_hit }
}

/// One level's count: the same sliding window as a job's (see [`sliding_estimate`]).
#[inline(always)]
fn charge_level(key: &LevelKey, slot: u32, new_job: u64, now: u64, once: u64) -> u64 {
    let Some(p) = LEVEL_PARAMS.get(slot * LEVELS + (key.level % LEVELS)) else {
        return 0;
    };
    if p.flags & LEVEL_FLAG_ON == 0 {
        return 0;
    }
    let (budget, window, action) = (p.budget, p.window_ns, p.action);
    let st = match LEVEL_COUNTS.get_ptr_mut(key) {
        Some(st) => st,
        None => {
            let Some(fresh) = LEVEL_INIT.get_ptr_mut(0) else {
                return 0;
            };
            // SAFETY: this CPU's scratch value; every field is written.
            unsafe {
                (*fresh) = LevelState::default();
                (*fresh).window_start_ns = now;
                // BPF_NOEXIST: a racing CPU may have made it; either way look it up again.
                let _ = LEVEL_COUNTS.insert(key, &*fresh, 1);
            }
            match LEVEL_COUNTS.get_ptr_mut(key) {
                Some(st) => st,
                None => return 0,
            }
        }
    };
    // SAFETY: field addresses of a map value valid for this run; counters change by atomics.
    let (count_p, jobs_p, reported_p) = unsafe {
        (
            addr_of_mut!((*st).count),
            addr_of_mut!((*st).jobs),
            addr_of_mut!((*st).reported),
        )
    };
    // SAFETY: as above; races here only blur the window edge.
    let start = unsafe { (*st).window_start_ns };
    let mut elapsed = now.saturating_sub(start);
    if window != 0 && elapsed >= window {
        let old = swap(count_p, 0);
        let old_jobs = swap(jobs_p, 0);
        let stale = elapsed >= 2 * window;
        // SAFETY: as above.
        unsafe {
            (*st).prev_count = if stale { 0 } else { old };
            (*st).prev_jobs = if stale { 0 } else { old_jobs };
            (*st).window_start_ns = now;
        }
        swap(reported_p, 0);
        elapsed = 0;
    }
    let n = fetch_add(count_p, 1) + 1;
    let jobs = fetch_add(jobs_p, new_job) + new_job;
    // SAFETY: as above.
    let (prev, prev_jobs) = unsafe { ((*st).prev_count, (*st).prev_jobs) };
    let estimate = sliding_estimate(n, prev, elapsed, window);
    if estimate <= budget {
        return 0;
    }
    if (action == ACTION_ALERT || once != 0) && swap(reported_p, 1) != 0 {
        return 0;
    }
    level_hit_pack(key.level, action, jobs + prev_jobs, estimate)
}

/// Whether the current task belongs to the agent named by (`agent_tgid`, start time range): the
/// start time of its thread group leader must match too, so a process that got a dead agent's
/// pid is judged like any other.
#[inline(always)]
pub(crate) fn is_current_agent(o: &KernelOffsets, agent_tgid: u32, lo: u64, hi: u64) -> bool {
    if o.task_start_boottime == 0 || o.task_group_leader == 0 {
        return false;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Ok(leader) = kptr(current_task(), o.task_group_leader) else {
        return false;
    };
    let start: u64 = kread(leader, o.task_start_boottime).unwrap_or(0);
    is_agent(tgid, start, agent_tgid, lo, hi)
}

/// A job found active in `JOBS` while `HELD` says it is held, denied or blocked (its counters were
/// evicted by a flood of new jobs, and the entry made afresh): the held state comes back before
/// the deletion is judged, so `kill -CONT` never buys a fresh budget. Returns the state to act on.
#[inline(never)]
fn restore_held(key: &JobKey, job: *mut JobState) -> u32 {
    // SAFETY: map value pointer valid for this run.
    let Some(h) = (unsafe { HELD.get(key) }) else {
        return JOB_ACTIVE;
    };
    let (held_state, incident, held_ns) = (h.state, h.incident, h.held_ns);
    if held_state == JOB_ACTIVE {
        return JOB_ACTIVE;
    }
    // SAFETY: `job` points into a JOBS value valid for this run.
    let state_p = unsafe { addr_of_mut!((*job).state) };
    if cas(state_p, JOB_ACTIVE, held_state) {
        // SAFETY: as above.
        unsafe {
            (*job).incident = incident;
            (*job).held_ns = held_ns;
        }
    }
    // SAFETY: as above.
    unsafe { read_volatile(state_p) }
}

/// A held job that resumed itself `SELF_RESUME_LIMIT` times (tracepoint tier): SIGKILL to this
/// task, and the job blocked (in `JOBS` and `HELD`), so that every further deletion of any of its
/// tasks kills that task too until the agent has killed the whole job. Returns whether this CPU
/// made the change (it alone reports it). A leaf: `judge` calls it beside `emit`, never above it.
#[inline(never)]
fn block_resumed(key: &JobKey, job: *mut JobState) -> bool {
    signal(SIGKILL);
    // SAFETY: field address of a valid map value (see `judge`).
    let state_p = unsafe { addr_of_mut!((*job).state) };
    if !cas(state_p, JOB_HELD, JOB_BLOCKED) {
        return false;
    }
    // SAFETY: plain fields of the map value.
    let h = unsafe {
        HeldJob {
            state: JOB_BLOCKED,
            rule: (*job).rule,
            incident: (*job).incident,
            held_ns: (*job).held_ns,
        }
    };
    let _ = HELD.insert(key, &h, 0);
    true
}

/// Records a crossing in `HELD`, where no flood of new jobs can evict it.
#[inline(never)]
fn remember_held(key: &JobKey, state: u32, rule: u32, incident: u64, held_ns: u64) {
    let h = HeldJob {
        state,
        rule,
        incident,
        held_ns,
    };
    // Full map (the agent alerts at 80 %): the JOBS entry still holds the job.
    let _ = HELD.insert(key, &h, 0);
}

/// Reports a refusal (protected root, foreign data directory) once per job and kind, then at
/// the 2nd, 3rd, 5th, 9th, ... (powers of two): a foreign `rm -rf` of a large tree is a handful
/// of events with its running count, never one per file.
#[inline(never)]
fn emit_refusal(d: &Deletion, r: &mut Report, job: &JobKey) {
    let key = RefusalKey {
        sid: job.sid,
        pgid: job.pgid,
        kind: r.kind,
        _pad: 0,
    };
    // BPF_NOEXIST: a racing CPU may have created it.
    let _ = REFUSALS.insert(&key, &0, 1);
    let n = match REFUSALS.get_ptr_mut(&key) {
        Some(p) => fetch_add(p, 1),
        None => 0,
    };
    if n == 0 || n.is_power_of_two() {
        r.count = n + 1;
        emit(d, r);
    }
}

/// Whether an exec may tag its process with the rule of its executable: only when root started
/// it (real and effective uid 0) or the user the policy names for that same rule (a data
/// directory's owner set listing both the program and its user). Any other user running an
/// exempt or owning program (logrotate with their own configuration, systemd-tmpfiles with their
/// own rules) gets nothing from it.
#[inline(always)]
fn exec_may_tag(o: &KernelOffsets, slot: u32, rule: u32) -> bool {
    let uid = bpf_get_current_uid_gid() as u32;
    let euid: u32 = match kptr(current_task(), o.task_cred) {
        Ok(cred) if o.task_cred != 0 && o.cred_euid != 0 => kread(cred, o.cred_euid).unwrap_or(1),
        _ => 1,
    };
    if uid == 0 && euid == 0 {
        return true;
    }
    // SAFETY: map value pointer valid for this run.
    match unsafe { UIDS.get(&UidKey { uid, slot }) } {
        Some(r) => *r == rule && uid != 0,
        None => false,
    }
}

/// Sends SIGSTOP to the current process; true when it is now pending for a task that will see it
/// on its way back to userspace (not a kernel thread, not an io_uring worker, whose requests would
/// otherwise complete with the restart code).
#[inline(always)]
fn stop_self() -> bool {
    let o = offsets();
    let flags: u32 = kread(current_task(), o.task_flags).unwrap_or(PF_KTHREAD);
    if flags & (PF_KTHREAD | PF_IO_WORKER) != 0 {
        signal(SIGSTOP);
        return false;
    }
    // SAFETY: bpf_send_signal targets the current process.
    (unsafe { bpf_send_signal(SIGSTOP) }) == 0
}

#[inline(always)]
fn signal(sig: u32) {
    // SAFETY: bpf_send_signal targets the current process; failures (kernel threads) are
    // ignored because the agent stops the whole job from userspace as well.
    let _ = unsafe { bpf_send_signal(sig) };
}

fn next_incident() -> u64 {
    match INCIDENTS.get_ptr_mut(0) {
        Some(p) => fetch_add(p, 1) + 1,
        None => 1,
    }
}

/// What an event reports besides the deletion itself (BPF calls take at most five arguments).
#[derive(Clone, Copy)]
struct Report {
    kind: u32,
    flags: u32,
    rule: u32,
    data_dir_id: u32,
    count: u64,
    incident: u64,
}

/// Sends one event to the agent. Called only on state changes.
#[inline(never)]
fn emit(d: &Deletion, r: &Report) {
    let Report {
        kind,
        flags,
        rule,
        data_dir_id,
        count,
        incident,
    } = *r;
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        return;
    };
    let ev = entry.as_mut_ptr();
    let o = offsets();
    let task = current_task();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `ev` points to a reserved ring buffer record of the right size; every field is
    // written before submit.
    unsafe {
        (*ev).kind = kind;
        (*ev).flags = flags | d.tier_flags;
        (*ev).rule = rule;
        (*ev).data_dir_id = data_dir_id;
        (*ev).tgid = (pid_tgid >> 32) as u32;
        (*ev).pid = pid_tgid as u32;
        let key = job_key(&o, task, (pid_tgid >> 32) as u32);
        (*ev).pgid = key.pgid;
        (*ev).sid = key.sid;
        (*ev).uid = bpf_get_current_uid_gid() as u32;
        (*ev).loginuid = kread(task, o.task_loginuid).unwrap_or(u32::MAX);
        (*ev).audit_session = kread(task, o.task_sessionid).unwrap_or(u32::MAX);
        (*ev).op = d.op;
        (*ev).count = count;
        (*ev).incident = incident;
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        let mut i = 0;
        while i < EVENT_PATH_DEPTH {
            (*ev).path[i][0] = 0;
            i += 1;
        }
        // Innermost name first: the entry itself (LSM) or the path as passed (tracepoint),
        // then the names of the directories above.
        let mut level = 0usize;
        if !d.entry.is_null() {
            if let Ok(name) = kptr(d.entry, o.dentry_d_name_name) {
                let _ = bpf_probe_read_kernel_str_bytes(name, &mut (*ev).path[0]);
            }
            level = 1;
        } else if !d.user_path.is_null() {
            let _ = bpf_probe_read_user_str_bytes(d.user_path, &mut (*ev).path[0]);
            level = 1;
        }
        let mut dentry = d.parent;
        while level < EVENT_PATH_DEPTH && !dentry.is_null() {
            if let Ok(name) = kptr(dentry, o.dentry_d_name_name) {
                let _ = bpf_probe_read_kernel_str_bytes(name, &mut (*ev).path[level]);
            }
            let Ok(parent) = kptr(dentry, o.dentry_d_parent) else {
                break;
            };
            if parent == dentry {
                break;
            }
            dentry = parent;
            level += 1;
        }
    }
    entry.submit(0);
}

// --- LSM tier --------------------------------------------------------------------------------

#[inline(always)]
fn lsm_verdict(v: Verdict) -> i32 {
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

/// S_IFDIR in inode.i_mode (the first field of struct inode on every supported kernel is
/// i_mode, a umode_t at offset 0).
#[inline(always)]
fn is_dir(o: &KernelOffsets, dentry: *const u8) -> bool {
    let Ok(inode) = kptr(dentry, o.dentry_d_inode) else {
        return false;
    };
    let mode: u16 = kread(inode, 0).unwrap_or(0);
    mode & 0o170000 == 0o040000
}

#[inline(always)]
fn is_protected_entry(o: &KernelOffsets, dentry: *const u8) -> bool {
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

/// Attached for a moment by the capability probe: a hit from the agent's own `stat` proves that
/// this kernel runs BPF LSM programs (loading alone does not: the hook must really fire).
#[lsm(hook = "inode_getattr")]
pub fn probe_lsm(_ctx: LsmContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if let Some(t) = SELFTEST_TARGET.get(0) {
        if *t == tgid && tgid != 0 {
            if let Some(p) = PROBE_LSM_HITS.get_ptr_mut(0) {
                fetch_add(p, 1);
            }
        }
    }
    0
}

// --- tracepoint tier -------------------------------------------------------------------------

/// Syscall tracepoint records: 8 bytes of common fields, the syscall number, then each argument
/// as a 64-bit slot.
#[inline(always)]
fn sys_arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: reading inside the tracepoint record; failures read as 0.
    unsafe { ctx.read_at::<u64>(16 + 8 * n) }.unwrap_or(0)
}

/// The directory a syscall's relative path starts from: the file behind `dfd`, or the cwd.
/// Absolute paths start from the root, whose ancestors tell nothing: the tracepoint tier then
/// judges by the task's cwd is NOT done; see the tier's documented approximations.
#[inline(always)]
fn base_dentry(o: &KernelOffsets, dfd: i64, path: *const u8) -> *const u8 {
    let task = current_task();
    let first: u8 = {
        let mut b = [0u8; 1];
        // SAFETY: user memory read with fault handling.
        match unsafe { aya_ebpf::helpers::bpf_probe_read_user_buf(path, &mut b) } {
            Ok(()) => b[0],
            Err(_) => 0,
        }
    };
    if first == b'/' {
        return core::ptr::null();
    }
    if dfd == AT_FDCWD {
        let Ok(fs) = kptr(task, o.task_fs) else {
            return core::ptr::null();
        };
        return kptr(fs, o.fs_pwd + o.path_dentry).unwrap_or(core::ptr::null());
    }
    let Ok(files) = kptr(task, o.task_files) else {
        return core::ptr::null();
    };
    let Ok(fdt) = kptr(files, o.files_fdt) else {
        return core::ptr::null();
    };
    let max: u32 = kread(fdt, o.fdt_max_fds).unwrap_or(0);
    if dfd < 0 || dfd as u64 >= max as u64 {
        return core::ptr::null();
    }
    let Ok(fd_array) = kptr(fdt, o.fdt_fd) else {
        return core::ptr::null();
    };
    let Ok(file) = kptr(fd_array, (dfd as u32) * 8) else {
        return core::ptr::null();
    };
    kptr(file, o.file_f_path + o.path_dentry).unwrap_or(core::ptr::null())
}

#[inline(always)]
fn tp_delete(dfd: i64, path: *const u8, op: u32) -> u32 {
    let o = offsets();
    let parent = base_dentry(&o, dfd, path);
    let d = Deletion {
        parent,
        entry: core::ptr::null(),
        user_path: path,
        op,
        tier_flags: EVF_TRACEPOINT,
    };
    if judge(&d) == Verdict::StopForeign {
        tp_stop_foreign(&d);
    }
    0
}

/// A deletion in a data directory the job is not named for, seen by the tracepoint tier after the
/// fact (the file is gone): the job is held from this first file, like a budget crossing (JOB_HELD,
/// `HELD` entry, incident from the kernel counter, SIGSTOP to this task; the agent stops the rest of
/// the job), or killed under a `block` rule. A job already held is stopped again, a blocked or
/// denied one killed. A job approved `--for-job` (no budget) deletes on. A `never_hold` unit's job
/// is never stopped: the deletion is only reported (rate-limited, like a refusal).
///
/// Called by the hook after `judge` has returned, so its frame sits where judge's was: the chain
/// (program -> this -> emit_refusal -> emit) is no deeper than (program -> judge -> emit_refusal
/// -> emit).
#[inline(never)]
fn tp_stop_foreign(d: &Deletion) {
    let Some(f) = FOREIGN.get(0) else { return };
    let (data_dir_id, rule) = (f[0], f[1] & (MAX_RULES - 1));
    let Some(cfg) = config() else { return };
    let slot = cfg.active_slot & 1;
    let Some(params) = RULES.get(slot * MAX_RULES + rule) else {
        return;
    };
    let o = offsets();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let key = job_key(&o, current_task(), tgid);
    if unit_lookup(&NEVER_HOLD, slot).is_some() {
        emit_refusal(
            d,
            &mut Report {
                kind: EV_DATA_DIR,
                flags: EVF_NEVER_HOLD,
                rule,
                data_dir_id,
                count: 0,
                incident: 0,
            },
            &key,
        );
        return;
    }
    let job = match JOBS.get_ptr_mut(&key) {
        Some(j) => j,
        None => {
            let Some(fresh) = JOB_INIT.get_ptr_mut(0) else {
                return;
            };
            // SAFETY: helper without preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            // SAFETY: `fresh` points to this CPU's scratch value; every field is written.
            unsafe {
                (*fresh) = JobState::default();
                (*fresh).state = JOB_ACTIVE;
                (*fresh).rule = rule;
                (*fresh).window_start_ns = now;
                (*fresh).first_ns = now;
                (*fresh).uid = bpf_get_current_uid_gid() as u32;
                (*fresh).cgroup_id = bpf_get_current_cgroup_id();
                if let Ok(comm) = bpf_get_current_comm() {
                    (*fresh).comm = comm;
                }
                let _ = JOBS.insert(&key, &*fresh, 1);
            }
            match JOBS.get_ptr_mut(&key) {
                Some(j) => j,
                None => return,
            }
        }
    };
    // SAFETY: field address of a valid map value.
    let state_p = unsafe { addr_of_mut!((*job).state) };
    // SAFETY: as above.
    let mut state = unsafe { read_volatile(state_p) };
    if state == JOB_ACTIVE {
        state = restore_held(&key, job);
    }
    if state == JOB_ACTIVE {
        // SAFETY: plain field of the map value.
        if unsafe { (*job).allowance } == ALLOWANCE_UNLIMITED {
            return;
        }
        let new_state = if params.action == ACTION_BLOCK {
            JOB_BLOCKED
        } else {
            JOB_HELD
        };
        if cas(state_p, JOB_ACTIVE, new_state) {
            // This CPU made the change: it alone reports it.
            let inc = next_incident();
            // SAFETY: helper without preconditions.
            let held_ns = unsafe { bpf_ktime_get_boot_ns() };
            // SAFETY: plain fields of the map value.
            unsafe {
                (*job).incident = inc;
                (*job).held_ns = held_ns;
            }
            remember_held(&key, new_state, rule, inc, held_ns);
            // Counted like a budget crossing, so that self-resumes count alike (see `judge`).
            // SAFETY: field address of a valid map value.
            fetch_add(unsafe { addr_of_mut!((*job).refused) }, 1);
            if new_state == JOB_HELD {
                stop_self();
            } else {
                signal(SIGKILL);
            }
            emit(
                d,
                &Report {
                    kind: EV_DATA_DIR,
                    flags: if new_state == JOB_HELD {
                        EVF_SIGNALLED
                    } else {
                        EVF_SIGNALLED | EVF_BLOCKED
                    },
                    rule,
                    data_dir_id,
                    count: 1,
                    incident: inc,
                },
            );
            return;
        }
        // SAFETY: as above.
        state = unsafe { read_volatile(state_p) };
    }
    if state == JOB_HELD {
        // Resumed without approval: stopped again, and the agent told (as `judge` does) so that
        // it re-stops the whole job; killed at SELF_RESUME_LIMIT, as in `judge`.
        // SAFETY: field address of a valid map value.
        let n = fetch_add(unsafe { addr_of_mut!((*job).refused) }, 1);
        let kill = n >= SELF_RESUME_LIMIT;
        let first_kill = if kill {
            block_resumed(&key, job)
        } else {
            stop_self();
            false
        };
        if first_kill || (!kill && (n == 0 || n.is_power_of_two())) {
            emit(
                d,
                &Report {
                    kind: EV_HELD_RETRY,
                    flags: if kill {
                        EVF_SIGNALLED | EVF_KILLED
                    } else {
                        EVF_SIGNALLED
                    },
                    rule,
                    data_dir_id: 0,
                    count: n + 1,
                    incident: 0,
                },
            );
        }
    } else if state == JOB_BLOCKED || state == JOB_DENIED {
        signal(SIGKILL);
    }
}

#[tracepoint(category = "syscalls", name = "sys_enter_unlinkat")]
pub fn sys_enter_unlinkat(ctx: TracePointContext) -> u32 {
    let flags = sys_arg(&ctx, 2);
    let op = if flags & 0x200 != 0 {
        OP_RMDIR
    } else {
        OP_UNLINK
    };
    tp_delete(sys_arg(&ctx, 0) as i64, sys_arg(&ctx, 1) as *const u8, op)
}

#[tracepoint(category = "syscalls", name = "sys_enter_unlink")]
pub fn sys_enter_unlink(ctx: TracePointContext) -> u32 {
    tp_delete(AT_FDCWD, sys_arg(&ctx, 0) as *const u8, OP_UNLINK)
}

#[tracepoint(category = "syscalls", name = "sys_enter_rmdir")]
pub fn sys_enter_rmdir(ctx: TracePointContext) -> u32 {
    tp_delete(AT_FDCWD, sys_arg(&ctx, 0) as *const u8, OP_RMDIR)
}

/// The tracepoint tier cannot tell whether a rename replaces an existing file (no hook sees the
/// destination's inode): every rename whose destination is outside scope counts, a documented
/// over-approximation.
#[tracepoint(category = "syscalls", name = "sys_enter_rename")]
pub fn sys_enter_rename(ctx: TracePointContext) -> u32 {
    tp_delete(AT_FDCWD, sys_arg(&ctx, 1) as *const u8, OP_RENAME)
}

#[tracepoint(category = "syscalls", name = "sys_enter_renameat")]
pub fn sys_enter_renameat(ctx: TracePointContext) -> u32 {
    tp_delete(
        sys_arg(&ctx, 2) as i64,
        sys_arg(&ctx, 3) as *const u8,
        OP_RENAME,
    )
}

#[tracepoint(category = "syscalls", name = "sys_enter_renameat2")]
pub fn sys_enter_renameat2(ctx: TracePointContext) -> u32 {
    tp_delete(
        sys_arg(&ctx, 2) as i64,
        sys_arg(&ctx, 3) as *const u8,
        OP_RENAME,
    )
}

/// io_uring requests never pass the syscall tracepoints; the submit tracepoint shows the opcode
/// (its offset in the record is resolved from the tracepoint's format file). No path is known
/// here, so io_uring deletions always count against the budget in this tier.
#[tracepoint(category = "io_uring", name = "io_uring_submit_req")]
pub fn io_uring_submit_req(ctx: TracePointContext) -> u32 {
    let o = offsets();
    if o.io_uring_opcode == 0 {
        return 0;
    }
    // SAFETY: reading inside the tracepoint record.
    let opcode: u8 = unsafe { ctx.read_at::<u8>(o.io_uring_opcode as usize) }.unwrap_or(0);
    let op = match opcode {
        IORING_OP_UNLINKAT => OP_IO_URING_UNLINK,
        IORING_OP_RENAMEAT => OP_IO_URING_RENAME,
        _ => return 0,
    };
    let d = Deletion {
        parent: core::ptr::null(),
        entry: core::ptr::null(),
        user_path: core::ptr::null(),
        op,
        tier_flags: EVF_TRACEPOINT | EVF_IO_URING,
    };
    let _ = judge(&d);
    0
}

// --- process tagging (both tiers) --------------------------------------------------------------

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`: a
/// process whose new executable matches a rule is tagged with it; children inherit the tag.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    let o = offsets();
    if o.valid == 0 {
        return 0;
    }
    let Some(cfg) = config() else { return 0 };
    let task = current_task();
    let Ok(mm) = kptr(task, o.task_mm) else {
        return 0;
    };
    let Ok(exe) = kptr(mm, o.mm_exe_file) else {
        return 0;
    };
    let Ok(inode) = kptr(exe, o.file_f_inode) else {
        return 0;
    };
    let Ok(ino) = kread::<u64>(inode, o.inode_i_ino) else {
        return 0;
    };
    let Ok(sb) = kptr(inode, o.inode_i_sb) else {
        return 0;
    };
    let Ok(dev) = kread::<u32>(sb, o.sb_s_dev) else {
        return 0;
    };
    let key = ExeKey {
        dev: dev as u64,
        ino,
        slot: cfg.active_slot & 1,
        _pad: 0,
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: map value pointer valid for this run.
    match unsafe { EXES.get(&key) }.copied() {
        Some(rule) if exec_may_tag(&o, key.slot, rule) => {
            let _ = TASK_RULE.insert(&tgid, &rule, 0);
        }
        // A program not on the list (a shell started from a pager or from a cleaner's script),
        // or a listed one run by a user it does not count for: the tag inherited at fork goes.
        _ => {
            let _ = TASK_RULE.remove(&tgid);
        }
    }
    0
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    let o = offsets();
    if o.valid == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: raw tracepoint arguments are the hook's arguments.
    let args = ctx.as_ptr() as *const u64;
    // SAFETY: the context holds the two task pointers.
    let child = unsafe { bpf_probe_read_kernel(args.add(1)) }.unwrap_or(0) as *const u8;
    if child.is_null() {
        return 0;
    }
    let Ok(child_tgid) = kread::<u32>(child, o.task_tgid) else {
        return 0;
    };
    if child_tgid == tgid {
        // A new thread: it shares its process's entry.
        return 0;
    }
    // Every new process is born here, so this is where its entry is made right: the parent's
    // rule, or none. Entries are never removed at exit; without the removal a process that got
    // an exited one's pid would inherit its rule (an exempt package manager's, say).
    // SAFETY: map value pointer valid for this run.
    match (unsafe { TASK_RULE.get(&tgid) }).copied() {
        Some(rule) => {
            let _ = TASK_RULE.insert(&child_tgid, &rule, 0);
        }
        None => {
            let _ = TASK_RULE.remove(&child_tgid);
        }
    }
    0
}

// --- self-test: offsets read on this kernel, compared with /proc by the agent -----------------

#[tracepoint(category = "syscalls", name = "sys_enter_getpgid")]
pub fn selftest_getpgid(_ctx: TracePointContext) -> u32 {
    let o = offsets();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    match SELFTEST_TARGET.get(0) {
        Some(t) if *t == tgid && tgid != 0 => {}
        _ => return 0,
    }
    let Some(ans) = SELFTEST.get_ptr_mut(0) else {
        return 0;
    };
    let task = current_task();
    // SAFETY: `ans` points into the one-element array map, valid for this run.
    unsafe {
        (*ans).tgid = kread(task, o.task_tgid).unwrap_or(0);
        (*ans).pid = kread(task, o.task_pid).unwrap_or(0);
        (*ans).pgid = task_pid_of_type(&o, task, o.pidtype_pgid).unwrap_or(0);
        (*ans).sid = task_pid_of_type(&o, task, o.pidtype_sid).unwrap_or(0);
        (*ans).loginuid = kread(task, o.task_loginuid).unwrap_or(0);
        (*ans).sessionid = kread(task, o.task_sessionid).unwrap_or(0);
        if let Ok(fs) = kptr(task, o.task_fs) {
            if let Ok(cwd) = kptr(fs, o.fs_pwd + o.path_dentry) {
                if let Ok((dev, ino)) = dentry_identity(&o, cwd) {
                    (*ans).cwd_dev = dev;
                    (*ans).cwd_ino = ino;
                }
            }
        }
        if let Ok(mm) = kptr(task, o.task_mm) {
            if let Ok(exe) = kptr(mm, o.mm_exe_file) {
                if let Ok(inode) = kptr(exe, o.file_f_inode) {
                    (*ans).exe_ino = kread(inode, o.inode_i_ino).unwrap_or(0);
                    if let Ok(sb) = kptr(inode, o.inode_i_sb) {
                        (*ans).exe_dev = kread::<u32>(sb, o.sb_s_dev).unwrap_or(0) as u64;
                    }
                }
            }
        }
        (*ans).hits += 1;
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

// Keep the ctx type import used on every configuration.
const _: fn(*mut c_void) -> TracePointContext = TracePointContext::new;
