//! guardrail's kernel programs.
//!
//! Two tiers share one object and one set of maps:
//! - `lsm`: BPF LSM hooks on inode_unlink/inode_rmdir/inode_rename refuse a deletion with EPERM
//!   before it happens.
//! - `tracepoint`: syscall tracepoints see the same deletions on kernels that refuse BPF LSM; they
//!   cannot refuse, so they stop the job with a signal sent from the kernel (it lands after the
//!   current syscall: at most one file past the budget per deleting task).
//!
//! - `fmodret`: the `lsm` tier's programs attached as fmod_ret (BPF_MODIFY_RETURN) to the kernel's
//!   `security_*` functions, for kernels that build BPF LSM but leave it out of the active LSM list
//!   (Ubuntu). Same bodies, same verdicts (see fmodret.rs).
//!
//! The kernel counts and decides; userspace hears only of state changes (a crossing, a refusal of
//! a protected path), never of each deleted file.
//!
//! Every kernel struct field is read through offsets the agent resolved from the running kernel's
//! BTF (`OFFSETS`), because Rust-built BPF carries no CO-RE relocations.
//!
//! Layout: `deletion/` is the deletion guard (its verdict, its programs per tier, its maps),
//! `shutdown.rs` the shutdown guard, `fmodret.rs` the fmod_ret attachments of both guards' LSM
//! bodies, `probe.rs` the capability probe and self-test, and `kernel/` what every program shares
//! (offsets and reads, the current task, atomics, signals, the event ring buffer).
#![no_std]
#![no_main]
// The BPF target's `core` has no Atomic* types with read-modify-write methods; the intrinsics
// lower to BPF_ATOMIC instructions (fetch-add and cmpxchg need -mcpu=v3, kernel >= 5.12).
// They use SeqCst on purpose: LLVM 22's BPF backend lowers a *relaxed* fetch-add whose result is
// used to a plain `lock +=` without BPF_FETCH, silently returning the addend instead of the old
// value (seen in llvm-objdump); SeqCst yields `atomic_fetch_add`.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Linted with Debian's clippy for bpfel (`cargo xtask test`). Two lints are allowed on purpose:
// the programs' shape is what the verifier accepted on every kernel we test, and the deepest call
// chain (sys_enter_unlinkat → judge → emit) sits at the 512-byte stack limit on 6.1, so rewrites
// that only please a linter are not worth an unproven stack layout.
#![allow(
    clippy::collapsible_if,
    reason = "nested ifs follow the order of kernel reads; collapsing them reshapes verified code"
)]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys are passed by reference so that no copy of them lands on the BPF stack"
)]

use core::ffi::c_void;

use aya_ebpf::programs::TracePointContext;

mod deletion;
mod fmodret;
mod incident_id;
mod kernel;
mod probe;
mod shutdown;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

// Keep the ctx type import used on every configuration.
const _: fn(*mut c_void) -> TracePointContext = TracePointContext::new;
