//! Crafted Ethernet frames for tests and benchmarks (userspace only).
//!
//! One builder covers every case the parser distinguishes: VLAN stacks, IPv4 with options and
//! fragments, IPv6 with extension headers, TCP with any flags, truncation. Checksums are valid,
//! so the frames are also fit for live injection.

extern crate alloc;

use alloc::vec::Vec;

use crate::parse::PacketClass;

/// IP version and addresses of a crafted frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addrs {
    /// IPv4 source and destination.
    V4([u8; 4], [u8; 4]),
    /// IPv6 source and destination.
    V6([u8; 16], [u8; 16]),
}

/// What comes after the IP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upper {
    /// A TCP header with these flags.
    Tcp {
        /// Flag bits (see [`crate::parse::tcp_flags`]).
        flags: u8,
        /// Sequence number.
        seq: u32,
        /// Acknowledgment number.
        ack: u32,
    },
    /// An 8-byte UDP header.
    Udp,
}

/// A frame to build; adjust the public fields, then call [`FrameSpec::build`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    /// VLAN tags, outermost first (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    /// Addresses (and so the IP version).
    pub addrs: Addrs,
    /// Source and destination ports.
    pub ports: (u16, u16),
    /// Upper-layer header.
    pub upper: Upper,
    /// Bytes of IPv4 options (a multiple of 4, at most 40).
    pub ipv4_options: usize,
    /// IPv4: (MF flag, fragment offset in 8-byte units).
    pub ipv4_fragment: Option<(bool, u16)>,
    /// IPv6 extension headers to insert before the upper layer: (type, total length in bytes).
    pub ipv6_ext: Vec<(u8, usize)>,
    /// Bytes of TCP options (a multiple of 4, at most 40), filled with NOPs.
    pub tcp_options: usize,
    /// Payload bytes after the upper-layer header.
    pub payload: usize,
    /// Cut the finished frame to this many bytes.
    pub truncate: Option<usize>,
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
}

impl FrameSpec {
    /// A TCP segment over IPv4 with the given flags.
    #[must_use]
    pub fn tcp_v4(src: [u8; 4], dst: [u8; 4], ports: (u16, u16), flags: u8) -> Self {
        Self {
            vlans: Vec::new(),
            addrs: Addrs::V4(src, dst),
            ports,
            upper: Upper::Tcp {
                flags,
                seq: 1000,
                ack: 0,
            },
            ipv4_options: 0,
            ipv4_fragment: None,
            ipv6_ext: Vec::new(),
            tcp_options: 0,
            payload: 0,
            truncate: None,
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
        }
    }

    /// A TCP segment over IPv6 with the given flags.
    #[must_use]
    pub fn tcp_v6(src: [u8; 16], dst: [u8; 16], ports: (u16, u16), flags: u8) -> Self {
        Self {
            addrs: Addrs::V6(src, dst),
            ..Self::tcp_v4([0; 4], [0; 4], ports, flags)
        }
    }

    /// The frame's bytes.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let upper = self.upper_bytes();
        let mut f = Vec::with_capacity(128 + upper.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        for (tpid, id) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        let (ethertype, l3) = match self.addrs {
            Addrs::V4(src, dst) => (0x0800u16, self.ipv4(src, dst, &upper)),
            Addrs::V6(src, dst) => (0x86dd, self.ipv6(src, dst, &upper)),
        };
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&l3);
        // Ethernet minimum frame size (without FCS), as a NIC would pad it.
        while f.len() < 60 {
            f.push(0);
        }
        if let Some(n) = self.truncate {
            f.truncate(n);
        }
        f
    }

    fn proto(&self) -> u8 {
        match self.upper {
            Upper::Tcp { .. } => 6,
            Upper::Udp => 17,
        }
    }

    fn upper_bytes(&self) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&self.ports.0.to_be_bytes());
        u.extend_from_slice(&self.ports.1.to_be_bytes());
        match self.upper {
            Upper::Tcp { flags, seq, ack } => {
                u.extend_from_slice(&seq.to_be_bytes());
                u.extend_from_slice(&ack.to_be_bytes());
                let doff = (20 + self.tcp_options) / 4;
                u.push((doff as u8) << 4);
                u.push(flags);
                u.extend_from_slice(&64240u16.to_be_bytes());
                u.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                u.resize(u.len() + self.tcp_options, 1); // NOP options
            }
            Upper::Udp => {
                u.extend_from_slice(&((8 + self.payload) as u16).to_be_bytes());
                u.extend_from_slice(&[0, 0]);
            }
        }
        u.resize(u.len() + self.payload, 0xab);
        u
    }

    fn ipv4(&self, src: [u8; 4], dst: [u8; 4], upper: &[u8]) -> Vec<u8> {
        let ihl = 20 + self.ipv4_options;
        let mut h = Vec::with_capacity(ihl + upper.len());
        h.push(0x40 | (ihl / 4) as u8);
        h.push(0);
        h.extend_from_slice(&((ihl + upper.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34]);
        let frags = match self.ipv4_fragment {
            Some((mf, offset)) => (u16::from(mf) << 13) | (offset & 0x1fff),
            None => 0x4000, // DF
        };
        h.extend_from_slice(&frags.to_be_bytes());
        h.push(64);
        h.push(self.proto());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        // Options: NOPs ending with End of Option List.
        h.resize(ihl, 1);
        if self.ipv4_options > 0 {
            h[ihl - 1] = 0;
        }
        let c = checksum(&h, 0);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        h.extend_from_slice(&with_l4_checksum(upper, &pseudo, self.proto()));
        h
    }

    fn ipv6(&self, src: [u8; 16], dst: [u8; 16], upper: &[u8]) -> Vec<u8> {
        let mut ext = Vec::new();
        let mut types: Vec<u8> = self.ipv6_ext.iter().map(|(t, _)| *t).collect();
        types.push(self.proto());
        for (i, (_, len)) in self.ipv6_ext.iter().enumerate() {
            let mut e = alloc::vec![0u8; *len];
            e[0] = types[i + 1];
            // Length unit: 8 bytes past the first 8, or 4 bytes past the first 8 for AH.
            e[1] = if types[i] == 51 {
                (len / 4 - 2) as u8
            } else if types[i] == 44 {
                0
            } else {
                (len / 8 - 1) as u8
            };
            ext.extend_from_slice(&e);
        }
        let mut h = Vec::new();
        h.extend_from_slice(&[0x60, 0, 0, 0]);
        h.extend_from_slice(&((ext.len() + upper.len()) as u16).to_be_bytes());
        h.push(types[0]);
        h.push(64);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(&ext);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src);
        pseudo.extend_from_slice(&dst);
        h.extend_from_slice(&with_l4_checksum(upper, &pseudo, self.proto()));
        h
    }
}

/// Sets the TCP/UDP checksum of `upper` given the pseudo-header addresses.
fn with_l4_checksum(upper: &[u8], addrs: &[u8], proto: u8) -> Vec<u8> {
    let mut out = upper.to_vec();
    let mut sum = 0u32;
    for c in addrs.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    sum += u32::from(proto) + upper.len() as u32;
    let at = if proto == 6 { 16 } else { 6 };
    let c = checksum(upper, sum);
    out[at..at + 2].copy_from_slice(&c.to_be_bytes());
    out
}

/// Internet checksum (RFC 1071) of `data`, starting from a partial sum.
#[must_use]
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    for c in data.chunks(2) {
        let hi = u64::from(c[0]) << 8;
        let lo = u64::from(c.get(1).copied().unwrap_or(0));
        sum += hi | lo;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One crafted frame with the verdict a correct parser must reach, written down by hand.
#[derive(Clone, Debug)]
pub struct Case {
    /// What the frame exercises.
    pub name: &'static str,
    /// The bytes.
    pub frame: Vec<u8>,
    /// Expected class.
    pub class: PacketClass,
    /// Expected notes (bits of [`crate::parse::notes`]).
    pub notes: u8,
    /// TCP flags the frame carries (meaningful when `class` is TCP).
    pub flags: u8,
    /// Whether the frame is IPv6 (meaningful when `class` is TCP).
    pub ipv6: bool,
}

pub(crate) const A4: [u8; 4] = [10, 0, 0, 1];
pub(crate) const B4: [u8; 4] = [10, 0, 0, 2];
pub(crate) const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub(crate) const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

pub(crate) fn v4(flags: u8) -> FrameSpec {
    FrameSpec::tcp_v4(A4, B4, (40000, 80), flags)
}

pub(crate) fn v6(flags: u8) -> FrameSpec {
    FrameSpec::tcp_v6(A6, B6, (40000, 443), flags)
}

fn with(mut spec: FrameSpec, f: impl FnOnce(&mut FrameSpec)) -> Vec<u8> {
    f(&mut spec);
    spec.build()
}

fn case(name: &'static str, frame: Vec<u8>, class: PacketClass, notes: u8) -> Case {
    Case {
        name,
        frame,
        class,
        notes,
        flags: 0,
        ipv6: false,
    }
}

fn tcp(name: &'static str, frame: Vec<u8>, notes: u8, flags: u8, ipv6: bool) -> Case {
    Case {
        name,
        frame,
        class: PacketClass::Tcp,
        notes,
        flags,
        ipv6,
    }
}

/// Every parser case, with its expected verdict: VLAN stacks, IPv4 options and fragments,
/// IPv6 extension headers and fragments, non-IP, non-TCP, truncations and impossible fields.
#[must_use]
pub fn catalogue() -> Vec<Case> {
    use crate::parse::{
        MAX_IPV6_EXT_HEADERS, PacketClass as C,
        notes::{IPV4_OPTIONS, IPV6_EXT_HEADERS, VLAN_DOUBLE, VLAN_SINGLE},
        tcp_flags::{ACK, FIN, PSH, RST, SYN},
    };
    let q = |id| (0x8100u16, id);
    let ad = |id| (0x88a8u16, id);
    let mut ipv6_frag = with(v6(ACK), |s| s.ipv6_ext = alloc::vec![(44, 8)]);
    // A second fragment: offset 185 (8-byte units), M clear.
    ipv6_frag[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&(185u16 << 3).to_be_bytes());
    let mut arp = v4(0).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let mut bad_ihl = v4(ACK).build();
    bad_ihl[14] = 0x44;
    let mut bad_version = v4(ACK).build();
    bad_version[14] = 0x55;
    let mut bad_doff = v4(ACK).build();
    bad_doff[14 + 20 + 12] = 0x40;
    let mut short_ip_len = v4(ACK).build();
    short_ip_len[16..18].copy_from_slice(&30u16.to_be_bytes());
    alloc::vec![
        tcp("ipv4 syn", v4(SYN).build(), 0, SYN, false),
        tcp(
            "ipv4 data",
            with(v4(ACK | PSH), |s| s.payload = 100),
            0,
            ACK | PSH,
            false
        ),
        tcp("ipv4 fin", v4(FIN | ACK).build(), 0, FIN | ACK, false),
        tcp("ipv4 rst", v4(RST).build(), 0, RST, false),
        tcp("ipv6 syn-ack", v6(SYN | ACK).build(), 0, SYN | ACK, true),
        tcp(
            "802.1Q",
            with(v4(SYN), |s| s.vlans = alloc::vec![q(10)]),
            VLAN_SINGLE,
            SYN,
            false
        ),
        tcp(
            "QinQ",
            with(v6(ACK), |s| s.vlans = alloc::vec![ad(100), q(10)]),
            VLAN_DOUBLE,
            ACK,
            true
        ),
        case(
            "three tags",
            with(v4(ACK), |s| s.vlans = alloc::vec![ad(1), q(2), q(3)]),
            C::Unsupported,
            VLAN_DOUBLE,
        ),
        tcp(
            "ipv4 options",
            with(v4(ACK), |s| s.ipv4_options = 12),
            IPV4_OPTIONS,
            ACK,
            false
        ),
        tcp(
            "ipv4 40 B of options",
            with(v4(FIN | ACK), |s| s.ipv4_options = 40),
            IPV4_OPTIONS,
            FIN | ACK,
            false
        ),
        tcp(
            "ipv6 hop-by-hop + dstopts",
            with(v6(ACK), |s| s.ipv6_ext = alloc::vec![(0, 8), (60, 16)]),
            IPV6_EXT_HEADERS,
            ACK,
            true,
        ),
        tcp(
            "ipv6 atomic fragment",
            with(v6(ACK), |s| s.ipv6_ext = alloc::vec![(44, 8)]),
            IPV6_EXT_HEADERS,
            ACK,
            true
        ),
        case("ipv6 fragment", ipv6_frag, C::Fragment, 0),
        case(
            "ipv6 extension chain too long",
            with(v6(ACK), |s| s.ipv6_ext =
                alloc::vec![(60, 8); MAX_IPV6_EXT_HEADERS + 1]),
            C::Unsupported,
            IPV6_EXT_HEADERS,
        ),
        case(
            "ipv4 first fragment",
            with(v4(ACK), |s| s.ipv4_fragment = Some((true, 0))),
            C::Fragment,
            0
        ),
        case(
            "ipv4 later fragment",
            with(v4(ACK), |s| s.ipv4_fragment = Some((false, 185))),
            C::Fragment,
            0
        ),
        case("udp", with(v4(0), |s| s.upper = Upper::Udp), C::NonTcp, 0),
        case(
            "udp over ipv6",
            with(v6(0), |s| s.upper = Upper::Udp),
            C::NonTcp,
            0
        ),
        case("arp", arp, C::NonIp, 0),
        case("truncated ethernet", alloc::vec![0u8; 13], C::Truncated, 0),
        case(
            "truncated ipv4",
            with(v4(SYN), |s| s.truncate = Some(14 + 12)),
            C::Truncated,
            0
        ),
        case(
            "truncated tcp",
            with(v4(SYN), |s| s.truncate = Some(14 + 20 + 10)),
            C::Truncated,
            0
        ),
        case(
            "truncated ipv6",
            with(v6(SYN), |s| s.truncate = Some(14 + 30)),
            C::Truncated,
            0
        ),
        case(
            "truncated vlan tag",
            with(v4(SYN), |s| {
                s.vlans = alloc::vec![q(1)];
                s.truncate = Some(16);
            }),
            C::Truncated,
            0,
        ),
        case("ipv4 ihl < 5", bad_ihl, C::Malformed, 0),
        case("ipv4 version 5", bad_version, C::Malformed, 0),
        case("tcp data offset < 5", bad_doff, C::Malformed, 0),
        case(
            "ip length shorter than headers",
            short_ip_len,
            C::Malformed,
            0
        ),
    ]
}
