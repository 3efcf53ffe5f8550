//! Table-driven parser tests over crafted frames.

use std::vec;

use super::{tcp_flags::*, *};
use crate::frames::{A4, A6, B4, B6, FrameSpec, Upper, catalogue, v4, v6};

fn with(mut spec: FrameSpec, f: impl FnOnce(&mut FrameSpec)) -> FrameSpec {
    f(&mut spec);
    spec
}

#[test]
fn every_case_is_classified() {
    for case in catalogue() {
        let p = parse(case.frame.as_slice());
        assert_eq!(p.class, case.class, "case {}", case.name);
        assert_eq!(p.notes, case.notes, "notes of case {}", case.name);
        if case.class == PacketClass::Tcp {
            assert_eq!(p.segment.flags, case.flags, "flags of case {}", case.name);
            assert_eq!(p.segment.ipv6, case.ipv6, "family of case {}", case.name);
        }
    }
}

#[test]
fn ipv4_segment_fields() {
    let mut spec = v4(SYN | ECE | CWR);
    spec.upper = Upper::Tcp {
        flags: SYN | ECE | CWR,
        seq: 0xfffffff0,
        ack: 7,
    };
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
        (
            with(v4(ACK | PSH), |s| {
                s.payload = 3;
                s.tcp_options = 12
            }),
            3,
        ),
        (
            with(v6(ACK | PSH), |s| {
                s.payload = 77;
                s.ipv6_ext = vec![(0, 8), (51, 24)]
            }),
            77,
        ),
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
fn zero_ip_length_falls_back_to_frame_length() {
    let mut f = with(v4(ACK), |s| s.payload = 100).build();
    f[16..18].copy_from_slice(&0u16.to_be_bytes());
    let p = parse(f.as_slice());
    assert_eq!(p.class, PacketClass::Tcp);
    assert_eq!(p.segment.payload_len, 100);
}

#[test]
fn every_prefix_of_a_frame_parses_without_panic() {
    for case in catalogue() {
        for n in 0..=case.frame.len() {
            let _ = parse(&case.frame[..n]);
        }
    }
}

#[test]
fn window_scale_option_of_syns() {
    let syn = |opts: &[u8]| {
        let mut spec = v4(SYN);
        spec.tcp_options = opts.len();
        let mut f = spec.build();
        f[14 + 20 + 20..14 + 20 + 20 + opts.len()].copy_from_slice(opts);
        parse_full(f.as_slice()).segment.wscale
    };
    // Linux: MSS, SACK permitted, timestamps, NOP, window scale 7.
    assert_eq!(
        syn(&[
            2, 4, 5, 0xb4, 4, 2, 8, 10, 1, 2, 3, 4, 0, 0, 0, 0, 1, 3, 3, 7
        ]),
        7
    );
    // Windows: MSS, NOP, window scale 8, NOP, NOP, SACK permitted.
    assert_eq!(syn(&[2, 4, 5, 0xb4, 1, 3, 3, 8, 1, 1, 4, 2]), 8);
    // Shifts above 14 are clamped (RFC 7323 §2.3).
    assert_eq!(syn(&[1, 3, 3, 20]), 14);
    // No window scale option; or one behind an option of unknown length.
    assert_eq!(syn(&[2, 4, 5, 0xb4]), crate::parse::NO_WSCALE);
    assert_eq!(syn(&[30, 4, 0, 0, 1, 3, 3, 7]), crate::parse::NO_WSCALE);
    // Only SYNs are read.
    let mut spec = v4(ACK);
    spec.tcp_options = 4;
    let mut f = spec.build();
    f[54..58].copy_from_slice(&[1, 3, 3, 7]);
    assert_eq!(
        parse_full(f.as_slice()).segment.wscale,
        crate::parse::NO_WSCALE
    );
}

/// What the plain-frame parser makes of a frame, where it accepts it.
fn plain(frame: &[u8]) -> Option<Parsed> {
    let mut parsed = Parsed::EMPTY;
    parse_plain(frame, &mut parsed).then_some(parsed)
}

/// The plain-frame parser either declines a frame or finds exactly what the general one does.
fn assert_plain_agrees(frame: &[u8], what: &str) {
    let Some(mine) = plain(frame) else { return };
    let p = parse(frame);
    assert_eq!(
        p.class,
        PacketClass::Tcp,
        "{what}: accepted a non-TCP frame"
    );
    assert_eq!(p.notes, 0, "{what}: accepted a frame with notes");
    assert_eq!(mine.segment, p.segment, "{what}");
    assert_eq!(
        mine.syn_options_len, p.syn_options_len,
        "{what}: SYN options"
    );
    if p.syn_options_len > 0 {
        assert_eq!(
            mine.syn_options_off, p.syn_options_off,
            "{what}: SYN options"
        );
        assert_eq!(
            syn_window_scale(frame, &mine),
            syn_window_scale(frame, &p),
            "{what}: window scale"
        );
    }
}

#[test]
fn plain_parser_agrees_with_the_general_one_on_every_case() {
    let mut accepted = 0;
    for case in catalogue() {
        assert_plain_agrees(&case.frame, case.name);
        accepted += usize::from(plain(&case.frame).is_some());
    }
    // The catalogue's plain segments: IPv4 and IPv6 data and SYNs, a FIN.
    assert!(accepted >= 3, "the plain parser took only {accepted} cases");
    for (spec, ipv6) in [
        (v4(ACK | PSH), false),
        (v6(ACK), true),
        (v4(FIN | ACK), false),
        (with(v4(SYN), |s| s.tcp_options = 20), false),
    ] {
        let p = plain(&spec.build()).expect("a plain segment");
        assert_eq!(p.segment.ipv6, ipv6);
    }
    for declined in [
        with(v4(ACK), |s| s.ipv4_options = 4).build(),
        with(v4(ACK), |s| s.vlans = vec![(0x8100, 7)]).build(),
        with(v6(ACK), |s| s.ipv6_ext = vec![(0, 8)]).build(),
    ] {
        assert!(plain(&declined).is_none());
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

    /// Any byte changed anywhere in a plain segment (SYNs with random options included), and
    /// any length: the plain parser declines or agrees.
    #[test]
    fn plain_parser_agrees_on_mutated_frames(
        ipv6 in proptest::bool::ANY,
        flags in 0u8..=255,
        payload in 0usize..64,
        options in 0usize..=10,
        option_bytes in proptest::collection::vec(0u8..=255, 40),
        at in 0usize..120,
        byte in 0u8..=255,
        cut in 0usize..200,
    ) {
        let spec = with(if ipv6 { v6(flags) } else { v4(flags) }, |s| {
            s.payload = payload;
            s.tcp_options = options * 4;
        });
        let mut frame = spec.build();
        let l4 = if ipv6 { 14 + 40 } else { 14 + 20 };
        for (i, b) in option_bytes.iter().take(options * 4).enumerate() {
            frame[l4 + 20 + i] = *b;
        }
        if let Some(b) = frame.get_mut(at) {
            *b = byte;
        }
        frame.truncate(cut.max(1));
        assert_plain_agrees(&frame, "mutated frame");
    }
}
