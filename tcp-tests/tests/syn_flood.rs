//! The SYN-flood indicator: a bounded spoofed-source SYN flood from hping3 (sources in
//! 198.18.0.0/15, which this test owns) raises `tcpscope_syn_flood_active{port}` within a few
//! seconds and lowers it after the flood; connections established before the flood stay
//! tracked in their states; a high rate of real connections never raises it.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tcp_testbed::{
    Link,
    agent::Agent,
    metrics::{sample, scrape, sum},
};

const PORT: u16 = 9400;

fn flood_flag(m: &BTreeMap<String, f64>) -> f64 {
    sample(m, &format!("tcpscope_syn_flood_active{{port=\"{PORT}\"}}"))
}

fn established_local_servers(m: &BTreeMap<String, f64>) -> f64 {
    sample(
        m,
        "tcpscope_endpoints{role=\"server\",side=\"local\",state=\"established\"}",
    )
}

/// Records of the established table with both endpoints ESTABLISHED on the test's port.
fn held_records(agent: &Agent) -> usize {
    agent
        .flows()
        .iter()
        .filter(|f| {
            f["table"] == "established"
                && f["endpoints"]
                    .as_array()
                    .expect("endpoints")
                    .iter()
                    .all(|e| e["state"] == "established")
                && tcp_testbed::agent::on_port(f, PORT)
        })
        .count()
}

#[test]
fn spoofed_syn_flood_raises_the_flag_and_real_load_does_not() {
    tcp_testbed::require_root();
    let link = Link::new();
    // SYN-ACKs to the spoofed sources go back towards the client namespace, which drops them.
    link.server.sh(&[
        "ip",
        "route",
        "add",
        "198.18.0.0/15",
        "via",
        &link.client_v4(),
    ]);
    let mut agent = Agent::start(&link.server, &["--iface", &link.server_if]);
    agent.wait_for("tracking;");
    let (v4, _) = link.server_addrs(PORT);
    let listener = link
        .server
        .enter(move || TcpListener::bind(v4).expect("listener"));
    let server = link.server.spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming() {
            let Ok(mut c) = c else { break };
            let mut b = [0u8; 1];
            if c.read_exact(&mut b).is_ok() && b[0] == b'h' {
                held.push(c); // kept open: established through the flood
            } else if b[0] == b'q' {
                break;
            }
        }
        held.len()
    });

    // Connections opened before anything else, held open throughout.
    const HELD: usize = 5;
    let held: Vec<TcpStream> = link.client.enter(move || {
        (0..HELD)
            .map(|_| {
                let mut c = TcpStream::connect(v4).expect("connect");
                c.write_all(b"h").expect("hello");
                c
            })
            .collect()
    });
    // The server's side is ESTABLISHED once the client's final ACK (and its byte) arrived.
    let deadline = Instant::now() + Duration::from_secs(10);
    let tracked = loop {
        let n = established_local_servers(&scrape(&link.server));
        if n == HELD as f64 || Instant::now() > deadline {
            break n;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(tracked, HELD as f64);

    // Real load at a high connection rate: never flagged.
    let before = scrape(&link.server);
    let started = Instant::now();
    // Bounded in time and count (each connection leaves a client TIME-WAIT and its port).
    link.client
        .sh(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"]);
    let load = link.client.spawn(move || {
        let mut n = 0;
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until && n < 20_000 {
            let mut c = TcpStream::connect(v4).expect("connect under load");
            c.write_all(b"x").expect("write");
            n += 1;
        }
        n
    });
    let mut highest = 0.0f64;
    while !load.is_finished() {
        let m = scrape(&link.server);
        highest = highest.max(flood_flag(&m));
        thread::sleep(Duration::from_millis(250));
    }
    let made = load.join().expect("load");
    // Let the window see the whole burst.
    for _ in 0..8 {
        highest = highest.max(flood_flag(&scrape(&link.server)));
        thread::sleep(Duration::from_millis(250));
    }
    let after = scrape(&link.server);
    let rate = (sample(&after, "tcpscope_syn_total") - sample(&before, "tcpscope_syn_total"))
        / started.elapsed().as_secs_f64();
    eprintln!("real load: {made} connections, {rate:.0} SYN/s; flag stayed {highest}");
    assert!(
        rate > 100.0,
        "the load must exceed the rule's rate to mean anything: {rate:.0} SYN/s"
    );
    assert_eq!(highest, 0.0, "real load raised the SYN-flood flag");
    assert!(
        after.contains_key(&format!("tcpscope_syn_flood_active{{port=\"{PORT}\"}}")),
        "the busiest port is reported (as 0)"
    );

    // The flood: spoofed sources, bounded in count and time. First let the load leave the
    // window: a flood mixed with more completed handshakes on the same port keeps the
    // completion ratio up by design (README: SYN flood rule).
    thread::sleep(Duration::from_secs(5));
    let flood_started = Instant::now();
    let server_ip = link.server_v4();
    let flood = link.client.spawn(move || {
        let out = std::process::Command::new("timeout")
            .args([
                "20",
                "hping3",
                "-q",
                "-S",
                "-p",
                &PORT.to_string(),
                "-a",
                "198.18.7.7",
                "-i",
                "u400",
                "-c",
                "10000",
                &server_ip,
            ])
            .output()
            .expect("hping3 (Debian package hping3)");
        String::from_utf8_lossy(&out.stderr).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let raised_after = loop {
        let m = scrape(&link.server);
        if flood_flag(&m) == 1.0 {
            break flood_started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the flood was never flagged: {}",
            m.iter()
                .filter(|(k, _)| k.contains("syn"))
                .map(|(k, v)| format!("{k} {v}\n"))
                .collect::<String>()
        );
        thread::sleep(Duration::from_millis(200));
    };
    let hping = flood.join().expect("hping3");
    let flood_over = Instant::now();
    eprintln!("flagged {raised_after:?} after the flood started; hping3: {hping}");
    assert!(
        raised_after < Duration::from_secs(5),
        "flagged after {raised_after:?}"
    );
    let m = scrape(&link.server);
    assert!(
        sample(&m, "tcpscope_syn_total") - sample(&after, "tcpscope_syn_total") >= 5000.0,
        "the flood reached the tracker"
    );
    // The connections held open are still tracked, in their states, in the established
    // table (the flood can only fill the half-open one).
    assert_eq!(established_local_servers(&m), HELD as f64);
    assert_eq!(
        held_records(&agent),
        HELD,
        "held connections in the established table"
    );
    assert!(sum(&m, "tcpscope_flows", &["table=\"half_open\""]) > 1000.0);

    // After the flood: back to 0 once the window has passed (and still reported, as 0).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(&link.server);
        if flood_flag(&m) == 0.0
            && m.contains_key(&format!("tcpscope_syn_flood_active{{port=\"{PORT}\"}}"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the flag never came back to 0");
        thread::sleep(Duration::from_millis(250));
    }
    eprintln!("cleared {:?} after the flood ended", flood_over.elapsed());
    assert!(
        agent
            .wait_for("SYN flood on port")
            .contains(&PORT.to_string())
    );

    // Close the held connections and stop the server.
    drop(held);
    link.client.enter(move || {
        let mut c = TcpStream::connect(v4).expect("connect");
        c.write_all(b"q").expect("quit");
    });
    assert_eq!(server.join().expect("server"), HELD);
}
