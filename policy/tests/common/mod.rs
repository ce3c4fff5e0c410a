#![allow(dead_code)]
use guardrail_policy::MemResolver;

/// A host with the paths the tests name, all on device 8:1 (userspace encoding 0x801).
pub fn host() -> MemResolver {
    MemResolver::new()
        .with_tree(
            0x801,
            &[
                "/tmp",
                "/var/tmp",
                "/var/cache",
                "/home/alice/.cache",
                "/home/bob/.cache",
                "/srv/releases",
                "/srv/keep",
                "/srv/db",
                "/etc/guardrail",
                "/var/lib/guardrail",
                "/var/lib/postgresql",
                "/var/log",
                "/bin/bash",
                "/usr/bin/dpkg",
                "/usr/bin/apt",
                "/usr/bin/apt-get",
                "/usr/bin/rpm",
                "/usr/bin/dnf",
                "/usr/bin/systemd-tmpfiles",
                "/usr/sbin/logrotate",
                "/usr/bin/deploy",
                "/boot",
                "/dev",
                "/dev/shm",
                "/home",
                "/lib",
                "/lib64",
                "/opt",
                "/root",
                "/run",
                "/sbin",
                "/usr",
                "/var",
                "/var/lib",
                "/mnt/backup",
            ],
        )
        .with_user("root", 0)
        .with_user("postgres", 105)
        .with_user("alice", 1000)
        .with_cgroup("nightly-update.service", 5001)
        .with_cgroup("postgresql@15-main.service", 5002)
        .with_cgroup("/system.slice/backup.service", 5003)
}
