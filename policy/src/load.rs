//! Reading Kubernetes manifests from files and directories.
//!
//! YAML goes through serde-saphyr with its default budgets (depth, node and byte limits), so a
//! hostile or broken file costs bounded work and never panics. Each document is decoded to a
//! `serde_json::Value` first and then dispatched on `apiVersion`/`kind` by
//! [`Resource::from_value`].

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::ConfigError;
use crate::resources::{Resource, str_at};

/// Parsed resources plus non-fatal findings (unknown kinds skipped, ...).
#[derive(Debug, Clone, Default)]
pub struct LoadedResources {
    pub resources: Vec<Resource>,
    /// Human-readable warnings, each naming the file and the resource.
    pub warnings: Vec<String>,
    /// Where each resource came from, parallel to `resources`: file and document
    /// (`config/mesh.yaml (document 3)`), and its `metadata.resourceVersion` when present.
    pub sources: Vec<ResourceSource>,
}

/// Where one loaded resource came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceSource {
    pub origin: String,
    pub resource_version: Option<String>,
}

/// Load every manifest from files and directories (directories: every `*.yaml`, `*.yml`,
/// `*.json` inside, sorted by name, not recursive, skipping dot-files so Kubernetes
/// ConfigMap mounts with `..data` work). YAML (multi-document `---`), JSON, and `kind: List`
/// are all accepted. Returns every error found, never only the first.
pub fn load_paths(paths: &[PathBuf]) -> Result<LoadedResources, Vec<ConfigError>> {
    let (out, errors) = load_paths_partial(paths);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Everything that loaded, and every error: a document that fails to deserialize does not
/// hide the problems of the others (`waypoint check` compiles what loaded and reports both).
pub fn load_paths_partial(paths: &[PathBuf]) -> (LoadedResources, Vec<ConfigError>) {
    let mut out = LoadedResources::default();
    let mut errors = Vec::new();
    for path in paths {
        let files = match manifest_files(path) {
            Ok(files) => files,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for file in files {
            let origin = file.display().to_string();
            match std::fs::read_to_string(&file) {
                Ok(text) => {
                    let (loaded, e) = parse_manifests_partial(&text, &origin);
                    out.resources.extend(loaded.resources);
                    out.sources.extend(loaded.sources);
                    out.warnings.extend(loaded.warnings);
                    errors.extend(e);
                }
                Err(e) => errors.push(file_error(&origin, format!("cannot read: {e}"))),
            }
        }
    }
    (out, errors)
}

/// The manifest files a path designates: itself, or the matching entries of a directory.
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let origin = path.display().to_string();
    // `metadata` follows symlinks: ConfigMap mounts are symlinks into `..data/`.
    let meta =
        std::fs::metadata(path).map_err(|e| file_error(&origin, format!("cannot read: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries =
        std::fs::read_dir(path).map_err(|e| file_error(&origin, format!("cannot list: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| file_error(&origin, format!("cannot list: {e}")))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let wanted = !name.starts_with('.')
            && [".yaml", ".yml", ".json"]
                .iter()
                .any(|ext| name.ends_with(ext));
        let p = entry.path();
        if wanted && std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

fn file_error(name: &str, message: String) -> ConfigError {
    ConfigError {
        kind: "file".into(),
        namespace: String::new(),
        name: name.into(),
        field: String::new(),
        message,
    }
}

/// Parse one manifest text; `origin` names it in errors (a path, or `<inline>`).
pub fn parse_manifests(text: &str, origin: &str) -> Result<LoadedResources, Vec<ConfigError>> {
    let (out, errors) = parse_manifests_partial(text, origin);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// What parsed, and every error (see [`load_paths_partial`]).
pub fn parse_manifests_partial(text: &str, origin: &str) -> (LoadedResources, Vec<ConfigError>) {
    let mut out = LoadedResources::default();
    let mut errors = Vec::new();
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        match serde_json::from_str::<Value>(trimmed) {
            // A top-level JSON array is a sequence of documents.
            Ok(Value::Array(items)) => {
                for (i, item) in items.into_iter().enumerate() {
                    add_document(item, origin, i + 1, &mut out, &mut errors);
                }
            }
            Ok(value) => add_document(value, origin, 1, &mut out, &mut errors),
            Err(e) => errors.push(file_error(&doc_name(origin, 1), e.to_string())),
        }
    } else {
        let mut number = 0;
        for (first_line, segment) in yaml_segments(text) {
            if !has_content(segment) {
                continue;
            }
            number += 1;
            match serde_saphyr::from_multiple_with_options::<Value>(
                segment,
                serde_saphyr::Options::default(),
            ) {
                Ok(docs) => {
                    let extra = docs.len().saturating_sub(1);
                    for (i, doc) in docs.into_iter().enumerate() {
                        // `...` can end a document without `---`; number those after ours.
                        add_document(doc, origin, number + i, &mut out, &mut errors);
                    }
                    number += extra;
                }
                Err(e) => {
                    // Line numbers are shifted back to the whole file.
                    let message = e.render_with_options(serde_saphyr::render_options! {
                        snippets: serde_saphyr::SnippetMode::Off,
                        line_offset: first_line,
                    });
                    errors.push(file_error(&doc_name(origin, number), message));
                }
            }
        }
    }
    (out, errors)
}

fn doc_name(origin: &str, n: usize) -> String {
    format!("{origin} (document {n})")
}

/// Split a YAML stream at `---` lines, returning each segment with the number of lines before
/// it. Parsing segments separately lets a syntax error name its document, and lets the other
/// documents still be checked. Splitting is sound: a line starting with `---` followed by a
/// space or the end of line is always a document marker in YAML (it may not appear inside a
/// scalar). The `---` line stays in its segment, so `--- {a: 1}` still parses.
fn yaml_segments(text: &str) -> Vec<(u64, &str)> {
    let mut segments = Vec::new();
    let mut start = 0;
    let mut start_line = 0u64;
    let mut offset = 0;
    for (line_no, line) in (0u64..).zip(text.split_inclusive('\n')) {
        let is_marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']));
        if is_marker && offset > start {
            segments.push((start_line, &text[start..offset]));
            start = offset;
            start_line = line_no;
        }
        offset += line.len();
    }
    segments.push((start_line, &text[start..]));
    segments
}

/// Whether a segment holds anything but markers, comments and blank lines.
fn has_content(segment: &str) -> bool {
    segment.lines().any(|l| {
        let l = l.trim();
        !(l.is_empty() || l.starts_with('#') || l == "---" || l == "...")
    })
}

/// Turn one decoded document into resources (expanding `kind: List`).
fn add_document(
    value: Value,
    origin: &str,
    number: usize,
    out: &mut LoadedResources,
    errors: &mut Vec<ConfigError>,
) {
    if value.is_null() {
        return;
    }
    let name = doc_name(origin, number);
    if str_at(&value, &["kind"]) == "List" {
        match value.get("items") {
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    add_object(
                        item.clone(),
                        origin,
                        &format!("{name} item {i}"),
                        out,
                        errors,
                    );
                }
            }
            None => {}
            Some(_) => errors.push(file_error(&name, "List `items` must be a sequence".into())),
        }
        return;
    }
    add_object(value, origin, &name, out, errors);
}

fn add_object(
    value: Value,
    origin: &str,
    name: &str,
    out: &mut LoadedResources,
    errors: &mut Vec<ConfigError>,
) {
    if !value.is_object()
        || str_at(&value, &["apiVersion"]).is_empty()
        || str_at(&value, &["kind"]).is_empty()
    {
        errors.push(file_error(
            name,
            "expected a Kubernetes object (a mapping with apiVersion and kind)".into(),
        ));
        return;
    }
    let resource_version = value
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let mut unknown_fields = Vec::new();
    let parsed = Resource::from_value_checked(value, &mut unknown_fields);
    out.warnings
        .extend(unknown_fields.into_iter().map(|w| format!("{origin}: {w}")));
    match parsed {
        Ok(Resource::Unknown {
            api_version,
            kind,
            namespace,
            name,
        }) => {
            let id = if namespace.is_empty() {
                name
            } else {
                format!("{namespace}/{name}")
            };
            out.warnings.push(format!(
                "{origin}: skipping {kind} {id} ({api_version}): kind or apiVersion not used by the waypoint"
            ));
        }
        Ok(resource) => {
            out.resources.push(resource);
            out.sources.push(ResourceSource {
                origin: name.to_string(),
                resource_version,
            });
        }
        Err(e) => errors.push(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1}\n";

    #[test]
    fn multi_document_yaml_skips_empty_documents() {
        let text = format!(
            "---\n# comment\n---\n{SVC}---\n\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns}}\n"
        );
        let loaded = parse_manifests(&text, "a.yaml").expect("parses");
        let kinds: Vec<_> = loaded.resources.iter().map(|r| r.kind()).collect();
        assert_eq!(kinds, ["Service", "Namespace"]);
    }

    #[test]
    fn json_object_and_array_are_accepted() {
        let one = r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"x"}}"#;
        assert_eq!(
            parse_manifests(one, "a.json")
                .expect("object")
                .resources
                .len(),
            1
        );
        let many = format!("[{one}, {one}]");
        assert_eq!(
            parse_manifests(&many, "a.json")
                .expect("array")
                .resources
                .len(),
            2
        );
    }

    #[test]
    fn list_items_are_expanded() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: b}\n";
        let loaded = parse_manifests(text, "l.yaml").expect("parses");
        assert_eq!(loaded.resources.len(), 2);
    }

    #[test]
    fn unknown_kind_is_a_warning_naming_origin_and_resource() {
        let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: x}\n";
        let loaded = parse_manifests(text, "vs.yaml").expect("parses");
        assert!(loaded.resources.is_empty());
        assert_eq!(loaded.warnings.len(), 1);
        assert!(
            loaded.warnings[0].contains("vs.yaml"),
            "{:?}",
            loaded.warnings
        );
        assert!(
            loaded.warnings[0].contains("VirtualService x/vs"),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn yaml_syntax_error_names_origin_document_and_line() {
        let text = format!("{SVC}---\napiVersion: v1\nkind: Service\nmetadata: {{name: [b}}\n");
        let errs = parse_manifests(&text, "bad.yaml").expect_err("syntax error");
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].kind, "file");
        assert_eq!(errs[0].name, "bad.yaml (document 2)");
        assert!(errs[0].message.contains("line 8"), "{}", errs[0].message);
    }

    #[test]
    fn all_errors_are_collected() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: 3}\n---\n- just a list\n---\nkey: [\n";
        let errs = parse_manifests(text, "x.yaml").expect_err("errors");
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert_eq!(errs[0].kind, "Service");
        assert_eq!(errs[1].name, "x.yaml (document 2)");
        assert_eq!(errs[2].name, "x.yaml (document 3)");
    }

    #[test]
    fn json_syntax_error_names_origin() {
        let errs = parse_manifests("{\"kind\": ", "x.json").expect_err("bad json");
        assert_eq!(errs[0].name, "x.json (document 1)");
        assert!(errs[0].message.contains("line 1"), "{}", errs[0].message);
    }

    #[test]
    fn load_paths_reads_directories_sorted_and_skips_dotfiles() {
        let dir = std::env::temp_dir().join(format!("policy-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..data")).expect("mkdir");
        std::fs::write(
            dir.join("b.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        )
        .expect("write");
        std::fs::write(
            dir.join("a.json"),
            r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"a"}}"#,
        )
        .expect("write");
        std::fs::write(dir.join(".hidden.yaml"), "not: [valid").expect("write");
        std::fs::write(dir.join("notes.txt"), "ignored").expect("write");
        let loaded = load_paths(std::slice::from_ref(&dir)).expect("loads");
        let names: Vec<_> = loaded
            .resources
            .iter()
            .filter_map(|r| r.metadata().map(|m| m.name.clone()))
            .collect();
        assert_eq!(names, ["a", "b"]);
        let missing = dir.join("missing.yaml");
        let errs = load_paths(&[missing.clone(), dir.join("nope")]).expect_err("missing");
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].name, missing.display().to_string());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
