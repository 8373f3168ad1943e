//! A test that needs a privileged port (Envoy's dynamic forward proxy sends a `Host` without
//! a port to port 80, or 443 with TLS) runs itself again inside a network namespace of its
//! own: `unshare -rn` (util-linux) makes a user namespace, where the test is root, and a
//! network namespace with nothing in it but a loopback the test brings up (`ip link set lo
//! up`, iproute2). There it may bind 127.0.0.1:80 without touching the machine's own ports,
//! and nothing it sends can leave. The child is the same test binary running only that test,
//! with [`CHILD_ENV`] set; everything it runs (backends, DNS server, Envoy, the waypoint)
//! runs inside, so whatever needs the network to be fetched (Envoy, dnslib) is fetched by the
//! parent first.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// Set in the child.
pub const CHILD_ENV: &str = "WAYPOINT_TEST_IN_NETNS";

/// Whether this process is the child, inside the namespace (with its loopback up).
pub fn inside() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// In the parent: fetch what the child needs from the network, run `test` (its full name,
/// `module::function`) in a new user and network namespace, and fail with the child's
/// output unless it passes within `timeout`. The child is killed (by its PID) on timeout.
pub async fn run(test: &str, timeout: Duration) -> anyhow::Result<()> {
    crate::envoy::envoy_bin()?;
    crate::dns::prepare()?;
    let exe = std::env::current_exe()?;
    let child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--"])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running unshare (util-linux) to make a network namespace for the test")?;
    let pid = child.id();
    let waited = tokio::time::timeout(
        timeout,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let output = match waited {
        Ok(joined) => joined??,
        Err(_) => {
            // Stop the child this test started, by its PID.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            bail!("{test} did not finish within {timeout:?} in its network namespace");
        }
    };
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!(
            "{test} failed in its network namespace ({}):\n{text}",
            output.status
        );
    }
    // The child's harness must have run exactly this test (a renamed test would otherwise
    // pass by running nothing).
    if !text.contains("1 passed") {
        bail!("{test} did not run in its network namespace:\n{text}");
    }
    Ok(())
}

/// In the child: bring the namespace's loopback up.
pub fn loopback_up() -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("running ip (iproute2) to bring the namespace's loopback up")?;
    if !status.success() {
        bail!("ip link set lo up: {status}");
    }
    Ok(())
}
