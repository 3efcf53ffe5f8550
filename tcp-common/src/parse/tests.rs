//! Table-driven parser tests over crafted frames.

use std::{vec, vec::Vec};

use super::{tcp_flags::*, *};
use crate::frames::{Addrs, FrameSpec, Upper};

const A4: [u8; 4] = [10, 0, 0, 1];
const B4: [u8; 4] = [10, 0, 0, 2];
const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn v4(flags: u8) -> FrameSpec {
    FrameSpec::tcp_v4(A4, B4, (40000, 80), flags)
}

fn v6(flags: u8) -> FrameSpec {
    FrameSpec::tcp_v6(A6, B6, (40000, 443), flags)
}

fn with(mut spec: FrameSpec, f: impl FnOnce(&mut FrameSpec)) -> FrameSpec {
    f(&mut spec);
    spec
}

/// (case name, frame, expected class, expected notes)
fn cases() -> Vec<(&'static str, Vec<u8>, PacketClass, u8)> {
    let q = |id| (0x8100u16, id);
    let ad = |id| (0x88a8u16, id);
    let mut ipv6_frag = with(v6(ACK), |s| s.ipv6_ext = vec![(44, 8)]).build();
    // Second fragment: offset 185 (in 8-byte units), M = 0.
    ipv6_frag[14 + 40 + 2..14 + 40 + 4].copy_from_slice(&(185u16 << 3).to_be_bytes());
    let mut arp = v4(0).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let mut bad_ihl = v4(ACK).build();
    bad_ihl[14] = 0x44;
    let mut bad_doff = v4(ACK).build();
    bad_doff[14 + 20 + 12] = 0x40;
    let mut bad_version = v4(ACK).build();
    bad_version[14] = 0x55;
    vec![
        ("ipv4 syn", v4(SYN).build(), PacketClass::Tcp, 0),
        ("ipv6 syn-ack", v6(SYN | ACK).build(), PacketClass::Tcp, 0),
        ("802.1Q", with(v4(ACK), |s| s.vlans = vec![q(10)]).build(), PacketClass::Tcp, notes::VLAN_SINGLE),
        ("QinQ", with(v6(ACK), |s| s.vlans = vec![ad(100), q(10)]).build(), PacketClass::Tcp, notes::VLAN_DOUBLE),
        (
            "three tags",
            with(v4(ACK), |s| s.vlans = vec![ad(1), q(2), q(3)]).build(),
            PacketClass::Unsupported,
            notes::VLAN_DOUBLE,
        ),
        ("ipv4 options", with(v4(ACK), |s| s.ipv4_options = 12).build(), PacketClass::Tcp, notes::IPV4_OPTIONS),
        (
            "ipv4 max options",
            with(v4(FIN | ACK), |s| s.ipv4_options = 40).build(),
            PacketClass::Tcp,
            notes::IPV4_OPTIONS,
        ),
        (
            "ipv6 hop-by-hop + dstopts",
            with(v6(ACK), |s| s.ipv6_ext = vec![(0, 8), (60, 16)]).build(),
            PacketClass::Tcp,
            notes::IPV6_EXT_HEADERS,
        ),
        (
            "ipv6 atomic fragment",
            with(v6(ACK), |s| s.ipv6_ext = vec![(44, 8)]).build(),
            PacketClass::Tcp,
            notes::IPV6_EXT_HEADERS,
        ),
        ("ipv6 fragment", ipv6_frag, PacketClass::Fragment, 0),
        (
            "ipv6 ext chain too long",
            with(v6(ACK), |s| s.ipv6_ext = vec![(60, 8); MAX_IPV6_EXT_HEADERS + 1]).build(),
            PacketClass::Unsupported,
            notes::IPV6_EXT_HEADERS,
        ),
        ("ipv4 first fragment", with(v4(ACK), |s| s.ipv4_fragment = Some((true, 0))).build(), PacketClass::Fragment, 0),
        ("ipv4 later fragment", with(v4(ACK), |s| s.ipv4_fragment = Some((false, 185))).build(), PacketClass::Fragment, 0),
        ("udp", with(v4(0), |s| s.upper = Upper::Udp).build(), PacketClass::NonTcp, 0),
        ("udp over ipv6", with(v6(0), |s| s.upper = Upper::Udp).build(), PacketClass::NonTcp, 0),
        ("arp", arp, PacketClass::NonIp, 0),
        ("runt", vec![0u8; 10], PacketClass::Truncated, 0),
        ("truncated ipv4", with(v4(SYN), |s| s.truncate = Some(14 + 12)).build(), PacketClass::Truncated, 0),
        ("truncated tcp", with(v4(SYN), |s| s.truncate = Some(14 + 20 + 10)).build(), PacketClass::Truncated, 0),
        ("truncated ipv6", with(v6(SYN), |s| s.truncate = Some(14 + 30)).build(), PacketClass::Truncated, 0),
        ("truncated vlan", with(v4(SYN), |s| { s.vlans = vec![q(1)]; s.truncate = Some(16) }).build(), PacketClass::Truncated, 0),
        ("ipv4 ihl < 5", bad_ihl, PacketClass::Malformed, 0),
        ("ipv4 version 5", bad_version, PacketClass::Malformed, 0),
        ("tcp data offset < 5", bad_doff, PacketClass::Malformed, 0),
    ]
}

#[test]
fn every_case_is_classified() {
    for (name, frame, class, notes) in cases() {
        let p = parse(frame.as_slice());
        assert_eq!(p.class, class, "case {name}");
        assert_eq!(p.notes, notes, "notes of case {name}");
    }
}

#[test]
fn ipv4_segment_fields() {
    let mut spec = v4(SYN | ECE | CWR);
    spec.upper = Upper::Tcp { flags: SYN | ECE | CWR, seq: 0xfffffff0, ack: 7 };
    spec.tcp_options = 20;
    spec.ipv4_options = 8;
    let p = parse(spec.build().as_slice());
    assert_eq!(p.class, PacketClass::Tcp);
    let s = p.segment;
    assert_eq!(&s.src[..4], &A4);
    assert_eq!(&s.dst[..4], &B4);
    assert!(s.src[4..].iter().all(|b| *b == 0));
    assert_eq!((s.sport, s.dport), (40000, 80));
    assert_eq!((s.seq, s.ack), (0xfffffff0, 7));
    assert_eq!(s.flags, SYN | ECE | CWR);
    assert_eq!(s.payload_len, 0, "padding of a short frame is not payload");
    assert!(!s.ipv6);
}

#[test]
fn payload_length_follows_ip_lengths() {
    for (spec, want) in [
        (with(v4(ACK | PSH), |s| s.payload = 1000), 1000),
        (with(v4(ACK | PSH), |s| { s.payload = 3; s.tcp_options = 12 }), 3),
        (with(v6(ACK | PSH), |s| { s.payload = 77; s.ipv6_ext = vec![(0, 8), (51, 24)] }), 77),
        (with(v6(ACK | FIN), |s| s.payload = 0), 0),
    ] {
        let p = parse(spec.build().as_slice());
        assert_eq!(p.class, PacketClass::Tcp);
        assert_eq!(p.segment.payload_len, want, "{spec:?}");
    }
}

#[test]
fn ipv6_addresses_are_kept_whole() {
    let p = parse(v6(SYN).build().as_slice());
    assert!(p.segment.ipv6);
    assert_eq!(p.segment.src, A6);
    assert_eq!(p.segment.dst, B6);
}

#[test]
fn ip_length_shorter_than_headers_is_malformed() {
    let mut f = v4(ACK).build();
    f[16..18].copy_from_slice(&30u16.to_be_bytes()); // IP total length 30 < 20 + 20
    assert_eq!(parse(f.as_slice()).class, PacketClass::Malformed);
}

#[test]
fn zero_ip_length_falls_back_to_frame_length() {
    let mut f = with(v4(ACK), |s| s.payload = 100).build();
    f[16..18].copy_from_slice(&0u16.to_be_bytes());
    let p = parse(f.as_slice());
    assert_eq!(p.class, PacketClass::Tcp);
    assert_eq!(p.segment.payload_len, 100);
}

#[test]
fn every_prefix_of_a_frame_parses_without_panic() {
    for (_, frame, _, _) in cases() {
        for n in 0..=frame.len() {
            let _ = parse(&frame[..n]);
        }
    }
    let _ = Addrs::V4(A4, B4);
}
