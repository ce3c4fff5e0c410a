//! The remote-shutdown guard (issue 5): every shutdown-class request is attributed to the
//! caller's audit session (`task_struct.sessionid`, set only by pam_loginuid and inherited
//! through sudo, su, setsid and tmux servers) and judged in the kernel from the class the agent
//! pushed for that session (`SD_SESSIONS`), with no round trip to userspace.
//!
//! - argv is captured at `sys_enter_execve*` (the only moment the caller's argv is plainly in its
//!   memory), hashed word by word and looked up in `SD_WORDS` (no string compare loops), and kept
//!   per thread in `SD_ARGS`.
//! - LSM tier: `bprm_check_security` refuses the exec of a shutdown program (matched by file
//!   identity in `SD_EXES`, and for multi-call binaries by argv), `capable(CAP_SYS_BOOT)` refuses
//!   reboot(2)/kexec, `file_open` refuses writes to /proc/sysrq-trigger, `task_kill` refuses the
//!   signals that shut PID 1 down.
//! - fmod_ret tier: the same bodies on `security_bprm_check`, `security_capable`,
//!   `security_file_open` and `security_task_kill` (fmodret.rs).
//! - Tracepoint tier: at `sched_process_exec` the exec'd shutdown program is stopped before its
//!   first instruction (see [`sd_exec_tp`]).
//!
//! A refused task also gets SIGSTOP from the kernel: the agent writes the refusal message to its
//! terminal (or stderr) while the task still holds it, then continues it (LSM: the task goes on
//! with EPERM) or kills it (tracepoint tier). These programs are pinned and outlive a crashed or
//! restarting agent; while no agent renews `ShutdownConfig::alive_until_ns`, a refused task is
//! not stopped (LSM: plain EPERM) or is killed by the kernel (tracepoint tier).
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user_str_bytes, bpf_send_signal,
    },
    macros::{lsm, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{LsmContext, RawTracePointContext, TracePointContext},
};
use core::ptr::read_volatile;
use guardrail_common::*;

use crate::kernel::{
    EPERM,
    events::EVENTS,
    offsets::{kptr, kread, offsets},
    task::{current_task, is_current_agent},
};

const SIGKILL: u32 = 9;
const SIGSTOP: u32 = 19;
const CAP_SYS_BOOT: i32 = 22;
const FMODE_WRITE: u32 = 0x2;
const PROC_SUPER_MAGIC: u64 = 0x9fa0;
/// How many ancestors are checked against the exception executables.
const EXCEPTION_DEPTH: u32 = 6;

/// Resolved by the agent from /sys/kernel/btf/vmlinux before load.
#[unsafe(no_mangle)]
static SD_OFFSETS: SdOffsets = SdOffsets {
    bprm_file: 0,
    file_f_mode: 0,
    sb_s_magic: 0,
    valid: 0,
};

#[map]
static SD_CONFIG: Array<ShutdownConfig> = Array::with_max_entries(1, 0);
/// audit session id → `SD_CLASS_*`, pushed by the agent. Only the agent writes it: allocated as
/// entries are added, like the deletion guard's policy tables (deletion/maps.rs).
#[map]
static SD_SESSIONS: HashMap<u32, u32> =
    HashMap::with_max_entries(16384, crate::deletion::maps::POLICY_TABLE);
/// Session ids already reported as new (so each is reported once).
#[map]
static SD_SEEN: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);
/// audit session id → expiry (ktime ns) of a single-use confirmation pass.
#[map]
static SD_PASSES: HashMap<u32, u64> = HashMap::with_max_entries(1024, 0);
/// tgid → expiry of "this process used a pass": its own further shutdown steps (poweroff execs,
/// then calls reboot(2)) belong to the same confirmed request.
#[map]
static SD_CLEARED: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1024, 0);
/// Shutdown programs by file identity → `SD_EXE_*`.
#[map]
static SD_EXES: HashMap<FileId, u32> = HashMap::with_max_entries(256, 0);
/// Executables that may always shut down (`[[shutdown.exception]] executables`).
#[map]
static SD_EXCEPT_EXES: HashMap<FileId, u32> = HashMap::with_max_entries(256, 0);
/// cgroup ids of units that may always shut down (`[[shutdown.exception]] units`).
#[map]
static SD_EXCEPT_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(256, 0);
/// word_hash(word) → `SD_W_*` flags.
#[map]
static SD_WORDS: HashMap<u64, u32> = HashMap::with_max_entries(256, 0);
/// thread id → what its last execve's argv looked like.
#[map]
static SD_ARGS: LruHashMap<u32, SdArgs> = LruHashMap::with_max_entries(8192, 0);
#[map]
static SD_SCRATCH: PerCpuArray<SdArgs> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SD_BUF: PerCpuArray<[u8; 128]> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SD_EVSCRATCH: PerCpuArray<ShutdownEvent> = PerCpuArray::with_max_entries(1, 0);
/// Callers stopped to wait for their refusal message, by tgid, with the event that told the
/// agent. Pinned: if the agent dies before it answered, the next one finds them here, writes the
/// message and ends (or continues) them. The agent deletes an entry once it answered.
#[map]
static SD_STOPPED: LruHashMap<u32, ShutdownEvent> = LruHashMap::with_max_entries(1024, 0);

#[inline(always)]
fn sd_offsets() -> SdOffsets {
    // SAFETY: read-only global rewritten by the loader; volatile so the zero initialiser is not
    // folded.
    unsafe { read_volatile(&SD_OFFSETS) }
}

#[inline(always)]
fn sd_config() -> Option<&'static ShutdownConfig> {
    let c = SD_CONFIG.get(0)?;
    if c.enabled == 0 { None } else { Some(c) }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Identity of a `struct file *`: (kernel dev, ino).
#[inline(always)]
fn file_identity(file: *const u8) -> Option<FileId> {
    let o = offsets();
    let inode = kptr(file, o.file_f_inode).ok()?;
    let ino: u64 = kread(inode, o.inode_i_ino).ok()?;
    let sb = kptr(inode, o.inode_i_sb).ok()?;
    let dev: u32 = kread(sb, o.sb_s_dev).ok()?;
    Some(FileId {
        dev: dev as u64,
        ino,
    })
}

#[inline(always)]
fn task_exe_identity(task: *const u8) -> Option<FileId> {
    let o = offsets();
    let mm = kptr(task, o.task_mm).ok()?;
    let exe = kptr(mm, o.mm_exe_file).ok()?;
    file_identity(exe)
}

// --- argv capture ------------------------------------------------------------------------------

#[inline(always)]
fn word_flags(h: u64) -> u32 {
    // SAFETY: map value pointer valid for this run.
    unsafe { SD_WORDS.get(&h) }.copied().unwrap_or(0)
}

/// Reads argv (a user pointer to pointers) of the exec about to happen and records what its
/// words mean. Called for every exec on the host: it does a fixed, small amount of work.
#[inline(always)]
fn capture(argv: *const u64) -> u32 {
    if sd_config().is_none() || argv.is_null() {
        return 0;
    }
    let Some(a) = SD_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let Some(buf) = SD_BUF.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: `a` and `buf` point into per-CPU scratch values, valid and exclusive for this run
    // (BPF programs do not migrate between CPUs while running).
    let (a, buf) = unsafe { (&mut *a, &mut *buf) };
    a.argv0 = 0;
    a.verb = 0;
    a.target = 0;
    a.options = 0;
    let mut i = 0;
    while i < SD_ARGV_WORDS {
        a.words[i][0] = 0;
        i += 1;
    }

    // argv[0]: its basename is hashed (the hash restarts after every '/'), and its last 31
    // bytes are kept for the message (the agent takes the basename of those). No loop index or
    // length is carried between iterations beyond the counter: the verifier must not explore
    // one state per string length.
    // SAFETY: user memory read with fault handling.
    let p0 = unsafe { aya_ebpf::helpers::bpf_probe_read_user(argv) }.unwrap_or(0);
    if p0 == 0 {
        return 0;
    }
    // SAFETY: as above.
    let len = match unsafe { bpf_probe_read_user_str_bytes(p0 as *const u8, buf) } {
        Ok(s) => s.len(),
        Err(_) => return 0,
    };
    let mut h = WORD_HASH_INIT;
    let mut k = 0usize;
    while k < 128 {
        let b = buf[k];
        if b == 0 {
            break;
        }
        let slash = 0u64.wrapping_sub((b == b'/') as u64);
        h = (word_hash_step(h, b) & !slash) | (WORD_HASH_INIT & slash);
        k += 1;
    }
    a.argv0 = word_flags(h);
    let skip = if len > SD_WORD_LEN - 1 {
        (len - (SD_WORD_LEN - 1)) & 127
    } else {
        0
    };
    // SAFETY: as above.
    let _ = unsafe {
        bpf_probe_read_user_str_bytes((p0 as *const u8).wrapping_add(skip), &mut a.words[0])
    };

    // The other words, up to SD_ARGV_SCAN (the first SD_ARGV_WORDS kept for the message, the
    // rest read into `buf`): the verb is the first known verb that is not an option or an
    // option's value; `-c` cancels only if no action option comes after it.
    let shutdown_argv0 = a.argv0 & SD_W_ARGV0_SHUTDOWN != 0;
    let mut verb_seen = false;
    let mut skip_value = false;
    let mut cancel = false;
    let mut w = 1usize;
    while w < SD_ARGV_SCAN {
        // SAFETY: user memory read with fault handling.
        let p =
            unsafe { aya_ebpf::helpers::bpf_probe_read_user(argv.wrapping_add(w)) }.unwrap_or(0);
        if p == 0 {
            break;
        }
        let word: &mut [u8] = if w < SD_ARGV_WORDS {
            &mut a.words[w]
        } else {
            &mut buf[..SD_WORD_LEN]
        };
        // SAFETY: as above.
        if unsafe { bpf_probe_read_user_str_bytes(p as *const u8, word) }.is_err() {
            break;
        }
        let mut h = WORD_HASH_INIT;
        let mut j = 0usize;
        while j < SD_WORD_LEN {
            let b = word[j];
            if b == 0 {
                break;
            }
            h = word_hash_step(h, b);
            j += 1;
        }
        let f = word_flags(h);
        if skip_value {
            skip_value = false;
        } else if word[0] == b'-' {
            a.options |= f & !SD_W_OPT_CANCEL;
            if f & SD_W_OPT_CANCEL != 0 {
                cancel = true;
            } else if f & SD_W_OPT_ACTION != 0 {
                cancel = false;
            }
            // `shutdown` has no option taking a separate value; systemctl (under any other
            // name) has several, whose value must not pass for the verb.
            skip_value = f & SD_W_OPT_VALUE != 0 && !shutdown_argv0;
        } else if !verb_seen {
            if f & (SD_W_VERB | SD_W_START | SD_W_VERB_OTHER | SD_W_RUNLEVEL) != 0 {
                a.verb = f;
                verb_seen = true;
            }
        } else if f & SD_W_TARGET != 0 {
            a.target = 1;
        }
        w += 1;
    }
    if cancel {
        a.options |= SD_W_OPT_CANCEL;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = SD_ARGS.insert(&tid, &*a, 0);
    note_session();
    0
}

/// Tells the agent the first time a session id runs anything, so it classifies the session
/// before that session asks for a shutdown (an unclassified session gets the policy's `unknown`).
#[inline(always)]
fn note_session() {
    let o = offsets();
    let Ok(session) = kread::<u32>(current_task(), o.task_sessionid) else {
        return;
    };
    if session == AUDIT_SESSION_UNSET {
        return;
    }
    // SAFETY: map value pointers valid for this run.
    if unsafe { SD_SESSIONS.get(&session) }.is_some() || unsafe { SD_SEEN.get(&session) }.is_some()
    {
        return;
    }
    let _ = SD_SEEN.insert(&session, &1, 0);
    report(
        0,
        SD_OUT_ALLOWED,
        pack(SD_CLASS_UNKNOWN, SD_ALLOW, 0),
        0,
        None,
    );
}

/// Syscall tracepoint records: 8 bytes of common fields, the syscall number, then the arguments.
#[inline(always)]
fn sys_arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: reading inside the tracepoint record; failures read as 0.
    unsafe { ctx.read_at::<u64>(16 + 8 * n) }.unwrap_or(0)
}

/// `execve(filename, argv, envp)`
#[tracepoint(category = "syscalls", name = "sys_enter_execve")]
pub fn sd_execve(ctx: TracePointContext) -> u32 {
    capture(sys_arg(&ctx, 1) as *const u64)
}

/// `execveat(dfd, filename, argv, envp, flags)`
#[tracepoint(category = "syscalls", name = "sys_enter_execveat")]
pub fn sd_execveat(ctx: TracePointContext) -> u32 {
    capture(sys_arg(&ctx, 2) as *const u64)
}

/// The end of `execve`: its argv entry is dropped (a failed exec's; a successful one's is dropped
/// at `sched_process_exec` already). So an exec that `sys_enter_execve*` did not see (32-bit)
/// finds no entry, never the argv of an earlier (failed or harmless) exec of the same thread.
#[tracepoint(category = "syscalls", name = "sys_exit_execve")]
pub fn sd_execve_exit(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = SD_ARGS.remove(&tid);
    0
}

/// The end of `execveat`, as [`sd_execve_exit`].
#[tracepoint(category = "syscalls", name = "sys_exit_execveat")]
pub fn sd_execveat_exit(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = SD_ARGS.remove(&tid);
    0
}

// --- the decision ------------------------------------------------------------------------------

/// Whether the exec of `file` with the argv captured for thread `tid` is a shutdown request.
#[inline(always)]
fn exec_is_shutdown(file: *const u8, tid: u32) -> bool {
    let Some(id) = file_identity(file) else {
        return false;
    };
    // SAFETY: map value pointers valid for this run.
    let Some(kind) = (unsafe { SD_EXES.get(&id) }).copied() else {
        return false;
    };
    // SAFETY: as above.
    let Some(a) = (unsafe { SD_ARGS.get(&tid) }) else {
        // No argv from this exec's own `sys_enter_execve*` (the entry lives only while the
        // syscall runs, see `sd_execve_exit`): an exec the syscall tracepoints do not see, such
        // as a 32-bit `int 0x80` execve. What it asks for is unknown: judged as a shutdown.
        return true;
    };
    // `shutdown -c` cancels a scheduled shutdown: never refused, whatever the program.
    if a.argv0 & SD_W_ARGV0_CANCELS != 0 && a.options & SD_W_OPT_CANCEL != 0 {
        return false;
    }
    if kind == SD_EXE_ALWAYS || a.argv0 & SD_W_ARGV0_SHUTDOWN != 0 {
        return true;
    }
    let named = a.argv0 & (SD_W_ARGV0_SYSTEMCTL | SD_W_ARGV0_INIT) != 0;
    if a.argv0 & SD_W_ARGV0_SYSTEMCTL != 0 || (kind == SD_EXE_SYSTEMCTL && !named) {
        return a.verb & SD_W_VERB != 0 || (a.verb & SD_W_START != 0 && a.target != 0);
    }
    if a.argv0 & SD_W_ARGV0_INIT != 0 {
        return a.verb & SD_W_RUNLEVEL != 0;
    }
    false
}

/// An exception (by unit cgroup, or by the executable of the caller or one of its ancestors)
/// lets automation that reboots on purpose through.
#[inline(always)]
fn excepted() -> bool {
    // SAFETY: helper without preconditions.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: map value pointer valid for this run.
    if unsafe { SD_EXCEPT_CGROUPS.get(&cg) }.is_some() {
        return true;
    }
    let o = offsets();
    let mut task = current_task();
    let mut i = 0;
    while i < EXCEPTION_DEPTH {
        if let Some(id) = task_exe_identity(task) {
            // SAFETY: as above.
            if unsafe { SD_EXCEPT_EXES.get(&id) }.is_some() {
                return true;
            }
        }
        let Ok(parent) = kptr(task, o.task_real_parent) else {
            break;
        };
        if parent == task {
            break;
        }
        task = parent;
        i += 1;
    }
    false
}

/// Judges one shutdown-class request of the current task: -EPERM refuses it, 0 lets it go.
///
/// It returns the errno itself, a constant on every path, rather than a bool the caller turns
/// into one: `if refuse { -EPERM } else { 0 }` compiles to a negation, which the verifier tracks
/// as an unknown 32-bit value, and kernels >= 6.10 refuse an LSM program whose return value may
/// lie outside [-4095, 0] (seen on Debian's 6.12: sd_bprm_check did not load).
#[inline(never)]
fn judge(op: u32, signal: u32, tid: u32, tracepoint: bool) -> i32 {
    let Some(cfg) = sd_config() else {
        return 0;
    };
    let o = offsets();
    if o.valid == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // PID 1 (and systemd-shutdown, which runs as PID 1) and the agent are never judged.
    if tgid <= 1
        || (tgid == cfg.agent_tgid
            && is_current_agent(&o, cfg.agent_tgid, cfg.agent_start_lo, cfg.agent_start_hi))
    {
        return 0;
    }
    let task = current_task();
    let session = kread::<u32>(task, o.task_sessionid).unwrap_or(AUDIT_SESSION_UNSET);
    let class = if session == AUDIT_SESSION_UNSET {
        SD_CLASS_NONE
    } else {
        // SAFETY: map value pointer valid for this run.
        match unsafe { SD_SESSIONS.get(&session) } {
            Some(c) => *c,
            None => SD_CLASS_UNKNOWN,
        }
    };
    let mut action = cfg.action[(class as usize) & (SD_CLASSES - 1)];
    let mut exception = 0;
    if action != SD_ALLOW && excepted() {
        action = SD_ALLOW;
        exception = 1;
    }
    let words = if op == SD_OP_EXEC {
        // SAFETY: as above.
        unsafe { SD_ARGS.get(&tid) }
    } else {
        None
    };
    if action == SD_ALLOW {
        report(
            op,
            SD_OUT_ALLOWED,
            pack(class, action, exception),
            signal,
            words,
        );
        return 0;
    }
    let t = now();
    // A process that used a pass finishes its own request (exec, then reboot(2)).
    let ppid = kptr(task, o.task_real_parent)
        .and_then(|p| kread::<u32>(p, o.task_tgid))
        .unwrap_or(0);
    let mut cleared = false;
    for who in [tgid, ppid] {
        // SAFETY: as above.
        if let Some(exp) = unsafe { SD_CLEARED.get(&who) } {
            if *exp > t {
                cleared = true;
            }
        }
    }
    if !cleared && action == SD_CONFIRM && session != AUDIT_SESSION_UNSET {
        // SAFETY: as above.
        if let Some(exp) = unsafe { SD_PASSES.get(&session) }.copied() {
            // Single use: whoever deletes it first owns it.
            if exp > t && SD_PASSES.remove(&session).is_ok() {
                let _ = SD_CLEARED.insert(&tgid, &(t + cfg.cleared_ns), 0);
                cleared = true;
            }
        }
    }
    if cleared {
        report(op, SD_OUT_CONFIRMED, pack(class, action, 0), signal, words);
        return 0;
    }
    if cfg.mode == MODE_AUDIT {
        report(
            op,
            SD_OUT_WOULD_REFUSE,
            pack(class, action, 0),
            signal,
            words,
        );
        return 0;
    }
    let outcome = if tracepoint {
        SD_OUT_STOPPED
    } else {
        SD_OUT_REFUSED
    };
    let agent_running = t < cfg.alive_until_ns;
    report(
        op,
        outcome,
        pack(class, action, 0) | if agent_running { PACK_STOPPED } else { 0 },
        signal,
        words,
    );
    if agent_running {
        // Held until the agent has written the message to the task's terminal (see module
        // docs).
        // SAFETY: signals the current task; failure (kernel thread) leaves only the message late.
        let _ = unsafe { bpf_send_signal(SIGSTOP) };
    } else if tracepoint {
        // No agent runs (these programs outlive it, pinned): nobody would write the message or
        // end a stopped program, so the kernel ends it before its first instruction.
        // SAFETY: as above.
        let _ = unsafe { bpf_send_signal(SIGKILL) };
    }
    -EPERM
}

/// Class, action and exception flag in one argument (BPF calls take at most five).
#[inline(always)]
fn pack(class: u32, action: u32, exception: u32) -> u32 {
    class | action << 8 | (exception & 1) << 16
}

/// Flag beside [`pack`]'s fields: the caller is being stopped for the agent to answer; remember
/// it in `SD_STOPPED`.
const PACK_STOPPED: u32 = 1 << 24;

/// Sends one [`ShutdownEvent`]; `packed` comes from [`pack`].
#[inline(never)]
fn report(op: u32, outcome: u32, packed: u32, signal: u32, words: Option<&SdArgs>) {
    let Some(ev) = SD_EVSCRATCH.get_ptr_mut(0) else {
        return;
    };
    let o = offsets();
    let task = current_task();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: `ev` is a reserved ring buffer record of the right size; every field is written
    // before submit.
    unsafe {
        (*ev).kind = EV_SHUTDOWN;
        (*ev).op = op;
        (*ev).outcome = outcome;
        (*ev).class = packed & 0xff;
        (*ev).action = (packed >> 8) & 0xff;
        (*ev).exception = (packed >> 16) & 1;
        (*ev).signal = signal;
        (*ev).tgid = (pid_tgid >> 32) as u32;
        (*ev).pid = pid_tgid as u32;
        (*ev).ppid = kptr(task, o.task_real_parent)
            .and_then(|p| kread::<u32>(p, o.task_tgid))
            .unwrap_or(0);
        (*ev).uid = bpf_get_current_uid_gid() as u32;
        (*ev).loginuid = kread(task, o.task_loginuid).unwrap_or(u32::MAX);
        (*ev).audit_session = kread(task, o.task_sessionid).unwrap_or(u32::MAX);
        (*ev)._pad = 0;
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        match words {
            Some(a) => (*ev).words = a.words,
            None => {
                let mut i = 0;
                while i < SD_ARGV_WORDS {
                    (*ev).words[i][0] = 0;
                    i += 1;
                }
            }
        }
        if packed & PACK_STOPPED != 0 {
            let _ = SD_STOPPED.insert(&(*ev).tgid, &*ev, 0);
        }
        let _ = EVENTS.output::<ShutdownEvent>(&*ev, 0);
    }
}

// --- LSM tier ----------------------------------------------------------------------------------

/// `int bprm_check_security(struct linux_binprm *bprm)`: refuses the exec before the program
/// runs (execve returns EPERM).
#[lsm(hook = "bprm_check_security")]
pub fn sd_bprm_check(ctx: LsmContext) -> i32 {
    sd_bprm_check_verdict(&ctx)
}

/// The body of `sd_bprm_check`, shared with the fmod_ret tier.
#[inline(always)]
pub(crate) fn sd_bprm_check_verdict(ctx: &LsmContext) -> i32 {
    if sd_config().is_none() {
        return 0;
    }
    let so = sd_offsets();
    if so.valid == 0 {
        return 0;
    }
    let bprm: *const u8 = ctx.arg(0);
    let Ok(file) = kptr(bprm, so.bprm_file) else {
        return 0;
    };
    let tid = bpf_get_current_pid_tgid() as u32;
    if !exec_is_shutdown(file, tid) {
        return 0;
    }
    judge(SD_OP_EXEC, 0, tid, false)
}

/// `int capable(const struct cred *cred, struct user_namespace *ns, int cap, unsigned int opts)`:
/// reboot(2) and kexec_load need CAP_SYS_BOOT; refusing the capability refuses them. Called very
/// often: anything but CAP_SYS_BOOT returns at once.
#[lsm(hook = "capable")]
pub fn sd_capable(ctx: LsmContext) -> i32 {
    sd_capable_verdict(&ctx)
}

/// The body of `sd_capable`, shared with the fmod_ret tier.
#[inline(always)]
pub(crate) fn sd_capable_verdict(ctx: &LsmContext) -> i32 {
    let cap: i32 = ctx.arg(2);
    if cap != CAP_SYS_BOOT {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    judge(SD_OP_REBOOT, 0, tid, false)
}

/// `int file_open(struct file *file)`: a write open of /proc/sysrq-trigger (matched by procfs
/// inode number and filesystem magic, so every procfs mount and bind mount is covered).
#[lsm(hook = "file_open")]
pub fn sd_file_open(ctx: LsmContext) -> i32 {
    sd_file_open_verdict(&ctx)
}

/// The body of `sd_file_open`, shared with the fmod_ret tier.
#[inline(always)]
pub(crate) fn sd_file_open_verdict(ctx: &LsmContext) -> i32 {
    let Some(cfg) = sd_config() else {
        return 0;
    };
    let so = sd_offsets();
    if so.valid == 0 || cfg.sysrq_ino == 0 {
        return 0;
    }
    let o = offsets();
    let file: *const u8 = ctx.arg(0);
    let Ok(inode) = kptr(file, o.file_f_inode) else {
        return 0;
    };
    let Ok(ino) = kread::<u64>(inode, o.inode_i_ino) else {
        return 0;
    };
    if ino != cfg.sysrq_ino as u64 {
        return 0;
    }
    let Ok(sb) = kptr(inode, o.inode_i_sb) else {
        return 0;
    };
    if kread::<u64>(sb, so.sb_s_magic).unwrap_or(0) != PROC_SUPER_MAGIC {
        return 0;
    }
    let mode: u32 = kread(file, so.file_f_mode).unwrap_or(0);
    if mode & FMODE_WRITE == 0 {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    judge(SD_OP_SYSRQ, 0, tid, false)
}

/// Signals that make systemd (PID 1) shut down: SIGINT (ctrl-alt-del.target), SIGRTMIN+3..+6 and
/// SIGRTMIN+13..+16 (glibc's SIGRTMIN is the kernel's 34).
#[inline(always)]
fn shuts_down_pid1(sig: i32) -> bool {
    sig == 2 || (37..=40).contains(&sig) || (47..=50).contains(&sig)
}

/// `int task_kill(struct task_struct *p, struct kernel_siginfo *info, int sig, const struct cred
/// *cred)`
#[lsm(hook = "task_kill")]
pub fn sd_task_kill(ctx: LsmContext) -> i32 {
    sd_task_kill_verdict(&ctx)
}

/// The body of `sd_task_kill`, shared with the fmod_ret tier.
#[inline(always)]
pub(crate) fn sd_task_kill_verdict(ctx: &LsmContext) -> i32 {
    let sig: i32 = ctx.arg(2);
    if !shuts_down_pid1(sig) || sd_config().is_none() {
        return 0;
    }
    let o = offsets();
    let target: *const u8 = ctx.arg(0);
    if kread::<u32>(target, o.task_tgid).unwrap_or(0) != 1 {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    judge(SD_OP_SIGNAL, sig as u32, tid, false)
}

// --- tracepoint tier ---------------------------------------------------------------------------

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`: the
/// new program is loaded but has not run an instruction. A refused one is stopped here by the
/// kernel; the agent writes the message to its terminal and kills it. With no agent running, the
/// kernel kills it at once (see `judge`), so a stopped program never waits for an agent.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sd_exec_tp(ctx: RawTracePointContext) -> i32 {
    if sd_config().is_none() {
        return 0;
    }
    let so = sd_offsets();
    if so.valid == 0 {
        return 0;
    }
    let args = ctx.as_ptr() as *const u64;
    // SAFETY: the context holds the hook's three arguments.
    let old_pid = unsafe { bpf_probe_read_kernel(args.add(1)) }.unwrap_or(0) as u32;
    // SAFETY: as above.
    let bprm = unsafe { bpf_probe_read_kernel(args.add(2)) }.unwrap_or(0) as *const u8;
    if let Ok(file) = kptr(bprm, so.bprm_file)
        && exec_is_shutdown(file, old_pid)
    {
        let _ = judge(SD_OP_EXEC, 0, old_pid, true);
    }
    // This exec is done with its argv (see `sd_exec_done`).
    forget_exec_args(old_pid);
    0
}

/// `sched_process_exec` in the lsm and fmodret tiers: the exec happened, so its argv entry is
/// dropped here. `sys_exit_execve` cannot be relied on for that: after an exec of a 32-bit
/// program the task is a compat task and the syscall exit tracepoint skips it, which left the
/// entry behind for the program's own `int 0x80` execve to find (seen in the sysvm: a 32-bit
/// helper's exec of `systemctl reboot` judged by the helper's own argv and let through).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sd_exec_done(ctx: RawTracePointContext) -> i32 {
    let args = ctx.as_ptr() as *const u64;
    // SAFETY: the context holds the hook's three arguments.
    let old_pid = unsafe { bpf_probe_read_kernel(args.add(1)) }.unwrap_or(0) as u32;
    forget_exec_args(old_pid);
    0
}

/// Drops the argv entries an exec leaves behind: the calling thread's (`old_pid`), and the one
/// under the pid the process has now. They differ when a thread other than the leader execs:
/// the leader, killed by the exec's de_thread, never reaches its own `sys_exit_execve` if it
/// was inside an execve itself, and its entry would wait under the new program's pid for that
/// program's first exec the syscall tracepoints do not see (a 32-bit `int 0x80` execve) to be
/// judged by the dead leader's argv.
#[inline(always)]
fn forget_exec_args(old_pid: u32) {
    let _ = SD_ARGS.remove(&old_pid);
    let now = bpf_get_current_pid_tgid() as u32;
    if now != old_pid {
        let _ = SD_ARGS.remove(&now);
    }
}
