//! Crafted Ethernet frames for tests and benchmarks (userspace only).
//!
//! One builder covers every case the parser distinguishes: VLAN stacks, IPv4 with options and
//! fragments, IPv6 with extension headers, TCP with any flags, truncation. Checksums are valid,
//! so the frames are also fit for live injection.

extern crate alloc;

use alloc::vec::Vec;

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
