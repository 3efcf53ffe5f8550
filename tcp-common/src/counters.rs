//! Per-hook packet counters, kept by the eBPF programs in one per-CPU array and summed by the
//! agent at read time.
//!
//! Each hook (XDP ingress, TC egress) owns one [`HookCounters`] value per CPU: a single map
//! lookup per packet reaches every counter the packet touches.

use crate::parse::{PacketClass, Parsed, Segment, notes, tcp_flags};

/// Where a packet was observed. The discriminant is the key into the counters map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// XDP program on the interface's receive path.
    XdpIngress = 0,
    /// TC classifier on the interface's transmit path.
    TcEgress = 1,
}

impl Hook {
    /// Every hook, in key order.
    pub const ALL: [Self; 2] = [Self::XdpIngress, Self::TcEgress];

    /// Label value used in metrics and logs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::XdpIngress => "xdp_ingress",
            Self::TcEgress => "tc_egress",
        }
    }
}

/// Number of hooks, i.e. entries of the counters map.
pub const HOOKS: u32 = Hook::ALL.len() as u32;

/// One counter slot inside [`HookCounters`]. The first [`PacketClass::COUNT`] slots are the
/// mutually exclusive parse results (their sum is the number of packets seen); the rest
/// describe packets further and overlap.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Parsed TCP segment (tracked).
    Tcp = 0,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NonIp = 1,
    /// IP, but not TCP (UDP, ICMP, IPv6 without a TCP header after its extension headers).
    NonTcp = 2,
    /// IPv4 fragment (first or later) or IPv6 fragment other than an atomic one: passed untracked.
    Fragment = 3,
    /// A header ran past the end of the frame.
    Truncated = 4,
    /// A header field is impossible (IPv4 IHL < 5, TCP data offset < 5, lengths that disagree).
    Malformed = 5,
    /// Valid but beyond what the parser walks (more than two VLAN tags, long IPv6 extension
    /// header chains).
    Unsupported = 6,
    /// TCP over IPv4.
    TcpV4 = 7,
    /// TCP over IPv6.
    TcpV6 = 8,
    /// Frames with exactly one 802.1Q/802.1ad tag.
    VlanSingle = 9,
    /// Frames with two stacked tags (QinQ).
    VlanDouble = 10,
    /// IPv4 headers that carry options (IHL > 5).
    Ipv4Options = 11,
    /// IPv6 packets with at least one extension header before TCP.
    Ipv6ExtHeaders = 12,
    /// TCP segments with SYN and without ACK.
    Syn = 13,
    /// TCP segments with SYN and ACK.
    SynAck = 14,
    /// TCP segments with FIN.
    Fin = 15,
    /// TCP segments with RST.
    Rst = 16,
    /// TCP segments that took the fast path: both endpoints ESTABLISHED, nothing for the
    /// segment to change but its sender's ACK and window (no lock, no clock).
    FastPath = 17,
}

/// Number of slots in [`HookCounters`] (room to grow without changing the value size).
pub const COUNTER_SLOTS: usize = 32;

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Self; 18] = [
        Self::Tcp,
        Self::NonIp,
        Self::NonTcp,
        Self::Fragment,
        Self::Truncated,
        Self::Malformed,
        Self::Unsupported,
        Self::TcpV4,
        Self::TcpV6,
        Self::VlanSingle,
        Self::VlanDouble,
        Self::Ipv4Options,
        Self::Ipv6ExtHeaders,
        Self::Syn,
        Self::SynAck,
        Self::Fin,
        Self::Rst,
        Self::FastPath,
    ];

    /// Stable snake-case name, used as a metric label value.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::NonIp => "non_ip",
            Self::NonTcp => "non_tcp",
            Self::Fragment => "fragment",
            Self::Truncated => "truncated",
            Self::Malformed => "malformed",
            Self::Unsupported => "unsupported",
            Self::TcpV4 => "tcp_v4",
            Self::TcpV6 => "tcp_v6",
            Self::VlanSingle => "vlan_single",
            Self::VlanDouble => "vlan_double",
            Self::Ipv4Options => "ipv4_options",
            Self::Ipv6ExtHeaders => "ipv6_ext_headers",
            Self::Syn => "syn",
            Self::SynAck => "syn_ack",
            Self::Fin => "fin",
            Self::Rst => "rst",
            Self::FastPath => "fast_path",
        }
    }

    /// Whether this slot is one of the mutually exclusive parse results.
    #[must_use]
    pub const fn is_result(self) -> bool {
        (self as usize) < PacketClass::COUNT
    }
}

impl From<PacketClass> for Counter {
    fn from(class: PacketClass) -> Self {
        match class {
            PacketClass::Tcp => Self::Tcp,
            PacketClass::NonIp => Self::NonIp,
            PacketClass::NonTcp => Self::NonTcp,
            PacketClass::Fragment => Self::Fragment,
            PacketClass::Truncated => Self::Truncated,
            PacketClass::Malformed => Self::Malformed,
            PacketClass::Unsupported => Self::Unsupported,
        }
    }
}

/// Counters of one hook on one CPU: the value type of the per-CPU counters map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookCounters {
    /// Indexed by [`Counter`].
    pub slots: [u64; COUNTER_SLOTS],
}

impl HookCounters {
    /// All zero.
    pub const ZERO: Self = Self {
        slots: [0; COUNTER_SLOTS],
    };

    /// Value of one counter.
    #[must_use]
    pub const fn get(&self, counter: Counter) -> u64 {
        self.slots[counter as usize]
    }

    /// Adds one to a counter.
    #[inline(always)]
    pub fn bump(&mut self, counter: Counter) {
        // The enum discriminants are all below COUNTER_SLOTS (checked below), so the
        // index is in bounds; `get_mut` keeps the BPF build free of panics anyway.
        if let Some(slot) = self.slots.get_mut(counter as usize) {
            *slot = slot.wrapping_add(1);
        }
    }

    /// Adds one to the counter in `slot` (ignored when out of range).
    #[inline(always)]
    pub fn bump_slot(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = s.wrapping_add(1);
        }
    }

    /// Counts one parsed frame: its class (`class`, the byte of `parsed.class`, passed apart
    /// so that the eBPF side can read it in a verifier-friendly way), its notes, and for TCP
    /// its address family and SYN / SYN-ACK / FIN / RST flags.
    #[inline(always)]
    pub fn count(&mut self, class: u8, parsed: &Parsed) {
        self.bump_slot(usize::from(class));
        for (bit, counter) in [
            (notes::VLAN_SINGLE, Counter::VlanSingle),
            (notes::VLAN_DOUBLE, Counter::VlanDouble),
            (notes::IPV4_OPTIONS, Counter::Ipv4Options),
            (notes::IPV6_EXT_HEADERS, Counter::Ipv6ExtHeaders),
        ] {
            if parsed.notes & bit != 0 {
                self.bump(counter);
            }
        }
        if parsed.class != PacketClass::Tcp {
            return;
        }
        self.count_segment(&parsed.segment);
    }

    /// Counts what a TCP segment adds besides its class and notes: its address family and
    /// SYN / SYN-ACK / FIN / RST flags.
    #[inline(always)]
    pub fn count_segment(&mut self, seg: &Segment) {
        self.bump(if seg.ipv6 {
            Counter::TcpV6
        } else {
            Counter::TcpV4
        });
        if seg.has(tcp_flags::SYN) {
            self.bump(if seg.has(tcp_flags::ACK) {
                Counter::SynAck
            } else {
                Counter::Syn
            });
        }
        if seg.has(tcp_flags::FIN) {
            self.bump(Counter::Fin);
        }
        if seg.has(tcp_flags::RST) {
            self.bump(Counter::Rst);
        }
    }

    /// Adds another CPU's counters to these.
    pub fn accumulate(&mut self, other: &Self) {
        for (a, b) in self.slots.iter_mut().zip(other.slots.iter()) {
            *a = a.wrapping_add(*b);
        }
    }

    /// Packets seen: the sum of the mutually exclusive parse results.
    #[must_use]
    pub fn packets(&self) -> u64 {
        Counter::ALL
            .iter()
            .filter(|c| c.is_result())
            .map(|c| self.get(*c))
            .fold(0, u64::wrapping_add)
    }
}

impl Default for HookCounters {
    fn default() -> Self {
        Self::ZERO
    }
}

const _: () = assert!(Counter::ALL.len() <= COUNTER_SLOTS);
const _: () = assert!(core::mem::size_of::<HookCounters>() == COUNTER_SLOTS * 8);

#[cfg(feature = "user")]
// SAFETY: `HookCounters` is `repr(C)`, made only of `u64`s (no padding), and every bit
// pattern is a valid value.
unsafe impl aya::Pod for HookCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_slots_match_their_position() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?}");
        }
    }

    #[test]
    fn result_counters_are_exactly_the_packet_classes() {
        let results: std::vec::Vec<_> = Counter::ALL.iter().filter(|c| c.is_result()).collect();
        assert_eq!(results.len(), PacketClass::COUNT);
        for class in PacketClass::ALL {
            assert!(Counter::from(class).is_result());
        }
    }

    #[test]
    fn names_are_unique_snake_case() {
        let mut names: std::vec::Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len());
        for n in names {
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            );
        }
    }
}
