//! Types shared by guardrail's kernel programs and its userspace.
//!
//! Everything that crosses the kernel/user boundary is `#[repr(C)]`, made only of fixed-width
//! integers and byte arrays (no `bool`, no `Option`, no enums), and padded explicitly so that the
//! layout is the same for `bpfel-unknown-none` and `x86_64-unknown-linux-gnu`. `tests/layout.rs`
//! pins every size and offset.
//!
//! The pure decision functions in decide.rs ([`scope_step`], [`over_budget`]) are compiled into
//! the kernel programs *and* used by `guardrail policy explain`, so that what explain prints is
//! what the kernel decides.
//!
//! One module per part, all re-exported here (every `guardrail_common::X` path is flat):
//! deletion.rs (the deletion guard's tables, jobs, levels), config.rs (its global configuration),
//! event.rs (deletion events), decide.rs, shutdown.rs (the shutdown guard's ABI), kernel.rs
//! (BTF-resolved offsets, pseudo filesystems, the self-test answer, `dev_t` conversions).
#![no_std]

mod config;
mod decide;
mod deletion;
mod event;
mod kernel;
mod shutdown;

pub use config::*;
pub use decide::*;
pub use deletion::*;
pub use event::*;
pub use kernel::*;
pub use shutdown::*;

#[cfg(feature = "user")]
mod pod {
    // SAFETY (for every impl below): the types are #[repr(C)], made only of integers and integer
    // arrays with explicit padding fields, so every bit pattern is a valid value.
    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: see the module comment.
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        super::DirKey,
        super::DirRule,
        super::RuleParams,
        super::ExeKey,
        super::CgroupKey,
        super::UidKey,
        super::Config,
        super::JobKey,
        super::JobState,
        super::HeldJob,
        super::RefusalKey,
        super::KernelOffsets,
        super::SelftestAnswer,
        super::SdArgs,
        super::ShutdownConfig,
        super::FileId,
        super::SdOffsets,
        super::ShutdownEvent,
        super::FsOffsets,
        super::LevelKey,
        super::LevelState
    );
}
