//! The digests of the files a recipe names (`[[files]] source`, a tarball base, repository
//! keys, local packages, step scripts): the recipe hash takes each file by its length and
//! SHA-256, and later stages that need a digest again ask the same [`FileDigests`].
//!
//! Where digests come from is the caller's choice: [`ReadEach`] reads every file each time;
//! kiln's build passes its on-disk cache (`kiln::digest_cache`), which remembers digests
//! between runs. The model itself keeps nothing on disk.

use std::fmt;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

/// A file's length and SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest {
    pub len: u64,
    pub sha256: [u8; 32],
}

/// Gives the length and SHA-256 of a file the recipe names.
pub trait FileDigests: fmt::Debug + Send + Sync {
    fn digest(&self, path: &Path) -> io::Result<FileDigest>;
}

/// A shared source of digests (what [`crate::recipe::Recipe::digests`] hands on) is one too.
impl<T: FileDigests + ?Sized> FileDigests for std::sync::Arc<T> {
    fn digest(&self, path: &Path) -> io::Result<FileDigest> {
        (**self).digest(path)
    }
}

/// Reads the whole file each time it is asked: no digest is remembered.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadEach;

impl FileDigests for ReadEach {
    fn digest(&self, path: &Path) -> io::Result<FileDigest> {
        let mut f = std::fs::File::open(path)?;
        digest_of(&mut f)
    }
}

/// The length and SHA-256 of everything `r` gives.
pub fn digest_of(r: &mut impl Read) -> io::Result<FileDigest> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        h.update(&buf[..n]);
    }
    Ok(FileDigest { len, sha256: h.finalize().into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_each_gives_length_and_sha256() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("src");
        std::fs::write(&file, b"payload").unwrap();
        let want = FileDigest { len: 7, sha256: Sha256::digest(b"payload").into() };
        assert_eq!(ReadEach.digest(&file).unwrap(), want);
        assert!(ReadEach.digest(&d.path().join("missing")).is_err());
    }
}
