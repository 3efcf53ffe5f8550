//! The Prometheus exporter, end to end: a real Prometheus server scrapes the agent while real
//! connections run between two namespaces; the TIME-WAIT gauges must equal `ss` per side and
//! return to zero after `--time-wait-secs`; every gauge must equal what the tables hold;
//! `promtool check metrics` must accept the text; the HTTP endpoint must hold up against bad
//! clients.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Stdio,
    time::{Duration, Instant},
};

use tcp_testbed::{
    Link, NetNs,
    agent::Agent,
    metrics::{AGENT, http_get, parse, sample, scrape_text, sum},
    prometheus::Prometheus,
};

const PORT: u16 = 9200;

/// TIME-WAIT sockets of the test's connections in a namespace, as the kernel lists them
/// (loopback ones, like Prometheus' own, are not on the tracked interface).
fn ss_time_wait(ns: &NetNs) -> usize {
    let filter = format!("( sport = :{PORT} or dport = :{PORT} )");
    ns.sh(&["ss", "-Htan", "state", "time-wait", &filter])
        .lines()
        .count()
}

/// Endpoint records per (state, side) from `tcpscope flows --json` (what the tables hold).
fn table_states(agent: &Agent) -> (usize, std::collections::BTreeMap<(String, String), f64>) {
    let flows = agent.flows();
    let mut by = std::collections::BTreeMap::new();
    for f in &flows {
        for ep in f["endpoints"].as_array().expect("endpoints") {
            let state = ep["state"].as_str().expect("state").to_owned();
            if state != "closed" {
                *by.entry((state, ep["side"].as_str().expect("side").to_owned()))
                    .or_default() += 1.0;
            }
        }
    }
    (flows.len(), by)
}

/// Every endpoint gauge equals what the tables hold, and the table gauges equal the records.
fn assert_gauges_match_tables(agent: &Agent, samples: &std::collections::BTreeMap<String, f64>) {
    let (records, by_state) = table_states(agent);
    let held = sum(samples, "tcpscope_flows", &[]);
    assert_eq!(
        held, records as f64,
        "tcpscope_flows vs records in the tables"
    );
    let gauges = sum(samples, "tcpscope_endpoints", &[]);
    assert_eq!(
        gauges,
        by_state.values().sum::<f64>(),
        "sum of the endpoint gauges vs endpoints in the tables"
    );
    for ((state, side), n) in &by_state {
        let g = sum(
            samples,
            "tcpscope_endpoints",
            &[&format!("state=\"{state}\""), &format!("side=\"{side}\"")],
        );
        assert_eq!(g, *n, "endpoints {state}/{side}: gauge vs tables");
    }
}

fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feeding promtool");
    let out = child.wait_with_output().expect("promtool");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {report}"
    );
}

#[test]
fn time_wait_gauges_equal_ss_per_side_through_prometheus_and_expire() {
    tcp_testbed::require_root();
    let link = Link::new();
    const TIME_WAIT_SECS: u64 = 10;
    let mut agent = Agent::start(
        &link.server,
        &[
            "--iface",
            &link.server_if,
            "--time-wait-secs",
            &TIME_WAIT_SECS.to_string(),
            "--listen",
            "0.0.0.0:9977",
        ],
    );
    agent.wait_for("tracking;");
    let prom = Prometheus::start(&link.server, AGENT);
    prom.wait_for(
        "up{job=\"tcpscope\"}",
        |v| v == 1.0,
        Duration::from_secs(20),
    );

    const CLIENT_CLOSED: usize = 7;
    const SERVER_CLOSED: usize = 5;
    link.exchange(PORT, CLIENT_CLOSED, false);
    link.exchange(PORT, SERVER_CLOSED, true);
    // The kernel's truth, per namespace: the agent sits on the server, so client sockets are
    // the remote side and server sockets the local one. The last FINs and ACKs may still be in
    // flight: poll (bounded) until the kernel shows every TIME-WAIT the test made and the
    // tracker agrees, then compare exactly.
    let tw_of = |samples: &std::collections::BTreeMap<String, f64>, side: &str, role: &str| {
        sample(
            samples,
            &format!("tcpscope_endpoints{{role=\"{role}\",side=\"{side}\",state=\"time_wait\"}}"),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (remote, local, samples) = loop {
        let (remote, local) = (ss_time_wait(&link.client), ss_time_wait(&link.server));
        let samples = parse(&scrape_text(&link.server));
        let settled = (remote, local) == (CLIENT_CLOSED, SERVER_CLOSED)
            && tw_of(&samples, "remote", "client") == remote as f64
            && tw_of(&samples, "local", "server") == local as f64;
        if settled || Instant::now() > deadline {
            break (remote, local, samples);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!((remote, local), (CLIENT_CLOSED, SERVER_CLOSED), "ss");
    let tw = |side: &str, role: &str| tw_of(&samples, side, role);
    assert_eq!(
        tw("remote", "client"),
        remote as f64,
        "client TIME-WAIT (remote)"
    );
    assert_eq!(
        tw("local", "server"),
        local as f64,
        "server TIME-WAIT (local)"
    );
    assert_eq!(tw("remote", "server") + tw("local", "client"), 0.0);
    assert_gauges_match_tables(&agent, &samples);
    assert_eq!(
        sample(&samples, "tcpscope_handshakes_completed_total"),
        (CLIENT_CLOSED + SERVER_CLOSED) as f64
    );

    // The same through Prometheus, well within TIME-WAIT (a scrape a second).
    let per_side =
        |side: &str| format!("sum(tcpscope_endpoints{{state=\"time_wait\",side=\"{side}\"}})");
    let within = Duration::from_secs(TIME_WAIT_SECS / 2);
    prom.wait_for(&per_side("remote"), |v| v == remote as f64, within);
    prom.wait_for(&per_side("local"), |v| v == local as f64, within);
    // After --time-wait-secs both sides are back to zero, and the records are gone.
    prom.wait_for(
        &per_side("remote"),
        |v| v == 0.0,
        Duration::from_secs(TIME_WAIT_SECS + 5),
    );
    prom.wait_for(&per_side("local"), |v| v == 0.0, Duration::from_secs(5));
    prom.wait_for("sum(tcpscope_flows)", |v| v == 0.0, Duration::from_secs(5));
    let text = scrape_text(&link.server);
    let samples = parse(&text);
    assert_gauges_match_tables(&agent, &samples);
    assert_eq!(sum(&samples, "tcpscope_endpoints", &[]), 0.0);
    assert_eq!(
        sum(&samples, "tcpscope_flow_table_evictions_total", &[]),
        0.0,
        "TIME-WAIT and CLOSED records end naturally"
    );
    // The agent runs with the default capacities.
    for (family, table, capacity) in [
        (
            "ipv4",
            "established",
            tcp_common::object::DEFAULT_FLOWS_CAPACITY,
        ),
        (
            "ipv6",
            "established",
            tcp_common::object::DEFAULT_FLOWS6_CAPACITY,
        ),
        (
            "all",
            "half_open",
            tcp_common::object::DEFAULT_HALF_OPEN_CAPACITY,
        ),
    ] {
        assert_eq!(
            sample(
                &samples,
                &format!("tcpscope_flow_table_capacity{{family=\"{family}\",table=\"{table}\"}}")
            ),
            f64::from(capacity),
            "{family} {table}"
        );
    }
    promtool_check(&text);
    // Prometheus itself found nothing to complain about in any scrape.
    assert_eq!(
        prom.scalar("scrape_samples_post_metric_relabeling{job=\"tcpscope\"}")
            .expect("scraped"),
        samples.len() as f64,
        "Prometheus ingested every sample"
    );
}

#[test]
fn http_endpoint_survives_bad_clients() {
    tcp_testbed::require_root();
    let ns = NetNs::new("tsh");
    ns.sh(&[
        "ip", "link", "add", "th0", "type", "veth", "peer", "name", "th1",
    ]);
    ns.sh(&["ip", "link", "set", "th0", "up"]);
    let mut agent = Agent::start(&ns, &["--iface", "th0", "--listen", "127.0.0.1:9977"]);
    agent.wait_for("tracking;");
    ns.enter(|| {
        assert_eq!(http_get(AGENT, "/healthz").0, 200);
        let (status, _) = http_get(AGENT, "/nope");
        assert_eq!(status, 404);
        // A slow client that never finishes its request head, and more idle connections than
        // the server serves at once, held open: a scrape still gets through (stalled clients
        // are cut off after the head timeout and free their slots).
        let mut slow = TcpStream::connect(AGENT).expect("slow client");
        slow.write_all(b"GET /metr").expect("partial head");
        let idle: Vec<TcpStream> = (0..80)
            .filter_map(|_| TcpStream::connect(AGENT).ok())
            .collect();
        assert!(idle.len() >= 64, "idle connections: {}", idle.len());
        let started = Instant::now();
        let (status, body) = http_get(AGENT, "/metrics");
        assert_eq!(status, 200);
        assert!(body.contains("tcpscope_build_info{"), "{body}");
        eprintln!(
            "scrape behind {} idle connections took {:?}",
            idle.len(),
            started.elapsed()
        );
        drop(idle);
        // The slow one is cut off after the head timeout.
        slow.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let started = Instant::now();
        let mut rest = Vec::new();
        let _ = slow.read_to_end(&mut rest);
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "a stalled request head was not cut off"
        );
        // An oversized head is refused, not buffered.
        let mut big = TcpStream::connect(AGENT).expect("connect");
        let header = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let _ = big.write_all(header.as_bytes());
        big.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut answer = String::new();
        let asked = Instant::now();
        let _ = big.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 431"),
            "a 64 KiB request head: {:?}",
            answer.lines().next().unwrap_or("")
        );
        assert!(asked.elapsed() < Duration::from_secs(2), "refused at once");
        // Still healthy.
        assert_eq!(http_get(AGENT, "/healthz").0, 200);
    });
    // A port already in use is a one-line error before anything is attached.
    let out = ns
        .command(tcp_testbed::agent::agent_binary())
        .args([
            "run",
            "--iface",
            "th0",
            "--listen",
            "127.0.0.1:9977",
            "--pin-dir",
        ])
        .arg(format!("{}-second", agent.pin_dir.display()))
        .output()
        .expect("second agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("127.0.0.1:9977"), "{stderr}");
    let _ = std::fs::remove_dir_all(format!("{}-second", agent.pin_dir.display()));
}
