//! The kernel side as one unit (Tetragon's sensors, bombini's detectors): the embedded BPF
//! object, its maps and its programs are loaded, attached and torn down together.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{
        FModRet, Lsm, RawTracePoint, TracePoint,
        links::{FdLink, PinnedLink},
    },
};
use guardrail_common::{
    CgroupKey, Config, DirKey, DirRule, ExeKey, HeldJob, JOB_ACTIVE, JobKey, JobState,
    KernelOffsets, LEVELS, MAX_RULES, RuleParams, SelftestAnswer, UidKey,
};

use crate::tiers::probe::Tier;

/// The kernel programs, built by build.rs from ebpf/guardrail-ebpf.
#[cfg(not(guardrail_ebpf_missing))]
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guardrail.bpf.o"));

#[cfg(guardrail_ebpf_missing)]
pub static BPF_OBJECT: &[u8] = {
    // The build script found no eBPF toolchain: make the final link fail with a name that says
    // what to do, while `cargo check` and `cargo clippy` still work.
    unsafe extern "C" {
        static guardrail_ebpf_toolchain_missing__run_cargo_xtask_setup: [u8; 0];
    }
    // SAFETY: never dereferenced; the reference only exists to force the link error.
    unsafe { &guardrail_ebpf_toolchain_missing__run_cargo_xtask_setup }
};

/// Deletion hooks of the LSM tier: (program, hook).
pub const LSM_PROGRAMS: &[(&str, &str)] = &[
    ("inode_unlink", "inode_unlink"),
    ("inode_rmdir", "inode_rmdir"),
    ("inode_rename", "inode_rename"),
];

/// Deletion hooks of the fmodret tier: (program, kernel function). The same bodies as
/// `LSM_PROGRAMS`, on the `security_*` functions that call those hooks.
pub const FMODRET_PROGRAMS: &[(&str, &str)] = &[
    ("fm_unlink", "security_inode_unlink"),
    ("fm_rmdir", "security_inode_rmdir"),
    ("fm_rename", "security_inode_rename"),
];

/// Deletion tracepoints of the tracepoint tier: (program, category, name).
pub const TRACEPOINT_PROGRAMS: &[(&str, &str, &str)] = &[
    ("sys_enter_unlinkat", "syscalls", "sys_enter_unlinkat"),
    ("sys_enter_unlink", "syscalls", "sys_enter_unlink"),
    ("sys_enter_rmdir", "syscalls", "sys_enter_rmdir"),
    ("sys_enter_rename", "syscalls", "sys_enter_rename"),
    ("sys_enter_renameat", "syscalls", "sys_enter_renameat"),
    ("sys_enter_renameat2", "syscalls", "sys_enter_renameat2"),
    // A rename is judged when it has succeeded (see the kernel's tp_rename.rs).
    ("sys_exit_rename", "syscalls", "sys_exit_rename"),
    ("sys_exit_renameat", "syscalls", "sys_exit_renameat"),
    ("sys_exit_renameat2", "syscalls", "sys_exit_renameat2"),
];

/// Process tagging, used by both tiers.
pub const RAW_TRACEPOINT_PROGRAMS: &[(&str, &str)] = &[
    ("sched_process_exec", "sched_process_exec"),
    ("sched_process_fork", "sched_process_fork"),
];

/// The tables a policy compiles to live with the policy (one pipeline: policy → tables →
/// kernel); re-exported here, where they are installed.
pub use crate::policy::KernelPolicy;

/// Maps whose contents must outlive one agent process: job counters and holds, the incident
/// counter, the executable tags of running processes, and shutdown callers stopped to wait for
/// their refusal message.
pub const PINNED_MAPS: &[&str] = &[
    "JOBS",
    "HELD",
    "INCIDENTS",
    "TASK_RULE",
    "SD_STOPPED",
    // A restart must not hand every session and user a fresh budget.
    "LEVEL_COUNTS",
];

pub struct Sensor {
    ebpf: Ebpf,
    /// Links taken out of aya's management: dropping one detaches its program, unless it is
    /// pinned.
    links: Vec<(&'static str, FdLink)>,
    /// Where links and state maps are pinned (None: everything goes when the agent goes).
    pin_dir: Option<PathBuf>,
    pinned: Vec<PinnedLink>,
    active_slot: u32,
    attached: Vec<&'static str>,
    /// Kernel ids of the attached programs (what `bpftool prog show id N` knows them by).
    ids: Vec<u32>,
}

impl Drop for Sensor {
    /// Detaches every link at once. Each detach of a tracepoint program waits for the kernel's
    /// grace periods (tracepoint unregistration synchronizes RCU); one after another, the
    /// tracepoint tier's 17 programs took more than the 2 s a stop may take on a loaded host.
    /// Closed from one thread each, the waits overlap. A pinned link only loses our reference.
    fn drop(&mut self) {
        let links = std::mem::take(&mut self.links);
        std::thread::scope(|s| {
            for (_, link) in links {
                // With no thread to be had (a limit), the closure and its link are dropped
                // right here: that one is detached in turn.
                let _ = std::thread::Builder::new().spawn_scoped(s, move || drop(link));
            }
        });
    }
}

/// Loads the object with this kernel's offsets, creating (not attaching) everything.
pub fn load(offsets: &KernelOffsets) -> Result<Ebpf> {
    load_pinned(offsets, None)
}

/// Loads the object; with `pin_dir`, the state maps are reused from (or pinned to)
/// `pin_dir/maps/NAME`, so a restarted agent carries on with the same counters and holds.
fn load_pinned(offsets: &KernelOffsets, pin_dir: Option<&Path>) -> Result<Ebpf> {
    if BPF_OBJECT.is_empty() {
        bail!(
            "this guardrail binary was built without its kernel programs (run `cargo xtask setup`, then rebuild)"
        );
    }
    let sd_offsets = crate::tiers::btf::shutdown_offsets();
    let fs_offsets = crate::tiers::btf::fs_offsets();
    let mut loader = EbpfLoader::new();
    loader.override_global("OFFSETS", offsets, true);
    loader.override_global("SD_OFFSETS", &sd_offsets, true);
    loader.override_global("FS_OFFSETS", &fs_offsets, true);
    let paths: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) => PINNED_MAPS
            .iter()
            .map(|m| (*m, dir.join("maps").join(m)))
            .collect(),
        None => Vec::new(),
    };
    if let Some(dir) = pin_dir {
        std::fs::create_dir_all(dir.join("maps"))
            .with_context(|| format!("creating {}", dir.join("maps").display()))?;
    }
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    match loader.load(BPF_OBJECT) {
        Ok(e) => Ok(e),
        Err(first) if !paths.is_empty() => {
            // Pinned maps of an incompatible older version: start afresh rather than not at all.
            eprintln!(
                "guardrail: pinned state in {} is unusable ({first}); starting afresh",
                paths[0].1.display()
            );
            for (_, path) in &paths {
                let _ = std::fs::remove_file(path);
            }
            loader
                .load(BPF_OBJECT)
                .context("loading the embedded BPF object")
        }
        Err(e) => Err(e).context("loading the embedded BPF object"),
    }
}

impl Sensor {
    pub fn new(offsets: &KernelOffsets) -> Result<Self> {
        Self::with_pins(offsets, None)
    }

    /// A sensor whose state maps and links live in `pin_dir` (bpffs), so that enforcement goes on
    /// while no agent runs and the next agent adopts it.
    pub fn with_pins(offsets: &KernelOffsets, pin_dir: Option<&Path>) -> Result<Self> {
        Ok(Sensor {
            ebpf: load_pinned(offsets, pin_dir)?,
            links: Vec::new(),
            pin_dir: pin_dir.map(Path::to_path_buf),
            pinned: Vec::new(),
            active_slot: 0,
            attached: Vec::new(),
            ids: Vec::new(),
        })
    }

    /// Attaches the deletion hooks of `tier` and the process-tagging hooks.
    pub fn attach(&mut self, tier: Tier) -> Result<()> {
        for (prog, tp) in RAW_TRACEPOINT_PROGRAMS {
            self.attach_raw_tracepoint(prog, tp)?;
        }
        match tier {
            Tier::Lsm => {
                let btf = Btf::from_sys_fs().context("reading kernel BTF for the LSM hooks")?;
                for (prog, hook) in LSM_PROGRAMS {
                    self.attach_lsm(prog, hook, &btf)?;
                }
            }
            Tier::FModRet => {
                let btf =
                    Btf::from_sys_fs().context("reading kernel BTF for the fmod_ret hooks")?;
                for (prog, func) in FMODRET_PROGRAMS {
                    self.attach_fmodret(prog, func, &btf)?;
                }
            }
            Tier::Tracepoint => {
                for (prog, cat, name) in TRACEPOINT_PROGRAMS {
                    self.attach_tracepoint(prog, cat, name)?;
                }
                // io_uring requests never pass the syscall tracepoints.
                if crate::tiers::btf::io_uring_opcode_offset().is_some() {
                    self.attach_tracepoint(
                        "io_uring_submit_req",
                        "io_uring",
                        "io_uring_submit_req",
                    )?;
                }
            }
            Tier::Userspace => {}
        }
        Ok(())
    }

    /// Loads `prog` and attaches it to LSM hook `hook`; its link joins the sensor's (pinned by
    /// [`Sensor::pin_links`]).
    pub fn attach_lsm(&mut self, prog: &'static str, hook: &str, btf: &Btf) -> Result<()> {
        // Each load runs the verifier (seconds under emulation): a stop asked for meanwhile
        // ends start-up here.
        crate::host::lifecycle::check()?;
        let p: &mut Lsm = self.program(prog)?.try_into()?;
        p.load(hook, btf)
            .with_context(|| format!("loading LSM program {prog}"))?;
        let id = p
            .attach()
            .with_context(|| format!("attaching LSM program {prog}"))?;
        let link = FdLink::from(p.take_link(id)?);
        self.record_attached(prog, link);
        Ok(())
    }

    /// Loads `prog` and attaches it as fmod_ret to kernel function `func`; its link joins the
    /// sensor's like an LSM program's.
    pub fn attach_fmodret(&mut self, prog: &'static str, func: &str, btf: &Btf) -> Result<()> {
        crate::host::lifecycle::check()?;
        let p: &mut FModRet = self.program(prog)?.try_into()?;
        p.load(func, btf)
            .with_context(|| format!("loading fmod_ret program {prog} for {func}"))?;
        let id = p
            .attach()
            .with_context(|| format!("attaching fmod_ret program {prog} to {func}"))?;
        let link = FdLink::from(p.take_link(id)?);
        self.record_attached(prog, link);
        Ok(())
    }

    /// Loads `prog` and attaches it to tracepoint `category/name`.
    pub fn attach_tracepoint(
        &mut self,
        prog: &'static str,
        category: &str,
        name: &str,
    ) -> Result<()> {
        crate::host::lifecycle::check()?;
        let p: &mut TracePoint = self.program(prog)?.try_into()?;
        p.load().with_context(|| format!("loading {prog}"))?;
        let id = p
            .attach(category, name)
            .with_context(|| format!("attaching {prog} to {category}/{name}"))?;
        let link = FdLink::try_from(p.take_link(id)?)
            .with_context(|| format!("{prog}: the kernel gave no bpf_link (needs >= 5.15)"))?;
        self.record_attached(prog, link);
        Ok(())
    }

    /// Loads `prog` and attaches it to raw tracepoint `tp`.
    pub fn attach_raw_tracepoint(&mut self, prog: &'static str, tp: &str) -> Result<()> {
        crate::host::lifecycle::check()?;
        let p: &mut RawTracePoint = self.program(prog)?.try_into()?;
        p.load().with_context(|| format!("loading {prog}"))?;
        let id = p
            .attach(tp)
            .with_context(|| format!("attaching {prog} to raw tracepoint {tp}"))?;
        let link = FdLink::from(p.take_link(id)?);
        self.record_attached(prog, link);
        Ok(())
    }

    /// Pins every link attached so far (the deletion hooks and the shutdown guard's), then
    /// unpins (detaches) the previous agent's: both run for a moment, so there is never a moment
    /// with none (a deletion in that moment may be counted twice). Call once, after every
    /// program is attached.
    pub fn pin_links(&mut self) -> Result<()> {
        let Some(dir) = self.pin_dir.clone() else {
            return Ok(());
        };
        // bpffs refuses names with a dot.
        let fresh = dir.join("links_new");
        let current = dir.join("links");
        let _ = std::fs::remove_dir_all(&fresh);
        std::fs::create_dir_all(&fresh).with_context(|| format!("creating {}", fresh.display()))?;
        for (name, link) in self.links.drain(..) {
            let path = fresh.join(name);
            let pinned = link
                .pin(&path)
                .with_context(|| format!("pinning {name} at {}", path.display()))?;
            self.pinned.push(pinned);
        }
        let adopted = unpin_all(&current);
        if adopted > 0 {
            println!("guardrail: replaced {adopted} programs left pinned by the previous agent");
        }
        std::fs::rename(&fresh, &current)
            .with_context(|| format!("renaming {} to {}", fresh.display(), current.display()))?;
        // The pins now live under links/; dropping our handles leaves them attached.
        self.pinned.clear();
        Ok(())
    }

    /// Whether a previous agent left pinned state here (its holds are adopted).
    pub fn had_pinned_state(dir: &Path) -> bool {
        dir.join("links").is_dir()
    }

    /// Detaches everything and removes the pins: what `systemctl stop` means.
    pub fn unpin_everything(&mut self) {
        let Some(dir) = self.pin_dir.take() else {
            return;
        };
        self.pinned.clear();
        unpin_dir(&dir);
    }

    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    pub fn attached_ids(&self) -> &[u32] {
        &self.ids
    }

    fn record_attached(&mut self, prog: &'static str, link: FdLink) {
        self.links.push((prog, link));
        self.attached.push(prog);
        if let Some(id) = self
            .ebpf
            .program(prog)
            .and_then(|p| p.info().ok())
            .map(|i| i.id())
        {
            self.ids.push(id);
        }
    }

    fn program(&mut self, name: &str) -> Result<&mut aya::programs::Program> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the BPF object has no program {name}"))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("the BPF object has no map {name}"))
    }

    pub fn config(&mut self) -> Result<Config> {
        let a: Array<_, Config> = Array::try_from(self.map_mut("CONFIG")?)?;
        Ok(a.get(&0, 0)?)
    }

    fn set_config(&mut self, c: Config) -> Result<()> {
        let mut a: Array<_, Config> = Array::try_from(self.map_mut("CONFIG")?)?;
        a.set(0, c, 0)?;
        Ok(())
    }

    /// Writes `policy` into the inactive slot, then flips the active slot: the kernel judges
    /// every deletion against one whole policy, old or new, never a mix and never none. Job
    /// counters and holds live in other maps and survive.
    pub fn install_policy(&mut self, policy: &KernelPolicy) -> Result<()> {
        let mut cfg = self.config()?;
        let next = if cfg.policy_loaded == 0 {
            0
        } else {
            cfg.active_slot ^ 1
        };
        self.clear_slot(next)?;
        {
            let mut dirs: HashMap<_, DirKey, DirRule> = HashMap::try_from(self.map_mut("DIRS")?)?;
            for ((dev, ino), rule) in &policy.dirs {
                dirs.insert(
                    DirKey {
                        dev: *dev,
                        ino: *ino,
                        slot: next,
                        _pad: 0,
                    },
                    rule,
                    0,
                )
                .context("writing the directory table (DIRS)")?;
            }
        }
        {
            if policy.rules.len() > MAX_RULES as usize {
                bail!(
                    "the policy has {} rules; the kernel tables hold {MAX_RULES}",
                    policy.rules.len()
                );
            }
            let mut rules: Array<_, RuleParams> = Array::try_from(self.map_mut("RULES")?)?;
            for (i, r) in policy.rules.iter().enumerate() {
                rules
                    .set(next * MAX_RULES + i as u32, r, 0)
                    .context("writing RULES")?;
            }
            let mut levels: Array<_, RuleParams> = Array::try_from(self.map_mut("LEVEL_PARAMS")?)?;
            for i in 0..LEVELS {
                let p = policy.levels.get(i as usize).copied().unwrap_or_default();
                levels
                    .set(next * LEVELS + i, p, 0)
                    .context("writing LEVEL_PARAMS")?;
            }
        }
        {
            let mut exes: HashMap<_, ExeKey, u32> = HashMap::try_from(self.map_mut("EXES")?)?;
            for ((dev, ino), rule) in &policy.exes {
                exes.insert(
                    ExeKey {
                        dev: *dev,
                        ino: *ino,
                        slot: next,
                        _pad: 0,
                    },
                    rule,
                    0,
                )?;
            }
        }
        {
            let mut cg: HashMap<_, CgroupKey, u32> = HashMap::try_from(self.map_mut("CGROUPS")?)?;
            for (id, rule) in &policy.cgroups {
                cg.insert(
                    CgroupKey {
                        cgroup_id: *id,
                        slot: next,
                        _pad: 0,
                    },
                    rule,
                    0,
                )?;
            }
        }
        {
            let mut nh: HashMap<_, CgroupKey, u32> =
                HashMap::try_from(self.map_mut("NEVER_HOLD")?)?;
            for (id, unit) in &policy.never_hold {
                nh.insert(
                    CgroupKey {
                        cgroup_id: *id,
                        slot: next,
                        _pad: 0,
                    },
                    unit,
                    0,
                )
                .context("writing the never_hold table (NEVER_HOLD)")?;
            }
        }
        {
            let mut uids: HashMap<_, UidKey, u32> = HashMap::try_from(self.map_mut("UIDS")?)?;
            for (uid, rule) in &policy.uids {
                uids.insert(
                    UidKey {
                        uid: *uid,
                        slot: next,
                    },
                    rule,
                    0,
                )?;
            }
        }
        cfg.active_slot = next;
        cfg.mode = policy.mode;
        cfg.agent_tgid = std::process::id();
        // The pid alone exempts nobody: a process that gets it after this agent died started
        // later (see guardrail_common::is_agent).
        (cfg.agent_start_lo, cfg.agent_start_hi) = crate::host::identity::own_start_range();
        cfg.policy_loaded = 1;
        // The kernel's scope cache drops every verdict of the policy before.
        cfg.policy_gen = cfg.policy_gen.wrapping_add(1);
        self.set_config(cfg)?;
        self.active_slot = next;
        Ok(())
    }

    /// Removes every entry of `slot` from the slot-keyed tables.
    fn clear_slot(&mut self, slot: u32) -> Result<()> {
        fn clear<K: aya::Pod + Copy, V: aya::Pod>(
            map: &mut aya::maps::Map,
            in_slot: impl Fn(&K) -> bool,
        ) -> Result<()> {
            let mut m: HashMap<_, K, V> = HashMap::try_from(map)?;
            let keys: Vec<K> = m
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| in_slot(k))
                .collect();
            for k in keys {
                let _ = m.remove(&k);
            }
            Ok(())
        }
        clear::<DirKey, DirRule>(self.map_mut("DIRS")?, |k| k.slot == slot)?;
        clear::<ExeKey, u32>(self.map_mut("EXES")?, |k| k.slot == slot)?;
        clear::<CgroupKey, u32>(self.map_mut("CGROUPS")?, |k| k.slot == slot)?;
        clear::<CgroupKey, u32>(self.map_mut("NEVER_HOLD")?, |k| k.slot == slot)?;
        clear::<UidKey, u32>(self.map_mut("UIDS")?, |k| k.slot == slot)?;
        Ok(())
    }

    /// A job as the kernel judges it: its `JOBS` counters, with the held state from `HELD` when
    /// the counters were evicted or made afresh since it was held.
    pub fn job(&mut self, key: &JobKey) -> Result<Option<JobState>> {
        let m: HashMap<_, JobKey, JobState> = HashMap::try_from(self.map_mut("JOBS")?)?;
        let counters = match m.get(key, 0) {
            Ok(v) => Some(v),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(e) => return Err(e.into()),
        };
        let held = self.held(key)?;
        Ok(merge_held(counters, held))
    }

    fn held(&mut self, key: &JobKey) -> Result<Option<HeldJob>> {
        let h: HashMap<_, JobKey, HeldJob> = HashMap::try_from(self.map_mut("HELD")?)?;
        match h.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a job's state. Letting a job go (active again) first removes it from `HELD`, so the
    /// kernel never restores a hold the agent lifted; holding or denying writes `HELD` first. An
    /// error means the kernel may still hold the job: the caller keeps its hold record.
    pub fn set_job(&mut self, key: &JobKey, state: &JobState) -> Result<()> {
        {
            let mut h: HashMap<_, JobKey, HeldJob> = HashMap::try_from(self.map_mut("HELD")?)?;
            if state.state == JOB_ACTIVE {
                match h.remove(key) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e).context("removing the job from HELD"),
                }
            } else {
                let held = HeldJob {
                    state: state.state,
                    rule: state.rule,
                    incident: state.incident,
                    held_ns: state.held_ns,
                };
                // A full HELD map (the daemon alerts at 80 %) leaves JOBS to hold the job.
                if let Err(e) = h.insert(key, held, 0) {
                    eprintln!(
                        "guardrail: HELD map: {e}; job {} held in JOBS only",
                        key.pgid
                    );
                }
            }
        }
        let mut m: HashMap<_, JobKey, JobState> = HashMap::try_from(self.map_mut("JOBS")?)?;
        m.insert(key, state, 0)
            .context("writing the job's state (JOBS)")?;
        Ok(())
    }

    /// Every job the kernel knows: those with counters, and held ones whose counters are gone.
    pub fn jobs(&mut self) -> Result<Vec<(JobKey, JobState)>> {
        let held: std::collections::HashMap<JobKey, HeldJob> = {
            let h: HashMap<_, JobKey, HeldJob> = HashMap::try_from(self.map_mut("HELD")?)?;
            h.iter().filter_map(|r| r.ok()).collect()
        };
        let m: HashMap<_, JobKey, JobState> = HashMap::try_from(self.map_mut("JOBS")?)?;
        let mut out: Vec<(JobKey, JobState)> = m
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(k, j)| merge_held(Some(j), held.get(&k).copied()).map(|j| (k, j)))
            .collect();
        let counted: std::collections::HashSet<JobKey> = out.iter().map(|(k, _)| *k).collect();
        for (k, h) in held {
            if !counted.contains(&k)
                && let Some(j) = merge_held(None, Some(h))
            {
                out.push((k, j));
            }
        }
        Ok(out)
    }

    /// Entries in (`JOBS`, `HELD`), for the fill alert.
    pub fn job_map_fill(&mut self) -> Result<(usize, usize)> {
        let jobs = {
            let m: HashMap<_, JobKey, JobState> = HashMap::try_from(self.map_mut("JOBS")?)?;
            m.keys().filter(|k| k.is_ok()).count()
        };
        let h: HashMap<_, JobKey, HeldJob> = HashMap::try_from(self.map_mut("HELD")?)?;
        Ok((jobs, h.keys().filter(|k| k.is_ok()).count()))
    }

    pub fn remove_job(&mut self, key: &JobKey) -> Result<()> {
        let mut m: HashMap<_, JobKey, JobState> = HashMap::try_from(self.map_mut("JOBS")?)?;
        let _ = m.remove(key);
        let mut h: HashMap<_, JobKey, HeldJob> = HashMap::try_from(self.map_mut("HELD")?)?;
        let _ = h.remove(key);
        Ok(())
    }

    /// This agent exits and leaves its programs pinned: from now on no process is the agent
    /// (the next agent's own configuration replaces this one).
    pub fn forget_agent(&mut self) -> Result<()> {
        let mut cfg = self.config()?;
        cfg.agent_tgid = 0;
        cfg.agent_start_lo = 0;
        cfg.agent_start_hi = 0;
        self.set_config(cfg)
    }

    /// The ring buffer of events, taken out of the object (call once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| anyhow!("no EVENTS map"))?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// A fresh incident id from the kernel's counter, by the same atomic add the deletion
    /// programs use (the `incident_id` program, run with `BPF_PROG_TEST_RUN`; see its module):
    /// an id the agent takes can never be one a crossing took at the same moment.
    pub fn next_incident(&mut self) -> Result<u64> {
        use aya::programs::{SocketFilter, TestRun, TestRunOptions};
        let p: &mut SocketFilter = self.program("incident_id")?.try_into()?;
        if p.fd().is_err() {
            p.load().context("loading incident_id")?;
        }
        // A socket filter's test run needs at least an Ethernet header of packet data.
        let packet = [0u8; 64];
        let out = p
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                repeat: 1,
                ..Default::default()
            })
            .context("running incident_id (BPF_PROG_TEST_RUN)")?;
        match out.return_value {
            0 => bail!("incident_id could not read the INCIDENTS counter"),
            id => Ok(u64::from(id)),
        }
    }
}

/// [`Sensor::next_incident`]; should the kernel refuse the test run, the reason is logged and
/// the id is taken by a read-then-write of the counter (racy against a crossing at that very
/// moment, as before this program existed, but never no id at all).
pub fn next_incident_or_log(sensor: &mut Sensor) -> u64 {
    sensor.next_incident().unwrap_or_else(|e| {
        eprintln!(
            "guardrail: incident id by read-then-write (the kernel counter's program failed: {e:#})"
        );
        let mut id = 0;
        if let Ok(m) = sensor.map_mut("INCIDENTS")
            && let Ok(mut a) = Array::<_, u64>::try_from(m)
        {
            id = a.get(&0, 0).unwrap_or(0) + 1;
            let _ = a.set(0, id, 0);
        }
        id
    })
}

/// Reads the self-test answer for this process, triggering the self-test tracepoint with a
/// `getpgid` call. Used by the probe and by `guardrail selftest`.
pub fn selftest_answer(ebpf: &mut Ebpf) -> Result<SelftestAnswer> {
    {
        let mut target: Array<_, u32> = Array::try_from(
            ebpf.map_mut("SELFTEST_TARGET")
                .ok_or_else(|| anyhow!("no SELFTEST_TARGET"))?,
        )?;
        target.set(0, std::process::id(), 0)?;
    }
    // SAFETY: getpgid has no memory-safety preconditions.
    unsafe { libc::getpgid(0) };
    let ans: Array<_, SelftestAnswer> =
        Array::try_from(ebpf.map("SELFTEST").ok_or_else(|| anyhow!("no SELFTEST"))?)?;
    Ok(ans.get(&0, 0)?)
}

/// A job's state from its counters (`JOBS`) and its entry in `HELD`: the held state wins over an
/// active one (the counters were evicted and made afresh), as it does in the kernel.
pub fn merge_held(counters: Option<JobState>, held: Option<HeldJob>) -> Option<JobState> {
    match (counters, held) {
        (Some(mut j), Some(h)) if j.state == JOB_ACTIVE && h.state != JOB_ACTIVE => {
            j.state = h.state;
            j.incident = h.incident;
            j.held_ns = h.held_ns;
            Some(j)
        }
        (None, Some(h)) if h.state != JOB_ACTIVE => Some(JobState {
            state: h.state,
            rule: h.rule,
            incident: h.incident,
            held_ns: h.held_ns,
            ..Default::default()
        }),
        (j, _) => j,
    }
}

/// Detaches every program pinned in `dir` (an agent's pin directory) and removes its pins, also
/// those of a start-up stopped half way (`links_new`): what `systemctl stop` means.
pub fn unpin_dir(dir: &Path) {
    for links in ["links", "links_new"] {
        unpin_all(&dir.join(links));
        let _ = std::fs::remove_dir(dir.join(links));
    }
    for m in PINNED_MAPS {
        let _ = std::fs::remove_file(dir.join("maps").join(m));
    }
    let _ = std::fs::remove_dir(dir.join("maps"));
    let _ = std::fs::remove_dir(dir);
}

/// Unpins every link pinned in `dir`, detaching its program; returns how many. The last
/// reference to a link goes with its pin, and each detach waits for the kernel's grace periods
/// (tracepoint unregistration synchronizes RCU): one after another, 17 programs took about a
/// second on a loaded host, half of the 2 s a stop may take. One thread per link lets the
/// waits overlap; with no thread to be had, that link is unpinned here, in turn.
fn unpin_all(dir: &Path) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let n = AtomicUsize::new(0);
    let unpin = |path: PathBuf| match PinnedLink::from_pin(&path) {
        Ok(link) => {
            if link.unpin().is_ok() {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(_) => {
            let _ = std::fs::remove_file(&path);
        }
    };
    std::thread::scope(|s| {
        for entry in rd.flatten() {
            let path = entry.path();
            let spawned = std::thread::Builder::new().spawn_scoped(s, {
                let unpin = &unpin;
                let path = path.clone();
                move || unpin(path)
            });
            if spawned.is_err() {
                unpin(path);
            }
        }
    });
    n.into_inner()
}
