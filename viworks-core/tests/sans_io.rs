//! The core stays sans-IO: nothing in its dependency tree or its code opens sockets, starts
//! runtimes or threads, reads a clock or draws from a global random generator.

use std::path::Path;
use std::process::Command;

/// Crates that bring an async runtime, sockets or OS randomness.
const FORBIDDEN_CRATES: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "async-std",
    "smol",
    "async-io",
    "futures-io",
    "getrandom",
    "rand",
    "rand_core",
    "ring",
    "libc",
    "nix",
    "rustix",
];

/// Calls that reach the operating system for time, threads, files, processes or randomness.
const FORBIDDEN_CALLS: &[&str] = &[
    "SystemTime::now",
    "Instant::now",
    "UNIX_EPOCH",
    "std::net",
    "std::thread",
    "std::fs",
    "std::process",
    "std::env",
    "RandomState",
    "thread_rng",
    "OsRng",
    "tokio::",
    "unsafe ",
];

#[test]
fn no_runtime_socket_or_os_randomness_crate_is_in_the_dependency_tree() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let output = Command::new(env!("CARGO"))
        .args(["tree", "--edges", "normal,build", "--prefix", "none", "--format", "{p}", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("cargo tree runs");
    assert!(output.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&output.stderr));
    let tree = String::from_utf8(output.stdout).expect("utf-8");
    let crates: Vec<&str> = tree.lines().filter_map(|line| line.split_whitespace().next()).collect();
    assert!(crates.contains(&"blake3"), "the tree was read: {crates:?}");
    for forbidden in FORBIDDEN_CRATES {
        assert!(!crates.contains(forbidden), "viworks-core depends on {forbidden}:\n{tree}");
    }
}

#[test]
fn no_source_file_reaches_for_a_clock_thread_socket_or_global_rng() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    collect_rust_files(&src, &mut files);
    assert!(files.len() > 5, "the sources were found: {files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for call in FORBIDDEN_CALLS {
                assert!(!code.contains(call), "{}:{}: `{call}` in the sans-IO core", file.display(), number + 1);
            }
        }
    }
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    assert!(lib.contains("#![forbid(unsafe_code)]"));
}

fn collect_rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect_rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}
