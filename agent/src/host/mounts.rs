//! Kernel filesystems the agent needs mounted (tracefs, securityfs, bpffs).

/// The agent needs tracefs (tracepoint ids), securityfs (LSM list, for messages) and bpffs
/// (pins); on a systemd host they are mounted already, in a bare VM or container maybe not.
pub fn mount_kernel_filesystems() {
    use nix::mount::{MsFlags, mount};
    let want = [
        ("tracefs", "/sys/kernel/tracing", "events"),
        ("securityfs", "/sys/kernel/security", "lsm"),
        ("bpf", "/sys/fs/bpf", ""),
    ];
    for (fstype, dir, probe) in want {
        let path = std::path::Path::new(dir);
        let present = if probe.is_empty() {
            is_mount_point(dir)
        } else {
            path.join(probe).exists()
        };
        // bpffs mounted inside the unit's private mount namespace would vanish with it, and the
        // pins with it: only the host's is any use (pins.rs; without one nothing is pinned).
        if fstype == "bpf" && !in_host_mount_namespace() {
            continue;
        }
        if !present && path.is_dir() {
            let _ = mount(
                Some(fstype),
                path,
                Some(fstype),
                MsFlags::empty(),
                None::<&str>,
            );
        }
    }
}

fn is_mount_point(dir: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(4) == Some(dir)))
        .unwrap_or(false)
}

/// Whether this process shares PID 1's mount namespace (a mount made here is the host's).
pub fn in_host_mount_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    let ns = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    match (ns("/proc/self/ns/mnt"), ns("/proc/1/ns/mnt")) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}
