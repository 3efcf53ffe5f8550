//! `tcpscope replay` over the public captures in ../shared/pcaps, against their independently
//! computed truth (tshark streams, cross-checked with dpkt and tcptrace; see
//! ../shared/pcaps/truth/README). No root needed. Without the captures the tests fail, unless
//! TCPSCOPE_ALLOW_SKIP=pcaps asks them to skip.

use std::collections::BTreeMap;

use serde_json::Value;
use tcp_common::{
    counters::Counter,
    state::{Role, TcpState},
    track::Timeouts,
};
use tcp_user::replay::replay_file;

/// The counters compared, as (name, truth summary key).
const COMPARED: &[&str] = &[
    "handshakes",
    "syn",
    "syn_retransmits",
    "syn_without_synack",
    "closed_by_fin",
    "closed_by_rst",
    "simultaneous_closes",
    "time_wait_client",
    "time_wait_server",
];

fn truth_counters(summary: &Value) -> BTreeMap<&'static str, u64> {
    let g = |k: &str| {
        summary[k]
            .as_u64()
            .unwrap_or_else(|| panic!("truth has no {k}"))
    };
    BTreeMap::from([
        ("handshakes", g("handshakes_complete")),
        ("syn", g("syn_packets")),
        ("syn_retransmits", g("syn_retransmissions")),
        ("syn_without_synack", g("syn_without_synack")),
        ("closed_by_fin", g("closed_by_fin")),
        ("closed_by_rst", g("closed_by_rst")),
        ("simultaneous_closes", g("simultaneous_close")),
        ("time_wait_client", g("time_wait_side_client")),
        ("time_wait_server", g("time_wait_side_server")),
    ])
}

/// Counters where the tracker's model and the truth's differ: (capture, counter, the exact
/// value the tracker gives, why). Every other counter of every capture must equal the truth.
const EXPECTED: &[(&str, &str, u64, &str)] = &[
    // Mid-stream capture: the truth calls the first packet's sender the client; the tracker
    // takes the lower port (80, which sent first) for the server's.
    (
        "ppa__tcp_teardown",
        "time_wait_client",
        0,
        "role of a picked-up flow",
    ),
    (
        "ppa__tcp_teardown",
        "time_wait_server",
        1,
        "role of a picked-up flow",
    ),
    // The truth counts 239 streams closed by RST: 66 made only of RSTs (backscatter), which
    // never create a record, and 173 SYN -> RST streams (both checked below). Two of those
    // RSTs are RST+ACK at sequence 0 towards a port that never answered: RFC 793 has LISTEN
    // ignore a RST, and the tracker takes one only at the SYN's next sequence number.
    (
        "stopddos__syn-ecn-cwr",
        "closed_by_rst",
        171,
        "lone RSTs; RSTs to LISTEN",
    ),
    // All 1,018 RST-closed streams of the truth are lone RSTs (checked below).
    (
        "stopddos__synack-reflection",
        "closed_by_rst",
        0,
        "lone RSTs",
    ),
    // Client -> server frames carry VLAN 3136, server -> client frames none: the VLAN-aware key
    // sees two connections, the SYNs without a SYN-ACK, and one picked up from the SYN-ACK.
    (
        "sv__syn_retransmit_with_ts",
        "handshakes",
        0,
        "directions on two VLANs",
    ),
    (
        "sv__syn_retransmit_with_ts",
        "syn_without_synack",
        1,
        "directions on two VLANs",
    ),
    (
        "sv__syn_retransmit_with_ts",
        "closed_by_fin",
        0,
        "directions on two VLANs",
    ),
    (
        "sv__syn_retransmit_with_ts",
        "time_wait_client",
        0,
        "directions on two VLANs",
    ),
    // Nine streams go SYN -> stray ACK -> client RST (at the ACK's number) -> the same SYN ->
    // handshake. The truth calls them reset; RFC 793 changes no state there (LISTEN ignores
    // the RST), so the tracker follows them on: 3 close by FIN later (client first: TIME-WAIT
    // on the client), 2 are reset later, 4 stay open.
    (
        "sv__tls-subjectaltname",
        "closed_by_fin",
        3 + 3,
        "RST answering a stray ACK",
    ),
    (
        "sv__tls-subjectaltname",
        "closed_by_rst",
        18 - 9 + 2,
        "RST answering a stray ACK",
    ),
    (
        "sv__tls-subjectaltname",
        "time_wait_client",
        2 + 3,
        "RST answering a stray ACK",
    ),
    // The same 4-tuple on three VLANs (untagged, 42, 10/20): tshark ignores VLAN ids and sees
    // one connection with three SYNs, the tracker three connections.
    ("zeek__vlan-collisions", "handshakes", 3, "VLAN-aware keys"),
    (
        "zeek__vlan-collisions",
        "syn_retransmits",
        0,
        "VLAN-aware keys",
    ),
    (
        "zeek__vlan-collisions",
        "closed_by_fin",
        3,
        "VLAN-aware keys",
    ),
    (
        "zeek__vlan-collisions",
        "time_wait_client",
        3,
        "VLAN-aware keys",
    ),
    // Three stacked tags: deeper than the parser's two (counted `unsupported`, passed).
    ("zeek__vlan-qinqinq", "handshakes", 0, "three VLAN tags"),
    ("zeek__vlan-qinqinq", "syn", 0, "three VLAN tags"),
    ("zeek__vlan-qinqinq", "closed_by_fin", 0, "three VLAN tags"),
    (
        "zeek__vlan-qinqinq",
        "time_wait_client",
        0,
        "three VLAN tags",
    ),
];

/// Counters the truth tools themselves disagree on (tshark's streams vs dpkt's connections,
/// the truth's own cross-check): not compared. Synthetic flag combinations, split differently
/// by each tool (4,465 vs 3,969 connections); the test checks that they do disagree.
const TOOLS_DISAGREE: &[(&str, &str, &str)] = &[
    ("esnet__two_way_all_flags", "syn", "syn_packets"),
    (
        "esnet__two_way_all_flags",
        "syn_without_synack",
        "syn_without_synack",
    ),
    ("esnet__two_way_all_flags", "closed_by_fin", "closed_by_fin"),
    ("esnet__two_way_all_flags", "closed_by_rst", "closed_by_rst"),
    (
        "esnet__two_way_all_flags",
        "simultaneous_closes",
        "simultaneous_close",
    ),
];

/// The truth's per-connection records (inline, or in the gzipped JSON-lines file beside it).
fn connections(truth: &Value, dir: &std::path::Path) -> Vec<Value> {
    if let Some(c) = truth["connections"].as_array() {
        return c.clone();
    }
    let file = truth["connections_file"].as_str().expect("connections");
    let out = std::process::Command::new("zcat")
        .arg(dir.join("truth").join(file))
        .output()
        .expect("zcat");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[test]
fn replay_agrees_with_the_truth_of_every_public_capture() {
    let Some(dir) = tcp_testbed::pcaps_dir() else {
        return;
    };
    let mut truths: Vec<_> = std::fs::read_dir(dir.join("truth"))
        .expect("truth dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    truths.sort();
    assert!(truths.len() >= 40, "expected the full set of truth files");
    let no_expiry = Timeouts {
        time_wait: u64::MAX / 2,
        closed: u64::MAX / 2,
        fin_wait2: u64::MAX / 2,
        ..Timeouts::DEFAULT
    };
    let mut compared = 0;
    for truth_path in truths {
        let truth: Value =
            serde_json::from_str(&std::fs::read_to_string(&truth_path).expect("read truth"))
                .expect("truth JSON");
        let name = truth["name"].as_str().expect("name");
        let capture = dir
            .join("captures")
            .join(truth["file"].as_str().expect("file"));
        let replay = replay_file(&capture, no_expiry).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let r = &replay.report;
        let ours = BTreeMap::from([
            ("handshakes", r.handshakes_completed),
            ("syn", r.syn),
            ("syn_retransmits", r.syn_retransmits),
            ("syn_without_synack", r.syn_without_synack),
            ("closed_by_fin", r.closed_by_fin),
            // A close by keepalive is a reset whose reason is known (the peer answered a
            // probe with a RST, or the prober gave up with one).
            (
                "closed_by_rst",
                r.closed_by_rst + r.handshakes_failed_rst + r.closed_by_keepalive,
            ),
            ("simultaneous_closes", r.simultaneous_closes),
            (
                "time_wait_client",
                r.endpoints_in(TcpState::TimeWait, Role::Client) as u64,
            ),
            (
                "time_wait_server",
                r.endpoints_in(TcpState::TimeWait, Role::Server) as u64,
            ),
        ]);
        let want = truth_counters(&truth["summary"]);
        // Every frame got a parse result.
        assert_eq!(
            r.packets.packets(),
            truth["packets"].as_u64().expect("packets"),
            "{name}: frames"
        );
        for key in COMPARED {
            if let Some((_, _, tool_key)) = TOOLS_DISAGREE
                .iter()
                .find(|(c, k, _)| *c == name && k == key)
            {
                let dpkt = &truth["cross_check"]["dpkt"][tool_key];
                assert_ne!(
                    dpkt.as_u64(),
                    Some(want[key]),
                    "{name}: {key}: the truth tools agree; compare it"
                );
                continue;
            }
            let expected = EXPECTED
                .iter()
                .find(|(c, k, _, _)| *c == name && k == key)
                .map_or(want[key], |(_, _, v, _)| *v);
            assert_eq!(ours[key], expected, "{name}: {key} (truth {})", want[key]);
            compared += 1;
        }
        match name {
            "stopddos__syn-ecn-cwr" | "stopddos__synack-reflection" => {
                // Which of the truth's RST-closed streams had a SYN or SYN-ACK at all.
                let conns = connections(&truth, &dir);
                let rst = |opened: bool| {
                    conns
                        .iter()
                        .filter(|c| c["close"] == "rst")
                        .filter(|c| {
                            let n = c["syn_count"].as_u64().unwrap_or(0)
                                + c["synack_count"].as_u64().unwrap_or(0);
                            (n > 0) == opened
                        })
                        .count()
                };
                let (opened, lone) = if name == "stopddos__syn-ecn-cwr" {
                    (173, 66)
                } else {
                    (0, 1018)
                };
                assert_eq!((rst(true), rst(false)), (opened, lone), "{name}");
            }
            "zeek__vlan-qinqinq" => {
                assert!(
                    r.packets.get(Counter::Unsupported) > 0,
                    "{name}: three tags are unsupported"
                );
            }
            _ => {}
        }
    }
    // Every stated difference names a capture and counter that exist.
    for (capture, key, _, _) in EXPECTED {
        assert!(COMPARED.contains(key), "{capture}: {key}");
        assert!(
            dir.join(format!("truth/{capture}.json")).exists(),
            "{capture}"
        );
    }
    assert!(compared > 380, "compared only {compared} counters");
}

#[test]
fn replay_command_prints_the_exporter_metrics() {
    let Some(dir) = tcp_testbed::pcaps_dir() else {
        return;
    };
    let out = std::process::Command::new(tcp_testbed::agent::agent_binary())
        .args(["replay", "--time-wait-secs", "35000"])
        .arg(dir.join("captures/zeek__http-methods.pcap"))
        .output()
        .expect("run tcpscope replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    for line in [
        "tcpscope_handshakes_completed_total 49",
        "tcpscope_syn_total 49",
        "tcpscope_synack_total 49",
        "tcpscope_syn_retransmits_total 0",
        r#"tcpscope_endpoints{role="client",side="unknown",state="time_wait"} 15"#,
        r#"tcpscope_endpoints{role="server",side="unknown",state="time_wait"} 34"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    assert!(text.contains("# TYPE tcpscope_invalid_segments_total counter"));
}

#[test]
fn time_wait_expires_with_capture_time() {
    let Some(dir) = tcp_testbed::pcaps_dir() else {
        return;
    };
    // sv__dcerpc-zerologon spans 9 minutes of capture time. The truth records when each
    // endpoint entered TIME-WAIT; with a 60 s TIME-WAIT only those that entered in the last
    // 60 s of the capture may remain.
    let name = "sv__dcerpc-zerologon";
    let truth: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("truth/{name}.json"))).expect("truth"),
    )
    .expect("json");
    let conns = truth["connections"].as_array().expect("connections");
    let last = conns
        .iter()
        .filter_map(|c| c["last_ts"].as_f64())
        .fold(0.0, f64::max);
    let entered: Vec<f64> = conns
        .iter()
        .filter_map(|c| c["time_wait_enter_ts"].as_object())
        .flat_map(|m| m.values().filter_map(Value::as_f64).collect::<Vec<_>>())
        .collect();
    let expected = entered.iter().filter(|t| last - **t < 60.0).count() as i64;
    let capture = dir
        .join("captures")
        .join(truth["file"].as_str().expect("file"));
    let tw = |t: Timeouts| {
        let r = replay_file(&capture, t).expect("replay");
        r.report.endpoints_in(TcpState::TimeWait, Role::Client)
            + r.report.endpoints_in(TcpState::TimeWait, Role::Server)
    };
    let forever = tw(Timeouts {
        time_wait: u64::MAX / 2,
        ..Timeouts::DEFAULT
    });
    assert_eq!(
        forever,
        entered.len() as i64,
        "without expiry every TIME-WAIT endpoint remains"
    );
    assert_eq!(tw(Timeouts::DEFAULT), expected, "with the default 60 s");
    assert!(expected < forever);
}

#[test]
fn bad_capture_file_is_a_clear_error() {
    let path = std::env::temp_dir().join(format!("tcpscope-not-a-pcap-{}", std::process::id()));
    std::fs::write(&path, b"this is not a capture file at all").expect("write");
    let out = std::process::Command::new(tcp_testbed::agent::agent_binary())
        .arg("replay")
        .arg(&path)
        .output()
        .expect("run");
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
}
