//! Captures tcpscope did not choose: cut short in the middle of a packet, or taken on Linux's
//! `any` device (cooked headers). `tcpscope replay` must read what tshark reads.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
};

use serde_json::Value;
use tcp_testbed::{Link, Tcpdump};

/// `tcpscope replay --format json FILE`: its JSON and its stderr.
fn replay(file: &Path) -> (Value, String) {
    let out = Command::new(tcp_testbed::agent::agent_binary())
        .args(["replay", "--format", "json"])
        .arg(file)
        .output()
        .expect("run tcpscope replay");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "replay {}: {stderr}", file.display());
    (serde_json::from_slice(&out.stdout).expect("JSON"), stderr)
}

/// Packets tshark reads from `file` (it reads up to a cut and warns, as replay must).
fn tshark_packets(file: &Path) -> u64 {
    let out = Command::new("tshark")
        .args(["-n", "-r"])
        .arg(file)
        .args(["-T", "fields", "-e", "frame.number"])
        .output()
        .expect("run tshark");
    String::from_utf8_lossy(&out.stdout).lines().count() as u64
}

/// A capture cut in the middle of its last record is replayed up to its last complete packet,
/// with a warning, as tshark reads it; the counts equal those of the same packets written whole
/// (by editcap, tshark's tool).
#[test]
fn a_capture_cut_short_is_replayed_up_to_the_cut() {
    let Some(dir) = tcp_testbed::pcaps_dir() else {
        return;
    };
    let dir_path = std::env::temp_dir().join(tcp_testbed::unique("tcpscope-cut-"));
    std::fs::create_dir_all(&dir_path).expect("temp dir");
    let _cleanup = tcp_testbed::RemoveOnDrop(dir_path.clone());
    let mut checked = 0;
    for name in ["sv__tls-subjectaltname.pcap", "esnet__nmap_80_vanilla.pcap"] {
        let whole = dir.join("captures").join(name);
        if !whole.is_file() {
            continue;
        }
        let bytes = std::fs::read(&whole).expect("read capture");
        let cut = dir_path.join(format!("cut-{name}"));
        // 10 bytes off the end: inside the last packet's data (every packet here is longer).
        std::fs::write(&cut, &bytes[..bytes.len() - 10]).expect("write");
        let complete = tshark_packets(&cut);
        assert_eq!(
            complete + 1,
            tshark_packets(&whole),
            "{name}: tshark's count"
        );
        let prefix = dir_path.join(format!("prefix-{name}"));
        tcp_testbed::sh(&[
            "editcap",
            "-r",
            whole.to_str().expect("path"),
            prefix.to_str().expect("path"),
            &format!("1-{complete}"),
        ]);
        let (from_cut, warning) = replay(&cut);
        let (from_prefix, _) = replay(&prefix);
        assert!(
            warning.contains("cut short") && warning.contains(&format!("{complete} complete")),
            "{name}: no warning naming the cut: {warning}"
        );
        let frames = |v: &Value| v["packets"].as_u64().expect("packets");
        assert_eq!(frames(&from_cut), complete, "{name}: frames replayed");
        assert_eq!(from_cut["counters"], from_prefix["counters"], "{name}");
        assert_eq!(from_cut["endpoints"], from_prefix["endpoints"], "{name}");
        checked += 1;
    }
    assert!(checked > 0, "none of the captures used here is present");
}

/// Captures of `tcpdump -i any` (LINUX_SLL2, and LINUX_SLL with `-y`) replay to the same
/// counts as a capture of the same traffic on the Ethernet interface.
#[test]
fn cooked_captures_of_the_any_device_replay_like_ethernet() {
    tcp_testbed::require_root();
    let link = Link::new();
    let mut caps = [
        Tcpdump::start(&link.client, &["-i", &link.client_if]),
        Tcpdump::start(&link.client, &["-i", "any", "-y", "LINUX_SLL2"]),
        Tcpdump::start(&link.client, &["-i", "any", "-y", "LINUX_SLL"]),
    ];
    let listener = link.server.enter({
        let addr = format!("{}:9400", link.server_v4());
        move || TcpListener::bind(addr).expect("bind")
    });
    let (v4, v6) = link.server_addrs(9400);
    let listener6 = link
        .server
        .enter(move || TcpListener::bind(v6).expect("bind v6"));
    const CONNECTIONS: u64 = 6;
    link.client.enter(move || {
        for i in 0..CONNECTIONS {
            let to = if i % 2 == 0 { v4 } else { v6 };
            let mut c = TcpStream::connect(to).expect("connect");
            c.write_all(b"hello").expect("write");
        }
    });
    for l in [&listener, &listener6] {
        for _ in 0..CONNECTIONS / 2 {
            let (mut s, _) = l.accept().expect("accept");
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).expect("read");
            assert_eq!(buf, b"hello");
        }
    }
    // Let the last FINs and ACKs cross before the captures stop.
    std::thread::sleep(std::time::Duration::from_millis(300));
    for cap in &mut caps {
        cap.stop();
    }
    let [ethernet, sll2, sll] = caps.map(|c| {
        let (json, _) = replay(&c.file);
        json
    });
    assert_eq!(
        ethernet["counters"]["handshakes_completed"].as_u64(),
        Some(CONNECTIONS),
        "{ethernet}"
    );
    for (name, cooked) in [("LINUX_SLL2", &sll2), ("LINUX_SLL", &sll)] {
        assert_eq!(cooked["counters"], ethernet["counters"], "{name}");
        assert_eq!(cooked["endpoints"], ethernet["endpoints"], "{name}");
    }
}
