//! The deletion guard's policy tables and job state, shared by its programs in every tier (the
//! agent finds them by name: the statics' names are the maps' names). Maps used by one part only
//! live with it: levels.rs, tagging.rs.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use guardrail_common::*;

#[map]
pub(crate) static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

pub(crate) fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// Flags of the policy tables the agent writes and the programs only read. Preallocated (0), not
/// `BPF_F_NO_PREALLOC`, although a preallocated DIRS holds 7 MiB of kernel memory for a policy
/// of a few dozen directories: before Linux 6.1 (bpf_mem_alloc) the verifier answers a tracing
/// program (tracepoint, raw tracepoint: the tracepoint tier, and the tagging programs of every
/// tier) that uses a run-time allocated hash map with a kernel WARN ("trace type programs with
/// run-time allocated hash maps are unsafe"), which on a host with `panic_on_warn` is a panic.
/// Ubuntu 20.04/22.04 and Debian 11 run such kernels. The guard must never be the hazard; the
/// memory goal waits for the agent choosing the flag per kernel at load time.
pub(crate) const POLICY_TABLE: u32 = 0;

#[map]
pub(crate) static DIRS: HashMap<DirKey, DirRule> = HashMap::with_max_entries(65536, POLICY_TABLE);

#[map]
pub(crate) static RULES: Array<RuleParams> = Array::with_max_entries(MAX_RULES * POLICY_SLOTS, 0);

#[map]
pub(crate) static CGROUPS: HashMap<CgroupKey, u32> =
    HashMap::with_max_entries(8192, POLICY_TABLE);

#[map]
pub(crate) static UIDS: HashMap<UidKey, u32> = HashMap::with_max_entries(4096, POLICY_TABLE);

/// `deletion.never_hold` units by cgroup id (slot-keyed like CGROUPS; the value is the unit's index
/// in the policy, reported in the event): a job in one of them, or below one, is never stopped by
/// the kernel, with or without an agent.
#[map]
pub(crate) static NEVER_HOLD: HashMap<CgroupKey, u32> =
    HashMap::with_max_entries(1024, POLICY_TABLE);

#[map]
pub(crate) static JOBS: LruHashMap<JobKey, JobState> =
    LruHashMap::with_max_entries(JOBS_CAPACITY, 0);

/// Tracepoint tier: the tasks already stopped once at a hold (thread id → incident id), so that
/// only a task's first stop there is free of the self-resume count (see `first_stop_at_hold`).
#[map]
pub(crate) static STOPPED_TASKS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(4096, 0);

/// Held, denied and blocked jobs, in a map nothing evicts (see [`HeldJob`]).
#[map]
pub(crate) static HELD: HashMap<JobKey, HeldJob> = HashMap::with_max_entries(HELD_CAPACITY, 0);

/// Refusals (protected root, foreign data directory) per job and kind, for rate limiting. 4096
/// jobs refused at once is far past any real host; an evicted entry only lets that job's next
/// refusal be reported again.
#[map]
pub(crate) static REFUSALS: LruHashMap<RefusalKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// What `judge` found for a tracepoint-tier deletion in a foreign data directory, for the hook to
/// act on after it returns: `[data_dir_id, rule]` (per CPU; `judge` has no stack to spare).
#[map]
pub(crate) static FOREIGN: PerCpuArray<[u32; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for a new job's entry (too big for the BPF stack).
#[map]
pub(crate) static JOB_INIT: PerCpuArray<JobState> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for the user path of a tracepoint-tier deletion (too big for the BPF stack).
#[map]
pub(crate) static PATHBUF: PerCpuArray<[u8; 256]> = PerCpuArray::with_max_entries(1, 0);
