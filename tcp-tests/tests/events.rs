//! `tcpscope events` against real connections: the agent runs in host mode on the server side
//! of a veth pair, `tcpscope events -o ndjson` reads its ring buffer, and real TCP between the
//! namespaces makes the state changes. Oracles: `ss` in both namespaces, the stacks' own
//! counters, and a tcpdump capture of the agent's interface (the segments the events name as
//! their causes must be there, in that order).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData, RingBuf};
use serde_json::Value;
use tcp_testbed::{
    Link, NetNs, Tcpdump,
    agent::{Agent, EventsReader, agent_binary},
    metrics, set_linger_zero,
};

/// The agent on the server's side of `link`, tracking.
fn agent(link: &Link, args: &[&str]) -> Agent {
    let mut all = vec!["--iface", link.server_if.as_str()];
    all.extend_from_slice(args);
    let mut agent = Agent::start(&link.server, &all);
    agent.wait_for("tracking;");
    agent
}

/// A listener in the server's namespace on `addr`.
fn listen(link: &Link, addr: SocketAddr) -> TcpListener {
    link.server
        .enter(move || TcpListener::bind(addr).expect("listener"))
}

/// A connection from the client's namespace to `server`, which sends a few bytes and is then
/// closed first by the client; the server reads to the end, waits 300 ms (so that the
/// client's FIN-WAIT-2 is its own step) and closes. Returns the client's address.
fn close_by_client(link: &Link, listener: TcpListener, server: SocketAddr) -> SocketAddr {
    let served = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).expect("read to the client's FIN");
        thread::sleep(Duration::from_millis(300));
        buf.len()
    });
    let client = link.client.enter(move || {
        let mut s = TcpStream::connect(server).expect("connect");
        s.write_all(b"hello").expect("write");
        thread::sleep(Duration::from_millis(100));
        s.local_addr().expect("local address")
    });
    assert_eq!(served.join().expect("server thread"), 5);
    client
}

/// `(old, new)` of each change of `endpoint` (facing `peer`), in stream order.
fn steps(events: &[Value], endpoint: &str, peer: &str) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["endpoint"] == endpoint && e["peer"] == peer)
        .map(|e| (s(&e["old"]), s(&e["new"])))
        .collect()
}

fn s(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_owned()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

/// Whether `events` hold a change of `endpoint` from `old` to `new`.
fn has(events: &[Value], endpoint: &str, old: &str, new: &str) -> bool {
    events
        .iter()
        .any(|e| e["endpoint"] == endpoint && e["old"] == old && e["new"] == new)
}

/// The stream's order is the kernel's clock order, and the wall-clock times follow it.
fn times_non_decreasing(events: &[Value]) {
    let mono: Vec<u64> = events
        .iter()
        .map(|e| e["monotonic_ns"].as_u64().expect("monotonic_ns"))
        .collect();
    assert!(
        mono.windows(2).all(|w| w[0] <= w[1]),
        "monotonic times decrease: {mono:?}"
    );
    // RFC 3339 in UTC with nine digits: text order is time order.
    let wall: Vec<String> = events.iter().map(|e| s(&e["time"])).collect();
    assert!(
        wall.iter().all(|t| t.len() == 30 && t.ends_with('Z')),
        "{wall:?}"
    );
    assert!(
        wall.windows(2).all(|w| w[0] <= w[1]),
        "wall-clock times decrease: {wall:?}"
    );
}

/// `(local, peer)` → state of the TCP sockets of a namespace (listeners left out).
fn ss_sockets(ns: &NetNs) -> Vec<(String, String, String)> {
    ns.sh(&["ss", "-Htan"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (state, local, peer) = (*f.first()?, *f.get(3)?, *f.get(4)?);
            (state != "LISTEN").then(|| (state.to_owned(), local.to_owned(), peer.to_owned()))
        })
        .collect()
}

/// The segments of a capture, in order: (sender `address:port`, tcpdump's flags such as `S.`).
fn captured_segments(file: &Path) -> Vec<(String, String)> {
    // -Z root: Debian's tcpdump otherwise drops to its own user, which the VM guest lacks.
    let out = Command::new("tcpdump")
        .args(["-Z", "root", "-nn", "-r"])
        .arg(file)
        .arg("tcp")
        .output()
        .expect("run tcpdump -r");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "12:00:00.000000 IP 10.1.0.1.43210 > 10.1.0.2.8080: Flags [S], seq …"
            let words: Vec<&str> = l.split_whitespace().collect();
            let src = *words.get(2)?;
            let flags = l.split_once("Flags [")?.1.split_once(']')?.0;
            let (addr, port) = src.rsplit_once('.')?;
            let sender = if addr.contains(':') {
                format!("[{addr}]:{port}")
            } else {
                format!("{addr}:{port}")
            };
            Some((sender, flags.to_owned()))
        })
        .collect()
}

/// An event's flags (`FIN|ACK`) as tcpdump prints them (`F.`).
fn tcpdump_flags(flags: &str) -> String {
    let has = |f: &str| flags.split('|').any(|x| x == f);
    [
        ("FIN", "F"),
        ("SYN", "S"),
        ("RST", "R"),
        ("PSH", "P"),
        ("ACK", "."),
    ]
    .iter()
    .filter(|(name, _)| has(name))
    .map(|(_, c)| *c)
    .collect()
}

/// The segments the events name as their causes, one per record (both endpoints' changes of
/// one segment share its time), in stream order: (sender, tcpdump flags).
fn causes(events: &[Value]) -> Vec<(String, String)> {
    let mut out: Vec<(u64, (String, String))> = Vec::new();
    for e in events.iter().filter(|e| e["cause"] == "segment") {
        let t = e["monotonic_ns"].as_u64().expect("time");
        if out.last().is_some_and(|(last, _)| *last == t) {
            continue;
        }
        let sender = if e["sent"] == true {
            s(&e["endpoint"])
        } else {
            s(&e["peer"])
        };
        out.push((t, (sender, tcpdump_flags(&s(&e["flags"])))));
    }
    out.into_iter().map(|(_, c)| c).collect()
}

/// Whether `want` occurs in `all` in order (not necessarily next to each other).
fn in_order(want: &[(String, String)], all: &[(String, String)]) -> bool {
    let mut it = all.iter();
    want.iter().all(|w| it.any(|a| a == w))
}

/// The reader flag pinned under an agent's `pin_dir`, read directly from the map.
fn reader_flag(pin_dir: &Path) -> u32 {
    let path = tcp_user::pins::layout_dir(pin_dir).join("EVENTS_READER");
    let map = MapData::from_pin(&path).expect("the pinned reader flag");
    Array::<MapData, u32>::try_from(Map::Array(map))
        .expect("an array")
        .get(&0, 0)
        .expect("read the flag")
}

/// The pinned ring buffer of an agent, opened as its consumer (only while no reader is).
fn ring(pin_dir: &Path) -> RingBuf<MapData> {
    let path = tcp_user::pins::layout_dir(pin_dir).join("EVENTS");
    let map = MapData::from_pin(&path).expect("the pinned ring buffer");
    RingBuf::try_from(Map::RingBuf(map)).expect("a ring buffer")
}

#[test]
fn an_active_close_goes_through_rfc_793_on_both_ends_in_order() {
    tcp_testbed::require_root();
    let link = Link::new();
    let agent = agent(&link, &["--time-wait-secs", "2"]);
    let tcpdump = Tcpdump::start(&link.server, &["-i", &link.server_if]);
    let (server, _) = link.server_addrs(8101);
    let mut reader = EventsReader::start(
        &link.server,
        &agent.pin_dir,
        &["--port", &server.port().to_string()],
    );
    let listener = listen(&link, server);
    let client = close_by_client(&link, listener, server);
    let (c, sv) = (client.to_string(), server.to_string());

    // Linux's view once the close is done: the client's socket in TIME-WAIT, the server's gone.
    let events = reader
        .wait_until(Duration::from_secs(10), |ev| {
            has(ev, &c, "fin_wait_2", "time_wait") && has(ev, &sv, "last_ack", "closed")
        })
        .to_vec();
    let client_ns = ss_sockets(&link.client);
    assert!(
        client_ns.contains(&("TIME-WAIT".to_owned(), c.clone(), sv.clone())),
        "ss in the client's namespace: {client_ns:?}"
    );
    let server_ns = ss_sockets(&link.server);
    assert!(
        !server_ns.iter().any(|(_, l, p)| *l == sv && *p == c),
        "ss in the server's namespace still has the connection: {server_ns:?}"
    );
    assert_eq!(
        steps(&events, &sv, &c),
        pairs(&[
            ("closed", "listen"),
            ("listen", "syn_received"),
            ("syn_received", "established"),
            ("established", "close_wait"),
            ("close_wait", "last_ack"),
            ("last_ack", "closed"),
        ]),
        "the server's changes: {events:#?}"
    );

    // TIME-WAIT ends on the agent's timeout (2 s): the reaper's change.
    let events = reader
        .wait_until(Duration::from_secs(10), |ev| {
            has(ev, &c, "time_wait", "closed")
        })
        .to_vec();
    assert_eq!(
        steps(&events, &c, &sv),
        pairs(&[
            ("closed", "syn_sent"),
            ("syn_sent", "established"),
            ("established", "fin_wait_1"),
            ("fin_wait_1", "fin_wait_2"),
            ("fin_wait_2", "time_wait"),
            ("time_wait", "closed"),
        ]),
        "the client's changes: {events:#?}"
    );
    for e in &events {
        let (role, side) = if e["endpoint"] == c.as_str() {
            ("client", "remote")
        } else {
            ("server", "local")
        };
        assert_eq!(
            (s(&e["role"]).as_str(), s(&e["side"]).as_str()),
            (role, side),
            "{e}"
        );
        assert_eq!(e["family"], "ipv4", "{e}");
    }
    let last = events.last().expect("events");
    assert_eq!(
        (&last["cause"], &last["flags"], &last["sent"]),
        (&Value::from("expired"), &Value::Null, &Value::Null),
        "{last}"
    );
    let fin = events
        .iter()
        .find(|e| e["endpoint"] == c.as_str() && e["new"] == "fin_wait_1")
        .expect("the client's FIN");
    assert_eq!(
        (&fin["sent"], s(&fin["flags"]).contains("FIN")),
        (&Value::Bool(true), true)
    );
    times_non_decreasing(&events);

    // The causes are segments the wire carried, in that order.
    let mut tcpdump = tcpdump;
    tcpdump.stop();
    let wire = captured_segments(&tcpdump.file);
    let named = causes(&events);
    assert_eq!(
        named.len(),
        7,
        "one segment per record, the expiry aside: {named:?}"
    );
    assert!(
        in_order(&named, &wire),
        "the events' segments {named:?}\nare not in the capture in that order: {wire:?}"
    );
    assert!(reader.interrupt(), "tcpscope events exits 0 on SIGINT");
    assert!(
        reader.log.iter().any(|l| l
            == &format!(
                "tcpscope events: {} state changes shown, 0 records lost",
                reader.seen.len()
            )),
        "{:?}",
        reader.log
    );
}

#[test]
fn a_reset_closes_both_ends_at_once_over_ipv6() {
    tcp_testbed::require_root();
    let link = Link::new();
    let agent = agent(&link, &[]);
    let (_, server) = link.server_addrs(8102);
    let mut reader = EventsReader::start(
        &link.server,
        &agent.pin_dir,
        &["--port", &server.port().to_string()],
    );
    let listener = listen(&link, server);
    let (client_before, server_before) = (link.client.tcp_counters(), link.server.tcp_counters());
    let held = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 16];
        // The client's RST ends the read.
        let _ = s.read(&mut buf);
    });
    let client = link.client.enter(move || {
        let s = TcpStream::connect(server).expect("connect");
        thread::sleep(Duration::from_millis(100));
        // SO_LINGER 0: close sends a RST.
        set_linger_zero(&s);
        s.local_addr().expect("local address")
    });
    held.join().expect("server thread");
    let (c, sv) = (client.to_string(), server.to_string());
    let events = reader
        .wait_until(Duration::from_secs(10), |ev| {
            has(ev, &c, "established", "closed") && has(ev, &sv, "established", "closed")
        })
        .to_vec();
    // The stacks: one RST out of the client, one connection reset in the server.
    assert_eq!(
        link.client
            .tcp_counters()
            .delta(&client_before, "Tcp.OutRsts"),
        1
    );
    assert_eq!(
        link.server
            .tcp_counters()
            .delta(&server_before, "Tcp.EstabResets"),
        1
    );
    assert!(
        ss_sockets(&link.server)
            .iter()
            .all(|(_, l, p)| !(*l == sv && *p == c))
    );
    assert_eq!(
        steps(&events, &c, &sv),
        pairs(&[
            ("closed", "syn_sent"),
            ("syn_sent", "established"),
            ("established", "closed"),
        ])
    );
    assert_eq!(
        steps(&events, &sv, &c),
        pairs(&[
            ("closed", "listen"),
            ("listen", "syn_received"),
            ("syn_received", "established"),
            ("established", "closed"),
        ])
    );
    let resets: Vec<&Value> = events.iter().filter(|e| e["new"] == "closed").collect();
    assert_eq!(
        resets[0]["monotonic_ns"], resets[1]["monotonic_ns"],
        "one segment, one record"
    );
    for e in resets {
        assert!(s(&e["flags"]).contains("RST"), "{e}");
        assert_eq!(e["sent"], e["endpoint"] == c.as_str(), "{e}");
        assert_eq!(e["family"], "ipv6");
    }
    times_non_decreasing(&events);
}

#[test]
fn port_and_state_filters_keep_only_what_they_name() {
    tcp_testbed::require_root();
    let link = Link::new();
    let agent = agent(&link, &[]);
    let (watched, _) = link.server_addrs(8103);
    let (other, _) = link.server_addrs(8104);
    // The ss spelling of the state: the filter takes every name the CLI takes.
    let mut reader = EventsReader::start(
        &link.server,
        &agent.pin_dir,
        &["--port", "8103", "--state", "TIME-WAIT"],
    );
    let (l1, l2) = (listen(&link, watched), listen(&link, other));
    let link = std::sync::Arc::new(link);
    let other_close = {
        let link = std::sync::Arc::clone(&link);
        thread::spawn(move || close_by_client(&link, l2, other))
    };
    let client = close_by_client(&link, l1, watched);
    let other_client = other_close.join().expect("other connection");
    let c = client.to_string();
    reader.wait_until(Duration::from_secs(10), |ev| {
        has(ev, &c, "fin_wait_2", "time_wait")
    });
    // Both connections ended in TIME-WAIT on the client's side: ss says so.
    let client_ns = ss_sockets(&link.client);
    for (from, to) in [(client, watched), (other_client, other)] {
        assert!(
            client_ns.contains(&("TIME-WAIT".to_owned(), from.to_string(), to.to_string())),
            "{client_ns:?}"
        );
    }
    // Whatever else arrives (nothing should) within a second of quiet.
    let seen = reader
        .settle(Duration::from_secs(1), Duration::from_secs(5))
        .to_vec();
    assert_eq!(
        seen.len(),
        1,
        "only the watched port's entry into TIME-WAIT: {seen:#?}"
    );
    assert_eq!(
        (s(&seen[0]["endpoint"]), s(&seen[0]["peer"])),
        (c, watched.to_string())
    );
    assert!(reader.interrupt());
    assert!(
        reader
            .log
            .iter()
            .any(|l| l == "tcpscope events: 1 state changes shown, 0 records lost"),
        "{:?}",
        reader.log
    );
}

#[test]
fn the_flag_is_off_without_a_reader_and_a_killed_reader_is_noticed() {
    tcp_testbed::require_root();
    let link = Link::new();
    let mut agent = agent(&link, &[]);
    let pin_dir = agent.pin_dir.clone();
    let (server, _) = link.server_addrs(8105);
    let connection = |link: &Link| {
        let listener = listen(link, server);
        close_by_client(link, listener, server);
    };

    // No reader: the flag is 0 and a whole connection writes nothing into the ring.
    assert_eq!(reader_flag(&pin_dir), 0);
    connection(&link);
    thread::sleep(Duration::from_millis(300));
    assert!(ring(&pin_dir).next().is_none(), "records without a reader");

    // A reader raises it with its pid; a second one is refused in one line, naming it.
    let mut reader = EventsReader::start(&link.server, &pin_dir, &[]);
    assert_eq!(reader_flag(&pin_dir), reader.pid());
    let second = link
        .server
        .command(agent_binary())
        .args(["events", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .expect("second reader");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("another `tcpscope events`") && err.contains(&reader.pid().to_string()),
        "{err}"
    );

    // A state the CLI does not know, and pins no agent holds: one line each, non-zero.
    let bad = Command::new(agent_binary())
        .args(["events", "--state", "half_closed"])
        .output()
        .expect("bad state");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.lines()
            .next()
            .is_some_and(|l| l.contains("unknown state \"half_closed\"")
                && l.contains("time_wait")
                && l.contains("syn_received")),
        "{err}"
    );
    let nowhere = format!("/sys/fs/bpf/{}", tcp_testbed::unique("tcpscope-none-"));
    let none = Command::new(agent_binary())
        .args(["events", "--pin-dir", &nowhere])
        .output()
        .expect("no agent");
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(!none.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no tcpscope agent is running"), "{err}");

    // SIGKILL: it cannot lower the flag; the agent notices within a few seconds.
    let pid = reader.pid();
    reader.sigkill();
    assert_eq!(reader_flag(&pin_dir), pid, "nobody lowered it yet");
    let deadline = Instant::now() + Duration::from_secs(5);
    while reader_flag(&pin_dir) != 0 {
        assert!(
            Instant::now() < deadline,
            "the agent never cleared the flag of a dead reader"
        );
        thread::sleep(Duration::from_millis(100));
    }
    agent.wait_for(&format!("reader (pid {pid}) is gone"));
    // From then on, nothing is written again.
    let mut ring = ring(&pin_dir);
    while ring.next().is_some() {}
    connection(&link);
    thread::sleep(Duration::from_millis(300));
    assert!(ring.next().is_none(), "records after the flag was cleared");
}

#[test]
fn a_full_ring_counts_its_losses_and_the_reader_reports_them() {
    tcp_testbed::require_root();
    let link = Link::new();
    let agent = agent(&link, &[]);
    let (server, _) = link.server_addrs(8106);
    let mut reader = EventsReader::start(&link.server, &agent.pin_dir, &[]);
    // Stopped, it reads nothing: 256 KiB hold ~3,600 records, a connection writes 7.
    reader.signal(libc::SIGSTOP);
    const CONNECTIONS: usize = 1500;
    let listener = listen(&link, server);
    let served = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
    });
    link.client.enter(move || {
        for _ in 0..CONNECTIONS {
            let mut s = TcpStream::connect(server).expect("connect");
            s.write_all(b"x").expect("write");
        }
    });
    served.join().expect("server");
    thread::sleep(Duration::from_millis(500));
    let lost = metrics::sample(&metrics::scrape(&link.server), "tcpscope_events_lost_total");
    assert!(lost > 0.0, "no loss counted with a stopped reader");
    reader.signal(libc::SIGCONT);
    let line = reader.wait_log("records of state changes lost", Duration::from_secs(5));
    assert!(
        line.contains(&format!("{lost} lost since it started")),
        "{line}"
    );
    // What it could read: whole connections' records, the ring's worth.
    reader.settle(Duration::from_millis(500), Duration::from_secs(20));
    assert!(reader.interrupt());
    let summary = reader.log.last().expect("summary").clone();
    assert_eq!(
        summary,
        format!(
            "tcpscope events: {} state changes shown, {lost} records lost",
            reader.seen.len()
        )
    );
    assert!(reader.seen.len() > 1000, "{summary}");
}
