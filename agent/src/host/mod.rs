//! Facts about the host and its processes, one home each: /proc ([`procinfo`], [`identity`]),
//! cgroups, clocks, login sessions, kernel filesystems, and private scratch directories.
pub mod cgroup;
pub mod clock;
pub mod identity;
pub mod memory;
pub mod mounts;
pub mod procinfo;
pub mod scratch;
pub mod session;
