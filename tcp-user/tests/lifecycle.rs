//! Tier 3: the parts of TCP's life cycle past open and close, against Linux in namespaces.
//! The agent runs in host mode on the server side of a veth pair; each behaviour is forced
//! with socket options, sysctls of the namespace, nft rules that drop chosen segments, and
//! crafted segments injected on the client's side; `ss` and the namespaces' own TCP counters
//! are the oracle.

mod common;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    thread,
    time::{Duration, Instant},
};

use common::{Link, NetNs, agent::Agent};
use serde_json::Value;
use tcp_common::frames::{FrameSpec, Upper};

/// `(local, peer)` → `ss` state, for the TCP sockets of a namespace (listeners left out).
fn ss_states(ns: &NetNs) -> BTreeMap<(String, String), String> {
    ns.sh(&["ss", "-Htan"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (state, local, peer) = (*f.first()?, *f.get(3)?, *f.get(4)?);
            (state != "LISTEN").then(|| ((local.to_owned(), peer.to_owned()), state.to_owned()))
        })
        .collect()
}

/// The tracker's endpoints on `side` (CLOSED left out), as `ss_states` has them.
fn tracker_states(agent: &Agent, side: &str) -> BTreeMap<(String, String), String> {
    let mut states = BTreeMap::new();
    for flow in agent.flows() {
        let ep = flow["endpoints"].as_array().expect("endpoints");
        for (me, peer) in [(&ep[0], &ep[1]), (&ep[1], &ep[0])] {
            if me["side"] == side && me["state"] != "closed" {
                let state = match me["state"].as_str().expect("state") {
                    "established" => "ESTAB".to_owned(),
                    "syn_received" => "SYN-RECV".to_owned(),
                    other => other.to_uppercase().replace('_', "-"),
                };
                let addr = |v: &Value| v["address"].as_str().expect("address").to_owned();
                states.insert((addr(me), addr(peer)), state);
            }
        }
    }
    states
}

/// Polls, bounded, until the tracker's endpoints equal `ss` in both namespaces; panics with
/// both views if they never do.
fn agree(what: &str, link: &Link, agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (server, client) = (ss_states(&link.server), ss_states(&link.client));
        let (local, remote) = (
            tracker_states(agent, "local"),
            tracker_states(agent, "remote"),
        );
        if local == server && remote == client {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: tracker vs ss\nserver: {local:?}\n    vs {server:?}\nclient: {remote:?}\n    vs {client:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The tallies of `tcpscope stats --format json` on the agent's pins.
fn counters(agent: &Agent) -> Value {
    agent.json(&["stats", "--format", "json"])["counters"].clone()
}

/// A counter's growth between two `counters` readings.
fn grew(before: &Value, after: &Value, key: &str) -> u64 {
    after[key].as_u64().expect(key) - before[key].as_u64().expect(key)
}

/// MAC address of `iface` in `ns`.
fn mac(ns: &NetNs, iface: &str) -> [u8; 6] {
    let text = ns.sh(&["cat", &format!("/sys/class/net/{iface}/address")]);
    let mut out = [0u8; 6];
    for (b, h) in out.iter_mut().zip(text.trim().split(':')) {
        *b = u8::from_str_radix(h, 16).expect("MAC");
    }
    out
}

/// The next sequence number a socket sends (its `write_seq`, read in repair mode: all its
/// data is sent and acknowledged here, so it is also `snd_nxt` and its peer's `rcv_nxt`).
fn next_seq(s: &TcpStream) -> u32 {
    const TCP_REPAIR: i32 = 19;
    const TCP_REPAIR_QUEUE: i32 = 20;
    const TCP_QUEUE_SEQ: i32 = 21;
    const TCP_SEND_QUEUE: i32 = 2;
    const TCP_REPAIR_OFF_NO_WP: i32 = -1;
    let fd = s.as_raw_fd();
    let set = |opt: i32, v: i32| {
        // SAFETY: a valid socket and an `int` option value.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&raw const v).cast(),
                std::mem::size_of::<i32>() as u32,
            )
        };
        assert_eq!(
            rc,
            0,
            "setsockopt {opt}: {}",
            std::io::Error::last_os_error()
        );
    };
    set(TCP_REPAIR, 1);
    set(TCP_REPAIR_QUEUE, TCP_SEND_QUEUE);
    let mut seq: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as u32;
    // SAFETY: a valid socket and a correctly sized output buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            TCP_QUEUE_SEQ,
            (&raw mut seq).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error());
    set(TCP_REPAIR, TCP_REPAIR_OFF_NO_WP);
    seq
}

/// Sends, from the client's namespace, a RST that claims to come from client socket `c` with
/// sequence number `seq`.
fn inject_rst(link: &Link, c: &TcpStream, seq: u32) {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) =
        (c.local_addr().expect("local"), c.peer_addr().expect("peer"))
    else {
        panic!("IPv4 sockets expected");
    };
    let mut spec = FrameSpec::tcp_v4(
        src.ip().octets(),
        dst.ip().octets(),
        (src.port(), dst.port()),
        0x04,
    );
    spec.upper = Upper::Tcp {
        flags: 0x04,
        seq,
        ack: 0,
    };
    spec.src_mac = mac(&link.client, &link.client_if);
    spec.dst_mac = mac(&link.server, &link.server_if);
    let frame = spec.build();
    let iface = link.client_if.clone();
    link.client
        .enter(move || common::send_raw_frames(&iface, &[frame]));
}

/// Opens `n` IPv4 connections to `listener`; returns (client, server) socket pairs.
fn open(link: &Link, listener: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream)> {
    let addr = listener.local_addr().expect("listener address");
    (0..n)
        .map(|_| {
            let c = link.client.enter(move || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect")
            });
            let (s, _) = listener.accept().expect("accept");
            (c, s)
        })
        .collect()
}

/// Sends `bytes` from `a` and reads them at `b`.
fn exchange(a: &mut TcpStream, b: &mut TcpStream, bytes: usize) {
    a.write_all(&vec![7u8; bytes]).expect("write");
    let mut buf = vec![0u8; bytes];
    b.read_exact(&mut buf).expect("read");
}

/// RFC 5961 §3.2, as Linux applies it: a RST in the window but not at the expected sequence
/// number gets a challenge ACK and leaves the connection up; one outside the window is
/// dropped; only the exact one closes. The tracker keeps exactly the connections `ss` keeps.
#[test]
fn only_an_exact_rst_closes_a_connection() {
    common::require_root();
    let link = Link::new();
    let mut agent = Agent::start(&link.server, &["--iface", &link.server_if]);
    agent.wait_for("tracking");
    let listener = link.server.enter({
        let addr = format!("{}:9300", link.server_v4());
        move || TcpListener::bind(addr).expect("bind")
    });
    let mut conns = open(&link, &listener, 3);
    for (c, s) in &mut conns {
        exchange(c, s, 3000);
        exchange(s, c, 2000);
    }
    agree("open", &link, &agent);
    // Let every delayed ACK go out: the server's ACK must cover all the client sent.
    thread::sleep(Duration::from_millis(300));
    let before = counters(&agent);
    let tcp_before = link.server.tcp_counters();
    let seqs: Vec<u32> = conns.iter().map(|(c, _)| next_seq(c)).collect();
    // In the window, 1000 past the expected number: a challenge ACK.
    inject_rst(&link, &conns[0].0, seqs[0].wrapping_add(1000));
    // Half the sequence space away: outside any window.
    inject_rst(&link, &conns[1].0, seqs[1].wrapping_add(0x7fff_0000));
    // Exactly the expected number: the server's socket is reset.
    inject_rst(&link, &conns[2].0, seqs[2]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while link
        .server
        .tcp_counters()
        .delta(&tcp_before, "TcpExt.TCPChallengeACK")
        < 1
        || ss_states(&link.server).len() != 2
    {
        assert!(Instant::now() < deadline, "Linux never took the RSTs");
        thread::sleep(Duration::from_millis(20));
    }
    // The reset server socket's peer learns of it when it next sends: the server's stack
    // answers with a RST of its own.
    let (mut gone, _) = conns.pop().expect("third connection");
    let _ = gone.write_all(b"anyone there?");
    agree("after the injected RSTs", &link, &agent);
    let server = ss_states(&link.server);
    assert_eq!(server.len(), 2, "{server:?}");
    assert!(server.values().all(|s| s == "ESTAB"), "{server:?}");
    let after = counters(&agent);
    assert_eq!(grew(&before, &after, "invalid_rst_in_window"), 1);
    assert_eq!(grew(&before, &after, "invalid_rst"), 1);
    assert_eq!(grew(&before, &after, "closed_by_rst"), 1);
    // The survivors still carry data, and close normally.
    for (c, s) in &mut conns {
        exchange(c, s, 100);
        exchange(s, c, 100);
    }
    drop(conns);
    drop(listener);
}

/// Linux keeps CLOSE-WAIT as long as the application keeps its socket, whatever the idle
/// time; an orphaned FIN-WAIT-2 ends after `tcp_fin_timeout`. With a closing timeout of 2 s
/// and a FIN-WAIT-2 timeout equal to the client namespace's `tcp_fin_timeout` (3 s), the
/// tracker follows both: the server's CLOSE-WAIT stays, the client's FIN-WAIT-2 ends when
/// Linux's does (within one reaper walk).
#[test]
fn close_wait_stays_and_an_orphaned_fin_wait_2_ends_with_linux() {
    common::require_root();
    let link = Link::new();
    link.client
        .sh(&["sysctl", "-qw", "net.ipv4.tcp_fin_timeout=3"]);
    let mut agent = Agent::start(
        &link.server,
        &[
            "--iface",
            &link.server_if,
            "--closing-secs",
            "2",
            "--fin-wait2-secs",
            "3",
        ],
    );
    agent.wait_for("tracking");
    let listener = link.server.enter({
        let addr = format!("{}:9301", link.server_v4());
        move || TcpListener::bind(addr).expect("bind")
    });
    let mut conns = open(&link, &listener, 2);
    for (c, s) in &mut conns {
        exchange(c, s, 500);
    }
    // The clients close (orphans: FIN-WAIT-2 once the server's ACK arrives); the servers'
    // application never does (CLOSE-WAIT).
    let servers: Vec<TcpStream> = conns.into_iter().map(|(_, s)| s).collect();
    let fin_wait_2 = Instant::now();
    let count = |ns: &NetNs, state: &str| ss_states(ns).values().filter(|s| *s == state).count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&link.client, "FIN-WAIT-2") < 2 || count(&link.server, "CLOSE-WAIT") < 2 {
        assert!(Instant::now() < deadline, "the clients' FINs never arrived");
        thread::sleep(Duration::from_millis(20));
    }
    agree("closed by the clients", &link, &agent);
    // Linux ends the orphans after tcp_fin_timeout; the tracker within a reaper walk of that.
    let deadline = Instant::now() + Duration::from_secs(15);
    while count(&link.client, "FIN-WAIT-2") > 0 {
        assert!(Instant::now() < deadline, "Linux kept FIN-WAIT-2");
        thread::sleep(Duration::from_millis(50));
    }
    let linux_ended = fin_wait_2.elapsed();
    agree("FIN-WAIT-2 ended", &link, &agent);
    assert!(
        fin_wait_2.elapsed() < linux_ended + Duration::from_millis(2500),
        "the tracker's FIN-WAIT-2 outlived Linux's by more than a reaper walk"
    );
    // Well past the 2 s closing timeout, CLOSE-WAIT is still there, on both sides.
    thread::sleep(Duration::from_secs(3));
    agree("CLOSE-WAIT past the closing timeout", &link, &agent);
    assert_eq!(count(&link.server, "CLOSE-WAIT"), 2);
    assert_eq!(tracker_states(&agent, "local").len(), 2);
    drop(servers);
    drop(listener);
}

/// Applies an nft ruleset in `ns`.
fn nft(ns: &NetNs, rules: &str) {
    let mut child = ns
        .command("nft")
        .arg("-f")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .expect("nft rules");
    assert!(child.wait().expect("nft").success(), "nft -f: {rules}");
}

/// SYN-ACKs dropped at the client: the server retransmits them (on its timer and on the
/// client's repeated SYN), and `tcpscope_synack_retransmits_total` counts exactly the
/// retransmissions the server's stack counts (`TcpExtTCPSynRetrans`: the server namespace
/// sends no SYN of its own).
#[test]
fn synack_retransmissions_equal_the_servers() {
    common::require_root();
    let link = Link::new();
    let mut agent = Agent::start(&link.server, &["--iface", &link.server_if]);
    agent.wait_for("tracking");
    let listener = link.server.enter({
        let addr = format!("{}:9302", link.server_v4());
        move || TcpListener::bind(addr).expect("bind")
    });
    let addr = listener.local_addr().expect("address");
    nft(
        &link.client,
        "table inet tcpscope_test {\n chain input {\n type filter hook input priority 0;\n \
         tcp sport 9302 tcp flags & (syn | ack) == syn | ack drop\n }\n}\n",
    );
    let before = counters(&agent);
    let tcp_before = link.server.tcp_counters();
    let connecting = link.client.spawn(move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(15)).expect("connect")
    });
    thread::sleep(Duration::from_millis(2500));
    nft(&link.client, "delete table inet tcpscope_test");
    let mut c = connecting.join().expect("connect thread");
    let (mut s, _) = listener.accept().expect("accept");
    exchange(&mut c, &mut s, 100);
    agree("after the handshake", &link, &agent);
    let after = counters(&agent);
    let wire = link
        .server
        .tcp_counters()
        .delta(&tcp_before, "TcpExt.TCPSynRetrans");
    assert!(wire >= 2, "only {wire} SYN-ACK retransmissions");
    assert_eq!(grew(&before, &after, "synack_retransmits"), wire);
    assert_eq!(grew(&before, &after, "handshakes_completed"), 1);
}
