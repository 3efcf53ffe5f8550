//! State changes as the programs report them to `tcpscope events`: one [`Transition`] record per
//! segment (or expiry) that moved an endpoint of a connection to another state, written into a
//! ring buffer only while a reader is attached.
//!
//! A record carries both endpoints' gauge slots before and after (a slot encodes state, role
//! and side: see [`crate::gauges`]), so the kernel writes what it already has and userspace
//! splits the record into one change per endpoint whose state differs.
//!
//! The record is read from a pinned map: changing its layout means bumping
//! [`crate::LAYOUT_VERSION`].

use crate::{
    flow::FlowKey,
    gauges::{NO_SLOT, slot_labels},
    state::{Role, Side, TcpState},
};

/// Bytes of the ring buffer (a power of two pages): room for 3,640 records of 72 bytes (64
/// and the kernel's 8-byte header). Pinned: another size needs a new [`crate::LAYOUT_VERSION`]
/// (an agent refuses a pinned map whose size differs from its object's).
pub const RING_BYTES: u32 = 256 * 1024;

/// What caused a transition ([`Transition::cause`]).
pub mod cause {
    /// A segment (its flags and sender in the record).
    pub const SEGMENT: u8 = 1;
    /// The reaper's idle timeout (TIME-WAIT over, handshake or connection idle too long,
    /// FIN-WAIT-2 given up).
    pub const EXPIRED: u8 = 2;
    /// Reconciliation removed the record (its local socket gone or in another state).
    pub const RECONCILED: u8 = 3;
    /// The record had to move to another table and that one was full: the tracker lost the
    /// connection.
    pub const TABLE_FULL: u8 = 4;
}

/// One state change of a connection's endpoints, as the kernel reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC (ns, `bpf_ktime_get_ns`) when the record was written.
    pub ts_ns: u64,
    /// The connection's key, in the tables' orientation (endpoint 0 is the lower address and
    /// port). An IPv4 key of the established table is widened (addresses in the first four
    /// bytes).
    pub key: FlowKey,
    /// Gauge slots of endpoint 0 and 1 before, then after ([`NO_SLOT`]: CLOSED).
    pub slots: [u8; 4],
    /// See [`cause`].
    pub cause: u8,
    /// The segment's TCP flags (cause [`cause::SEGMENT`]).
    pub flags: u8,
    /// The endpoint (0 or 1) that sent the segment (cause [`cause::SEGMENT`]).
    pub sender: u8,
    /// Always zero.
    pub pad: u8,
    /// The state machine's event bits for the segment ([`crate::state::events`]).
    pub events: u32,
    /// Always zero.
    pub pad2: u32,
}

const _: () = assert!(core::mem::size_of::<Transition>() == 64);

/// The state of a gauge slot ([`NO_SLOT`] and unused slots: CLOSED).
#[must_use]
pub fn slot_state(slot: u8) -> TcpState {
    slot_labels(usize::from(slot)).map_or(TcpState::Closed, |(s, _, _)| s)
}

/// One endpoint's change, decoded from a [`Transition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointChange {
    /// 0 or 1: the endpoint's index in the key.
    pub index: usize,
    /// State before.
    pub old: TcpState,
    /// State after.
    pub new: TcpState,
    /// Its role (from whichever of its slots is counted: a CLOSED one carries none).
    pub role: Role,
    /// Its side, likewise.
    pub side: Side,
}

impl Transition {
    /// The endpoints whose state changed, in key order.
    #[must_use]
    pub fn changes(&self) -> [Option<EndpointChange>; 2] {
        let one = |i: usize| {
            let (before, after) = (self.slots[i], self.slots[i + 2]);
            let (old, new) = (slot_state(before), slot_state(after));
            if old == new {
                return None;
            }
            let labels = slot_labels(usize::from(if after == NO_SLOT { before } else { after }));
            let (role, side) = labels.map_or((Role::Unknown, Side::Unknown), |(_, r, s)| (r, s));
            Some(EndpointChange {
                index: i,
                old,
                new,
                role,
                side,
            })
        };
        [one(0), one(1)]
    }
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integers and a `repr(C)` key only, no implicit padding (asserted size).
unsafe impl aya::Pod for Transition {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gauges::gauge_slot;

    #[test]
    fn a_record_splits_into_the_endpoints_whose_state_changed() {
        let t = Transition {
            slots: [
                gauge_slot(TcpState::Established, Role::Client, Side::Local),
                gauge_slot(TcpState::Established, Role::Server, Side::Remote),
                gauge_slot(TcpState::FinWait1, Role::Client, Side::Local),
                gauge_slot(TcpState::CloseWait, Role::Server, Side::Remote),
            ],
            ..Transition::default()
        };
        let [a, b] = t.changes();
        assert_eq!(
            a,
            Some(EndpointChange {
                index: 0,
                old: TcpState::Established,
                new: TcpState::FinWait1,
                role: Role::Client,
                side: Side::Local
            })
        );
        assert_eq!(
            b.map(|c| (c.old, c.new)),
            Some((TcpState::Established, TcpState::CloseWait))
        );
        // Into CLOSED: role and side from the slot before; unchanged endpoints are left out.
        let t = Transition {
            slots: [
                gauge_slot(TcpState::TimeWait, Role::Client, Side::Remote),
                NO_SLOT,
                NO_SLOT,
                NO_SLOT,
            ],
            ..Transition::default()
        };
        let [a, b] = t.changes();
        assert_eq!(
            a,
            Some(EndpointChange {
                index: 0,
                old: TcpState::TimeWait,
                new: TcpState::Closed,
                role: Role::Client,
                side: Side::Remote
            })
        );
        assert_eq!(b, None);
        // A slot change without a state change (a side learnt) is no transition.
        let t = Transition {
            slots: [
                gauge_slot(TcpState::Listen, Role::Server, Side::Unknown),
                NO_SLOT,
                gauge_slot(TcpState::Listen, Role::Server, Side::Local),
                NO_SLOT,
            ],
            ..Transition::default()
        };
        assert_eq!(t.changes(), [None, None]);
    }
}
