//! The observer state machine: one segment in, both endpoints' RFC 793 states updated.
//!
//! A pure function of (flow record, segment, direction, side, time). For a segment sent by
//! endpoint S to endpoint R it applies RFC 793 §3.2 twice: to S, for what it sent, and to R,
//! for what it receives; the segment's ACK field tells what S had already received from R
//! when it sent the segment, which is what separates a FIN answered by FIN+ACK (the common
//! Linux three-way close) from a simultaneous close, where neither FIN acknowledges the other.
//!
//! Validation follows netfilter's `tcp_in_window` in spirit: a RST or FIN whose sequence number
//! lies outside what the receiver can accept changes nothing and is reported as invalid, so a
//! spoofed RST cannot close a flow the real endpoints keep open. A RST answering a SYN must
//! acknowledge that SYN exactly (RFC 793 p. 66). A synchronized endpoint takes a RST only at
//! the sequence number it expects next (RFC 5961 §3.2, as Linux does): one elsewhere in its
//! window gets a challenge ACK and changes nothing. An endpoint in LISTEN has answered nothing:
//! a segment from it is a stray (an old connection's ACK) and changes nothing, and it takes a
//! RST only at the SYN's next sequence number.
//!
//! Segments are assumed to reach their receiver: true at the host's own hooks, and the
//! usual assumption for a mirror port.

use crate::{
    flow::{
        CLIENT_UNKNOWN, Established, Flow, endpoint_flags as ef, flow_flags as ff,
        handshake_flags as hf,
    },
    parse::{Segment, tcp_flags},
    state::{Side, TcpState as S, events as ev, seq},
};

/// Window assumed for a receiver whose advertised window is not known yet.
const UNKNOWN_WINDOW: u32 = 1 << 30;

/// Updates `flow` with one segment sent by endpoint `dir` (0 or 1, see
/// [`crate::flow::FlowKey::of`]) observed at time `now` (ns). `side` is where the sender lives
/// ([`Side::Unknown`] in mirror mode). Returns the [`crate::state::events`] bits.
///
/// A fresh record ([`Flow::EMPTY`]) is started only by a SYN, a SYN-ACK, or a mid-stream
/// segment that carries ACK; otherwise the result has [`ev::UNTRACKED`] and the caller must not
/// store the record.
#[inline(always)]
pub fn track(flow: &mut Flow, seg: &Segment, dir: usize, side: Side, now: u64) -> u32 {
    let d = dir & 1;
    let flags = seg.flags;
    let syn = flags & tcp_flags::SYN != 0;
    let ack = flags & tcp_flags::ACK != 0;
    let fin = flags & tcp_flags::FIN != 0;
    let rst = flags & tcp_flags::RST != 0;
    let fresh = !flow.has(ff::SEEN);

    if (syn && (fin || rst)) || (!syn && !ack && !rst) {
        return ev::INVALID_FLAGS | if fresh { ev::UNTRACKED } else { 0 };
    }

    let mut out = 0;
    if !syn && !fresh && flow.ep[d].state() == S::Listen {
        // It has answered nothing yet: whatever it sends is not part of this attempt (a
        // TIME-WAIT socket's ACK of the old connection, a challenge ACK). When it is the answer
        // to a TIME-WAIT reuse, that answer is a refusal.
        let pending = flow.ep[d].handshake & hf::REUSE_ANSWER_PENDING != 0;
        flow.ep[d].handshake &= !hf::REUSE_ANSWER_PENDING;
        out |= if pending {
            ev::TIME_WAIT_REUSE_REFUSED
        } else {
            0
        };
        if !rst {
            return out | ev::INVALID_ACK;
        }
    }
    if syn {
        out |= if ack {
            on_syn_ack(flow, seg, d, fresh, now)
        } else {
            on_syn(flow, seg, d, fresh, now)
        };
    } else if rst {
        out |= on_rst(flow, seg, d, fresh, now);
    } else {
        if fresh {
            pick_up(flow, seg, d);
            out |= ev::PICKED_UP | ev::NEW_FLOW;
        }
        out |= on_ack(flow, seg, d, now);
    }
    if out & (ev::UNTRACKED | ev::INVALID) == 0 {
        record_sent(flow, seg, d, side);
        flow.flags |= ff::SEEN;
        flow.last_ns = now;
    }
    out
}

/// Bookkeeping of what the sender has sent and received.
#[inline(always)]
fn record_sent(flow: &mut Flow, seg: &Segment, d: usize, side: Side) {
    // A SYN-ACK repeated after the handshake (a late copy, or a listener that ignored the
    // completing ACK) leaves the window alone: its SYN_WINDOW mark would make the listener
    // look as if it had sent nothing since.
    let late_syn = seg.has(tcp_flags::SYN) && flow.has(ff::HANDSHAKE_DONE);
    let s = &mut flow.ep[d];
    if !seg.has(tcp_flags::RST) && !late_syn {
        // Kept as sent: the shift is applied where the window is used (a SYN's never is).
        s.window = seg.window;
        let syn = seg.has(tcp_flags::SYN);
        if syn {
            s.flags |= ef::SYN_WINDOW;
        } else {
            s.flags &= !ef::SYN_WINDOW;
        }
        // The end of what it sent; from its FIN on, the FIN's own sequence number stays.
        if !s.has(ef::SENT_FIN) {
            let end = seg
                .seq
                .wrapping_add(seg.payload_len)
                .wrapping_add(u32::from(syn));
            s.end_seq = if s.has(ef::SENT_ANY) {
                seq::max(s.end_seq, end)
            } else {
                end
            };
        }
        s.flags |= ef::SENT_ANY;
    }
    if seg.has(tcp_flags::ACK) {
        s.ack = if s.has(ef::SENT_ACK) {
            seq::max(s.ack, seg.ack)
        } else {
            seg.ack
        };
        s.flags |= ef::SENT_ACK;
    }
    if side != Side::Unknown {
        s.side = side as u8;
        flow.ep[1 - d].side = side.opposite() as u8;
    }
}

/// Starts a new connection attempt from a SYN sent by `d`.
#[inline(always)]
fn start(flow: &mut Flow, seg: &Segment, d: usize, now: u64) {
    let sides = [flow.ep[0].side, flow.ep[1].side];
    *flow = Flow::EMPTY;
    flow.ep[0].side = sides[0];
    flow.ep[1].side = sides[1];
    flow.client = d as u8;
    flow.syn_ns = now;
    flow.syns = 1;
    let s = &mut flow.ep[d];
    s.state = S::SynSent as u8;
    s.isn = seg.seq;
    s.wscale = seg.wscale;
    s.flags = ef::SENT_SYN;
    flow.ep[1 - d].state = S::Listen as u8;
}

#[inline(always)]
fn on_syn(flow: &mut Flow, seg: &Segment, d: usize, fresh: bool, now: u64) -> u32 {
    let s_state = flow.ep[d].state();
    let r_state = flow.ep[1 - d].state();
    let same_isn = flow.ep[d].has(ef::SENT_SYN) && flow.ep[d].isn == seg.seq;
    if fresh {
        start(flow, seg, d, now);
        return ev::SYN | ev::NEW_FLOW;
    }
    // A repeated SYN of the attempt in progress, or a late copy of it.
    if same_isn && (s_state == S::SynSent || !matches!(s_state, S::Closed | S::TimeWait)) {
        flow.syns = flow.syns.saturating_add(1);
        return ev::SYN | ev::SYN_RETRANSMIT;
    }
    // Simultaneous open: the peer's SYN is out, ours crosses it (it does not ACK theirs).
    if r_state == S::SynSent
        && matches!(s_state, S::Listen | S::Closed)
        && flow.client as usize != d
    {
        let s = &mut flow.ep[d];
        s.isn = seg.seq;
        s.wscale = seg.wscale;
        s.flags |= ef::SENT_SYN;
        s.state = S::SynReceived as u8;
        flow.ep[1 - d].state = S::SynReceived as u8;
        flow.flags |= ff::SIMULTANEOUS_OPEN;
        return ev::SYN | ev::SIMULTANEOUS_OPEN;
    }
    // A new attempt on this 4-tuple: after TIME-WAIT (reuse), after a close or reset, or a
    // SYN with a new ISN replacing an attempt that got no answer.
    let reusable = matches!(s_state, S::Closed | S::TimeWait | S::SynSent)
        && matches!(r_state, S::Closed | S::TimeWait | S::Listen);
    if reusable {
        let reuse = s_state == S::TimeWait || r_state == S::TimeWait;
        start(flow, seg, d, now);
        if reuse {
            flow.ep[1 - d].handshake = hf::REUSE_ANSWER_PENDING;
            return ev::SYN | ev::NEW_FLOW | ev::TIME_WAIT_REUSE;
        }
        return ev::SYN | ev::NEW_FLOW;
    }
    // A SYN with a new ISN inside a live connection: the endpoint would answer with a
    // challenge ACK; nothing changes.
    ev::SYN | ev::INVALID_FLAGS
}

#[inline(always)]
fn on_syn_ack(flow: &mut Flow, seg: &Segment, d: usize, fresh: bool, now: u64) -> u32 {
    let r = 1 - d;
    if fresh {
        // The SYN was not seen (agent started mid-handshake, asymmetric capture, or
        // backscatter): the receiver must have sent one whose ISN the ACK field gives.
        flow.client = r as u8;
        flow.synack_ns = now;
        flow.flags |= ff::PICKED_UP;
        let s = &mut flow.ep[d];
        s.state = S::SynReceived as u8;
        s.isn = seg.seq;
        s.wscale = seg.wscale;
        s.flags |= ef::SENT_SYN;
        s.handshake |= hf::SENT_SYNACK;
        let rcv = &mut flow.ep[r];
        rcv.state = S::SynSent as u8;
        rcv.isn = seg.ack.wrapping_sub(1);
        rcv.end_seq = seg.ack;
        // Its SYN's window is not known: 0 (RST/FIN validation then waits for its ACK).
        rcv.flags |= ef::SENT_SYN | ef::SENT_ANY | ef::SYN_WINDOW;
        return ev::SYN_ACK | ev::NEW_FLOW | ev::PICKED_UP;
    }
    let acks_syn = flow.ep[r].has(ef::SENT_SYN) && seg.ack == flow.ep[r].isn.wrapping_add(1);
    if !acks_syn {
        return ev::SYN_ACK | ev::INVALID_ACK;
    }
    let repeat = flow.ep[d].has(ef::SENT_SYN) && flow.ep[d].isn == seg.seq;
    let mut out = ev::SYN_ACK;
    match flow.ep[d].state() {
        // The answer to a SYN: the sender becomes SYN-RECEIVED.
        S::Listen | S::Closed => {
            let s = &mut flow.ep[d];
            if s.handshake & hf::REUSE_ANSWER_PENDING != 0 {
                out |= ev::TIME_WAIT_REUSE_ACCEPTED;
            }
            s.state = S::SynReceived as u8;
            s.isn = seg.seq;
            s.wscale = seg.wscale;
            s.flags |= ef::SENT_SYN;
            s.handshake = hf::SENT_SYNACK;
        }
        // A retransmission, or the first SYN-ACK of an endpoint in a simultaneous open (its
        // SYN went out alone). Past the handshake the half-open flags are gone, and any repeat
        // is a retransmission.
        _ if repeat => {
            let done = flow.flags & ff::HANDSHAKE_DONE != 0;
            if flow.ep[d].handshake & hf::SENT_SYNACK != 0 || done {
                out |= ev::SYNACK_RETRANSMIT;
            }
            flow.ep[d].handshake |= hf::SENT_SYNACK;
            // Sent again after the client's ACK completed the handshake, and nothing else
            // since its SYN-ACK: the listener ignored that ACK (its accept queue was full). It
            // is SYN-RECEIVED again, as `ss` shows it, until it really answers.
            if done && flow.ep[d].state() == S::Established && sent_only_its_syn(flow, d) {
                flow.ep[d].state = S::SynReceived as u8;
                out |= overflowed(flow, d);
            }
        }
        _ => return ev::SYN_ACK | ev::INVALID_ACK,
    }
    if flow.synack_ns == 0 {
        flow.synack_ns = now;
    }
    // The receiver gets the ACK of its SYN: ESTABLISHED (the client in a normal open,
    // either side in a simultaneous one).
    if matches!(flow.ep[r].state(), S::SynSent | S::SynReceived) {
        flow.ep[r].state = S::Established as u8;
    }
    if flow.ep[d].state() == S::Established
        && flow.ep[r].state() == S::Established
        && !flow.has(ff::HANDSHAKE_DONE)
    {
        flow.flags |= ff::HANDSHAKE_DONE;
        out |= ev::HANDSHAKE_COMPLETED;
    }
    out
}

/// Whether a RST or FIN at `seg.seq`, sent by `d`, is acceptable to the receiver: inside the
/// window the receiver advertised after the data it has acknowledged, with one window of
/// slack below for segments the observer did not see acknowledged.
#[inline(always)]
fn in_window(flow: &Flow, seg: &Segment, d: usize) -> bool {
    let rcv = &flow.ep[1 - d];
    if !rcv.has(ef::SENT_ACK) {
        return true;
    }
    let window = if rcv.has(ef::SENT_ANY) {
        rcv.scaled_window(flow.ep[d].wscale).max(1)
    } else {
        UNKNOWN_WINDOW
    };
    let lo = rcv.ack.wrapping_sub(window);
    let hi = rcv.ack.wrapping_add(window);
    seq::ge(seg.seq, lo) && seq::le(seg.seq, hi)
}

/// Whether endpoint `d` has sent nothing but its SYN (or SYN-ACK): its last window came with
/// a SYN (any other segment but a RST replaces it).
#[inline(always)]
fn sent_only_its_syn(flow: &Flow, d: usize) -> bool {
    let s = &flow.ep[d];
    s.has(ef::SENT_SYN | ef::SYN_WINDOW) && !s.has(ef::SENT_FIN)
}

/// Whether endpoint `i` is a listener taken back to SYN-RECEIVED by an accept-queue overflow.
#[inline(always)]
fn waits_after_overflow(flow: &Flow, i: usize) -> bool {
    flow.has(ff::HANDSHAKE_DONE)
        && flow.ep[i].state() == S::SynReceived
        && flow.ep[i].handshake & hf::OVERFLOWED != 0
}

/// Counts an accept-queue overflow of listener `d`, once per connection.
#[inline(always)]
fn overflowed(flow: &mut Flow, d: usize) -> u32 {
    let s = &mut flow.ep[d];
    if s.handshake & hf::OVERFLOWED != 0 {
        return 0;
    }
    s.handshake |= hf::OVERFLOWED;
    ev::ACCEPT_QUEUE_OVERFLOW
}

/// Whether a RST from `d` carries the sequence number its synchronized receiver expects next
/// (RFC 5961 §3.2): the receiver's own ACK, or the end of what the sender sent (data the
/// receiver has taken but not acknowledged yet). A receiver that has its peer's FIN (CLOSE-WAIT,
/// CLOSING, LAST-ACK) also takes one at the FIN's own number, as Linux does
/// (`tcp_reset_check`: some stacks reset at it). When the observer knows neither (picked up
/// mid-stream, one direction only), any RST in the window is taken.
#[inline(always)]
fn rst_exact(flow: &Flow, seg: &Segment, d: usize) -> bool {
    let rcv = &flow.ep[1 - d];
    let acked = rcv.has(ef::SENT_ACK);
    let sent = flow.ep[d].next_seq();
    if !acked && sent.is_none() {
        return true;
    }
    let after_fin = matches!(rcv.state(), S::CloseWait | S::Closing | S::LastAck);
    (acked && (seg.seq == rcv.ack || (after_fin && seg.seq == rcv.ack.wrapping_sub(1))))
        || sent == Some(seg.seq)
}

#[inline(always)]
fn on_rst(flow: &mut Flow, seg: &Segment, d: usize, fresh: bool, now: u64) -> u32 {
    if fresh {
        return ev::UNTRACKED;
    }
    let r = 1 - d;
    let r_state = flow.ep[r].state();
    match r_state {
        S::SynSent => {
            // RFC 793: in SYN-SENT a RST is acceptable only if it acknowledges the SYN.
            let acks_syn = seg.has(tcp_flags::ACK) && seg.ack == flow.ep[r].isn.wrapping_add(1);
            if !acks_syn {
                return ev::INVALID_RST;
            }
        }
        S::Listen => {
            // RFC 793 has LISTEN ignore a RST; a listener that has taken the SYN (which its
            // silence does not tell) takes one at the SYN's next sequence number only. A RST
            // elsewhere answers something else (a stray ACK): the attempt goes on.
            let s = &flow.ep[d];
            if !(s.has(ef::SENT_SYN) && seg.seq == s.isn.wrapping_add(1)) {
                return ev::INVALID_RST;
            }
        }
        S::SynReceived | S::Closed => {
            if !in_window(flow, seg, d) {
                return ev::INVALID_RST;
            }
        }
        _ => {
            if !in_window(flow, seg, d) {
                return ev::INVALID_RST;
            }
            if !rst_exact(flow, seg, d) {
                return ev::RST_IN_WINDOW;
            }
        }
    }
    let opening = flow.ep[0].state().is_opening() || flow.ep[1].state().is_opening();
    // The listener resets a connection whose handshake completed without sending anything
    // else: `tcp_abort_on_overflow` answering the completing ACK of a full accept queue.
    let overflow = if flow.has(ff::HANDSHAKE_DONE)
        && flow.client as usize == r
        && sent_only_its_syn(flow, d)
        && !flow.is_closed()
    {
        overflowed(flow, d)
    } else {
        0
    };
    let out = overflow
        | if flow.is_closed() {
            0
        } else if opening && !flow.has(ff::HANDSHAKE_DONE) {
            ev::HANDSHAKE_FAILED_RST
        } else if flow.has(ff::CLOSED_BY_FIN) {
            0
        } else if flow.ep[0].has(ef::SENT_FIN) && flow.ep[1].has(ef::SENT_FIN) {
            // Both FINs were out: the FIN exchange closed the connection, the RST only ends
            // the wait for its last ACK.
            flow.flags |= ff::CLOSED_BY_FIN;
            ev::CLOSED_BY_FIN
        } else if flow.ep[0].has(ef::PROBING) || flow.ep[1].has(ef::PROBING) {
            // A keepalive probe went unanswered (the prober gives up with a RST) or was answered
            // by a RST (the peer had lost the connection): keepalive found it dead.
            flow.flags |= ff::CLOSED_BY_RST;
            ev::CLOSED_BY_KEEPALIVE
        } else {
            flow.flags |= ff::CLOSED_BY_RST;
            ev::RESET
        };
    flow.ep[0].state = S::Closed as u8;
    flow.ep[1].state = S::Closed as u8;
    flow.closed_ns = now;
    out
}

/// Starts a record from a mid-stream segment: both endpoints ESTABLISHED. The role comes from
/// the ports: the lower one is taken for the server's (well-known or registered ports sit
/// below ephemeral ones).
#[inline(always)]
fn pick_up(flow: &mut Flow, seg: &Segment, d: usize) {
    flow.flags |= ff::PICKED_UP;
    flow.ep[0].state = S::Established as u8;
    flow.ep[1].state = S::Established as u8;
    flow.client = match seg.sport.cmp(&seg.dport) {
        core::cmp::Ordering::Greater => d as u8,
        core::cmp::Ordering::Less => (1 - d) as u8,
        core::cmp::Ordering::Equal => CLIENT_UNKNOWN,
    };
    // The receiver's window is not known until it sends: validation then assumes the
    // largest (see `in_window`).
}

#[inline(always)]
fn on_ack(flow: &mut Flow, seg: &Segment, d: usize, now: u64) -> u32 {
    let r = 1 - d;
    let mut out = 0;
    let fin = seg.has(tcp_flags::FIN);
    if fin && !flow.ep[d].has(ef::SENT_FIN) {
        // A new FIN the receiver could not accept voids the whole segment.
        if !in_window(flow, seg, d) {
            return ev::INVALID_FIN;
        }
        // RFC 793 gives a FIN meaning only from a synchronized endpoint (or one this very
        // segment synchronizes); one from SYN-SENT, LISTEN or CLOSED is ignored.
        let completes = flow.ep[r].state() == S::SynReceived
            && seq::ge(seg.ack, flow.ep[r].isn.wrapping_add(1));
        let synchronized = match flow.ep[d].state() {
            S::Established | S::SynReceived | S::CloseWait => true,
            S::SynSent => completes,
            _ => false,
        };
        if !synchronized {
            return ev::INVALID_FIN;
        }
    }

    // A listener taken back to SYN-RECEIVED (it ignored the completing ACK: accept queue
    // full) that now sends anything has accepted the connection at last; until then, what the
    // client sends does not move it (it may be dropped again).
    if waits_after_overflow(flow, d) {
        flow.ep[d].state = S::Established as u8;
    }
    // Handshake completion: the receiver is SYN-RECEIVED and this acknowledges its SYN.
    if flow.ep[r].state() == S::SynReceived && !waits_after_overflow(flow, r) {
        let acks_syn = seq::ge(seg.ack, flow.ep[r].isn.wrapping_add(1));
        if !acks_syn {
            return ev::INVALID_ACK;
        }
        flow.ep[r].state = S::Established as u8;
        if matches!(flow.ep[d].state(), S::SynSent | S::SynReceived) {
            flow.ep[d].state = S::Established as u8;
        }
        if !flow.has(ff::HANDSHAKE_DONE) {
            flow.flags |= ff::HANDSHAKE_DONE;
            out |= ev::HANDSHAKE_COMPLETED;
        }
    } else if flow.ep[d].state() == S::SynSent && flow.ep[r].state() == S::Established {
        // Cannot happen when every segment is seen; keep the states consistent anyway.
        flow.ep[d].state = S::Established as u8;
    }

    // Keepalive (RFC 1122 §4.2.3.6): a segment one below the sender's next sequence number,
    // carrying nothing or one byte, once the peer has acknowledged all it sent.
    let (s, rcv) = (&flow.ep[d], &flow.ep[r]);
    // (The same segment probes a zero window: not a keepalive while the peer's is closed.)
    let probe = !fin
        && seg.payload_len <= 1
        && matches!(s.state(), S::Established | S::CloseWait)
        && s.has(ef::SENT_ANY)
        && seg.seq == s.end_seq.wrapping_sub(1)
        && rcv.has(ef::SENT_ACK)
        && rcv.ack == s.end_seq
        && !(rcv.has(ef::SENT_ANY) && rcv.window == 0);
    // The peer's first segment after a probe is its answer when it acknowledges all the prober
    // sent and carries nothing (Linux answers the old sequence number with a duplicate ACK).
    if flow.ep[r].has(ef::PROBING) {
        flow.ep[r].flags &= !ef::PROBING;
        if !fin && seg.payload_len == 0 && seg.ack == flow.ep[r].end_seq {
            out |= ev::KEEPALIVE_ACK;
        }
    }
    if probe {
        let s = &mut flow.ep[d];
        s.flags |= ef::PROBING;
        s.probes = s.probes.saturating_add(1);
        out |= ev::KEEPALIVE_PROBE;
    } else {
        flow.ep[d].flags &= !ef::PROBING;
    }

    // What the sender has received: the highest ACK it ever sent (a reordered segment may
    // carry an older one).
    let acked = if flow.ep[d].has(ef::SENT_ACK) {
        seq::max(flow.ep[d].ack, seg.ack)
    } else {
        seg.ack
    };
    // FIN-WAIT-2 means an earlier ACK already covered the receiver's FIN.
    let acks_peer_fin = flow.ep[r].has(ef::SENT_FIN)
        && (flow.ep[r].state() == S::FinWait2
            || seq::ge(acked, flow.ep[r].end_seq.wrapping_add(1)));

    if fin && flow.ep[d].has(ef::SENT_FIN) {
        if seg.seq.wrapping_add(seg.payload_len) == flow.ep[d].end_seq {
            out |= ev::FIN_RETRANSMIT;
            // Its peer did not get the last ACK. One in TIME-WAIT answers it again and starts
            // its 2MSL over, as Linux does (`inet_twsk_reschedule`).
            if flow.ep[r].state() == S::TimeWait {
                flow.closed_ns = now;
            }
        }
    } else if fin {
        flow.ep[d].end_seq = seg.seq.wrapping_add(seg.payload_len);
        flow.ep[d].flags |= ef::SENT_FIN;
        if flow.ep[r].state() == S::Closed && flow.ep[d].state() == S::CloseWait {
            // The peer is gone (its FIN-WAIT-2 timed out): it will answer with a RST.
            flow.ep[d].state = S::LastAck as u8;
        } else if flow.ep[r].has(ef::SENT_FIN) {
            if acks_peer_fin {
                // It had received the peer's FIN: CLOSE-WAIT -> LAST-ACK. The peer gets this
                // FIN with the ACK of its own: FIN-WAIT-1/2 -> TIME-WAIT.
                flow.ep[d].state = S::LastAck as u8;
                enter_time_wait(flow, r, now);
            } else {
                // Sent before the peer's FIN arrived: both CLOSING.
                flow.ep[d].state = S::Closing as u8;
                flow.ep[r].state = S::Closing as u8;
                flow.flags |= ff::SIMULTANEOUS_CLOSE;
                out |= ev::SIMULTANEOUS_CLOSE;
            }
        } else {
            flow.ep[d].state = S::FinWait1 as u8;
            // A receiver that has not synchronized does not process a FIN (RFC 793 p. 75).
            if flow.ep[r].state() == S::Established {
                flow.ep[r].state = S::CloseWait as u8;
            }
        }
        return out;
    }

    // Data from the side that has the peer's FIN but has not sent its own.
    if seg.payload_len > 0 && flow.ep[r].has(ef::SENT_FIN) && !flow.ep[d].has(ef::SENT_FIN) {
        out |= ev::HALF_CLOSE_DATA;
    }

    // The receiver learns that its FIN arrived.
    if acks_peer_fin {
        match flow.ep[r].state() {
            S::FinWait1 => flow.ep[r].state = S::FinWait2 as u8,
            S::Closing => enter_time_wait(flow, r, now),
            S::LastAck => {
                flow.ep[r].state = S::Closed as u8;
                if !flow.has(ff::CLOSED_BY_FIN) {
                    flow.flags |= ff::CLOSED_BY_FIN;
                    out |= ev::CLOSED_BY_FIN;
                }
                flow.closed_ns = if flow.closed_ns == 0 {
                    now
                } else {
                    flow.closed_ns
                };
            }
            _ => {}
        }
        // Simultaneous close ends when both CLOSING endpoints got their ACK.
        if flow.ep[d].state() == S::TimeWait
            && flow.ep[r].state() == S::TimeWait
            && !flow.has(ff::CLOSED_BY_FIN)
        {
            flow.flags |= ff::CLOSED_BY_FIN;
            out |= ev::CLOSED_BY_FIN;
        }
    }
    out
}

#[inline(always)]
fn enter_time_wait(flow: &mut Flow, i: usize, now: u64) {
    flow.ep[i].state = S::TimeWait as u8;
    if flow.closed_ns == 0 {
        flow.closed_ns = now;
    }
}

/// Timeouts after which a record is removed, in ns of the caller's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TIME-WAIT (Linux `TCP_TIMEWAIT_LEN`: 60 s).
    pub time_wait: u64,
    /// Records with both endpoints CLOSED (RST, completed close).
    pub closed: u64,
    /// Half-open records (handshake in progress), since the last segment.
    pub half_open: u64,
    /// Established records without traffic.
    pub established: u64,
    /// Records with an endpoint whose FIN awaits its ACK (FIN-WAIT-1, CLOSING, LAST-ACK),
    /// without traffic.
    pub closing: u64,
    /// An endpoint in FIN-WAIT-2 whose peer is silent this long is closed (Linux's
    /// `tcp_fin_timeout`, 60 s, for an orphaned socket); its peer stays.
    pub fin_wait2: u64,
}

impl Timeouts {
    /// Defaults: TIME-WAIT 60 s (Linux), closed 10 s, half-open 75 s (Linux gives up on a
    /// SYN after 6 retransmissions, 127 s, but a server drops SYN-RECV after 5 SYN-ACK
    /// retransmissions, ~63 s), established (and CLOSE-WAIT, which Linux keeps as long as the
    /// application does) 5 days (netfilter's `nf_conntrack_tcp_timeout_established`), FINs
    /// awaiting their ACK 120 s, FIN-WAIT-2 with a silent peer 60 s (`tcp_fin_timeout`).
    pub const DEFAULT: Self = Self {
        time_wait: 60 * NS,
        closed: 10 * NS,
        half_open: 75 * NS,
        established: 5 * 24 * 3600 * NS,
        closing: 120 * NS,
        fin_wait2: 60 * NS,
    };
}

const NS: u64 = 1_000_000_000;

impl Timeouts {
    /// Nanoseconds per second: the fields are nanoseconds, the command line's values seconds.
    pub const NS_PER_SEC: u64 = NS;
    /// Longest TIME-WAIT and closed timeouts the established tables can measure, seconds
    /// (~9.8 hours: half the wrap of their close time; see [`crate::flow::Established`]).
    pub const MAX_SINCE_CLOSE_SECS: u64 = crate::flow::MAX_CLOSED_AGE_NS / NS;
    /// Longest idle timeouts the established tables can measure, seconds (~26 days: half the wrap).
    pub const MAX_IDLE_SECS: u64 = crate::flow::MAX_IDLE_NS / NS;
}

impl Timeouts {
    /// The fields in declaration order (the reaper request's layout).
    #[must_use]
    pub const fn to_array(&self) -> [u64; 6] {
        [
            self.time_wait,
            self.closed,
            self.half_open,
            self.established,
            self.closing,
            self.fin_wait2,
        ]
    }

    /// From [`Self::to_array`]'s layout.
    #[must_use]
    #[inline(always)]
    pub const fn from_array(a: &[u64; 6]) -> Self {
        Self {
            time_wait: a[0],
            closed: a[1],
            half_open: a[2],
            established: a[3],
            closing: a[4],
            fin_wait2: a[5],
        }
    }
}

/// Whether a record that is removed now was seen to its end (TIME-WAIT or CLOSED on both
/// sides) rather than given up on an idle timeout while live.
#[must_use]
#[inline(always)]
pub fn finished(states: [S; 2]) -> bool {
    let done = |s: S| matches!(s, S::TimeWait | S::Closed);
    done(states[0]) && done(states[1])
}

/// How old a record is, whichever layout it is kept in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Age {
    /// Both endpoints' states.
    pub states: [S; 2],
    /// Since the last segment, ns.
    pub idle_ns: u64,
    /// Since the first endpoint entered TIME-WAIT or one last became CLOSED, ns (`None`:
    /// neither happened).
    pub since_closed_ns: Option<u64>,
}

impl Age {
    /// The age of a full record at `now`.
    #[must_use]
    #[inline(always)]
    pub fn of_flow(flow: &Flow, now: u64) -> Self {
        Self {
            states: [flow.ep[0].state(), flow.ep[1].state()],
            idle_ns: now.saturating_sub(flow.last_ns),
            since_closed_ns: (flow.closed_ns != 0).then(|| now.saturating_sub(flow.closed_ns)),
        }
    }

    /// The age of a compact record at `now` (0 idle when the fast path saw it since the last
    /// walk).
    #[must_use]
    #[inline(always)]
    pub fn of_established(rec: &Established, now: u64) -> Self {
        let closed = rec.closed_ns(now);
        Self {
            states: [rec.ep_state(0), rec.ep_state(1)],
            idle_ns: now.saturating_sub(rec.last_ns(now)),
            since_closed_ns: (closed != 0).then(|| now.saturating_sub(closed)),
        }
    }

    /// Whether a record of this age has outlived its timeout. TIME-WAIT counts from the moment
    /// the first endpoint entered it, like the kernel's timer; the others from the last
    /// segment.
    #[must_use]
    #[inline(always)]
    pub fn expired(&self, t: &Timeouts) -> bool {
        let [a, b] = self.states;
        let closed = self.since_closed_ns.unwrap_or(u64::MAX);
        if a == S::Closed && b == S::Closed {
            return closed.min(self.idle_ns) >= t.closed;
        }
        if a == S::TimeWait || b == S::TimeWait {
            return closed >= t.time_wait && (finished(self.states) || self.idle_ns >= t.closing);
        }
        if a.is_opening() || b.is_opening() {
            return self.idle_ns >= t.half_open;
        }
        let awaiting_ack = |s: S| matches!(s, S::FinWait1 | S::Closing | S::LastAck);
        if awaiting_ack(a) || awaiting_ack(b) {
            return self.idle_ns >= t.closing;
        }
        // ESTABLISHED, CLOSE-WAIT (Linux keeps it as long as the application holds the
        // socket), and FIN-WAIT-2, whose endpoint alone ends on its own timeout
        // ([`Self::fin_wait2_expired`]).
        self.idle_ns >= t.established
    }

    /// Which endpoints of a record of this age are in FIN-WAIT-2 with a peer silent for
    /// `t.fin_wait2`: Linux drops an orphaned FIN-WAIT-2 socket after `tcp_fin_timeout`. The
    /// observer cannot tell an orphan from a half-closed socket whose application still
    /// reads, and takes every FIN-WAIT-2 endpoint with a silent peer for one. Only for a
    /// record that has not [`Self::expired`] as a whole.
    #[must_use]
    #[inline(always)]
    pub fn fin_wait2_expired(&self, t: &Timeouts) -> [bool; 2] {
        let due = self.idle_ns >= t.fin_wait2;
        [
            due && self.states[0] == S::FinWait2,
            due && self.states[1] == S::FinWait2,
        ]
    }
}

/// Whether a full record has outlived its timeout at `now` (see [`Age::expired`]).
#[must_use]
#[inline(always)]
pub fn expired(flow: &Flow, now: u64, t: &Timeouts) -> bool {
    Age::of_flow(flow, now).expired(t)
}

/// Closes the endpoints of a full record that [`Age::fin_wait2_expired`] gives up on at `now`
/// (the kernel's reaper does the same to compact records); whether any was.
#[inline(always)]
pub fn expire_fin_wait2(flow: &mut Flow, now: u64, t: &Timeouts) -> bool {
    let due = Age::of_flow(flow, now).fin_wait2_expired(t);
    for (ep, due) in flow.ep.iter_mut().zip(due) {
        if due {
            ep.state = S::Closed as u8;
        }
    }
    if due[0] || due[1] {
        flow.closed_ns = now;
        return true;
    }
    false
}

#[cfg(test)]
mod tests;
