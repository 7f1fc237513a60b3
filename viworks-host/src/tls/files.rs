//! Writing key material to disk: all-or-nothing sets of new files (never overwriting), private
//! files created with mode 0600 from the start, and atomic replacement for renewals.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::TlsError;

/// Mode of files holding secrets: owner read and write only.
pub(crate) const PRIVATE: u32 = 0o600;
/// Mode of files anyone may read (certificates, pins, the environment file).
pub(crate) const PUBLIC: u32 = 0o644;

/// One file to create.
pub(crate) struct NewFile<'a> {
    pub path: PathBuf,
    pub contents: &'a [u8],
    pub mode: u32,
}

/// Creates `dir` (and its parents) with mode 0700 if it does not exist.
pub(crate) fn create_dir(dir: &Path) -> Result<(), TlsError> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| TlsError::io("create directory", dir, e))
}

/// Writes every file in `files`, or none of them: if any path already exists (even as a
/// dangling symlink), nothing is written; if a write fails midway, the files created so far are
/// removed again. Each file is created with its mode (no window where a key is world-readable),
/// flushed to disk, and the directories are synced.
pub(crate) fn write_all_new(files: &[NewFile<'_>]) -> Result<(), TlsError> {
    for file in files {
        match std::fs::symlink_metadata(&file.path) {
            Ok(_) => return Err(TlsError::AlreadyExists { path: file.path.clone() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(TlsError::io("inspect", &file.path, e)),
        }
    }
    let mut written: Vec<&Path> = Vec::with_capacity(files.len());
    for file in files {
        if let Err(err) = write_new(&file.path, file.contents, file.mode) {
            for path in written {
                // Best effort: the original error is the one worth reporting.
                let _ = std::fs::remove_file(path);
            }
            return Err(err);
        }
        written.push(&file.path);
    }
    for file in files {
        if let Some(parent) = file.path.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Replaces `path` atomically with `contents`: writes a sibling temporary file, syncs it, and
/// renames it over `path`. Readers see the old or the new file, never a partial one.
pub(crate) fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // A leftover from a crash is ours to discard.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(TlsError::io("remove", &tmp, e)),
    }
    write_new(&tmp, contents, mode)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(TlsError::io("replace", path, e));
    }
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            TlsError::AlreadyExists { path: path.to_path_buf() }
        } else {
            TlsError::io("create", path, e)
        }
    })?;
    let result = (|| {
        // The umask may have cleared bits of `mode`; it can never add any, so a private file is
        // private from its creation. Setting the mode again makes public files readable too.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(path);
        TlsError::io("write", path, e)
    })
}

fn sync_dir(dir: &Path) -> Result<(), TlsError> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| TlsError::io("sync directory", dir, e))
}

/// Logs a warning if the file at `path` can be read by anyone but its owner.
pub(crate) fn warn_if_not_private(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "private key file is readable by group or others; run chmod 600 on it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_file_stops_the_whole_set_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&b, "old").expect("write");
        let err = write_all_new(&[
            NewFile { path: a.clone(), contents: b"new", mode: PRIVATE },
            NewFile { path: b.clone(), contents: b"new", mode: PRIVATE },
        ])
        .expect_err("b exists");
        assert!(matches!(&err, TlsError::AlreadyExists { path } if *path == b), "{err}");
        assert!(!a.exists(), "nothing is written when any file exists");
        assert_eq!(std::fs::read(&b).expect("read"), b"old");
    }

    #[test]
    fn files_get_their_mode_and_replacement_is_atomic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, cert) = (dir.path().join("k"), dir.path().join("c"));
        write_all_new(&[
            NewFile { path: key.clone(), contents: b"secret", mode: PRIVATE },
            NewFile { path: cert.clone(), contents: b"public", mode: PUBLIC },
        ])
        .expect("writes");
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        replace(&cert, b"renewed", PUBLIC).expect("replaces");
        assert_eq!(std::fs::read(&cert).expect("read"), b"renewed");
        assert!(!dir.path().join("c.tmp").exists());
    }
}
