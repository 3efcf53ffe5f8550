//! Gauge slots: the index in [`crate::metrics::Metrics::endpoints`] of an endpoint's (state,
//! role, side), and back to its labels.

use crate::{
    flow::{Established, Flow},
    state::{Role, Side, TcpState},
};

/// Slots of [`crate::metrics::Metrics::endpoints`]: one per (state, role, side), CLOSED excluded (an endpoint
/// that holds no state is not counted). 256 so that any `u8` indexes it: the kernel needs no
/// bounds check (one the verifier can always follow); slot [`NO_SLOT`] is a sink never read.
pub const GAUGE_SLOTS: usize = 256;
/// "Not counted" (CLOSED endpoint).
pub const NO_SLOT: u8 = 0xff;

const ROLES: usize = Role::ALL.len();
const SIDES: usize = Side::ALL.len();
const _: () = assert!(TcpState::COUNT * ROLES * SIDES < NO_SLOT as usize);

/// Gauge slot of an endpoint in `state` with `role` on `side`, or [`NO_SLOT`] for CLOSED.
#[must_use]
#[inline(always)]
pub const fn gauge_slot(state: TcpState, role: Role, side: Side) -> u8 {
    if matches!(state, TcpState::Closed) {
        return NO_SLOT;
    }
    ((state as usize * ROLES + role as usize) * SIDES + side as usize) as u8
}

/// Gauge slot of endpoint `i` (0 or 1) of a record.
#[must_use]
#[inline(always)]
pub fn endpoint_slot(flow: &Flow, i: usize) -> u8 {
    let ep = &flow.ep[i & 1];
    slot_of(ep.state, flow.client, ep.side, i)
}

/// Gauge slot of endpoint `i` (0 or 1) of a compact record.
#[must_use]
#[inline(always)]
pub fn established_slot(rec: &Established, i: usize) -> u8 {
    let i = i & 1;
    slot_of(rec.state[i] & 0x0f, rec.client, rec.ep_flags[i] >> 6, i)
}

/// Gauge slot of endpoint `i` from the stored bytes of its state, the flow's client index and
/// its side. Plain arithmetic (no enum tables): this runs under the record's lock in the
/// kernel. Same result as `gauge_slot(state, role, side)`.
#[inline(always)]
fn slot_of(state: u8, client: u8, side: u8, i: usize) -> u8 {
    let state = state as usize;
    if state == 0 || state >= TcpState::COUNT {
        return NO_SLOT;
    }
    let role = if client as usize == (i & 1) {
        Role::Client as usize
    } else if client < 2 {
        Role::Server as usize
    } else {
        Role::Unknown as usize
    };
    let side = if (side as usize) < SIDES {
        side as usize
    } else {
        0
    };
    ((state * ROLES + role) * SIDES + side) as u8
}

/// The (state, role, side) of a gauge slot, `None` for unused slots.
#[must_use]
pub const fn slot_labels(slot: usize) -> Option<(TcpState, Role, Side)> {
    let side = slot % SIDES;
    let role = (slot / SIDES) % ROLES;
    let state = slot / (SIDES * ROLES);
    if state == 0 || state >= TcpState::COUNT {
        return None;
    }
    Some((TcpState::ALL[state], Role::ALL[role], Side::ALL[side]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counted_triple_has_its_own_slot_and_labels_round_trip() {
        let mut seen = std::vec::Vec::new();
        for state in TcpState::ALL {
            for role in Role::ALL {
                for side in Side::ALL {
                    let slot = gauge_slot(state, role, side);
                    if state == TcpState::Closed {
                        assert_eq!(slot, NO_SLOT);
                        continue;
                    }
                    assert!(usize::from(slot) < GAUGE_SLOTS);
                    assert_eq!(slot_labels(slot.into()), Some((state, role, side)));
                    seen.push(slot);
                }
            }
        }
        let n = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), n);
        assert_eq!(n, 10 * 9);
    }

    #[test]
    fn endpoint_slot_agrees_with_gauge_slot() {
        let mut flow = Flow::EMPTY;
        for client in 0..3u8 {
            for state in TcpState::ALL {
                for side in Side::ALL {
                    flow.client = client;
                    flow.ep[1].state = state as u8;
                    flow.ep[1].side = side as u8;
                    assert_eq!(
                        endpoint_slot(&flow, 1),
                        gauge_slot(state, flow.role(1), side)
                    );
                }
            }
        }
    }
}
