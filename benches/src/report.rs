//! Turn one bench run directory (raw loadgen / measure JSON files plus `meta.json`) into
//! `results.json`, `results.md` and `chart.svg`.
//!
//! Raw files are named `<scenario>__<target>__<rep>.json`; targets are `direct`, `waypoint`
//! and `envoy`. Repeats of a scenario/target are summarized by their median.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

pub const TARGETS: [&str; 3] = ["direct", "waypoint", "envoy"];

/// What a scenario name means (for the tables).
pub fn describe(scenario: &str) -> String {
    match scenario {
        "c1" => "keep-alive GET, 1 tunnel (c=1)".into(),
        "c16" => "keep-alive GET, c=16".into(),
        "c64" => "keep-alive GET, c=64".into(),
        "c64n8" => "keep-alive GET, c=64 over 8 HBONE connections (8 tunnels each)".into(),
        "newtunnel" => "new tunnel per request (CONNECT + GET), c=16".into(),
        "newconn" => "new HBONE connection per request (TCP + full mTLS handshake + CONNECT + GET), c=16".into(),
        "resp1m" => "keep-alive GET, 1 MiB response, c=16 (CPU-s per 1k requests = per GiB)".into(),
        "body1k" => "keep-alive POST 1 KiB body, c=16".into(),
        "body64k" => "keep-alive POST 64 KiB body, c=16".into(),
        "routes100" => "100 HTTPRoute rules (match is the last), GET c=16".into(),
        "routes100h" => "100 HTTPRoute rules with the request's path, told apart by a header (match is the last), GET c=16".into(),
        "authz100" => "100 AuthorizationPolicies, GET c=16".into(),
        "hbone2" => "two tunnels: client -> waypoint -> HBONE to the pod's ztunnel (stand-in) -> backend, GET c=16 (waypoint only)".into(),
        "open" => "open loop, fixed rate, GET, up to 64 in flight".into(),
        "tlsorig" => "keep-alive GET, c=16, TLS originated by the proxy to an HTTPS backend (DestinationRule tls SIMPLE; Envoy: the UpstreamTlsContext istiod renders), proxies only".into(),
        "tlsoff" => "as tlsorig over plaintext (same Service shape, no route, same backend process): tlsorig's baseline".into(),
        "trace1" => "keep-alive GET, c=16, tracing to an OTLP/gRPC collector at 1% sampling (istiod's default rate; Telemetry randomSamplingPercentage)".into(),
        "trace100" => "keep-alive GET, c=16, tracing at 100% sampling: one span per request exported over OTLP/gRPC".into(),
        "grpc" => "unary gRPC calls over h2c in the tunnel (64-byte message each way, HTTP/2 to the backend), c=16".into(),
        "grpcstream" => "gRPC calls of 100 messages of 64 bytes each, echoed back (h2c in the tunnel, HTTP/2 to the backend), c=16; a request = a call".into(),
        "idle" => "idle tunnels held open".into(),
        "idle1m" => "a million idle tunnels held open (waypoint only)".into(),
        "services" => "config with many Services".into(),
        other => other.into(),
    }
}

/// One scenario x target, summarized over repeats.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub scenario: String,
    pub target: String,
    pub runs: usize,
    pub rps: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub errors: u64,
    pub requests: u64,
    pub cpu_per_1k: Option<f64>,
    pub peak_rss_kb: Option<f64>,
    pub core_pct: Option<f64>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_f64()
}

/// Raw results: (scenario, target, rep, json).
pub fn read_raw(dir: &Path) -> anyhow::Result<Vec<(String, String, u32, Value)>> {
    let mut out = Vec::new();
    let raw = dir.join("raw");
    if !raw.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(&raw)? {
        let path = e?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let parts: Vec<&str> = stem.split("__").collect();
        let [scenario, target, rep] = parts[..] else {
            continue;
        };
        let text = std::fs::read_to_string(&path)?;
        // The last non-empty line is the JSON object (tools may print before it).
        let Some(line) = text.lines().rev().find(|l| l.trim_start().starts_with('{')) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        out.push((
            scenario.to_string(),
            target.to_string(),
            rep.parse().unwrap_or(0),
            v,
        ));
    }
    out.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
    Ok(out)
}

/// Summaries of the load runs, in `order` (scenario names; others appended).
pub fn load_rows(raw: &[(String, String, u32, Value)], order: &[String]) -> Vec<Row> {
    let mut groups: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
    for (s, t, _, v) in raw {
        if v["kind"] == "load" {
            groups.entry((s.clone(), t.clone())).or_default().push(v);
        }
    }
    let mut scen: Vec<String> = order.to_vec();
    for (s, _) in groups.keys() {
        if !scen.contains(s) {
            scen.push(s.clone());
        }
    }
    let mut rows = Vec::new();
    for s in &scen {
        for t in TARGETS {
            let Some(vs) = groups.get(&(s.clone(), t.to_string())) else {
                continue;
            };
            let m = |path: &[&str]| median(vs.iter().filter_map(|v| f(v, path)).collect());
            rows.push(Row {
                scenario: s.clone(),
                target: t.to_string(),
                runs: vs.len(),
                rps: m(&["rps"]),
                p50: m(&["latency_us", "p50"]),
                p90: m(&["latency_us", "p90"]),
                p99: m(&["latency_us", "p99"]),
                p999: m(&["latency_us", "p999"]),
                errors: vs.iter().filter_map(|v| v["errors"].as_u64()).sum(),
                requests: vs.iter().filter_map(|v| v["requests"].as_u64()).sum(),
                cpu_per_1k: m(&["proxy", "cpu_s_per_1k"]),
                peak_rss_kb: vs
                    .iter()
                    .filter_map(|v| f(v, &["proxy", "peak_rss_kb"]))
                    .reduce(f64::max),
                core_pct: m(&["proxy", "core_pct"]),
            });
        }
    }
    rows
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

fn fmt_num(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}"))
        .unwrap_or_else(|| "-".into())
}

fn fmt_mib(kb: Option<f64>) -> String {
    kb.map(|k| format!("{:.1}", k / 1024.0))
        .unwrap_or_else(|| "-".into())
}

fn peer<'a>(rows: &'a [Row], scenario: &str, target: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.target == target)
}

/// Ratios of a row to Envoy and to direct in the same scenario.
pub fn ratios(rows: &[Row], r: &Row) -> Value {
    let envoy = peer(rows, &r.scenario, "envoy");
    let direct = peer(rows, &r.scenario, "direct");
    json!({
        "rps_vs_envoy": ratio(r.rps, envoy.and_then(|e| e.rps)),
        "rps_vs_direct": ratio(r.rps, direct.and_then(|e| e.rps)),
        "p50_vs_envoy": ratio(r.p50, envoy.and_then(|e| e.p50)),
        "p99_vs_envoy": ratio(r.p99, envoy.and_then(|e| e.p99)),
        "p99_vs_direct": ratio(r.p99, direct.and_then(|e| e.p99)),
        "cpu_per_1k_vs_envoy": ratio(r.cpu_per_1k, envoy.and_then(|e| e.cpu_per_1k)),
        "peak_rss_vs_envoy": ratio(r.peak_rss_kb, envoy.and_then(|e| e.peak_rss_kb)),
    })
}

/// The whole report.
pub struct Report {
    pub json: Value,
    pub markdown: String,
    pub svg: String,
    /// Why the run cannot be published (empty: it can): errors, lost access-log lines,
    /// runs that are missing.
    pub failures: Vec<String>,
}

/// Load scenarios (one loadgen run per target and repeat); the others are special.
const SPECIAL_SCENARIOS: [&str; 4] = ["idle", "idle1m", "hbone2", "services"];

/// What makes a run unpublishable: a load run with errors or fewer access-log lines than
/// completed requests (or lines the waypoint dropped), an idle run with open errors or dead
/// probes, a scenario/target/repeat with no result at all.
pub fn failures(meta: &Value, raw: &[(String, String, u32, Value)]) -> Vec<String> {
    let mut out = Vec::new();
    for (s, t, rep, v) in raw {
        let at = format!("{s} / {t} (rep {rep})");
        if v["kind"] == "load" {
            let errors = v["errors"].as_u64().unwrap_or(0);
            if errors > 0 {
                out.push(format!(
                    "{at}: {errors} errors (first: {})",
                    v["first_error"].as_str().unwrap_or("?")
                ));
            }
            let log = &v["access_log"];
            if let (Some(lines), Some(expected)) =
                (log["lines"].as_i64(), log["expected_at_least"].as_i64())
                && lines < expected
            {
                out.push(format!(
                    "{at}: {lines} access-log lines for {expected} completed requests"
                ));
            }
            if let Some(d) = log["dropped"].as_i64().filter(|d| *d > 0) {
                out.push(format!(
                    "{at}: {d} access-log lines dropped by the waypoint"
                ));
            }
        } else if v["kind"] == "idle" {
            let open_errors = v["open_errors"].as_u64().unwrap_or(0);
            let (probed, alive) = (
                v["probed"].as_u64().unwrap_or(0),
                v["probed_alive"].as_u64().unwrap_or(0),
            );
            if open_errors > 0 || alive < probed {
                out.push(format!(
                    "{at}: {open_errors} tunnels failed to open, {alive}/{probed} probes alive"
                ));
            }
        }
    }
    let list = |k: &str| -> Vec<String> {
        meta[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (scenarios, targets) = (list("scenarios"), list("targets"));
    let repeat = meta["repeat"].as_u64().unwrap_or(1) as u32;
    let has = |s: &str, t: &str, rep: u32| {
        raw.iter()
            .any(|(rs, rt, rr, _)| rs == s && rt == t && *rr == rep)
    };
    for s in &scenarios {
        for t in &targets {
            if SPECIAL_SCENARIOS.contains(&s.as_str()) {
                let expected = match s.as_str() {
                    "idle" | "services" => t != "direct",
                    _ => t == "waypoint",
                };
                if expected && !has(s, t, 1) {
                    out.push(format!("{s} / {t}: no result (see logs/)"));
                }
                continue;
            }
            // The direct path has no TLS client: tlsorig runs the proxies only.
            if s == "tlsorig" && t == "direct" {
                continue;
            }
            for rep in 1..=repeat {
                if !has(s, t, rep) {
                    out.push(format!("{s} / {t} (rep {rep}): no result (see logs/)"));
                }
            }
        }
    }
    out
}

pub fn build(dir: &Path) -> anyhow::Result<Report> {
    let meta: Value = std::fs::read_to_string(dir.join("meta.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| json!({}));
    let order: Vec<String> = meta["scenarios"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let raw = read_raw(dir)?;
    let rows = load_rows(&raw, &order);

    let mut md = String::new();
    let _ = writeln!(md, "### Load\n");
    let _ = writeln!(
        md,
        "Medians over repeats. Latency in µs (HdrHistogram, from send, or from the scheduled send time in open loop). \
         CPU and RSS are the proxy's (none for direct). Ratios: this row / Envoy's and / direct's value in the same scenario \
         (req/s above 1 = faster; latency, CPU and RSS below 1 = better).\n"
    );
    md.push_str("| scenario | target | req/s | p50 | p90 | p99 | p99.9 | errors | proxy CPU-s / 1k req | proxy core % | proxy peak RSS MiB | req/s vs Envoy | req/s vs direct | p99 vs Envoy | p99 vs direct | CPU/1k vs Envoy | RSS vs Envoy |\n");
    md.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    let mut summary = Vec::new();
    for r in &rows {
        let rt = ratios(&rows, r);
        let is_envoy = r.target == "envoy";
        let is_direct = r.target == "direct";
        let rf = |k: &str, skip: bool| {
            if skip {
                "-".to_string()
            } else {
                fmt_ratio(rt[k].as_f64())
            }
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.target,
            fmt_num(r.rps, 0),
            fmt_num(r.p50, 0),
            fmt_num(r.p90, 0),
            fmt_num(r.p99, 0),
            fmt_num(r.p999, 0),
            r.errors,
            fmt_num(r.cpu_per_1k, 4),
            fmt_num(r.core_pct, 0),
            fmt_mib(r.peak_rss_kb),
            rf("rps_vs_envoy", is_envoy),
            rf("rps_vs_direct", is_direct),
            rf("p99_vs_envoy", is_envoy),
            rf("p99_vs_direct", is_direct),
            rf("cpu_per_1k_vs_envoy", is_envoy || is_direct),
            rf("peak_rss_vs_envoy", is_envoy || is_direct),
        );
        summary.push(json!({
            "scenario": r.scenario,
            "description": describe(&r.scenario),
            "target": r.target,
            "runs": r.runs,
            "rps": r.rps,
            "latency_us": {"p50": r.p50, "p90": r.p90, "p99": r.p99, "p999": r.p999},
            "requests": r.requests,
            "errors": r.errors,
            "proxy_cpu_s_per_1k": r.cpu_per_1k,
            "proxy_core_pct": r.core_pct,
            "proxy_peak_rss_kb": r.peak_rss_kb,
            "ratios": rt,
        }));
    }
    let scen_seen: Vec<&String> = {
        let mut v: Vec<&String> = Vec::new();
        for r in &rows {
            if !v.contains(&&r.scenario) {
                v.push(&r.scenario);
            }
        }
        v
    };
    if !scen_seen.is_empty() {
        md.push_str("\nScenarios: ");
        let d: Vec<String> = scen_seen
            .iter()
            .map(|s| format!("`{s}` = {}", describe(s)))
            .collect();
        md.push_str(&d.join("; "));
        md.push_str(".\n");
    }

    // Idle tunnels.
    let idle: Vec<&(String, String, u32, Value)> = raw
        .iter()
        .filter(|(_, _, _, v)| v["kind"] == "idle")
        .collect();
    let mut idle_json = Vec::new();
    if !idle.is_empty() {
        md.push_str("\n### Idle tunnels (memory per tunnel)\n\n");
        md.push_str("Tunnels opened over pooled HBONE connections (100 streams each), one GET each, then held. \
                     Bytes per tunnel = RSS growth after the tunnels / tunnels open (HBONE connection cost excluded), \
                     measured twice: *just idle* 0.5 s after the last tunnel opened (before the waypoint parks idle \
                     tunnels, after 1 s) and *parked* at the end of the hold (every tunnel idle at least that long); \
                     *settled*: RSS 5 s after every tunnel closed (what a burst leaves behind). \
                     *beside*: after the hold, 100 held tunnels probed and 100 new tunnels opened one at a time \
                     (open + GET), p50/p99 ms. `idle1m` is the waypoint alone with a million tunnels over 10,000 \
                     connections (Envoy at its idle-scenario cost would need ~46 GB); its ratios are not computed.\n\n");
        md.push_str("| target | tunnels open | open errors | open s | RSS before tunnels MiB | RSS just idle MiB | RSS parked MiB | peak RSS MiB | settled RSS MiB | bytes / tunnel just idle | vs Envoy | bytes / tunnel parked | vs Envoy | hold s | probes alive | new tunnel beside p50/p99 ms |\n");
        md.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        let envoy_of = |key: &str| {
            idle.iter()
                .filter(|(_, t, _, _)| t == "envoy")
                .filter_map(|(_, _, _, v)| f(v, &["proxy", key]))
                .next()
        };
        let envoy_early = envoy_of("bytes_per_tunnel_early");
        let envoy_bpt = envoy_of("bytes_per_tunnel");
        for (s, t, rep, v) in &idle {
            let early = f(v, &["proxy", "bytes_per_tunnel_early"]);
            let bpt = f(v, &["proxy", "bytes_per_tunnel"]);
            let vs = |x: Option<f64>, e: Option<f64>| {
                if t == "envoy" || s != "idle" {
                    "-".into()
                } else {
                    fmt_ratio(ratio(x, e))
                }
            };
            let label = if s == "idle" {
                t.to_string()
            } else {
                format!("{t} ({s})")
            };
            let ms =
                |q: &str| fmt_num(f(v, &["new_tunnel_latency_us", q]).map(|us| us / 1000.0), 1);
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {}/{} |",
                v["tunnels_open"],
                v["open_errors"],
                fmt_num(f(v, &["open_seconds"]), 1),
                fmt_mib(f(v, &["proxy", "rss_after_connections_kb"])),
                fmt_mib(f(v, &["proxy", "rss_after_tunnels_early_kb"])),
                fmt_mib(f(v, &["proxy", "rss_after_tunnels_kb"])),
                fmt_mib(f(v, &["proxy", "peak_rss_kb"])),
                fmt_mib(f(v, &["proxy", "rss_settled_kb"])),
                fmt_num(early, 0),
                vs(early, envoy_early),
                fmt_num(bpt, 0),
                vs(bpt, envoy_bpt),
                fmt_num(f(v, &["proxy", "hold_seconds"]), 0),
                v["probed_alive"],
                v["probed"],
                ms("p50"),
                ms("p99"),
            );
            let (early_vs, bpt_vs) = if *s == "idle" {
                (ratio(early, envoy_early), ratio(bpt, envoy_bpt))
            } else {
                (None, None)
            };
            idle_json.push(json!({"scenario": s, "target": t, "rep": rep, "result": v,
                "bytes_per_tunnel_early_vs_envoy": early_vs,
                "bytes_per_tunnel_vs_envoy": bpt_vs}));
        }
    }

    // Config scale.
    let cfg: Vec<&(String, String, u32, Value)> = raw
        .iter()
        .filter(|(_, _, _, v)| v["kind"] == "measure")
        .collect();
    let mut cfg_json = Vec::new();
    if !cfg.is_empty() {
        md.push_str("\n### Config scale\n\n");
        md.push_str("Our waypoint: `waypoint check` (parse + compile); Envoy: `envoy --mode validate` (parse + build every listener, chain and cluster). \
                     Wall time, CPU time and peak RSS of the whole process. **Not how a live waypoint gets its configuration**: Envoy here parses one \
                     static YAML bootstrap (with Istio's stats settings), where istiod would stream protobuf over xDS in pieces; read it as the cost of \
                     building the same configuration from text, not as a figure of Envoy's waypoint in a cluster.\n\n");
        md.push_str("| target | command | exit | wall s | CPU s | peak RSS MiB | wall vs Envoy | RSS vs Envoy |\n");
        md.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        let envoy_of = |s: &str, key: &str| {
            cfg.iter()
                .filter(|(sc, t, _, _)| sc == s && t == "envoy")
                .filter_map(|(_, _, _, v)| f(v, &[key]))
                .next()
        };
        for (s, t, rep, v) in &cfg {
            let wall = f(v, &["wall_seconds"]);
            let rss = f(v, &["max_rss_kb"]);
            let is_envoy = t == "envoy";
            let _ = writeln!(
                md,
                "| {t} | {} ({s}) | {} | {} | {} | {} | {} | {} |",
                v["label"].as_str().unwrap_or("-"),
                v["exit_code"],
                fmt_num(wall, 2),
                fmt_num(f(v, &["cpu_seconds"]), 2),
                fmt_mib(rss),
                if is_envoy {
                    "-".into()
                } else {
                    fmt_ratio(ratio(wall, envoy_of(s, "wall_seconds")))
                },
                if is_envoy {
                    "-".into()
                } else {
                    fmt_ratio(ratio(rss, envoy_of(s, "max_rss_kb")))
                },
            );
            cfg_json.push(json!({"scenario": s, "target": t, "rep": rep, "result": v}));
        }
    }
    if let Some(notes) = meta["notes"].as_array().filter(|n| !n.is_empty()) {
        md.push_str("\nNotes:\n");
        for n in notes {
            if let Some(s) = n.as_str() {
                let _ = writeln!(md, "- {s}");
            }
        }
    }

    let failures = failures(&meta, &raw);
    if !failures.is_empty() {
        let mut head = String::from(
            "**This run FAILED** and is not published (README tables left alone):\n\n",
        );
        for f in &failures {
            let _ = writeln!(head, "- {f}");
        }
        head.push('\n');
        md.insert_str(0, &head);
    }
    let svg = chart(&rows);
    let json = json!({
        "failures": failures,
        "meta": meta,
        "load": summary,
        "idle_tunnels": idle_json,
        "config_scale": cfg_json,
        "runs": raw.iter().map(|(s, t, rep, v)| json!({"scenario": s, "target": t, "rep": rep, "result": v})).collect::<Vec<_>>(),
    });
    Ok(Report {
        json,
        markdown: md,
        svg,
        failures,
    })
}

fn color(target: &str) -> &'static str {
    match target {
        "direct" => "#9e9e9e",
        "waypoint" => "#1f77b4",
        _ => "#ff7f0e",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Grouped bar charts, one group per scenario: req/s and p99 latency on log scales (so direct,
/// waypoint and Envoy fit on one axis and equal ratios look equal), proxy CPU per 1k requests
/// on a linear scale.
pub fn chart(rows: &[Row]) -> String {
    let mut scenarios: Vec<&str> = Vec::new();
    for r in rows {
        if !scenarios.contains(&r.scenario.as_str()) {
            scenarios.push(&r.scenario);
        }
    }
    type Metric = fn(&Row) -> Option<f64>;
    // (title, metric, include direct, log scale)
    let panels: [(&str, Metric, bool, bool); 3] = [
        (
            "requests / s, log scale (higher is better)",
            |r| r.rps,
            true,
            true,
        ),
        (
            "p99 latency, µs, log scale (lower is better)",
            |r| r.p99,
            true,
            true,
        ),
        (
            "proxy CPU-seconds per 1,000 requests (lower is better)",
            |r| r.cpu_per_1k,
            false,
            false,
        ),
    ];
    let bar = 16.0;
    let group_gap = 18.0;
    let left = 70.0;
    let group_w = bar * 3.0 + group_gap;
    let width = (left + group_w * scenarios.len().max(1) as f64 + 20.0).max(560.0);
    let plot_h = 150.0;
    let panel_h = plot_h + 85.0;
    let top = 36.0;
    let height = top + panel_h * panels.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = writeln!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let mut lx = left;
    for t in TARGETS {
        let _ = writeln!(
            s,
            "<rect x=\"{lx:.0}\" y=\"10\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.0}\" y=\"20\">{t}</text>",
            color(t),
            lx + 16.0
        );
        lx += 90.0;
    }
    for (pi, (title, metric, with_direct, log)) in panels.iter().enumerate() {
        let y0 = top + panel_h * pi as f64;
        let base = y0 + 40.0 + plot_h;
        let values: Vec<f64> = rows
            .iter()
            .filter(|r| *with_direct || r.target != "direct")
            .filter_map(metric)
            .filter(|v| *v > 0.0)
            .collect();
        let max = values.iter().copied().fold(0.0f64, f64::max);
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        // Value -> bar height.
        let (lo, hi) = if *log && max > 0.0 {
            (
                min.log10().floor(),
                max.log10().ceil().max(min.log10().floor() + 1.0),
            )
        } else {
            (0.0, max / 0.85)
        };
        let height_of = |v: f64| -> f64 {
            if *log {
                if v <= 0.0 {
                    return 0.0;
                }
                (plot_h * (v.log10() - lo) / (hi - lo)).clamp(1.0, plot_h)
            } else if hi > 0.0 {
                plot_h * v / hi
            } else {
                0.0
            }
        };
        let _ = writeln!(
            s,
            "<text x=\"{left:.0}\" y=\"{:.0}\" font-weight=\"bold\">{}</text>",
            y0 + 14.0,
            esc(title)
        );
        // Grid: decades (log) or 4 steps (linear).
        let ticks: Vec<f64> = if *log {
            (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
        } else {
            (0..=4).map(|i| hi * f64::from(i) / 4.0).collect()
        };
        for t in ticks {
            let y = base
                - if *log {
                    plot_h * (t.log10() - lo) / (hi - lo)
                } else {
                    height_of(t)
                };
            let _ = writeln!(
                s,
                "<line x1=\"{left:.0}\" y1=\"{y:.1}\" x2=\"{:.0}\" y2=\"{y:.1}\" stroke=\"#dddddd\"/><text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555555\">{}</text>",
                width - 10.0,
                left - 4.0,
                y + 4.0,
                short(t)
            );
        }
        let _ = writeln!(
            s,
            "<line x1=\"{left:.0}\" y1=\"{base:.0}\" x2=\"{:.0}\" y2=\"{base:.0}\" stroke=\"black\"/>",
            width - 10.0
        );
        for (gi, sc) in scenarios.iter().enumerate() {
            let gx = left + 8.0 + group_w * gi as f64;
            for (ti, t) in TARGETS.iter().enumerate() {
                if !*with_direct && *t == "direct" {
                    continue;
                }
                let Some(v) = rows
                    .iter()
                    .find(|r| r.scenario == *sc && r.target == *t)
                    .and_then(metric)
                else {
                    continue;
                };
                let h = height_of(v);
                let x = gx + bar * ti as f64;
                let cx = x + (bar - 2.0) / 2.0;
                let _ = writeln!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{sc} {t}: {}</title></rect>",
                    base - h,
                    bar - 2.0,
                    color(t),
                    short(v)
                );
                let _ = writeln!(
                    s,
                    "<text x=\"{cx:.1}\" y=\"{:.1}\" font-size=\"8\" transform=\"rotate(-90 {cx:.1} {:.1})\" dy=\"3\">{}</text>",
                    base - h - 3.0,
                    base - h - 3.0,
                    short(v)
                );
            }
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                gx + bar * 1.5,
                base + 14.0,
                esc(sc)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

fn short(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.1}M", v / 1_000_000.0)
    } else if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else if v > 0.0 && v < 0.01 {
        format!("{v:.4}")
    } else {
        format!("{v:.3}")
    }
}

/// Replace the text between `<!-- {name}:begin -->` and `<!-- {name}:end -->` in `readme`
/// with `block`. Returns false (and leaves the file alone) without both markers.
pub fn splice_marked(readme: &Path, name: &str, block: &str) -> anyhow::Result<bool> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let (begin, end) = (begin.as_str(), end.as_str());
    let text = std::fs::read_to_string(readme)?;
    let (Some(b), Some(e)) = (text.find(begin), text.find(end)) else {
        return Ok(false);
    };
    if e < b {
        return Ok(false);
    }
    let new = format!(
        "{}{begin}\n{}\n{}",
        &text[..b],
        block.trim_end(),
        &text[e..]
    );
    std::fs::write(readme, new)?;
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn report_from_raw_files() {
        let dir = std::env::temp_dir().join(format!("benchreport-{}", std::process::id()));
        let raw = dir.join("raw");
        std::fs::create_dir_all(&raw).unwrap();
        let load = |rps: f64, p99: f64, cpu: Option<f64>| {
            json!({"kind": "load", "rps": rps, "errors": 0, "requests": 10,
                   "latency_us": {"p50": 1.0, "p90": 2.0, "p99": p99, "p999": 4.0},
                   "proxy": cpu.map(|c| json!({"cpu_s_per_1k": c, "peak_rss_kb": 10240.0}))})
            .to_string()
        };
        std::fs::write(raw.join("c16__direct__1.json"), load(1000.0, 10.0, None)).unwrap();
        std::fs::write(
            raw.join("c16__waypoint__1.json"),
            load(500.0, 20.0, Some(0.05)),
        )
        .unwrap();
        std::fs::write(raw.join("c16__envoy__1.json"), load(250.0, 40.0, Some(0.1))).unwrap();
        std::fs::write(
            dir.join("meta.json"),
            r#"{"scenarios":["c16"],"notes":["n1"]}"#,
        )
        .unwrap();
        let r = build(&dir).unwrap();
        let wp = &r.json["load"][1];
        assert_eq!(wp["target"], "waypoint");
        assert_eq!(wp["ratios"]["rps_vs_envoy"], 2.0);
        assert_eq!(wp["ratios"]["rps_vs_direct"], 0.5);
        assert_eq!(wp["ratios"]["cpu_per_1k_vs_envoy"], 0.5);
        assert!(r.markdown.contains("| c16 | waypoint | 500 |"));
        assert!(r.markdown.contains("- n1"));
        assert!(r.svg.starts_with("<svg") && r.svg.contains("c16"));
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Errors, lost or dropped access-log lines, dead idle probes and missing runs each make
    /// a run unpublishable, named in the failures; a clean run has none.
    #[test]
    fn failed_runs_are_named() {
        let meta = json!({"scenarios": ["c16", "idle"], "targets": ["direct", "waypoint", "envoy"], "repeat": 2});
        let load = |errors: u64, lines: i64, dropped: i64| {
            json!({"kind": "load", "errors": errors, "first_error": "connection reset",
                   "access_log": {"lines": lines, "expected_at_least": 100, "dropped": dropped}})
        };
        let idle = |alive: u64| json!({"kind": "idle", "open_errors": 0, "probed": 100, "probed_alive": alive});
        let run = |s: &str, t: &str, rep: u32, v: Value| (s.to_string(), t.to_string(), rep, v);
        let clean = vec![
            run("c16", "direct", 1, json!({"kind": "load", "errors": 0})),
            run("c16", "direct", 2, json!({"kind": "load", "errors": 0})),
            run("c16", "waypoint", 1, load(0, 100, 0)),
            run("c16", "waypoint", 2, load(0, 120, 0)),
            run("c16", "envoy", 1, load(0, 100, 0)),
            run("c16", "envoy", 2, load(0, 100, 0)),
            run("idle", "waypoint", 1, idle(100)),
            run("idle", "envoy", 1, idle(100)),
        ];
        assert!(
            failures(&meta, &clean).is_empty(),
            "{:?}",
            failures(&meta, &clean)
        );

        let mut bad = clean.clone();
        bad[2].3 = load(3, 100, 0);
        bad[3].3 = load(0, 99, 0);
        bad[4].3 = load(0, 100, 5);
        bad[6].3 = idle(99);
        bad.remove(5);
        let f = failures(&meta, &bad);
        assert_eq!(f.len(), 5, "{f:?}");
        assert!(f[0].contains("c16 / waypoint (rep 1): 3 errors (first: connection reset)"));
        assert!(f[1].contains("99 access-log lines for 100 completed requests"));
        assert!(f[2].contains("5 access-log lines dropped"));
        assert!(f[3].contains("idle / waypoint (rep 1)") && f[3].contains("99/100 probes"));
        assert!(f[4].contains("c16 / envoy (rep 2): no result"));
    }
}
