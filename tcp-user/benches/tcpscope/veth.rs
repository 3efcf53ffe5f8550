//! Receive-path cost under live traffic on a veth pair: no XDP, XDP_PASS, the agent, and
//! netfilter conntrack with an iptables rule and with an nft rule, at 1,024 and 65,536 flows.
//!
//! The generator (see [`BenchPrograms::with_generator`]) sends 60-byte TCP ACKs from the
//! sending namespace, cycling the source port over the flows; every frame goes through the
//! receiver's veth NAPI poll (XDP, skb, GRO, IP, netfilter, TCP, which answers with a RST that
//! the blackhole route drops) on the generator's own CPU, inside the generator's timed loop.
//! So the kernel's time of the sending loop divided by the frames the receiver counted is the
//! cost of one packet: generator plus receive path, and the differences between receivers are
//! what each adds to the receive path.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use tcp_common::{frames::FrameSpec, parse::tcp_flags::ACK};
use tcp_testbed::{NetNs, Testbed, net_counter, rx_packets};

use crate::{
    Config,
    progs::BenchPrograms,
    report::{Runs, Section, Table, Target, met, num},
};

/// Key in report.json.
pub const KEY: &str = "veth";
/// Heading.
pub const TITLE: &str = "2. Receive-path cost under live traffic (veth pair)";

/// Flow counts measured.
const FLOWS: [u32; 2] = [1_024, 65_536];
/// First source port of the generated flows (65,536 flows wrap around through every port).
pub const FIRST_PORT: u16 = 1_024;
/// Destination port (discard; nothing listens, the receiver answers with RSTs).
pub const DEST_PORT: u16 = 9;
/// Frames per generator call: ~0.1 s of traffic, so that a case ends close to its time.
const CHUNK: u32 = 1 << 18;
/// Target: the agent's overhead is at most this fraction of conntrack's.
const TARGET_RATIO: f64 = 1.0 / 3.0;

/// What the receiving side runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Receiver {
    NoXdp,
    XdpPass,
    Tcpscope,
    ConntrackIptables,
    ConntrackNft,
}

impl Receiver {
    const ALL: [Self; 5] = [
        Self::NoXdp,
        Self::XdpPass,
        Self::Tcpscope,
        Self::ConntrackIptables,
        Self::ConntrackNft,
    ];

    const fn name(self) -> &'static str {
        match self {
            Self::NoXdp => "no XDP",
            Self::XdpPass => "XDP_PASS",
            Self::Tcpscope => "tcpscope (agent attached)",
            Self::ConntrackIptables => "conntrack, iptables rule",
            Self::ConntrackNft => "conntrack, nft rule",
        }
    }
}

/// The template frame: an ACK from the sender to the receiver's discard port.
pub fn template(flags: u8) -> Vec<u8> {
    let mut spec = FrameSpec::tcp_v4(
        Testbed::TX_ADDR,
        Testbed::RX_ADDR,
        (FIRST_PORT, DEST_PORT),
        flags,
    );
    spec.src_mac = Testbed::TX_MAC;
    spec.dst_mac = Testbed::RX_MAC;
    spec.build()
}

/// Netfilter rules in the receiving namespace; on drop, conntrack and every rule are flushed
/// (iptables-nft leaves an empty base chain behind that by itself costs per packet and would
/// pollute the cases after it).
struct Rules<'a>(&'a NetNs);

impl Rules<'_> {
    fn conntrack_entries(&self) -> Result<u64> {
        Ok(self
            .0
            .try_sh(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])?
            .trim()
            .parse()?)
    }
}

impl Drop for Rules<'_> {
    fn drop(&mut self) {
        let _ = self.0.try_sh(&["conntrack", "-F"]);
        let _ = self.0.try_sh(&["nft", "flush", "ruleset"]);
    }
}

/// One case of one run.
struct Sample {
    /// Kernel-timed ns per received packet.
    ns: f64,
    json: Value,
}

/// Runs the generator for `secs` over `flows` flows with `receiver` set up; ns per packet.
fn measure(
    bed: &Testbed,
    traffic: &mut BenchPrograms,
    receiver: Receiver,
    flows: u32,
    secs: f64,
) -> Result<Sample> {
    // What the receiver runs, kept until the measurement is over.
    let mut pass = None;
    let mut agent = None;
    let mut rules = None;
    match receiver {
        Receiver::NoXdp => {}
        Receiver::XdpPass => {
            let mut p = BenchPrograms::load()?;
            let _ns = bed.rx.enter_thread()?;
            p.attach_xdp_pass(&bed.rx_if)?;
            pass = Some(p);
        }
        Receiver::Tcpscope => {
            // Native XDP on the veth, as measured (auto picks generic on a veth, where native
            // adds drops under bursts; this measures the per-packet cost of the native path).
            // Mirror mode: in host mode a record started by a remote segment waits for a
            // segment of the local side, and the receiver answers the generator's flows only
            // with RSTs, so none would ever be tracked; mirror mode starts their records from
            // their first ACK, and the figures are those of established flows.
            let mut a = bed.start_agent(&[
                "--listen",
                "off",
                "--xdp-mode",
                "native",
                "--mode",
                "mirror",
            ])?;
            let attached = a.log().iter().find(|l| l.contains("attached")).cloned();
            ensure!(
                attached
                    .as_deref()
                    .is_some_and(|l| l.contains("XDP ingress (native)")),
                "the agent did not attach native XDP: {attached:?}"
            );
            agent = Some(a);
        }
        Receiver::ConntrackIptables => {
            let r = Rules(&bed.rx);
            bed.rx.try_sh(&[
                "iptables",
                "-A",
                "INPUT",
                "-m",
                "conntrack",
                "--ctstate",
                "ESTABLISHED,RELATED,NEW",
                "-j",
                "ACCEPT",
            ])?;
            rules = Some(r);
        }
        Receiver::ConntrackNft => {
            let r = Rules(&bed.rx);
            bed.rx.try_sh(&[
                "nft",
                "add table inet tsb; \
                 add chain inet tsb input { type filter hook input priority 0; policy accept; }; \
                 add rule inet tsb input ct state established,related,new accept",
            ])?;
            rules = Some(r);
        }
    }
    let counters = || -> Result<(u64, u64)> {
        let _ns = bed.rx.enter_thread()?;
        Ok((rx_packets(&bed.rx_if)?, net_counter("snmp", "Tcp.InSegs")?))
    };
    // Every frame the interface receives from here on must go through the agent's XDP.
    let rx_attached = if agent.is_some() {
        Some(counters()?.0)
    } else {
        None
    };
    traffic.configure_generator(flows, FIRST_PORT)?;
    let frame = template(ACK);
    // Every flow once before the measurement, so that it covers the steady state of
    // `flows` known flows rather than their creation.
    traffic.with_generator(bed, &frame, |g| g.send(flows))?;
    let (rx0, segs0) = counters()?;
    let started = Instant::now();
    let (sent, busy) = traffic.with_generator(bed, &frame, |g| {
        let (mut sent, mut busy) = (0u64, Duration::ZERO);
        while started.elapsed().as_secs_f64() < secs {
            busy += g.send(CHUNK)?;
            sent += u64::from(CHUNK);
        }
        Ok((sent, busy))
    })?;
    let wall = started.elapsed();
    let (rx1, segs1) = counters()?;
    let received = rx1 - rx0;
    let delivered = segs1 - segs0;
    // A receiver that lost frames measured something else than the receive path of each.
    ensure!(
        received as f64 >= 0.99 * sent as f64 && delivered as f64 >= 0.99 * received as f64,
        "{}: the receiver counted {received} of {sent} frames sent, TCP got {delivered}",
        receiver.name()
    );
    let ns = busy.as_nanos() as f64 / received as f64;
    let mut json = json!({
        "ns_per_packet": ns,
        "wall_ns_per_packet": wall.as_nanos() as f64 / received as f64,
        "sent": sent,
        "received": received,
        "tcp_in_segs": segs1 - segs0,
    });
    if let Some(r) = &rules {
        json["conntrack_entries"] = json!(r.conntrack_entries()?);
    }
    if let (Some(mut a), Some(rx_attached)) = (agent, rx_attached) {
        let attached = a.log().iter().find(|l| l.contains("attached")).cloned();
        let summary = a.try_stop()?;
        let xdp = summary
            .get("xdp_ingress")
            .and_then(|c| c.get("packets"))
            .copied()
            .unwrap_or(0);
        let rx = counters()?.0 - rx_attached;
        // The agent saw every frame the interface received while it was attached (a few
        // stray frames, IPv6 neighbour discovery, may arrive around the reads).
        ensure!(
            xdp.abs_diff(rx) <= 16,
            "the agent's XDP program counted {xdp} frames, the interface received {rx}"
        );
        json["agent_attached"] = json!(attached);
        json["agent_xdp_packets"] = json!(xdp);
        json["interface_rx_while_attached"] = json!(rx);
    }
    drop(rules);
    drop(pass);
    Ok(Sample { ns, json })
}

/// Measures item 2.
pub fn run(cfg: &Config, bed: &Testbed) -> Result<Section> {
    let secs = cfg.pick(2.5, 0.5);
    let mut traffic = BenchPrograms::load()?;
    // ns per packet by (flows, receiver); overheads over no XDP and ratios, per run.
    let mut ns: Vec<Vec<Runs>> = vec![vec![Runs::default(); Receiver::ALL.len()]; FLOWS.len()];
    let mut over: Vec<Vec<Runs>> = ns.clone();
    // Per flow count: ratio to iptables', to nft's, and to the smaller of the two.
    let mut ratio: Vec<[Runs; 3]> = vec![Default::default(); FLOWS.len()];
    let mut samples = Vec::new();
    let mut runs_done = 0;
    for run in 0..cfg.runs {
        if !cfg.time_left() {
            break;
        }
        for (f, flows) in FLOWS.iter().enumerate() {
            eprintln!("bench: veth run {}/{}, {flows} flows", run + 1, cfg.runs);
            let mut this = [0.0; Receiver::ALL.len()];
            for (r, receiver) in Receiver::ALL.into_iter().enumerate() {
                let s = measure(bed, &mut traffic, receiver, *flows, secs)
                    .with_context(|| format!("{} at {flows} flows", receiver.name()))?;
                this[r] = s.ns;
                ns[f][r].push(s.ns);
                samples.push(json!({
                    "run": run, "flows": flows, "receiver": receiver.name(), "sample": s.json,
                }));
            }
            for r in 0..Receiver::ALL.len() {
                over[f][r].push(this[r] - this[0]);
            }
            let agent = this[2] - this[0];
            let (iptables, nft) = (this[3] - this[0], this[4] - this[0]);
            // conntrack costing nothing means the measurement failed, not that tcpscope is
            // infinitely worse.
            ensure!(
                iptables > 0.0 && nft > 0.0,
                "conntrack overheads of {iptables:.0} and {nft:.0} ns at {flows} flows: no \
                 measurement"
            );
            ratio[f][0].push(agent / iptables);
            ratio[f][1].push(agent / nft);
            ratio[f][2].push(agent / iptables.min(nft));
        }
        runs_done += 1;
    }
    ensure!(runs_done > 0, "no run finished within the time cap");

    let mut tables = Vec::new();
    let mut json_flows = Vec::new();
    for (f, flows) in FLOWS.iter().enumerate() {
        let mut t = Table::new(&[
            &format!("receiver, {flows} flows"),
            "ns/packet",
            "runs",
            "ns over no XDP",
            "runs",
            "Mpps",
        ]);
        let mut rows = Vec::new();
        for (r, receiver) in Receiver::ALL.into_iter().enumerate() {
            t.row(vec![
                receiver.name().to_owned(),
                ns[f][r].cell(0),
                ns[f][r].range(0),
                if r == 0 {
                    "–".to_owned()
                } else {
                    over[f][r].cell(0)
                },
                if r == 0 {
                    "–".to_owned()
                } else {
                    over[f][r].range(0)
                },
                num(1e3 / ns[f][r].median(), 2),
            ]);
            rows.push(json!({
                "receiver": receiver.name(),
                "ns_per_packet": ns[f][r].json(),
                "ns_over_no_xdp": over[f][r].json(),
            }));
        }
        tables.push(t);
        json_flows.push(json!({ "flows": flows, "receivers": rows }));
    }
    let mut summary = Table::new(&[
        "flows",
        "tcpscope overhead ns (min–max)",
        "conntrack iptables ns",
        "ratio",
        "conntrack nft ns",
        "ratio",
        "target",
        "met?",
    ]);
    let mut json_summary = Vec::new();
    for (f, flows) in FLOWS.iter().enumerate() {
        let ok = ratio[f][2].median() <= TARGET_RATIO;
        summary.row(vec![
            flows.to_string(),
            over[f][2].brief(0),
            over[f][3].brief(0),
            ratio[f][0].brief(2),
            over[f][4].brief(0),
            ratio[f][1].brief(2),
            format!("≤ 0.33 vs the cheaper ({})", num(ratio[f][2].median(), 2)),
            met(Some(ok)),
        ]);
        json_summary.push(json!({
            "flows": flows,
            "tcpscope_overhead_ns": over[f][2].json(),
            "conntrack_iptables_overhead_ns": over[f][3].json(),
            "ratio_vs_iptables": ratio[f][0].json(),
            "conntrack_nft_overhead_ns": over[f][4].json(),
            "ratio_vs_nft": ratio[f][1].json(),
            "ratio_vs_cheaper": ratio[f][2].json(),
            "target_ratio": TARGET_RATIO,
            "met": ok,
        }));
    }
    tables.push(summary);
    Ok(Section {
        key: KEY,
        title: TITLE.to_owned(),
        intro: vec![
            format!(
                "Two namespaces joined by a veth pair, GRO on at both ends. A generator \
                 (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES, XDP_TX) pinned to one CPU \
                 sends 60-byte TCP ACKs, cycling the source port over the flows (incremental \
                 checksum); the receiver's NAPI poll runs on the same CPU inside the \
                 generator's timed loop, and a blackhole route drops the receiver's RSTs. \
                 ns/packet = the kernel's time of the sending loop / frames the receiver \
                 counted (generator included: compare the differences), {secs} s per case. \
                 The agent is the release binary (`tcpscope run --listen off --mode mirror`, \
                 XDP native: in host mode a record started by a remote segment waits for a \
                 segment of the local side, and the receiver answers these flows only with \
                 RSTs; mirror mode starts each flow's record from its first ACK, so every \
                 later one takes the established fast path, as a tracked connection's do); \
                 conntrack: `iptables -A INPUT -m conntrack --ctstate \
                 ESTABLISHED,RELATED,NEW -j ACCEPT` or the same as a native nft rule, ACK-only \
                 flows picked up by `nf_conntrack_tcp_loose`; conntrack and the ruleset are \
                 flushed after each."
            ),
            "**Target:** tcpscope's overhead over no XDP ≤ 1/3 of conntrack's, the cheaper of \
             the two variants (ratios taken within each run), at both flow counts."
                .to_owned(),
        ],
        tables,
        notes: vec![
            "Checked in every sample (a failed check fails the run): the receiver counted \
             ≥ 99 % of the frames sent and TCP got ≥ 99 % of those; the agent attached native \
             XDP and its XDP program counted the frames the interface received while it was \
             attached; both conntrack variants cost more than no XDP. report.json has every \
             sample: frames sent and received, TCP segments delivered, conntrack entries, the \
             agent's attach line and XDP packet count, and wall-clock ns/packet (which also \
             counts the XDP dispatcher updates around each generator call)."
                .to_owned(),
        ],
        json: json!({
            "seconds_per_case": secs,
            "runs": runs_done,
            "by_flows": json_flows,
            "summary": json_summary,
            "samples": samples,
        }),
        targets: if cfg.quick {
            Vec::new()
        } else {
            ["veth_vs_conntrack_1k", "veth_vs_conntrack_64k"]
                .into_iter()
                .zip(&ratio)
                .map(|(id, r)| Target::at_most(id, r[2].median(), TARGET_RATIO, "ratio"))
                .collect()
        },
    })
}
