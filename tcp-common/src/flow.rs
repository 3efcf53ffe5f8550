//! Flow keys, the state machine's record of a connection, and the compact record the
//! established tables keep (shared `#[repr(C)]` layouts).
//!
//! Two record layouts, one state machine:
//! - [`Flow`] is what [`crate::track::track`] works on: both endpoints in full, handshake times
//!   in ns. The half-open table stores it as it is ([`HalfOpenEntry`]), and so does `replay`.
//! - [`Established`] is what the established tables store once a handshake is done
//!   ([`EstablishedEntry`], 40 bytes with its lock): no handshake times, 16-bit ISNs, raw
//!   windows, coarse times. The kernel's slow path unpacks it into a [`Flow`] under the lock,
//!   runs the state machine, and writes back the fields that changed; the fast path (data on a
//!   connection whose endpoints are both ESTABLISHED) updates its few fields in place without
//!   the lock. See the README's "Per-packet path" for why both are race-free.

pub use crate::parse::NO_WSCALE;
use crate::{
    parse::Segment,
    state::{Role, Side, TcpState},
};

/// Canonical key of a connection: its two endpoints in a fixed order (the lower (address,
/// port) first), so both directions of a connection find the same record. IPv4 addresses fill
/// the first four bytes. The VLAN id is part of the key: the same 4-tuple on two VLANs is two
/// connections. Padding is explicit and always zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Addresses of endpoint 0 and endpoint 1.
    pub addr: [[u8; 16]; 2],
    /// Ports of endpoint 0 and endpoint 1, host order.
    pub port: [u16; 2],
    /// Outermost VLAN id (0: untagged).
    pub vlan: u16,
    /// 1 for IPv6, 0 for IPv4.
    pub ipv6: u8,
    /// Always zero.
    pub pad: u8,
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// The key of an IPv4 connection in its established table: [`FlowKey`] without the 24 bytes of
/// address an IPv4 flow does not need. Same endpoint order as [`FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey4 {
    /// IPv4 addresses of endpoint 0 and endpoint 1, network order.
    pub addr: [[u8; 4]; 2],
    /// Ports of endpoint 0 and endpoint 1, host order.
    pub port: [u16; 2],
    /// Outermost VLAN id (0: untagged).
    pub vlan: u16,
    /// Always zero.
    pub pad: u16,
}

const _: () = assert!(core::mem::size_of::<FlowKey4>() == 16);

impl FlowKey4 {
    /// The key of an IPv4 segment's connection and the index of the endpoint that sent it
    /// (the same as [`FlowKey::of`] gives).
    #[must_use]
    #[inline(always)]
    pub fn of(seg: &Segment) -> (Self, usize) {
        let src = [seg.src[0], seg.src[1], seg.src[2], seg.src[3]];
        let dst = [seg.dst[0], seg.dst[1], seg.dst[2], seg.dst[3]];
        Self::from_parts(src, seg.sport, dst, seg.dport, seg.vlan)
    }

    /// The key of a connection from its sender's and receiver's (address, port) and the index
    /// of the sender.
    #[must_use]
    #[inline(always)]
    pub fn from_parts(
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        vlan: u16,
    ) -> (Self, usize) {
        let src_first = (u32::from_be_bytes(src), sport) <= (u32::from_be_bytes(dst), dport);
        let (a, b, pa, pb) = if src_first {
            (src, dst, sport, dport)
        } else {
            (dst, src, dport, sport)
        };
        let key = Self {
            addr: [a, b],
            port: [pa, pb],
            vlan,
            pad: 0,
        };
        (key, usize::from(!src_first))
    }

    /// The same key in the wide layout.
    #[must_use]
    pub fn widen(&self) -> FlowKey {
        let mut addr = [[0u8; 16]; 2];
        addr[0][..4].copy_from_slice(&self.addr[0]);
        addr[1][..4].copy_from_slice(&self.addr[1]);
        FlowKey {
            addr,
            port: self.port,
            vlan: self.vlan,
            ipv6: 0,
            pad: 0,
        }
    }
}

impl FlowKey {
    /// The key of a segment's connection and the index (0 or 1) of the endpoint that sent it.
    #[must_use]
    #[inline(always)]
    pub fn of(seg: &Segment) -> (Self, usize) {
        let src_first = endpoint_le(&seg.src, seg.sport, &seg.dst, seg.dport);
        let (a, b, pa, pb) = if src_first {
            (seg.src, seg.dst, seg.sport, seg.dport)
        } else {
            (seg.dst, seg.src, seg.dport, seg.sport)
        };
        let key = Self {
            addr: [a, b],
            port: [pa, pb],
            vlan: seg.vlan,
            ipv6: u8::from(seg.ipv6),
            pad: 0,
        };
        (key, usize::from(!src_first))
    }

    /// A 32-bit digest of the key (FNV-1a over its address and port words), stored in each
    /// [`HalfOpenEntry`] so that a CPU holding a pointer to a table element can tell, under the
    /// lock, whether the element still holds its flow: a deleted element's memory may be reused
    /// for another flow at once.
    #[must_use]
    #[inline(always)]
    pub fn tag(&self) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for addr in &self.addr {
            let (hi, lo) = halves(addr);
            for w in [hi, lo] {
                h = (h ^ (w as u32)).wrapping_mul(0x0100_0193);
                h = (h ^ ((w >> 32) as u32)).wrapping_mul(0x0100_0193);
            }
        }
        let rest = u32::from(self.port[0]) << 16 | u32::from(self.port[1]);
        h = (h ^ rest).wrapping_mul(0x0100_0193);
        (h ^ (u32::from(self.vlan) << 8 | u32::from(self.ipv6))).wrapping_mul(0x0100_0193)
    }
}

/// `(a, pa) <= (b, pb)`, addresses compared as big-endian numbers.
#[inline(always)]
fn endpoint_le(a: &[u8; 16], pa: u16, b: &[u8; 16], pb: u16) -> bool {
    let (a_hi, a_lo) = halves(a);
    let (b_hi, b_lo) = halves(b);
    (a_hi, a_lo, pa) <= (b_hi, b_lo, pb)
}

#[inline(always)]
fn halves(a: &[u8; 16]) -> (u64, u64) {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&a[..8]);
    lo.copy_from_slice(&a[8..]);
    (u64::from_be_bytes(hi), u64::from_be_bytes(lo))
}

/// Bits of [`Endpoint::flags`].
pub mod endpoint_flags {
    /// It sent a SYN (its ISN is known).
    pub const SENT_SYN: u8 = 0x01;
    /// It sent a FIN (`end_seq` is its FIN's sequence number).
    pub const SENT_FIN: u8 = 0x02;
    /// It sent a segment with ACK (`ack` is valid).
    pub const SENT_ACK: u8 = 0x04;
    /// It sent a segment other than a RST: its advertised window (`window`) and the end of
    /// what it sent (`end_seq`) are known.
    pub const SENT_ANY: u8 = 0x08;
    /// Its last window came with a SYN, which is never scaled.
    pub const SYN_WINDOW: u8 = 0x10;
    /// Its last segment was a keepalive probe, not answered yet (every segment of both
    /// endpoints goes through the slow path meanwhile).
    pub const PROBING: u8 = 0x20;
    /// Every bit above.
    pub const ALL: u8 = 0x3f;
}

/// What the observer knows of one endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Initial sequence number (from its SYN).
    pub isn: u32,
    /// Highest acknowledgment number it has sent: what it has received.
    pub ack: u32,
    /// The end of what it sent: the sequence number after the last byte of its highest data
    /// segment (after its ISN for a SYN without data), until it sends its FIN; from then on the
    /// FIN's sequence number. Its next sequence number is this, plus one after a FIN. What the
    /// peer expects next in a RST (RFC 5961), and what a keepalive probe sits one below.
    pub end_seq: u32,
    /// Last advertised receive window, as sent (unscaled; see [`Endpoint::scaled_window`]).
    pub window: u16,
    /// RFC 793 state ([`TcpState`] as u8).
    pub state: u8,
    /// Window scale shift from its SYN, or [`NO_WSCALE`].
    pub wscale: u8,
    /// Bits of [`endpoint_flags`].
    pub flags: u8,
    /// [`Side`] as u8.
    pub side: u8,
    /// Bits of [`handshake_flags`] (kept in the half-open table only).
    pub handshake: u8,
    /// Keepalive probes it sent (saturating at 255).
    pub probes: u8,
}

/// Bits of [`Endpoint::handshake`]: what only the handshake needs, so the compact established
/// record does not keep them.
pub mod handshake_flags {
    /// It sent a SYN-ACK (a second one with the same ISN is a retransmission).
    pub const SENT_SYNACK: u8 = 0x01;
    /// It is the endpoint that answers a SYN sent while this 4-tuple was in TIME-WAIT: its
    /// answer (SYN-ACK, or ACK/RST) tells whether the reuse was accepted.
    pub const REUSE_ANSWER_PENDING: u8 = 0x02;
    /// Its accept queue overflowed on this connection (counted once).
    pub const OVERFLOWED: u8 = 0x04;
}

/// Largest window shift allowed by RFC 7323.
pub const MAX_WSCALE: u8 = 14;

impl Endpoint {
    /// The sequence number it sends next, if known: after its FIN, or after its highest data.
    #[must_use]
    #[inline(always)]
    pub const fn next_seq(&self) -> Option<u32> {
        if self.has(endpoint_flags::SENT_FIN) {
            Some(self.end_seq.wrapping_add(1))
        } else if self.has(endpoint_flags::SENT_ANY) {
            Some(self.end_seq)
        } else {
            None
        }
    }

    /// State as an enum.
    #[must_use]
    #[inline(always)]
    pub const fn state(&self) -> TcpState {
        TcpState::from_u8(self.state)
    }

    /// Side as an enum.
    #[must_use]
    #[inline(always)]
    pub const fn side(&self) -> Side {
        Side::from_u8(self.side)
    }

    /// Whether all of `bits` are set.
    #[must_use]
    #[inline(always)]
    pub const fn has(&self, bits: u8) -> bool {
        self.flags & bits == bits
    }

    /// Its last advertised window in bytes. A SYN's window is never scaled; others are, once
    /// both sides offered the option (`peer_wscale`: the other endpoint's). When neither scale
    /// is known (the handshake was not seen, or an unusual option layout hid it) the largest
    /// shift is assumed: validation stays permissive rather than rejecting real RSTs and FINs
    /// sent with data in flight.
    #[must_use]
    #[inline(always)]
    pub const fn scaled_window(&self, peer_wscale: u8) -> u32 {
        let shift = if self.has(endpoint_flags::SYN_WINDOW) {
            0
        } else {
            match (self.wscale, peer_wscale) {
                (NO_WSCALE, NO_WSCALE) => MAX_WSCALE,
                (NO_WSCALE, _) | (_, NO_WSCALE) => 0,
                (own, _) => {
                    if own < MAX_WSCALE {
                        own
                    } else {
                        MAX_WSCALE
                    }
                }
            }
        };
        (self.window as u32) << shift
    }
}

/// Bits of [`Flow::flags`].
pub mod flow_flags {
    /// The flow has seen at least one segment.
    pub const SEEN: u8 = 0x01;
    /// Created from a mid-stream segment.
    pub const PICKED_UP: u8 = 0x02;
    /// The three-way handshake completed.
    pub const HANDSHAKE_DONE: u8 = 0x04;
    /// Both endpoints closed by FIN.
    pub const CLOSED_BY_FIN: u8 = 0x08;
    /// Aborted by RST.
    pub const CLOSED_BY_RST: u8 = 0x10;
    /// The close was simultaneous.
    pub const SIMULTANEOUS_CLOSE: u8 = 0x20;
    /// Simultaneous open.
    pub const SIMULTANEOUS_OPEN: u8 = 0x40;
    /// Being removed from its table (expired, or moved to the other table): its endpoints are
    /// no longer counted and a segment that finds it changes nothing.
    pub const DEAD: u8 = 0x80;
}

/// Index of the client in [`Flow::client`] when no endpoint is known to be it.
pub const CLIENT_UNKNOWN: u8 = 2;

/// One connection as the observer sees it: both endpoints, timing and flags. What the state
/// machine works on, and what the half-open table and `replay` store.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Endpoint 0 and endpoint 1, in [`FlowKey`] order.
    pub ep: [Endpoint; 2],
    /// Time of the first SYN of the current handshake (ns, caller's clock; 0: none seen).
    pub syn_ns: u64,
    /// Time of the first SYN-ACK (0: none seen).
    pub synack_ns: u64,
    /// Time of the last segment.
    pub last_ns: u64,
    /// When the first endpoint entered TIME-WAIT, or any endpoint last changed state to
    /// CLOSED (0: neither).
    pub closed_ns: u64,
    /// Index of the client endpoint, or [`CLIENT_UNKNOWN`].
    pub client: u8,
    /// Bits of [`flow_flags`].
    pub flags: u8,
    /// SYNs of the current attempt, retransmissions included (saturating; kept in the
    /// half-open table only: those of an attempt never answered count per port when it ends).
    pub syns: u8,
    /// Always zero.
    pub pad: [u8; 5],
}

const _: () = assert!(core::mem::size_of::<Flow>() == 80);

impl Flow {
    /// A record that has seen nothing.
    pub const EMPTY: Self = Self {
        ep: [Endpoint {
            isn: 0,
            ack: 0,
            end_seq: 0,
            window: 0,
            state: 0,
            wscale: NO_WSCALE,
            flags: 0,
            side: 0,
            handshake: 0,
            probes: 0,
        }; 2],
        syn_ns: 0,
        synack_ns: 0,
        last_ns: 0,
        closed_ns: 0,
        client: CLIENT_UNKNOWN,
        flags: 0,
        syns: 0,
        pad: [0; 5],
    };

    /// Role of endpoint `i` (0 or 1).
    #[must_use]
    #[inline(always)]
    pub const fn role(&self, i: usize) -> Role {
        role_of(self.client, i)
    }

    /// Whether all of `bits` are set.
    #[must_use]
    #[inline(always)]
    pub const fn has(&self, bits: u8) -> bool {
        self.flags & bits == bits
    }

    /// Whether the handshake is still in progress (the record belongs in the half-open table).
    #[must_use]
    #[inline(always)]
    pub const fn is_half_open(&self) -> bool {
        self.ep[0].state().is_opening() || self.ep[1].state().is_opening()
    }

    /// Whether a record that ends now is a failed handshake: an attempt (its first SYN seen)
    /// still in progress, never completed (`tcpscope_handshakes_failed_total{reason="timeout"}`).
    #[must_use]
    #[inline(always)]
    pub const fn handshake_failed(&self) -> bool {
        self.is_half_open() && self.syn_ns != 0 && self.flags & flow_flags::HANDSHAKE_DONE == 0
    }

    /// Whether neither endpoint holds any state any more (both CLOSED).
    #[must_use]
    #[inline(always)]
    pub const fn is_closed(&self) -> bool {
        matches!(self.ep[0].state(), TcpState::Closed)
            && matches!(self.ep[1].state(), TcpState::Closed)
    }
}

/// Role of endpoint `i` given the index of the client.
#[inline(always)]
const fn role_of(client: u8, i: usize) -> Role {
    match client {
        0 | 1 if client as usize == i => Role::Client,
        0 | 1 => Role::Server,
        _ => Role::Unknown,
    }
}

#[cfg(feature = "user")]
// SAFETY: `FlowKey` is `repr(C)` with explicit padding (no implicit padding bytes) and
// every bit pattern is valid.
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey4 {}
#[cfg(feature = "user")]
// SAFETY: as above: `repr(C)`, explicit padding, integer fields only.
unsafe impl aya::Pod for Flow {}

/// The verifier recognizes a map value's lock by this exact type name, and only as a direct
/// field of the value (not wrapped in another struct).
#[allow(non_camel_case_types, reason = "the kernel's BTF type name")]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct bpf_spin_lock {
    /// Owned by the kernel; reads as zero from userspace.
    pub val: u32,
}

/// Value of the half-open table: the record and the per-flow spin lock that serializes the
/// two directions of a connection when they are handled on two CPUs at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HalfOpenEntry {
    /// Taken around every update of `flow` in the kernel.
    pub lock: bpf_spin_lock,
    /// [`FlowKey::tag`] of the flow this element holds: the packet programs delete half-open
    /// records at once (promotion), and a deleted element's memory may be reused at once.
    pub tag: u32,
    /// The record.
    pub flow: Flow,
}

const _: () = assert!(core::mem::size_of::<HalfOpenEntry>() == 88);

impl HalfOpenEntry {
    /// An entry holding `flow` of the flow tagged `tag`, lock released.
    #[must_use]
    #[inline(always)]
    pub const fn new(flow: Flow, tag: u32) -> Self {
        Self {
            lock: bpf_spin_lock { val: 0 },
            tag,
            flow,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integer fields and explicit padding only.
unsafe impl aya::Pod for HalfOpenEntry {}

/// Time of [`Established::last`]: ns >> 20 (ticks of ~1.05 ms), wrapping every 52 days.
pub const LAST_SHIFT: u32 = 20;
/// Time of [`Established::closed`]: ns >> 30 (ticks of ~1.07 s), wrapping every 19.5 hours.
pub const CLOSED_SHIFT: u32 = 30;
/// Longest idle time an established record can measure, ~26 days (half the wrap: ages are
/// signed, see [`Established::last_ns`]; a longer timeout never fires).
pub const MAX_IDLE_NS: u64 = (i32::MAX as u64) << LAST_SHIFT;
/// Longest time since a close an established record can measure, ~9.8 hours (half the wrap).
pub const MAX_CLOSED_AGE_NS: u64 = (i16::MAX as u64) << CLOSED_SHIFT;

/// Bits of [`Established::ep_flags`] above the endpoint flags: the side.
const SIDE_SHIFT: u32 = 6;
/// Wscale nibble of [`Established::state`] meaning [`NO_WSCALE`].
const NO_WSCALE_NIBBLE: u8 = 0x0f;

/// A connection past its handshake (or picked up mid-stream), as the established tables keep
/// it: what the state machine needs from then on, and nothing it used only for the handshake.
///
/// - ISNs are kept as their low 16 bits: after the handshake they only answer "is this SYN or
///   SYN-ACK a copy of the one we saw?" ([`Established::unpack`] rebuilds them from the
///   segment asking), which 16 bits answer with a 1 in 65,536 chance of a false match.
/// - Windows are kept as sent, with the flag that says whether a SYN sent them.
/// - Times are coarse: `last` in ~1 ms ticks, `closed` in ~1 s ticks, both wrapping; expiry
///   runs once a second anyway.
/// - `state` and `ep_flags` form one aligned 32-bit word, which the fast path reads at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Established {
    /// Highest ACK each endpoint sent.
    pub ack: [u32; 2],
    /// The end of what each endpoint sent ([`Endpoint::end_seq`]).
    pub end_seq: [u32; 2],
    /// Time of the last segment (ns >> [`LAST_SHIFT`], never 0), or 0: seen by the fast path
    /// since the reaper's last walk (the reaper then writes the time).
    pub last: u32,
    /// Each endpoint's last window, as sent.
    pub window: [u16; 2],
    /// Low 16 bits of each endpoint's ISN.
    pub isn_lo: [u16; 2],
    /// Per endpoint: [`TcpState`] in the low nibble, window scale in the high one (15: none).
    pub state: [u8; 2],
    /// Per endpoint: [`endpoint_flags`], and the [`Side`] in the top two bits.
    pub ep_flags: [u8; 2],
    /// When the first endpoint entered TIME-WAIT or any last became CLOSED (ns >>
    /// [`CLOSED_SHIFT`], wrapping, never 0), or 0: neither.
    pub closed: u16,
    /// Index of the client endpoint, or [`CLIENT_UNKNOWN`].
    pub client: u8,
    /// Bits of [`flow_flags`].
    pub flags: u8,
    /// Keepalive probes each endpoint sent (saturating).
    pub probes: [u8; 2],
    /// Bits of [`view_marks`], written by the view walk only (no other writer reads or writes
    /// them: the state machine never sees them).
    pub marks: u8,
    /// Always zero.
    pub pad: u8,
}

/// Bits of [`Established::marks`].
pub mod view_marks {
    /// At the last walk the server had sent nothing since its SYN-ACK while the client had
    /// sent data or a FIN.
    pub const SILENT_SUSPECT: u8 = 0x01;
    /// The same at two walks in a row (a second apart: a listening stack acknowledges data
    /// within its delayed-ACK time): the server kept no state of the connection (a SYN-cookie
    /// handshake completed into a full accept queue) or is gone. Counted once.
    pub const SERVER_SILENT: u8 = 0x02;
}

impl Established {
    /// Whether the server side has been silent since its SYN-ACK while the client sent data
    /// or a FIN (the view walk's [`view_marks`] rule, without its two-walk confirmation).
    #[must_use]
    #[inline(always)]
    pub fn server_silent_now(&self) -> bool {
        use endpoint_flags as ef;
        let client = self.client as usize;
        if client > 1 || self.flags & flow_flags::HANDSHAKE_DONE == 0 {
            return false;
        }
        let server = 1 - client;
        let sf = self.ep_flags[server];
        let cf = self.ep_flags[client];
        let server_quiet = sf & (ef::SENT_SYN | ef::SYN_WINDOW | ef::SENT_FIN)
            == ef::SENT_SYN | ef::SYN_WINDOW
            && matches!(
                self.ep_state(server),
                TcpState::Established | TcpState::CloseWait
            );
        // The client's data: its end of data past its ISN + 1 (low 16 bits), or a FIN.
        let client_sent = cf & ef::SENT_FIN != 0
            || (self.end_seq[client] as u16) != self.isn_lo[client].wrapping_add(1);
        server_quiet && client_sent
    }
}

const _: () = assert!(core::mem::size_of::<Established>() == 40);
const _: () = assert!(core::mem::offset_of!(Established, state) % 4 == 0);

/// Value of the established tables: the compact record and its lock (44 bytes; the kernel
/// keeps values in multiples of 8, so 48).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EstablishedEntry {
    /// Taken around every update by the slow path and the reaper; never by the fast path.
    pub lock: bpf_spin_lock,
    /// The record.
    pub rec: Established,
}

const _: () = assert!(core::mem::size_of::<EstablishedEntry>() == 44);

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integer fields only, no implicit padding (asserted sizes).
unsafe impl aya::Pod for Established {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for EstablishedEntry {}

/// `ns >> LAST_SHIFT` as a wrapping tick that is never 0 (0 means "seen, no time yet" in the
/// compact record): the tick that wraps to 0 is stored as the one after it, so that a time is
/// never read back earlier than it was.
#[inline(always)]
const fn ticks32(ns: u64) -> u32 {
    let t = (ns >> LAST_SHIFT) as u32;
    if t == 0 { 1 } else { t }
}

/// `ns >> CLOSED_SHIFT` as a wrapping tick that is never 0 (0 means "not closed"; the tick
/// that wraps to 0 is stored as the one after it).
#[inline(always)]
const fn ticks16(ns: u64) -> u16 {
    let t = (ns >> CLOSED_SHIFT) as u16;
    if t == 0 { 1 } else { t }
}

/// The time of a tick stored `age` ticks before the one of `now_ns`: the last ns of that tick,
/// never earlier than the time stored (so a timeout never fires early) and in the same tick
/// (packing it again gives the same tick back); `now_ns` itself for an age of 0 or less.
#[inline(always)]
const fn tick_time(now_ns: u64, age: i64, shift: u32) -> u64 {
    if age <= 0 {
        return now_ns;
    }
    let end = ((now_ns >> shift) + 1).saturating_sub(age as u64) << shift;
    if end == 0 { 0 } else { end - 1 }
}

/// What the fast path checks before it touches a record, for a segment sent by endpoint `dir`
/// from `side`: `(mask, expected)` over [`Established::state_word`]. Both endpoints
/// ESTABLISHED; the sender's window, ACK and end of data known, its window not from a SYN; no
/// FIN sent by either, no keepalive probe awaiting its answer; both sides what this hook
/// implies (record_sent would otherwise move them).
#[must_use]
#[inline(always)]
pub const fn fast_path_pattern(dir: usize, side: Side) -> (u32, u32) {
    use endpoint_flags as ef;
    let est = TcpState::Established as u32;
    let sender_mask =
        (ef::SENT_ANY | ef::SENT_ACK | ef::SYN_WINDOW | ef::SENT_FIN | ef::PROBING) as u32 | 0xc0;
    let receiver_mask = (ef::SENT_FIN | ef::PROBING) as u32 | 0xc0;
    let sender = (ef::SENT_ANY | ef::SENT_ACK) as u32 | (side as u32) << SIDE_SHIFT;
    let receiver = (side.opposite() as u32) << SIDE_SHIFT;
    let (m0, m1, e0, e1) = if dir & 1 == 0 {
        (sender_mask, receiver_mask, sender, receiver)
    } else {
        (receiver_mask, sender_mask, receiver, sender)
    };
    // Little-endian word: state[0], state[1], ep_flags[0], ep_flags[1].
    let mask = 0x0f | 0x0f << 8 | m0 << 16 | m1 << 24;
    let expected = est | est << 8 | e0 << 16 | e1 << 24;
    (mask, expected)
}

impl Established {
    /// The compact form of a record past its handshake.
    #[must_use]
    #[inline(always)]
    pub fn pack(flow: &Flow) -> Self {
        let mut out = Self::default();
        out.pack_from(flow);
        out
    }

    /// Sets every field from a full record, one plain store per field (the kernel packs
    /// under the record's lock, where no call, `memcpy` included, is allowed).
    #[inline(always)]
    pub fn pack_from(&mut self, flow: &Flow) {
        for i in 0..2 {
            let ep = &flow.ep[i];
            let w = if ep.wscale > MAX_WSCALE {
                NO_WSCALE_NIBBLE
            } else {
                ep.wscale
            };
            self.ack[i] = ep.ack;
            self.end_seq[i] = ep.end_seq;
            self.window[i] = ep.window;
            self.isn_lo[i] = ep.isn as u16;
            self.state[i] = (ep.state & 0x0f) | w << 4;
            self.ep_flags[i] = (ep.flags & endpoint_flags::ALL) | (ep.side & 3) << SIDE_SHIFT;
            self.probes[i] = ep.probes;
        }
        self.last = ticks32(flow.last_ns);
        self.closed = if flow.closed_ns == 0 {
            0
        } else {
            ticks16(flow.closed_ns)
        };
        self.client = flow.client;
        self.flags = flow.flags;
    }

    /// The full record for the state machine (see [`Self::unpack_into`]).
    #[must_use]
    pub fn unpack(&self, seg: &Segment, dir: usize, now_ns: u64) -> Flow {
        let mut out = Flow::EMPTY;
        self.unpack_into(&mut out, seg, dir, now_ns);
        out
    }

    /// Writes the full record for the state machine into `out`, at `now_ns`, for segment `seg`
    /// sent by endpoint `dir`. ISNs get their high bits from what the segment claims (its
    /// sequence number for the sender's, its ACK − 1 for the receiver's), so that they equal
    /// the claim exactly when the low 16 bits match. Times are rebuilt so that
    /// [`Self::pack`] gives the stored ticks back; handshake times are 0. One plain store per
    /// field, as in [`Self::pack_from`]; the padding of `out` is not written.
    #[inline(always)]
    pub fn unpack_into(&self, out: &mut Flow, seg: &Segment, dir: usize, now_ns: u64) {
        use core::ptr::write_volatile as put;
        let d = dir & 1;
        // Every field through a volatile store: the compiler can then neither turn runs of
        // stores into `memset` calls (this runs under the record's lock, where calls are
        // refused) nor forward the values to the state machine in registers. Read back from
        // memory they are plain unknown numbers to the verifier, so its paths through the
        // state machine converge instead of multiplying with every branch taken here.
        for i in 0..2 {
            let claim = if i == d {
                seg.seq
            } else {
                seg.ack.wrapping_sub(1)
            };
            let st = self.state[i];
            let w = st >> 4;
            let ep = &raw mut out.ep[i];
            // SAFETY: fields of `out`.
            unsafe {
                put(
                    &raw mut (*ep).isn,
                    (claim & 0xffff_0000) | u32::from(self.isn_lo[i]),
                );
                put(&raw mut (*ep).ack, self.ack[i]);
                put(&raw mut (*ep).end_seq, self.end_seq[i]);
                put(&raw mut (*ep).window, self.window[i]);
                put(&raw mut (*ep).state, st & 0x0f);
                put(
                    &raw mut (*ep).wscale,
                    if w == NO_WSCALE_NIBBLE { NO_WSCALE } else { w },
                );
                put(&raw mut (*ep).flags, self.ep_flags[i] & endpoint_flags::ALL);
                put(&raw mut (*ep).side, self.ep_flags[i] >> SIDE_SHIFT);
                put(&raw mut (*ep).handshake, 0);
                put(&raw mut (*ep).probes, self.probes[i]);
            }
        }
        // SAFETY: fields of `out`. (The padding is left as it is: zero in every record.)
        unsafe {
            put(&raw mut out.syn_ns, 0);
            put(&raw mut out.synack_ns, 0);
            put(&raw mut out.last_ns, self.last_ns(now_ns));
            put(&raw mut out.closed_ns, self.closed_ns(now_ns));
            put(&raw mut out.client, self.client);
            put(&raw mut out.flags, self.flags);
            put(&raw mut out.syns, 0);
        }
    }

    /// A copy read field by field with volatile loads (under the lock: no `memcpy`; and the
    /// fast path's fields may change meanwhile, each is read once).
    ///
    /// # Safety
    /// `src` is valid for reads.
    #[must_use]
    #[inline(always)]
    pub unsafe fn read(src: *const Self) -> Self {
        macro_rules! load {
            ($($field:tt)*) => {
                // SAFETY: a field of `*src`, valid for reads (caller).
                unsafe { core::ptr::read_volatile(&raw const (*src).$($field)*) }
            };
        }
        Self {
            ack: [load!(ack[0]), load!(ack[1])],
            end_seq: [load!(end_seq[0]), load!(end_seq[1])],
            last: load!(last),
            window: [load!(window[0]), load!(window[1])],
            isn_lo: [load!(isn_lo[0]), load!(isn_lo[1])],
            state: [load!(state[0]), load!(state[1])],
            ep_flags: [load!(ep_flags[0]), load!(ep_flags[1])],
            closed: load!(closed),
            client: load!(client),
            flags: load!(flags),
            probes: [load!(probes[0]), load!(probes[1])],
            // Not read: only the view walk uses them (and it reads them itself).
            marks: 0,
            pad: 0,
        }
    }

    /// Time of the last segment as an ns time at or before `now_ns` (`now_ns` itself when the
    /// fast path has seen the flow since the reaper's last walk): the end of its tick.
    ///
    /// The age in ticks is signed: a record may carry a time later than the `now_ns` it is
    /// read with (the reaper reads the clock once per walk while packets keep writing times on
    /// the other CPU; the coarse clock runs up to a tick behind the precise one), and such a
    /// time is the present, not 52 days ago.
    #[must_use]
    #[inline(always)]
    pub const fn last_ns(&self, now_ns: u64) -> u64 {
        if self.last == 0 {
            return now_ns;
        }
        let age = ((now_ns >> LAST_SHIFT) as u32).wrapping_sub(self.last) as i32;
        tick_time(now_ns, age as i64, LAST_SHIFT)
    }

    /// Time of the close as an ns time at or before `now_ns`, or 0 for none (signed ages and
    /// the end of the tick, as in [`Self::last_ns`]: TIME-WAIT never ends before its time).
    #[must_use]
    #[inline(always)]
    pub const fn closed_ns(&self, now_ns: u64) -> u64 {
        if self.closed == 0 {
            return 0;
        }
        let age = ((now_ns >> CLOSED_SHIFT) as u16).wrapping_sub(self.closed) as i16;
        let t = tick_time(now_ns, age as i64, CLOSED_SHIFT);
        if t == 0 { 1 } else { t }
    }

    /// The 32-bit word of both endpoints' states and flags, as the fast path reads it.
    #[must_use]
    #[inline(always)]
    pub const fn state_word(&self) -> u32 {
        u32::from_le_bytes([
            self.state[0],
            self.state[1],
            self.ep_flags[0],
            self.ep_flags[1],
        ])
    }

    /// State of endpoint `i`.
    #[must_use]
    #[inline(always)]
    pub const fn ep_state(&self, i: usize) -> TcpState {
        TcpState::from_u8(self.state[i & 1] & 0x0f)
    }

    /// Side of endpoint `i`.
    #[must_use]
    #[inline(always)]
    pub const fn ep_side(&self, i: usize) -> Side {
        Side::from_u8(self.ep_flags[i & 1] >> SIDE_SHIFT)
    }

    /// Role of endpoint `i`.
    #[must_use]
    #[inline(always)]
    pub const fn role(&self, i: usize) -> Role {
        role_of(self.client, i)
    }

    /// Whether all of `bits` of [`flow_flags`] are set.
    #[must_use]
    #[inline(always)]
    pub const fn has(&self, bits: u8) -> bool {
        self.flags & bits == bits
    }

    /// Marks the record on its way out of its table, at `now_ns`: [`flow_flags::DEAD`], both
    /// states CLOSED with no flags (so that the fast path turns away at once), and the time of
    /// the mark in `last` (the reaper deletes it a grace period later).
    ///
    /// # Safety
    /// `dst` is valid for writes; the caller holds the record's lock.
    #[inline(always)]
    pub unsafe fn mark_dead(dst: *mut Self, now_ns: u64) {
        // SAFETY: fields of `*dst` (caller); `state` is 4-aligned and starts the state word.
        unsafe {
            core::ptr::write_volatile((&raw mut (*dst).state).cast::<u32>(), 0);
            core::ptr::write_volatile(&raw mut (*dst).last, ticks32(now_ns));
            let flags = core::ptr::read_volatile(&raw const (*dst).flags);
            core::ptr::write_volatile(&raw mut (*dst).flags, flags | flow_flags::DEAD);
        }
    }

    /// Closes the endpoints in FIN-WAIT-2 at `now_ns` (the reaper, when
    /// [`crate::track::Age::fin_wait2_expired`] says their time is up; the same change as
    /// [`crate::track::expire_fin_wait2`] makes to a full record).
    #[inline(always)]
    pub fn close_fin_wait2(&mut self, now_ns: u64) {
        for st in &mut self.state {
            if *st & 0x0f == TcpState::FinWait2 as u8 {
                *st &= 0xf0;
            }
        }
        self.closed = ticks16(now_ns);
    }

    /// Ticks of `now_ns` as [`Self::last`] keeps them.
    #[must_use]
    #[inline(always)]
    pub const fn ticks(now_ns: u64) -> u32 {
        ticks32(now_ns)
    }

    /// Writes into `*dst` the fields in which `after` differs from `before`, each with one
    /// volatile store of its own width, and nothing else: the fast path may be updating the
    /// other endpoint's fields meanwhile. The state word is written whole, so that the fast
    /// path never sees half a transition.
    ///
    /// # Safety
    /// `dst` is valid for writes; the caller holds the record's lock.
    #[inline(always)]
    pub unsafe fn apply(dst: *mut Self, before: &Self, after: &Self) {
        macro_rules! store {
            ($($field:tt)*) => {
                if before.$($field)* != after.$($field)* {
                    // SAFETY: a field of `*dst`, valid for writes (caller).
                    unsafe { core::ptr::write_volatile(&raw mut (*dst).$($field)*, after.$($field)*) };
                }
            };
        }
        store!(ack[0]);
        store!(ack[1]);
        store!(end_seq[0]);
        store!(end_seq[1]);
        store!(last);
        store!(window[0]);
        store!(window[1]);
        store!(isn_lo[0]);
        store!(isn_lo[1]);
        if before.state_word() != after.state_word() {
            // SAFETY: `state` is 4-aligned (asserted) and `state`, `ep_flags` are the word's
            // four bytes.
            unsafe {
                core::ptr::write_volatile(
                    (&raw mut (*dst).state).cast::<u32>(),
                    u32::from_ne_bytes(after.state_word().to_le_bytes()),
                );
            }
        }
        store!(closed);
        store!(client);
        store!(flags);
        store!(probes[0]);
        store!(probes[1]);
    }
}

#[cfg(test)]
mod tests;
