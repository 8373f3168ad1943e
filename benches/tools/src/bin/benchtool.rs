//! `benchtool`: helpers for `benches/run.sh`.
//!
//! - `gen`: write the bench configuration (variant `base`, `routes<N>`, `authz<N>`,
//!   `services<N>`) for our waypoint (Kubernetes manifests) and for Envoy (bootstrap from the
//!   templates in `benches/envoy/`);
//! - `measure`: run a command with a deadline and report wall time, CPU time and peak RSS
//!   (through `/usr/bin/time -v` when present, else by polling `/proc`);
//! - `report`: turn a run directory into `results.json`, `results.md` and `chart.svg`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde_json::json;
use waypoint_benches::envoy::{EnvoyParams, bootstrap};
use waypoint_benches::model::{Backends, Model, Variant};
use waypoint_benches::{procstat, report};

#[derive(Parser, Debug)]
#[command(name = "benchtool")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write waypoint-<variant>.yaml and envoy-<variant>.yaml into --out-dir.
    Gen(GenArgs),
    /// Write a CA (ca.pem) and a server certificate for --dns (server.pem, server-key.pem)
    /// into --out-dir: the HTTPS backend of the TLS origination scenario.
    TlsCerts(TlsCertsArgs),
    /// Run a command (after `--`), bounded by --timeout; print JSON with wall/CPU/peak RSS.
    Measure(MeasureArgs),
    /// Build results.json, results.md and chart.svg in --dir.
    Report(ReportArgs),
    /// Put a 1-worker run (--one) and a 2-worker run (--two) side by side: scaling.md and
    /// scaling.json in --out-dir.
    Scaling(ScalingArgs),
}

#[derive(Parser, Debug)]
struct ScalingArgs {
    #[arg(long)]
    one: PathBuf,
    #[arg(long)]
    two: PathBuf,
    #[arg(long)]
    out_dir: PathBuf,
    /// A markdown file whose `<!-- bench-scaling:begin/end -->` block gets the table.
    #[arg(long)]
    readme: Vec<PathBuf>,
    /// The command line that reproduces the check (written next to the table in --readme).
    #[arg(long, default_value = "benches/scaling.sh")]
    command: String,
}

#[derive(Parser, Debug)]
struct GenArgs {
    /// base | routes<N> | routes<N>h | authz<N> | services<N> | tlsorig | trace<N> | grpc
    #[arg(long)]
    variant: String,
    #[arg(long)]
    out_dir: PathBuf,
    /// Directory with the waypoint's cert-chain.pem, key.pem, root-cert.pem (for Envoy).
    #[arg(long)]
    certs: PathBuf,
    /// Backends: reviews-v1, reviews-v2, ratings (comma-separated ip:port).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:29081,127.0.0.1:29082,127.0.0.1:29083"
    )]
    backends: Vec<SocketAddr>,
    #[arg(long, default_value_t = 25208)]
    envoy_hbone_port: u16,
    #[arg(long, default_value_t = 25200)]
    envoy_admin_port: u16,
    /// Where Envoy writes its JSON access log.
    #[arg(long)]
    envoy_access_log: PathBuf,
    /// The gRPC (h2c) backend of Service `grpc` (variant grpc).
    #[arg(long, default_value = "127.0.0.1:19086")]
    grpc_backend: SocketAddr,
    /// The HTTPS backend of Service `secure` (variant tlsorig).
    #[arg(long, default_value = "127.0.0.1:29084")]
    tls_backend: SocketAddr,
    /// The CA that verifies it (variant tlsorig; see `tls-certs`).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The OTLP/gRPC span sink (variant trace<N>; see `otlp-sink`).
    #[arg(long, default_value = "127.0.0.1:29085")]
    otel_sink: SocketAddr,
}

#[derive(Parser, Debug)]
struct TlsCertsArgs {
    #[arg(long)]
    out_dir: PathBuf,
    #[arg(long, default_value = "secure.default.svc.cluster.local")]
    dns: String,
}

#[derive(Parser, Debug)]
struct MeasureArgs {
    /// Label for the report.
    #[arg(long)]
    label: String,
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Where the command's stdout and stderr go.
    #[arg(long, default_value = "/dev/null")]
    output: PathBuf,
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

#[derive(Parser, Debug)]
struct ReportArgs {
    #[arg(long)]
    dir: PathBuf,
    /// A markdown file whose `<!-- bench-results:begin/end -->` block gets the tables.
    #[arg(long)]
    readme: Vec<PathBuf>,
    /// The command line that reproduces the run (written next to the table in --readme).
    #[arg(long, default_value = "benches/run.sh")]
    command: String,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Gen(a) => generate(a),
        Cmd::TlsCerts(a) => tls_certs(a),
        Cmd::Measure(a) => measure(a),
        Cmd::Report(a) => make_report(a),
        Cmd::Scaling(a) => scaling_report(a),
    }
}

/// Write `block` between the `<!-- {marker}:begin/end -->` markers of each README, saying
/// which were updated and which lack the markers.
fn splice_all(readmes: &[PathBuf], marker: &str, block: &str) {
    for readme in readmes {
        match report::splice_marked(readme, marker, block) {
            Ok(true) => eprintln!("benchtool: updated {}", readme.display()),
            Ok(false) => eprintln!(
                "benchtool: {} has no <!-- {marker}:begin/end --> markers; left alone",
                readme.display()
            ),
            Err(e) => eprintln!("benchtool: {}: {e}", readme.display()),
        }
    }
}

fn scaling_report(a: ScalingArgs) -> anyhow::Result<()> {
    let s = waypoint_benches::scaling::build(&a.one, &a.two)?;
    std::fs::create_dir_all(&a.out_dir)?;
    std::fs::write(
        a.out_dir.join("scaling.json"),
        serde_json::to_string_pretty(&s.json)?,
    )?;
    let summary = |k: &str| {
        s.json[k]["summary_line"]
            .as_str()
            .map(|l| format!("- {l}\n"))
            .unwrap_or_default()
    };
    let md = format!(
        "{}\nRuns:\n{}{}",
        s.markdown,
        summary("one_worker"),
        summary("two_workers")
    );
    std::fs::write(a.out_dir.join("scaling.md"), &md)?;
    if !s.failures.is_empty() {
        for f in &s.failures {
            eprintln!("benchtool: FAILED: {f}");
        }
        eprintln!("benchtool: the scaling check failed; READMEs left alone");
        println!("{}", a.out_dir.join("scaling.md").display());
        std::process::exit(3);
    }
    let block = format!(
        "Latest scaling check (tables and JSON in `{}`), reproduce with:\n\n```sh\n{}\n```\n\n{}",
        a.out_dir.display(),
        a.command,
        md.replace("### ", "#### ")
    );
    splice_all(&a.readme, "bench-scaling", &block);
    println!("{}", a.out_dir.join("scaling.md").display());
    Ok(())
}

fn tls_certs(a: TlsCertsArgs) -> anyhow::Result<()> {
    let pki = hbone::testing::Pki::new("bench.test").map_err(|e| anyhow::anyhow!("{e}"))?;
    let (cert, key) = pki
        .issue_server_pem_for_dns(&a.dns)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::create_dir_all(&a.out_dir)?;
    std::fs::write(a.out_dir.join("ca.pem"), pki.root_pem())?;
    std::fs::write(a.out_dir.join("server.pem"), cert)?;
    std::fs::write(a.out_dir.join("server-key.pem"), key)?;
    println!("{}", a.out_dir.display());
    Ok(())
}

fn generate(a: GenArgs) -> anyhow::Result<()> {
    let variant =
        Variant::parse(&a.variant).with_context(|| format!("unknown variant {:?}", a.variant))?;
    let [v1, v2, ratings] = a.backends[..] else {
        bail!("--backends needs exactly three addresses");
    };
    for b in [v1, v2, ratings] {
        if !b.ip().is_loopback() {
            bail!("backend {b} is not on loopback");
        }
    }
    let mut model = Model::new(
        variant,
        &Backends {
            reviews_v1: v1,
            reviews_v2: v2,
            ratings,
            secure: a.tls_backend,
            grpc: a.grpc_backend,
        },
    );
    if variant.tls_origination {
        let ca = a
            .tls_ca
            .as_ref()
            .context("variant tlsorig needs --tls-ca (see `benchtool tls-certs`)")?;
        let ca = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.clone());
        model.tls_ca = Some(ca.display().to_string());
    }
    if let Some(p) = variant.tracing {
        if !a.otel_sink.ip().is_loopback() {
            bail!("--otel-sink {} is not on loopback", a.otel_sink);
        }
        model.tracing = Some((p, a.otel_sink));
    }
    std::fs::create_dir_all(&a.out_dir)?;
    if let Some(mesh) = model.mesh_config() {
        std::fs::write(a.out_dir.join(format!("mesh-{}.yaml", a.variant)), mesh)?;
    }
    let abs = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    let certs = abs(a.certs.clone());
    let params = EnvoyParams {
        hbone_port: a.envoy_hbone_port,
        admin_port: a.envoy_admin_port,
        cert_chain: certs.join("cert-chain.pem").display().to_string(),
        private_key: certs.join("key.pem").display().to_string(),
        root_cert: certs.join("root-cert.pem").display().to_string(),
        access_log: a.envoy_access_log.display().to_string(),
    };
    let wp = a.out_dir.join(format!("waypoint-{}.yaml", a.variant));
    std::fs::write(&wp, model.waypoint_manifests())?;
    let envoy = bootstrap(&model, &params).map_err(anyhow::Error::msg)?;
    let ep = a.out_dir.join(format!("envoy-{}.yaml", a.variant));
    std::fs::write(&ep, envoy)?;
    println!("{}\n{}", wp.display(), ep.display());
    Ok(())
}

/// Parse `/usr/bin/time -v` output.
fn parse_gnu_time(text: &str) -> (Option<f64>, Option<f64>, Option<u64>) {
    let mut cpu = 0.0;
    let mut have_cpu = false;
    let mut wall = None;
    let mut rss = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line
            .strip_prefix("User time (seconds): ")
            .or_else(|| line.strip_prefix("System time (seconds): "))
            && let Ok(x) = v.trim().parse::<f64>()
        {
            cpu += x;
            have_cpu = true;
        } else if let Some(v) = line.strip_prefix("Maximum resident set size (kbytes): ") {
            rss = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("Elapsed (wall clock) time (h:mm:ss or m:ss): ") {
            // m:ss.cc or h:mm:ss
            let parts: Vec<f64> = v.trim().split(':').filter_map(|p| p.parse().ok()).collect();
            wall = Some(parts.iter().fold(0.0, |acc, p| acc * 60.0 + p));
        }
    }
    (have_cpu.then_some(cpu), wall, rss)
}

fn measure(a: MeasureArgs) -> anyhow::Result<()> {
    let gnu_time = PathBuf::from("/usr/bin/time");
    let use_time = gnu_time.is_file();
    let time_out = std::env::temp_dir().join(format!("benchtool-time-{}.txt", std::process::id()));
    let out = std::fs::File::create(&a.output)
        .with_context(|| format!("creating {}", a.output.display()))?;
    let err = out.try_clone()?;
    let mut cmd = if use_time {
        let mut c = Command::new(&gnu_time);
        c.arg("-v").arg("-o").arg(&time_out).args(&a.command);
        c
    } else {
        let mut c = Command::new(&a.command[0]);
        c.args(&a.command[1..]);
        c
    };
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {:?}", a.command))?;
    let pid = child.id();
    let mut peak_polled = 0u64;
    let mut cpu_polled = None;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if !use_time {
            peak_polled = peak_polled.max(procstat::status_kb(pid, "VmHWM").unwrap_or(0));
            cpu_polled = procstat::cpu_seconds(pid).or(cpu_polled);
        }
        if start.elapsed() > a.timeout {
            timed_out = true;
            // Our own child, by PID.
            let _ = child.kill();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall_polled = start.elapsed().as_secs_f64();
    let (cpu, wall, rss) = if use_time {
        let text = std::fs::read_to_string(&time_out).unwrap_or_default();
        let _ = std::fs::remove_file(&time_out);
        let (c, w, r) = parse_gnu_time(&text);
        (c, w.or(Some(wall_polled)), r)
    } else {
        (
            cpu_polled,
            Some(wall_polled),
            (peak_polled > 0).then_some(peak_polled),
        )
    };
    let v = json!({
        "kind": "measure",
        "label": a.label,
        "command": a.command,
        "exit_code": status.and_then(|s| s.code()),
        "timed_out": timed_out,
        "wall_seconds": wall.map(|w| (w * 1000.0).round() / 1000.0),
        "cpu_seconds": cpu,
        "max_rss_kb": rss,
        "method": if use_time { "/usr/bin/time -v" } else { "/proc polling (VmHWM)" },
    });
    println!("{v}");
    Ok(())
}

fn make_report(a: ReportArgs) -> anyhow::Result<()> {
    let r = report::build(&a.dir)?;
    std::fs::write(
        a.dir.join("results.json"),
        serde_json::to_string_pretty(&r.json)?,
    )?;
    let meta = &r.json["meta"];
    let mut header = String::from("## Benchmark results\n\n");
    if let Some(s) = meta["summary_line"].as_str() {
        header.push_str(s);
        header.push_str("\n\n");
    }
    std::fs::write(a.dir.join("results.md"), format!("{header}{}", r.markdown))?;
    std::fs::write(a.dir.join("chart.svg"), &r.svg)?;
    if !r.failures.is_empty() {
        for f in &r.failures {
            eprintln!("benchtool: FAILED: {f}");
        }
        eprintln!("benchtool: the run failed; READMEs left alone");
        println!("{}", a.dir.join("results.md").display());
        std::process::exit(3);
    }
    let block = format!(
        "Latest run ({}; JSON, tables and `chart.svg` in `target/bench/{}/`), reproduce with:\n\n```sh\n{}\n```\n\n{}{}",
        meta["started"].as_str().unwrap_or("?"),
        meta["started"].as_str().unwrap_or("latest"),
        a.command,
        meta["summary_line"]
            .as_str()
            .map(|s| format!("{s}\n\n"))
            .unwrap_or_default(),
        r.markdown.replace("### ", "#### ")
    );
    splice_all(&a.readme, "bench-results", &block);
    println!("{}", a.dir.join("results.md").display());
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn gnu_time_output() {
        let t = "\tUser time (seconds): 1.50\n\tSystem time (seconds): 0.25\n\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02.50\n\tMaximum resident set size (kbytes): 12345\n";
        assert_eq!(parse_gnu_time(t), (Some(1.75), Some(62.5), Some(12345)));
    }
}
