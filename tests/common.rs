//! Helpers every test module shares: a temp dir per test, the kiln binary, external tools as
//! judges (skipped with a message locally when missing, a failure in CI), and the cached Debian
//! root tarball that several areas test against.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A deterministic xorshift64 stream for test data that is neither zeros nor repetitive, so a
/// misplaced or lost block shows.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// The next `len` low bytes of the stream.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// True under CI (`CI=true`): missing tools and slow tests are failures, not skips.
pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

pub fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("NO_COLOR", "1");
    c
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("kiln-test-").tempdir_in(run_dir()).unwrap()
}

/// This run's directory, `kiln-test-run-PID` in the temporary directory: every test directory
/// lives in it, and it goes when the test binary exits. Statics that hold a directory (an image
/// built once for many tests) are never dropped, so without it each run would leave gigabytes
/// behind. A run that was killed leaves its directory; the next run removes it.
static RUN_DIR: OnceLock<PathBuf> = OnceLock::new();

fn run_dir() -> &'static Path {
    RUN_DIR.get_or_init(|| {
        let base = std::env::var_os("KILN_TEST_TMP").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base).unwrap();
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let dead = name
                .strip_prefix("kiln-test-run-")
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if dead {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = base.join(format!("kiln-test-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        extern "C" fn remove_run_dir() {
            if let Some(d) = RUN_DIR.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        // SAFETY: registers a plain function with no captured state; it runs once at exit.
        unsafe { libc::atexit(remove_run_dir) };
        dir
    })
}

/// Finds `name` on PATH or in the sbin directories (e2fsck, debugfs live there). Returns None
/// after printing why when it is missing locally; panics in CI, where every tool must be there.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').map(PathBuf::from).chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    if in_ci() {
        panic!("{name} is not installed; .ci/setup-host should have installed it");
    }
    eprintln!("SKIP: {name} is not installed (run .ci/setup-host)");
    None
}

/// Skips (locally) or fails (CI) unless running as root; for loop-mount oracles.
pub fn require_root(why: &str) -> bool {
    if unsafe_geteuid() == 0 {
        return true;
    }
    if in_ci() {
        panic!("{why} needs root in CI");
    }
    eprintln!("SKIP: {why} needs root");
    false
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Runs a command, panicking with its command line, status and output when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed with {}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// `program` from a Python venv in the cache that `.ci/SETUP` makes (an independent oracle from
/// PyPI), or None locally when it is missing; in CI a missing one fails.
pub fn venv_program(venv: &str, program: &str, setup: &str) -> Option<PathBuf> {
    let p = cache_dir().join(venv).join("bin").join(program);
    if p.is_file() {
        return Some(p);
    }
    assert!(!in_ci(), "{program} missing: .ci/{setup} should have installed it");
    eprintln!("SKIP: {program} not installed (run .ci/{setup})");
    None
}

/// Appends a root-owned entry to a test tarball: a directory when `path` ends with `/`.
pub fn tar_entry(b: &mut tar::Builder<std::fs::File>, path: &str, mode: u32, bytes: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(mode);
    h.set_mtime(1_690_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(if path.ends_with('/') { tar::EntryType::Directory } else { tar::EntryType::Regular });
    b.append_data(&mut h, path, bytes).unwrap();
}

pub fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

/// Where slow, shareable test inputs live between runs (staged Debian roots).
pub fn cache_dir() -> PathBuf {
    let d = std::env::var_os("KILN_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kiln-cache"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The Debian 12 amd64 minbase root with a cloud kernel and systemd, as mmdebstrap writes it
/// (about 11,000 entries). Built once per cache dir; None (locally) when mmdebstrap is missing.
pub fn debian_root_tar() -> Option<PathBuf> {
    static TAR: OnceLock<Option<PathBuf>> = OnceLock::new();
    TAR.get_or_init(|| {
        let out = cache_dir().join("test-debian12-amd64-minbase.tar");
        if out.is_file() {
            return Some(out);
        }
        let mmdebstrap = tool("mmdebstrap")?;
        let mirror = host_debian_mirror().expect("no Debian mirror in the host's apt sources");
        let tmp = out.with_extension("tar.partial");
        run_ok(
            Command::new(mmdebstrap)
                .args([
                    "--quiet",
                    "--variant=minbase",
                    "--include=linux-image-cloud-amd64,systemd-sysv,udev,systemd-boot,initramfs-tools",
                    "--format=tar",
                    "bookworm",
                ])
                .arg(&tmp)
                .arg(format!("deb {mirror} bookworm main"))
                .env("SOURCE_DATE_EPOCH", "1700000000"),
        );
        std::fs::rename(&tmp, &out).unwrap();
        Some(out)
    })
    .clone()
}

/// The build host's Debian mirror, found the way `kiln build` finds it.
pub fn host_debian_mirror() -> Option<String> {
    kiln::stage::debian::host_mirror()
}
