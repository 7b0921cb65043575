//! The EC2 instance-store bundle (the format of `ec2-bundle-image`, manifest version
//! 2007-10-10), written and read without the Ruby AMI tools.
//!
//! A bundle is: the raw image as one member of a GNU tar stream (sparse, so holes are neither
//! read nor stored) → SHA-1 of that tar stream → gzip → AES-128-CBC with PKCS#7 padding (what
//! `openssl enc -aes-128-cbc -K KEY -iv IV` writes: no salt header) → 10 MiB parts
//! `NAME.part.N` → `NAME.manifest.xml`, which carries the key and IV RSA-wrapped for EC2 and for
//! the user, per-part SHA-1 digests and an RSA/SHA-1 signature by the user's key.
//!
//! Writing is one streaming pass with bounded memory; compression runs on all cores (see
//! [`gzip`]). Reading verifies the signature, every part digest and the tar digest before the
//! restored image is moved to its final name.

mod aes_cbc;
mod gzip;
mod keys;
mod manifest;
mod read;
mod tar;
mod write;

pub use aes_cbc::Encryptor;
pub use keys::{load_certificate_key, load_private_key, Credentials};
pub use manifest::{BundleManifest, PartEntry, MANIFEST_VERSION};
pub use read::{unbundle, UnbundleSummary};
pub use write::{bundle, BundleSpec, BundleSummary, Secrets};

use std::path::PathBuf;

/// Size of every part but the last: 10 MiB, the part size `ec2-bundle-image` writes and EC2's
/// unbundler expects.
pub const PART_SIZE: u64 = 10 * 1024 * 1024;

/// Errors of the bundle format; messages are lowercase and carry the values that explain them.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{what} {path}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("the user certificate and the user private key do not belong together (their RSA moduli differ); pass the certificate that was issued for this key")]
    KeyMismatch,
    #[error("account id {0:?} is not a 12-digit AWS account number")]
    Account(String),
    #[error("bundle name {0:?} is not usable as a file name (empty, or contains '/' or NUL)")]
    Name(String),
    #[error("rsa: {0}")]
    Rsa(String),
    #[error("manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("manifest signature does not verify with the given user key: the manifest was altered or signed with another key")]
    Signature,
    #[error("part {index} ({path}) is missing; a bundle needs all {count} parts beside its manifest")]
    MissingPart { index: usize, count: usize, path: PathBuf },
    #[error("part {index} ({path}) is damaged: SHA-1 {actual}, the manifest says {expected}")]
    PartDigest { index: usize, path: PathBuf, expected: String, actual: String },
    #[error("the decrypted stream is corrupt: {0}")]
    Corrupt(String),
    #[error("the tar stream's SHA-1 is {actual}, the manifest says {expected}")]
    TarDigest { expected: String, actual: String },
    #[error("a compression worker stopped unexpectedly")]
    Worker,
}

pub type Result<T> = std::result::Result<T, BundleError>;

pub(crate) fn io_err(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> BundleError {
    let path = path.into();
    move |source| BundleError::Io { what, path, source }
}
