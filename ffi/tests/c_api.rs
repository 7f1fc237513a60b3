//! The C tests in `tests/c/` and the example in `examples/`, compiled with the system C
//! compiler against the static library this build produced, and run under valgrind (leaks and
//! memory errors fail the test) when it is installed.
//!
//! Under `CI=true` a missing valgrind is a failure, not a skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use viworks_core::auth::SpkiPin;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `target/<profile>/`, found from this test's own path (`target/<profile>/deps/c_api-...`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its path");
    exe.parent().and_then(Path::parent).expect("the test runs from target/<profile>/deps").to_path_buf()
}

/// The static library built alongside this test (the library is compiled with all its crate
/// types whenever a test needs it).
fn static_library() -> PathBuf {
    let profile = profile_dir();
    [profile.join("deps/libviworks.a"), profile.join("libviworks.a")]
        .into_iter()
        .filter(|path| path.exists())
        .max_by_key(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no libviworks.a under {}; run `cargo build -p viworks-ffi`", profile.display()))
}

fn out_dir() -> PathBuf {
    let dir = profile_dir().join("viworks-ffi-c-tests");
    std::fs::create_dir_all(&dir).expect("creates the C test directory");
    dir
}

/// Compiles `sources` into the executable `name` with warnings as errors.
fn compile(name: &str, sources: &[PathBuf]) -> PathBuf {
    let out = out_dir().join(name);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .arg("-I")
        .arg(crate_dir().join("tests/c"))
        .args(sources)
        .arg(static_library())
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(status.success(), "compiling {name} failed");
    out
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Runs `program`, under valgrind when it is installed, and fails on a non-zero exit, a
/// memory error or a leak.
fn run(program: &Path, args: &[&Path]) -> String {
    let mut command = if on_path("valgrind") {
        let mut command = Command::new("valgrind");
        command.args([
            "--quiet",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--error-exitcode=1",
        ]);
        command.arg(program);
        command
    } else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "valgrind is not installed; CI must run the C tests under it (apt-get install valgrind)"
        );
        eprintln!("valgrind is not on PATH: running {} without leak and memory checks", program.display());
        Command::new(program)
    };
    let output = command.args(args).output().expect("runs the C program");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        program.display(),
        output.status
    );
    print!("{stdout}");
    stdout
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text<'a>(value: &'a serde_json::Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or_else(|| panic!("vector field {key} is a string"))
}

/// The shared vectors flattened into the lines `tests/c/test_vectors.c` reads, plus a test
/// certificate and its pin for `tests/c/test_primitives.c`.
fn data_file(name: &str) -> PathBuf {
    let path = crate_dir().join("../viworks-core/tests/vectors/v1.json");
    let json = std::fs::read_to_string(&path).expect("reads the shared test vectors");
    let file: serde_json::Value = serde_json::from_str(&json).expect("the vectors parse");
    let session = &file["session"];
    let keys = session["keys"].as_object().expect("session keys");
    let key = |name: &str| keys[name].as_str().expect("a key is hex").to_owned();
    let mut lines = vec![format!("master {}", text(&file, "master_key"))];
    for agent in file["agent_keys"].as_array().expect("agent keys") {
        lines.push(format!("agent_key {} {}", text(agent, "agent_id"), text(agent, "agent_key")));
    }
    lines.push(format!("binding {}", text(session, "channel_binding")));
    lines.push(format!("nonces {} {}", text(session, "agent_nonce"), text(session, "host_nonce")));
    for (name, value) in keys {
        lines.push(format!("key {name} {}", value.as_str().expect("hex")));
    }
    for message in file["messages"].as_array().expect("messages") {
        let (name, sealed) = (text(message, "name"), text(message, "sealed_hex"));
        lines.push(format!("message {name} {} {sealed}", key(text(message, "key"))));
    }
    for rejection in file["rejections"].as_array().expect("rejections") {
        let (name, sealed, error) = (text(rejection, "name"), text(rejection, "sealed_hex"), text(rejection, "error"));
        lines.push(format!("rejection {name} {} {sealed} {error}", key(text(rejection, "key"))));
    }
    let issued = rcgen::generate_simple_self_signed(vec!["host.test".into()]).expect("generates a certificate");
    let pin = SpkiPin::of_certificate_der(issued.cert.der()).expect("the certificate parses");
    lines.push(format!("certificate {} {}", hex(issued.cert.der()), hex(pin.as_bytes())));
    let out = out_dir().join(name);
    std::fs::write(&out, lines.join("\n") + "\n").expect("writes the data file");
    out
}

fn test_source(name: &str) -> PathBuf {
    crate_dir().join("tests/c").join(name)
}

#[test]
fn the_shared_vectors_pass_through_the_c_api_byte_for_byte() {
    let program = compile("test_vectors", &[test_source("test_vectors.c")]);
    let stdout = run(&program, &[&data_file("vectors.txt")]);
    assert!(stdout.contains("11 messages, 10 rejections"), "{stdout}");
}

#[test]
fn keys_sealing_nonce_cache_and_pins_work_from_c_and_refuse_bad_input() {
    let program = compile("test_primitives", &[test_source("test_primitives.c")]);
    run(&program, &[&data_file("primitives.txt")]);
}

#[test]
fn host_and_agent_sessions_run_from_c_and_refuse_forged_and_replayed_messages() {
    let program = compile("test_sessions", &[test_source("test_sessions.c")]);
    run(&program, &[]);
}

#[test]
fn the_host_agent_example_completes_a_session_over_a_socketpair() {
    let program = compile("host_agent", &[crate_dir().join("examples/host_agent.c")]);
    let stdout = run(&program, &[]);
    assert!(stdout.contains("handshake, command, result and close completed"), "{stdout}");
}

/// Every function the header declares is called by a C test or the example.
#[test]
fn every_exported_function_is_exercised_from_c() {
    let header = std::fs::read_to_string(crate_dir().join("include/viworks.h")).expect("reads the header");
    let mut sources = String::new();
    for entry in std::fs::read_dir(crate_dir().join("tests/c")).expect("lists tests/c") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "c") {
            sources += &std::fs::read_to_string(path).expect("reads a C test");
        }
    }
    sources += &std::fs::read_to_string(crate_dir().join("examples/host_agent.c")).expect("reads the example");
    let declared: Vec<&str> = header
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .flat_map(|line| line.match_indices("viw_").map(move |(at, _)| &line[at..]))
        .filter_map(|rest| {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
            rest[end..].starts_with('(').then(|| &rest[..end])
        })
        .collect();
    assert!(declared.len() > 50, "found only {} functions in the header", declared.len());
    let missing: Vec<_> = declared.iter().filter(|name| !sources.contains(&format!("{name}("))).collect();
    assert!(missing.is_empty(), "not called from any C test: {missing:?}");
}
