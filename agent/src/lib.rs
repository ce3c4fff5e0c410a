//! The agent's modules that tests drive directly, without a daemon. The `guardrail` binary
//! declares its own copies of these modules (main.rs), so nothing here changes the binary.
//! `fallback` (the `userspace` tier) needs no BPF at all; `sensor` comes along for
//! `KernelPolicy`, the tables both the kernel and the fallback judge by.
pub mod btf;
pub mod cgroup;
pub mod clock;
pub mod fallback;
pub mod forklog;
pub mod identity;
pub mod lifecycle;
pub mod probe;
pub mod scratch;
pub mod sensor;
