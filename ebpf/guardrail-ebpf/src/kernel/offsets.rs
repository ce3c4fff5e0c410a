//! Kernel struct offsets and the reads through them.
//!
//! Rust-built BPF carries no CO-RE relocations: the agent resolves every field offset from the
//! running kernel's BTF and writes it into these read-only globals before load (by symbol name,
//! so `OFFSETS` and `FS_OFFSETS` keep their names).
use core::ptr::read_volatile;

use aya_ebpf::helpers::bpf_probe_read_kernel;
use guardrail_common::{FsOffsets, KernelOffsets};

/// Resolved by the agent from /sys/kernel/btf/vmlinux before load.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = KernelOffsets {
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
pub(crate) static FS_OFFSETS: FsOffsets = FsOffsets {
    sb_s_magic: 0,
    sb_s_type: 0,
    fstype_name: 0,
    valid: 0,
};

#[inline(always)]
pub(crate) fn offsets() -> KernelOffsets {
    // SAFETY: OFFSETS is a plain read-only global; the volatile read stops the compiler from
    // folding the zero initialiser, since the loader rewrites .rodata before load.
    unsafe { read_volatile(&OFFSETS) }
}

#[inline(always)]
pub(crate) fn fs_offsets() -> FsOffsets {
    // SAFETY: as for `offsets`.
    unsafe { read_volatile(&FS_OFFSETS) }
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
