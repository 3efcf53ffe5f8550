//! `tcpscope replay`: the tcp-common state machine in userspace over a capture file, with the
//! packet timestamps as the clock (mirror mode: every endpoint's side is unknown).

use std::{collections::HashMap, path::Path};

use tcp_common::{
    flow::{Flow, FlowKey},
    parse::{PacketClass, parse_full},
    state::{Role, Side, TcpState, events as ev},
    track::{Timeouts, expire_fin_wait2, expired, track},
};

use crate::{
    capture::{self, CaptureError},
    flows::{Record, Table},
    report::Report,
};

/// How often (capture time) idle and TIME-WAIT records are swept.
const SWEEP_EVERY_NS: u64 = 1_000_000_000;

/// The replay's flow table and tallies.
pub struct Replay {
    flows: HashMap<FlowKey, Flow>,
    timeouts: Timeouts,
    last_sweep_ns: u64,
    now_ns: u64,
    /// Everything counted.
    pub report: Report,
    /// How the capture file ended ([`capture::Ending::Complete`] for frames fed one by one).
    pub ending: capture::Ending,
}

impl Replay {
    /// An empty replay with these timeouts.
    #[must_use]
    pub fn new(timeouts: Timeouts) -> Self {
        Self {
            flows: HashMap::new(),
            timeouts,
            last_sweep_ns: 0,
            now_ns: 0,
            report: Report::default(),
            ending: capture::Ending::Complete,
        }
    }

    /// Feeds one frame seen at `ts_ns`.
    pub fn frame(&mut self, ts_ns: u64, frame: &[u8]) {
        self.now_ns = self.now_ns.max(ts_ns);
        if self.now_ns.saturating_sub(self.last_sweep_ns) >= SWEEP_EVERY_NS {
            self.sweep();
        }
        let parsed = parse_full(frame);
        self.report.packets.count(parsed.class as u8, &parsed);
        if parsed.class != PacketClass::Tcp {
            return;
        }
        let seg = parsed.segment;
        let (key, dir) = FlowKey::of(&seg);
        let existing = self.flows.get(&key).copied();
        let mut flow = existing.unwrap_or(Flow::EMPTY);
        let before = flow;
        let events = track(&mut flow, &seg, dir, Side::Unknown, ts_ns);
        if events & ev::UNTRACKED != 0 {
            self.report.count_events(events, Side::Unknown);
            return;
        }
        if events & ev::NEW_FLOW != 0 && existing.is_some() {
            // The record starts over (reuse, new attempt): account for the old connection.
            self.report.finish(&before);
        }
        self.report.count_events(events, Side::Unknown);
        if events & ev::ACCEPT_QUEUE_OVERFLOW != 0 {
            *self
                .report
                .accept_queue_overflows
                .entry(seg.sport)
                .or_default() += 1;
        }
        if events & ev::HANDSHAKE_COMPLETED != 0 {
            self.report.observe_handshake(&flow, ts_ns);
        }
        self.flows.insert(key, flow);
    }

    /// Removes the records whose timeout has passed at the current capture time.
    fn sweep(&mut self) {
        let (now, t) = (self.now_ns, self.timeouts);
        let report = &mut self.report;
        self.flows.retain(|k, f| {
            let keep = !expired(f, now, &t);
            if keep {
                expire_fin_wait2(f, now, &t);
            } else {
                report.expire(k, f);
            }
            keep
        });
        self.last_sweep_ns = now;
    }

    /// Ends the replay: a last sweep at the time of the last packet, then the per-state
    /// endpoint counts of the records still held.
    pub fn finish(&mut self) {
        self.sweep();
        for flow in self.flows.values() {
            self.report.count_endpoints(flow);
        }
        for flow in self.flows.values() {
            self.report.finish_open(flow);
        }
    }

    /// The records held, in key order.
    #[must_use]
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        let mut v: Vec<_> = self.flows.iter().map(|(k, f)| (*k, *f)).collect();
        v.sort_by_key(|r| r.0);
        v
    }

    /// The records held, in key order, as `tcpscope flows` reads them from the kernel's
    /// tables (the table a record would be in; no view walk marks a silent server).
    #[must_use]
    pub fn records(&self) -> Vec<Record> {
        self.flows()
            .into_iter()
            .map(|(key, flow)| Record {
                table: if flow.is_half_open() {
                    Table::HalfOpen
                } else {
                    Table::Established
                },
                key,
                flow,
                server_silent: false,
            })
            .collect()
    }

    /// The time of the latest frame (capture clock, ns).
    #[must_use]
    pub const fn now_ns(&self) -> u64 {
        self.now_ns
    }
}

/// Replays a capture file with these timeouts.
///
/// A file cut short in the middle of a record is replayed up to its last complete packet,
/// and says so in [`Replay::ending`].
///
/// # Errors
/// When the file cannot be read.
pub fn replay_file(path: &Path, timeouts: Timeouts) -> Result<Replay, CaptureError> {
    let mut replay = Replay::new(timeouts);
    replay.ending = capture::for_each_frame(path, |ts, frame| replay.frame(ts, frame))?;
    replay.finish();
    Ok(replay)
}

/// Keeps the compiler honest about every state/role/side combination being reportable.
const _: () = assert!(TcpState::COUNT * Role::ALL.len() * Side::ALL.len() < 1000);
