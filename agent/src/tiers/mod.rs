//! The enforcement tiers: how deletions and shutdowns are seen and stopped on this kernel.
//! [`probe`] finds which tier the kernel supports; [`sensor`] loads, attaches and tears down the
//! kernel tiers' programs (`lsm`, `fmod_ret`, `tracepoint`) with struct offsets from [`btf`];
//! [`pins`] keeps them enforcing across agent restarts; [`userspace`] is the last resort where
//! no BPF can run (fanotify or inotify: it reports and stops, it cannot refuse); [`decode`] is the
//! one reader of the kernel's ring buffer records.
pub mod backend;
pub mod btf;
pub mod decode;
pub mod pins;
pub mod probe;
pub mod sensor;
pub mod userspace;
