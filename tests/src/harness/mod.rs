//! What the host test files share beyond the basics in `lib.rs`: the usual scene (a scratch tree,
//! a cgroup for the test's jobs, an agent), event-log and hold lookups on [`crate::Agent`], the
//! unprivileged user and small host facts, and the tier a scenario needs ([`Tier`]).
mod host;
mod lookups;
mod scene;
mod tier;

pub use host::*;
pub use lookups::program_ids;
pub use scene::*;
pub use tier::*;
