//! Table-driven tests, one per RFC 793 case an observer must tell apart, and property tests
//! over random segment sequences.

use std::vec::Vec;

use proptest::prelude::*;

use super::*;
use crate::{
    flow::{FlowKey, NO_WSCALE},
    parse::tcp_flags::{ACK, FIN, PSH, RST, SYN},
    state::{Role, TcpState, events as E},
};

const A: ([u8; 16], u16) = ([10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 40000);
const B: ([u8; 16], u16) = ([10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 80);

/// Who sends a segment in a test conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    /// 10.0.0.1:40000, the usual client.
    A,
    /// 10.0.0.2:80, the usual server.
    B,
}

/// A conversation between A and B through the observer.
struct Conv {
    flow: Flow,
    now: u64,
}

impl Conv {
    fn new() -> Self {
        Self {
            flow: Flow::EMPTY,
            now: 1_000,
        }
    }

    fn segment(who: Who, flags: u8, seq: u32, ack: u32, len: u32) -> Segment {
        let (src, dst) = match who {
            Who::A => (A, B),
            Who::B => (B, A),
        };
        Segment {
            src: src.0,
            dst: dst.0,
            sport: src.1,
            dport: dst.1,
            seq,
            ack,
            payload_len: len,
            window: 64_000,
            flags,
            ipv6: false,
            // An explicit shift of 0: windows are exact, so window checks are exercised.
            wscale: 0,
            vlan: 0,
        }
    }

    /// Sends a segment; returns its events. Time advances 1 ms per segment.
    fn send(&mut self, who: Who, flags: u8, seq: u32, ack: u32, len: u32) -> u32 {
        self.now += 1_000_000;
        let seg = Self::segment(who, flags, seq, ack, len);
        let (_, dir) = FlowKey::of(&seg);
        let side = if who == Who::B {
            Side::Local
        } else {
            Side::Remote
        };
        track(&mut self.flow, &seg, dir, side, self.now)
    }

    /// (state of A, state of B).
    fn states(&self) -> (TcpState, TcpState) {
        let a = FlowKey::of(&Self::segment(Who::A, 0, 0, 0, 0)).1;
        (self.flow.ep[a].state(), self.flow.ep[1 - a].state())
    }

    fn role(&self, who: Who) -> Role {
        let a = FlowKey::of(&Self::segment(Who::A, 0, 0, 0, 0)).1;
        self.flow.role(if who == Who::A { a } else { 1 - a })
    }

    /// SYN (A, 100), SYN-ACK (B, 300), ACK: both ESTABLISHED, next bytes at 101 and 301.
    fn open() -> Self {
        let mut c = Self::new();
        c.send(Who::A, SYN, 100, 0, 0);
        c.send(Who::B, SYN | ACK, 300, 101, 0);
        c.send(Who::A, ACK, 101, 301, 0);
        c
    }
}

use TcpState::*;

#[test]
fn normal_open() {
    let mut c = Conv::new();
    assert_eq!(c.send(Who::A, SYN, 100, 0, 0), E::SYN | E::NEW_FLOW);
    assert_eq!(c.states(), (SynSent, Listen));
    assert_eq!(c.send(Who::B, SYN | ACK, 300, 101, 0), E::SYN_ACK);
    assert_eq!(c.states(), (Established, SynReceived));
    assert_eq!(c.send(Who::A, ACK, 101, 301, 0), E::HANDSHAKE_COMPLETED);
    assert_eq!(c.states(), (Established, Established));
    assert_eq!(
        (c.role(Who::A), c.role(Who::B)),
        (Role::Client, Role::Server)
    );
    assert_eq!(c.flow.syn_ns, 1_000 + 1_000_000);
    assert_eq!(c.flow.synack_ns, 1_000 + 2_000_000);
    // Completed by the ACK at 1_000 + 3_000_000, the last segment's time.
    assert_eq!(c.flow.last_ns, 1_000 + 3_000_000);
}

#[test]
fn simultaneous_open() {
    let mut c = Conv::new();
    c.send(Who::A, SYN, 100, 0, 0);
    assert_eq!(
        c.send(Who::B, SYN, 300, 0, 0),
        E::SYN | E::SIMULTANEOUS_OPEN
    );
    assert_eq!(c.states(), (SynReceived, SynReceived));
    assert_eq!(c.send(Who::A, SYN | ACK, 100, 301, 0), E::SYN_ACK);
    assert_eq!(c.states(), (SynReceived, Established));
    assert_eq!(
        c.send(Who::B, SYN | ACK, 300, 101, 0),
        E::SYN_ACK | E::HANDSHAKE_COMPLETED
    );
    assert_eq!(c.states(), (Established, Established));
}

#[test]
fn syn_retransmission_is_not_a_new_handshake() {
    let mut c = Conv::new();
    c.send(Who::A, SYN, 100, 0, 0);
    let first = c.flow.syn_ns;
    assert_eq!(c.send(Who::A, SYN, 100, 0, 0), E::SYN | E::SYN_RETRANSMIT);
    assert_eq!(c.send(Who::A, SYN, 100, 0, 0), E::SYN | E::SYN_RETRANSMIT);
    assert_eq!(
        c.flow.syn_ns, first,
        "latency is measured from the first SYN"
    );
    c.send(Who::B, SYN | ACK, 300, 101, 0);
    assert_eq!(c.send(Who::A, ACK, 101, 301, 0), E::HANDSHAKE_COMPLETED);
}

#[test]
fn refused_connection() {
    let mut c = Conv::new();
    c.send(Who::A, SYN, 100, 0, 0);
    assert_eq!(
        c.send(Who::B, RST | ACK, 0, 101, 0),
        E::HANDSHAKE_FAILED_RST
    );
    assert_eq!(c.states(), (Closed, Closed));
}

#[test]
fn rst_to_syn_must_acknowledge_it() {
    let mut c = Conv::new();
    c.send(Who::A, SYN, 100, 0, 0);
    assert_eq!(c.send(Who::B, RST | ACK, 0, 555, 0), E::INVALID_RST);
    assert_eq!(c.send(Who::B, RST, 0, 0, 0), E::INVALID_RST);
    assert_eq!(c.states(), (SynSent, Listen));
}

#[test]
fn rst_while_syn_received_fails_the_handshake() {
    let mut c = Conv::new();
    c.send(Who::A, SYN, 100, 0, 0);
    c.send(Who::B, SYN | ACK, 300, 101, 0);
    assert_eq!(c.send(Who::A, RST, 101, 0, 0), E::HANDSHAKE_FAILED_RST);
    assert_eq!(c.states(), (Closed, Closed));
}

#[test]
fn client_closes_first_four_way() {
    let mut c = Conv::open();
    c.send(Who::A, ACK | PSH, 101, 301, 50);
    assert_eq!(c.send(Who::A, FIN | ACK, 151, 301, 0), 0);
    assert_eq!(c.states(), (FinWait1, CloseWait));
    c.send(Who::B, ACK, 301, 152, 0);
    assert_eq!(c.states(), (FinWait2, CloseWait));
    c.send(Who::B, FIN | ACK, 301, 152, 0);
    assert_eq!(c.states(), (TimeWait, LastAck));
    assert_eq!(c.send(Who::A, ACK, 152, 302, 0), E::CLOSED_BY_FIN);
    assert_eq!(c.states(), (TimeWait, Closed));
}

#[test]
fn fin_answered_by_fin_ack_three_way_close() {
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    // The peer's FIN acknowledges the closer's: FIN-WAIT-1 straight to TIME-WAIT.
    assert_eq!(c.send(Who::B, FIN | ACK, 301, 102, 0), 0);
    assert_eq!(c.states(), (TimeWait, LastAck));
    assert_eq!(c.send(Who::A, ACK, 102, 302, 0), E::CLOSED_BY_FIN);
    assert_eq!(c.states(), (TimeWait, Closed));
}

#[test]
fn server_closes_first() {
    let mut c = Conv::open();
    c.send(Who::B, FIN | ACK, 301, 101, 0);
    assert_eq!(c.states(), (CloseWait, FinWait1));
    c.send(Who::A, FIN | ACK, 101, 302, 0);
    assert_eq!(c.states(), (LastAck, TimeWait));
    c.send(Who::B, ACK, 302, 102, 0);
    assert_eq!(c.states(), (Closed, TimeWait));
    assert_eq!(c.role(Who::B), Role::Server);
}

#[test]
fn simultaneous_close() {
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    // B's FIN crossed A's: it does not acknowledge it.
    assert_eq!(
        c.send(Who::B, FIN | ACK, 301, 101, 0),
        E::SIMULTANEOUS_CLOSE
    );
    assert_eq!(c.states(), (Closing, Closing));
    c.send(Who::A, ACK, 102, 302, 0);
    assert_eq!(c.states(), (Closing, TimeWait));
    assert_eq!(c.send(Who::B, ACK, 302, 102, 0), E::CLOSED_BY_FIN);
    assert_eq!(c.states(), (TimeWait, TimeWait));
}

#[test]
fn half_close_with_data_from_the_close_wait_side() {
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    c.send(Who::B, ACK, 301, 102, 0);
    assert_eq!(
        c.send(Who::B, ACK | PSH, 301, 102, 1000),
        E::HALF_CLOSE_DATA
    );
    assert_eq!(
        c.send(Who::B, ACK | PSH, 1301, 102, 1000),
        E::HALF_CLOSE_DATA
    );
    assert_eq!(c.states(), (FinWait2, CloseWait));
    c.send(Who::A, ACK, 102, 2301, 0);
    c.send(Who::B, FIN | ACK, 2301, 102, 0);
    assert_eq!(c.states(), (TimeWait, LastAck));
    assert_eq!(c.send(Who::A, ACK, 102, 2302, 0), E::CLOSED_BY_FIN);
}

#[test]
fn rst_aborts_in_any_state() {
    for (steps, name) in [
        (0, "established"),
        (1, "fin-wait-1 / close-wait"),
        (2, "fin-wait-2 / close-wait"),
    ] {
        let mut c = Conv::open();
        if steps >= 1 {
            c.send(Who::A, FIN | ACK, 101, 301, 0);
        }
        if steps >= 2 {
            c.send(Who::B, ACK, 301, 102, 0);
        }
        // A listener that sent nothing after its SYN-ACK (not even the ACK of the FIN): the
        // signature of `tcp_abort_on_overflow`.
        let overflow = if steps <= 1 {
            E::ACCEPT_QUEUE_OVERFLOW
        } else {
            0
        };
        assert_eq!(
            c.send(Who::B, RST | ACK, 301, 102, 0),
            E::RESET | overflow,
            "{name}"
        );
        assert_eq!(c.states(), (Closed, Closed), "{name}");
    }
}

#[test]
fn rst_outside_the_window_changes_nothing() {
    let mut c = Conv::open();
    let before = c.flow;
    assert_eq!(c.send(Who::B, RST, 301 + 3_000_000, 0, 0), E::INVALID_RST);
    assert_eq!(
        c.send(Who::B, RST, 301u32.wrapping_sub(3_000_000), 0, 0),
        E::INVALID_RST
    );
    assert_eq!(c.flow, before);
}

/// RFC 5961 §3.2: a synchronized endpoint takes a RST only at the sequence number it expects
/// next; one elsewhere in its window gets a challenge ACK, whose answer (a RST at exactly that
/// number, from an endpoint really gone) closes the connection.
#[test]
fn rst_in_the_window_but_not_exact_changes_nothing() {
    let mut c = Conv::open();
    c.send(Who::B, ACK | PSH, 301, 101, 500);
    c.send(Who::A, ACK, 101, 801, 0);
    let before = c.flow;
    for seq in [801 + 1000, 800, 301] {
        assert_eq!(c.send(Who::B, RST, seq, 0, 0), E::RST_IN_WINDOW, "{seq}");
        assert_eq!(c.flow, before, "{seq}");
    }
    // The challenge ACK (A's ACK of what it has) and the RST answering it.
    c.send(Who::A, ACK, 101, 801, 0);
    assert_eq!(c.send(Who::B, RST, 801, 0, 0), E::RESET);
    assert_eq!(c.states(), (Closed, Closed));
}

/// The RST of an endpoint that aborts right after sending data the peer has not acknowledged
/// yet (delayed ACK) is at the end of that data: the peer has taken it, and takes the RST.
#[test]
fn rst_after_unacknowledged_data_is_exact() {
    let mut c = Conv::open();
    c.send(Who::B, ACK | PSH, 301, 101, 500);
    assert_eq!(c.send(Who::B, RST | ACK, 801, 101, 0), E::RESET);
    // After a FIN, the sequence number after it; or still what the peer last acknowledged
    // (the FIN may have been lost after the observer).
    for (seq, e) in [(303, E::RST_IN_WINDOW), (302, E::RESET), (301, E::RESET)] {
        let mut c = Conv::open();
        c.send(Who::B, FIN | ACK, 301, 101, 0);
        assert_eq!(c.send(Who::B, RST | ACK, seq, 101, 0), e, "{seq}");
    }
}

#[test]
fn fin_outside_the_window_changes_nothing() {
    let mut c = Conv::open();
    let before = c.flow;
    assert_eq!(
        c.send(Who::A, FIN | ACK, 101 + 5_000_000, 301, 0),
        E::INVALID_FIN
    );
    assert_eq!(c.flow, before);
}

#[test]
fn new_syn_on_time_wait_is_reuse() {
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    c.send(Who::B, FIN | ACK, 301, 102, 0);
    c.send(Who::A, ACK, 102, 302, 0);
    assert_eq!(c.states(), (TimeWait, Closed));
    assert_eq!(
        c.send(Who::A, SYN, 90_000, 0, 0),
        E::SYN | E::NEW_FLOW | E::TIME_WAIT_REUSE
    );
    assert_eq!(c.states(), (SynSent, Listen));
    assert_eq!(
        c.send(Who::B, SYN | ACK, 7_000, 90_001, 0),
        E::SYN_ACK | E::TIME_WAIT_REUSE_ACCEPTED
    );
    assert_eq!(
        c.send(Who::A, ACK, 90_001, 7_001, 0),
        E::HANDSHAKE_COMPLETED
    );
    // The outcome is counted once (the repeat after the client's ACK, with nothing else
    // from the listener, is the signature of an accept-queue overflow).
    assert_eq!(
        c.send(Who::B, SYN | ACK, 7_000, 90_001, 0),
        E::SYN_ACK | E::SYNACK_RETRANSMIT | E::ACCEPT_QUEUE_OVERFLOW
    );
}

/// A SYN the TIME-WAIT side does not accept is answered with the old connection's ACK; the
/// client resets that (at the ACK's number, RFC 793 p. 66) and sends its SYN again, which the
/// endpoint, its TIME-WAIT killed by the RST, now accepts. The refusal counts once, and the
/// stray ACK and the client's RST change nothing: the second SYN is a retransmission.
#[test]
fn refused_time_wait_reuse() {
    let mut c = Conv::open();
    c.send(Who::B, FIN | ACK, 301, 101, 0);
    c.send(Who::A, FIN | ACK, 101, 302, 0);
    c.send(Who::B, ACK, 302, 102, 0);
    assert_eq!(c.states(), (Closed, TimeWait));
    assert_eq!(
        c.send(Who::A, SYN, 50, 0, 0),
        E::SYN | E::NEW_FLOW | E::TIME_WAIT_REUSE
    );
    assert_eq!(
        c.send(Who::B, ACK, 302, 102, 0),
        E::TIME_WAIT_REUSE_REFUSED | E::INVALID_ACK
    );
    assert_eq!(c.send(Who::A, RST, 102, 0, 0), E::INVALID_RST);
    assert_eq!(c.states(), (SynSent, Listen));
    assert_eq!(c.send(Who::A, SYN, 50, 0, 0), E::SYN | E::SYN_RETRANSMIT);
    assert_eq!(c.send(Who::B, SYN | ACK, 900, 51, 0), E::SYN_ACK);
    assert_eq!(c.send(Who::A, ACK, 51, 901, 0), E::HANDSHAKE_COMPLETED);
}

/// Found in a public capture (sv__tls-subjectaltname, nine streams): SYN, a stray ACK from the
/// server's side, the client's RST answering it, the same SYN again, a handshake. RFC 793
/// changes no endpoint's state until that handshake.
#[test]
fn stray_ack_to_a_syn_and_the_rst_answering_it_change_nothing() {
    let mut c = Conv::new();
    c.send(Who::A, SYN, 561_364_818, 0, 0);
    let before = c.flow;
    assert_eq!(
        c.send(Who::B, ACK, 3_000_000, 3_058_576_675, 0),
        E::INVALID_ACK
    );
    assert_eq!(
        c.send(Who::A, RST, 3_058_576_675, 3_058_576_675, 0),
        E::INVALID_RST
    );
    assert_eq!(c.flow, before);
    assert_eq!(
        c.send(Who::A, SYN, 561_364_818, 0, 0),
        E::SYN | E::SYN_RETRANSMIT
    );
    c.send(Who::B, SYN | ACK, 1_586_794_959, 561_364_819, 0);
    assert_eq!(
        c.send(Who::A, ACK, 561_364_819, 1_586_794_960, 0),
        E::HANDSHAKE_COMPLETED
    );
    // A client aborting its own SYN does so at the SYN's next number: that RST is taken.
    let mut c = Conv::new();
    c.send(Who::A, SYN, 100, 0, 0);
    assert_eq!(c.send(Who::A, RST, 101, 0, 0), E::HANDSHAKE_FAILED_RST);
    assert_eq!(c.states(), (Closed, Closed));
}

#[test]
fn synack_retransmissions_are_told_from_the_first() {
    let mut c = Conv::new();
    c.send(Who::A, SYN, 100, 0, 0);
    assert_eq!(c.send(Who::B, SYN | ACK, 300, 101, 0), E::SYN_ACK);
    assert_eq!(
        c.send(Who::B, SYN | ACK, 300, 101, 0),
        E::SYN_ACK | E::SYNACK_RETRANSMIT
    );
    // After the handshake: the client's ACK did not reach the listener, or it ignored it
    // (which an observer on the listener's host tells: see the accept-queue tests).
    c.send(Who::A, ACK, 101, 301, 0);
    assert_eq!(
        c.send(Who::B, SYN | ACK, 300, 101, 0),
        E::SYN_ACK | E::SYNACK_RETRANSMIT | E::ACCEPT_QUEUE_OVERFLOW
    );
    // Simultaneous open: each side's first SYN-ACK is not a retransmission.
    let mut c = Conv::new();
    c.send(Who::A, SYN, 100, 0, 0);
    c.send(Who::B, SYN, 300, 0, 0);
    assert_eq!(c.send(Who::A, SYN | ACK, 100, 301, 0), E::SYN_ACK);
    assert_eq!(
        c.send(Who::B, SYN | ACK, 300, 101, 0),
        E::SYN_ACK | E::HANDSHAKE_COMPLETED
    );
}

/// The last ACK of a close is lost: the LAST-ACK side sends its FIN again, and the TIME-WAIT
/// side's 2MSL starts over (Linux: `inet_twsk_reschedule`).
#[test]
fn fin_retransmitted_into_time_wait_restarts_it() {
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    c.send(Who::B, ACK, 301, 102, 0);
    c.send(Who::B, FIN | ACK, 301, 102, 0);
    assert_eq!(c.states(), (TimeWait, LastAck));
    let entered = c.flow.closed_ns;
    assert_eq!(c.send(Who::B, FIN | ACK, 301, 102, 0), E::FIN_RETRANSMIT);
    assert_eq!(c.states(), (TimeWait, LastAck));
    assert!(c.flow.closed_ns > entered);
    c.send(Who::A, ACK, 102, 302, 0);
    assert_eq!(c.states(), (TimeWait, Closed));
    let t = Timeouts::DEFAULT;
    assert!(!expired(&c.flow, entered + t.time_wait, &t));
    assert!(expired(&c.flow, c.flow.closed_ns + t.time_wait, &t));
    // A FIN repeated before its ACK is a retransmission too, and restarts nothing.
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    assert_eq!(c.send(Who::A, FIN | ACK, 101, 301, 0), E::FIN_RETRANSMIT);
    assert_eq!(c.states(), (FinWait1, CloseWait));
}

#[test]
fn mid_stream_pick_up() {
    let mut c = Conv::new();
    assert_eq!(
        c.send(Who::B, ACK | PSH, 5_000, 9_000, 100),
        E::PICKED_UP | E::NEW_FLOW
    );
    assert_eq!(c.states(), (Established, Established));
    assert!(c.flow.has(ff::PICKED_UP));
    assert_eq!(
        c.role(Who::B),
        Role::Server,
        "the lower port is taken for the server's"
    );
    // A FIN+ACK mid-stream starts a record too, and closes from there.
    let mut c = Conv::new();
    assert_eq!(
        c.send(Who::A, FIN | ACK, 100, 200, 0),
        E::PICKED_UP | E::NEW_FLOW
    );
    assert_eq!(c.states(), (FinWait1, CloseWait));
}

#[test]
fn lone_rst_or_fin_never_creates_a_flow() {
    for flags in [RST, RST | ACK, FIN, FIN | PSH] {
        let mut c = Conv::new();
        let e = c.send(Who::A, flags, 100, 200, 0);
        assert_ne!(e & E::UNTRACKED, 0, "flags {flags:#x}");
        assert_eq!(c.flow, Flow::EMPTY);
    }
}

#[test]
fn impossible_flags_are_invalid() {
    let mut c = Conv::open();
    let before = c.flow;
    for flags in [SYN | FIN, SYN | RST, SYN | FIN | ACK, 0, PSH] {
        assert_ne!(
            c.send(Who::A, flags, 101, 301, 0) & E::INVALID_FLAGS,
            0,
            "{flags:#x}"
        );
    }
    assert_eq!(c.flow.ep, before.ep);
}

#[test]
fn synack_without_syn_is_tracked_half_open() {
    let mut c = Conv::new();
    assert_eq!(
        c.send(Who::B, SYN | ACK, 300, 101, 0),
        E::SYN_ACK | E::NEW_FLOW | E::PICKED_UP
    );
    assert_eq!(c.states(), (SynSent, SynReceived));
    assert!(c.flow.is_half_open());
    assert_eq!(c.role(Who::A), Role::Client);
    // Backscatter victims answer with RST: the half-open record closes.
    assert_eq!(c.send(Who::A, RST, 101, 0, 0), E::HANDSHAKE_FAILED_RST);
}

#[test]
fn sequence_numbers_wrap_around() {
    let mut c = Conv::new();
    let isn = u32::MAX - 10;
    c.send(Who::A, SYN, isn, 0, 0);
    c.send(Who::B, SYN | ACK, 300, isn.wrapping_add(1), 0);
    c.send(Who::A, ACK, isn.wrapping_add(1), 301, 0);
    c.send(Who::A, ACK | PSH, isn.wrapping_add(1), 301, 100);
    let fin_seq = isn.wrapping_add(101);
    c.send(Who::A, FIN | ACK, fin_seq, 301, 0);
    c.send(Who::B, ACK, 301, fin_seq.wrapping_add(1), 0);
    assert_eq!(c.states(), (FinWait2, CloseWait));
    // A RST just past the wrap is in window.
    assert_eq!(c.send(Who::B, RST, 301, 0, 0), E::RESET);
}

#[test]
fn window_scale_widens_the_accepted_window() {
    let seg = |who, flags, seq, ack, wscale| {
        let mut s = Conv::segment(who, flags, seq, ack, 0);
        s.wscale = wscale;
        s.window = 1000;
        s
    };
    for (wscale, accepted) in [(0, false), (7, true), (NO_WSCALE, true)] {
        let mut f = Flow::EMPTY;
        let (_, a) = FlowKey::of(&seg(Who::A, SYN, 0, 0, wscale));
        track(
            &mut f,
            &seg(Who::A, SYN, 100, 0, wscale),
            a,
            Side::Unknown,
            1,
        );
        track(
            &mut f,
            &seg(Who::B, SYN | ACK, 300, 101, wscale),
            1 - a,
            Side::Unknown,
            2,
        );
        track(
            &mut f,
            &seg(Who::A, ACK, 101, 301, wscale),
            a,
            Side::Unknown,
            3,
        );
        // 1000 << 7 = 128000: a RST 50000 past A's ACK point is inside only when scaled;
        // an unknown scale is taken as the largest.
        let e = track(
            &mut f,
            &seg(Who::B, RST, 301 + 50_000, 0, wscale),
            1 - a,
            Side::Unknown,
            4,
        );
        // In the window but not exact (RFC 5961): ignored either way, told apart by why.
        let expected = if accepted {
            E::RST_IN_WINDOW
        } else {
            E::INVALID_RST
        };
        assert_eq!(e, expected, "wscale {wscale}");
    }
}

#[test]
fn sides_follow_the_hook() {
    let c = Conv::open();
    let a = FlowKey::of(&Conv::segment(Who::A, 0, 0, 0, 0)).1;
    assert_eq!(c.flow.ep[a].side(), Side::Remote);
    assert_eq!(c.flow.ep[1 - a].side(), Side::Local);
}

#[test]
fn time_wait_expires_after_its_timeout() {
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    c.send(Who::B, FIN | ACK, 301, 102, 0);
    c.send(Who::A, ACK, 102, 302, 0);
    let entered = c.flow.closed_ns;
    let t = Timeouts::DEFAULT;
    assert!(!expired(&c.flow, entered + t.time_wait - 1, &t));
    assert!(expired(&c.flow, entered + t.time_wait, &t));
    let short = Timeouts {
        time_wait: 2_000_000_000,
        ..t
    };
    assert!(expired(&c.flow, entered + 2_000_000_000, &short));
}

#[test]
fn idle_records_expire_by_state() {
    let t = Timeouts::DEFAULT;
    let mut c = Conv::new();
    c.send(Who::A, SYN, 100, 0, 0);
    assert!(!expired(&c.flow, c.flow.last_ns + t.half_open - 1, &t));
    assert!(expired(&c.flow, c.flow.last_ns + t.half_open, &t));
    let c = Conv::open();
    assert!(!expired(&c.flow, c.flow.last_ns + t.half_open, &t));
    assert!(expired(&c.flow, c.flow.last_ns + t.established, &t));
    // A FIN awaiting its ACK: the closing timeout.
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    assert!(!expired(&c.flow, c.flow.last_ns + t.closing - 1, &t));
    assert!(expired(&c.flow, c.flow.last_ns + t.closing, &t));
}

/// Linux keeps CLOSE-WAIT as long as the application keeps the socket, and drops an orphaned
/// FIN-WAIT-2 after `tcp_fin_timeout`: the FIN-WAIT-2 endpoint ends then, its CLOSE-WAIT peer
/// stays as long as an established one would.
#[test]
fn fin_wait_2_ends_alone_and_close_wait_lives_on() {
    let t = Timeouts::DEFAULT;
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    c.send(Who::B, ACK, 301, 102, 0);
    assert_eq!(c.states(), (FinWait2, CloseWait));
    let last = c.flow.last_ns;
    assert!(!expire_fin_wait2(&mut c.flow, last + t.fin_wait2 - 1, &t));
    assert_eq!(c.states(), (FinWait2, CloseWait));
    assert!(!expired(&c.flow, last + t.closing, &t));
    assert!(expire_fin_wait2(&mut c.flow, last + t.fin_wait2, &t));
    assert_eq!(c.states(), (Closed, CloseWait));
    assert!(!expired(&c.flow, last + t.established - 1, &t));
    assert!(expired(&c.flow, last + t.established, &t));
    // The application closes at last: its FIN meets a peer that is gone (it answers with a
    // RST), and nobody enters TIME-WAIT.
    c.send(Who::B, FIN | ACK, 301, 102, 0);
    assert_eq!(c.states(), (Closed, LastAck));
    // Both FINs were sent before the RST: a close by FIN, as the captures' truth counts it.
    assert_eq!(c.send(Who::A, RST, 102, 0, 0), E::CLOSED_BY_FIN);
    assert_eq!(c.states(), (Closed, Closed));
    // A peer that still sends keeps FIN-WAIT-2 alive.
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    c.send(Who::B, ACK, 301, 102, 0);
    c.now += t.fin_wait2;
    assert_eq!(c.send(Who::B, ACK | PSH, 301, 102, 10), E::HALF_CLOSE_DATA);
    assert!(!expire_fin_wait2(&mut c.flow, c.now + 1, &t));
}

/// The edges an endpoint may move along, RFC 793's plus the observer's own: RST to CLOSED
/// from anywhere, a new attempt from CLOSED/TIME-WAIT/SYN-SENT/LISTEN, pick-up from CLOSED.
fn allowed(from: TcpState, to: TcpState) -> bool {
    if from == to || to == Closed {
        return true;
    }
    let restart =
        matches!(from, Closed | TimeWait | SynSent | Listen) && matches!(to, SynSent | Listen);
    restart
        || match from {
            Closed => matches!(to, SynReceived | Established | FinWait1 | CloseWait),
            Listen => matches!(to, SynReceived),
            // The ACK that completes the handshake may carry a FIN.
            SynSent => matches!(to, SynReceived | Established | FinWait1),
            SynReceived => matches!(to, Established | FinWait1 | CloseWait),
            Established => matches!(to, FinWait1 | CloseWait | Closing | LastAck),
            FinWait1 => matches!(to, FinWait2 | Closing | TimeWait),
            FinWait2 => matches!(to, TimeWait),
            CloseWait => matches!(to, LastAck | Closing),
            Closing => matches!(to, TimeWait),
            LastAck | TimeWait => false,
        }
}

prop_compose! {
    /// A segment near the conversation's numbers, so that windows and ACKs often match.
    fn any_segment()(
        from_a in any::<bool>(),
        flags in prop::sample::select(std::vec![
            SYN, SYN | ACK, ACK, ACK | PSH, FIN | ACK, RST, RST | ACK, FIN, SYN | FIN, 0,
        ]),
        seq in prop_oneof![90u32..320, any::<u32>()],
        ack in prop_oneof![90u32..320, any::<u32>()],
        len in prop_oneof![Just(0u32), 1u32..3000],
    ) -> (Who, u8, u32, u32, u32) {
        (if from_a { Who::A } else { Who::B }, flags, seq, ack, len)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_sequences_keep_the_invariants(script in prop::collection::vec(any_segment(), 1..40)) {
        let mut c = Conv::new();
        let mut closes_since_start = 0;
        for (who, flags, seq, ack, len) in script {
            let before = c.flow;
            let e = c.send(who, flags, seq, ack, len);
            // The kernel counts SYNs and SYN-ACKs from the flags, on arrival (a segment whose
            // record cannot be stored is counted too); replay counts these events: the two
            // must mark exactly the same segments.
            let handshake = flags & (SYN | FIN | RST) == SYN;
            prop_assert_eq!(e & E::SYN != 0, handshake && flags & ACK == 0, "SYN event on {:#x}", flags);
            prop_assert_eq!(e & E::SYN_ACK != 0, handshake && flags & ACK != 0, "SYN-ACK event on {:#x}", flags);
            if e & E::NEW_FLOW != 0 {
                closes_since_start = 0;
            }
            if e & (E::UNTRACKED | E::INVALID) != 0 {
                // Only the half-open flags may change: an answer to a TIME-WAIT reuse is
                // taken once, even when it is ignored.
                let strip = |f: &Flow| f.ep.map(|mut ep| { ep.handshake = 0; ep });
                prop_assert_eq!(strip(&c.flow), strip(&before), "an ignored segment changed states");
            }
            if e & E::UNTRACKED != 0 {
                prop_assert!(!c.flow.has(ff::SEEN) || before.has(ff::SEEN));
            }
            for i in 0..2 {
                let (from, to) = (before.ep[i].state(), c.flow.ep[i].state());
                prop_assert!(e & E::NEW_FLOW != 0 || allowed(from, to), "{:?} -> {:?} on {:#x}", from, to, flags);
            }
            if e & E::CLOSED_BY_FIN != 0 {
                closes_since_start += 1;
                prop_assert_eq!(closes_since_start, 1, "a connection closes once");
            }
            prop_assert!(c.flow.client <= CLIENT_UNKNOWN);
            let tw = [c.flow.ep[0].state(), c.flow.ep[1].state()].contains(&TimeWait);
            prop_assert!(!tw || c.flow.closed_ns != 0, "TIME-WAIT without its start time");
        }
    }

    #[test]
    fn well_formed_connections_end_closed_by_fin(
        isn_a in any::<u32>(), isn_b in any::<u32>(),
        data in prop::collection::vec((any::<bool>(), 1u32..2000), 0..20),
        server_closes in any::<bool>(),
    ) {
        let mut c = Conv::new();
        let (mut na, mut nb) = (isn_a.wrapping_add(1), isn_b.wrapping_add(1));
        c.send(Who::A, SYN, isn_a, 0, 0);
        c.send(Who::B, SYN | ACK, isn_b, na, 0);
        prop_assert_eq!(c.send(Who::A, ACK, na, nb, 0), E::HANDSHAKE_COMPLETED);
        for (from_a, len) in data {
            if from_a {
                c.send(Who::A, ACK | PSH, na, nb, len);
                na = na.wrapping_add(len);
            } else {
                c.send(Who::B, ACK | PSH, nb, na, len);
                nb = nb.wrapping_add(len);
            }
        }
        let (first, second) = if server_closes { (Who::B, Who::A) } else { (Who::A, Who::B) };
        let (nf, ns) = if server_closes { (nb, na) } else { (na, nb) };
        c.send(first, FIN | ACK, nf, ns, 0);
        c.send(second, FIN | ACK, ns, nf.wrapping_add(1), 0);
        prop_assert_eq!(c.send(first, ACK, nf.wrapping_add(1), ns.wrapping_add(1), 0), E::CLOSED_BY_FIN);
        let (a, b) = c.states();
        let (closer, other) = if server_closes { (b, a) } else { (a, b) };
        prop_assert_eq!((closer, other), (TimeWait, Closed));
    }
}

#[test]
fn allowed_edges_table_is_not_trivial() {
    let all: Vec<_> = TcpState::ALL.to_vec();
    let edges = all
        .iter()
        .flat_map(|f| all.iter().map(move |t| (*f, *t)))
        .filter(|(f, t)| allowed(*f, *t))
        .count();
    assert!(edges < all.len() * all.len() / 2, "{edges} edges");
    assert!(!allowed(TimeWait, Established));
    assert!(!allowed(Established, SynSent));
}

#[test]
fn rst_after_both_fins_counts_as_a_fin_close() {
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    c.send(Who::B, FIN | ACK, 301, 102, 0);
    assert_eq!(c.send(Who::A, RST, 102, 0, 0), E::CLOSED_BY_FIN);
    assert_eq!(c.states(), (Closed, Closed));
}

/// Keepalive (RFC 1122 §4.2.3.6; Linux sends no data, some stacks one byte): a probe is one
/// below the prober's next sequence number once all it sent is acknowledged; the answer is the
/// peer's ACK of all of it. A RST while a probe is outstanding ends the connection by
/// keepalive.
#[test]
fn keepalive_probes_their_answers_and_the_abort() {
    let mut c = Conv::open();
    c.send(Who::A, ACK | PSH, 101, 301, 100);
    c.send(Who::B, ACK, 301, 201, 0);
    // A probe, answered; then one with a byte of garbage, answered.
    assert_eq!(c.send(Who::A, ACK, 200, 301, 0), E::KEEPALIVE_PROBE);
    assert_eq!(c.send(Who::B, ACK, 301, 201, 0), E::KEEPALIVE_ACK);
    assert_eq!(c.send(Who::A, ACK, 200, 301, 1), E::KEEPALIVE_PROBE);
    assert_eq!(c.send(Who::B, ACK, 301, 201, 0), E::KEEPALIVE_ACK);
    assert_eq!(c.states(), (Established, Established));
    let a = FlowKey::of(&Conv::segment(Who::A, 0, 0, 0, 0)).1;
    assert_eq!(c.flow.ep[a].probes, 2);
    // Not a probe: data outstanding (a retransmission of the last byte), or new data.
    c.send(Who::A, ACK | PSH, 201, 301, 50);
    assert_eq!(c.send(Who::A, ACK, 250, 301, 1), 0);
    c.send(Who::B, ACK, 301, 251, 0);
    // Unanswered probes, then the prober's RST at its next sequence number.
    assert_eq!(c.send(Who::A, ACK, 250, 301, 0), E::KEEPALIVE_PROBE);
    assert_eq!(c.send(Who::A, ACK, 250, 301, 0), E::KEEPALIVE_PROBE);
    assert_eq!(
        c.send(Who::A, RST | ACK, 251, 301, 0),
        E::CLOSED_BY_KEEPALIVE
    );
    assert_eq!(c.states(), (Closed, Closed));
    assert_eq!(c.flow.ep[a].probes, 4);
    // A peer that lost the connection answers the probe with a RST: keepalive found it.
    let mut c = Conv::open();
    assert_eq!(c.send(Who::B, ACK, 300, 101, 0), E::KEEPALIVE_PROBE);
    assert_eq!(c.send(Who::A, RST, 101, 0, 0), E::CLOSED_BY_KEEPALIVE);
    // A RST after an answered probe is a plain reset.
    let mut c = Conv::open();
    c.send(Who::B, ACK, 300, 101, 0);
    c.send(Who::A, ACK, 101, 301, 0);
    assert_eq!(c.send(Who::A, RST, 101, 0, 0), E::RESET);
}

/// An accept queue full when the client's ACK arrives (Linux, `listen(fd, n)` without
/// accept()): the listener ignores the ACK and sends its SYN-ACK again; it is SYN-RECEIVED
/// again (as `ss` shows it) until it answers for real; the overflow counts once.
#[test]
fn listener_ignoring_the_completing_ack_is_an_accept_queue_overflow() {
    let mut c = Conv::open();
    assert_eq!(
        c.send(Who::B, SYN | ACK, 300, 101, 0),
        E::SYN_ACK | E::SYNACK_RETRANSMIT | E::ACCEPT_QUEUE_OVERFLOW
    );
    assert_eq!(c.states(), (Established, SynReceived));
    // The client's ACK again, and its data: the listener still says nothing.
    assert_eq!(c.send(Who::A, ACK, 101, 301, 0), 0);
    c.send(Who::A, ACK | PSH, 101, 301, 100);
    assert_eq!(c.states(), (Established, SynReceived));
    assert_eq!(
        c.send(Who::B, SYN | ACK, 300, 101, 0),
        E::SYN_ACK | E::SYNACK_RETRANSMIT
    );
    // Room in the queue at last: the listener acknowledges the data.
    assert_eq!(c.send(Who::B, ACK, 301, 201, 0), 0);
    assert_eq!(c.states(), (Established, Established));
    // A SYN-ACK retransmitted before the client's ACK is a plain retransmission.
    let mut c = Conv::new();
    c.send(Who::A, SYN, 100, 0, 0);
    c.send(Who::B, SYN | ACK, 300, 101, 0);
    assert_eq!(
        c.send(Who::B, SYN | ACK, 300, 101, 0),
        E::SYN_ACK | E::SYNACK_RETRANSMIT
    );
    // With `tcp_abort_on_overflow`, the listener resets right after the completing ACK.
    let mut c = Conv::open();
    assert_eq!(
        c.send(Who::B, RST, 301, 0, 0),
        E::ACCEPT_QUEUE_OVERFLOW | E::RESET
    );
    // A server that answered before its RST is a plain reset.
    let mut c = Conv::open();
    c.send(Who::B, ACK | PSH, 301, 101, 10);
    assert_eq!(c.send(Who::B, RST, 311, 0, 0), E::RESET);
}

/// The same segment probes a zero window (Linux `tcp_write_wakeup`): not a keepalive while
/// the peer's window is closed.
#[test]
fn zero_window_probes_are_not_keepalives() {
    let mut c = Conv::open();
    c.send(Who::A, ACK | PSH, 101, 301, 100);
    let mut closed = Conv::segment(Who::B, ACK, 301, 201, 0);
    closed.window = 0;
    let (_, b) = FlowKey::of(&closed);
    c.now += 1_000_000;
    track(&mut c.flow, &closed, b, Side::Local, c.now);
    assert_eq!(c.send(Who::A, ACK, 200, 301, 0), 0);
}

/// A receiver that has its peer's FIN takes a RST at the FIN's own sequence number too, as
/// Linux does (`tcp_reset_check`).
#[test]
fn rst_at_the_fin_sequence_closes_after_the_fin() {
    let mut c = Conv::open();
    c.send(Who::A, FIN | ACK, 101, 301, 0);
    c.send(Who::B, ACK, 301, 102, 0);
    assert_eq!(c.states(), (FinWait2, CloseWait));
    // A resets at its FIN's number (101), one below what B acknowledged.
    assert_eq!(c.send(Who::A, RST, 101, 0, 0), E::RESET);
    assert_eq!(c.states(), (Closed, Closed));
}
