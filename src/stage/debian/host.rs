//! What the build host offers staging: its apt sources' mirrors and whether it can run the
//! target architecture's programs.

use std::path::{Path, PathBuf};

use super::StageError;
use crate::platform::Arch;

/// Fails early, with what to install, when the host cannot run the target's binaries.
pub fn check_can_execute(target: Arch) -> Result<(), StageError> {
    let host = Arch::host();
    if host == Some(target) {
        return Ok(());
    }
    let entry = match target {
        Arch::Arm64 => "/proc/sys/fs/binfmt_misc/qemu-aarch64",
        Arch::X86_64 => "/proc/sys/fs/binfmt_misc/qemu-x86_64",
    };
    let enabled = std::fs::read_to_string(entry).map(|s| s.lines().next() == Some("enabled")).unwrap_or(false);
    if enabled {
        Ok(())
    } else {
        Err(StageError::CannotExecute { host: std::env::consts::ARCH.to_string(), target })
    }
}

/// The first Debian archive URI in the build host's apt sources (deb822 `.sources` files or
/// one-line `sources.list`), skipping the security archive.
pub fn host_mirror() -> Option<String> {
    host_mirror_in(Path::new("/etc/apt"))
}

/// The Debian security archive URI in the build host's apt sources, if it has one.
pub fn host_security_mirror() -> Option<String> {
    host_uri_in(Path::new("/etc/apt"), |u| u.ends_with("/debian-security"))
}

pub fn host_mirror_in(apt_dir: &Path) -> Option<String> {
    host_uri_in(apt_dir, |u| !u.contains("security") && u.ends_with("/debian"))
}

/// The first archive URI in the apt sources under `apt_dir` that `want` accepts.
fn host_uri_in(apt_dir: &Path, want: impl Fn(&str) -> bool) -> Option<String> {
    let mut files = vec![apt_dir.join("sources.list")];
    if let Ok(rd) = std::fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("list" | "sources")))
            .collect();
        v.sort();
        files.extend(v);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        for line in text.lines() {
            let line = line.trim();
            let uris: Vec<&str> = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().collect()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                // `deb [options] URI suite components`
                let mut words = rest.split_whitespace().skip_while(|w| w.starts_with('['));
                let first = words.next();
                // An option list may span words: `[arch=amd64 signed-by=...]`.
                match first {
                    Some(w) if w.ends_with(']') => words.next().into_iter().collect(),
                    Some(w) => vec![w],
                    None => vec![],
                }
            } else {
                vec![]
            };
            for u in uris {
                let u = u.trim_end_matches('/');
                if want(u) {
                    return Some(u.to_string());
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_and_one_line_sources() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sources.list.d")).unwrap();
        std::fs::write(
            d.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\nTypes: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n",
        )
        .unwrap();
        assert_eq!(host_mirror_in(d.path()).as_deref(), Some("http://mirror.example/debian"));
        let e = tempfile::tempdir().unwrap();
        std::fs::write(
            e.path().join("sources.list"),
            "# c\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n",
        )
        .unwrap();
        assert_eq!(host_mirror_in(e.path()).as_deref(), Some("http://m.example/debian"));
        let f = tempfile::tempdir().unwrap();
        assert_eq!(host_mirror_in(f.path()), None);
    }
}
