//! Frame parsing: Ethernet (up to two VLAN tags), IPv4, IPv6 and TCP, over any byte source.
//!
//! Parsing policy (what is supported, what is counted and passed):
//! - Ethernet II with at most [`MAX_VLAN_TAGS`] 802.1Q / 802.1ad tags; deeper stacks are
//!   [`PacketClass::Unsupported`].
//! - IPv4 honouring IHL (options are skipped and noted); any fragment (MF set or a non-zero
//!   offset) is [`PacketClass::Fragment`] and is not tracked, even the first one: a tracker that
//!   only sees some fragments of a segment cannot account for its length.
//! - IPv6 with a bounded walk of at most [`MAX_IPV6_EXT_HEADERS`] extension headers (hop-by-hop,
//!   routing, destination options, AH, mobility, HIP, shim6 and atomic fragment headers); a real
//!   fragment is [`PacketClass::Fragment`]; a longer chain is [`PacketClass::Unsupported`].
//! - TCP honouring the data offset. The payload length comes from the IP length fields, not the
//!   frame length (Ethernet pads short frames); an IP length of zero (jumbograms, BIG TCP) falls
//!   back to the frame length.
//! - Every outcome is a verdict for counters only: callers always pass the packet on.
//!
//! The same function runs in the kernel (through a bounds-checked packet accessor) and in
//! userspace (over a byte slice), so kernel and offline results agree by construction.

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    vlan::VlanHdr,
};

/// No window scale option seen.
pub const NO_WSCALE: u8 = 0xff;

/// Most VLAN tags walked before the EtherType must be IP.
pub const MAX_VLAN_TAGS: usize = 2;
/// Most IPv6 extension headers walked before TCP must follow.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

/// TCP header flag bits, as in byte 13 of the header.
pub mod tcp_flags {
    /// No more data from sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push function.
    pub const PSH: u8 = 0x08;
    /// Acknowledgment field significant.
    pub const ACK: u8 = 0x10;
    /// Urgent pointer field significant.
    pub const URG: u8 = 0x20;
    /// ECN echo.
    pub const ECE: u8 = 0x40;
    /// Congestion window reduced.
    pub const CWR: u8 = 0x80;
}

/// Bits of [`Parsed::notes`]: facts about a frame that do not change its class.
pub mod notes {
    /// Exactly one VLAN tag.
    pub const VLAN_SINGLE: u8 = 0x01;
    /// Two VLAN tags.
    pub const VLAN_DOUBLE: u8 = 0x02;
    /// IPv4 header with options.
    pub const IPV4_OPTIONS: u8 = 0x04;
    /// IPv6 extension headers before the upper layer.
    pub const IPV6_EXT_HEADERS: u8 = 0x08;
}

/// A source of frame bytes. Implementations must return `None` for any read that does not
/// lie entirely inside the frame; the parser relies on nothing else for memory safety.
pub trait Frame {
    /// Copies a `T` from byte `offset` of the frame (no alignment required).
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
    /// Length of the whole frame in bytes.
    fn len(&self) -> usize;
    /// The 4 bytes at `offset` as a `u32` in native byte order (its bytes in memory are the
    /// frame's). Implementations may read them in one load.
    #[inline(always)]
    fn word_at(&self, offset: usize) -> Option<u32> {
        self.load::<[u8; 4]>(offset).map(u32::from_ne_bytes)
    }
    /// The 2 bytes at `offset` as a `u16` in native byte order.
    #[inline(always)]
    fn half_at(&self, offset: usize) -> Option<u16> {
        self.load::<[u8; 2]>(offset).map(u16::from_ne_bytes)
    }
    /// Whether the frame has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Frame for [u8] {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let end = offset.checked_add(core::mem::size_of::<T>())?;
        let bytes = self.get(offset..end)?;
        // SAFETY: `bytes` holds exactly size_of::<T>() initialised bytes; `read_unaligned`
        // needs no alignment, and every `T` read here is a plain header struct of byte
        // arrays and integers for which any bit pattern is valid.
        Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
    }

    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

/// Mutually exclusive outcome of parsing one frame.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketClass {
    /// A TCP segment; [`Parsed::segment`] is valid.
    Tcp = 0,
    /// Not IPv4 or IPv6.
    NonIp = 1,
    /// IP, but no TCP header follows.
    NonTcp = 2,
    /// An IP fragment.
    Fragment = 3,
    /// A header is cut short by the end of the frame.
    Truncated = 4,
    /// A header field is impossible.
    Malformed = 5,
    /// Valid, but deeper than the parser walks.
    Unsupported = 6,
}

impl PacketClass {
    /// Number of classes.
    pub const COUNT: usize = 7;
    /// Every class, in discriminant order.
    pub const ALL: [Self; Self::COUNT] = [
        Self::Tcp,
        Self::NonIp,
        Self::NonTcp,
        Self::Fragment,
        Self::Truncated,
        Self::Malformed,
        Self::Unsupported,
    ];
}

/// The fields of a TCP segment that the tracker uses. `repr(C)`: the addresses start the
/// struct, 4-byte aligned, so that they are written a word at a time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Source address; IPv4 addresses fill the first four bytes, the rest is zero.
    pub src: [u8; 16],
    /// Destination address, laid out as `src`.
    pub dst: [u8; 16],
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful with ACK).
    pub ack: u32,
    /// Bytes of TCP payload.
    pub payload_len: u32,
    /// Advertised window, unscaled.
    pub window: u16,
    /// Flag bits, see [`tcp_flags`].
    pub flags: u8,
    /// Whether the segment came over IPv6.
    pub ipv6: bool,
    /// Window scale shift from the TCP options of a SYN, else [`NO_WSCALE`].
    pub wscale: u8,
    /// Outermost VLAN id (0: untagged).
    pub vlan: u16,
}

impl Segment {
    /// Whether all of `bits` are set.
    #[must_use]
    pub const fn has(&self, bits: u8) -> bool {
        self.flags & bits == bits
    }
}

/// What the parser found in one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The verdict.
    pub class: PacketClass,
    /// Bits of [`notes`].
    pub notes: u8,
    /// Valid only when `class` is [`PacketClass::Tcp`].
    pub segment: Segment,
    /// Offset of the TCP options of a SYN segment (see [`syn_window_scale`]).
    pub syn_options_off: u16,
    /// Their length in bytes; 0 for other segments.
    pub syn_options_len: u8,
}

impl Parsed {
    /// A frame not parsed yet.
    pub const EMPTY: Self = Self {
        class: PacketClass::Truncated,
        notes: 0,
        segment: Segment {
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            seq: 0,
            ack: 0,
            payload_len: 0,
            window: 0,
            flags: 0,
            ipv6: false,
            wscale: NO_WSCALE,
            vlan: 0,
        },
        syn_options_off: 0,
        syn_options_len: 0,
    };
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Pre-standard QinQ outer tag, still sent by some switches.
const ETH_P_QINQ1: u16 = 0x9100;

const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
const IPV6_MOBILITY: u8 = 135;
const IPV6_HIP: u8 = 139;
const IPV6_SHIM6: u8 = 140;

const fn is_vlan(ethertype: u16) -> bool {
    matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ1)
}

/// Parses one Ethernet frame. Never fails: every frame gets a [`PacketClass`].
#[inline(always)]
pub fn parse<F: Frame + ?Sized>(frame: &F) -> Parsed {
    let mut parsed = Parsed::EMPTY;
    match parse_into(frame, &mut parsed.notes, &mut parsed.segment) {
        Ok(options) => {
            parsed.class = PacketClass::Tcp;
            // Bounded by the header checks: offset < 2^16, length <= 40.
            parsed.syn_options_off = options.off as u16;
            parsed.syn_options_len = options.len as u8;
        }
        Err(class) => parsed.class = class,
    }
    parsed
}

/// [`parse`], then [`syn_window_scale`] for SYNs: what userspace uses. The eBPF programs make
/// the same two calls as separate BPF-to-BPF calls (the option walk would otherwise multiply
/// the verifier's paths through the header walk).
#[must_use]
pub fn parse_full<F: Frame + ?Sized>(frame: &F) -> Parsed {
    let mut parsed = parse(frame);
    if parsed.syn_options_len > 0 {
        parsed.segment.wscale = syn_window_scale(frame, &parsed);
    }
    parsed
}

/// The shift of the window scale option (RFC 7323 §2) of a SYN parsed by [`parse`], or
/// [`NO_WSCALE`].
///
/// The walk knows the option kinds a SYN carries before the window scale on Linux, Windows,
/// the BSDs and macOS (NOP, MSS, SACK-permitted, timestamps, TCP-MD5), whose lengths are fixed
/// by their kind: the cursor is then a constant on every verifier path, and paths reaching the
/// same offset are pruned. An unknown kind before the window scale (rare on a SYN) ends the
/// walk without a scale, which the state machine treats as the largest one.
#[inline(always)]
pub fn syn_window_scale<F: Frame + ?Sized>(frame: &F, parsed: &Parsed) -> u8 {
    let off = usize::from(parsed.syn_options_off);
    let len = usize::from(parsed.syn_options_len).min(40);
    let mut at = 0;
    while at < len {
        let Some([kind, opt_len, value]) = frame.load::<[u8; 3]>(off + at) else {
            break;
        };
        at += match kind {
            1 => 1,   // NOP
            2 => 4,   // MSS
            4 => 2,   // SACK permitted
            8 => 10,  // timestamps
            19 => 18, // TCP-MD5 signature (RFC 2385)
            3 if opt_len == 3 => return value.min(14),
            _ => break, // EOL, or a kind of another length
        };
    }
    NO_WSCALE
}

/// The common frame in a few loads: untagged Ethernet, then IPv4 without options and not a
/// fragment, or IPv6 with TCP as its next header, then TCP, with the IP length given. Fills
/// `parsed` and returns true; false for any other frame (and `parsed` is then unspecified),
/// which [`parse`] handles.
///
/// For every frame it accepts it finds exactly what [`parse`] finds: class TCP, no notes, the
/// same segment and SYN options (the tests check it on the catalogue and on random frames).
/// The kernel's hot path runs it inline, before and instead of the general parser: fields are
/// read as whole words ([`Frame::word_at`]), which the kernel's frames read in one load each.
#[inline(always)]
pub fn parse_plain<F: Frame + ?Sized>(frame: &F, parsed: &mut Parsed) -> bool {
    let seg = &mut parsed.segment;
    let be16 = |at: usize| frame.half_at(at).map(u16::from_be);
    let Some(ethertype) = be16(12) else {
        return false;
    };
    let (l4, ip_payload) = match ethertype {
        ETH_P_IP => {
            const IP: usize = EthHdr::LEN;
            // Words of the header: version/IHL/TOS/length, id/fragment, TTL/protocol/checksum.
            let (Some(w0), Some(w1), Some(w2)) = (
                frame.word_at(IP).map(u32::from_be),
                frame.word_at(IP + 4).map(u32::from_be),
                frame.word_at(IP + 8).map(u32::from_be),
            ) else {
                return false;
            };
            let tot_len = (w0 & 0xffff) as usize;
            // Version 4, IHL 5; neither MF nor an offset; TCP; a length that covers the header.
            if w0 >> 24 != 0x45
                || w1 & 0x3fff != 0
                || (w2 >> 16) & 0xff != u32::from(IPPROTO_TCP)
                || tot_len < Ipv4Hdr::LEN
            {
                return false;
            }
            let (Some(src), Some(dst)) = (frame.word_at(IP + 12), frame.word_at(IP + 16)) else {
                return false;
            };
            set_address(&mut seg.src, [src, 0, 0, 0]);
            set_address(&mut seg.dst, [dst, 0, 0, 0]);
            seg.ipv6 = false;
            (IP + Ipv4Hdr::LEN, tot_len - Ipv4Hdr::LEN)
        }
        ETH_P_IPV6 => {
            const IP: usize = EthHdr::LEN;
            // Version/class/flow, then payload length/next header/hop limit.
            let (Some(w0), Some(w1)) = (
                frame.word_at(IP).map(u32::from_be),
                frame.word_at(IP + 4).map(u32::from_be),
            ) else {
                return false;
            };
            let payload_len = (w1 >> 16) as usize;
            if w0 >> 28 != 6 || (w1 >> 8) & 0xff != u32::from(IPPROTO_TCP) || payload_len == 0 {
                return false;
            }
            let words = |at: usize| {
                Some([
                    frame.word_at(at)?,
                    frame.word_at(at + 4)?,
                    frame.word_at(at + 8)?,
                    frame.word_at(at + 12)?,
                ])
            };
            let (Some(src), Some(dst)) = (words(IP + 8), words(IP + 24)) else {
                return false;
            };
            set_address(&mut seg.src, src);
            set_address(&mut seg.dst, dst);
            seg.ipv6 = true;
            (IP + Ipv6Hdr::LEN, payload_len)
        }
        _ => return false,
    };
    // Ports, sequence, acknowledgment, then data offset/flags/window.
    let (Some(ports), Some(seq), Some(ack), Some(w3)) = (
        frame.word_at(l4).map(u32::from_be),
        frame.word_at(l4 + 4).map(u32::from_be),
        frame.word_at(l4 + 8).map(u32::from_be),
        frame.word_at(l4 + 12).map(u32::from_be),
    ) else {
        return false;
    };
    let doff = (w3 >> 28) as usize * 4;
    let flags = (w3 >> 16) as u8;
    // The whole fixed header must be in the frame, as for `parse` (its last word, checksum
    // and urgent pointer, is not needed).
    if frame.len() < l4 + TcpHdr::LEN || doff < TcpHdr::LEN || ip_payload < doff {
        return false;
    }
    seg.sport = (ports >> 16) as u16;
    seg.dport = ports as u16;
    seg.seq = seq;
    seg.ack = ack;
    seg.window = w3 as u16;
    seg.payload_len = (ip_payload - doff) as u32;
    seg.flags = flags;
    seg.wscale = NO_WSCALE;
    seg.vlan = 0;
    parsed.class = PacketClass::Tcp;
    parsed.notes = 0;
    parsed.syn_options_off = (l4 + TcpHdr::LEN) as u16;
    parsed.syn_options_len = if flags & tcp_flags::SYN != 0 {
        (doff - TcpHdr::LEN) as u8
    } else {
        0
    };
    true
}

/// Writes a 16-byte address from its four words as [`Frame::word_at`] reads them, one aligned
/// word store each (byte copies and zero runs become `memcpy`/`memset` calls in the BPF build,
/// which the hot path must not pay for).
#[inline(always)]
fn set_address(dst: &mut [u8; 16], words: [u32; 4]) {
    let out = dst.as_mut_ptr().cast::<u32>();
    for (i, w) in words.into_iter().enumerate() {
        // SAFETY: `dst` is a field at a 4-aligned offset of the `repr(C)` `Segment` (asserted
        // below) and holds four words.
        unsafe { out.add(i).write(w) };
    }
}

const _: () = assert!(core::mem::offset_of!(Segment, src) % 4 == 0);
const _: () = assert!(core::mem::offset_of!(Segment, dst) % 4 == 0);
const _: () = assert!(core::mem::align_of::<Segment>() >= 4);

/// Where the TCP options of a SYN are (`len` 0 for other segments).
struct SynOptions {
    off: usize,
    len: usize,
}

#[inline(always)]
fn parse_into<F: Frame + ?Sized>(
    frame: &F,
    notes: &mut u8,
    seg: &mut Segment,
) -> Result<SynOptions, PacketClass> {
    let eth: EthHdr = frame.load(0).ok_or(PacketClass::Truncated)?;
    let mut ethertype = u16::from_be(eth.ether_type);
    let mut off = EthHdr::LEN;
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS && is_vlan(ethertype) {
        let tag: VlanHdr = frame.load(off).ok_or(PacketClass::Truncated)?;
        if tags == 0 {
            seg.vlan = u16::from_be_bytes(tag.tci) & 0x0fff;
        }
        ethertype = u16::from_be(tag.ether_type);
        off += VlanHdr::LEN;
        tags += 1;
    }
    match tags {
        1 => *notes |= notes::VLAN_SINGLE,
        2 => *notes |= notes::VLAN_DOUBLE,
        _ => {}
    }
    if is_vlan(ethertype) {
        return Err(PacketClass::Unsupported);
    }
    let (l4, ip_payload_len) = match ethertype {
        ETH_P_IP => parse_ipv4(frame, off, notes, seg)?,
        ETH_P_IPV6 => parse_ipv6(frame, off, notes, seg)?,
        _ => return Err(PacketClass::NonIp),
    };
    parse_tcp(frame, l4, ip_payload_len, seg)
}

/// Returns the offset of the TCP header and the IP payload length (from the TCP header on),
/// or `None` for the length when the IP header does not give it.
#[inline(always)]
fn parse_ipv4<F: Frame + ?Sized>(
    frame: &F,
    off: usize,
    notes: &mut u8,
    seg: &mut Segment,
) -> Result<(usize, Option<usize>), PacketClass> {
    let ip: Ipv4Hdr = frame.load(off).ok_or(PacketClass::Truncated)?;
    if ip.vihl >> 4 != 4 {
        return Err(PacketClass::Malformed);
    }
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ihl < Ipv4Hdr::LEN {
        return Err(PacketClass::Malformed);
    }
    if ihl > Ipv4Hdr::LEN {
        *notes |= notes::IPV4_OPTIONS;
    }
    // MF flag or a non-zero fragment offset.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(PacketClass::Fragment);
    }
    if ip.proto != IPPROTO_TCP {
        return Err(PacketClass::NonTcp);
    }
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    let payload = if tot_len == 0 {
        None
    } else if tot_len < ihl {
        return Err(PacketClass::Malformed);
    } else {
        Some(tot_len - ihl)
    };
    seg.src[..4].copy_from_slice(&ip.src_addr);
    seg.dst[..4].copy_from_slice(&ip.dst_addr);
    seg.ipv6 = false;
    Ok((off + ihl, payload))
}

#[inline(always)]
fn parse_ipv6<F: Frame + ?Sized>(
    frame: &F,
    off: usize,
    notes: &mut u8,
    seg: &mut Segment,
) -> Result<(usize, Option<usize>), PacketClass> {
    let ip: Ipv6Hdr = frame.load(off).ok_or(PacketClass::Truncated)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(PacketClass::Malformed);
    }
    let mut next = ip.next_hdr;
    let mut l4 = off + Ipv6Hdr::LEN;
    let mut ext_len = 0usize;
    let mut walked = 0;
    while walked < MAX_IPV6_EXT_HEADERS && next != IPPROTO_TCP {
        // Every extension header starts with (next header, length); the unit of the length
        // depends on the header type (RFC 8200 §4, RFC 4302 §2.2 for AH).
        let head: [u8; 2] = frame.load(l4).ok_or(PacketClass::Truncated)?;
        let len = match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_MOBILITY | IPV6_HIP | IPV6_SHIM6 => {
                (usize::from(head[1]) + 1) * 8
            }
            IPV6_AH => (usize::from(head[1]) + 2) * 4,
            IPV6_FRAGMENT => {
                let frag: [u8; 8] = frame.load(l4).ok_or(PacketClass::Truncated)?;
                // Offset (13 bits) and M flag: only an "atomic" fragment (both zero, RFC 6946)
                // still holds a whole segment.
                if u16::from_be_bytes([frag[2], frag[3]]) & 0xfff9 != 0 {
                    return Err(PacketClass::Fragment);
                }
                8
            }
            _ => return Err(PacketClass::NonTcp),
        };
        *notes |= notes::IPV6_EXT_HEADERS;
        next = head[0];
        l4 += len;
        ext_len += len;
        walked += 1;
    }
    if next != IPPROTO_TCP {
        return Err(if walked == MAX_IPV6_EXT_HEADERS {
            PacketClass::Unsupported
        } else {
            PacketClass::NonTcp
        });
    }
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    let payload = if payload_len == 0 {
        None
    } else if payload_len < ext_len {
        return Err(PacketClass::Malformed);
    } else {
        Some(payload_len - ext_len)
    };
    seg.src = ip.src_addr;
    seg.dst = ip.dst_addr;
    seg.ipv6 = true;
    Ok((l4, payload))
}

#[inline(always)]
fn parse_tcp<F: Frame + ?Sized>(
    frame: &F,
    l4: usize,
    ip_payload_len: Option<usize>,
    seg: &mut Segment,
) -> Result<SynOptions, PacketClass> {
    let tcp: TcpHdr = frame.load(l4).ok_or(PacketClass::Truncated)?;
    let doff = usize::from(tcp.doff()) * 4;
    if doff < TcpHdr::LEN {
        return Err(PacketClass::Malformed);
    }
    let segment_len = match ip_payload_len {
        Some(len) => len,
        None => frame.len().saturating_sub(l4),
    };
    if segment_len < doff {
        return Err(PacketClass::Malformed);
    }
    seg.sport = u16::from_be_bytes(tcp.source);
    seg.dport = u16::from_be_bytes(tcp.dest);
    seg.seq = u32::from_be_bytes(tcp.seq);
    seg.ack = u32::from_be_bytes(tcp.ack_seq);
    seg.window = u16::from_be_bytes(tcp.window);
    seg.payload_len = (segment_len - doff) as u32;
    let mut flags = 0u8;
    for (set, bit) in [
        (tcp.fin(), tcp_flags::FIN),
        (tcp.syn(), tcp_flags::SYN),
        (tcp.rst(), tcp_flags::RST),
        (tcp.psh(), tcp_flags::PSH),
        (tcp.ack(), tcp_flags::ACK),
        (tcp.urg(), tcp_flags::URG),
        (tcp.ece(), tcp_flags::ECE),
        (tcp.cwr(), tcp_flags::CWR),
    ] {
        if set != 0 {
            flags |= bit;
        }
    }
    seg.flags = flags;
    seg.wscale = NO_WSCALE;
    Ok(SynOptions {
        off: l4 + TcpHdr::LEN,
        len: if flags & tcp_flags::SYN != 0 {
            doff - TcpHdr::LEN
        } else {
            0
        },
    })
}

#[cfg(test)]
mod tests;
