//! [`DirCheckpoints`]: named checkpoint blobs as files in a directory, each replaced
//! atomically. Kept out of the log's own store: a checkpoint is a whole copy of a read
//! model, and writing it into sled every few seconds cost a flush that stalled group
//! commits and copies that sled's cache kept (docs/reliability.md, soak).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Checkpoints, StorageError};

/// The directory, inside a log's own directory, that holds its checkpoint files.
pub const CHECKPOINT_DIR: &str = "checkpoints";

/// Named blobs as files `<dir>/<name>.ckpt`, each replaced atomically: written to a
/// temporary file, fsynced, renamed over the old one, and the directory fsynced. A
/// reader sees the old blob or the new one, never a mix; a crash leaves at most a
/// stray temporary file, which the next store replaces.
#[derive(Debug, Clone)]
pub struct DirCheckpoints {
    dir: PathBuf,
}

impl DirCheckpoints {
    /// Checkpoints under `dir`; the directory is created by the first store.
    pub fn new(dir: impl Into<PathBuf>) -> DirCheckpoints {
        DirCheckpoints { dir: dir.into() }
    }

    fn path(&self, name: &str) -> Result<PathBuf, StorageError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(StorageError::InvalidInput(format!(
                "checkpoint name {name:?}: 1 to 64 ASCII letters, digits, '-' or '_'"
            )));
        }
        Ok(self.dir.join(format!("{name}.ckpt")))
    }

    /// The stored blob, or `None` when there is none.
    pub fn load(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let path = self.path(name)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Replaces the blob; durable when this returns.
    pub fn store(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let path = self.path(name)?;
        fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let tmp = self.dir.join(format!("{name}.ckpt.tmp"));
        let mut file = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        file.write_all(bytes).map_err(|e| io(&tmp, e))?;
        file.sync_all().map_err(|e| io(&tmp, e))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))
    }
}

impl Checkpoints for DirCheckpoints {
    fn load_checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.load(name)
    }

    fn store_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
        self.store(name, bytes)
    }
}

fn io(path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Io(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_replaces_the_blob_and_survives_a_new_handle() {
        let dir = tempfile::tempdir().unwrap();
        let c = DirCheckpoints::new(dir.path().join(CHECKPOINT_DIR));
        assert_eq!(c.load("projections").unwrap(), None);
        c.store("projections", b"one").unwrap();
        c.store("projections", b"two").unwrap();
        let again = DirCheckpoints::new(dir.path().join(CHECKPOINT_DIR));
        assert_eq!(
            again.load("projections").unwrap().as_deref(),
            Some(&b"two"[..])
        );
        assert!(!dir
            .path()
            .join(CHECKPOINT_DIR)
            .join("projections.ckpt.tmp")
            .exists());
    }

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = DirCheckpoints::new(dir.path());
        for name in ["", "../x", "a/b", ".ckpt", &"x".repeat(65)] {
            assert!(
                matches!(c.store(name, b"x"), Err(StorageError::InvalidInput(_))),
                "{name:?}"
            );
        }
    }
}
