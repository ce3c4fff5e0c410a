//! `guardrail generate man DIR` and `guardrail generate completions SHELL DIR` (hidden): the
//! package build writes the man pages and shell completions from the very clap definition the
//! binary parses, so they cannot drift from the CLI. Hidden because admins never need it.
use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use clap_complete::Shell;

/// Appended (as roff) to the top-level man page only: `--help` stays short.
const FILES_ROFF: &str = r#".SH FILES
.TP
\fI/etc/guardrail/policy.toml\fR
The policy. \fBguardrail policy default\fR prints the documented default.
.TP
\fI/etc/guardrail/policy.d/*.toml\fR
Drop-ins, read after policy.toml in file name order.
.TP
\fI/run/guardrail/guardrail.sock\fR
The agent's admin socket.
.TP
\fI/var/log/guardrail/events.jsonl\fR
Every event as one JSON object per line, rotated by logrotate.
.SH SYSTEMD
The agent runs as \fBguardrail.service\fR. \fBsystemctl reload guardrail\fR re-reads the
policy (SIGHUP) and reopens the event log; \fBsystemctl stop guardrail\fR detaches every
program.
"#;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Generate {
    /// One roff man page per command (guardrail.1, guardrail-approve.1, ...) into DIR.
    Man { dir: PathBuf },
    /// The completion script for SHELL into DIR.
    Completions { shell: Shell, dir: PathBuf },
}

pub fn run(cmd: clap::Command, what: Generate) -> Result<()> {
    match what {
        Generate::Man { dir } => {
            create(&dir)?;
            let name = cmd.get_name().to_string();
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            let top = dir.join(format!("{name}.1"));
            let mut page = std::fs::OpenOptions::new()
                .append(true)
                .open(&top)
                .with_context(|| format!("opening {}", top.display()))?;
            page.write_all(FILES_ROFF.as_bytes())
                .with_context(|| format!("writing {}", top.display()))?;
        }
        Generate::Completions { shell, dir } => {
            create(&dir)?;
            let mut cmd = cmd;
            let name = cmd.get_name().to_string();
            clap_complete::generate_to(shell, &mut cmd, name, &dir)
                .with_context(|| format!("writing {shell} completions into {}", dir.display()))?;
        }
    }
    Ok(())
}

fn create(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}
