//! `tcpscope`: the agent's command line. `cli.rs` declares it, `agent.rs` runs the agent
//! (`tcpscope run`), `output.rs` prints what the other commands read (`stats`, `flows`,
//! `replay`), `events.rs` follows the state changes (`events`).

mod agent;
mod cli;
mod events;
mod output;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser};

use crate::{agent::*, cli::*, events::*, output::*};

/// The man page of `tcpscope` (`tcpscope.1`), or of one of its commands (`tcpscope-run.1`).
fn man_page(command: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let top = Cli::command();
    let page = match command {
        None => top,
        Some(name) => {
            let names: Vec<String> = top
                .get_subcommands()
                .map(|c| c.get_name().to_owned())
                .collect();
            let Some(sub) = top.find_subcommand(name) else {
                anyhow::bail!("no command {name:?}; the commands are {}", names.join(", "));
            };
            // The page's title and synopsis name the full command, as git's pages do.
            let full = format!("tcpscope-{name}");
            sub.clone()
                .name(full.clone())
                .bin_name(format!("tcpscope {name}"))
                .display_name(full)
                .version(tcp_user::selfstats::VERSION)
        }
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    Ok(out)
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not an error.
fn print_all(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loader_level = if cli.log_level == log::LevelFilter::Trace {
        log::LevelFilter::Trace
    } else {
        cli.log_level.min(log::LevelFilter::Info)
    };
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        // aya's loader narrates every relocation at debug: keep that for trace.
        .filter_module("aya", loader_level)
        .filter_module("aya_obj", loader_level)
        .parse_env("RUST_LOG")
        .format_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Replay(args) => replay(&args),
            Command::Flows(args) => list_flows(&args),
            Command::Stats(args) => stats(&args),
            Command::Completions { shell } => {
                let mut text = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "tcpscope", &mut text);
                print_all(&text)
            }
            Command::Man { command } => print_all(&man_page(command.as_deref())?),
            Command::Events(args) => events(&args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
