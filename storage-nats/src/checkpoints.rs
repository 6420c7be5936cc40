//! [`DirCheckpoints`]: a gateway's projection checkpoints, as files in a local
//! directory (each gateway folds the stream itself, so its checkpoints are its own).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use threadline_storage::{Checkpoints, StorageError};

/// Named blobs as files `<dir>/<name>.ckpt`, replaced atomically (write, fsync,
/// rename, fsync the directory).
#[derive(Debug, Clone)]
pub struct DirCheckpoints {
    dir: PathBuf,
}

impl DirCheckpoints {
    /// Checkpoints under `dir` (created when missing).
    pub fn open(dir: &Path) -> Result<DirCheckpoints, StorageError> {
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        Ok(DirCheckpoints {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> Result<PathBuf, StorageError> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(StorageError::InvalidInput(format!(
                "checkpoint name {name:?} must be ASCII letters, digits, - or _"
            )));
        }
        Ok(self.dir.join(format!("{name}.ckpt")))
    }
}

fn io(path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Io(format!("{}: {e}", path.display()))
}

impl Checkpoints for DirCheckpoints {
    fn load_checkpoint(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let path = self.path(name)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    fn store_checkpoint(&self, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let path = self.path(name)?;
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
