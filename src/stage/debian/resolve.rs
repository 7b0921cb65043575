//! What apt resolves a base's package list to at one state of the archive: the packages and
//! versions a staging would install, as mmdebstrap's own simulation (apt's solver) reports
//! them, never worked out by kiln.
//!
//! Debian re-signs suites without any package changing (the security suite at least weekly,
//! for its `Valid-Until`), so the archive's signature changes more often than any base. The
//! same resolution is the same base: a base is staged again exactly when a package it holds
//! changed.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::{mmdebstrap_command, run_mmdebstrap, tail, DebianBase, StageError};
use crate::manifest::SuiteState;

/// The packages a staging installs, as `NAME VERSION ARCH`, sorted and de-duplicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    packages: Vec<String>,
}

impl Resolution {
    /// Hex SHA-256 over the base's inputs and every resolved package version.
    pub fn key(&self, inputs_key: &str) -> String {
        let mut h = Sha256::new();
        h.update(b"kiln-resolution-v1\0");
        h.update(inputs_key.as_bytes());
        for p in &self.packages {
            h.update([0]);
            h.update(p.as_bytes());
        }
        hex::encode(h.finalize())
    }

    pub fn len(&self) -> usize {
        self.packages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packages.is_empty()
    }

    /// Whether every package installed in the staged tarball at `tar` is one this resolution
    /// names, at its version and architecture.
    pub fn holds_all_installed(&self, tar: &Path) -> std::io::Result<bool> {
        use std::io::Read;
        let mut archive = tar::Archive::new(std::fs::File::open(tar)?);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            if path.strip_prefix(".").unwrap_or(&path) != Path::new("var/lib/dpkg/status") {
                continue;
            }
            let mut text = String::new();
            entry.read_to_string(&mut text)?;
            let installed = super::parse_dpkg_status(&text);
            return Ok(!installed.is_empty()
                && installed
                    .iter()
                    .all(|p| self.packages.binary_search(&format!("{} {} {}", p.name, p.version, p.arch)).is_ok()));
        }
        Ok(false)
    }

    /// Whether every requested package is among the resolved ones: a simulation whose output
    /// kiln did not understand must never pass for "nothing changed".
    fn covers(&self, requested: &[String]) -> bool {
        requested.iter().all(|r| {
            let name = r.split([':', '=', '/']).next().unwrap_or(r);
            self.packages.iter().any(|p| p.split(' ').next() == Some(name))
        })
    }
}

/// The resolution in apt's simulation output: `Inst NAME [OLD] (VERSION RELEASE [ARCH])`
/// lines. mmdebstrap simulates the essential set and the rest separately, so a package can be
/// listed twice; it counts once.
pub fn parse_simulation(log: &str) -> Resolution {
    let mut packages: Vec<String> = log
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Inst ")?;
            let name = rest.split(' ').next()?;
            let inner = &rest[rest.find('(')? + 1..];
            let inner = &inner[..inner.find(')')?];
            let version = inner.split(' ').next()?;
            let arch = inner.rsplit_once('[').and_then(|(_, a)| a.strip_suffix(']'))?;
            Some(format!("{name} {version} {arch}"))
        })
        .collect();
    packages.sort();
    packages.dedup();
    Resolution { packages }
}

/// Asks apt (through `mmdebstrap --simulate`) what `base` resolves to at the archive state
/// `archive`. Downloads the suites' package lists, installs nothing. None when the simulation's
/// output does not account for every requested package (then nothing may be concluded).
pub fn resolve(mmdebstrap: &Path, base: &DebianBase, archive: &[SuiteState]) -> Result<Option<Resolution>, StageError> {
    let mut cmd = mmdebstrap_command(mmdebstrap, base, archive, None, Default::default());
    let cmdline = format!("{cmd:?}");
    let (status, log) = run_mmdebstrap(&mut cmd, |_| {}).map_err(|source| StageError::Io {
        what: "running mmdebstrap --simulate for",
        path: mmdebstrap.to_path_buf(),
        source,
    })?;
    if !status.success() {
        return Err(StageError::Resolve { cmd: cmdline, status: status.to_string(), tail: tail(log.lines(), 25) });
    }
    let r = parse_simulation(&log);
    Ok((!r.is_empty() && r.covers(&base.packages)).then_some(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as mmdebstrap 1.3.5 --simulate --verbose printed them for bookworm.
    const SIMULATION: &str = "\
I: simulate downloading packages with apt...
Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])
Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []
Inst base-files (12.4+deb12u15 Debian:12.15/oldstable [amd64])
Conf libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64])
I: simulate installing remaining packages inside the chroot...
Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []
Inst tzdata [2024a-0+deb12u1] (2025b-0+deb12u2 Debian:12.15/oldstable-updates [all])
Inst systemd-boot (252.39-1~deb12u1 Debian-Security:12/oldstable-security [amd64])
";

    #[test]
    fn the_simulation_gives_each_package_once_with_its_version() {
        let r = parse_simulation(SIMULATION);
        assert_eq!(
            r.packages,
            [
                "base-files 12.4+deb12u15 amd64",
                "gcc-12-base 12.2.0-14+deb12u1 amd64",
                "libc6 2.36-9+deb12u14 amd64",
                "systemd-boot 252.39-1~deb12u1 amd64",
                "tzdata 2025b-0+deb12u2 all",
            ]
        );
        assert!(r.covers(&["systemd-boot".into(), "tzdata:all".into()]));
        assert!(!r.covers(&["systemd-boot".into(), "openssh-server".into()]));
    }

    #[test]
    fn the_key_follows_versions_not_release_labels() {
        let k = parse_simulation(SIMULATION).key("inputs");
        // A re-signed archive with a new point-release label: the same packages, the same key.
        let relabelled = SIMULATION.replace("12.15/oldstable", "12.16/oldstable");
        assert_eq!(parse_simulation(&relabelled).key("inputs"), k);
        let bumped = SIMULATION.replace("252.39-1~deb12u1", "252.40-1~deb12u1");
        assert_ne!(parse_simulation(&bumped).key("inputs"), k);
        assert_ne!(parse_simulation(SIMULATION).key("other inputs"), k);
        assert!(parse_simulation("I: nothing\n").is_empty());
    }
}
