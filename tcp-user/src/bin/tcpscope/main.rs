//! `tcpscope`: the agent's command line. `cli.rs` declares it, `agent.rs` runs the agent
//! (`tcpscope run`), `output.rs` prints what the other commands read (`stats`, `flows`,
//! `replay`), `events.rs` follows the state changes (`events`).

mod agent;
mod cli;
mod events;
mod output;

use std::process::ExitCode;

use clap::Parser;

use crate::{agent::*, cli::*, events::*, output::*};

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
