//! `cargo xtask bench`: tcpscope's benchmarks, run as root, bounded in time, written to
//! `target/bench/report.md` and `target/bench/report.json`.
//!
//! 1. per-packet cost of the real XDP and TC programs per packet class (BPF_PROG_TEST_RUN);
//! 2. receive-path cost on a veth pair under live traffic: no XDP, XDP_PASS, the agent,
//!    netfilter conntrack (iptables and nft rules), at 1,024 and 65,536 flows;
//! 3. wall time of `GET /metrics` against the running agent with 0, 100k and 1M flows;
//! 4. kernel memory per tracked flow, from the agent's map fdinfo;
//! 5. the agent's own CPU time, idle and while 64k flows churn.
//!
//! Settings come from the environment (`cargo bench` passes its own `--bench` argument):
//! `TCPSCOPE_BENCH_RUNS` (runs per figure, default 3), `TCPSCOPE_BENCH_QUICK=1` (a short smoke
//! run with smaller counts and durations), `TCPSCOPE_BENCH_ONLY` (comma-separated items:
//! packet, veth, scrape, memory, cpu), `TCPSCOPE_BENCH_OUT` (report directory),
//! `TCPSCOPE_AGENT` (agent binary), `TCPSCOPE_BENCH_OBJ` (benchmark eBPF object).

#[path = "tcpscope/cpu.rs"]
mod cpu;
#[path = "tcpscope/memory.rs"]
mod memory;
#[path = "tcpscope/packet.rs"]
mod packet;
#[path = "tcpscope/progs.rs"]
mod progs;
#[path = "tcpscope/report.rs"]
mod report;
#[path = "tcpscope/scrape.rs"]
mod scrape;
#[path = "tcpscope/veth.rs"]
mod veth;

use std::{
    cell::Cell,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use tcp_testbed::Testbed;

use crate::report::{Machine, Section};

/// Items, in the order they run.
const ITEMS: [&str; 5] = ["packet", "veth", "scrape", "memory", "cpu"];

/// What to run and for how long.
pub struct Config {
    /// Runs per figure.
    pub runs: usize,
    /// Short smoke run: smaller counts and durations.
    pub quick: bool,
    only: Vec<String>,
    started: Instant,
    cap: Duration,
    /// Set once a run was skipped for lack of time.
    capped: Cell<bool>,
}

impl Config {
    fn from_env() -> Result<Self> {
        let runs = match std::env::var("TCPSCOPE_BENCH_RUNS") {
            Ok(v) => v.parse().context("TCPSCOPE_BENCH_RUNS is a number")?,
            Err(_) => 3,
        };
        if runs == 0 {
            bail!("TCPSCOPE_BENCH_RUNS must be at least 1");
        }
        let quick = std::env::var("TCPSCOPE_BENCH_QUICK").is_ok_and(|v| v == "1");
        let only: Vec<String> = std::env::var("TCPSCOPE_BENCH_ONLY")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(bad) = only.iter().find(|i| !ITEMS.contains(&i.as_str())) {
            bail!("unknown item {bad:?} in TCPSCOPE_BENCH_ONLY; items: {ITEMS:?}");
        }
        Ok(Self {
            runs,
            quick,
            only,
            started: Instant::now(),
            // New runs start only within this time; a run in progress is itself bounded.
            cap: Duration::from_secs(if quick { 150 } else { 330 }),
            capped: Cell::new(false),
        })
    }

    /// Whether `item` is to run.
    fn wants(&self, item: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|i| i == item)
    }

    /// Whether another run may start (the benchmark as a whole is bounded in time).
    pub fn time_left(&self) -> bool {
        let left = self.started.elapsed() < self.cap;
        if !left {
            self.capped.set(true);
        }
        left
    }

    /// `full` normally, `quick` in a smoke run.
    pub const fn pick<T: Copy>(&self, full: T, quick: T) -> T {
        if self.quick { quick } else { full }
    }

    fn describe(&self) -> String {
        let mut s = format!("{} runs", self.runs);
        if self.quick {
            s.push_str(", quick (smoke run: small counts, short cases)");
        }
        if !self.only.is_empty() {
            s.push_str(&format!(", only {}", self.only.join(",")));
        }
        if self.capped.get() {
            s.push_str(&format!(
                "; **time cap of {} s reached: runs were skipped (see each figure's count)**",
                self.cap.as_secs()
            ));
        }
        s
    }
}

/// Where the reports go: `TCPSCOPE_BENCH_OUT`, else `target/bench` of the workspace.
fn out_dir() -> PathBuf {
    std::env::var_os("TCPSCOPE_BENCH_OUT").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        PathBuf::from,
    )
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the items; `Ok(false)` when some failed (their sections say why).
fn run() -> Result<bool> {
    if !tcp_testbed::is_root() {
        bail!("the benchmarks need root: run them through `cargo xtask bench`");
    }
    let cfg = Config::from_env()?;
    tcp_testbed::remove_stale();
    let machine = Machine::now();
    let mut sections = Vec::new();
    let mut all_ok = true;
    let mut record = |key: &'static str, title: &str, result: Result<Section>| match result {
        Ok(s) => sections.push(s),
        Err(e) => {
            eprintln!("bench: {key} failed: {e:#}");
            all_ok = false;
            sections.push(Section::failed(key, title, &e));
        }
    };
    if cfg.wants("packet") {
        record(packet::KEY, packet::TITLE, packet::run(&cfg));
    }
    // The other items share one test bed; without it they all fail, each saying why.
    let bed_items = [
        (veth::KEY, veth::TITLE, "veth"),
        (scrape::KEY, scrape::TITLE, "scrape"),
        (memory::KEY, memory::TITLE, "memory"),
        (cpu::KEY, cpu::TITLE, "cpu"),
    ];
    if bed_items.iter().any(|(_, _, i)| cfg.wants(i)) {
        match Testbed::new() {
            Ok(bed) => {
                if cfg.wants("veth") {
                    record(veth::KEY, veth::TITLE, veth::run(&cfg, &bed));
                }
                if cfg.wants("scrape") {
                    record(scrape::KEY, scrape::TITLE, scrape::run(&cfg, &bed));
                }
                if cfg.wants("memory") {
                    record(memory::KEY, memory::TITLE, memory::run(&bed));
                }
                if cfg.wants("cpu") {
                    record(cpu::KEY, cpu::TITLE, cpu::run(&cfg, &bed));
                }
            }
            Err(e) => {
                for (key, title, item) in bed_items {
                    if cfg.wants(item) {
                        record(
                            key,
                            title,
                            Err(anyhow!("setting up the veth test bed: {e:#}")),
                        );
                    }
                }
            }
        }
    }
    let dir = out_dir();
    report::write(
        &dir,
        &machine,
        &cfg.describe(),
        cfg.started.elapsed().as_secs_f64(),
        &sections,
    )?;
    let dir = dir.canonicalize().unwrap_or(dir);
    eprintln!(
        "bench: report written to {} (and report.json) in {:.0} s",
        dir.join("report.md").display(),
        cfg.started.elapsed().as_secs_f64()
    );
    Ok(all_ok)
}
