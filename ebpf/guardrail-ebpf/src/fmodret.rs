//! The `fmodret` tier: the `lsm` tier's programs attached as fmod_ret (BPF_MODIFY_RETURN) to the
//! kernel's `security_*` functions.
//!
//! Ubuntu (and Debian 11, SLES 15 SP3) build BPF LSM but leave `bpf` out of the active LSM list:
//! there `lsm/…` programs load and never run. An fmod_ret program on a `security_*` function runs
//! at its entry whatever the LSM list says, and a non-zero return skips the function and becomes
//! its return value (kernel/bpf/verifier.c, `check_attach_modify_return`, since 5.7), so
//! returning -EPERM refuses the operation and -ERESTARTNOINTR with a pending SIGSTOP holds it
//! exactly as the LSM hook does.
//!
//! No second copy of any rule: each program below calls the body its `lsm` twin calls. The
//! `security_*` functions take the LSM hook's arguments in the same order (`security_inode_rename`
//! has one more, `flags`, after them), and a tracing program's context is, like an LSM program's,
//! an array of 64-bit arguments followed by the return value so far, so `LsmContext::arg` reads
//! both. That trailing value is the verdict of fmod_ret programs that ran before ours: a non-zero
//! one already ended the call before we run (the trampoline stops at the first), so it is never
//! seen here.
//!
//! aya-ebpf 0.2.1 has no `#[fmod_ret]` macro: each program is what `#[lsm]` expands to, with the
//! section `fmod_ret/<function>` that libbpf and the patched aya-obj (third_party/) understand.
use core::ffi::c_void;

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, programs::LsmContext};
use guardrail_common::{OP_RMDIR, OP_UNLINK};

use crate::{
    deletion::lsm::{lsm_remove, rename_verdict},
    kernel::{EPERM, atomic::fetch_add},
    probe::{PROBE_LSM_HITS, SELFTEST_TARGET},
    shutdown,
};

/// `int security_inode_unlink(struct inode *dir, struct dentry *dentry)`
#[unsafe(no_mangle)]
#[unsafe(link_section = "fmod_ret/security_inode_unlink")]
pub fn fm_unlink(ctx: *mut c_void) -> i32 {
    lsm_remove(&LsmContext::new(ctx), OP_UNLINK)
}

/// `int security_inode_rmdir(struct inode *dir, struct dentry *dentry)`
#[unsafe(no_mangle)]
#[unsafe(link_section = "fmod_ret/security_inode_rmdir")]
pub fn fm_rmdir(ctx: *mut c_void) -> i32 {
    lsm_remove(&LsmContext::new(ctx), OP_RMDIR)
}

/// `int security_inode_rename(struct inode *old_dir, struct dentry *old_dentry, struct inode
/// *new_dir, struct dentry *new_dentry, unsigned int flags)`
#[unsafe(no_mangle)]
#[unsafe(link_section = "fmod_ret/security_inode_rename")]
pub fn fm_rename(ctx: *mut c_void) -> i32 {
    rename_verdict(&LsmContext::new(ctx))
}

/// `int security_bprm_check(struct linux_binprm *bprm)`
#[unsafe(no_mangle)]
#[unsafe(link_section = "fmod_ret/security_bprm_check")]
pub fn fm_bprm_check(ctx: *mut c_void) -> i32 {
    shutdown::sd_bprm_check_verdict(&LsmContext::new(ctx))
}

/// `int security_capable(const struct cred *cred, struct user_namespace *ns, int cap, unsigned
/// int opts)`
#[unsafe(no_mangle)]
#[unsafe(link_section = "fmod_ret/security_capable")]
pub fn fm_capable(ctx: *mut c_void) -> i32 {
    shutdown::sd_capable_verdict(&LsmContext::new(ctx))
}

/// `int security_file_open(struct file *file)`
#[unsafe(no_mangle)]
#[unsafe(link_section = "fmod_ret/security_file_open")]
pub fn fm_file_open(ctx: *mut c_void) -> i32 {
    shutdown::sd_file_open_verdict(&LsmContext::new(ctx))
}

/// `int security_task_kill(struct task_struct *p, struct kernel_siginfo *info, int sig, const
/// struct cred *cred)`
#[unsafe(no_mangle)]
#[unsafe(link_section = "fmod_ret/security_task_kill")]
pub fn fm_task_kill(ctx: *mut c_void) -> i32 {
    shutdown::sd_task_kill_verdict(&LsmContext::new(ctx))
}

/// Attached for a moment by the capability probe on `security_inode_getattr`: refuses a `stat`
/// by the one probing thread (`SELFTEST_TARGET` holds its thread id), so the agent sees both that
/// the program ran and that its return value really refused the call on this kernel.
#[unsafe(no_mangle)]
#[unsafe(link_section = "fmod_ret/security_inode_getattr")]
pub fn probe_fmodret(_ctx: *mut c_void) -> i32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(t) = SELFTEST_TARGET.get(0) {
        if *t == tid && tid != 0 {
            if let Some(p) = PROBE_LSM_HITS.get_ptr_mut(0) {
                fetch_add(p, 1);
            }
            return -EPERM;
        }
    }
    0
}
