//! Tier 3: the parts of TCP's life cycle past open and close, against Linux in namespaces.
//! The agent runs in host mode on the server side of a veth pair; each behaviour is forced
//! with socket options, sysctls of the namespace, nft rules that drop chosen segments, and
//! crafted segments injected on the client's side; `ss` and the namespaces' own TCP counters
//! are the oracle. Each test also records the agent's interface with tcpdump and ends by
//! replaying the recording: `tcpscope replay` must count what the kernel counted live.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcp_common::frames::{FrameSpec, Upper};
use tcp_testbed::{Link, NetNs, Tcpdump, agent::Agent};

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

/// The agent's interface recorded for the whole test (tcpdump in the server's namespace, on
/// the interface the agent attaches to), so that the test ends by replaying it: `tcpscope
/// replay` runs tcp-common's state machine in userspace over the same segments, with the
/// agent's timeouts, and must count what the kernel counted live.
struct Recording {
    tcpdump: Tcpdump,
    /// The agent's timeout flags and their values, for replay.
    timeouts: Vec<String>,
}

/// Starts the recording, then the agent on the server's side with `--iface` and `args`.
fn recorded_agent(link: &Link, args: &[&str]) -> (Agent, Recording) {
    let tcpdump = Tcpdump::start(&link.server, &["-i", &link.server_if]);
    let timeouts = args
        .windows(2)
        .filter(|w| w[0].ends_with("-secs"))
        .flat_map(|w| w.iter().map(|s| (*s).to_owned()))
        .collect();
    let mut all = vec!["--iface", link.server_if.as_str()];
    all.extend_from_slice(args);
    let mut agent = Agent::start(&link.server, &all);
    agent.wait_for("tracking");
    (agent, Recording { tcpdump, timeouts })
}

impl Recording {
    /// Ends the recording and replays it: every tally the kernel keeps per segment, and those
    /// the reaper adds when records expire, must equal replay's. Not compared: the
    /// silent-server mark (the agent's view walk; replay has no walk) and replay's own
    /// `syn_without_synack`.
    fn replays_as_live(mut self, link: &Link, agent: &Agent) {
        // A last frame brings the capture's clock, which replay runs on, to now: a UDP
        // datagram to a closed port (and its ICMP answer). Replay then expires what the
        // reaper has expired by now.
        link.client.enter({
            let to = format!("{}:9", link.server_v4());
            move || {
                let udp = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
                udp.send_to(b"end", to).expect("send");
            }
        });
        thread::sleep(Duration::from_millis(1500));
        let live = counters(agent);
        self.tcpdump.stop();
        let mut args = vec![
            "replay".to_owned(),
            "--format".to_owned(),
            "json".to_owned(),
        ];
        args.extend(self.timeouts.iter().cloned());
        args.push(self.tcpdump.file.to_str().expect("path").to_owned());
        let replayed = tcp_testbed::agent::tcpscope_json(&args)["counters"].clone();
        // Per-side tallies: replay cannot tell sides (it sees no local addresses): totals.
        let total = |v: &Value| match v {
            Value::Array(a) => a.iter().map(|n| n.as_u64().expect("count")).sum(),
            n => n.as_u64().expect("count"),
        };
        let mut compared = 0;
        for (key, value) in live.as_object().expect("counters") {
            if matches!(key.as_str(), "silent_servers" | "syn_without_synack")
                || !value.is_number() && !value.is_array()
            {
                continue;
            }
            let Some(theirs) = replayed.get(key) else {
                continue;
            };
            assert_eq!(
                total(value),
                total(theirs),
                "{key}: live vs replay of the capture"
            );
            compared += 1;
        }
        assert!(compared >= 20, "only {compared} tallies compared");
        // Per port (replay keeps them only when any).
        for key in ["unanswered_syns", "accept_queue_overflows"] {
            let mine = prom_ports(link, key);
            let theirs: BTreeMap<String, u64> = replayed
                .get(key)
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(p, n)| (p.clone(), n.as_u64().expect("n")))
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(
                mine, theirs,
                "{key} per port: live vs replay of the capture"
            );
        }
    }
}

/// `tcpscope_{key}_total{port}` of the agent's `/metrics`, by port (zeros left out).
fn prom_ports(link: &Link, key: &str) -> BTreeMap<String, u64> {
    let prefix = format!("tcpscope_{key}_total{{port=\"");
    tcp_testbed::metrics::scrape(&link.server)
        .into_iter()
        .filter_map(|(series, n)| {
            let port = series.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            (n > 0.0).then(|| (port.to_owned(), n as u64))
        })
        .collect()
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
        .enter(move || tcp_testbed::send_raw_frames(&iface, &[frame]));
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
    tcp_testbed::require_root();
    let link = Link::new();
    let (agent, rec) = recorded_agent(&link, &[]);
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
    rec.replays_as_live(&link, &agent);
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
    tcp_testbed::require_root();
    let link = Link::new();
    link.client
        .sh(&["sysctl", "-qw", "net.ipv4.tcp_fin_timeout=3"]);
    let (agent, rec) = recorded_agent(&link, &["--closing-secs", "2", "--fin-wait2-secs", "3"]);
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
    // `tcpscope flows` filters apply to one endpoint: the local endpoints on the port are in
    // CLOSE-WAIT, no remote one is.
    let listed = |args: &[&str]| {
        let mut all = vec!["flows", "-o", "json", "--port", "9301"];
        all.extend_from_slice(args);
        agent.json(&all).as_array().expect("flows").len()
    };
    assert_eq!(listed(&["--state", "close-wait", "--side", "local"]), 2);
    assert_eq!(listed(&["--state", "close-wait", "--side", "remote"]), 0);
    assert_eq!(listed(&["--addr", &link.server_v4(), "--side", "local"]), 2);
    assert_eq!(
        listed(&["--addr", &link.server_v4(), "--side", "remote"]),
        0
    );
    let ndjson = tcp_testbed::run(&[
        tcp_testbed::agent::agent_binary()
            .to_str()
            .expect("agent path"),
        "flows",
        "-o",
        "ndjson",
        "--port",
        "9301",
        "--pin-dir",
        agent.pin_dir.to_str().expect("pin dir"),
    ]);
    let lines: Vec<Value> = String::from_utf8_lossy(&ndjson.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2);
    rec.replays_as_live(&link, &agent);
    drop(servers);
    drop(listener);
}

/// SYN-ACKs dropped at the client: the server retransmits them (on its timer and on the
/// client's repeated SYN), and `tcpscope_synack_retransmits_total` counts exactly the
/// retransmissions the server's stack counts (`TcpExtTCPSynRetrans`: the server namespace
/// sends no SYN of its own).
#[test]
fn synack_retransmissions_equal_the_servers() {
    tcp_testbed::require_root();
    let link = Link::new();
    let (agent, rec) = recorded_agent(&link, &[]);
    let listener = link.server.enter({
        let addr = format!("{}:9302", link.server_v4());
        move || TcpListener::bind(addr).expect("bind")
    });
    let addr = listener.local_addr().expect("address");
    tcp_testbed::nft(
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
    tcp_testbed::nft(&link.client, "delete table inet tcpscope_test");
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
    rec.replays_as_live(&link, &agent);
}

/// Sets an `int` socket option.
fn set_int(s: &TcpStream, level: i32, opt: i32, v: i32) {
    // SAFETY: a valid socket and an `int` option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            (&raw const v).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt {level}/{opt}: {}",
        std::io::Error::last_os_error()
    );
}

/// Keepalive with TCP_KEEPIDLE/INTVL/CNT of 1 s, 1 s and 3 on the server's socket: while the
/// client answers, the tracker's probes (side local) equal what the server's stack counts
/// (`TcpExtTCPKeepAlive`) and every one is answered; with the client black-holed, the server
/// gives up after three probes with a RST, counted as a close by keepalive.
#[test]
fn keepalive_probes_answers_and_the_abort_equal_linux() {
    tcp_testbed::require_root();
    let link = Link::new();
    let (agent, rec) = recorded_agent(&link, &[]);
    let listener = link.server.enter({
        let addr = format!("{}:9303", link.server_v4());
        move || TcpListener::bind(addr).expect("bind")
    });
    let mut conns = open(&link, &listener, 1);
    let (c, s) = &mut conns[0];
    exchange(c, s, 1000);
    exchange(s, c, 1000);
    let probes = |v: &Value| v["keepalive_probes"][1].as_u64().expect("local probes");
    let acks = |v: &Value| v["keepalive_acks"][1].as_u64().expect("local answers");
    let before = counters(&agent);
    let tcp_before = link.server.tcp_counters();
    set_int(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1);
    set_int(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
    set_int(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    set_int(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    // Answered probes: wait for three.
    let deadline = Instant::now() + Duration::from_secs(15);
    while acks(&counters(&agent)) - acks(&before) < 3 {
        assert!(Instant::now() < deadline, "no answered probes seen");
        thread::sleep(Duration::from_millis(100));
    }
    agree("probes answered", &link, &agent);
    // The client black-holed: Linux sends exactly TCP_KEEPCNT (3) unanswered probes, then
    // its RST.
    tcp_testbed::nft(
        &link.client,
        "table inet tcpscope_test {\n chain input {\n type filter hook input priority 0;\n \
         tcp sport 9303 drop\n }\n}\n",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ss_states(&link.server).is_empty() {
        assert!(
            Instant::now() < deadline,
            "Linux never gave up on the probes"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let after = counters(&agent);
    let wire = link
        .server
        .tcp_counters()
        .delta(&tcp_before, "TcpExt.TCPKeepAlive");
    assert!(wire >= 6, "{wire} probes");
    assert_eq!(probes(&after) - probes(&before), wire, "probes");
    assert_eq!(acks(&after) - acks(&before), wire - 3, "answered probes");
    assert_eq!(grew(&before, &after, "closed_by_keepalive"), 1);
    assert_eq!(grew(&before, &after, "closed_by_rst"), 0);
    // `tcpscope flows` shows them per endpoint (the closed record stays --closed-secs).
    let per_flow: Vec<u64> = agent
        .flows()
        .iter()
        .flat_map(|f| f["endpoints"].as_array().expect("endpoints").clone())
        .filter(|e| e["side"] == "local")
        .map(|e| e["keepalive_probes"].as_u64().expect("keepalive_probes"))
        .collect();
    assert_eq!(per_flow, vec![wire]);
    // The tracker shows the server's endpoint gone, as `ss` does.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tracker_states(&agent, "local").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the tracker kept the server's endpoint"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // The exporter's series.
    let text = tcp_testbed::run(&[
        tcp_testbed::agent::agent_binary()
            .to_str()
            .expect("agent path"),
        "stats",
        "--pin-dir",
        agent.pin_dir.to_str().expect("pin dir"),
    ]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(r#"tcpscope_closes_total{reason="keepalive"} 1"#),
        "{text}"
    );
    rec.replays_as_live(&link, &agent);
    drop(conns);
}

/// `--ports`: the per-port gauges (`tcpscope_port_endpoints{port,state,side}`) equal `ss`
/// filtered by port, for the ports watched and no other; and the age of the oldest
/// CLOSE-WAIT endpoint grows with the time it stays (a leak shows).
#[test]
fn per_port_view_equals_ss_by_port_and_the_oldest_close_wait_ages() {
    use tcp_testbed::metrics as prom;
    tcp_testbed::require_root();
    let link = Link::new();
    let (agent, rec) = recorded_agent(&link, &["--ports", "9305,9306"]);
    let listen = |port: u16| {
        link.server.enter({
            let addr = format!("{}:{port}", link.server_v4());
            move || TcpListener::bind(addr).expect("bind")
        })
    };
    let (l5, l6, l7) = (listen(9305), listen(9306), listen(9307));
    // 9305: two closed by the server first (TIME-WAIT on the server), two by the client only
    // (CLOSE-WAIT on the server); 9306: three open; 9307 (not watched): one CLOSE-WAIT.
    let mut kept = Vec::new();
    for (i, (mut c, s)) in open(&link, &l5, 4).into_iter().enumerate() {
        if i < 2 {
            drop(s);
            let mut buf = Vec::new();
            c.read_to_end(&mut buf).expect("EOF");
        } else {
            kept.push(s);
        }
    }
    let open6 = open(&link, &l6, 3);
    let (c7, s7) = open(&link, &l7, 1).pop().expect("9307");
    drop(c7);
    kept.push(s7);
    let count = |port: u16, state: &str| {
        ss_states(&link.server)
            .iter()
            .filter(|((local, _), s)| local.ends_with(&format!(":{port}")) && *s == state)
            .count() as f64
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let samples = prom::scrape(&link.server);
        let view = |port: u16, state: &str, side: &str| {
            prom::sum(
                &samples,
                "tcpscope_port_endpoints",
                &[
                    &format!("port=\"{port}\""),
                    &format!("state=\"{state}\""),
                    &format!("side=\"{side}\""),
                ],
            )
        };
        let want = [
            (9305, "TIME-WAIT", "time_wait", 2.0),
            (9305, "CLOSE-WAIT", "close_wait", 2.0),
            (9305, "ESTAB", "established", 0.0),
            (9306, "ESTAB", "established", 3.0),
            (9306, "TIME-WAIT", "time_wait", 0.0),
        ];
        let got: Vec<(f64, f64)> = want
            .iter()
            .map(|(port, ss, state, _)| (view(*port, state, "local"), count(*port, ss)))
            .collect();
        let expected: Vec<(f64, f64)> = want.iter().map(|w| (w.3, w.3)).collect();
        let unwatched = prom::sum(&samples, "tcpscope_port_endpoints", &["port=\"9307\""]);
        let remote = prom::sum(&samples, "tcpscope_port_endpoints", &["side=\"remote\""]);
        if got == expected && unwatched == 0.0 && remote == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "per-port view vs ss (view, ss): {got:?}, unwatched {unwatched}, remote {remote}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    // The oldest CLOSE-WAIT (idle since the clients' FINs) ages with the wall clock.
    let oldest = || {
        prom::sample(
            &prom::scrape(&link.server),
            r#"tcpscope_oldest_endpoint_seconds{side="local",state="close_wait"}"#,
        )
    };
    let first = oldest();
    thread::sleep(Duration::from_secs(3));
    let later = oldest();
    assert!(first > 0.0, "{first}");
    assert!(
        (1.5..=4.5).contains(&(later - first)),
        "the oldest CLOSE-WAIT went from {first} s to {later} s in 3 s"
    );
    rec.replays_as_live(&link, &agent);
    drop((kept, open6, l5, l6, l7));
}

/// An IPv4 TCP socket with the `int` option `(level, name)` set to 1, and `addr` as the
/// kernel takes it.
fn tcp4_socket(addr: SocketAddr, option: (i32, i32)) -> (std::os::fd::OwnedFd, libc::sockaddr_in) {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 expected")
    };
    // SAFETY: a new socket, owned from here on; the option value is a live `int`.
    let fd = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from_raw_fd(fd)
    };
    let one: i32 = 1;
    // SAFETY: as above.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            option.0,
            option.1,
            (&raw const one).cast(),
            4,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    (fd, sa)
}

const SOCKADDR_IN_LEN: u32 = std::mem::size_of::<libc::sockaddr_in>() as u32;

/// A listening socket on `addr` with this accept backlog (std's is 128).
fn listen_backlog(addr: SocketAddr, backlog: i32) -> TcpListener {
    let (fd, sa) = tcp4_socket(addr, (libc::SOL_SOCKET, libc::SO_REUSEADDR));
    // SAFETY: a socket this function owns and a correctly sized address.
    unsafe {
        let rc = libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), SOCKADDR_IN_LEN);
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd.as_raw_fd(), backlog), 0, "listen");
    }
    TcpListener::from(fd)
}

/// Connects to `addr` with TCP_SYNCNT = 1 (one SYN retransmission, then ETIMEDOUT after
/// ~3 s); whether it connected.
fn connect_giving_up_early(addr: SocketAddr) -> bool {
    let (fd, sa) = tcp4_socket(addr, (libc::IPPROTO_TCP, libc::TCP_SYNCNT));
    // SAFETY: a socket this function owns (closed on return) and a correctly sized address.
    unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), SOCKADDR_IN_LEN) == 0 }
}

/// `listen(fd, 1)` and no accept(): once two connections fill the accept queue, Linux drops
/// every new SYN (`TcpExtListenOverflows`), the clients retransmit into silence and give up.
/// `tcpscope_unanswered_syns_total{port}` counts exactly those SYNs, first and retransmitted
/// (the server's overflow count, and the clients' SYNs: one each plus their retransmissions);
/// an accepting server on another port has none.
#[test]
fn a_full_accept_queue_shows_as_unanswered_syns() {
    use tcp_testbed::metrics as prom;
    tcp_testbed::require_root();
    let link = Link::new();
    let (agent, rec) = recorded_agent(&link, &["--half-open-secs", "2"]);
    let full: SocketAddr = format!("{}:9307", link.server_v4()).parse().expect("addr");
    let fine: SocketAddr = format!("{}:9308", link.server_v4()).parse().expect("addr");
    let backlog_1 = link.server.enter(move || listen_backlog(full, 1));
    let accepting = link.server.enter(move || listen_backlog(fine, 128));
    let accepted: Vec<TcpStream> = {
        let clients = link.client.enter(move || {
            (0..5)
                .map(|_| {
                    TcpStream::connect_timeout(&fine, Duration::from_secs(5)).expect("connect")
                })
                .collect::<Vec<_>>()
        });
        for _ in 0..5 {
            accepting.accept().expect("accept");
        }
        clients
    };
    // Two connections fill the queue of `listen(fd, 1)` (it holds backlog + 1).
    let queued = link.client.enter(move || {
        (0..2)
            .map(|_| TcpStream::connect_timeout(&full, Duration::from_secs(5)).expect("connect"))
            .collect::<Vec<_>>()
    });
    let server_before = link.server.tcp_counters();
    let client_before = link.client.tcp_counters();
    const CLIENTS: u64 = 18;
    let attempts: Vec<_> = (0..CLIENTS)
        .map(|_| link.client.spawn(move || connect_giving_up_early(full)))
        .collect();
    for a in attempts {
        assert!(
            !a.join().expect("client"),
            "a connection got through a full queue"
        );
    }
    let overflows = link
        .server
        .tcp_counters()
        .delta(&server_before, "TcpExt.ListenOverflows");
    let retransmitted = link
        .client
        .tcp_counters()
        .delta(&client_before, "TcpExt.TCPSynRetrans");
    assert_eq!(overflows, CLIENTS + retransmitted, "every SYN was dropped");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let samples = prom::scrape(&link.server);
        let got = prom::sample(&samples, r#"tcpscope_unanswered_syns_total{port="9307"}"#);
        let control = prom::sample(&samples, r#"tcpscope_unanswered_syns_total{port="9308"}"#);
        if got == overflows as f64 {
            assert_eq!(control, 0.0, "the accepting server's port");
            break;
        }
        assert!(
            Instant::now() < deadline && got <= overflows as f64,
            "unanswered SYNs {got}, Linux dropped {overflows}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    rec.replays_as_live(&link, &agent);
    drop((queued, accepted, backlog_1, accepting));
}

/// Handshakes in flight when the accept queue fills: `listen(fd, 8)`, no accept(), eight
/// connections queued (it holds nine), then eight connects whose final ACKs the client's nft
/// drops (eight SYN-RECV); then the ACKs pass again, answering the listener's retransmitted
/// SYN-ACKs: the first takes the one slot, and the listener ignores the others (it sends its
/// SYN-ACK again) or, with
/// `tcp_abort_on_overflow=1`, resets them. Either way `tcpscope_accept_queue_overflows_total`
/// counts those connections, once each: the listener's sockets left in SYN-RECV (`ss`), or
/// the resets it sent (`TcpExtEmbryonicRsts`); and the tracker's endpoints equal `ss`'s.
#[test]
fn ignored_or_reset_final_acks_are_accept_queue_overflows() {
    use tcp_testbed::metrics as prom;
    tcp_testbed::require_root();
    for abort in [false, true] {
        let link = Link::new();
        if abort {
            link.server
                .sh(&["sysctl", "-qw", "net.ipv4.tcp_abort_on_overflow=1"]);
        }
        let (agent, rec) = recorded_agent(&link, &[]);
        let addr: SocketAddr = format!("{}:9309", link.server_v4()).parse().expect("addr");
        let listener = link.server.enter(move || listen_backlog(addr, 8));
        let first: Vec<TcpStream> = link.client.enter(move || {
            (0..8)
                .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("c"))
                .collect()
        });
        tcp_testbed::nft(
            &link.client,
            "table inet tcpscope_test {\n chain output {\n type filter hook output priority 0;\n \
             tcp dport 9309 tcp flags & (syn | ack | fin | rst) == ack drop\n }\n}\n",
        );
        let before = link.server.tcp_counters();
        let clients: Vec<_> = (0..8)
            .map(|_| {
                link.client
                    .spawn(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)).ok())
            })
            .collect();
        // Every SYN answered (SYN-RECV), no final ACK through.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ss_states(&link.server)
            .values()
            .filter(|s| *s == "SYN-RECV")
            .count()
            < 8
        {
            assert!(Instant::now() < deadline, "the SYNs never all arrived");
            thread::sleep(Duration::from_millis(20));
        }
        tcp_testbed::nft(&link.client, "delete table inet tcpscope_test");
        let connected: Vec<TcpStream> = clients
            .into_iter()
            .filter_map(|c| c.join().expect("client"))
            .collect();
        let port = r#"tcpscope_accept_queue_overflows_total{port="9309"}"#;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let overflowed = prom::sample(&prom::scrape(&link.server), port);
            let server = ss_states(&link.server);
            let linux = if abort {
                link.server
                    .tcp_counters()
                    .delta(&before, "TcpExt.EmbryonicRsts") as f64
            } else {
                server.values().filter(|s| *s == "SYN-RECV").count() as f64
            };
            let local = tracker_states(&agent, "local");
            // The listener's sockets (not the scrapes' loopback ones, which no hook sees).
            // Checked while Linux still holds every ignored one (it drops them silently
            // later, which no segment shows).
            let server: BTreeMap<_, _> = server
                .into_iter()
                .filter(|((l, _), _)| l.ends_with(":9309"))
                .collect();
            if overflowed > 0.0 && overflowed == linux && local == server {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "abort {abort}: overflows {overflowed}, Linux {linux}\ntracker {local:?}\nss {server:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
        rec.replays_as_live(&link, &agent);
        drop((connected, first, listener));
    }
}

/// A handshake completed by SYN cookie into a full accept queue leaves no state at the server:
/// `listen(fd, 1)`, no accept(), SYN cookies always on, one connection queued; two clients
/// connect with their final ACKs held back (the server answered with cookies and keeps
/// nothing), then each sends data. The first takes the last slot and is acknowledged; the
/// other's data goes into silence, retransmitted, never acknowledged (its socket shows it
/// unacknowledged). The tracker marks exactly that flow's server silent, in `tcpscope flows`,
/// and counts it once.
#[test]
fn a_server_silent_after_a_cookie_handshake_is_marked() {
    use tcp_testbed::metrics as prom;
    tcp_testbed::require_root();
    let link = Link::new();
    link.server
        .sh(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"]);
    let (agent, rec) = recorded_agent(&link, &[]);
    let addr: SocketAddr = format!("{}:9310", link.server_v4()).parse().expect("addr");
    let listener = link.server.enter(move || listen_backlog(addr, 1));
    let queued = link
        .client
        .enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("c"));
    tcp_testbed::nft(
        &link.client,
        "table inet tcpscope_test {\n chain output {\n type filter hook output priority 0;\n \
         tcp dport 9310 tcp flags & (syn | ack | fin | rst) == ack drop\n }\n}\n",
    );
    let mut clients: Vec<TcpStream> = link.client.enter(move || {
        (0..2)
            .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"))
            .collect()
    });
    tcp_testbed::nft(&link.client, "delete table inet tcpscope_test");
    for c in &mut clients {
        c.write_all(b"hello").expect("write");
        thread::sleep(Duration::from_millis(100));
    }
    // The client whose data the server never acknowledged: still in its send queue.
    let unacked: Vec<String> = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = link
                .client
                .sh(&["ss", "-Htn", "state", "established", "dport", "9310"]);
            let found: Vec<String> = text
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() >= 4 && f[1] != "0").then(|| f[2].to_owned())
                })
                .collect();
            if found.len() == 1 {
                break found;
            }
            assert!(
                Instant::now() < deadline,
                "no single unacknowledged client: {text}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    };
    // Two walks (a second apart) confirm the silence.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let silent: Vec<String> = agent
            .flows()
            .iter()
            .filter(|f| f["server_silent"] == true)
            .flat_map(|f| f["endpoints"].as_array().expect("endpoints").clone())
            .filter(|e| e["role"] == "client")
            .map(|e| e["address"].as_str().expect("address").to_owned())
            .collect();
        let counted = prom::sample(&prom::scrape(&link.server), "tcpscope_silent_servers_total");
        if silent == unacked && counted == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "silent servers {silent:?} (counted {counted}), unacknowledged clients {unacked:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    rec.replays_as_live(&link, &agent);
    drop((clients, queued, listener));
}

/// The seconds left on the TIME-WAIT timer of the client's socket to `port` (`ss -tano`).
fn time_wait_timer(link: &Link, port: u16) -> Option<u64> {
    let text = link.client.sh(&["ss", "-Htano", "state", "time-wait"]);
    text.lines()
        .find(|l| l.contains(&format!(":{port} ")))
        .and_then(|l| l.split("timer:(timewait,").nth(1))
        .and_then(|t| t.split("sec").next())
        .and_then(|s| s.parse().ok())
}

/// The last ACK of a close is lost (the client's nft drops it): the server retransmits its
/// FIN from LAST-ACK, and each copy restarts the client's TIME-WAIT, in Linux (`ss -tano`
/// timers) and in the tracker. `tcpscope_fin_retransmits_total` equals the server's
/// retransmitted segments (only FINs here); with `--time-wait-secs 3` the tracker's TIME-WAIT
/// outlives 3 s from its first entry, as Linux's outlives 60.
#[test]
fn a_fin_retransmitted_into_time_wait_restarts_it() {
    tcp_testbed::require_root();
    let link = Link::new();
    let (agent, rec) = recorded_agent(&link, &["--time-wait-secs", "3"]);
    let listener = link.server.enter({
        let addr = format!("{}:9311", link.server_v4());
        move || TcpListener::bind(addr).expect("bind")
    });
    let (c, mut s) = open(&link, &listener, 1).pop().expect("connection");
    c.shutdown(std::net::Shutdown::Write).expect("client FIN");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("EOF");
    agree("client closed", &link, &agent);
    tcp_testbed::nft(
        &link.client,
        "table inet tcpscope_test {\n chain output {\n type filter hook output priority 0;\n \
         tcp dport 9311 tcp flags & (syn | ack | fin | rst) == ack drop\n }\n}\n",
    );
    let before = counters(&agent);
    let tcp_before = link.server.tcp_counters();
    drop(s);
    let entered = Instant::now();
    // Its copies come 0.2, 0.6, 1.4, 3.0, 6.2 s after the first (backed off from the
    // minimum RTO): the last ACK passes again after the 3.0 s one.
    thread::sleep(Duration::from_millis(4000));
    tcp_testbed::nft(&link.client, "delete table inet tcpscope_test");
    // The next copy of the FIN is answered: the server's socket is gone.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ss_states(&link.server).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the server never got its last ACK"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let last_fin = entered.elapsed();
    let retransmitted = link
        .server
        .tcp_counters()
        .delta(&tcp_before, "Tcp.RetransSegs");
    assert!(retransmitted >= 2, "{retransmitted} FIN retransmissions");
    let after = counters(&agent);
    assert_eq!(grew(&before, &after, "fin_retransmits"), retransmitted);
    // Linux restarted its TIME-WAIT with the last copy: more left than 60 s from the first.
    let left = time_wait_timer(&link, 9311).expect("the client's TIME-WAIT");
    let elapsed = entered.elapsed().as_secs();
    assert!(
        left + elapsed > 60,
        "Linux's TIME-WAIT was not restarted: {left} s left after {elapsed} s"
    );
    // The tracker's too: without the restart its TIME-WAIT would end 3 s after the first
    // entry, at most a tick and a walk later (5 s); restarted by the last copy, it lasts 3 s
    // past that one. Checked at 7 s.
    let first_deadline = Duration::from_secs(7);
    if let Some(wait) = first_deadline.checked_sub(entered.elapsed()) {
        thread::sleep(wait);
    }
    assert!(
        last_fin + Duration::from_secs(3) > first_deadline + Duration::from_millis(500),
        "the last FIN came too early to tell a restart ({last_fin:?})"
    );
    let remote = tracker_states(&agent, "remote");
    assert_eq!(
        remote.values().filter(|s| *s == "TIME-WAIT").count(),
        1,
        "the client's TIME-WAIT ended before its restart's time: {remote:?}"
    );
    rec.replays_as_live(&link, &agent);
    drop((c, listener));
}
