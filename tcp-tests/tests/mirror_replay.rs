//! Mirror mode on real captures: every public capture in ../shared/pcaps is replayed with
//! tcpreplay onto a veth whose peer carries the agent in mirror mode (XDP only, both
//! directions on ingress). The kernel's tallies and per-state endpoint counts must equal
//! those of `tcpscope replay` on the same file (the userspace path over the same tcp-common
//! code): a differential test of the two paths, and through the replay test, a comparison
//! with the captures' truth. Skipped, saying so, when the captures are absent.

use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use serde_json::Value;
use tcp_common::object::{FLOWS4_MAP, FLOWS6_MAP, HALF_OPEN_MAP};
use tcp_common::{
    counters::HookCounters,
    flow::{EstablishedEntry, FlowKey, FlowKey4, HalfOpenEntry},
    metrics::Metrics,
};
use tcp_testbed::{Link, agent::Agent};

/// Timeouts far beyond any capture's span (the longest the agent takes), for both the agent
/// and replay: nothing expires in either path.
const NO_EXPIRY: [&str; 10] = [
    "--time-wait-secs",
    "35000",
    "--closed-secs",
    "35000",
    "--half-open-secs",
    "100000000",
    "--closing-secs",
    "2250000",
    "--fin-wait2-secs",
    "2250000",
];

/// Empties the pinned tables and counters between captures.
fn reset(pin_dir: &Path) {
    let dir = pin_dir.join(format!("v{}", tcp_common::LAYOUT_VERSION));
    fn clear<K: aya::Pod, V: aya::Pod>(path: &Path) {
        let data = MapData::from_pin(path).expect("pinned table");
        let mut map: HashMap<_, K, V> = HashMap::try_from(Map::HashMap(data)).expect("hash");
        let keys: Vec<K> = map.keys().map(|k| k.expect("key")).collect();
        for k in keys {
            let _ = map.remove(&k);
        }
    }
    clear::<FlowKey4, EstablishedEntry>(&dir.join(FLOWS4_MAP));
    clear::<FlowKey, EstablishedEntry>(&dir.join(FLOWS6_MAP));
    clear::<FlowKey, HalfOpenEntry>(&dir.join(HALF_OPEN_MAP));
    let cpus = aya::util::nr_cpus().expect("cpus").get() as usize;
    let data = MapData::from_pin(dir.join(tcp_common::object::COUNTERS_MAP)).expect("counters");
    let mut counters: PerCpuArray<_, HookCounters> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).expect("array");
    for hook in 0..2 {
        counters
            .set(
                hook,
                PerCpuValues::try_from(vec![HookCounters::ZERO; cpus]).expect("values"),
                0,
            )
            .expect("zero");
    }
    // The gauges and table counts go with the records: all zero together.
    let data = MapData::from_pin(dir.join(tcp_common::object::METRICS_MAP)).expect("metrics");
    let mut metrics: PerCpuArray<_, Metrics> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).expect("array");
    for writer in 0..2 {
        metrics
            .set(
                writer,
                PerCpuValues::try_from(vec![Metrics::ZERO; cpus]).expect("values"),
                0,
            )
            .expect("zero");
    }
}

/// Frames the XDP program counted (every parse result).
fn packets_seen(stats: &Value) -> u64 {
    stats["packets"].as_u64().expect("packets in stats JSON")
}

#[test]
fn kernel_mirror_mode_equals_userspace_replay_on_every_capture() {
    tcp_testbed::require_root();
    let Some(dir) = tcp_testbed::pcaps_dir() else {
        return;
    };
    let link = Link::new();
    // Large frames (captures taken with offloads) must fit: generic XDP takes any size.
    for (ns, iface) in [
        (&link.client, &link.client_if),
        (&link.server, &link.server_if),
    ] {
        ns.sh(&["ip", "link", "set", iface, "mtu", "65000"]);
        // No IPv6 on the pair: its neighbour discovery and MLD frames would add to what
        // XDP sees besides the capture.
        ns.sh(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{iface}.disable_ipv6=1"),
        ]);
    }
    let mut args = vec![
        "--iface",
        &link.server_if,
        "--mode",
        "mirror",
        "--xdp-mode",
        "skb",
    ];
    args.extend(NO_EXPIRY);
    let mut agent = Agent::start(&link.server, &args);
    agent.wait_for("attached ");
    let mut truths: Vec<PathBuf> = std::fs::read_dir(dir.join("truth"))
        .expect("truth")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    truths.sort();
    let mut compared = 0;
    for truth_path in truths {
        let truth: Value =
            serde_json::from_str(&std::fs::read_to_string(&truth_path).expect("read"))
                .expect("json");
        let name = truth["name"].as_str().expect("name").to_owned();
        let capture = dir
            .join("captures")
            .join(truth["file"].as_str().expect("file"));
        reset(&agent.pin_dir);
        let out = link.client.sh(&[
            "tcpreplay",
            "--intf1",
            &link.client_if,
            "--pps",
            "20000",
            capture.to_str().expect("path"),
        ]);
        let failed = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Failed packets:"))
            .map(|v| v.trim().to_owned());
        assert_eq!(
            failed.as_deref(),
            Some("0"),
            "{name}: tcpreplay could not send everything: {out}"
        );
        // Wait (bounded) until the agent has seen every frame.
        let want = truth["packets"].as_u64().expect("packets");
        let deadline = Instant::now() + Duration::from_secs(20);
        let kernel = loop {
            let stats = agent.json(&["stats", "--format", "json"]);
            if packets_seen(&stats) >= want || Instant::now() > deadline {
                break stats;
            }
            thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(packets_seen(&kernel), want, "{name}: frames seen by XDP");
        let mut args = vec!["replay", "--format", "json"];
        args.extend(NO_EXPIRY);
        args.push(capture.to_str().expect("path"));
        let user = tcp_testbed::agent::tcpscope_json(&args);
        for key in [
            "syn",
            "synack",
            "syn_retransmits",
            "handshakes_completed",
            "handshakes_failed_rst",
            "closed_by_rst",
            "closed_by_fin",
            "simultaneous_closes",
            "time_wait_reuses",
            "time_wait_reuses_accepted",
            "time_wait_reuses_refused",
            "synack_retransmits",
            "fin_retransmits",
            "simultaneous_opens",
            "half_close_data_segments",
            "picked_up",
            "invalid_rst",
            "invalid_rst_in_window",
            "keepalive_probes",
            "keepalive_acks",
            "closed_by_keepalive",
            "invalid_fin",
            "invalid_flags",
            "invalid_ack",
        ] {
            assert_eq!(
                kernel["counters"][key], user["counters"][key],
                "{name}: {key} (kernel vs replay)"
            );
            compared += 1;
        }
        assert_eq!(
            kernel["endpoints"], user["endpoints"],
            "{name}: endpoints per state (kernel vs replay)"
        );
    }
    assert!(compared > 500, "compared {compared}");
    drop(agent);
}
