//! The flow key and the per-flow record kept in the kernel's maps (shared `#[repr(C)]` layout).

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
    /// [`FlowEntry`] so that a CPU holding a pointer to a table element can tell, under the
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

/// No window scale option seen.
pub const NO_WSCALE: u8 = 0xff;

/// Bits of [`Endpoint::flags`].
pub mod endpoint_flags {
    /// It sent a SYN (its ISN is known).
    pub const SENT_SYN: u8 = 0x01;
    /// It sent a FIN (`fin_seq` is valid).
    pub const SENT_FIN: u8 = 0x02;
    /// It sent a segment with ACK (`ack` is valid).
    pub const SENT_ACK: u8 = 0x04;
    /// It sent at least one segment (`next_seq`, `window` are valid).
    pub const SENT_ANY: u8 = 0x08;
}

/// What the observer knows of one endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Initial sequence number (from its SYN).
    pub isn: u32,
    /// Sequence number after the last byte (SYN and FIN count one) it has sent.
    pub next_seq: u32,
    /// Highest acknowledgment number it has sent: what it has received.
    pub ack: u32,
    /// Sequence number of its FIN.
    pub fin_seq: u32,
    /// Last advertised receive window, scaled.
    pub window: u32,
    /// RFC 793 state ([`TcpState`] as u8).
    pub state: u8,
    /// Window scale shift from its SYN, or [`NO_WSCALE`].
    pub wscale: u8,
    /// Bits of [`endpoint_flags`].
    pub flags: u8,
    /// [`Side`] as u8.
    pub side: u8,
}

impl Endpoint {
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
    /// Being removed from its table (expired, dropped, or moved to the established table):
    /// its endpoints are no longer counted and a segment that finds it changes nothing.
    pub const DEAD: u8 = 0x80;
}

/// Index of the client in [`Flow::client`] when no endpoint is known to be it.
pub const CLIENT_UNKNOWN: u8 = 2;

/// One connection as the observer sees it: both endpoints, timing and flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Endpoint 0 and endpoint 1, in [`FlowKey`] order.
    pub ep: [Endpoint; 2],
    /// Time of the first SYN of the current handshake (ns, caller's clock; 0: none seen).
    pub syn_ns: u64,
    /// Time of the first SYN-ACK (0: none seen).
    pub synack_ns: u64,
    /// Time of the ACK that completed the handshake (0: not completed).
    pub established_ns: u64,
    /// Time of the last segment.
    pub last_ns: u64,
    /// When the first endpoint entered TIME-WAIT, or any endpoint last changed state to
    /// CLOSED (0: neither).
    pub closed_ns: u64,
    /// Index of the client endpoint, or [`CLIENT_UNKNOWN`].
    pub client: u8,
    /// Bits of [`flow_flags`].
    pub flags: u8,
    /// Always zero.
    pub pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<Flow>() == 96);

impl Flow {
    /// A record that has seen nothing.
    pub const EMPTY: Self = Self {
        ep: [Endpoint {
            isn: 0,
            next_seq: 0,
            ack: 0,
            fin_seq: 0,
            window: 0,
            state: 0,
            wscale: NO_WSCALE,
            flags: 0,
            side: 0,
        }; 2],
        syn_ns: 0,
        synack_ns: 0,
        established_ns: 0,
        last_ns: 0,
        closed_ns: 0,
        client: CLIENT_UNKNOWN,
        flags: 0,
        pad: [0; 6],
    };

    /// Role of endpoint `i` (0 or 1).
    #[must_use]
    #[inline(always)]
    pub const fn role(&self, i: usize) -> Role {
        match self.client {
            0 | 1 if self.client as usize == i => Role::Client,
            0 | 1 => Role::Server,
            _ => Role::Unknown,
        }
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

    /// Whether neither endpoint holds any state any more (both CLOSED).
    #[must_use]
    #[inline(always)]
    pub const fn is_closed(&self) -> bool {
        matches!(self.ep[0].state(), TcpState::Closed)
            && matches!(self.ep[1].state(), TcpState::Closed)
    }
}

#[cfg(feature = "user")]
// SAFETY: `FlowKey` is `repr(C)` with explicit padding (no implicit padding bytes) and
// every bit pattern is valid.
unsafe impl aya::Pod for FlowKey {}
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

/// Value of the flow tables: the record and the per-flow spin lock that serializes the two
/// directions of a connection when they are handled on two CPUs at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    /// Taken around every update of `flow` in the kernel.
    pub lock: bpf_spin_lock,
    /// [`FlowKey::tag`] of the flow this element holds.
    pub tag: u32,
    /// The record.
    pub flow: Flow,
}

const _: () = assert!(core::mem::size_of::<FlowEntry>() == 104);

impl FlowEntry {
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
unsafe impl aya::Pod for FlowEntry {}
