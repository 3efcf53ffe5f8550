//! Kernel memory per tracked flow: `memlock` of each of the agent's maps (from
//! `/proc/<pid>/fdinfo`, what `bpftool map show` prints: on 6.x the map's own accounting of
//! what it allocated, all up front for these preallocated hashes), divided by its capacity.

use std::{collections::BTreeMap, fs};

use anyhow::{Context as _, Result, ensure};
use aya::maps::MapInfo;
use serde_json::json;
use tcp_common::object::{FLOWS4_MAP, FLOWS6_MAP, HALF_OPEN_MAP};
use tcp_testbed::Testbed;

use crate::report::{Section, Table, Target, met, num};

/// Key in report.json.
pub const KEY: &str = "memory";
/// Heading.
pub const TITLE: &str = "4. Kernel memory per tracked flow";

/// Targets: bytes per IPv4 and per IPv6 flow (a slot of its established table).
const TARGET_V4_BYTES: f64 = 128.0;
const TARGET_V6_BYTES: f64 = 160.0;
/// The targets' ids in report.json, with their limits.
const TARGETS: [(&str, f64); 2] = [
    ("memory_ipv4_bytes_per_flow", TARGET_V4_BYTES),
    ("memory_ipv6_bytes_per_flow", TARGET_V6_BYTES),
];

/// One map the agent holds.
struct MapMem {
    name: String,
    max_entries: u64,
    memlock: u64,
}

/// Every map the process `pid` holds a descriptor of, by map id.
fn maps_of(pid: u32) -> Result<BTreeMap<u32, MapMem>> {
    let mut maps = BTreeMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).context("listing the agent's fds")? {
        let entry = entry?;
        let is_map =
            fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))?;
        let field = |name: &str| -> Result<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .with_context(|| format!("no {name} in fdinfo"))
        };
        let id = u32::try_from(field("map_id:")?)?;
        let name = MapInfo::from_id(id)
            .ok()
            .and_then(|m| m.name_as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("id {id}"));
        maps.insert(
            id,
            MapMem {
                name,
                max_entries: field("max_entries:")?,
                memlock: field("memlock:")?,
            },
        );
    }
    Ok(maps)
}

/// Measures item 4 (exact figures: one reading per configuration).
pub fn run(bed: &Testbed) -> Result<Section> {
    let configs: [(&str, &[&str]); 2] = [
        ("default capacities", &[]),
        (
            "1M capacities",
            &[
                "--flows-capacity",
                "1048576",
                "--flows6-capacity",
                "1048576",
                "--half-open-capacity",
                "1048576",
            ],
        ),
    ];
    let mut t = Table::new(&[
        "capacities",
        "map",
        "max_entries",
        "memlock bytes",
        "bytes per slot",
        "target",
        "met?",
    ]);
    let mut json_configs = Vec::new();
    let mut targets = Vec::new();
    for (label, args) in configs {
        eprintln!("bench: memory, {label}");
        let mut all = vec!["--listen", "off"];
        all.extend_from_slice(args);
        let agent = bed.start_agent(&all)?;
        let maps = maps_of(agent.pid())?;
        agent.try_stop()?;
        let table = |name: &str| {
            maps.values()
                .find(|m| m.name == name)
                .with_context(|| format!("the agent holds no {name} map"))
        };
        let (v4, v6, half_open) = (
            table(FLOWS4_MAP)?,
            table(FLOWS6_MAP)?,
            table(HALF_OPEN_MAP)?,
        );
        ensure!(v4.max_entries > 0 && v6.max_entries > 0 && half_open.max_entries > 0);
        let total: u64 = maps.values().map(|m| m.memlock).sum();
        let mut rows = Vec::new();
        for (name, m, target) in [
            ("FLOWS4 (IPv4 established)", v4, Some(TARGETS[0])),
            ("FLOWS6 (IPv6 established)", v6, Some(TARGETS[1])),
            ("HALF_OPEN (handshakes, both families)", half_open, None),
        ] {
            let per = m.memlock as f64 / m.max_entries as f64;
            let ok = target.map(|(_, limit)| per <= limit);
            t.row(vec![
                label.to_owned(),
                name.to_owned(),
                m.max_entries.to_string(),
                m.memlock.to_string(),
                num(per, 2),
                target.map_or_else(|| "–".to_owned(), |(_, limit)| format!("≤ {limit} B")),
                met(ok),
            ]);
            rows.push(json!({
                "map": name, "max_entries": m.max_entries, "memlock": m.memlock,
                "bytes_per_slot": per, "met": ok,
            }));
            if let Some((id, _)) = target {
                targets.push((id, per));
            }
        }
        json_configs.push(json!({
            "capacities": label,
            "tables": rows,
            "all_maps_memlock": total,
            "maps": maps.values().map(|m| json!({
                "name": m.name, "max_entries": m.max_entries, "memlock": m.memlock,
            })).collect::<Vec<_>>(),
        }));
    }
    Ok(Section {
        key: KEY,
        title: TITLE.to_owned(),
        intro: vec![
            "The release agent, started once per configuration; `memlock:` of each of its \
             maps from /proc/<pid>/fdinfo divided by the map's max_entries. The tables are \
             preallocated hashes: the figure is what a full table costs, allocated at load. \
             Exact figures (one reading each); report.json lists every map."
                .to_owned(),
            format!(
                "**Targets:** ≤ {TARGET_V4_BYTES} bytes per IPv4 flow and ≤ {TARGET_V6_BYTES} \
                 per IPv6 flow (a slot of the family's established table), at both capacities."
            ),
        ],
        tables: vec![t],
        notes: vec![
            "Per element of a preallocated kernel hash: 48 B `htab_elem` header, the key (16 B \
             for IPv4, 40 B for IPv6 and the half-open table) and the value (40 B compact \
             record and spin lock in the established tables, 88 B full record, lock and tag \
             in the half-open one), each rounded up to 8 B, plus 16 B of bucket (buckets = \
             max_entries rounded up to a power of two)."
                .to_owned(),
        ],
        json: json!({ "configs": json_configs }),
        targets: TARGETS
            .into_iter()
            .map(|(id, limit)| {
                // The larger of the two capacities' figures.
                let worst = targets
                    .iter()
                    .filter(|(i, _)| *i == id)
                    .map(|(_, per)| *per)
                    .fold(f64::NAN, f64::max);
                Target::at_most(id, worst, limit, "bytes")
            })
            .collect(),
    })
}
