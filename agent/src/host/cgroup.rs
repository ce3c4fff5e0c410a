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

/// The cgroup v2 path of a process as /proc/PID/cgroup tells it (`/system.slice/x.service`).
pub fn path_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The ids (directory inodes) and names of the cgroup at `path` under the cgroup v2 mount `root`
/// and of its ancestors below the root, deepest first, limited as the kernel's lookup is
/// ([`guardrail_common::MAX_CGROUP_LEVELS`]): what units are matched against. The names in the
/// path are the job's to choose below a delegated unit, so they are only ever stat'ed, never
/// opened, and compared by id, never by name.
pub fn ancestor_ids(root: &Path, path: &str) -> Vec<(u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let mut ids = Vec::new();
    for level in (1..=comps.len()).rev() {
        if level != comps.len() && level > guardrail_common::MAX_CGROUP_LEVELS as usize {
            continue;
        }
        let dir = comps[..level]
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c));
        if let Ok(m) = std::fs::metadata(&dir) {
            ids.push((m.ino(), comps[level - 1].to_string()));
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ancestor_ids_are_deepest_first_and_bounded() {
        let dir = std::env::temp_dir().join(format!("gr-cg-{}", std::process::id()));
        let deep: Vec<String> = (0..10).map(|i| format!("l{i}")).collect();
        let full = deep.iter().fold(dir.clone(), |p, c| p.join(c));
        std::fs::create_dir_all(&full).expect("mkdir");
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        let path = format!("/{}", deep.join("/"));
        let ids: Vec<u64> = ancestor_ids(&dir, &path).into_iter().map(|x| x.0).collect();
        // Its own cgroup (level 10), then levels 8 down to 1: level 9 is past the kernel's bound.
        assert_eq!(ids.len(), 9);
        assert_eq!(ids[0], ino(&full));
        assert_eq!(ids[1], ino(&dir.join("l0/l1/l2/l3/l4/l5/l6/l7")));
        assert_eq!(ids[8], ino(&dir.join("l0")));
        assert_eq!(ancestor_ids(&dir, &path)[1].1, "l7");
        assert!(ancestor_ids(&dir, "/").is_empty());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
