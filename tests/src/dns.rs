//! A real DNS server for ServiceEntry `resolution: DNS` tests: dnslib's `DNSServer` (PyPI
//! `dnslib`, fetched once with pip into `target/pylib-cache/`, like Envoy) run by
//! `dns_server.py`, answering from a records file the test rewrites to change an answer.
//! Listens on 127.0.0.1 port 0 (UDP); stopped (stdin closed, then killed by PID) on drop.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, bail};

const DNSLIB_VERSION: &str = "0.9.26";

fn pylib_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target
        .join("pylib-cache")
        .join(format!("dnslib-{DNSLIB_VERSION}"))
}

/// Where dnslib is installed (fetched with pip on first use).
fn dnslib() -> anyhow::Result<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = pylib_dir();
    if !dir.join("dnslib").join("server.py").is_file() {
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
            .arg(&dir)
            .arg(format!("dnslib=={DNSLIB_VERSION}"))
            .status()
            .context("running python3 -m pip install dnslib (python3 and pip are needed for the DNS tests)")?;
        if !status.success() {
            bail!("pip install dnslib=={DNSLIB_VERSION} failed ({status})");
        }
    }
    Ok(dir)
}

/// Fetch dnslib now (a test that runs the server where there is no network).
pub fn prepare() -> anyhow::Result<()> {
    dnslib().map(|_| ())
}

/// One A (or AAAA) record; `ip: "SERVFAIL"` makes every query for the name fail; a name
/// `*.<domain>` answers every name under the domain.
pub struct Record<'a> {
    pub name: &'a str,
    pub ip: &'a str,
    pub ttl: u32,
}

/// A running DNS server.
pub struct DnsServer {
    child: Child,
    stdin: Option<ChildStdin>,
    pub addr: SocketAddr,
    records: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DnsServer {
    pub fn start(records: &[Record<'_>]) -> anyhow::Result<DnsServer> {
        let lib = dnslib()?;
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("dns_server.py");
        std::fs::write(&script, include_str!("dns_server.py"))?;
        let file = dir.path().join("records.json");
        write_records(&file, records)?;
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&file)
            .env("PYTHONPATH", &lib)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the DNS server")?;
        let stdout = child.stdout.take().context("DNS server stdout")?;
        let mut line = String::new();
        // Bounded: the script prints its port once bound, or exits (EOF) on failure.
        BufReader::new(stdout).read_line(&mut line)?;
        let port: u16 = line
            .trim()
            .parse()
            .with_context(|| format!("DNS server did not print its port: {line:?}"))?;
        Ok(DnsServer {
            stdin: child.stdin.take(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            records: file,
            _dir: dir,
        })
    }

    /// Replace every record (the next query sees the new ones).
    pub fn set(&self, records: &[Record<'_>]) -> anyhow::Result<()> {
        write_records(&self.records, records)
    }

    /// How many queries for `name` (any type) the server answered so far.
    pub fn queries(&self, name: &str) -> usize {
        let log = std::fs::read_to_string(self.records.with_extension("json.queries"))
            .unwrap_or_default();
        log.lines()
            .filter(|l| l.split(' ').next() == Some(name))
            .count()
    }
}

fn write_records(path: &Path, records: &[Record<'_>]) -> anyhow::Result<()> {
    let list: Vec<_> = records
        .iter()
        .map(|r| {
            let kind = if r.ip == "SERVFAIL" {
                "SERVFAIL"
            } else if r.ip.contains(':') {
                "AAAA"
            } else {
                "A"
            };
            serde_json::json!({"name": r.name, "type": kind, "ip": r.ip, "ttl": r.ttl})
        })
        .collect();
    // Written whole then renamed, so a query never reads half a file.
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string(&list)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
