//! The scaling check (issue #16/#20): the same scenarios run once with one worker thread and
//! once with two in each proxy (benches/scaling.sh runs `run.sh` twice), put side by side.
//!
//! On this 2-CPU machine the load generator and the backend share the CPUs with the proxy
//! (PIN=0), so a second worker cannot double the request rate: the figure that says whether
//! a proxy scales is its CPU time per request, which stays flat when workers do not cost each
//! other anything (shared locks, bouncing cache lines), and the share of the machine it uses.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

/// One scenario x target at one and two workers.
#[derive(Debug, Clone)]
pub struct Pair {
    pub scenario: String,
    pub target: String,
    pub rps: [Option<f64>; 2],
    pub cpu_per_1k: [Option<f64>; 2],
    pub core_pct: [Option<f64>; 2],
}

/// The two runs' tables, or why they cannot be compared.
pub struct Scaling {
    pub pairs: Vec<Pair>,
    pub failures: Vec<String>,
    pub json: Value,
    pub markdown: String,
}

fn results(dir: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(dir.join("results.json"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("results.json").display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => Some(b / a),
        _ => None,
    }
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// Compare the run in `one` (one worker) with the run in `two` (two workers).
pub fn build(one: &Path, two: &Path) -> anyhow::Result<Scaling> {
    let runs = [results(one)?, results(two)?];
    let mut failures = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let workers = r["meta"]["workers"].as_u64();
        if workers != Some(i as u64 + 1) {
            failures.push(format!(
                "run {} has {workers:?} worker(s), expected {}",
                i + 1,
                i + 1
            ));
        }
        if r["meta"]["pin"].as_u64() != Some(0) {
            failures.push(format!("run {} is pinned (PIN=0 expected)", i + 1));
        }
        for f in r["failures"].as_array().into_iter().flatten() {
            failures.push(format!(
                "{} worker(s): {}",
                i + 1,
                f.as_str().unwrap_or("?")
            ));
        }
    }
    let find = |r: &Value, s: &str, t: &str| -> Option<Value> {
        r["load"]
            .as_array()?
            .iter()
            .find(|x| x["scenario"] == s && x["target"] == t)
            .cloned()
    };
    let mut pairs = Vec::new();
    for row in runs[0]["load"].as_array().into_iter().flatten() {
        let (Some(s), Some(t)) = (row["scenario"].as_str(), row["target"].as_str()) else {
            continue;
        };
        let Some(other) = find(&runs[1], s, t) else {
            failures.push(format!("{s} / {t}: no 2-worker result"));
            continue;
        };
        let get = |v: &Value, k: &str| v[k].as_f64();
        pairs.push(Pair {
            scenario: s.into(),
            target: t.into(),
            rps: [get(row, "rps"), get(&other, "rps")],
            cpu_per_1k: [
                get(row, "proxy_cpu_s_per_1k"),
                get(&other, "proxy_cpu_s_per_1k"),
            ],
            core_pct: [get(row, "proxy_core_pct"), get(&other, "proxy_core_pct")],
        });
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### Scaling check: 1 and 2 worker threads, unpinned\n\n\
| scenario | target | req/s, 1 worker | req/s, 2 workers | 2w/1w | CPU s per 1k req, 1w | 2w | 2w/1w | proxy CPU used, 1w | 2w |\n\
|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut json_pairs = Vec::new();
    for p in &pairs {
        let rps_x = ratio(p.rps[0], p.rps[1]);
        let cpu_x = ratio(p.cpu_per_1k[0], p.cpu_per_1k[1]);
        let pct = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.0}%"));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.scenario,
            p.target,
            cell(p.rps[0], 0),
            cell(p.rps[1], 0),
            cell(rps_x, 2),
            cell(p.cpu_per_1k[0], 4),
            cell(p.cpu_per_1k[1], 4),
            cell(cpu_x, 2),
            pct(p.core_pct[0]),
            pct(p.core_pct[1]),
        );
        json_pairs.push(json!({
            "scenario": p.scenario, "target": p.target,
            "rps": p.rps, "rps_2w_vs_1w": rps_x,
            "cpu_s_per_1k": p.cpu_per_1k, "cpu_2w_vs_1w": cpu_x,
            "proxy_core_pct": p.core_pct,
        }));
    }
    let _ = writeln!(
        md,
        "\nConditions: both runs PIN=0 on the same {} CPU(s): the proxy, the load generator and the \
backend share the machine, so a second worker can only take CPU the load generator and backend \
leave idle and req/s cannot double here (`direct` shows what the client side alone reaches). \
What shows whether a proxy scales is CPU s per 1k requests: flat (2w/1w near 1.00) means a second \
worker costs nothing per request (no shared lock, no bouncing cache line on the request path); \
above 1 is what the workers cost each other. `proxy CPU used` is the proxy's CPU time over the \
run's wall time (200% = both CPUs).",
        runs[0]["meta"]["cpus"].as_u64().unwrap_or(0)
    );
    let json = json!({
        "one_worker": runs[0]["meta"],
        "two_workers": runs[1]["meta"],
        "pairs": json_pairs,
        "failures": failures,
    });
    Ok(Scaling {
        pairs,
        failures,
        json,
        markdown: md,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run(dir: &Path, workers: u64, rps: f64, cpu: f64, failures: &[&str]) {
        std::fs::create_dir_all(dir).unwrap();
        let v = json!({
            "meta": {"workers": workers, "pin": 0, "cpus": 2},
            "failures": failures,
            "load": [{"scenario": "c16", "target": "waypoint", "rps": rps,
                      "proxy_cpu_s_per_1k": cpu, "proxy_core_pct": 50.0}],
        });
        std::fs::write(dir.join("results.json"), v.to_string()).unwrap();
    }

    #[test]
    fn pairs_runs_and_reports_ratios_and_failures() {
        let base = std::env::temp_dir().join(format!("scaling-{}", std::process::id()));
        let (one, two) = (base.join("one"), base.join("two"));
        run(&one, 1, 10000.0, 0.02, &[]);
        run(&two, 2, 15000.0, 0.021, &[]);
        let s = build(&one, &two).unwrap();
        assert!(s.failures.is_empty(), "{:?}", s.failures);
        assert_eq!(s.pairs.len(), 1);
        assert!(
            s.markdown
                .contains("| c16 | waypoint | 10000 | 15000 | 1.50 |"),
            "{}",
            s.markdown
        );
        assert!(s.markdown.contains("| 1.05 |"), "{}", s.markdown);
        // Swapped runs, or a failed run, are reported as failures.
        run(&two, 2, 15000.0, 0.021, &["c16 / waypoint: 3 errors"]);
        let s = build(&two, &two).unwrap();
        assert_eq!(s.failures.len(), 3, "{:?}", s.failures);
        let _ = std::fs::remove_dir_all(&base);
    }
}
