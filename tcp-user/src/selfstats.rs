//! The agent observing itself: `process_*` (CPU, memory, descriptors, start time), how long
//! each scrape's collection took and how long each expiry cycle took
//! (`tcpscope_scrape_duration_seconds`, `tcpscope_reap_duration_seconds`), and what is
//! running (`tcpscope_build_info{version,revision,kernel,layout}`).

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, core::Collector as _, process_collector::ProcessCollector,
    proto::MetricFamily,
};

/// The commit the binary was built from (`git rev-parse HEAD`, 12 digits), or `unknown`
/// when it was built outside a git checkout.
pub const REVISION: &str = env!("TCPSCOPE_REVISION");

/// `tcpscope --version`: the crate's version and [`REVISION`].
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("TCPSCOPE_REVISION"),
    ")"
);

/// The running kernel's release (`uname -r`), or `unknown`.
#[must_use]
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

/// Bucket bounds of both duration histograms: 0.5 ms to 8.192 s, doubling.
fn duration_buckets() -> Vec<f64> {
    (0..15).map(|i| 0.0005 * f64::from(1u32 << i)).collect()
}

fn duration_histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(duration_buckets()))
        .expect("a valid name, help and bucket list")
}

/// A histogram of expiry-cycle durations, for [`crate::reaper::Reaper`].
#[must_use]
pub fn reap_duration_histogram() -> Histogram {
    duration_histogram(
        "tcpscope_reap_duration_seconds",
        "Time each expiry cycle took: listing sparse tables, the reaper program, \
         reconciliation's socket-table read and the per-port view",
    )
}

/// The agent's own metrics, kept for its life.
pub struct SelfStats {
    process: ProcessCollector,
    scrape: Histogram,
}

impl Default for SelfStats {
    fn default() -> Self {
        Self::new()
    }
}

impl SelfStats {
    /// Starts counting (the scrape histogram empty).
    #[must_use]
    pub fn new() -> Self {
        Self {
            process: ProcessCollector::for_self(),
            scrape: duration_histogram(
                "tcpscope_scrape_duration_seconds",
                "Time each scrape took to read the kernel's maps (counters, metrics, tables), \
                 this one included; rendering the text is not counted",
            ),
        }
    }

    /// Records one scrape's collection time.
    pub fn observe_scrape(&self, took: Duration) {
        self.scrape.observe(took.as_secs_f64());
    }

    /// The `process_*` families, the scrape histogram and `reap` (the reaper's histogram).
    #[must_use]
    pub fn families(&self, reap: Option<&Histogram>) -> Vec<MetricFamily> {
        let mut out = self.process.collect();
        out.extend(self.scrape.collect());
        if let Some(reap) = reap {
            out.extend(reap.collect());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_describe_this_process() {
        let families = SelfStats::new().families(Some(&reap_duration_histogram()));
        let names: Vec<&str> = families.iter().map(MetricFamily::name).collect();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
            "tcpscope_scrape_duration_seconds",
            "tcpscope_reap_duration_seconds",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        let fds = families
            .iter()
            .find(|f| f.name() == "process_open_fds")
            .expect("present")
            .get_metric()[0]
            .get_gauge()
            .get_value();
        let counted = std::fs::read_dir("/proc/self/fd").expect("procfs").count();
        // The collector's own directory handle may or may not be open at either count.
        assert!((fds - counted as f64).abs() <= 2.0, "{fds} vs {counted}");
    }

    #[test]
    fn the_kernel_release_is_the_running_one() {
        let uname = std::process::Command::new("uname")
            .arg("-r")
            .output()
            .expect("uname");
        assert_eq!(
            kernel_release(),
            String::from_utf8_lossy(&uname.stdout).trim()
        );
    }
}
