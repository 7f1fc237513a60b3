//! A throwaway container image for tests against a real Docker engine, which has no images
//! and cannot pull: a root filesystem holding only a static busybox, written as a ustar
//! archive by hand and imported as [`TEST_IMAGE`]. Also the engine check that skips (or,
//! under `CI=true`, fails) when no engine answers, and the guard that removes every
//! container a test created.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use bollard::query_parameters::{CreateImageOptions, RemoveContainerOptions};
use futures_util::StreamExt;
use tokio::sync::OnceCell;
use viworks_gateway::executor::Docker;

/// The engine's socket the tests use.
pub const SOCKET: &str = "/var/run/docker.sock";
/// The image the tests run; imported once per test run, reused when present.
pub const TEST_IMAGE: &str = "viworks-test/busybox:1";
/// Where Debian's `busybox-static` package puts its binary.
const BUSYBOX: &str = "/bin/busybox";
/// Applets linked into the image's `/bin`, so that `sh -c "echo …; sleep …"` finds them.
const APPLETS: &[&str] = &["sh", "echo", "sleep", "cat", "true", "false"];

/// Whether missing prerequisites fail the test (`CI=true`) rather than skip it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips the test with `reason`, or fails it under `CI=true`.
fn skip(reason: &str) {
    assert!(!in_ci(), "CI=true, so this cannot be skipped: {reason}");
    eprintln!("skipped: {reason}");
}

/// A handle on the local engine with [`TEST_IMAGE`] present, or `None` (after printing why)
/// when the test must be skipped. With an engine socket present, panics under `CI=true`
/// instead of skipping.
pub async fn engine() -> Option<Docker> {
    let docker = Docker::new(Some(PathBuf::from(SOCKET)));
    if !std::path::Path::new(SOCKET).exists() {
        // No engine on this machine at all: nothing to test against, even in CI.
        eprintln!("skipped: there is no Docker engine socket at {SOCKET}");
        return None;
    }
    if !docker.available().await {
        skip(&format!("no Docker engine answers on {SOCKET}"));
        return None;
    }
    match IMAGE.get_or_init(import_image).await {
        Ok(()) => Some(docker),
        Err(Missing::Busybox) => {
            skip(&format!("{BUSYBOX} is missing; install Debian's busybox-static package"));
            None
        }
        Err(Missing::Import(err)) => panic!("could not import {TEST_IMAGE}: {err}"),
    }
}

/// Why the test image could not be made.
#[derive(Clone, Debug)]
enum Missing {
    Busybox,
    Import(String),
}

// One import per test binary, shared by tests running in parallel. The cell holds only the
// outcome: each test talks to the engine through its own client and runtime.
static IMAGE: OnceCell<Result<(), Missing>> = OnceCell::const_new();

/// The raw bollard client, for what the verbs do not do (importing, cleaning up).
fn raw_client() -> Result<bollard::Docker, String> {
    bollard::Docker::connect_with_unix(SOCKET, 60, bollard::API_DEFAULT_VERSION).map_err(|e| e.to_string())
}

async fn negotiated() -> Result<bollard::Docker, String> {
    raw_client()?.negotiate_version().await.map_err(|e| e.to_string())
}

async fn import_image() -> Result<(), Missing> {
    let client = negotiated().await.map_err(Missing::Import)?;
    if client.inspect_image(TEST_IMAGE).await.is_ok() {
        return Ok(());
    }
    let busybox = std::fs::read(BUSYBOX).map_err(|_| Missing::Busybox)?;
    let rootfs = rootfs_tar(&busybox);
    let (repo, tag) = TEST_IMAGE.split_once(':').unwrap_or((TEST_IMAGE, "latest"));
    let options = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(repo.into()),
        tag: Some(tag.into()),
        ..Default::default()
    };
    let body = bollard::body_full(hyper::body::Bytes::from(rootfs));
    let mut progress = client.create_image(Some(options), Some(body), None);
    while let Some(step) = progress.next().await {
        step.map_err(|e| Missing::Import(e.to_string()))?;
    }
    client.inspect_image(TEST_IMAGE).await.map(drop).map_err(|e| Missing::Import(e.to_string()))
}

/// A ustar archive of `bin/busybox` (mode 0755) and symlinks to it for [`APPLETS`].
fn rootfs_tar(busybox: &[u8]) -> Vec<u8> {
    let mut tar = Vec::with_capacity(busybox.len() + 8 * 512);
    tar.extend_from_slice(&header("bin/", b'5', 0o755, 0, ""));
    tar.extend_from_slice(&header("bin/busybox", b'0', 0o755, busybox.len(), ""));
    tar.extend_from_slice(busybox);
    tar.resize(tar.len().next_multiple_of(512), 0);
    for applet in APPLETS {
        tar.extend_from_slice(&header(&format!("bin/{applet}"), b'2', 0o777, 0, "busybox"));
    }
    // Two zero blocks end the archive.
    tar.resize(tar.len() + 1024, 0);
    tar
}

/// One 512-byte ustar header.
fn header(name: &str, kind: u8, mode: u32, size: usize, link: &str) -> [u8; 512] {
    fn put(block: &mut [u8; 512], at: usize, bytes: &[u8]) {
        block[at..at + bytes.len()].copy_from_slice(bytes);
    }
    // Octal numbers fill their field but its last byte, which stays NUL.
    fn octal(block: &mut [u8; 512], at: usize, width: usize, value: u64) {
        put(block, at, format!("{value:0w$o}", w = width - 1).as_bytes());
    }
    let mut block = [0u8; 512];
    put(&mut block, 0, name.as_bytes());
    octal(&mut block, 100, 8, u64::from(mode));
    octal(&mut block, 108, 8, 0); // uid
    octal(&mut block, 116, 8, 0); // gid
    octal(&mut block, 124, 12, size as u64);
    octal(&mut block, 136, 12, 0); // mtime
    block[156] = kind;
    put(&mut block, 157, link.as_bytes());
    put(&mut block, 257, b"ustar\x0000");
    // The checksum is the sum of the header's bytes with its own field read as spaces.
    put(&mut block, 148, b"        ");
    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    put(&mut block, 148, format!("{sum:06o}\0 ").as_bytes());
    block
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Names for a test's containers, `viworks-test-<pid>-<n>`, unique across parallel tests
/// and test runs. Every container named through it is removed (forcibly) when it drops,
/// also when the test panics.
#[derive(Debug, Default)]
pub struct Containers {
    names: Vec<String>,
}

impl Containers {
    /// A fresh name, to be removed at drop.
    pub fn name(&mut self) -> String {
        let name = format!("viworks-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        self.names.push(name.clone());
        name
    }

    /// Removes the container `id` (one the engine named) at drop too.
    pub fn adopt(&mut self, id: String) {
        self.names.push(id);
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if self.names.is_empty() || !Path::new(SOCKET).exists() {
            return;
        }
        let names = std::mem::take(&mut self.names);
        // Drop cannot await, and the test's runtime may be shutting down: clean up on a
        // thread with its own runtime, and wait for it.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async {
                let Ok(client) = negotiated().await else { return };
                for name in names {
                    let options = RemoveContainerOptions { force: true, ..Default::default() };
                    // Already removed (404) is the common, good case.
                    let _ = client.remove_container(&name, Some(options)).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}
