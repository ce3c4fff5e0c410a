//! Facts about the host and its processes, one home each: /proc ([`procinfo`], [`identity`]),
//! cgroups, clocks, login sessions, kernel filesystems, private scratch directories, and the
//! agent's own stop signals ([`lifecycle`]).
pub mod cgroup;
pub mod clock;
pub mod dirs;
pub mod identity;
pub mod lifecycle;
pub mod memory;
pub mod mounts;
pub mod procinfo;
pub mod scratch;
pub mod session;
