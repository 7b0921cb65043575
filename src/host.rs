//! What kiln finds on the build host.

use std::path::{Path, PathBuf};

/// A host program on PATH or in the standard system directories (root's tools such as
/// mmdebstrap live in sbin, which a user's PATH may lack).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}
