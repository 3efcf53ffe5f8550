//! Wall time of `GET /metrics` against the running agent with 0, 100k and 1M tracked flows.
//!
//! The flows are written straight into the agent's pinned established table (batch updates:
//! seconds for a million, where driving a million handshakes through the interface would take
//! minutes), shaped like live ESTABLISHED connections seen from their server, last active now
//! (CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`), so that the agent's once-a-second
//! in-kernel reaper walks them all and expires none.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::{HashMap, IterableMap as _, Map, MapData};
use serde_json::json;
use tcp_common::object::FLOWS4_MAP;
use tcp_common::{
    flow::{Established, EstablishedEntry, Flow, FlowKey4, endpoint_flags, flow_flags},
    state::{Side, TcpState},
};
use tcp_testbed::{Testbed, agent::Agent};
use tcp_user::{flows::monotonic_ns, pins::layout_dir};

use crate::{
    Config,
    report::{Runs, Section, Table, Target, met, num},
};

/// Key in report.json.
pub const KEY: &str = "scrape";
/// Heading.
pub const TITLE: &str = "3. Scrape cost (GET /metrics)";

/// The agent's metrics address inside the receiving namespace (its own, so the port is free).
const LISTEN: &str = "127.0.0.1:9977";
/// Established-table capacity given to the agent: room for the largest point.
const CAPACITY: u32 = 1 << 20;
/// Records per batch update.
const BATCH: usize = 1 << 16;
/// Pause between scrapes, so that they do not queue behind one another.
const SPACING: Duration = Duration::from_millis(20);
/// Targets at the largest point, in ms: the median scrape, and the slowest of all.
const TARGET_MS: f64 = 5.0;
const TARGET_MAX_MS: f64 = 10.0;

/// Key of populated flow `i`: 10.<100 + i/65536>.<i/256 % 256>.<i % 256>:40000 (a remote client,
/// endpoint 0: the lower address) to 10.250.0.1:443.
fn key(i: u32) -> FlowKey4 {
    let [_, a, b, c] = i.to_be_bytes();
    FlowKey4 {
        addr: [[10, 100 + a, b, c], [10, 250, 0, 1]],
        port: [40_000, 443],
        vlan: 0,
        pad: 0,
    }
}

/// A record of an established connection whose handshake was seen, last active at `now`.
fn entry(now: u64) -> EstablishedEntry {
    const ISN: [u32; 2] = [1000, 5000];
    let mut flow = Flow::EMPTY;
    for (i, ep) in flow.ep.iter_mut().enumerate() {
        ep.state = TcpState::Established as u8;
        ep.isn = ISN[i];
        ep.ack = ISN[1 - i].wrapping_add(1);
        ep.window = 64_240;
        ep.flags = endpoint_flags::SENT_SYN | endpoint_flags::SENT_ACK | endpoint_flags::SENT_ANY;
        ep.side = if i == 0 { Side::Remote } else { Side::Local } as u8;
    }
    flow.client = 0;
    flow.flags = flow_flags::SEEN | flow_flags::HANDSHAKE_DONE;
    flow.last_ns = now;
    EstablishedEntry {
        lock: Default::default(),
        rec: Established::pack(&flow),
    }
}

/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6): `count` keys and values, packed, into map `fd`.
fn update_batch(
    fd: std::os::fd::BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> Result<()> {
    // SAFETY: the callers pack `count` keys and values of the map's own types.
    unsafe { tcp_user::batch::update(fd, keys, values, count) }.map_err(|(stored, e)| {
        anyhow::anyhow!("BPF_MAP_UPDATE_BATCH stored {stored} of {count}: {e}")
    })
}

/// Writes flows `from..to` into the established table pinned under the agent's directory.
fn populate(agent: &Agent, from: u32, to: u32) -> Result<()> {
    let path = layout_dir(&agent.pin_dir).join(FLOWS4_MAP);
    let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut keys = Vec::with_capacity(BATCH);
    let mut values = Vec::with_capacity(BATCH);
    let mut i = from;
    while i < to {
        let end = to.min(i + BATCH as u32);
        let now = monotonic_ns();
        keys.clear();
        values.clear();
        for n in i..end {
            values.push(entry(now));
            keys.push(key(n));
        }
        // SAFETY: FlowKey4 and EstablishedEntry are repr(C) with explicit padding only (their layout
        // is asserted in tcp-common), so viewing the vectors as bytes reads initialized
        // memory; the byte slices live no longer than the vectors.
        let (k, v) = unsafe {
            (
                std::slice::from_raw_parts(keys.as_ptr().cast::<u8>(), size_of_val(&keys[..])),
                std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), size_of_val(&values[..])),
            )
        };
        update_batch(map.fd().as_fd(), k, v, keys.len())?;
        i = end;
    }
    Ok(())
}

/// Fails unless the first and last populated flows are still in the table (the reaper must
/// not have expired them: otherwise the scrapes ran over fewer flows than claimed).
fn check_present(agent: &Agent, count: u32) -> Result<()> {
    let path = layout_dir(&agent.pin_dir).join(FLOWS4_MAP);
    let map: HashMap<MapData, FlowKey4, EstablishedEntry> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(&path)?))?;
    for i in [0, count - 1] {
        map.get(&key(i), 0)
            .with_context(|| format!("populated flow {i} is gone from the table"))?;
    }
    ensure!(
        map.map().info()?.max_entries() == CAPACITY,
        "the agent's table is not of the requested capacity"
    );
    Ok(())
}

/// One `GET /metrics`: its wall time, from connect to the end of the answer.
fn scrape() -> Result<Duration> {
    let started = Instant::now();
    let mut s = TcpStream::connect(LISTEN).context("connecting to the agent")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: tcpscope\r\nConnection: close\r\n\r\n")?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).context("reading the answer")?;
    let took = started.elapsed();
    ensure!(
        answer.starts_with(b"HTTP/1.1 200"),
        "the agent answered {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(100)])
    );
    Ok(took)
}

/// Measures item 3.
pub fn run(cfg: &Config, bed: &Testbed) -> Result<Section> {
    let points: [u32; 3] = cfg.pick([0, 100_000, 1_000_000], [0, 10_000, 100_000]);
    let scrapes = cfg.pick(25, 20);
    let capacity = CAPACITY.to_string();
    let mut ms: Vec<Runs> = vec![Runs::default(); points.len()];
    let mut slowest: Vec<Runs> = ms.clone();
    let mut populate_s: Vec<Runs> = ms.clone();
    let mut runs_done = 0;
    for run in 0..cfg.runs {
        if !cfg.time_left() {
            break;
        }
        eprintln!("bench: scrape run {}/{}", run + 1, cfg.runs);
        let agent = bed.start_agent(&["--listen", LISTEN, "--flows-capacity", &capacity])?;
        let mut held = 0;
        for (p, &count) in points.iter().enumerate() {
            let started = Instant::now();
            populate(&agent, held, count)?;
            populate_s[p].push(started.elapsed().as_secs_f64());
            held = count;
            let mut times = Vec::with_capacity(scrapes);
            {
                let _ns = bed.rx.enter_thread()?;
                for _ in 0..scrapes {
                    times.push(scrape()?.as_secs_f64() * 1e3);
                    std::thread::sleep(SPACING);
                }
            }
            if count > 0 {
                check_present(&agent, count)?;
            }
            let mut this = Runs::default();
            for t in &times {
                this.push(*t);
            }
            ms[p].push(this.median());
            slowest[p].push(times.iter().copied().fold(0.0, f64::max));
        }
        agent.try_stop()?;
        runs_done += 1;
    }
    ensure!(runs_done > 0, "no run finished within the time cap");
    let last = points.len() - 1;
    let mut t = Table::new(&[
        "flows",
        "scrape ms (median)",
        "runs",
        "slowest scrape ms (of all runs)",
        "populate s",
        "target",
        "met?",
    ]);
    let mut rows = Vec::new();
    let max = |r: &Runs| r.json()["max"].as_f64().unwrap_or(f64::NAN);
    for (p, count) in points.iter().enumerate() {
        let target = (p == last).then_some(TARGET_MS);
        let ok = target.map(|t| ms[p].median() <= t && max(&slowest[p]) <= TARGET_MAX_MS);
        t.row(vec![
            count.to_string(),
            ms[p].cell(2),
            ms[p].range(2),
            num(max(&slowest[p]), 1),
            populate_s[p].cell(2),
            target.map_or_else(
                || "–".to_owned(),
                |t| {
                    format!(
                        "median ≤ {} ms, slowest ≤ {} ms",
                        num(t, 0),
                        num(TARGET_MAX_MS, 0)
                    )
                },
            ),
            met(ok),
        ]);
        rows.push(json!({
            "flows": count,
            "scrape_ms": ms[p].json(),
            "slowest_scrape_ms": slowest[p].json(),
            "populate_s": populate_s[p].json(),
            "target_ms": target,
            "met": ok,
        }));
    }
    let growth = ms[last].median() / ms[0].median();
    Ok(Section {
        key: KEY,
        title: TITLE.to_owned(),
        intro: vec![
            format!(
                "The release agent in the receiving namespace (`--listen {LISTEN} \
                 --flows-capacity {CAPACITY}`), fresh every run. Flows are written into its \
                 pinned established table with BPF_MAP_UPDATE_BATCH as ESTABLISHED connections \
                 last active now, so its once-a-second in-kernel reaper walks them and keeps \
                 them (checked after the scrapes). {scrapes} scrapes per point, {} ms apart, \
                 wall time from connect to the last byte; per run the median, then the median \
                 over runs.",
                SPACING.as_millis()
            ),
            format!(
                "**Targets:** at {} flows, the median scrape ≤ {TARGET_MS} ms and the slowest \
                 of all the runs' scrapes ≤ {TARGET_MAX_MS} ms; no growth with the number of \
                 flows.",
                points[last]
            ),
        ],
        tables: vec![t],
        notes: vec![format!(
            "Median at {} flows / median at 0 flows: {}. The reaper walks the tables on a \
             thread of its own, so a scrape never waits for a walk; it still shares the two \
             CPUs with it.",
            points[last],
            num(growth, 2)
        )],
        json: json!({
            "runs": runs_done,
            "scrapes_per_point": scrapes,
            "points": rows,
            "growth_largest_over_empty": growth,
        }),
        targets: if cfg.quick {
            Vec::new()
        } else {
            vec![
                Target::at_most("scrape_max_ms_1m", max(&slowest[last]), TARGET_MAX_MS, "ms"),
                Target::at_most("scrape_median_ms_1m", ms[last].median(), TARGET_MS, "ms"),
            ]
        },
    })
}
