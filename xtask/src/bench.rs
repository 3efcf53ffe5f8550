//! `cargo xtask bench`: the benchmarks (tcp-user/benches/tcpscope.rs), as root.
//!
//! Sets up what they need (Debian packages for the conntrack comparison, bpffs), builds both
//! eBPF objects and the release agent, then runs the harness, which writes
//! `target/bench/report.md` and `target/bench/report.json`.

use anyhow::{Result, bail};
use clap::Args;

use crate::{build, cmd, host, toolchain};

/// Benchmark items, in the order they run.
const ITEMS: [&str; 5] = ["packet", "veth", "scrape", "memory", "cpu"];

/// Options of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct Options {
    /// Short smoke run (small counts, short cases): checks the harness, not the figures.
    #[arg(long)]
    pub quick: bool,
    /// Runs per figure (each figure is the median over them).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Only these items (repeatable): packet, veth, scrape, memory, cpu.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(ITEMS))]
    pub only: Vec<String>,
}

/// Builds everything and runs the benchmarks.
pub fn bench(opts: &Options) -> Result<()> {
    if !host::is_root() {
        bail!(
            "the benchmarks attach programs, create network namespaces and change netfilter \
             rules: run `cargo xtask bench` as root"
        );
    }
    host::ensure_packages(host::Task::Bench)?;
    host::ensure_bpffs()?;
    let object = build::build_ebpf()?;
    let bench_object = object.with_file_name("tcpscope-bench");
    let agent = build::build(&build::Options { release: true })?;
    let out = cmd::workspace_root().join("target/bench");
    let mut c = toolchain::cargo_stable()?;
    c.args(["bench", "--package", "tcp-user", "--bench", "tcpscope"])
        .env("TCPSCOPE_EBPF_OBJ", &object)
        .env("TCPSCOPE_BENCH_OBJ", &bench_object)
        .env(host::AGENT, &agent)
        .env("TCPSCOPE_BENCH_OUT", &out)
        .env("TCPSCOPE_BENCH_RUNS", opts.runs.to_string())
        .env("TCPSCOPE_BENCH_ONLY", opts.only.join(","));
    if opts.quick {
        c.env("TCPSCOPE_BENCH_QUICK", "1");
    }
    cmd::run(&mut c)?;
    eprintln!(
        "xtask: benchmark report: {} and {}",
        out.join("report.md").display(),
        out.join("report.json").display()
    );
    Ok(())
}
