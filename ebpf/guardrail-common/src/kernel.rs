//! Kernel structs as the programs see them: offsets resolved from BTF at load time, pseudo
//! filesystem magics, the self-test answer, and `dev_t` conversions.

/// Byte offsets of the kernel struct fields the programs read, resolved by the agent from
/// /sys/kernel/btf/vmlinux and passed as a read-only global. Rust-built BPF has no CO-RE
/// relocations, so nothing here may be a compile-time constant.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_tgid: u32,
    pub task_pid: u32,
    pub task_loginuid: u32,
    pub task_sessionid: u32,
    pub task_signal: u32,
    pub task_fs: u32,
    pub task_files: u32,
    pub task_mm: u32,
    pub task_real_parent: u32,
    /// `signal_struct.pids` (array of `struct pid *` indexed by `enum pid_type`).
    pub signal_pids: u32,
    /// `enum pid_type` values.
    pub pidtype_pgid: u32,
    pub pidtype_sid: u32,
    /// `struct pid.numbers[0].nr` (the initial namespace's number).
    pub pid_numbers_nr: u32,
    pub fs_pwd: u32,
    pub fs_root: u32,
    pub path_dentry: u32,
    pub path_mnt: u32,
    pub files_fdt: u32,
    pub fdt_fd: u32,
    pub fdt_max_fds: u32,
    pub file_f_path: u32,
    pub file_f_inode: u32,
    pub dentry_d_parent: u32,
    pub dentry_d_inode: u32,
    /// `dentry.d_name.name`
    pub dentry_d_name_name: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub sb_s_dev: u32,
    pub mm_exe_file: u32,
    /// Offset of the `opcode` field in the io_uring submit tracepoint's record (0: absent).
    pub io_uring_opcode: u32,
    /// Non-zero once filled in; programs do nothing while it is zero.
    pub valid: u32,
    /// `task_struct.flags` (PF_KTHREAD, PF_IO_WORKER).
    pub task_flags: u32,
    /// `task_struct.group_leader`
    pub task_group_leader: u32,
    /// `task_struct.start_boottime` (0: the kernel has none; then no process counts as the
    /// agent).
    pub task_start_boottime: u32,
    /// `task_struct.cred` (the subjective credentials)
    pub task_cred: u32,
    /// `cred.euid`
    pub cred_euid: u32,
}

/// Offsets the deletion guard reads to tell pseudo filesystems (cgroupfs, sysfs, proc, bpffs,
/// devtmpfs...) from real ones, resolved from BTF like [`KernelOffsets`] (a separate read-only
/// global, so that struct's layout does not change).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsOffsets {
    /// `super_block.s_magic` (an `unsigned long`).
    pub sb_s_magic: u32,
    /// `super_block.s_type`: devtmpfs shares tmpfs's (or ramfs's) magic and is told apart by its
    /// type's name.
    pub sb_s_type: u32,
    /// `file_system_type.name`
    pub fstype_name: u32,
    /// Non-zero once filled in; nothing is taken for a pseudo filesystem while it is zero.
    pub valid: u32,
}

/// Superblock magics of the pseudo filesystems whose entries are kernel objects, not data:
/// removing an empty cgroup (systemd does at every unit stop), a sysfs or configfs object, a bpffs
/// pin is never counted as a deletion. Values from include/uapi/linux/magic.h.
pub const PSEUDO_FS_MAGICS: [u64; 9] = [
    0x6367_7270, // CGROUP2_SUPER_MAGIC
    0x0027_e0eb, // CGROUP_SUPER_MAGIC
    0x6265_6572, // SYSFS_MAGIC
    0x9fa0,      // PROC_SUPER_MAGIC
    0xcafe_4a11, // BPF_FS_MAGIC
    0x6462_6720, // DEBUGFS_MAGIC
    0x7472_6163, // TRACEFS_MAGIC
    0x7363_6673, // SECURITYFS_MAGIC
    0x6265_6570, // CONFIGFS_MAGIC
];
/// tmpfs and ramfs: devtmpfs is one of them underneath, named `devtmpfs` in its `s_type`.
pub const TMPFS_MAGIC: u64 = 0x0102_1994;
pub const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// Whether a superblock magic is one of [`PSEUDO_FS_MAGICS`].
#[inline(always)]
pub fn is_pseudo_fs_magic(magic: u64) -> bool {
    let mut i = 0;
    while i < PSEUDO_FS_MAGICS.len() {
        if PSEUDO_FS_MAGICS[i] == magic {
            return true;
        }
        i += 1;
    }
    false
}

/// The self-test program's answer: values read through the resolved offsets, compared by the
/// agent with what /proc says about the same task.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelftestAnswer {
    pub tgid: u32,
    pub pid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub loginuid: u32,
    pub sessionid: u32,
    pub cwd_dev: u64,
    pub cwd_ino: u64,
    pub exe_dev: u64,
    pub exe_ino: u64,
    /// Number of answers written (the program bumps it).
    pub hits: u64,
}

// --- conversions -----------------------------------------------------------------------------

/// Converts `st_dev` as userspace sees it (glibc `makedev` encoding) into the kernel's internal
/// `dev_t` (`MKDEV`: 12-bit major above a 20-bit minor), which is what `super_block.s_dev` holds.
pub const fn kernel_dev_from_user(st_dev: u64) -> u64 {
    let major = ((st_dev >> 8) & 0xfff) | ((st_dev >> 32) & !0xfff);
    let minor = (st_dev & 0xff) | ((st_dev >> 12) & !0xff);
    ((major & 0xfff) << 20) | (minor & 0xfffff)
}

/// Converts the kernel's internal `dev_t` back into userspace `st_dev` (glibc `makedev`).
pub const fn user_dev_from_kernel(kdev: u64) -> u64 {
    let major = (kdev >> 20) & 0xfff;
    let minor = kdev & 0xfffff;
    ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
}
