//! What each hook does with a packet: parse it and account for it.

use aya_ebpf::EbpfContext;
use aya_log_ebpf::debug;
use tcp_common::{
    counters::{Counter, Hook},
    parse::{Frame, PacketClass, notes, parse, tcp_flags},
};

use crate::maps::COUNTERS;

/// Parses one packet and updates the hook's counters. Never fails: a packet that cannot be
/// parsed is counted under its class and passed.
#[inline(always)]
pub fn observe<C: EbpfContext, F: Frame>(ctx: &C, frame: &F, hook: Hook) {
    let parsed = parse(frame);
    let Some(counters) = COUNTERS.get_ptr_mut(hook as u32) else {
        return;
    };
    // SAFETY: the pointer comes from a successful lookup in a per-CPU array, so it points to
    // this CPU's value, which nothing else writes while this program runs (BPF programs are
    // not preempted on their CPU).
    let counters = unsafe { &mut *counters };
    counters.bump(parsed.class.into());
    if parsed.notes & notes::VLAN_SINGLE != 0 {
        counters.bump(Counter::VlanSingle);
    }
    if parsed.notes & notes::VLAN_DOUBLE != 0 {
        counters.bump(Counter::VlanDouble);
    }
    if parsed.notes & notes::IPV4_OPTIONS != 0 {
        counters.bump(Counter::Ipv4Options);
    }
    if parsed.notes & notes::IPV6_EXT_HEADERS != 0 {
        counters.bump(Counter::Ipv6ExtHeaders);
    }
    match parsed.class {
        PacketClass::Tcp => {
            let seg = &parsed.segment;
            counters.bump(if seg.ipv6 {
                Counter::TcpV6
            } else {
                Counter::TcpV4
            });
            if seg.has(tcp_flags::SYN) {
                counters.bump(if seg.has(tcp_flags::ACK) {
                    Counter::SynAck
                } else {
                    Counter::Syn
                });
            }
            if seg.has(tcp_flags::FIN) {
                counters.bump(Counter::Fin);
            }
            if seg.has(tcp_flags::RST) {
                counters.bump(Counter::Rst);
            }
        }
        PacketClass::Truncated | PacketClass::Malformed => {
            let counter = Counter::from(parsed.class);
            debug!(
                ctx,
                "{}: {} frame of {} bytes passed",
                hook.name(),
                counter.name(),
                frame.len()
            );
        }
        _ => {}
    }
}
