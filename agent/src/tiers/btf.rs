//! Kernel struct offsets resolved from the running kernel's BTF.
//!
//! Rust-built BPF carries no CO-RE relocations, so a field offset compiled in from one kernel is
//! wrong on another. The agent reads /sys/kernel/btf/vmlinux at start-up and hands the programs
//! every offset they use as a read-only global ([`KernelOffsets`]).
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use guardrail_common::KernelOffsets;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Strips typedefs and qualifiers down to the type they name.
fn resolve(btf: &Btf, mut t: Type) -> Result<Type> {
    for _ in 0..16 {
        t = match &t {
            Type::Typedef(x) => btf.resolve_chained_type(x)?,
            Type::Const(x) => btf.resolve_chained_type(x)?,
            Type::Volatile(x) => btf.resolve_chained_type(x)?,
            Type::Restrict(x) => btf.resolve_chained_type(x)?,
            Type::TypeTag(x) => btf.resolve_chained_type(x)?,
            _ => return Ok(t),
        };
    }
    bail!("type chain too long")
}

fn find_struct(btf: &Btf, name: &str) -> Result<btf_rs::Struct> {
    for t in btf
        .resolve_types_by_name(name)
        .with_context(|| format!("BTF has no type {name}"))?
    {
        if let Type::Struct(s) = t
            && !s.members.is_empty()
        {
            return Ok(s);
        }
    }
    bail!("BTF has no struct {name}")
}

/// Byte offset of `member` in `s`, looking inside anonymous structs and unions, with the type of
/// the member.
fn member_in(btf: &Btf, s: &btf_rs::Struct, member: &str) -> Result<Option<(u32, Type)>> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let ty = resolve(btf, btf.resolve_chained_type(m)?)?;
        if name == member {
            return Ok(Some((m.bit_offset() / 8, ty)));
        }
        if name.is_empty()
            && let Type::Struct(inner) | Type::Union(inner) = &ty
            && let Some((off, t)) = member_in(btf, inner, member)?
        {
            return Ok(Some((m.bit_offset() / 8 + off, t)));
        }
    }
    Ok(None)
}

/// Offset of a dotted member path, e.g. `("dentry", "d_name.name")`.
pub fn offset_of(btf: &Btf, strukt: &str, path: &str) -> Result<u32> {
    let mut s = find_struct(btf, strukt)?;
    let mut total = 0;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (off, ty) = member_in(btf, &s, part)?
            .ok_or_else(|| anyhow!("struct {strukt} has no member {path} (at {part})"))?;
        total += off;
        if i + 1 < parts.len() {
            s = match ty {
                Type::Struct(x) | Type::Union(x) => x,
                _ => bail!("{strukt}.{path}: {part} is not a struct"),
            };
        }
    }
    Ok(total)
}

fn enum_value(btf: &Btf, enum_name: &str, member: &str) -> Result<u32> {
    for t in btf.resolve_types_by_name(enum_name)? {
        if let Type::Enum(e) = t {
            for m in &e.members {
                if btf.resolve_name(m)? == member {
                    return Ok(m.val());
                }
            }
        }
    }
    bail!("BTF has no enum {enum_name} member {member}")
}

/// Resolves every offset the kernel programs use. `io_uring_opcode` is filled in separately
/// from the tracepoint's format file (see [`io_uring_opcode_offset`]).
pub fn resolve_offsets(path: &Path) -> Result<KernelOffsets> {
    let btf =
        Btf::from_file(path).with_context(|| format!("reading kernel BTF {}", path.display()))?;
    let o = |s: &str, m: &str| offset_of(&btf, s, m).with_context(|| format!("offset of {s}.{m}"));
    Ok(KernelOffsets {
        task_tgid: o("task_struct", "tgid")?,
        task_pid: o("task_struct", "pid")?,
        task_loginuid: o("task_struct", "loginuid")?,
        task_sessionid: o("task_struct", "sessionid")?,
        task_signal: o("task_struct", "signal")?,
        task_fs: o("task_struct", "fs")?,
        task_files: o("task_struct", "files")?,
        task_mm: o("task_struct", "mm")?,
        task_real_parent: o("task_struct", "real_parent")?,
        signal_pids: o("signal_struct", "pids")?,
        pidtype_pgid: enum_value(&btf, "pid_type", "PIDTYPE_PGID")?,
        pidtype_sid: enum_value(&btf, "pid_type", "PIDTYPE_SID")?,
        pid_numbers_nr: o("pid", "numbers")? + o("upid", "nr")?,
        fs_pwd: o("fs_struct", "pwd")?,
        fs_root: o("fs_struct", "root")?,
        path_dentry: o("path", "dentry")?,
        path_mnt: o("path", "mnt")?,
        files_fdt: o("files_struct", "fdt")?,
        fdt_fd: o("fdtable", "fd")?,
        fdt_max_fds: o("fdtable", "max_fds")?,
        file_f_path: o("file", "f_path")?,
        file_f_inode: o("file", "f_inode")?,
        dentry_d_parent: o("dentry", "d_parent")?,
        dentry_d_inode: o("dentry", "d_inode")?,
        dentry_d_name_name: o("dentry", "d_name.name")?,
        inode_i_ino: o("inode", "i_ino")?,
        inode_i_sb: o("inode", "i_sb")?,
        sb_s_dev: o("super_block", "s_dev")?,
        mm_exe_file: o("mm_struct", "exe_file")?,
        io_uring_opcode: 0,
        valid: 1,
        task_flags: o("task_struct", "flags")?,
        task_group_leader: o("task_struct", "group_leader")?,
        // Named real_start_time before 5.5; 0 (nobody is the agent) if neither exists.
        task_start_boottime: o("task_struct", "start_boottime")
            .or_else(|_| o("task_struct", "real_start_time"))
            .unwrap_or(0),
        task_cred: o("task_struct", "cred")?,
        cred_euid: o("cred", "euid")?,
    })
}

/// Shutdown offsets of this kernel, resolved once (the probe loads the object too).
pub fn shutdown_offsets() -> guardrail_common::SdOffsets {
    static O: std::sync::OnceLock<guardrail_common::SdOffsets> = std::sync::OnceLock::new();
    *O.get_or_init(|| resolve_shutdown_offsets().unwrap_or_default())
}

fn resolve_shutdown_offsets() -> Result<guardrail_common::SdOffsets> {
    let btf = btf_rs::Btf::from_file(VMLINUX_BTF)?;
    let o = |s: &str, m: &str| offset_of(&btf, s, m).with_context(|| format!("offset of {s}.{m}"));
    Ok(guardrail_common::SdOffsets {
        bprm_file: o("linux_binprm", "file")?,
        file_f_mode: o("file", "f_mode")?,
        sb_s_magic: o("super_block", "s_magic")?,
        valid: 1,
    })
}

/// Pseudo-filesystem offsets of this kernel, resolved once; all zero (nothing is taken for a
/// pseudo filesystem) when the BTF lacks them.
pub fn fs_offsets() -> guardrail_common::FsOffsets {
    static O: std::sync::OnceLock<guardrail_common::FsOffsets> = std::sync::OnceLock::new();
    *O.get_or_init(|| {
        resolve_fs_offsets(Path::new(VMLINUX_BTF)).unwrap_or_else(|e| {
            eprintln!("guardrail: pseudo filesystems are counted like any other: {e:#}");
            Default::default()
        })
    })
}

fn resolve_fs_offsets(path: &Path) -> Result<guardrail_common::FsOffsets> {
    let btf = btf_rs::Btf::from_file(path)?;
    let o = |s: &str, m: &str| offset_of(&btf, s, m).with_context(|| format!("offset of {s}.{m}"));
    Ok(guardrail_common::FsOffsets {
        sb_s_magic: o("super_block", "s_magic")?,
        sb_s_type: o("super_block", "s_type")?,
        fstype_name: o("file_system_type", "name")?,
        valid: 1,
    })
}

/// Where tracefs is (mounted by the agent if needed).
pub fn tracefs() -> Option<&'static Path> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
}

/// Offset of `opcode` in the io_uring submit tracepoint's record, from its format file
/// (`field:u8 opcode; offset:28; size:1; signed:0;`, tab-separated). None when the kernel has no such
/// tracepoint (no io_uring, or a kernel older than the `io_uring_submit_req` name).
pub fn io_uring_opcode_offset() -> Option<u32> {
    let format = tracefs()?.join("events/io_uring/io_uring_submit_req/format");
    let text = std::fs::read_to_string(format).ok()?;
    parse_format_offset(&text, "opcode")
}

fn parse_format_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.split_whitespace().last()?;
        if name != field {
            return None;
        }
        let off = line.split("offset:").nth(1)?.split(';').next()?;
        off.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tracepoint_format_offsets() {
        let fmt = "name: io_uring_submit_req\nID: 1\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:void * ctx;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:u8 opcode;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(parse_format_offset(fmt, "opcode"), Some(32));
        assert_eq!(parse_format_offset(fmt, "flags"), None);
    }

    /// Runs on whatever kernel the tests run on: the offsets must resolve and be distinct where
    /// the kernel's layout makes them distinct.
    #[test]
    fn resolves_offsets_from_this_kernel() {
        if !Path::new(VMLINUX_BTF).exists() {
            panic!("{VMLINUX_BTF} is missing: guardrail needs a kernel with BTF");
        }
        let o = resolve_offsets(Path::new(VMLINUX_BTF)).expect("offsets");
        assert_ne!(o.task_tgid, o.task_pid);
        assert_eq!(
            o.task_tgid,
            o.task_pid + 4,
            "tgid follows pid in task_struct"
        );
        assert_eq!(o.pidtype_pgid, 2);
        assert_eq!(o.pidtype_sid, 3);
        assert!(o.dentry_d_name_name > 0);
        let f = resolve_fs_offsets(Path::new(VMLINUX_BTF)).expect("fs offsets");
        assert_eq!(f.valid, 1);
        assert!(f.sb_s_magic > 0 && f.sb_s_type > 0);
        assert_ne!(f.sb_s_magic, f.sb_s_type);
    }
}
