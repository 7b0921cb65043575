//! The archive's state: each candidate suite's InRelease, read with apt's own downloader, tells
//! whether a cached base is current.

use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::{DebianBase, StageError, APT_HELPER};
use crate::manifest::SuiteState;

/// The state of each candidate suite, read from its InRelease with apt's downloader. Nothing is
/// verified here (mmdebstrap verifies what it installs): the digest only tells whether the
/// archive moved. The suite itself must answer; `-updates` and `-security` may be absent (a
/// local or snapshot archive), and are then left out of the sources.
pub fn probe_archive(base: &DebianBase) -> Result<Vec<SuiteState>, StageError> {
    if !Path::new(APT_HELPER).is_file() {
        return Err(StageError::NoAptHelper);
    }
    let dir = tempfile::tempdir().map_err(|source| StageError::Io {
        what: "creating a temporary directory in",
        path: std::env::temp_dir(),
        source,
    })?;
    let candidates = base.candidate_suites();
    let mut cmd = Command::new(APT_HELPER);
    // Files land in a private temporary directory the `_apt` user cannot write to.
    cmd.arg("-o").arg("APT::Sandbox::User=root").arg("download-file");
    for (i, (uri, suite)) in candidates.iter().enumerate() {
        cmd.arg(format!("{uri}/dists/{suite}/InRelease")).arg(dir.path().join(i.to_string()));
    }
    // Exit status is not the verdict: a missing `-updates` is fine, the files present are.
    let out = cmd.stdin(Stdio::null()).output().map_err(|source| StageError::Io {
        what: "running",
        path: APT_HELPER.into(),
        source,
    })?;
    let mut states = Vec::new();
    for (i, (uri, suite)) in candidates.into_iter().enumerate() {
        match std::fs::read(dir.path().join(i.to_string())) {
            Ok(bytes) => states.push(suite_state(uri, suite, &bytes)),
            Err(_) if i > 0 => {}
            Err(_) => {
                let detail = String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .filter(|l| l.starts_with("E:") || l.starts_with("Err:") || l.starts_with("  "))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(StageError::ArchiveUnreachable { uri, suite, detail });
            }
        }
    }
    Ok(states)
}

/// A suite's state from its InRelease (or Release) text.
pub fn suite_state(uri: String, suite: String, in_release: &[u8]) -> SuiteState {
    let text = String::from_utf8_lossy(in_release);
    let date = text.lines().find_map(|l| l.strip_prefix("Date:")).map(|d| d.trim().to_string()).unwrap_or_default();
    SuiteState { uri, suite, date, sha256: hex::encode(Sha256::digest(in_release)) }
}
