//! `cargo xtask`: developer tasks for tcpscope.
//!
//! Everything a fresh machine needs (toolchains, bpf-linker, Debian packages, bpffs) is set up
//! here, idempotently, the first time a task needs it.

mod bench;
mod build;
mod cmd;
mod dist;
mod host;
mod kernels;
mod run;
mod test;
mod toolchain;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "tcpscope developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Set up the toolchains and build the eBPF object and the agent.
    Build(build::Options),
    /// Build everything and run `tcpscope run` as root; arguments after `--` go to it.
    Run(run::Options),
    /// Run every test tier: unit, eBPF test_run, root integration tests in network namespaces,
    /// and the kernel-facing tests in guests of every pinned Debian kernel, 6.1 and 6.12
    /// (`--no-vm` skips that tier). TCPSCOPE_ALLOW_SKIP=pcaps,cpus lets tests skip when the
    /// captures or a second CPU are missing (otherwise the run fails).
    Test(test::Options),
    /// Boot a pinned Debian kernel (6.1 by default, or 6.12) under QEMU and run the
    /// kernel-facing tests inside it; arguments after `--` filter the tests.
    Vm(vm::Options),
    /// Set up the pinned nightly and bpf-linker only (done implicitly by the other tasks).
    Setup,
    /// Build the release archives: a static (musl) tcpscope with the eBPF object embedded,
    /// man pages, completions, README, licences and deploy files, in
    /// target/dist/tcpscope-VERSION-TARGET.tar.gz, plus target/dist/SHA256SUMS.
    Dist(dist::Options),
    /// Run the benchmarks (root): per-packet cost, veth throughput against conntrack, scrape
    /// cost, memory, agent CPU; writes target/bench/report.{md,json}.
    Bench(bench::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Build(opts) => build::build(&opts).map(|_| ()),
        Task::Run(opts) => run::run(&opts),
        Task::Test(opts) => test::test(&opts),
        Task::Vm(opts) => vm::vm(&opts),
        Task::Setup => toolchain::ensure_ebpf_toolchain().map(|_| ()),
        Task::Dist(opts) => dist::dist(&opts).map(|_| ()),
        Task::Bench(opts) => bench::bench(&opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
