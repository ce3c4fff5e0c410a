//! Stage 2's output: the validated policy the agent uses. Every value is checked and defaulted;
//! nothing here refers to the text it came from.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Largest budget accepted: above this, a budget stops nothing a human could react to; use
/// `action = "alert"` instead.
pub const MAX_BUDGET: u64 = 100_000_000;

/// Longest `deletion.window` (and rule `window`): a budget over more than a day is no longer a
/// runaway guard, and the kernel keeps the window in nanoseconds.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Longest `deletion.hold_timeout`: a week covers a long weekend; longer holds are forgotten jobs.
pub const MAX_HOLD_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `shutdown.confirm_window`: a confirmation is typed by someone at the prompt.
pub const MAX_CONFIRM_WINDOW: Duration = Duration::from_secs(3600);

/// `[[deletion.rule]]` + `[[deletion.exempt]]` + data-directory owners that are neither, plus the
/// default rule, must fit the kernel's 64-bit rule masks.
pub const MAX_POLICY_RULES: usize = guardrail_common::MAX_RULES as usize;

/// Global or per-rule mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    /// Compute and alert "would have held/refused"; stop nothing.
    Audit,
}

/// What happens when a job crosses its deletion budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Stop the job and wait for an admin (denied after `hold_timeout`).
    #[default]
    Hold,
    /// Refuse / kill without asking.
    Block,
    /// Count and alert only.
    Alert,
}

impl Action {
    pub fn kernel(self) -> u32 {
        match self {
            Action::Hold => guardrail_common::ACTION_HOLD,
            Action::Block => guardrail_common::ACTION_BLOCK,
            Action::Alert => guardrail_common::ACTION_ALERT,
        }
    }
}

/// What a denied hold does to the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnDeny {
    /// SIGKILL the job's process group.
    #[default]
    Kill,
    /// Resume it, refusing every further deletion outside scope while it runs.
    Refuse,
}

/// What a deliberate stop of the agent (not a restart) does to the jobs it holds: the agent
/// cannot ask anyone once it is gone, and a job left stopped with no agent is an outage nobody
/// sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnAgentStop {
    /// SIGKILL the job, as an unanswered hold's timeout does: a stop is no approval.
    #[default]
    End,
    /// Resume it with no budget for the rest of the job, as `guardrail off` does.
    Continue,
}

/// Answer to a shutdown request from one session class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownAction {
    Allow,
    /// Hold the request until someone types the host name (within `confirm_window`).
    Confirm,
    Block,
}

/// Where a shutdown request comes from (see threats.md §C for how the agent classifies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionClass {
    Local,
    Remote,
    /// No login session: services, timers, cron.
    None,
    /// A session id the agent cannot classify.
    Unknown,
    /// A serial console (ttyS*, hvc0): classified by `[shutdown].serial_console`.
    SerialConsole,
}

/// Which identity of a process selects a job rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobMatch {
    /// A systemd unit (`*.service` or `*.scope`); the job's cgroup.
    Unit(String),
    /// An executable (absolute path; its identity, not its path, is matched; inherited by the
    /// processes it starts).
    Executable(PathBuf),
    /// A user name or numeric uid.
    User(String),
    /// A cgroup v2 path relative to /sys/fs/cgroup, starting with `/`.
    Cgroup(String),
}

/// A set of process identities (data directory owners, exemptions, shutdown exceptions).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Identities {
    pub units: Vec<String>,
    pub executables: Vec<PathBuf>,
    pub users: Vec<String>,
    pub cgroups: Vec<String>,
}

impl Identities {
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
            && self.executables.is_empty()
            && self.users.is_empty()
            && self.cgroups.is_empty()
    }

    /// Every identity as a [`JobMatch`], in the order units, executables, users, cgroups.
    pub fn matches(&self) -> Vec<JobMatch> {
        let mut v: Vec<JobMatch> = self.units.iter().cloned().map(JobMatch::Unit).collect();
        v.extend(self.executables.iter().cloned().map(JobMatch::Executable));
        v.extend(self.users.iter().cloned().map(JobMatch::User));
        v.extend(self.cgroups.iter().cloned().map(JobMatch::Cgroup));
        v
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DataDir {
    pub path: PathBuf,
    /// Jobs that may delete below `path`; everybody else is refused from the first file.
    pub owners: Identities,
}

/// A per-job scope (`[[deletion.rule]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobRule {
    pub name: String,
    pub matcher: JobMatch,
    /// The only directories this job may delete in freely (globs kept as written).
    pub targets: Vec<PathBuf>,
    pub budget: u64,
    #[serde(with = "ser_duration")]
    pub window: Duration,
    pub action: Action,
    pub mode: Mode,
    /// Whether this rule's jobs also count at the levels above the job (session, unit, user).
    pub shared_budgets: bool,
}

/// A budget above the job (`[deletion.session]`, `[deletion.user]`): every deletion outside scope
/// by a job whose rule shares budgets counts here too, whichever job made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LevelBudget {
    /// Off: nothing is counted at this level (a policy without the section).
    pub enabled: bool,
    pub budget: u64,
    #[serde(with = "ser_duration")]
    pub window: Duration,
    /// What happens to the job whose deletion takes the level past its budget.
    pub action: Action,
}

impl LevelBudget {
    pub const fn off(budget: u64, window: Duration) -> Self {
        LevelBudget {
            enabled: false,
            budget,
            window,
            action: Action::Hold,
        }
    }
}

/// Jobs with no budget (`[[deletion.exempt]]`); protected roots and foreign data directories
/// still refuse them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Exemption {
    pub name: String,
    pub who: Identities,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deletion {
    pub budget: u64,
    #[serde(with = "ser_duration")]
    pub window: Duration,
    pub action: Action,
    #[serde(with = "ser_duration")]
    pub hold_timeout: Duration,
    pub on_deny: OnDeny,
    /// What a deliberate stop of the agent does to the jobs it holds.
    pub on_agent_stop: OnAgentStop,
    /// Global targets (rule 0's); may contain `*` components.
    pub targets: Vec<PathBuf>,
    pub protected_roots: Vec<PathBuf>,
    pub protect_mount_points: bool,
    pub data_dirs: Vec<DataDir>,
    pub rules: Vec<JobRule>,
    pub exemptions: Vec<Exemption>,
    /// Units whose jobs are never kept stopped (holding them would lock admins out or stop the
    /// host's logging): past the budget they are refused where the tier can refuse, else only
    /// reported.
    pub never_hold: Vec<String>,
    /// Whether jobs under the default rule also count at the levels above the job.
    pub shared_budgets: bool,
    /// Per login session; a service (no login session) is counted per unit with the same numbers.
    pub session: LevelBudget,
    /// Per user who logged in (audit login uid), across their sessions.
    pub user: LevelBudget,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShutdownException {
    pub name: String,
    pub units: Vec<String>,
    pub executables: Vec<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Shutdown {
    pub remote: ShutdownAction,
    pub local: ShutdownAction,
    pub none: ShutdownAction,
    pub unknown: ShutdownAction,
    /// How a serial console session is classified: [`SessionClass::Local`] or
    /// [`SessionClass::Remote`].
    pub serial_console: SessionClass,
    #[serde(with = "ser_duration")]
    pub confirm_window: Duration,
    /// Hold a logind block inhibitor on shutdown while some class confirms or blocks, so that
    /// requests sent to logind over D-Bus (no exec) are refused too.
    pub logind_inhibitor: bool,
    /// Extra executables treated as shutdown commands.
    pub commands: Vec<PathBuf>,
    pub exceptions: Vec<ShutdownException>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyslogFormat {
    Rfc5424,
    Rfc3164,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemoteSyslog {
    pub transport: Transport,
    pub host: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Syslog {
    pub enabled: bool,
    pub format: SyslogFormat,
    /// Facility name as written (`authpriv`, `local0`, ...), checked against the standard list.
    pub facility: String,
    /// Facility number (`authpriv` = 10).
    pub facility_code: u8,
    pub app_name: String,
    /// None: the local syslog socket.
    pub remote: Option<RemoteSyslog>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Alerts {
    pub syslog: Syslog,
    pub event_log: PathBuf,
    pub prometheus_listen: Option<std::net::SocketAddr>,
    pub prometheus_textfile: Option<PathBuf>,
    pub alertmanager_url: Option<String>,
}

/// The validated policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub mode: Mode,
    pub deletion: Deletion,
    pub shutdown: Shutdown,
    pub alerts: Alerts,
    /// The files merged into this policy, in order.
    pub sources: Vec<String>,
}

/// Syslog facility names and numbers (RFC 5424 §6.2.1).
pub const FACILITIES: &[(&str, u8)] = &[
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// Parses a policy duration: an unsigned integer followed by `ms`, `s`, `m` or `h` (`"90s"`).
/// Zero is accepted here; callers reject it where it makes no sense.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 12 {
        return None;
    }
    let n: u64 = s[..digits].parse().ok()?;
    let ms = match &s[digits..] {
        "ms" => n,
        "s" => n.checked_mul(1_000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Renders a duration the way the policy writes it (largest exact unit).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".to_string()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

mod ser_duration {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }
}
