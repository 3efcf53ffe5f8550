//! Per-packet cost of the real programs through `BPF_PROG_TEST_RUN`, per packet class, against
//! floor programs that only return XDP_PASS / TC_ACT_OK, loaded in the same run.
//!
//! The programs are loaded from the agent's own object by the agent's own loader
//! ([`Tracker::load`]), with fresh maps every run. The time is the kernel's: the `duration` the
//! test run returns (its own clock around the program runs), never wall time, which a test
//! run with `repeat` > 1 inflates by milliseconds of XDP dispatcher updates.
//!
//! - Steady classes (one frame that finds the same state every time: data on an established
//!   flow, a retransmitted SYN, non-TCP) run one frame `repeat` times per call.
//! - Transition classes (SYN, SYN-ACK, final ACK, FIN, RST) change a flow's state on first
//!   sight, so a repeated frame would measure something else: each of N flows is first brought
//!   to the preceding state (through the programs, as live traffic would), then gets its class
//!   frame once (`repeat` = 1), and the kernel's times are averaged. The floor is measured the
//!   same way.
//!
//! Each connection is seen from the host being tracked: frames its client sends go through the
//! client's hook, the server's through the other one. For a class measured on XDP the flow is
//! an inbound connection (the remote client's SYN arrives on XDP ingress, the local server's
//! SYN-ACK leaves through TC egress) except for SYN-ACK, which arrives on XDP only for an
//! outbound connection; and the reverse on TC.

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    TestRun as _,
    programs::{SchedClassifier, TestRunOptions, TestRunResult, Xdp},
};
use serde_json::json;
use tcp_common::object::{TC_PROGRAM, XDP_PROGRAM};
use tcp_common::{
    counters::{Counter, Hook as CounterHook, HookCounters},
    event_counters::event_slots,
    frames::{FrameSpec, Upper},
    gauges::{GAUGE_SLOTS, slot_labels},
    parse::tcp_flags::{ACK, FIN, PSH, RST, SYN},
    state::{TcpState, events},
};
use tcp_user::loader::{LoadOptions, Tracker};

use crate::{
    Config,
    progs::BenchPrograms,
    report::{Runs, Section, Table, Target, met, num},
};

/// Key in report.json.
pub const KEY: &str = "per_packet";
/// Heading.
pub const TITLE: &str = "1. Per-packet cost (BPF_PROG_TEST_RUN)";

/// Target: the hot path over the floor, as a ratio to the reference tracker's cost over the
/// same floor (XDP and TC alike).
const HOT_PATH_VS_REFERENCE: f64 = 1.0;
/// Target: a SYN that creates a half-open record, and the ACK that promotes it, ns over the
/// floor.
const NEW_FLOW_TARGET_NS: f64 = 400.0;
/// Table capacities: room for every flow a run creates (at most 5 × N per hook) with short
/// hash chains.
const CAPACITY: u32 = 1 << 20;
/// Initial sequence numbers of the crafted connections' client and server.
const CLIENT_ISN: u32 = 1000;
const SERVER_ISN: u32 = 5000;
/// Payload of the data segment on the hot path.
const DATA_BYTES: usize = 100;

/// Where a frame is handed to the tracker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    const ALL: [Self; 2] = [Self::Xdp, Self::Tc];

    const fn other(self) -> Self {
        match self {
            Self::Xdp => Self::Tc,
            Self::Tc => Self::Xdp,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            Self::Xdp => "XDP",
            Self::Tc => "TC",
        }
    }

    /// The verdict every program here must return: pass the packet.
    const fn pass(self) -> u32 {
        match self {
            Self::Xdp => 2, // XDP_PASS
            Self::Tc => 0,  // TC_ACT_OK
        }
    }
}

/// One segment (or non-TCP frame) of a crafted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Syn,
    SynAck,
    Ack,
    Data,
    Fin,
    Rst,
    Udp,
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    HotPath,
    SynRetransmit,
    NonTcp,
    Syn,
    SynAck,
    FinalAck,
    Fin,
    Rst,
}

impl Class {
    const STEADY: [Self; 3] = [Self::HotPath, Self::SynRetransmit, Self::NonTcp];
    const TRANSITION: [Self; 5] = [
        Self::Syn,
        Self::SynAck,
        Self::FinalAck,
        Self::Fin,
        Self::Rst,
    ];

    const fn name(self) -> &'static str {
        match self {
            Self::HotPath => "data on an established flow (hot path)",
            Self::SynRetransmit => "retransmitted SYN",
            Self::NonTcp => "non-TCP (UDP)",
            Self::Syn => "SYN creating a half-open flow",
            Self::SynAck => "SYN-ACK",
            Self::FinalAck => "final ACK (promotion to established)",
            Self::Fin => "FIN on an established flow",
            Self::Rst => "RST on an established flow",
        }
    }

    /// Segments that bring a flow to the state this class starts from, and the measured one.
    const fn steps(self) -> (&'static [Step], Step) {
        const HANDSHAKE: &[Step] = &[Step::Syn, Step::SynAck, Step::Ack];
        match self {
            Self::HotPath => (HANDSHAKE, Step::Data),
            Self::SynRetransmit => (&[Step::Syn], Step::Syn),
            Self::NonTcp => (&[], Step::Udp),
            Self::Syn => (&[], Step::Syn),
            Self::SynAck => (&[Step::Syn], Step::SynAck),
            Self::FinalAck => (&[Step::Syn, Step::SynAck], Step::Ack),
            Self::Fin => (HANDSHAKE, Step::Fin),
            Self::Rst => (HANDSHAKE, Step::Rst),
        }
    }

    /// The state-machine event each measured frame must raise, proving it did what the class
    /// says (slot in the event counters).
    const fn event(self) -> Option<u32> {
        match self {
            Self::SynRetransmit => Some(events::SYN_RETRANSMIT),
            Self::Syn => Some(events::NEW_FLOW),
            Self::SynAck => Some(events::SYN_ACK),
            Self::FinalAck => Some(events::HANDSHAKE_COMPLETED),
            Self::Rst => Some(events::RESET),
            Self::HotPath | Self::NonTcp | Self::Fin => None,
        }
    }
}

/// A crafted connection: client 10.<net>.<i/256>.<i%256>:40000, server 172.16.0.1:80.
struct Flow {
    client: [u8; 4],
}

impl Flow {
    /// Flow `i` of network `net` (one network per hook and class, so that no two cases of a
    /// run share a flow).
    fn new(net: u8, i: u32) -> Self {
        let [_, _, hi, lo] = i.to_be_bytes();
        Self {
            client: [10, net, hi, lo],
        }
    }

    /// The frame of `step`, and whether the server sends it (else the client).
    fn frame(&self, step: Step) -> (Vec<u8>, bool) {
        const SERVER: [u8; 4] = [172, 16, 0, 1];
        let (flags, seq, ack) = match step {
            Step::Syn => (SYN, CLIENT_ISN, 0),
            Step::SynAck => (SYN | ACK, SERVER_ISN, CLIENT_ISN + 1),
            Step::Ack => (ACK, CLIENT_ISN + 1, SERVER_ISN + 1),
            Step::Data => (ACK | PSH, CLIENT_ISN + 1, SERVER_ISN + 1),
            Step::Fin => (FIN | ACK, CLIENT_ISN + 1, SERVER_ISN + 1),
            Step::Rst => (RST | ACK, CLIENT_ISN + 1, SERVER_ISN + 1),
            Step::Udp => (0, 0, 0),
        };
        let from_server = step == Step::SynAck;
        let mut spec = if from_server {
            FrameSpec::tcp_v4(SERVER, self.client, (80, 40000), flags)
        } else {
            FrameSpec::tcp_v4(self.client, SERVER, (40000, 80), flags)
        };
        spec.upper = Upper::Tcp { flags, seq, ack };
        match step {
            Step::Data => spec.payload = DATA_BYTES,
            Step::Udp => spec.upper = Upper::Udp,
            _ => {}
        }
        (spec.build(), from_server)
    }
}

/// A program that can be test-run.
#[derive(Clone, Copy)]
enum Prog<'a> {
    Xdp(&'a Xdp),
    Tc(&'a SchedClassifier),
}

impl Prog<'_> {
    /// Runs `frame` `repeat` times; the kernel's mean time per run. Fails unless the program
    /// passes the packet.
    fn run(self, hook: Hook, frame: &[u8], repeat: u32) -> Result<Duration> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        };
        let r: TestRunResult = match self {
            Self::Xdp(p) => p.test_run(opts),
            Self::Tc(p) => p.test_run(opts),
        }
        .context("BPF_PROG_TEST_RUN")?;
        ensure!(
            r.return_value == hook.pass(),
            "the program returned {} instead of passing the packet",
            r.return_value
        );
        Ok(r.duration)
    }
}

/// The programs of one run: the tracker's, the floors and the reference tracker, per hook.
struct Programs<'a> {
    tracker: &'a Tracker,
    bench: &'a BenchPrograms,
    xdp: Prog<'a>,
    tc: Prog<'a>,
    xdp_floor: Prog<'a>,
    tc_floor: Prog<'a>,
    xdp_ref: Prog<'a>,
    tc_ref: Prog<'a>,
}

impl Programs<'_> {
    const fn tracker(&self, hook: Hook) -> Prog<'_> {
        match hook {
            Hook::Xdp => self.xdp,
            Hook::Tc => self.tc,
        }
    }

    const fn floor(&self, hook: Hook) -> Prog<'_> {
        match hook {
            Hook::Xdp => self.xdp_floor,
            Hook::Tc => self.tc_floor,
        }
    }

    /// The reference tracker on `hook`: its one flow inserted first, then the data segment
    /// `repeat` times (each run a hit, as the hot path's are).
    fn measure_reference(&self, hook: Hook, repeat: u32) -> Result<f64> {
        let prog = match hook {
            Hook::Xdp => self.xdp_ref,
            Hook::Tc => self.tc_ref,
        };
        let (frame, _) = Flow::new(0, 0).frame(Step::Data);
        prog.run(hook, &frame, 1)?;
        Ok(prog.run(hook, &frame, repeat)?.as_nanos() as f64)
    }

    /// The reference tracker on `hook` for new flows: `flows` distinct SYNs of network `net`,
    /// once each (each a lookup that misses and an insert), as the SYN class is measured.
    /// Fails unless every one of them was inserted.
    fn measure_reference_new(&self, hook: Hook, net: u8, flows: u32) -> Result<f64> {
        let prog = match hook {
            Hook::Xdp => self.xdp_ref,
            Hook::Tc => self.tc_ref,
        };
        let before = self.bench.reference_flows()?;
        let mut total = Duration::ZERO;
        for i in 0..flows {
            let (frame, _) = Flow::new(net, i).frame(Step::Syn);
            total += prog.run(hook, &frame, 1)?;
        }
        let inserted = self.bench.reference_flows()? - before;
        ensure!(
            inserted == flows as usize,
            "the reference on {} inserted {inserted} new flows, not {flows}",
            hook.name()
        );
        Ok(total.as_nanos() as f64 / f64::from(flows))
    }

    /// The hook's packet counters (all CPUs).
    fn hook_counters(&self, hook: Hook) -> Result<HookCounters> {
        let totals = self
            .tracker
            .counters()
            .context("reading the packet counters")?;
        Ok(*totals.hook(match hook {
            Hook::Xdp => CounterHook::XdpIngress,
            Hook::Tc => CounterHook::TcEgress,
        }))
    }

    /// Endpoints now in `state` (all roles and sides).
    fn endpoints_in(&self, state: TcpState) -> Result<i64> {
        let m = self.tracker.metrics()?;
        Ok((0..GAUGE_SLOTS)
            .filter(|s| slot_labels(*s).is_some_and(|(st, _, _)| st == state))
            .map(|s| m.endpoints_in(s))
            .sum())
    }

    /// Counter of state-machine event `bit` (all CPUs).
    fn event_count(&self, bit: u32) -> Result<u64> {
        let m = self
            .tracker
            .metrics()
            .context("reading the tracker's metrics")?;
        Ok(m.events.slots[bit.trailing_zeros() as usize])
    }

    /// Measures `class` on `hook` over flows of network `net`: steady classes with one frame
    /// repeated `repeat` times, transition classes over `flows` flows, once each. Returns the
    /// mean ns per packet.
    fn measure(&self, hook: Hook, class: Class, net: u8, flows: u32, repeat: u32) -> Result<f64> {
        let (prep, measured) = class.steps();
        // The hook the client sends on: the measured one, unless the server sends the
        // measured segment.
        let client_hook = if measured == Step::SynAck {
            hook.other()
        } else {
            hook
        };
        let steady = Class::STEADY.contains(&class);
        let count = if steady { 1 } else { flows };
        let before = class.event().map(|e| self.event_count(e)).transpose()?;
        let mut fast_before = 0;
        let fin_wait_before = self.endpoints_in(TcpState::FinWait1)?;
        let mut total = Duration::ZERO;
        for i in 0..count {
            let flow = Flow::new(net, i);
            for step in prep {
                let (frame, from_server) = flow.frame(*step);
                let on = if from_server {
                    client_hook.other()
                } else {
                    client_hook
                };
                self.tracker(on).run(on, &frame, 1)?;
            }
            let (frame, _) = flow.frame(measured);
            if i == 0 {
                // After the set-up: only the measured frames may take the fast path.
                fast_before = self.hook_counters(hook)?.get(Counter::FastPath);
            }
            total += self
                .tracker(hook)
                .run(hook, &frame, if steady { repeat } else { 1 })?;
        }
        // Every measured frame took the path its class is named after: the hot path's the
        // fast path (so the record was ESTABLISHED on both sides), every other one the slow
        // path; a FIN moved its sender to FIN-WAIT-1.
        let fast = self.hook_counters(hook)?.get(Counter::FastPath) - fast_before;
        let want_fast = if class == Class::HotPath {
            u64::from(repeat)
        } else {
            0
        };
        ensure!(
            fast == want_fast,
            "{} on {}: {fast} frames took the fast path, not {want_fast}",
            class.name(),
            hook.name()
        );
        if class == Class::Fin {
            let moved = self.endpoints_in(TcpState::FinWait1)? - fin_wait_before;
            ensure!(
                moved == i64::from(flows),
                "FIN on {}: {moved} endpoints entered FIN-WAIT-1, not {flows}",
                hook.name()
            );
        }
        if let (Some(e), Some(before)) = (class.event(), before) {
            let want = u64::from(if steady { repeat } else { flows });
            let got = self.event_count(e)? - before;
            ensure!(
                got == want,
                "{} on {}: {got} frames raised the expected event, not {want}",
                class.name(),
                hook.name()
            );
        }
        Ok(total.as_nanos() as f64 / f64::from(count))
    }

    /// The floor on `hook`: one frame `repeat` times, or `flows` distinct frames once each.
    fn measure_floor(&self, hook: Hook, flows: u32, repeat: u32) -> Result<f64> {
        let prog = self.floor(hook);
        if repeat > 1 {
            let (frame, _) = Flow::new(0, 0).frame(Step::Data);
            return Ok(prog.run(hook, &frame, repeat)?.as_nanos() as f64);
        }
        let mut total = Duration::ZERO;
        for i in 0..flows {
            let (frame, _) = Flow::new(0, i).frame(Step::Syn);
            total += prog.run(hook, &frame, 1)?;
        }
        Ok(total.as_nanos() as f64 / f64::from(flows))
    }

    /// Fails if any segment of the run was refused or ignored: a full table or a segment the
    /// state machine rejected would mean a class measured something else than it says.
    fn check_clean(&self) -> Result<()> {
        let m = self.tracker.metrics()?;
        let bad = [
            events::INVALID_RST,
            events::INVALID_FIN,
            events::INVALID_FLAGS,
            events::INVALID_ACK,
            events::UNTRACKED,
        ]
        .map(|b| b.trailing_zeros() as usize)
        .into_iter()
        .chain([
            event_slots::FLOWS_INSERT_FAILED,
            event_slots::FLOWS6_INSERT_FAILED,
            event_slots::HALF_OPEN_INSERT_FAILED,
            event_slots::UNTRACKED_SEGMENTS,
            event_slots::LOST_RACE,
        ]);
        for slot in bad {
            if m.events.slots[slot] != 0 {
                bail!(
                    "event slot {slot} counted {} during the run",
                    m.events.slots[slot]
                );
            }
        }
        Ok(())
    }
}

/// Figures of one (hook, class) case.
#[derive(Default)]
struct Case {
    ns: Runs,
    over_floor: Runs,
}

/// Measures item 1.
pub fn run(cfg: &Config) -> Result<Section> {
    let flows: u32 = cfg.pick(65_536, 4_096);
    let repeat: u32 = cfg.pick(1_000_000, 100_000);
    let options = LoadOptions {
        flows_capacity: CAPACITY,
        flows6_capacity: CAPACITY,
        half_open_capacity: CAPACITY,
        ..LoadOptions::default()
    };
    // Floors by (hook, steady?), cases by (hook, class), the reference by hook.
    let mut floors: Vec<((Hook, bool), Runs)> = Vec::new();
    let mut cases: Vec<((Hook, Class), Case)> = Vec::new();
    let mut references: Vec<(Hook, Case)> = Vec::new();
    // The reference's new flows by hook (next to the SYN class).
    let mut references_new: Vec<(Hook, Case)> = Vec::new();
    // Ratios within each run: (hook) → hot path over floor / reference over floor.
    let mut ratios: Vec<(Hook, Runs)> = Vec::new();
    let mut runs_done = 0;
    for run in 0..cfg.runs {
        if !cfg.time_left() {
            break;
        }
        eprintln!("bench: per-packet run {}/{}", run + 1, cfg.runs);
        // Fresh maps every run, and the floors loaded next to them.
        let tracker = Tracker::load(&options).context("loading the tracker")?;
        let ebpf = tracker.ebpf();
        let xdp: &Xdp = ebpf.program(XDP_PROGRAM).context(XDP_PROGRAM)?.try_into()?;
        let tc: &SchedClassifier = ebpf.program(TC_PROGRAM).context(TC_PROGRAM)?.try_into()?;
        let bench = BenchPrograms::load_with(Some(CAPACITY))?;
        let p = Programs {
            tracker: &tracker,
            bench: &bench,
            xdp: Prog::Xdp(xdp),
            tc: Prog::Tc(tc),
            xdp_floor: Prog::Xdp(bench.xdp_pass()?),
            tc_floor: Prog::Tc(bench.tc_ok()?),
            xdp_ref: Prog::Xdp(bench.ref_xdp()?),
            tc_ref: Prog::Tc(bench.ref_tc()?),
        };
        for (h, hook) in Hook::ALL.into_iter().enumerate() {
            for steady in [true, false] {
                let floor = p.measure_floor(hook, flows, if steady { repeat } else { 1 })?;
                let (r, list) = if steady {
                    (p.measure_reference(hook, repeat)?, &mut references)
                } else {
                    // A network of its own (the classes' are 1 + h * 16 + 0..13).
                    let net = 1 + (h * 16 + 15) as u8;
                    let r = p
                        .measure_reference_new(hook, net, flows)
                        .with_context(|| format!("the reference's new flows on {}", hook.name()))?;
                    (r, &mut references_new)
                };
                let reference = entry(list, hook);
                reference.ns.push(r);
                reference.over_floor.push(r - floor);
                let classes: &[Class] = if steady {
                    &Class::STEADY
                } else {
                    &Class::TRANSITION
                };
                for (c, class) in classes.iter().enumerate() {
                    let net = 1 + (h * 16 + c + if steady { 0 } else { 8 }) as u8;
                    let ns = p
                        .measure(hook, *class, net, flows, repeat)
                        .with_context(|| format!("{} on {}", class.name(), hook.name()))?;
                    let case = entry(&mut cases, (hook, *class));
                    case.ns.push(ns);
                    case.over_floor.push(ns - floor);
                }
                entry(&mut floors, (hook, steady)).push(floor);
            }
        }
        p.check_clean()?;
        for hook in Hook::ALL {
            let hot = *entry(&mut cases, (hook, Class::HotPath)).over_floor.last();
            let reference = *entry(&mut references, hook).over_floor.last();
            entry(&mut ratios, hook).push(hot / reference);
        }
        runs_done += 1;
    }
    ensure!(runs_done > 0, "no run finished within the time cap");

    let mut table = Table::new(&[
        "hook",
        "case",
        "method",
        "ns/packet",
        "runs",
        "ns over floor",
        "runs",
        "target",
        "met?",
    ]);
    let steady_method = format!("repeat {repeat}");
    let transition_method = format!("{flows} flows × 1");
    let mut json_cases = Vec::new();
    for hook in Hook::ALL {
        for steady in [true, false] {
            let method = if steady {
                &steady_method
            } else {
                &transition_method
            };
            let floor = entry(&mut floors, (hook, steady));
            table.row(vec![
                hook.name().to_owned(),
                format!(
                    "floor ({})",
                    if hook == Hook::Xdp {
                        "XDP_PASS"
                    } else {
                        "TC_ACT_OK"
                    }
                ),
                method.clone(),
                floor.cell(1),
                floor.range(1),
                "–".to_owned(),
                "–".to_owned(),
                "–".to_owned(),
                met(None),
            ]);
            json_cases.push(json!({
                "hook": hook.name(), "case": "floor", "steady": steady, "ns": floor.json(),
            }));
            let (r, name, case) = if steady {
                (
                    entry(&mut references, hook),
                    "reference: minimal tracker (1 lookup, clock, 2 atomic adds)",
                    "reference",
                )
            } else {
                (
                    entry(&mut references_new, hook),
                    "reference: its new flow (a lookup that misses, clock, an insert)",
                    "reference_new_flow",
                )
            };
            table.row(vec![
                hook.name().to_owned(),
                name.to_owned(),
                method.clone(),
                r.ns.cell(1),
                r.ns.range(1),
                r.over_floor.cell(1),
                r.over_floor.range(1),
                "–".to_owned(),
                met(None),
            ]);
            json_cases.push(json!({
                "hook": hook.name(), "case": case, "steady": steady,
                "ns": r.ns.json(), "ns_over_floor": r.over_floor.json(),
            }));
            let classes: &[Class] = if steady {
                &Class::STEADY
            } else {
                &Class::TRANSITION
            };
            for class in classes {
                let case = entry(&mut cases, (hook, *class));
                let (target, ok) = match class {
                    Class::HotPath => {
                        let ratio = entry(&mut ratios, hook).median();
                        (
                            format!(
                                "≤ {HOT_PATH_VS_REFERENCE} × reference (now {})",
                                num(ratio, 2)
                            ),
                            Some(ratio <= HOT_PATH_VS_REFERENCE),
                        )
                    }
                    Class::Syn | Class::FinalAck => {
                        let reference = entry(&mut references_new, hook).over_floor.median();
                        (
                            format!(
                                "≤ {NEW_FLOW_TARGET_NS} over the floor ({} × the reference's \
                                 new flow)",
                                num(case.over_floor.median() / reference, 2)
                            ),
                            Some(case.over_floor.median() <= NEW_FLOW_TARGET_NS),
                        )
                    }
                    _ => ("–".to_owned(), None),
                };
                table.row(vec![
                    hook.name().to_owned(),
                    class.name().to_owned(),
                    method.clone(),
                    case.ns.cell(1),
                    case.ns.range(1),
                    case.over_floor.cell(1),
                    case.over_floor.range(1),
                    target,
                    met(ok),
                ]);
                json_cases.push(json!({
                    "hook": hook.name(),
                    "case": class.name(),
                    "steady": steady,
                    "ns": case.ns.json(),
                    "ns_over_floor": case.over_floor.json(),
                    "met": ok,
                }));
            }
        }
    }
    Ok(Section {
        key: KEY,
        title: TITLE.to_owned(),
        intro: vec![
            format!(
                "The agent's own object and loader (`Tracker::load`, tables of {CAPACITY} \
                 entries, fresh every run); kernel-reported ns per run (`duration` of \
                 BPF_PROG_TEST_RUN), never wall time. Steady cases: one frame, repeat \
                 {repeat}. Transition cases change a flow's state on first sight: {flows} \
                 distinct flows are brought to the preceding state through the programs, then \
                 each gets its frame once and the kernel's times are averaged; their floor is \
                 measured the same way (repeat 1 costs the harness's own clock reads, hence the \
                 higher floor). Every measured frame is checked to raise the state-machine event \
                 of its class, and no segment of a run may be rejected or find a full table."
            ),
            format!(
                "Frames: IPv4; the hot path is a {DATA_BYTES}-byte data segment. On XDP a \
                 connection is inbound (its client is remote) except for SYN-ACK, which arrives \
                 on XDP for an outbound one; on TC the reverse. Every hot-path frame is checked \
                 to have taken the fast path (its counter), every other one the slow path; \
                 every FIN to have moved its sender to FIN-WAIT-1."
            ),
            format!(
                "The reference, measured in the same run: a minimal tracker of the benchmark's \
                 own (`tcp-ebpf/src/bin/bench.rs`: parse, one hash lookup of a 16-byte IPv4 key, \
                 `bpf_ktime_get_ns`, two atomic adds), one flow, repeat {repeat}; and its new \
                 flows ({flows} SYNs of distinct flows once each, into a table of the same \
                 {CAPACITY} entries as tcpscope's): what a first packet costs any hash-table \
                 tracker on this machine. **Targets:** \
                 hot path over the floor ≤ {HOT_PATH_VS_REFERENCE} × the reference's, on XDP \
                 and on TC (the ratio is taken within each run); the SYN that creates a \
                 half-open record and the ACK that promotes it ≤ {NEW_FLOW_TARGET_NS} ns over \
                 the floor."
            ),
        ],
        tables: vec![table],
        notes: Vec::new(),
        json: json!({
            "flows": flows,
            "repeat": repeat,
            "runs": runs_done,
            "cases": json_cases,
        }),
        targets: vec![
            Target::at_most(
                "hot_path_vs_reference",
                entry(&mut ratios, Hook::Xdp).median(),
                HOT_PATH_VS_REFERENCE,
                "ratio",
            ),
            Target::at_most(
                "hot_path_tc_vs_reference",
                entry(&mut ratios, Hook::Tc).median(),
                HOT_PATH_VS_REFERENCE,
                "ratio",
            ),
            // The slower hook's figure.
            Target::at_most(
                "syn_new_flow_ns_over_floor",
                Hook::ALL
                    .into_iter()
                    .map(|h| entry(&mut cases, (h, Class::Syn)).over_floor.median())
                    .fold(f64::NAN, f64::max),
                NEW_FLOW_TARGET_NS,
                "ns",
            ),
            Target::at_most(
                "promotion_ns_over_floor",
                Hook::ALL
                    .into_iter()
                    .map(|h| entry(&mut cases, (h, Class::FinalAck)).over_floor.median())
                    .fold(f64::NAN, f64::max),
                NEW_FLOW_TARGET_NS,
                "ns",
            ),
        ],
    })
}

/// The entry for `key`, created empty on first use (keeps the cases in measuring order).
fn entry<K: PartialEq, V: Default>(list: &mut Vec<(K, V)>, key: K) -> &mut V {
    let at = match list.iter().position(|(k, _)| *k == key) {
        Some(at) => at,
        None => {
            list.push((key, V::default()));
            list.len() - 1
        }
    };
    &mut list[at].1
}
