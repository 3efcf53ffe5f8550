//! The reaper's request: what the agent asks the expiry and view programs (run through
//! `BPF_PROG_TEST_RUN`) to do, as the bytes of their test packet, and what they answer.

use crate::metrics::table;

/// What the agent asks the reaper program (run through `BPF_PROG_TEST_RUN`) to do, and what it
/// answers, as the bytes of the test packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReapRequest {
    /// Timeouts, ns: TIME-WAIT, closed, half-open, established, closing, FIN-WAIT-2 (the
    /// fields of [`crate::track::Timeouts`] in order).
    pub timeouts: [u64; 6],
    /// The tables to walk: bit `t` for table `t` ([`ReapRequest::ALL_TABLES`]: every one).
    /// The agent leaves out a table that held nothing at its last walk and has had nothing
    /// inserted since (see `tcp-user/src/reaper.rs`): walking a table visits every bucket,
    /// empty or not.
    pub tables: u64,
    /// 1: remove the established records the agent put in the DOOMED maps, each if unchanged
    /// since the agent read it (reconciliation with the kernel's socket table).
    pub reconcile: u64,
    /// The walked tables whose records are visited by key rather than by a walk: bit `t` for
    /// table `t`, whose keys the agent listed (with `BPF_MAP_LOOKUP_BATCH`) into the LISTED
    /// array, slots `listed_from[t]..listed_from[t] + listed_len[t]`. A walk of a hash map
    /// visits every bucket, at about 16 ns each with the SRSO mitigation, while the listing
    /// skips an empty one in about 2 ns: a sparse table of a million slots is listed.
    pub listed: u64,
    /// First LISTED slot of each listed table.
    pub listed_from: [u64; table::COUNT],
    /// Keys listed for each listed table.
    pub listed_len: [u64; table::COUNT],
    /// Out: records visited, per table.
    pub visited: [u64; table::COUNT],
    /// Out: records removed, per table.
    pub reaped: [u64; table::COUNT],
}

/// Words of a [`ReapRequest`].
const REAP_WORDS: usize = 9 + 4 * table::COUNT;

/// Slots of the LISTED array: keys listed per walk, all tables together (see
/// [`ReapRequest::listed`]). 8192 keys of 40 bytes: 320 KiB.
pub const LISTED_SLOTS: u32 = 8192;

impl ReapRequest {
    /// [`ReapRequest::tables`]: every table.
    pub const ALL_TABLES: u64 = (1 << table::COUNT) - 1;

    /// Whether the request asks for table `t` to be walked.
    #[must_use]
    #[inline(always)]
    pub const fn walks(&self, t: usize) -> bool {
        self.tables & (1 << t) != 0
    }

    /// Whether table `t`'s records are visited by their listed keys (see
    /// [`ReapRequest::listed`]).
    #[must_use]
    #[inline(always)]
    pub const fn lists(&self, t: usize) -> bool {
        self.listed & (1 << t) != 0
    }

    /// The request bytes (at least an Ethernet header's worth, as the kernel requires).
    #[must_use]
    pub fn to_bytes(&self) -> [u8; core::mem::size_of::<Self>()] {
        let mut out = [0; core::mem::size_of::<Self>()];
        let words = self
            .timeouts
            .iter()
            .chain(core::iter::once(&self.tables))
            .chain(core::iter::once(&self.reconcile))
            .chain(core::iter::once(&self.listed))
            .chain(self.listed_from.iter())
            .chain(self.listed_len.iter())
            .chain(self.visited.iter())
            .chain(self.reaped.iter());
        for (chunk, w) in out.as_chunks_mut::<8>().0.iter_mut().zip(words) {
            *chunk = w.to_ne_bytes();
        }
        out
    }

    /// Parses the answer bytes.
    #[must_use]
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < core::mem::size_of::<Self>() {
            return None;
        }
        let mut words = [0u64; REAP_WORDS];
        for (w, chunk) in words.iter_mut().zip(b.as_chunks::<8>().0) {
            *w = u64::from_ne_bytes(*chunk);
        }
        let mut r = Self::default();
        let fields = r
            .timeouts
            .iter_mut()
            .chain(core::iter::once(&mut r.tables))
            .chain(core::iter::once(&mut r.reconcile))
            .chain(core::iter::once(&mut r.listed))
            .chain(r.listed_from.iter_mut())
            .chain(r.listed_len.iter_mut())
            .chain(r.visited.iter_mut())
            .chain(r.reaped.iter_mut());
        for (f, w) in fields.zip(words) {
            *f = w;
        }
        Some(r)
    }
}

const _: () = assert!(core::mem::size_of::<ReapRequest>() == REAP_WORDS * 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reap_request_round_trips() {
        let r = ReapRequest {
            timeouts: [1, 2, 3, 4, 5, 6],
            tables: 0b101,
            reconcile: 1,
            listed: 0b100,
            listed_from: [12, 13, 14],
            listed_len: [15, 16, 17],
            visited: [6, 7, 8],
            reaped: [9, 10, 11],
        };
        assert_eq!(ReapRequest::from_bytes(&r.to_bytes()), Some(r));
    }
}
