//! RFC 793 endpoint states and the observer's events.

/// RFC 793 connection state of one endpoint.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TcpState {
    /// No connection (never opened, reset, or fully closed).
    #[default]
    Closed = 0,
    /// Receiver of a SYN that has not answered yet.
    Listen = 1,
    /// Sent a SYN, waiting for the SYN-ACK.
    SynSent = 2,
    /// Sent a SYN-ACK, waiting for the ACK of its SYN.
    SynReceived = 3,
    /// Handshake done.
    Established = 4,
    /// Sent FIN, not acknowledged yet.
    FinWait1 = 5,
    /// Its FIN is acknowledged; the peer may still send.
    FinWait2 = 6,
    /// Received the peer's FIN; may still send.
    CloseWait = 7,
    /// Both sent FIN before receiving the other's (simultaneous close).
    Closing = 8,
    /// Sent FIN after receiving the peer's; waiting for its ACK.
    LastAck = 9,
    /// Closed first; waits 2*MSL before the 4-tuple is free.
    TimeWait = 10,
}

impl TcpState {
    /// Number of states.
    pub const COUNT: usize = 11;
    /// Every state, in discriminant order.
    pub const ALL: [Self; Self::COUNT] = [
        Self::Closed,
        Self::Listen,
        Self::SynSent,
        Self::SynReceived,
        Self::Established,
        Self::FinWait1,
        Self::FinWait2,
        Self::CloseWait,
        Self::Closing,
        Self::LastAck,
        Self::TimeWait,
    ];

    /// The state of every byte value (unknown ones: `Closed`). As wide as a byte, so reading
    /// it needs no bounds check: in the eBPF programs an older verifier (6.1) may not carry a
    /// check made on one copy of the byte over to another copy used as the index.
    const BY_BYTE: [Self; 256] = {
        let mut t = [Self::Closed; 256];
        let mut i = 0;
        while i < Self::COUNT {
            t[i] = Self::ALL[i];
            i += 1;
        }
        t
    };

    /// From the stored byte; unknown values read as `Closed`.
    #[must_use]
    #[inline(always)]
    pub const fn from_u8(v: u8) -> Self {
        Self::BY_BYTE[v as usize]
    }

    /// Metric label value (`time_wait`, ...).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Listen => "listen",
            Self::SynSent => "syn_sent",
            Self::SynReceived => "syn_received",
            Self::Established => "established",
            Self::FinWait1 => "fin_wait_1",
            Self::FinWait2 => "fin_wait_2",
            Self::CloseWait => "close_wait",
            Self::Closing => "closing",
            Self::LastAck => "last_ack",
            Self::TimeWait => "time_wait",
        }
    }

    /// The name `ss` prints for this state.
    #[must_use]
    pub const fn ss_name(self) -> &'static str {
        match self {
            Self::Closed => "CLOSED",
            Self::Listen => "LISTEN",
            Self::SynSent => "SYN-SENT",
            Self::SynReceived => "SYN-RECV",
            Self::Established => "ESTAB",
            Self::FinWait1 => "FIN-WAIT-1",
            Self::FinWait2 => "FIN-WAIT-2",
            Self::CloseWait => "CLOSE-WAIT",
            Self::Closing => "CLOSING",
            Self::LastAck => "LAST-ACK",
            Self::TimeWait => "TIME-WAIT",
        }
    }

    /// Whether the three-way handshake is still in progress for this endpoint.
    #[must_use]
    pub const fn is_opening(self) -> bool {
        matches!(self, Self::Listen | Self::SynSent | Self::SynReceived)
    }

    /// Whether the endpoint has sent its FIN.
    #[must_use]
    pub const fn fin_sent(self) -> bool {
        matches!(
            self,
            Self::FinWait1 | Self::FinWait2 | Self::Closing | Self::LastAck | Self::TimeWait
        )
    }
}

/// Role of an endpoint in its connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Not known (picked up mid-stream with equal ports).
    #[default]
    Unknown = 0,
    /// Sent the first SYN (or, picked up mid-stream, has the higher port).
    Client = 1,
    /// Answered it (or, picked up mid-stream, has the lower port).
    Server = 2,
}

impl Role {
    /// Every role.
    pub const ALL: [Self; 3] = [Self::Unknown, Self::Client, Self::Server];

    /// Metric label value.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// Where an endpoint lives relative to the observing host.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// Mirror mode, replay: the observer is not an endpoint.
    #[default]
    Unknown = 0,
    /// Its segments leave through the egress hook: a socket of this host.
    Local = 1,
    /// Its segments arrive through the ingress hook.
    Remote = 2,
}

impl Side {
    /// Every side.
    pub const ALL: [Self; 3] = [Self::Unknown, Self::Local, Self::Remote];

    /// From the stored byte; unknown values read as `Unknown`.
    #[must_use]
    #[inline(always)]
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Local,
            2 => Self::Remote,
            _ => Self::Unknown,
        }
    }

    /// The side of the other endpoint.
    #[must_use]
    pub const fn opposite(self) -> Self {
        match self {
            Self::Unknown => Self::Unknown,
            Self::Local => Self::Remote,
            Self::Remote => Self::Local,
        }
    }

    /// Metric label value.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Local => "local",
            Self::Remote => "remote",
        }
    }
}

/// What one segment did, as bits. Several may be set at once.
pub mod events {
    /// A SYN without ACK (retransmissions included).
    pub const SYN: u32 = 1 << 0;
    /// A SYN repeating the ISN of a handshake in progress.
    pub const SYN_RETRANSMIT: u32 = 1 << 1;
    /// A SYN+ACK.
    pub const SYN_ACK: u32 = 1 << 2;
    /// The ACK that completed a three-way handshake.
    pub const HANDSHAKE_COMPLETED: u32 = 1 << 3;
    /// A handshake ended by RST (refused connection, or reset before completion).
    pub const HANDSHAKE_FAILED_RST: u32 = 1 << 4;
    /// An established connection aborted by RST.
    pub const RESET: u32 = 1 << 5;
    /// The last FIN of a connection was acknowledged (both sides closed by FIN).
    pub const CLOSED_BY_FIN: u32 = 1 << 6;
    /// Both sides sent FIN before receiving the other's.
    pub const SIMULTANEOUS_CLOSE: u32 = 1 << 7;
    /// Data from the side that received a FIN and has not sent its own (half-close).
    pub const HALF_CLOSE_DATA: u32 = 1 << 8;
    /// A new SYN on a 4-tuple with an endpoint still in TIME-WAIT (an attempt; its outcome
    /// is [`TIME_WAIT_REUSE_ACCEPTED`] or [`TIME_WAIT_REUSE_REFUSED`]).
    pub const TIME_WAIT_REUSE: u32 = 1 << 9;
    /// The flow was created from a mid-stream segment (no handshake seen).
    pub const PICKED_UP: u32 = 1 << 10;
    /// The flow record was (re)started by this segment.
    pub const NEW_FLOW: u32 = 1 << 11;
    /// RST whose sequence number the receiver cannot accept (outside its window; towards an
    /// endpoint in LISTEN, anything but the SYN's next sequence number): ignored.
    pub const INVALID_RST: u32 = 1 << 12;
    /// FIN whose sequence number is outside the receiver's window: ignored.
    pub const INVALID_FIN: u32 = 1 << 13;
    /// Impossible flag combination (SYN+FIN, SYN+RST, no SYN/ACK/RST, FIN without ACK): ignored.
    pub const INVALID_FLAGS: u32 = 1 << 14;
    /// A SYN-ACK or handshake ACK that does not acknowledge the peer's SYN, or a segment from an
    /// endpoint in LISTEN (it has answered nothing yet): ignored.
    pub const INVALID_ACK: u32 = 1 << 15;
    /// The segment cannot start a flow (lone RST or FIN, invalid): no record must be created.
    pub const UNTRACKED: u32 = 1 << 16;
    /// Simultaneous open (SYN crossing SYN).
    pub const SIMULTANEOUS_OPEN: u32 = 1 << 17;
    /// A SYN-ACK repeating one its sender already sent (same ISN).
    pub const SYNACK_RETRANSMIT: u32 = 1 << 18;
    /// A FIN repeating one its sender already sent (same sequence number).
    pub const FIN_RETRANSMIT: u32 = 1 << 19;
    /// RST inside the receiver's window but not at the sequence number it expects (RFC 5961
    /// §3.2: the receiver answers with a challenge ACK and keeps the connection): ignored.
    pub const RST_IN_WINDOW: u32 = 1 << 20;
    /// The answer to a TIME-WAIT reuse was a SYN-ACK: the new connection was accepted.
    pub const TIME_WAIT_REUSE_ACCEPTED: u32 = 1 << 21;
    /// The answer to a TIME-WAIT reuse was an ACK or a RST: the new SYN was refused.
    pub const TIME_WAIT_REUSE_REFUSED: u32 = 1 << 22;
    /// A keepalive probe: one below the sender's next sequence number, 0 or 1 byte, with all
    /// it sent acknowledged.
    pub const KEEPALIVE_PROBE: u32 = 1 << 23;
    /// The answer to a keepalive probe: the peer's ACK of all the prober sent.
    pub const KEEPALIVE_ACK: u32 = 1 << 24;
    /// An established connection reset while a keepalive probe was outstanding (the prober
    /// gave up, or the peer answered the probe with a RST); counted instead of [`RESET`].
    pub const CLOSED_BY_KEEPALIVE: u32 = 1 << 25;
    /// The listener ignored the ACK that completed a handshake (it sent its SYN-ACK again) or
    /// reset the connection right after it, having sent nothing else: its accept queue was
    /// full. Once per connection.
    pub const ACCEPT_QUEUE_OVERFLOW: u32 = 1 << 26;

    /// Any of the invalid-segment bits.
    pub const INVALID: u32 =
        INVALID_RST | INVALID_FIN | INVALID_FLAGS | INVALID_ACK | RST_IN_WINDOW;
}

/// Sequence-number comparisons modulo 2^32 (RFC 1982 serial arithmetic).
pub mod seq {
    /// `a < b`.
    #[must_use]
    #[inline(always)]
    pub const fn lt(a: u32, b: u32) -> bool {
        (a.wrapping_sub(b) as i32) < 0
    }

    /// `a <= b`.
    #[must_use]
    #[inline(always)]
    pub const fn le(a: u32, b: u32) -> bool {
        (a.wrapping_sub(b) as i32) <= 0
    }

    /// `a > b`.
    #[must_use]
    #[inline(always)]
    pub const fn gt(a: u32, b: u32) -> bool {
        lt(b, a)
    }

    /// `a >= b`.
    #[must_use]
    #[inline(always)]
    pub const fn ge(a: u32, b: u32) -> bool {
        le(b, a)
    }

    /// The later of `a` and `b`.
    #[must_use]
    #[inline(always)]
    pub const fn max(a: u32, b: u32) -> u32 {
        if lt(a, b) { b } else { a }
    }
}
