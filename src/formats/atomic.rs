//! The one way kiln puts a file in place: write a temporary file beside the destination,
//! fsync it, rename it over the destination, fsync the directory. A reader sees the old file
//! or the whole new one, a crash leaves no half-written file at the destination, and the file
//! survives a power cut once this returns.
//!
//! Files are created with mode 0666 less the process umask (0644 under the usual umask), as
//! `open(2)` does, so other users of a build server can read images and manifests; the
//! temporary name starts with a dot and ends in `.partial`, so leftovers of a killed process
//! are recognisable.

use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tempfile::NamedTempFile;

/// A temporary file beside `dest`, named `.NAME.XXXXXX.partial`, mode 0666 less the umask.
pub fn temp_beside(dest: &Path) -> io::Result<NamedTempFile> {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir_of(dest))
}

/// Puts a finished temporary file at `dest`: fsync, rename, fsync the directory.
pub fn persist(tmp: NamedTempFile, dest: &Path) -> io::Result<()> {
    tmp.as_file().sync_all()?;
    tmp.persist(dest).map_err(|e| e.error)?;
    sync_dir(dir_of(dest))
}

/// Writes `bytes` to `dest` atomically and durably.
pub fn write(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = temp_beside(dest)?;
    tmp.write_all(bytes)?;
    persist(tmp, dest)
}

/// Makes renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn dir_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_with_the_umask_applied_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out.json");
        write(&dest, b"first").unwrap();
        write(&dest, b"second").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"second");
        // The umask of a test process is whatever started it; read it back from the kernel.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|u| u32::from_str_radix(u.trim(), 8).unwrap())
            .unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o666 & !umask);
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["out.json"], "a temporary file was left behind");
        // A temporary that is dropped unpersisted goes away and leaves the destination alone.
        let mut t = temp_beside(&dest).unwrap();
        t.write_all(b"never").unwrap();
        assert!(t.path().file_name().unwrap().to_string_lossy().starts_with(".out.json."));
        drop(t);
        assert_eq!(std::fs::read(&dest).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
