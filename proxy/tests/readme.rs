//! Every `waypoint` command the README shows a user, run as the README spells it (read out of
//! README.md, so a renamed flag, subcommand or example file breaks this test instead of the
//! reader). The demo and test lines, the benchmark's quick look and the Dockerfile's build
//! line are run by CI (`.ci/run`, `.ci/readme-commands`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).unwrap()
}

/// The body of every fenced block (any language) under the heading `heading` (any level),
/// up to the next heading of the same or a higher level.
fn blocks_under(text: &str, heading: &str) -> Vec<String> {
    let mut lines = text.lines();
    let level = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("README.md has no heading {heading:?}"));
        let hashes = line.bytes().take_while(|&b| b == b'#').count();
        if hashes > 0 && line[hashes..].trim() == heading {
            break hashes;
        }
    };
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in lines {
        if current.is_none() {
            let hashes = line.bytes().take_while(|&b| b == b'#').count();
            if hashes > 0 && hashes <= level && line.as_bytes().get(hashes) == Some(&b' ') {
                break;
            }
        }
        if line.starts_with("```") {
            match current.take() {
                Some(b) => blocks.push(b),
                None => current = Some(String::new()),
            }
        } else if let Some(b) = current.as_mut() {
            b.push_str(line);
            b.push('\n');
        }
    }
    assert!(
        !blocks.is_empty(),
        "README.md: no code block under {heading:?}"
    );
    blocks
}

/// Shell-like lines of a block: `\` continuations joined, `  # comments` removed.
fn command_lines(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut acc = String::new();
    for line in block.lines() {
        let line = match line.find("  #") {
            Some(i) => &line[..i],
            None => line,
        };
        let line = line.trim_end();
        if let Some(part) = line.strip_suffix('\\') {
            acc.push_str(part);
            acc.push(' ');
        } else {
            acc.push_str(line);
            if !acc.trim().is_empty() {
                out.push(acc.trim().to_string());
            }
            acc.clear();
        }
    }
    out
}

/// Split a command line into words (the README's commands use no quoting).
fn words(line: &str) -> Vec<String> {
    assert!(
        !line.contains(['"', '\'', '$', '|', ';']),
        "the README's waypoint commands are plain words: {line}"
    );
    line.split_whitespace().map(str::to_string).collect()
}

#[test]
fn the_running_it_commands_work_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("wp-certs");
    let block = &blocks_under(&readme(), "Running it")[0];
    let lines = command_lines(block);
    assert!(
        lines.iter().any(|l| l.starts_with("cargo build --release")),
        "{lines:?}"
    );
    let mut ran = Vec::new();
    for line in &lines {
        let Some(rest) = line.strip_prefix("target/release/waypoint ") else {
            assert!(line.starts_with("cargo "), "unexpected command: {line}");
            continue;
        };
        let args: Vec<String> = words(rest)
            .into_iter()
            .map(|w| w.replace("/tmp/wp-certs", certs.to_str().unwrap()))
            .collect();
        match args[0].as_str() {
            "run" => run_until_ready_then_drain(&args),
            _ => {
                let out = Command::new(BIN)
                    .args(&args)
                    .current_dir(root())
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{line}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        ran.push(args[0].clone());
    }
    assert_eq!(
        ran,
        ["certs", "check", "run"],
        "the README's commands changed"
    );
}

/// `waypoint run` with the README's flags, its fixed ports swapped for port 0 (tests run side
/// by side), until ready; then SIGTERM drains it and it exits 0.
#[allow(clippy::zombie_processes)] // killed and waited below on every path
fn run_until_ready_then_drain(args: &[String]) {
    let args: Vec<String> = args
        .iter()
        .map(|a| match a.split_once(':') {
            Some(("127.0.0.1", port)) if port.parse::<u16>().is_ok() => "127.0.0.1:0".to_string(),
            _ => a.clone(),
        })
        .collect();
    let mut child = Command::new(BIN)
        .args(&args)
        .args(["--admin-addr", "127.0.0.1:0"])
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let serving = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("waypoint serving") => break Some(line),
            Ok(_) => continue,
            Err(_) => break None,
        }
    };
    let Some(serving) = serving else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("waypoint run {args:?} did not start serving");
    };
    assert!(serving.contains("ready_addr=127.0.0.1:"), "{serving}");
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("waypoint run did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit after SIGTERM: {exit:?}");
}

/// The usage block: every subcommand, flag and environment variable it lists exists in the
/// binary's own `--help`.
#[test]
fn every_flag_and_variable_in_the_usage_block_exists() {
    let text = readme();
    let block = blocks_under(&text, "Running it")
        .into_iter()
        .find(|b| b.starts_with("waypoint run"))
        .expect("the usage block starts with `waypoint run`");
    let mut sub = String::new();
    let mut checked = 0;
    for line in block.lines() {
        if let Some(rest) = line.strip_prefix("waypoint ") {
            sub = rest.split_whitespace().next().unwrap().to_string();
        }
        let help = Command::new(BIN)
            .args([sub.as_str(), "--help"])
            .output()
            .unwrap();
        assert!(help.status.success(), "waypoint {sub} --help failed");
        let help = String::from_utf8_lossy(&help.stdout);
        for w in line.split(|c: char| c.is_whitespace() || "[]()".contains(c)) {
            let w = w.trim_end_matches([',', '.']);
            let is_flag = w.starts_with("--") && w.len() > 2;
            let is_short = w.len() == 2 && w.starts_with('-') && w != "--";
            let is_env = w.starts_with("WAYPOINT_") && w.len() > 9;
            if is_flag || is_short || is_env {
                assert!(
                    help.contains(w),
                    "README usage names {w} for `waypoint {sub}`, which its --help lacks:\n{help}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "only {checked} flags and variables found");
}

/// `$ waypoint services ...` prints exactly the table the README shows.
#[test]
fn the_services_example_prints_what_the_readme_shows() {
    let block = &blocks_under(&readme(), "Which Services, and why: `waypoint services`")[0];
    let (cmd, shown) = block.split_once('\n').unwrap();
    let args = words(cmd.strip_prefix("$ waypoint ").unwrap());
    let out = Command::new(BIN)
        .args(&args)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), shown);
}

/// `$ waypoint explain ...` as shown: valid configuration, exit 0, the route it explains.
#[test]
fn the_explain_example_runs_as_shown() {
    let block = &blocks_under(&readme(), "What happens to one request: `waypoint explain`")[0];
    let lines = command_lines(block);
    let args = words(lines[0].strip_prefix("$ waypoint ").unwrap());
    let out = Command::new(BIN)
        .args(&args)
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("MATCHED (chosen)"), "{stdout}");
    assert!(stdout.contains("proxied to"), "{stdout}");
}
