//! State-machine events and table pressure, counted per CPU inside [`crate::metrics::Metrics`]:
//! a slot per event bit of [`crate::state::events`], then the tables' insert failures and
//! the events kept per side.

/// Slots of the event counters map (one [`EventCounters`] per CPU): one per bit of
/// [`crate::state::events`] (slot = bit position), then table pressure and events by side.
pub mod event_slots {
    /// Slots of the state machine's events: one per bit of [`crate::state::events`] (a `u32`).
    pub const STATE_EVENTS: usize = u32::BITS as usize;
    /// A new record could not be stored in the IPv4 established table (full).
    pub const FLOWS_INSERT_FAILED: usize = STATE_EVENTS;
    /// A new record could not be stored in the half-open table (full).
    pub const HALF_OPEN_INSERT_FAILED: usize = 33;
    /// Half-open records moved to the established table.
    pub const PROMOTIONS: usize = 34;
    /// Segments of a flow whose record could not be stored.
    pub const UNTRACKED_SEGMENTS: usize = 35;
    /// Segments that found their record being removed on another CPU (expired, dropped or
    /// just moved to the established table) and changed nothing.
    pub const LOST_RACE: usize = 36;
    /// Half-open records removed on their idle timeout after a SYN (failed handshakes).
    pub const HANDSHAKES_TIMED_OUT: usize = 37;
    /// A new record could not be stored in the IPv6 established table (full);
    /// [`FLOWS_INSERT_FAILED`] counts the IPv4 one.
    pub const FLOWS6_INSERT_FAILED: usize = 38;
    /// Keepalive probes by the side of the prober: this plus [`crate::state::Side`] as usize.
    pub const KEEPALIVE_PROBES: usize = 40;
    /// Answers to keepalive probes by the side of the prober, as [`KEEPALIVE_PROBES`].
    pub const KEEPALIVE_ACKS: usize = 43;
    /// Connections whose server stayed silent after its SYN-ACK while the client sent (the
    /// view walk's mark, counted once per connection).
    pub const SILENT_SERVERS: usize = 46;
    /// Established records removed by reconciliation: host mode, their local socket was gone
    /// or in another state (sock_diag); mirror mode, not seen since a restart.
    pub const RECONCILED_REMOVED: usize = 47;
    /// Connections of the kernel's socket table the agent picked up into an established
    /// table (host mode: at start, and any that no segment had brought since).
    pub const RECONCILED_PICKED_UP: usize = 48;
    /// State changes `tcpscope events` did not get: its ring buffer was full (the reader
    /// fell behind).
    pub const EVENTS_LOST: usize = 49;
    /// The insert-failure slot of an established table.
    #[must_use]
    #[inline(always)]
    pub const fn flows_insert_failed(ipv6: bool) -> usize {
        if ipv6 {
            FLOWS6_INSERT_FAILED
        } else {
            FLOWS_INSERT_FAILED
        }
    }
}

/// Slots of [`EventCounters`].
pub const EVENT_SLOTS: usize = 64;

/// Per-CPU tally of state-machine events and table pressure.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventCounters {
    /// See [`event_slots`].
    pub slots: [u64; EVENT_SLOTS],
}

impl Default for EventCounters {
    fn default() -> Self {
        Self {
            slots: [0; EVENT_SLOTS],
        }
    }
}

impl EventCounters {
    /// Adds one to the slot of every bit set in `events`.
    #[inline(always)]
    pub fn add_events(&mut self, events: u32) {
        let mut bit = 0;
        while bit < event_slots::STATE_EVENTS {
            if events & (1 << bit) != 0
                && let Some(slot) = self.slots.get_mut(bit)
            {
                *slot = slot.wrapping_add(1);
            }
            bit += 1;
        }
    }

    /// Adds one to `slot`.
    #[inline(always)]
    pub fn bump(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = s.wrapping_add(1);
        }
    }

    /// Count of the event `bit` (a single bit of [`crate::state::events`]).
    #[must_use]
    pub fn event(&self, bit: u32) -> u64 {
        self.slots
            .get(bit.trailing_zeros() as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Adds another CPU's counters to these.
    pub fn accumulate(&mut self, other: &Self) {
        for (a, b) in self.slots.iter_mut().zip(other.slots.iter()) {
            *a = a.wrapping_add(*b);
        }
    }
}

const _: () = assert!(event_slots::KEEPALIVE_ACKS + 3 <= event_slots::SILENT_SERVERS);
const _: () = assert!(event_slots::EVENTS_LOST < EVENT_SLOTS);

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `u64`s only.
unsafe impl aya::Pod for EventCounters {}
