//! `guardrail`: the agent (`guardrail agent`) and the admin CLI that talks to it.
use guardrail_agent::{
    VERSION,
    commands::{generate, off, selftest, suggest_cmd},
    control::{ipc, offline},
    daemon,
    guards::deletion::{approval, replay},
    host::lifecycle,
    host::procinfo,
    policy, sinks, text,
    tiers::probe,
};

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "guardrail", version = VERSION, about = "Stops mass deletions and remote shutdowns before they happen")]
struct Cli {
    /// Admin socket of the agent (default /run/guardrail/guardrail.sock, or $GUARDRAIL_SOCKET).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (systemd runs this).
    Agent(daemon::AgentArgs),
    /// The tier in force, what it cannot see, the policy in force, and open holds. With no
    /// agent running: the jobs the pinned programs hold, and how to free them (exit 3).
    Status {
        #[arg(long)]
        json: bool,
        /// The agent's pin directory, read when no agent answers.
        #[arg(long, default_value = "/sys/fs/bpf/guardrail")]
        pin_dir: PathBuf,
    },
    /// Open holds.
    Holds {
        #[arg(long)]
        json: bool,
    },
    /// Let a held job finish: no budget for the rest of this job (its process group; a new job
    /// is judged afresh). Without ID at a terminal: pick among your own session's holds.
    Approve {
        id: Option<u64>,
        /// Only N more deletions outside its targets, then hold it again.
        #[arg(long, value_name = "N", alias = "budget", conflicts_with = "for_job")]
        more: Option<u64>,
        /// The rest of this job (what a bare approve does; kept for scripts).
        #[arg(long)]
        for_job: bool,
    },
    /// End a held job.
    Deny { id: u64 },
    /// Let this session shut HOST down once, within the policy's confirm_window (name the host
    /// to prove you know where you are).
    Confirm { host: String },
    /// Check the policy, explain a decision.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Read the event log (incidents and agent events).
    Events(sinks::cli::EventsArgs),
    /// Probe the kernel, prove the offsets, report the tier and its gaps, and stop a runaway
    /// deletion in a scratch directory with the tier in force.
    Selftest {
        #[arg(long)]
        json: bool,
        /// Test this tier instead of the probed one (`userspace`: measure the last resort's
        /// blast radius on this host even where BPF works).
        /// `fmodret`: test the fmod_ret tier on a kernel where BPF LSM is active.
        #[arg(long, value_parser = ["auto", "fmodret", "userspace"], default_value = "auto")]
        tier: String,
    },
    /// Emergency off switch, with or without an agent: detach every program pinned in PIN_DIR,
    /// continue the jobs it holds, remove the pins. Stop the service first
    /// (`systemctl stop guardrail`).
    Off {
        /// The agent's pin directory.
        #[arg(long, default_value = "/sys/fs/bpf/guardrail")]
        pin_dir: PathBuf,
        /// Even while an agent answers on the socket.
        #[arg(long)]
        force: bool,
    },
    /// Write the man pages or shell completions (the package build runs this).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: generate::Generate,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print diagnostics like a compiler; exit 1 on errors.
    Check {
        /// Policy file (default /etc/guardrail/policy.toml, or the embedded default).
        file: Option<PathBuf>,
        /// Drop-in directory (default /etc/guardrail/policy.d when checking /etc/guardrail/policy.toml).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print the embedded default policy.
    Default,
    /// Replay recorded job summaries (the agent's JSON event log) through a candidate policy:
    /// which jobs it would have held, blocked or let through.
    Test {
        /// The event log to replay (default /var/log/guardrail/events.jsonl).
        #[arg(long, default_value = "/var/log/guardrail/events.jsonl")]
        events: PathBuf,
        /// The candidate policy (default: the policy in force on this host).
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Learn rules from the event log (`audit2allow` style): a drop-in scoping each service that
    /// was held, or would have been in audit mode, to the directories it deleted in; checked and
    /// replayed. Exit 0: suggested, 1: nothing to suggest, 2: bad input.
    Suggest {
        #[arg(long, default_value = "/var/log/guardrail/events.jsonl")]
        events: PathBuf,
        /// The policy to extend (default: the policy in force on this host).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Write the drop-in to this new file (default: stdout, the report on stderr).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Which rule applies to a deletion of PATH by a job.
    /// With --shutdown: what a shutdown request from a session of that class gets.
    Explain {
        /// The path whose deletion to explain (not with --shutdown).
        #[arg(required_unless_present = "shutdown")]
        path: Option<PathBuf>,
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        unit: Option<String>,
        #[arg(long)]
        exe: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Explain a shutdown request instead of a deletion.
        #[arg(long, requires = "session_class", conflicts_with = "path")]
        shutdown: bool,
        /// remote | local | none | unknown | serial-console
        #[arg(long, value_parser = ["remote", "local", "none", "unknown", "serial-console"])]
        session_class: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Agent(_))
        && let Err(e) = lifecycle::block_signals()
    {
        // Before anything slow and before any thread: a stop signal is never lost (lifecycle.rs).
        eprintln!("guardrail: error: blocking SIGINT, SIGTERM and SIGHUP: {e}");
        return ExitCode::FAILURE;
    }
    if matches!(cli.command, Command::Agent(_)) {
        guardrail_agent::host::memory::limit_arenas();
    }
    if !matches!(cli.command, Command::Agent(_)) {
        // The admin commands behave like other Unix tools in a pipeline (`guardrail holds | head`):
        // a closed pipe ends them quietly instead of a panic on the next print. The daemon keeps
        // Rust's default (EPIPE as an error) for its sockets.
        // SAFETY: setting a signal disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("guardrail: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let socket = ipc::socket_path(cli.socket.as_deref());
    match cli.command {
        Command::Agent(args) => {
            daemon::run(args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, pin_dir } => cli_status(&socket, json, &pin_dir),
        Command::Holds { json } => cli_holds(&socket, json),
        Command::Approve { id, more, .. } => {
            let id = match id {
                Some(id) => id,
                None => match approval_pick(&socket, more)? {
                    Ok(id) => id,
                    Err(code) => return Ok(code),
                },
            };
            // Without --more, say "the rest of the job" outright: an older agent's default was
            // one more budget.
            cli_done(ipc::call(
                &socket,
                &ipc::Request::Approve {
                    id,
                    budget: more,
                    for_job: more.is_none(),
                },
            )?)
        }
        Command::Deny { id } => cli_done(ipc::call(&socket, &ipc::Request::Deny { id })?),
        Command::Confirm { host } => {
            // Our own audit session; the agent checks it against the kernel's view of us.
            let session = std::fs::read_to_string("/proc/self/sessionid")
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .unwrap_or(u32::MAX);
            cli_done(ipc::call(
                &socket,
                &ipc::Request::Confirm { host, session },
            )?)
        }
        Command::Policy { command } => cli_policy(command),
        Command::Selftest { json, tier } => selftest::run(json, probe::Tier::from_name(&tier)),
        Command::Events(args) => sinks::cli::run(args),
        Command::Off { pin_dir, force } => off::run(&pin_dir, &socket, force),
        Command::Generate { what } => {
            generate::run(<Cli as clap::CommandFactory>::command(), what)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn cli_done(resp: ipc::Response) -> Result<ExitCode> {
    match resp {
        ipc::Response::Done { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        ipc::Response::Error { message } => {
            eprintln!("guardrail: {message}");
            Ok(ExitCode::FAILURE)
        }
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
}

fn print_holds(holds: &[ipc::HoldInfo]) {
    if holds.is_empty() {
        println!("open holds: none");
        return;
    }
    println!("open holds: {}", holds.len());
    // Command, user, session and reason are the job's text: each line escaped (a newline or an
    // escape sequence in a command must not redraw the admin's terminal), the command capped.
    for h in holds {
        let head = format!(
            "  {:>4}  {}  pgid {}  user {}  {}  [{}]  held {}s of {}s",
            h.id,
            h.host,
            h.pgid,
            h.user,
            text::cap_command(&h.command),
            h.session,
            h.age_secs,
            h.timeout_secs,
        );
        println!("{}", text::escape_line(&head));
        println!(
            "        {}",
            text::escape_line(&text::cap(&h.reason, text::REASON_MAX))
        );
        if !h.earlier_approvals.is_empty() {
            let again = approval::held_again(h.total_count, &h.earlier_approvals);
            println!("        {}", text::escape_line(&again.unwrap_or_default()));
        }
        println!(
            "        finish: guardrail approve {}   only N more: guardrail approve {} --more N   end: guardrail deny {}",
            h.id, h.id, h.id
        );
    }
}

/// `guardrail approve` with no id: the caller's own session's holds, listed, and the one to
/// approve typed at the terminal, molly-guard style (its id, or the host name when there is one).
/// Ok(Err(code)): nothing to approve, exit with `code`.
fn approval_pick(socket: &std::path::Path, more: Option<u64>) -> Result<Result<u64, ExitCode>> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "guardrail: approve needs an incident id when it is not run at a terminal: `guardrail approve ID` (open holds: `guardrail holds`); nothing approved"
        );
        return Ok(Err(ExitCode::from(2)));
    }
    let (holds, note) = match ipc::call(socket, &ipc::Request::SessionHolds)? {
        ipc::Response::Holds { holds, filtered } => (holds, filtered),
        ipc::Response::Error { message } if message.contains("unknown variant") => {
            anyhow::bail!(
                "this agent is older than this CLI and cannot list your session's holds: name one, `guardrail approve ID`"
            )
        }
        other => return cli_done(other).map(Err),
    };
    let host = holds
        .first()
        .map(|h| h.host.clone())
        .unwrap_or_else(procinfo::hostname);
    if holds.is_empty() {
        println!(
            "no open hold of your session on {}{}",
            text::escape_line(&host),
            note.map(|n| format!(" ({n})")).unwrap_or_default()
        );
        println!("all open holds: guardrail holds");
        return Ok(Err(ExitCode::FAILURE));
    }
    print_holds(&holds);
    let grant = match more {
        Some(n) => format!("for {n} more deletions"),
        None => "for the rest of its job".to_string(),
    };
    let host_shown = text::escape_line(&host);
    if holds.len() == 1 {
        print!(
            "Approve hold {} on {host_shown} {grant}? Type its id or the host name ({host_shown}) to approve, anything else cancels: ",
            holds[0].id
        );
    } else {
        print!("Approve which hold on {host_shown} {grant}? Type its id, anything else cancels: ");
    }
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    let answer = answer.trim();
    let picked = holds
        .iter()
        .find(|h| h.id.to_string() == answer)
        .or_else(|| (holds.len() == 1 && answer == host).then(|| &holds[0]));
    match picked {
        Some(h) => Ok(Ok(h.id)),
        None => {
            println!("nothing approved");
            Ok(Err(ExitCode::FAILURE))
        }
    }
}

fn cli_status(socket: &std::path::Path, json: bool, pin_dir: &std::path::Path) -> Result<ExitCode> {
    // No agent answers: what the pinned state still holds, read straight from bpffs.
    let resp = match ipc::call(socket, &ipc::Request::Status) {
        Ok(r) => r,
        Err(e) => return offline::status(socket, pin_dir, json, &e),
    };
    match resp {
        ipc::Response::Status(s) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("host:    {}", s.host);
                println!("version: {}", s.version);
                println!("tier:    {} ({})", s.tier, s.why);
                for g in &s.gaps {
                    println!("  cannot: {g}");
                }
                println!("mode:    {}", s.mode);
                println!(
                    "policy:  {} (in force: {})",
                    s.policy_source, s.policy_in_force
                );
                if s.policy_on_disk_differs {
                    println!("WARNING: the policy on disk is not the one in force");
                }
                if let Some(why) = &s.policy_fallback {
                    println!("WARNING: not the configured policy: {why}");
                }
                if let Some(e) = &s.last_reload_error {
                    println!("last reload rejected:\n{e}");
                }
                println!("attached: {}", s.attached.join(", "));
                if !s.shutdown_inhibitor.is_empty() {
                    println!("logind shutdown inhibitor: {}", s.shutdown_inhibitor);
                }
                if !s.job_messages.is_empty() {
                    println!("messages to jobs: {}", s.job_messages);
                }
                if s.sessions.is_empty() {
                    println!("sessions: none classified yet");
                } else {
                    println!("sessions:");
                    for x in &s.sessions {
                        // The origin names an address from the session's environment.
                        println!(
                            "  {:>6}  {:<7} {}",
                            x.id,
                            x.class,
                            text::cap(&x.origin, 256)
                        );
                    }
                }
                if !s.caller_check.is_empty() {
                    println!("caller check: {}", s.caller_check);
                }
                print_holds(&s.holds);
                if let Some(note) = &s.filtered {
                    println!("note: {note}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        other => cli_done(other),
    }
}

fn cli_holds(socket: &std::path::Path, json: bool) -> Result<ExitCode> {
    match ipc::call(socket, &ipc::Request::Holds)? {
        ipc::Response::Holds { holds, filtered } => {
            if json {
                println!("{}", serde_json::to_string_pretty(&holds)?);
            } else {
                print_holds(&holds);
            }
            // On stderr with --json, so the JSON stays a plain list of holds.
            if let Some(note) = filtered {
                if json {
                    eprintln!("note: {note}");
                } else {
                    println!("note: {note}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        other => cli_done(other),
    }
}

fn cli_policy(cmd: PolicyCommand) -> Result<ExitCode> {
    use guardrail_policy as gp;
    match cmd {
        PolicyCommand::Default => {
            print!("{}", gp::DEFAULT_POLICY);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check { file, dir, json } => {
            let source = policy::PolicySource::from_args(file.as_deref(), dir.as_deref());
            let resolver = gp::SystemResolver;
            let checked = match &source {
                policy::PolicySource::Embedded => {
                    gp::check_str("(embedded default)", gp::DEFAULT_POLICY, &resolver)
                }
                policy::PolicySource::File { main, dropins } => {
                    gp::check_files(main, dropins.as_deref(), &resolver)
                }
            };
            let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
            let warnings = checked.diagnostics.len() - errors;
            if json {
                println!("{}", serde_json::to_string_pretty(&checked.diagnostics)?);
            } else {
                for d in &checked.diagnostics {
                    eprintln!("{d}\n");
                }
                eprintln!(
                    "{}: {errors} error(s), {warnings} warning(s)",
                    source.describe()
                );
            }
            Ok(if errors > 0 || checked.policy.is_none() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        PolicyCommand::Test {
            events,
            policy,
            json,
        } => {
            let source = policy::PolicySource::from_args(policy.as_deref(), None);
            let loaded = source
                .load()
                .map_err(|r| anyhow::anyhow!("the candidate policy has errors:\n{r}"))?;
            replay::run(&events, &loaded, json)
        }
        PolicyCommand::Suggest {
            events,
            policy,
            out,
        } => suggest_cmd::run(&events, policy.as_deref(), out.as_deref()),
        PolicyCommand::Explain {
            path,
            policy,
            unit,
            exe,
            user,
            shutdown,
            session_class,
            json,
        } => {
            let source = policy::PolicySource::from_args(policy.as_deref(), None);
            let loaded = source
                .load()
                .map_err(|r| anyhow::anyhow!("the policy has errors:\n{r}"))?;
            if shutdown {
                let class = match session_class.as_deref() {
                    Some("remote") => gp::SessionClass::Remote,
                    Some("local") => gp::SessionClass::Local,
                    Some("none") => gp::SessionClass::None,
                    Some("serial-console") => gp::SessionClass::SerialConsole,
                    _ => gp::SessionClass::Unknown,
                };
                let d =
                    gp::explain_shutdown(&loaded.policy, class, unit.as_deref(), exe.as_deref());
                if json {
                    println!("{}", serde_json::to_string_pretty(&d)?);
                } else {
                    println!("{d}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let path = path.context("a path to explain")?;
            let job = gp::JobSpec {
                unit,
                exe,
                user,
                cgroup: None,
            };
            let abs = std::path::absolute(&path)
                .with_context(|| format!("resolving {}", path.display()))?;
            let ex = gp::explain(&loaded.compiled, &abs, &job, &gp::SystemResolver);
            if json {
                println!("{}", serde_json::to_string_pretty(&ex)?);
            } else {
                println!("{ex}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
