//! Code health checked inside plain `cargo test`: the dependency direction
//! written in ARCHITECTURE.md, module docs, and the OpenAPI route table.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The names in a manifest's `[dependencies]` table (not dev-dependencies).
fn dependencies(krate: &str) -> Vec<String> {
    let manifest = read(&format!("{krate}/Cargo.toml"));
    let mut out = Vec::new();
    let mut inside = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[dependencies]";
            continue;
        }
        if inside && !line.is_empty() && !line.starts_with('#') {
            if let Some((name, _)) = line.split_once('=') {
                out.push(name.trim().split('.').next().unwrap().to_owned());
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn dependency_direction_holds() {
    let forbidden = |krate: &str, names: &[&str]| {
        let deps = dependencies(krate);
        for name in names {
            assert!(
                !deps.iter().any(|d| d == name),
                "{krate} must not depend on {name} (see ARCHITECTURE.md)"
            );
        }
    };
    // The domain is pure: no runtime, no storage, no wire format.
    forbidden(
        "engine",
        &[
            "tokio",
            "axum",
            "sled",
            "serde_json",
            "bincode",
            "threadline-storage",
            "threadline-projections",
            "threadline-api",
        ],
    );
    // Only storage knows sled; storage knows nothing above it.
    forbidden(
        "storage",
        &[
            "axum",
            "threadline-engine",
            "threadline-projections",
            "threadline-api",
            "serde_json",
        ],
    );
    // Projections know neither HTTP nor sled.
    forbidden(
        "projections",
        &[
            "axum",
            "sled",
            "serde_json",
            "jsonwebtoken",
            "threadline-api",
        ],
    );
    // The API reaches storage only through the log trait: no sled; and the tools'
    // crates (progress bars, an HTTP client) stay in the binary.
    forbidden("api", &["sled", "indicatif", "reqwest", "threadline-cli"]);
    // The binary wires the library crates; it never reaches sled itself.
    forbidden("cli", &["sled", "axum"]);
    // The socket client knows only the wire contract.
    forbidden(
        "client",
        &[
            "axum",
            "sled",
            "threadline-storage",
            "threadline-engine",
            "threadline-projections",
            "threadline-api",
        ],
    );
}

/// The server library is generic over the log: the router, the state and
/// `serve` run over any `EventLog + Checkpoints` (tests run them over
/// `MemoryLog`). Only the binary's wiring (`cli/`) names a concrete log.
#[test]
fn the_api_names_no_concrete_log_type() {
    let mut files = Vec::new();
    rust_files(&root().join("api").join("src"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for concrete in ["SledLog", "MemoryLog", "SalvagedLog", "SledOptions"] {
            assert!(
                !text.contains(concrete),
                "{} names the concrete log type {concrete}; take `L: Log` instead",
                file.display()
            );
        }
    }
}

/// The server library and the binary do not import each other in a cycle, and
/// no module of the server library reaches into the tools.
#[test]
fn the_api_never_reaches_into_the_tools() {
    let mut files = Vec::new();
    rust_files(&root().join("api").join("src"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("crate::tools") && !text.contains("threadline_cli"),
            "{} reaches into the tools",
            file.display()
        );
    }
}

#[test]
fn only_storage_names_sled_in_product_code() {
    for krate in ["engine", "projections", "api", "cli"] {
        let mut files = Vec::new();
        rust_files(&root().join(krate).join("src"), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(
                !text.contains("sled::"),
                "{} uses sled directly",
                file.display()
            );
        }
    }
}

#[test]
fn every_module_says_what_it_is_for() {
    for krate in [
        "storage",
        "engine",
        "projections",
        "api",
        "cli",
        "client",
        "tests",
    ] {
        let mut files = Vec::new();
        rust_files(&root().join(krate).join("src"), &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(
                text.trim_start().starts_with("//!"),
                "{} has no //! doc line",
                file.display()
            );
        }
    }
}

#[test]
fn every_route_is_in_the_openapi_document_and_back() {
    let http = read("api/src/http.rs");
    // `.route("/path", …)`, also where rustfmt put the path on the next line.
    let routes: Vec<&str> = http
        .split(".route(")
        .skip(1)
        .filter_map(|rest| rest.trim_start().strip_prefix('"'))
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    assert!(routes.len() >= 12, "found routes {routes:?}");
    let documented = threadline_api::openapi::spec()["paths"]
        .as_object()
        .expect("paths");
    for route in &routes {
        assert!(
            documented.contains_key(*route),
            "route {route} has no #[utoipa::path] in the OpenAPI document (api/src/openapi.rs)"
        );
    }
    for path in documented.keys() {
        assert!(
            routes.contains(&path.as_str()),
            "{path} is documented but not routed in api/src/http.rs"
        );
    }
}

#[test]
fn no_test_is_ignored() {
    let mut files = Vec::new();
    for krate in [
        "storage",
        "engine",
        "projections",
        "api",
        "cli",
        "client",
        "tests",
    ] {
        rust_files(&root().join(krate), &mut files);
    }
    let marker = ["#[", "ignore]"].concat();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains(&marker), "{} ignores a test", file.display());
    }
}
