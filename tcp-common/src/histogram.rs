//! The handshake-latency histograms: buckets of 10 µs x 2^k kept per CPU in the kernel, and
//! the three phases of a handshake.

/// Finite histogram buckets.
pub const BUCKETS: usize = 24;

/// Upper bound (inclusive, Prometheus `le`) of bucket `k`: 10 µs x 2^k, so 10 µs ... 83.9 s
/// (the same bounds as `prometheus::exponential_buckets(1e-5, 2.0, 24)`).
#[must_use]
#[inline(always)]
pub const fn bucket_bound_ns(k: usize) -> u64 {
    10_000 << k
}

/// Bucket of a duration: the first `k` with `ns <= bound(k)`, or [`BUCKETS`] (+Inf).
#[must_use]
#[inline(always)]
pub const fn bucket(ns: u64) -> usize {
    let mut k = 0;
    while k < BUCKETS {
        if ns <= bucket_bound_ns(k) {
            return k;
        }
        k += 1;
    }
    BUCKETS
}

/// One latency histogram: per-bucket (not cumulative) counts, sum and count.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram {
    /// Observations per bucket; the last one is above every finite bound.
    pub buckets: [u64; BUCKETS + 1],
    /// Sum of the observations, ns.
    pub sum_ns: u64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// Empty.
    pub const ZERO: Self = Self {
        buckets: [0; BUCKETS + 1],
        sum_ns: 0,
        count: 0,
    };

    /// Adds one observation.
    #[inline(always)]
    pub fn observe(&mut self, ns: u64) {
        if let Some(b) = self.buckets.get_mut(bucket(ns)) {
            *b = b.wrapping_add(1);
        }
        self.sum_ns = self.sum_ns.wrapping_add(ns);
        self.count = self.count.wrapping_add(1);
    }

    /// Adds another CPU's copy.
    pub fn accumulate(&mut self, other: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
        self.count = self.count.wrapping_add(other.count);
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::ZERO
    }
}

/// Handshake phases, measured at the observation point from the *first* SYN.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// First SYN to first SYN-ACK.
    SynToSynack = 0,
    /// First SYN-ACK to the ACK that completes the handshake.
    SynackToAck = 1,
    /// First SYN to the completing ACK.
    SynToAck = 2,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Self; 3] = [Self::SynToSynack, Self::SynackToAck, Self::SynToAck];

    /// Metric label value.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::SynToSynack => "syn_to_synack",
            Self::SynackToAck => "synack_to_ack",
            Self::SynToAck => "syn_to_ack",
        }
    }
}

/// The three phase durations of a completed handshake, or `None` when the record lacks a SYN
/// or a SYN-ACK (picked up, SYN-ACK seen first) or its times are not in order.
#[must_use]
#[inline(always)]
pub const fn handshake_phases(syn_ns: u64, synack_ns: u64, ack_ns: u64) -> Option<[u64; 3]> {
    if syn_ns == 0 || synack_ns < syn_ns || ack_ns < synack_ns {
        return None;
    }
    Some([synack_ns - syn_ns, ack_ns - synack_ns, ack_ns - syn_ns])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_prometheus_le_semantics() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(10_000), 0);
        assert_eq!(bucket(10_001), 1);
        assert_eq!(bucket(20_000), 1);
        assert_eq!(bucket(bucket_bound_ns(BUCKETS - 1)), BUCKETS - 1);
        assert_eq!(bucket(bucket_bound_ns(BUCKETS - 1) + 1), BUCKETS);
        assert!(bucket_bound_ns(BUCKETS - 1) > 60_000_000_000);
        for ns in [1u64, 999, 12_345, 60_000_000, 1_000_000_000, 59_000_000_000] {
            let k = bucket(ns);
            assert!(ns <= bucket_bound_ns(k));
            assert!(k == 0 || ns > bucket_bound_ns(k - 1));
        }
    }

    #[test]
    fn phases_need_ordered_times() {
        assert_eq!(handshake_phases(10, 30, 35), Some([20, 5, 25]));
        assert_eq!(handshake_phases(0, 30, 35), None);
        assert_eq!(handshake_phases(40, 30, 35), None);
    }
}
