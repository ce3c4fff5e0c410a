//! The shutdown guard (issue 5): session classes, actions, argv words, its configuration,
//! events and offsets.

/// Session classes the agent pushes into `SD_SESSIONS` (audit session id → class). A session id
/// missing from the map is [`SD_CLASS_UNKNOWN`]; an unset session id (`u32::MAX`: no login
/// session) is [`SD_CLASS_NONE`].
pub const SD_CLASS_LOCAL: u32 = 0;
pub const SD_CLASS_REMOTE: u32 = 1;
pub const SD_CLASS_NONE: u32 = 2;
pub const SD_CLASS_UNKNOWN: u32 = 3;
pub const SD_CLASSES: usize = 4;

/// Per-class answers in [`ShutdownConfig::action`].
pub const SD_ALLOW: u32 = 0;
pub const SD_CONFIRM: u32 = 1;
pub const SD_BLOCK: u32 = 2;

/// The audit session id of a task with no login session.
pub const AUDIT_SESSION_UNSET: u32 = u32::MAX;

/// Kinds of executable in `SD_EXES` (keyed by file identity, like [`ExeKey`](crate::ExeKey) without a slot).
/// A dedicated shutdown program (sysvinit's `reboot`, a policy `commands` entry): every exec is a
/// shutdown request.
pub const SD_EXE_ALWAYS: u32 = 1;
/// A multi-call program (busybox, systemd as init/telinit): argv decides.
pub const SD_EXE_MULTICALL: u32 = 2;
/// systemd's systemctl: a multi-call program that acts as systemctl under any argv[0] it does not
/// recognise (`exec -a x systemctl reboot` reboots), so an unknown argv[0] is judged as systemctl.
pub const SD_EXE_SYSTEMCTL: u32 = 3;

/// Flags of a word in `SD_WORDS` (keyed by [`word_hash`]).
/// argv[0] basename that is a shutdown verb by itself: reboot, poweroff, halt, shutdown.
pub const SD_W_ARGV0_SHUTDOWN: u32 = 1 << 0;
/// argv[0] basename systemctl.
pub const SD_W_ARGV0_SYSTEMCTL: u32 = 1 << 1;
/// argv[0] basename init or telinit.
pub const SD_W_ARGV0_INIT: u32 = 1 << 2;
/// A systemctl verb that shuts down: reboot, poweroff, halt, kexec, soft-reboot, suspend, hibernate, ...
pub const SD_W_VERB: u32 = 1 << 3;
/// systemctl start / isolate.
pub const SD_W_START: u32 = 1 << 4;
/// A shutdown target: reboot.target, poweroff.target, ..., runlevel0.target, runlevel6.target.
pub const SD_W_TARGET: u32 = 1 << 5;
/// A runlevel that shuts down for init/telinit: 0, 6.
pub const SD_W_RUNLEVEL: u32 = 1 << 6;
/// argv[0] basename whose `-c` cancels a scheduled shutdown instead of asking for one: shutdown.
pub const SD_W_ARGV0_CANCELS: u32 = 1 << 7;
/// The option `-c` (cancel, for `shutdown`).
pub const SD_W_OPT_CANCEL: u32 = 1 << 8;
/// A `shutdown` option that chooses an action (`-r`, `-h`, `-P`, `--reboot`, ...). In systemd's
/// shutdown the last action option wins, so `shutdown -c -r now` reboots: a `-c` counts as a
/// cancel only when no action option follows it.
pub const SD_W_OPT_ACTION: u32 = 1 << 9;
/// A systemctl option whose value is the next word (`--message x`, `-p Name`): that word is
/// never the verb.
pub const SD_W_OPT_VALUE: u32 = 1 << 10;
/// A systemctl verb that does not shut down (`status`, `restart`, ...). Words that are neither
/// this nor a shutdown verb (values of options, unit names) are skipped while looking for the
/// verb, so an option value the table does not know cannot pose as one.
pub const SD_W_VERB_OTHER: u32 = 1 << 11;

/// Words of argv the kernel captures at execve (argv[0] included) and bytes kept of each.
pub const SD_ARGV_WORDS: usize = 6;
pub const SD_WORD_LEN: usize = 32;
/// Words of argv the kernel reads to find the verb and the options (only the first
/// [`SD_ARGV_WORDS`] are kept for the message): five or more options no longer hide the verb.
pub const SD_ARGV_SCAN: usize = 16;

/// What the kernel learnt about a command line at `sys_enter_execve*`, keyed by thread id, read
/// back at `bprm_check_security` / `sched_process_exec` of the same exec.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SdArgs {
    /// `SD_W_*` flags of argv[0]'s basename.
    pub argv0: u32,
    /// Flags of the first argument that is a known verb (not an option, not an option's value).
    pub verb: u32,
    /// Non-zero when a later non-option argument is a shutdown target.
    pub target: u32,
    /// Flags of the options (`-x`) seen, OR-ed.
    pub options: u32,
    /// The words themselves (argv[0] as a basename), NUL-padded, for the message.
    pub words: [[u8; SD_WORD_LEN]; SD_ARGV_WORDS],
}

/// The one element of `SD_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// `SD_ALLOW | SD_CONFIRM | SD_BLOCK` per `SD_CLASS_*`.
    pub action: [u32; SD_CLASSES],
    /// Non-zero once written by the agent: until then nothing is judged.
    pub enabled: u32,
    /// `MODE_AUDIT`: report what would have been refused, refuse nothing.
    pub mode: u32,
    /// The agent's tgid (never judged).
    pub agent_tgid: u32,
    /// Inode number of /proc/sysrq-trigger (procfs inode numbers are the same in every mount).
    pub sysrq_ino: u32,
    /// How long a process that used a confirmation pass may go on shutting down (ns): `poweroff`
    /// execs, then calls reboot(2); one confirmation covers both.
    pub cleared_ns: u64,
    /// Monotonic time (ns) until which the agent counts as running; it pushes this forward every
    /// tick. Past it (the agent crashed or is restarting and these programs stay pinned), a
    /// refused caller is not stopped to wait for a message no agent will write: the LSM tier
    /// just refuses, the tracepoint tier kills the program before its first instruction.
    pub alive_until_ns: u64,
    /// The agent's start time, as [`Config::agent_start_lo`](crate::Config::agent_start_lo): `agent_tgid` alone is never
    /// enough to be let through.
    pub agent_start_lo: u64,
    pub agent_start_hi: u64,
}

/// Key of `SD_EXES` and `SD_EXCEPT_EXES`: an executable's identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Kernel-internal dev_t (see [`kernel_dev_from_user`](crate::kernel_dev_from_user)).
    pub dev: u64,
    pub ino: u64,
}

/// What the request was (`ShutdownEvent::op`).
pub const SD_OP_EXEC: u32 = 1;
pub const SD_OP_REBOOT: u32 = 2;
pub const SD_OP_SYSRQ: u32 = 3;
pub const SD_OP_SIGNAL: u32 = 4;

/// What the kernel did (`ShutdownEvent::outcome`).
pub const SD_OUT_ALLOWED: u32 = 0;
pub const SD_OUT_REFUSED: u32 = 1;
/// A confirmation pass was consumed and the request allowed.
pub const SD_OUT_CONFIRMED: u32 = 2;
/// Audit mode: it would have been refused.
pub const SD_OUT_WOULD_REFUSE: u32 = 3;
/// Tracepoint tier: the exec'd program was stopped before its first instruction; the agent tells
/// the terminal, then kills it.
pub const SD_OUT_STOPPED: u32 = 4;

/// Ring buffer record kind of a [`ShutdownEvent`] (first field, like [`Event::kind`](crate::Event::kind)).
pub const EV_SHUTDOWN: u32 = 16;

/// One shutdown-class request, reported on every decision (they are rare).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ShutdownEvent {
    /// Always [`EV_SHUTDOWN`].
    pub kind: u32,
    /// `SD_OP_*`.
    pub op: u32,
    /// `SD_OUT_*`.
    pub outcome: u32,
    /// `SD_CLASS_*` the kernel judged with.
    pub class: u32,
    /// `SD_ALLOW | SD_CONFIRM | SD_BLOCK` for that class (after exceptions).
    pub action: u32,
    /// Non-zero when an exception (unit or executable) allowed it.
    pub exception: u32,
    pub tgid: u32,
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub loginuid: u32,
    pub audit_session: u32,
    /// Signal number (`SD_OP_SIGNAL`), 0 otherwise.
    pub signal: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
    pub ktime_ns: u64,
    pub comm: [u8; 16],
    /// `SD_OP_EXEC`: the command line as captured (argv[0] basename first).
    pub words: [[u8; SD_WORD_LEN]; SD_ARGV_WORDS],
}

/// Offsets only the shutdown programs read, resolved from BTF like [`KernelOffsets`](crate::KernelOffsets) (a separate
/// read-only global, so the deletion guard's layout does not change).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SdOffsets {
    /// `linux_binprm.file`
    pub bprm_file: u32,
    /// `file.f_mode`
    pub file_f_mode: u32,
    /// `super_block.s_magic`
    pub sb_s_magic: u32,
    /// Non-zero once filled in.
    pub valid: u32,
}

/// FNV-1a over a word: how the kernel and the agent name argv words without comparing strings in
/// the kernel (the agent fills `SD_WORDS` with the hashes of the words it cares about).
#[inline(always)]
pub const fn word_hash_step(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(0x100000001b3)
}
pub const WORD_HASH_INIT: u64 = 0xcbf29ce484222325;

pub fn word_hash(w: &[u8]) -> u64 {
    let mut h = WORD_HASH_INIT;
    let mut i = 0;
    while i < w.len() {
        h = word_hash_step(h, w[i]);
        i += 1;
    }
    h
}
