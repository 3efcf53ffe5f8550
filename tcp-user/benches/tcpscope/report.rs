//! Figures, tables and the two report files (`report.md` for people, `report.json` for
//! machines), with a header saying where and on what the figures were measured.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// One figure, measured once per run.
#[derive(Clone, Debug, Default)]
pub struct Runs(Vec<f64>);

impl Runs {
    /// Adds the value of one run.
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    /// The value of the last run (NaN before any).
    pub fn last(&self) -> &f64 {
        self.0.last().unwrap_or(&f64::NAN)
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The median (mean of the middle two for an even count); NaN when empty.
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
        }
    }

    fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// The median, with `decimals` decimals.
    pub fn cell(&self, decimals: usize) -> String {
        num(self.median(), decimals)
    }

    /// `min–max (n)`.
    pub fn range(&self, decimals: usize) -> String {
        format!(
            "{}–{} ({})",
            num(self.min(), decimals),
            num(self.max(), decimals),
            self.0.len()
        )
    }

    /// `median (min–max)`, for tables that have no room for a range column.
    pub fn brief(&self, decimals: usize) -> String {
        format!(
            "{} ({}–{})",
            num(self.median(), decimals),
            num(self.min(), decimals),
            num(self.max(), decimals)
        )
    }

    /// `{median, min, max, runs}`.
    pub fn json(&self) -> Value {
        let finite = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
        json!({
            "median": finite(self.median()),
            "min": finite(self.min()),
            "max": finite(self.max()),
            "runs": self.0,
        })
    }
}

/// `v` with `decimals` decimals, or `n/a`.
pub fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "n/a".to_owned()
    }
}

/// The "met?" cell.
pub fn met(ok: Option<bool>) -> String {
    match ok {
        Some(true) => "yes".to_owned(),
        Some(false) => "**no**".to_owned(),
        None => "–".to_owned(),
    }
}

/// A markdown table.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per header).
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.headers.len());
        self.rows.push(cells);
    }

    fn markdown(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut s = line(&self.headers);
        s.push_str(&line(&vec!["---".to_owned(); self.headers.len()]));
        for r in &self.rows {
            s.push_str(&line(r));
        }
        s
    }
}

/// A target the benchmark checks, as report.json's `targets` lists it.
#[derive(Clone, Debug)]
pub struct Target {
    /// Stable id (`hot_path_vs_reference`, ...).
    pub id: &'static str,
    /// The measured value (NaN: not measured).
    pub measured: f64,
    /// The limit it must not exceed.
    pub limit: f64,
    /// Unit of both.
    pub unit: &'static str,
}

impl Target {
    /// A target met when `measured` is at most `limit`.
    pub const fn at_most(id: &'static str, measured: f64, limit: f64, unit: &'static str) -> Self {
        Self {
            id,
            measured,
            limit,
            unit,
        }
    }

    /// Whether it is met (a figure that could not be measured is not).
    pub fn met(&self) -> bool {
        self.measured.is_finite() && self.measured <= self.limit
    }

    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "measured": if self.measured.is_finite() { json!(self.measured) } else { Value::Null },
            "limit": self.limit,
            "unit": self.unit,
            "met": self.met(),
        })
    }
}

/// The report of one benchmark item.
pub struct Section {
    /// Key in report.json.
    pub key: &'static str,
    /// Heading.
    pub title: String,
    /// Paragraphs before the tables (method, target).
    pub intro: Vec<String>,
    /// The tables.
    pub tables: Vec<Table>,
    /// Paragraphs after the tables (checks, caveats).
    pub notes: Vec<String>,
    /// The same figures for machines.
    pub json: Value,
    /// The targets this item measures.
    pub targets: Vec<Target>,
}

impl Section {
    /// A section for an item that could not be measured.
    pub fn failed(key: &'static str, title: &str, error: &anyhow::Error) -> Self {
        Self {
            key,
            title: title.to_owned(),
            intro: vec![format!("**Failed:** {error:#}")],
            tables: Vec::new(),
            notes: Vec::new(),
            json: json!({ "error": format!("{error:#}") }),
            targets: Vec::new(),
        }
    }

    fn markdown(&self) -> String {
        let mut s = format!("## {}\n\n", self.title);
        for p in &self.intro {
            let _ = write!(s, "{p}\n\n");
        }
        for t in &self.tables {
            let _ = writeln!(s, "{}", t.markdown());
        }
        for p in &self.notes {
            let _ = write!(s, "{p}\n\n");
        }
        s
    }
}

/// Where and on what the figures were measured.
pub struct Machine {
    kernel: String,
    cpu: String,
    cpus: usize,
    load_start: String,
    date: String,
    commit: String,
}

impl Machine {
    /// Reads the machine's description now (at the start of the benchmark).
    pub fn now() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
            .count();
        let out = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let commit = out("git", &["-C", root, "rev-parse", "--short", "HEAD"]).map_or_else(
            || "unknown".to_owned(),
            |c| {
                let dirty = out("git", &["-C", root, "status", "--porcelain"])
                    .is_some_and(|s| !s.is_empty());
                if dirty { format!("{c} (dirty)") } else { c }
            },
        );
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu,
            cpus,
            load_start: load(),
            date: out("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default(),
            commit,
        }
    }
}

/// The 1, 5 and 15 minute load averages.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `report.md` and `report.json` into `dir`.
pub fn write(
    dir: &Path,
    machine: &Machine,
    settings: &str,
    elapsed_s: f64,
    sections: &[Section],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let load_end = load();
    let mut md = String::from("# tcpscope benchmark\n\n");
    for (k, v) in [
        ("date", machine.date.as_str()),
        ("commit", &machine.commit),
        ("kernel", &machine.kernel),
        ("CPU", &format!("{} × {}", machine.cpus, machine.cpu)),
        (
            "load (1/5/15 min)",
            &format!("{} at start, {load_end} at end", machine.load_start),
        ),
        ("settings", settings),
        ("duration", &format!("{elapsed_s:.0} s")),
    ] {
        let _ = writeln!(md, "- {k}: {v}");
    }
    md.push_str(
        "\nEach figure is the median over runs that interleave the cases (A B C A B C …); \
         ratios and differences are computed within each run, then their median is taken. \
         `runs` gives min–max (number of runs).\n\n",
    );
    let targets: Vec<&Target> = sections.iter().flat_map(|s| &s.targets).collect();
    if !targets.is_empty() {
        md.push_str("## Targets\n\n");
        let mut t = Table::new(&["id", "measured", "limit", "unit", "met?"]);
        for target in &targets {
            t.row(vec![
                format!("`{}`", target.id),
                num(target.measured, 2),
                num(target.limit, 2),
                target.unit.to_owned(),
                met(Some(target.met())),
            ]);
        }
        md.push_str(&t.markdown());
        md.push('\n');
    }
    for s in sections {
        md.push_str(&s.markdown());
    }
    let mut items = serde_json::Map::new();
    for s in sections {
        items.insert(s.key.to_owned(), s.json.clone());
    }
    let doc = json!({
        "machine": {
            "date": machine.date,
            "commit": machine.commit,
            "kernel": machine.kernel,
            "cpu": machine.cpu,
            "cpus": machine.cpus,
            "load_start": machine.load_start,
            "load_end": load_end,
        },
        "settings": settings,
        "duration_s": elapsed_s,
        "targets": targets.iter().map(|t| t.json()).collect::<Vec<_>>(),
        "items": items,
    });
    std::fs::write(dir.join("report.md"), md).context("writing report.md")?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&doc)? + "\n",
    )
    .context("writing report.json")?;
    Ok(())
}
