//! Reconciliation: the tracker's tables against the truth, so that a restart (or anything
//! the hooks missed) does not leave them lying.
//!
//! Host mode: the kernel's own socket table (sock_diag, see `sockets.rs`) is the truth for
//! the local endpoints of the attached interfaces' addresses. Once a second for the first
//! [`HOST_START`], then every [`HOST_PERIOD`]:
//! - an established record whose local endpoint is in a state that holds a socket (not
//!   CLOSED, not TIME-WAIT: those end on their own timeouts) is removed
//!   (`tcpscope_reconciled_total{action="removed"}`) when its socket is in another state, or
//!   when an earlier agent left it and its socket is gone (one of this agent's with no socket
//!   may be a NAT'd connection, whose socket lives in another namespace). The verdict must be
//!   the same at two passes in a row (a dump is no snapshot: a socket may slip between two of
//!   its reads), for a record that saw no segment within [`QUIET`];
//! - at the first pass, a socket past its handshake that no record holds is picked up in its
//!   real state (`{action="picked_up"}`); later, only those whose record was removed for being
//!   in another state (what the tracker's own timeouts ended stays ended).
//!
//! Mirror mode has no socket table to ask: records that no segment has touched since the
//! agent started are removed once, `--stale-after-restart-secs` after the start.
//!
//! Removal goes through the reaper program (the DOOMED maps): under the record's lock, and
//! only if the record is unchanged since it was read here, so that the gauges stay exact and
//! a segment that came meanwhile wins. Pick-ups are inserted here, on the reaper's thread,
//! which is the only writer of the reaper's copy of the metrics: the gauges are adjusted
//! there, between two walks.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, IterableMap as _, Map, MapData, PerCpuArray, PerCpuValues};
use log::{debug, info};
use tcp_common::{
    event_counters::event_slots,
    flow::{EstablishedEntry, Flow, FlowKey, FlowKey4, LAST_SHIFT, flow_flags, view_marks},
    gauges::{NO_SLOT, established_slot},
    metrics::{Metrics, table},
    parse::Segment,
    state::{Side, TcpState},
    track::Timeouts,
};

use tcp_common::object::{FLOWS4_MAP, FLOWS6_MAP, HALF_OPEN_MAP};

use crate::{
    batch,
    counters::METRICS_MAP,
    error::Error,
    flows::monotonic_ns,
    loader::Tracker,
    sockets::{self, Socket},
};

/// Host mode: the period of reconciliation after the first [`HOST_START`].
pub const HOST_PERIOD: Duration = Duration::from_secs(30);
/// Host mode: reconciliation runs at every walk for this long after the start (a record
/// removed for being in another state is picked up one walk after its deletion).
pub const HOST_START: Duration = Duration::from_secs(6);
/// A record that saw a segment this recently is left alone.
pub const QUIET: Duration = Duration::from_secs(1);

/// `BPF_NOEXIST` (linux/bpf.h).
const BPF_NOEXIST: u64 = 1;
/// The DOOMED maps' capacity.
const DOOMED_CAPACITY: usize = tcp_common::object::DOOMED_CAPACITY as usize;

/// The index of the reaper's copy in the metrics map.
const REAPER_WRITER: u32 = tcp_common::object::writer::REAPER;

/// What reconciliation does in this agent.
#[derive(Clone, Debug)]
pub enum Policy {
    /// Host mode: against sock_diag, for sockets on the addresses of the interfaces attached.
    Host,
    /// Mirror mode: remove the records untouched since the start, this long after it.
    Mirror { stale_after: Duration },
}

/// Reconciliation state, on the reaper's thread.
pub struct Reconciler {
    policy: Policy,
    started: Instant,
    /// When the first walk was over. A record's time is its last segment's to within a walk
    /// (the fast path only marks it seen, the walk dates the mark): a record an earlier agent
    /// left with such a mark is dated by this agent's first walk, and taken as untouched
    /// since the start as long as its time is no later.
    first_walk_ns: Option<u64>,
    last: Option<Instant>,
    /// Mirror mode: the DOOMED maps were full: another pass follows.
    mirror_left: bool,
    doomed4: HashMap<MapData, FlowKey4, u32>,
    doomed6: HashMap<MapData, FlowKey, u32>,
    flows4: HashMap<MapData, FlowKey4, EstablishedEntry>,
    flows6: HashMap<MapData, FlowKey, EstablishedEntry>,
    half_open: HashMap<MapData, FlowKey, tcp_common::flow::HalfOpenEntry>,
    metrics: PerCpuArray<MapData, Metrics>,
    /// Keys put in the DOOMED maps for the coming walk.
    pending: (Vec<FlowKey4>, Vec<FlowKey>),
    /// Host mode: the verdicts of the last pass on records it found wrong (`None`: no socket,
    /// `Some(state)`: a socket in that state).
    suspects: StdHashMap<(SocketAddr, SocketAddr), Option<TcpState>>,
    /// Host mode: connections whose record was removed for being in another state than their
    /// socket, to pick up once the record is gone.
    replace: HashSet<(SocketAddr, SocketAddr)>,
    /// Host mode: the connections that existed at start were picked up.
    picked_initial: bool,
}

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Records handed to the walk for removal.
    pub doomed: u64,
    /// Records picked up.
    pub picked_up: u64,
}

impl Reconciler {
    /// Opens its own handles on the tracker's maps.
    ///
    /// # Errors
    /// When a map is missing or its descriptor cannot be duplicated.
    pub fn new(tracker: &Tracker, policy: Policy) -> Result<Self, Error> {
        let ebpf = tracker.ebpf();
        let owned = |name: &'static str| -> Result<MapData, Error> {
            let map = ebpf.map(name).ok_or(Error::Missing { kind: "map", name })?;
            let data = match map {
                Map::HashMap(d) | Map::PerCpuArray(d) => d,
                _ => {
                    return Err(Error::Missing {
                        kind: "hash or per-CPU array map",
                        name,
                    });
                }
            };
            let fd = std::os::fd::AsFd::as_fd(data.fd())
                .try_clone_to_owned()
                .map_err(|e| Error::Map {
                    name,
                    source: aya::maps::MapError::IoError(e),
                })?;
            MapData::from_fd(fd).map_err(|source| Error::Map { name, source })
        };
        let hash = |name: &'static str| -> Result<Map, Error> { Ok(Map::HashMap(owned(name)?)) };
        let err = |name: &'static str| move |source| Error::Map { name, source };
        Ok(Self {
            policy,
            started: Instant::now(),
            first_walk_ns: None,
            last: None,
            mirror_left: false,
            doomed4: HashMap::try_from(hash(DOOMED4_MAP)?).map_err(err(DOOMED4_MAP))?,
            doomed6: HashMap::try_from(hash(DOOMED6_MAP)?).map_err(err(DOOMED6_MAP))?,
            flows4: HashMap::try_from(hash(FLOWS4_MAP)?).map_err(err(FLOWS4_MAP))?,
            flows6: HashMap::try_from(hash(FLOWS6_MAP)?).map_err(err(FLOWS6_MAP))?,
            half_open: HashMap::try_from(hash(HALF_OPEN_MAP)?).map_err(err(HALF_OPEN_MAP))?,
            metrics: PerCpuArray::try_from(Map::PerCpuArray(owned(METRICS_MAP)?))
                .map_err(err(METRICS_MAP))?,
            pending: (Vec::new(), Vec::new()),
            suspects: StdHashMap::new(),
            replace: HashSet::new(),
            picked_initial: false,
        })
    }

    /// Whether a pass is due now.
    #[must_use]
    pub fn due(&self) -> bool {
        match &self.policy {
            Policy::Host => {
                self.started.elapsed() < HOST_START
                    || self.last.is_none_or(|l| l.elapsed() >= HOST_PERIOD)
            }
            Policy::Mirror { stale_after } => {
                (self.last.is_none() || self.mirror_left)
                    && self.first_walk_ns.is_some()
                    && self.started.elapsed() >= *stale_after
            }
        }
    }

    /// Runs a pass: picks up what is missing now, and fills the DOOMED maps for the walk
    /// that follows (then [`Self::after_walk`]).
    ///
    /// # Errors
    /// When the socket table or a map cannot be read or written; nothing is left doomed.
    pub fn prepare(&mut self, tracker: &Tracker) -> Result<Pass, Error> {
        self.last = Some(Instant::now());
        let now = monotonic_ns();
        let records = self.records(now)?;
        let mut pass = Pass::default();
        match self.policy.clone() {
            Policy::Mirror { .. } => {
                let untouched_until = self.first_walk_ns.unwrap_or(0);
                self.mirror_left = false;
                for r in &records {
                    if r.last_ns <= untouched_until && !r.dead {
                        if !self.doom(r)? {
                            // The rest at the next walk.
                            self.mirror_left = true;
                            break;
                        }
                        pass.doomed += 1;
                    }
                }
            }
            Policy::Host => {
                let ifaces: Vec<String> =
                    tracker.attachments().into_iter().map(|a| a.iface).collect();
                let sockets = sockets::dump().map_err(|source| Error::SocketTable { source })?;
                let (mine, local) = sockets::addresses(&ifaces);
                let listening: HashSet<(IpAddr, u16)> = sockets
                    .iter()
                    .filter(|s| s.state == TcpState::Listen)
                    .map(|s| (s.local.ip(), s.local.port()))
                    .collect();
                let open: StdHashMap<(SocketAddr, SocketAddr), Socket> = sockets
                    .into_iter()
                    .filter(|s| {
                        s.state != TcpState::Listen
                            && mine.contains(&s.local.ip())
                            && !local.contains(&s.remote.ip())
                    })
                    .map(|s| ((s.local, s.remote), s))
                    .collect();
                let mut held: HashSet<(SocketAddr, SocketAddr)> = self.half_open_pairs()?;
                let mut suspects = StdHashMap::new();
                for r in &records {
                    held.insert((r.local, r.remote));
                    held.insert((r.remote, r.local));
                    if r.dead
                        || !mine.contains(&r.local.ip())
                        || matches!(
                            r.local_state,
                            TcpState::Closed | TcpState::TimeWait | TcpState::Listen
                        )
                        || now.saturating_sub(r.last_ns) < QUIET.as_nanos() as u64
                        || r.silent_unconfirmed
                    {
                        continue;
                    }
                    let pair = (r.local, r.remote);
                    let verdict = match open.get(&pair) {
                        Some(s) if s.state == r.local_state => continue,
                        Some(s) => Some(s.state),
                        // No socket: removed only when an earlier agent left the record. One
                        // of this agent's may be a NAT'd connection (XDP sees it before DNAT):
                        // its socket is in another namespace, and its record is right.
                        None if self.first_walk_ns.is_some_and(|w| r.last_ns <= w) => None,
                        None => continue,
                    };
                    // A dump is no snapshot (a socket may slip between two of its reads):
                    // the same verdict at two passes in a row.
                    if self.suspects.get(&pair) == Some(&verdict) {
                        debug!(
                            "reconcile: {} - {} tracked {:?}, socket {:?}: removed",
                            r.local, r.remote, r.local_state, verdict
                        );
                        if self.doom(r)? {
                            pass.doomed += 1;
                            if verdict.is_some() {
                                self.replace.insert(pair);
                            }
                        }
                    } else {
                        suspects.insert(pair, verdict);
                    }
                }
                self.suspects = suspects;
                // At the first pass, every connection no record holds; later, only those whose
                // record was removed for being in another state (the others have no record
                // because the tracker's own timeouts ended it: they stay ended).
                let first = !self.picked_initial;
                let mut delta = Metrics::ZERO;
                let mut failed = None;
                for (pair, s) in &open {
                    if held.contains(pair)
                        || matches!(s.state, TcpState::SynSent | TcpState::SynReceived)
                        || !(first || self.replace.contains(pair))
                    {
                        continue;
                    }
                    let (ip, port) = (pair.0.ip(), pair.0.port());
                    // A dual-stack listener on [::] accepts IPv4 connections too.
                    let server = [
                        ip,
                        unspecified(ip),
                        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                    ]
                    .iter()
                    .any(|a| listening.contains(&(*a, port)));
                    match self.pick_up(s, server, now, &mut delta) {
                        Ok(picked) => {
                            if picked {
                                pass.picked_up += 1;
                            }
                            self.replace.remove(pair);
                        }
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                self.replace.retain(|p| open.contains_key(p));
                self.picked_initial |= failed.is_none();
                // The gauges of what was inserted, whatever happened after.
                if delta != Metrics::ZERO {
                    self.add_to_reaper_copy(&delta)?;
                }
                if let Some(e) = failed {
                    return Err(e);
                }
            }
        }
        if pass != Pass::default() {
            info!(
                "reconciled with the kernel's sockets: {} stale record(s) to remove, {} \
                 connection(s) picked up",
                pass.doomed, pass.picked_up
            );
        }
        Ok(pass)
    }

    /// Empties the DOOMED maps after the walk that used them (called after every walk).
    pub fn after_walk(&mut self) {
        // The end of the walk's tick: a record the walk dated is no later (see `last_ns`).
        self.first_walk_ns
            .get_or_insert_with(|| monotonic_ns() | ((1 << LAST_SHIFT) - 1));
        for k in self.pending.0.drain(..) {
            let _ = self.doomed4.remove(&k);
        }
        for k in self.pending.1.drain(..) {
            let _ = self.doomed6.remove(&k);
        }
    }

    /// Hands `r` to the coming walk for removal; `false` when the DOOMED maps are full (the
    /// rest waits for the next pass).
    fn doom(&mut self, r: &Tracked) -> Result<bool, Error> {
        if self.pending.0.len() + self.pending.1.len() >= DOOMED_CAPACITY {
            return Ok(false);
        }
        match r.key {
            Key::V4(k) => {
                self.doomed4
                    .insert(&k, &r.last_ticks, 0)
                    .map_err(|source| Error::Map {
                        name: DOOMED4_MAP,
                        source,
                    })?;
                self.pending.0.push(k);
            }
            Key::V6(k) => {
                self.doomed6
                    .insert(&k, &r.last_ticks, 0)
                    .map_err(|source| Error::Map {
                        name: DOOMED6_MAP,
                        source,
                    })?;
                self.pending.1.push(k);
            }
        }
        Ok(true)
    }

    /// The established records, with what reconciliation needs of each (read in batches:
    /// a million records cost a fraction of a second, not two syscalls each).
    fn records(&self, now: u64) -> Result<Vec<Tracked>, Error> {
        let err = |name| {
            move |e| Error::Map {
                name,
                source: aya::maps::MapError::IoError(e),
            }
        };
        let mut v4: Vec<(FlowKey4, EstablishedEntry)> = Vec::new();
        // SAFETY: each table's own key and value types, plain data.
        unsafe { batch::lookup(self.flows4.map().fd().as_fd(), &mut v4) }
            .map_err(err(FLOWS4_MAP))?;
        let mut v6: Vec<(FlowKey, EstablishedEntry)> = Vec::new();
        // SAFETY: as above.
        unsafe { batch::lookup(self.flows6.map().fd().as_fd(), &mut v6) }
            .map_err(err(FLOWS6_MAP))?;
        let mut out = Vec::with_capacity(v4.len() + v6.len());
        out.extend(
            v4.iter()
                .map(|(k, e)| Tracked::new(Key::V4(*k), &k.widen(), e, now)),
        );
        out.extend(v6.iter().map(|(k, e)| Tracked::new(Key::V6(*k), k, e, now)));
        Ok(out)
    }

    /// The endpoint pairs of the half-open table, both ways.
    fn half_open_pairs(&self) -> Result<HashSet<(SocketAddr, SocketAddr)>, Error> {
        let mut all: Vec<(FlowKey, tcp_common::flow::HalfOpenEntry)> = Vec::new();
        // SAFETY: the half-open table's own key and value types, plain data.
        unsafe { batch::lookup(self.half_open.map().fd().as_fd(), &mut all) }.map_err(|e| {
            Error::Map {
                name: HALF_OPEN_MAP,
                source: aya::maps::MapError::IoError(e),
            }
        })?;
        let mut out = HashSet::new();
        for (k, _) in &all {
            let (a, b) = (endpoint(k, 0), endpoint(k, 1));
            out.insert((a, b));
            out.insert((b, a));
        }
        Ok(out)
    }

    /// Inserts a record for socket `s` (the local endpoint the server when `server`); adds
    /// its gauges to `delta`. `false` when a record appeared meanwhile.
    fn pick_up(
        &mut self,
        s: &Socket,
        server: bool,
        now: u64,
        delta: &mut Metrics,
    ) -> Result<bool, Error> {
        let mut seg = Segment::default();
        let (local_ip, remote_ip, ipv6) = match (s.local.ip(), s.remote.ip()) {
            (IpAddr::V4(l), IpAddr::V4(r)) => (l.octets().to_vec(), r.octets().to_vec(), false),
            (IpAddr::V6(l), IpAddr::V6(r)) => (l.octets().to_vec(), r.octets().to_vec(), true),
            _ => return Ok(false),
        };
        seg.src[..local_ip.len()].copy_from_slice(&local_ip);
        seg.dst[..remote_ip.len()].copy_from_slice(&remote_ip);
        seg.sport = s.local.port();
        seg.dport = s.remote.port();
        seg.ipv6 = ipv6;
        let (wide, l) = FlowKey::of(&seg);
        let r = 1 - l;
        let mut flow = Flow::EMPTY;
        flow.flags = flow_flags::SEEN | flow_flags::PICKED_UP;
        flow.ep[l].state = s.state as u8;
        flow.ep[r].state = peer_state(s.state) as u8;
        flow.ep[l].side = Side::Local as u8;
        flow.ep[r].side = Side::Remote as u8;
        flow.client = if server { r as u8 } else { l as u8 };
        flow.last_ns = now;
        if s.state == TcpState::TimeWait {
            // Linux ends a TIME-WAIT socket when its timer fires; the tracker counts its
            // TIME-WAIT from `closed_ns`: dated as far back as Linux's has run (so that both
            // end together with the default --time-wait-secs, Linux's 60 s).
            let left = s.expires.as_nanos() as u64;
            let linux = Timeouts::DEFAULT.time_wait;
            flow.closed_ns = now.saturating_add(left).saturating_sub(linux).max(1);
        } else if flow.ep[r].state() == TcpState::TimeWait {
            flow.closed_ns = now;
        }
        let mut entry = EstablishedEntry::default();
        entry.rec.pack_from(&flow);
        let inserted = if ipv6 {
            self.flows6
                .insert(&wide, &entry, BPF_NOEXIST)
                .map(|()| table::ESTABLISHED_V6)
        } else {
            let (k4, _) = FlowKey4::of(&seg);
            self.flows4
                .insert(&k4, &entry, BPF_NOEXIST)
                .map(|()| table::ESTABLISHED_V4)
        };
        let t = match inserted {
            Ok(t) => t,
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                return Ok(false);
            }
            // The table is full: refused and counted, as the programs do.
            Err(aya::maps::MapError::SyscallError(e))
                if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)) =>
            {
                delta.events.bump(event_slots::flows_insert_failed(ipv6));
                return Ok(false);
            }
            Err(source) => {
                return Err(Error::Map {
                    name: if ipv6 { FLOWS6_MAP } else { FLOWS4_MAP },
                    source,
                });
            }
        };
        delta.inserted(t);
        for i in 0..2 {
            delta.move_endpoint(NO_SLOT, established_slot(&entry.rec, i));
        }
        delta.events.bump(event_slots::RECONCILED_PICKED_UP);
        Ok(true)
    }

    /// Adds `delta` to the reaper's copy of the metrics (first CPU's). Only the reaper's
    /// thread writes that copy, and this runs on it, between walks.
    fn add_to_reaper_copy(&mut self, delta: &Metrics) -> Result<(), Error> {
        let err = |source: aya::maps::MapError| Error::Map {
            name: METRICS_MAP,
            source,
        };
        let values = self.metrics.get(&REAPER_WRITER, 0).map_err(err)?;
        let mut all: Vec<Metrics> = values.iter().copied().collect();
        if let Some(first) = all.first_mut() {
            first.accumulate(delta);
        }
        let values =
            PerCpuValues::try_from(all).map_err(|e| err(aya::maps::MapError::IoError(e)))?;
        self.metrics.set(REAPER_WRITER, values, 0).map_err(err)
    }
}

pub use tcp_common::object::{DOOMED4_MAP, DOOMED6_MAP};

/// A record's key in its own table.
#[derive(Clone, Copy, Debug)]
enum Key {
    V4(FlowKey4),
    V6(FlowKey),
}

/// What reconciliation needs of a record.
struct Tracked {
    key: Key,
    /// The local endpoint (the first one when neither is known to be local).
    local: SocketAddr,
    remote: SocketAddr,
    local_state: TcpState,
    last_ns: u64,
    last_ticks: u32,
    dead: bool,
    /// The view walk suspects its server silent and has not confirmed it yet (left until it
    /// is counted).
    silent_unconfirmed: bool,
}

impl Tracked {
    fn new(key: Key, wide: &FlowKey, e: &EstablishedEntry, now: u64) -> Self {
        let rec = &e.rec;
        let l = usize::from(rec.ep_side(1) == Side::Local && rec.ep_side(0) != Side::Local);
        let local_state = if rec.ep_side(l) == Side::Local {
            rec.ep_state(l)
        } else {
            // No local endpoint (mirror mode): nothing to compare with a socket.
            TcpState::Closed
        };
        Self {
            key,
            local: endpoint(wide, l),
            remote: endpoint(wide, 1 - l),
            local_state,
            // 0: seen by the fast path since the last walk, that is, now.
            last_ns: if rec.last == 0 { now } else { rec.last_ns(now) },
            last_ticks: rec.last,
            dead: rec.has(flow_flags::DEAD),
            silent_unconfirmed: rec.marks & view_marks::SILENT_SUSPECT != 0
                && rec.marks & view_marks::SERVER_SILENT == 0,
        }
    }
}

/// Endpoint `i` of a key as a socket address.
fn endpoint(k: &FlowKey, i: usize) -> SocketAddr {
    let a = k.addr[i];
    let ip = if k.ipv6 == 0 {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(a)
    };
    SocketAddr::new(ip, k.port[i])
}

/// The wildcard address of `ip`'s family.
fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// The state the observer gives the peer of a local endpoint in `local` (the segments that
/// left were taken as received).
#[must_use]
pub const fn peer_state(local: TcpState) -> TcpState {
    match local {
        TcpState::FinWait1 | TcpState::FinWait2 => TcpState::CloseWait,
        TcpState::CloseWait => TcpState::FinWait2,
        TcpState::Closing => TcpState::Closing,
        TcpState::LastAck => TcpState::TimeWait,
        TcpState::TimeWait => TcpState::Closed,
        _ => TcpState::Established,
    }
}
