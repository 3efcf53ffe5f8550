//! The agent's own CPU time (user + system, all threads), idle and while 64k flows churn, and
//! idle with 1M slots per table, empty and with a few records.
//!
//! Churn: the generator sends SYNs over 65,536 source ports at a bounded rate, so that every
//! port comes back every few seconds, after its half-open record has expired
//! (`--half-open-secs`): records are created (in the XDP program, on the generator's CPU) and
//! expired (by the agent's reaper, whose in-kernel walk runs in the agent's own syscall and so
//! counts as the agent's system time) at the same steady rate. Spoofed-SYN-like traffic is the
//! one kind of churn a live-frames generator can drive at a fixed rate, and it exercises what
//! the agent spends CPU on: the reaper's walks and deletions, and the SYN-flood rule (which
//! flags the port and says so once).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use serde_json::json;
use tcp_common::{
    counters::{Counter, Hook},
    metrics::table,
    parse::tcp_flags::SYN,
};
use tcp_testbed::{Testbed, clock_ticks_per_sec, cpu_ns, cpu_ticks};

use crate::{
    Config,
    progs::BenchPrograms,
    report::{Runs, Section, Table, Target, met},
    veth::{FIRST_PORT, template},
};

/// Key in report.json.
pub const KEY: &str = "agent_cpu";
/// Heading.
pub const TITLE: &str = "5. Agent CPU";

/// Distinct flows (source ports) of the churn.
const FLOWS: u32 = 65_536;
/// SYNs per second: each port comes back every FLOWS / RATE = 4 s.
const RATE: f64 = 16_384.0;
/// Half-open timeout given to the agent: a record expires 2–3 s after its SYN (the reaper
/// runs once a second), before its port comes back.
const HALF_OPEN_SECS: &str = "2";
/// Smallest burst the generator sends (it catches up in larger ones after a slow call).
const MIN_BURST: u64 = 64;
/// Slots per table of the large idle agent.
const LARGE: u32 = 1 << 20;
/// Records (half-open, from as many SYNs) of its sparse case: below the agent's sparse
/// threshold (one record per 16 slots, at most 8192 listed keys), so its keys are listed.
const SPARSE: u32 = 4096;
/// Target for an idle agent with 1M slots per table, % of one CPU.
const IDLE_LARGE_LIMIT: f64 = 0.5;

/// The agent's CPU counters, the SYNs its XDP program saw and its half-open table's tallies
/// at one instant.
struct Usage {
    at: Instant,
    ticks: u64,
    ns: u64,
    syns: u64,
    created: u64,
    removed: u64,
}

impl Usage {
    fn now(pid: u32, pin_dir: &Path) -> Result<Self> {
        let (totals, metrics) = tcp_user::counters::read_pinned(pin_dir)
            .map_err(|e| anyhow::anyhow!("reading the agent's metrics: {e}"))?;
        Ok(Self {
            at: Instant::now(),
            ticks: cpu_ticks(pid)?,
            ns: cpu_ns(pid)?,
            syns: totals.hook(Hook::XdpIngress).get(Counter::Syn),
            created: metrics.inserts[table::HALF_OPEN],
            removed: metrics.removes[table::HALF_OPEN],
        })
    }
}

/// Figures over one interval.
struct Interval {
    /// utime + stime, % of one CPU.
    pct: f64,
    /// The same from the threads' schedstat (ns resolution).
    precise_pct: f64,
    /// SYNs seen per second, and half-open records created and removed per second.
    syns: f64,
    created: f64,
    removed: f64,
}

impl Interval {
    fn between(a: &Usage, b: &Usage) -> Self {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        Self {
            pct: (b.ticks - a.ticks) as f64 / clock_ticks_per_sec() / secs * 100.0,
            precise_pct: (b.ns.saturating_sub(a.ns)) as f64 / 1e9 / secs * 100.0,
            syns: (b.syns - a.syns) as f64 / secs,
            created: (b.created - a.created) as f64 / secs,
            removed: (b.removed - a.removed) as f64 / secs,
        }
    }
}

/// Measures item 5.
pub fn run(cfg: &Config, bed: &Testbed) -> Result<Section> {
    let interval = Duration::from_secs_f64(cfg.pick(5.0, 1.0));
    // One full cycle of the ports: every flow created once, expiry in its steady state.
    let warmup = Duration::from_secs_f64(cfg.pick(f64::from(FLOWS) / RATE, 1.0));
    // Until the last records have expired.
    let cooldown = Duration::from_secs_f64(cfg.pick(4.0, 1.0));
    let mut agent = bed.start_agent(&["--listen", "off", "--half-open-secs", HALF_OPEN_SECS])?;
    let (pid, pin_dir) = (agent.pid(), agent.pin_dir.clone());
    let mut traffic = BenchPrograms::load()?;
    traffic.configure_generator(FLOWS, FIRST_PORT)?;
    let syn = template(SYN);
    let mut idle = [Runs::default(), Runs::default()];
    let mut churn = [Runs::default(), Runs::default()];
    // SYNs seen, records created, records expired (per second).
    let mut idle_rates = [Runs::default(), Runs::default(), Runs::default()];
    let mut rates = [Runs::default(), Runs::default(), Runs::default()];
    let mut runs_done = 0;
    for run in 0..cfg.runs {
        if !cfg.time_left() {
            break;
        }
        eprintln!("bench: agent CPU run {}/{}", run + 1, cfg.runs);
        let a = Usage::now(pid, &pin_dir)?;
        std::thread::sleep(interval);
        let i = Interval::between(&a, &Usage::now(pid, &pin_dir)?);
        idle[0].push(i.pct);
        idle[1].push(i.precise_pct);
        idle_rates[0].push(i.syns);
        idle_rates[1].push(i.created);
        idle_rates[2].push(i.removed);

        let (a, b) = traffic.with_generator(bed, &syn, |g| {
            let started = Instant::now();
            let mut sent = 0u64;
            let mut first = None;
            loop {
                let t = started.elapsed();
                if first.is_none() && t >= warmup {
                    first = Some(Usage::now(pid, &pin_dir)?);
                }
                if t >= warmup + interval {
                    break;
                }
                let due = ((RATE * t.as_secs_f64()) as u64).saturating_sub(sent);
                if due >= MIN_BURST {
                    g.send(u32::try_from(due)?)?;
                    sent += due;
                } else {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            Ok((
                first.context("no sample after the warm-up")?,
                Usage::now(pid, &pin_dir)?,
            ))
        })?;
        let c = Interval::between(&a, &b);
        churn[0].push(c.pct);
        churn[1].push(c.precise_pct);
        rates[0].push(c.syns);
        rates[1].push(c.created);
        rates[2].push(c.removed);
        std::thread::sleep(cooldown);
        runs_done += 1;
    }
    ensure!(runs_done > 0, "no run finished within the time cap");
    // A smoke run's warm-up is too short for expiry to reach its steady rate.
    let churned = rates[1].median() > RATE / 2.0 && (cfg.quick || rates[2].median() > RATE / 2.0);
    ensure!(
        churned,
        "no churn: per second {:.0} SYNs seen, {:.0} records created, {:.0} expired; agent \
         log:\n{}",
        rates[0].median(),
        rates[1].median(),
        rates[2].median(),
        agent.log().join("\n")
    );
    agent.try_stop()?;
    let (large_empty, large_sparse) = idle_large(cfg, bed, interval)?;
    let mut t = Table::new(&[
        "case",
        "CPU % of one CPU (utime+stime)",
        "runs",
        "schedstat %",
        "SYNs seen/s",
        "records created/s",
        "records expired/s",
        "target",
        "met?",
    ]);
    for (case, cpu, seen) in [
        ("idle".to_owned(), &idle, &idle_rates),
        (format!("{FLOWS} flows churning"), &churn, &rates),
    ] {
        t.row(vec![
            case,
            cpu[0].cell(2),
            cpu[0].range(2),
            cpu[1].cell(3),
            seen[0].cell(0),
            seen[1].cell(0),
            seen[2].cell(0),
            "none set".to_owned(),
            met(None),
        ]);
    }
    let large = format!("{}M", LARGE >> 20);
    for (case, cpu, target) in [
        (
            format!("idle, {large} slots per table, empty"),
            &large_empty,
            format!("≤ {IDLE_LARGE_LIMIT}%"),
        ),
        (
            format!("idle, {large} slots per table, {SPARSE} half-open records"),
            &large_sparse,
            format!("≤ {IDLE_LARGE_LIMIT}%"),
        ),
    ] {
        let ok = Some(cpu[0].median() <= IDLE_LARGE_LIMIT);
        t.row(vec![
            case,
            cpu[0].cell(2),
            cpu[0].range(2),
            cpu[1].cell(3),
            "–".to_owned(),
            "–".to_owned(),
            "–".to_owned(),
            target,
            met(ok),
        ]);
    }
    Ok(Section {
        key: KEY,
        title: TITLE.to_owned(),
        intro: vec![
            format!(
                "The release agent (`--listen off --half-open-secs {HALF_OPEN_SECS}`, default \
             capacities); utime+stime of all its threads from /proc/<pid>/stat over {:.0} s \
             intervals (10 ms ticks; the schedstat column is the same time at ns resolution). \
             Churn: the live-frames generator sends SYNs over {FLOWS} source ports at \
             {RATE:.0}/s, so each flow comes back every {:.0} s, after its half-open record \
             expired (2–3 s after its SYN): records are created in the XDP program (on the \
             generator's CPU, not the agent's) and expired by the agent's reaper, whose \
             in-kernel walk and deletions are the agent's system time; the SYN-flood rule \
             flags the port. Measured after one full cycle of warm-up. **Target:** none set.",
                interval.as_secs_f64(),
                f64::from(FLOWS) / RATE
            ),
            format!(
                "Idle with {large} slots per table (`--flows-capacity`, `--flows6-capacity`, \
             `--half-open-capacity` {LARGE}): a walk visits every bucket of a table, so the \
             agent leaves out a table that held nothing at its last walk and had nothing \
             inserted since, and lists the keys of a sparse one (`BPF_MAP_LOOKUP_BATCH`) for \
             both programs to visit by lookup (the sparse case: {SPARSE} SYNs leave as many \
             half-open records, kept by `--half-open-secs 3600`). **Target:** ≤ \
             {IDLE_LARGE_LIMIT}% of a CPU, empty and sparse (`idle_cpu_1m_slots`: the larger \
             of the two medians)."
            ),
        ],
        tables: vec![t],
        notes: Vec::new(),
        json: json!({
            "runs": runs_done,
            "interval_s": interval.as_secs_f64(),
            "idle_pct": idle[0].json(),
            "idle_schedstat_pct": idle[1].json(),
            "churn_pct": churn[0].json(),
            "churn_schedstat_pct": churn[1].json(),
            "churn_syns_seen_per_s": rates[0].json(),
            "churn_created_per_s": rates[1].json(),
            "churn_expired_per_s": rates[2].json(),
            "churn_flows": FLOWS,
            "churn_syn_per_s": RATE,
            "idle_large_slots_per_table": LARGE,
            "idle_large_empty_pct": large_empty[0].json(),
            "idle_large_empty_schedstat_pct": large_empty[1].json(),
            "idle_large_sparse_records": SPARSE,
            "idle_large_sparse_pct": large_sparse[0].json(),
            "idle_large_sparse_schedstat_pct": large_sparse[1].json(),
        }),
        targets: vec![Target::at_most(
            "idle_cpu_1m_slots",
            large_empty[0].median().max(large_sparse[0].median()),
            IDLE_LARGE_LIMIT,
            "% of a CPU",
        )],
    })
}

/// An idle agent with [`LARGE`] slots per table: its CPU with the tables empty, then with
/// [`SPARSE`] half-open records (utime+stime and schedstat, % of one CPU, per run).
fn idle_large(cfg: &Config, bed: &Testbed, interval: Duration) -> Result<([Runs; 2], [Runs; 2])> {
    let slots = LARGE.to_string();
    let mut agent = bed.start_agent(&[
        "--listen",
        "off",
        "--flows-capacity",
        &slots,
        "--flows6-capacity",
        &slots,
        "--half-open-capacity",
        &slots,
        "--half-open-secs",
        "3600",
    ])?;
    let (pid, pin_dir) = (agent.pid(), agent.pin_dir.clone());
    // The first walks visit every table whatever it holds.
    std::thread::sleep(Duration::from_secs(3));
    let measure = |runs: &mut [Runs; 2]| -> Result<()> {
        for _ in 0..cfg.runs {
            let a = Usage::now(pid, &pin_dir)?;
            std::thread::sleep(interval);
            let i = Interval::between(&a, &Usage::now(pid, &pin_dir)?);
            runs[0].push(i.pct);
            runs[1].push(i.precise_pct);
        }
        Ok(())
    };
    let mut empty = [Runs::default(), Runs::default()];
    measure(&mut empty)?;
    let mut traffic = BenchPrograms::load()?;
    traffic.configure_generator(SPARSE, FIRST_PORT)?;
    let syn = template(SYN);
    traffic.with_generator(bed, &syn, |g| g.send(SPARSE).map(|_| ()))?;
    std::thread::sleep(Duration::from_secs(2));
    let (_, metrics) = tcp_user::counters::read_pinned(&pin_dir)
        .map_err(|e| anyhow::anyhow!("reading the agent's metrics: {e}"))?;
    let held = metrics.held(table::HALF_OPEN);
    ensure!(
        held == i64::from(SPARSE),
        "{held} half-open records after {SPARSE} SYNs; agent log:\n{}",
        agent.log().join("\n")
    );
    let mut sparse = [Runs::default(), Runs::default()];
    measure(&mut sparse)?;
    agent.try_stop()?;
    Ok((empty, sparse))
}
