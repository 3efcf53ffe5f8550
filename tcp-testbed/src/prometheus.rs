//! A real Prometheus server, started in a test namespace with a temporary config.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    cmd::unique,
    metrics::{encode, http_get},
    netns::{NetNs, enter_netns},
};

/// A Prometheus server running in a namespace; stopped and its directory removed on drop.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    /// `127.0.0.1:port` inside the namespace.
    pub addr: String,
    ns_path: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus in `ns`, scraping `target` (`host:port`) every second as job
    /// `tcpscope`, and waits (bounded) until it is ready.
    pub fn start(ns: &NetNs, target: &str) -> Self {
        Self::start_with_rules(ns, target, &[])
    }

    /// [`Self::start`], loading the rule files `rules` too (evaluated every second).
    pub fn start_with_rules(ns: &NetNs, target: &str, rules: &[&std::path::Path]) -> Self {
        Self::start_with_config(ns, &Self::job(target), rules)
    }

    /// Starts Prometheus in `ns` with `jobs` as its `scrape_configs` list (YAML items indented
    /// by two spaces), scraping every second, and waits (bounded) until it is ready.
    pub fn start_with_jobs(ns: &NetNs, jobs: &str) -> Self {
        Self::start_with_config(ns, jobs, &[])
    }

    /// The scrape job `tcpscope` of `target`, as a `scrape_configs` item.
    fn job(target: &str) -> String {
        format!("  - job_name: tcpscope\n    static_configs:\n      - targets: ['{target}']\n")
    }

    /// Starts Prometheus in `ns` with the scrape `jobs` and the rule files `rules`.
    fn start_with_config(ns: &NetNs, jobs: &str, rules: &[&std::path::Path]) -> Self {
        let dir = std::env::temp_dir().join(unique("tcpscope-prom-"));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        let rule_files: String = rules
            .iter()
            .map(|r| format!("  - '{}'\n", r.display()))
            .collect();
        let rule_files = if rule_files.is_empty() {
            String::new()
        } else {
            format!("rule_files:\n{rule_files}")
        };
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}\
                 scrape_configs:\n{jobs}"
            ),
        )
        .expect("prometheus config");
        let addr = "127.0.0.1:19090".to_owned();
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).expect("log file"))
            .spawn()
            .expect("starting prometheus (Debian package prometheus)");
        let p = Self {
            child,
            dir,
            addr,
            ns_path: ns.path(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.get("/-/ready").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready in 30 s: {}",
                std::fs::read_to_string(p.dir.join("log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn get(&self, path: &str) -> (u16, String) {
        let (ns, addr, path) = (self.ns_path.clone(), self.addr.clone(), path.to_owned());
        thread::spawn(move || {
            enter_netns(&ns);
            match std::net::TcpStream::connect(&addr) {
                Ok(_) => http_get(&addr, &path),
                Err(_) => (0, String::new()),
            }
        })
        .join()
        .expect("prometheus client thread")
    }

    /// The `data` of a GET of the HTTP API (`/api/v1/...`); panics unless it answers 200 with
    /// status `success`.
    pub fn api(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["status"], "success", "GET {path}: {body}");
        v["data"].clone()
    }

    /// An instant query: each series' labels (JSON object) and value.
    pub fn query(&self, q: &str) -> Vec<(Value, f64)> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(q)));
        data["result"]
            .as_array()
            .expect("vector result")
            .iter()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .expect("sample value");
                (s["metric"].clone(), value)
            })
            .collect()
    }

    /// The single value of a query that yields one series (None: no series).
    pub fn scalar(&self, q: &str) -> Option<f64> {
        let r = self.query(q);
        assert!(r.len() <= 1, "{q} gives {} series", r.len());
        r.first().map(|(_, v)| *v)
    }

    /// Polls `q` (bounded) until `ok` holds for its single value; returns the value.
    pub fn wait_for(&self, q: &str, ok: impl Fn(f64) -> bool, within: Duration) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let v = self.scalar(q);
            if let Some(v) = v
                && ok(v)
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus: {q} = {v:?}, never as expected within {within:?}"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
