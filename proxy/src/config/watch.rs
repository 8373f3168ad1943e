//! Watching configuration and certificate files. A poll of file metadata once a second (plus
//! SIGHUP) rather than inotify: it needs no dependency, behaves the same on every filesystem,
//! and sees Kubernetes ConfigMap/Secret updates, which swap the `..data` symlink (the resolved
//! path of every file changes) rather than writing the files in place.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// Files under `path` the loader reads (itself, or `*.yaml|*.yml|*.json` in a directory,
/// skipping dot-entries such as `..data`), sorted.
fn manifest_files(path: &Path) -> Vec<PathBuf> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| {
                            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                            !name.starts_with('.')
                                && (name.ends_with(".yaml")
                                    || name.ends_with(".yml")
                                    || name.ends_with(".json"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files
        }
        _ => vec![path.to_path_buf()],
    }
}

/// A fingerprint of what the files are now: for each file, its resolved path (symlinks
/// followed), length and modification time. Any edit, replacement or `..data` swap changes it.
pub fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for p in paths {
        for f in manifest_files(p) {
            f.hash(&mut h);
            std::fs::canonicalize(&f).ok().hash(&mut h);
            if let Ok(m) = std::fs::metadata(&f) {
                m.len().hash(&mut h);
                m.modified().ok().hash(&mut h);
            } else {
                0u8.hash(&mut h);
            }
        }
    }
    h.finish()
}

/// The certificate files of a certs directory.
pub fn cert_files(dir: &Path) -> Vec<PathBuf> {
    ["cert-chain.pem", "key.pem", "root-cert.pem"]
        .iter()
        .map(|n| dir.join(n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_on_edit_and_on_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // ConfigMap layout: ..2026_a/x.yaml, ..data -> ..2026_a, x.yaml -> ..data/x.yaml
        std::fs::create_dir(d.join("..2026_a")).unwrap();
        std::fs::write(d.join("..2026_a/x.yaml"), "a: 1\n").unwrap();
        std::os::unix::fs::symlink("..2026_a", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/x.yaml", d.join("x.yaml")).unwrap();
        let paths = vec![d.to_path_buf()];
        let f1 = fingerprint(&paths);
        assert_eq!(f1, fingerprint(&paths), "stable when nothing changed");

        std::fs::create_dir(d.join("..2026_b")).unwrap();
        std::fs::write(d.join("..2026_b/x.yaml"), "a: 2\n").unwrap();
        std::os::unix::fs::symlink("..2026_b", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        let f2 = fingerprint(&paths);
        assert_ne!(f1, f2, "a ..data swap is a change");

        std::fs::write(d.join("..2026_b/x.yaml"), "a: 3333\n").unwrap();
        assert_ne!(f2, fingerprint(&paths), "an in-place edit is a change");
    }
}
