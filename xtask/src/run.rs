//! `cargo xtask run`: build, then run `tcpscope run` with root privileges.

use std::process::Command;

use anyhow::Result;
use clap::Args;

use crate::{build, cmd, host};

/// Options of `cargo xtask run`.
#[derive(Debug, Args)]
pub struct Options {
    /// Build the agent with the release profile.
    #[arg(long)]
    pub release: bool,
    /// Arguments for `tcpscope run` (after `--`), e.g. `-- --iface eth0 --xdp-mode skb`.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// Builds everything and runs the agent until it exits.
pub fn run(opts: &Options) -> Result<()> {
    let bin = build::build(&build::Options {
        release: opts.release,
    })?;
    if !opts
        .args
        .iter()
        .any(|a| a == "-i" || a.starts_with("--iface"))
    {
        eprintln!(
            "xtask: no --iface given: tcpscope attaches to the interface of the default route"
        );
    }
    let mut c = if host::is_root() {
        Command::new(&bin)
    } else {
        eprintln!("xtask: not root: running tcpscope through sudo");
        let mut c = Command::new("sudo");
        c.arg("--").arg(&bin);
        c
    };
    c.arg("run").args(&opts.args);
    cmd::run(&mut c)
}
