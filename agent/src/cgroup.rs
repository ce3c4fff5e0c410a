//! Starting a process inside a given cgroup v2 directory, from its first instruction: how
//! `guardrail selftest` and the tests scope a runaway to a rule of its own.
use std::{ffi::CString, os::unix::process::CommandExt, path::Path, process::Command};

/// Makes `cmd` join `cgroup` (a cgroup v2 directory) between fork and exec, so that everything
/// the program does is judged under that cgroup's rule.
pub fn join_at_exec(cmd: &mut Command, cgroup: &Path) -> std::io::Result<()> {
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(|_| std::io::Error::other("a cgroup path with a NUL byte"))?;
    // SAFETY: the closure only makes raw syscalls (open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if ok { Ok(()) } else { Err(err) }
        });
    }
    Ok(())
}
