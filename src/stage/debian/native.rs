//! Host-native tools for a foreign staging. Under qemu-user every process a maintainer script
//! starts costs ~30 ms of emulator start-up before it does anything, and the shell between
//! them runs emulated too: `mkinitramfs` alone starts ~3,800 processes (realpath, readlink,
//! cp, mkdir for every module it copies), 168 s of an arm64 staging. None of those programs
//! depends on the architecture it runs on: the host's own build of the same tool does the same
//! thing. So while packages are configured, the chroot's shell and its file tools are the
//! host's binaries, and the emulated ones are put back before anything is packed.
//!
//! The host's binaries need the host's loader and libraries. They go where nothing in the
//! chroot looks (the loader at [`LOADER`], the libraries in the host's multiarch directory,
//! which a foreign chroot does not have), and each binary's program interpreter is rewritten
//! to [`LOADER`]: the host's own path (`/lib64/…`) would put a `/lib64` into the chroot, and
//! `mkinitramfs` copies every `/lib*` it finds into the initramfs.
//!
//! What could go wrong is a host binary copied into the image, by a hook that copies a tool
//! (`copy_exec /bin/cat`) while it is swapped. So every file the staged base holds, and every
//! file of every initramfs in it, is checked against the exact bytes put in ([`Leak`]); a base
//! that holds any is not used (see `run_staging`, which stages again, emulated).

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::platform::Arch;

/// The tools that run natively: the shell and the file tools maintainer scripts and
/// initramfs-tools start most often (counted in an arm64 staging, 2026-12-07). Nothing that
/// says which architecture it runs on (uname, dpkg, ldd) and nothing built for the image.
const TOOLS: &[&str] = &[
    "dash", "realpath", "readlink", "cp", "mkdir", "sed", "basename", "dirname", "find", "ln", "rm", "mktemp", "tsort",
    "env", "grep", "cat", "sort", "gzip", "cpio", "touch", "chmod", "mv", "cut", "head", "tail", "tr", "wc", "rmdir",
];

/// Where the host's loader goes in the chroot; no longer than any loader path it replaces.
const LOADER: &str = "/usr/lib/kiln-ld.so";

/// Set to `0` to stage a foreign architecture fully emulated.
pub const SWITCH: &str = "KILN_NATIVE_TOOLS";

/// The host's tools, prepared for a chroot of another architecture.
#[derive(Debug, Clone)]
pub struct NativeTools {
    /// Tool name and host path.
    tools: Vec<(String, PathBuf)>,
    /// The host's loader.
    loader: PathBuf,
    /// Every library the tools need, by host path (libeatmydata too: dpkg runs its children
    /// with it preloaded).
    libs: BTreeSet<PathBuf>,
    /// The host's multiarch library directory in the chroot (`/usr/lib/x86_64-linux-gnu`).
    lib_dir: String,
}

/// The host tools for staging `target` (`eatmydata`: dpkg runs under it); None when the host
/// runs `target` natively anyway, the switch is off, or the host lacks what they need (then
/// everything runs emulated, as before).
pub fn plan(target: Arch, eatmydata: bool) -> Option<NativeTools> {
    if Arch::host() == Some(target) || std::env::var(SWITCH).is_ok_and(|v| v == "0") {
        return None;
    }
    host_tools(eatmydata)
}

fn host_tools(eatmydata: bool) -> Option<NativeTools> {
    let mut tools = Vec::new();
    let (mut libs, mut loader) = (BTreeSet::new(), None);
    for name in TOOLS {
        let Some(path) = crate::host::find_program(name).and_then(|p| p.canonicalize().ok()) else { continue };
        let out = Command::new("ldd").arg(&path).output().ok()?;
        let (l, needs) = parse_ldd(&String::from_utf8_lossy(&out.stdout))?;
        loader.get_or_insert(l);
        libs.extend(needs);
        tools.push((name.to_string(), path));
    }
    let loader = loader?;
    // The host's multiarch directory, where its libc is (`/lib/x86_64-linux-gnu`).
    let host_dir = libs.iter().find(|p| p.file_name().is_some_and(|n| n == "libc.so.6"))?.parent()?.to_path_buf();
    let lib_dir = format!("/usr/lib/{}", host_dir.file_name()?.to_str()?);
    if LOADER.len() >= loader.as_os_str().len() || !tools.iter().any(|(n, _)| n == "dash") {
        return None;
    }
    if eatmydata {
        // eatmydata preloads its library into dpkg and every process under it: the host's
        // build of it must be there for the host's tools, or each would print a loader error.
        let preload =
            ["", "/usr"].iter().map(|u| Path::new(&format!("{u}{}", host_dir.display())).join("libeatmydata.so"));
        libs.insert(preload.into_iter().find(|p| p.exists())?);
    }
    Some(NativeTools { tools, loader, libs, lib_dir })
}

/// The loader and the libraries `ldd` names (`libc.so.6 => /lib/…/libc.so.6 (0x…)`); None for
/// output that is not a dynamic executable's.
fn parse_ldd(text: &str) -> Option<(PathBuf, Vec<PathBuf>)> {
    let (mut loader, mut libs) = (None, Vec::new());
    for line in text.lines().map(str::trim) {
        if let Some((_, rest)) = line.split_once(" => ") {
            let path = rest.split(" (").next()?.trim();
            if !path.starts_with('/') {
                return None; // "not found"
            }
            libs.push(PathBuf::from(path));
        } else if line.starts_with('/') {
            loader = Some(PathBuf::from(line.split(" (").next()?));
        }
    }
    Some((loader?, libs))
}

/// The prepared files and the hooks that swap them in and out, in a directory of their own.
pub struct Prepared {
    dir: tempfile::TempDir,
    /// Content digest to the name it was put in under, for the leak check.
    put_in: HashMap<[u8; 32], String>,
}

impl NativeTools {
    /// Writes the tools (their interpreter rewritten), loader, libraries and the two hook
    /// scripts under `parent`.
    pub fn prepare(&self, parent: &Path) -> std::io::Result<Prepared> {
        let dir = tempfile::Builder::new().prefix("native-tools.").tempdir_in(parent)?;
        let (bin, lib) = (dir.path().join("bin"), dir.path().join("lib"));
        std::fs::create_dir(&bin)?;
        std::fs::create_dir(&lib)?;
        let mut put_in = HashMap::new();
        let mut keep = |path: &Path, bytes: &[u8], name: &str| -> std::io::Result<()> {
            std::fs::write(path, bytes)?;
            put_in.insert(Sha256::digest(bytes).into(), name.to_string());
            Ok(())
        };
        for (name, host) in &self.tools {
            let mut exe = std::fs::read(host)?;
            kiln_formats::elf::set_interpreter(&mut exe, LOADER).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", host.display()))
            })?;
            keep(&bin.join(name), &exe, &format!("/usr/bin/{name}"))?;
        }
        keep(&dir.path().join("ld.so"), &std::fs::read(&self.loader)?, LOADER)?;
        for l in &self.libs {
            let name = l.file_name().unwrap_or_default().to_string_lossy();
            keep(&lib.join(&*name), &std::fs::read(l)?, &format!("{}/{name}", self.lib_dir))?;
        }
        let src = shell_quote(dir.path());
        let tools: Vec<&str> = self.tools.iter().map(|(n, _)| n.as_str()).collect();
        let (libdir, tools) = (&self.lib_dir, tools.join(" "));
        // It runs three times: once the essential packages are extracted (the shell,
        // coreutils), again once dpkg has installed them over what it put in, and before the
        // initramfs (cpio came with the remaining packages). A tool that is not the host's
        // build (yet, or again) is put aside and replaced; one that is stays.
        let swap_in = format!(
            "set -eu\nroot=$1\nsrc={src}\n\
             if [ ! -e \"$src/active\" ]; then\n\
             \x20 if [ -e \"$root{libdir}\" ] || [ -e \"$root{LOADER}\" ]; then\n\
             \x20   echo \"W: kiln: $root{libdir} exists: the host's tools are not used\" >&2; exit 0\n\
             \x20 fi\n\
             \x20 mkdir \"$root{libdir}\" && cp \"$src\"/lib/* \"$root{libdir}/\" && cp \"$src/ld.so\" \"$root{LOADER}\" && chmod 755 \"$root{LOADER}\"\n\
             \x20 : > \"$src/active\"\n\
             fi\n\
             for t in {tools}; do\n\
             \x20 p=\"$root/usr/bin/$t\"\n\
             \x20 if [ -f \"$p\" ] && [ ! -L \"$p\" ] && ! cmp -s \"$p\" \"$src/bin/$t\"; then\n\
             \x20   mv -f \"$p\" \"$p.kiln-emulated\" && cp \"$src/bin/$t\" \"$p\" && chmod 755 \"$p\" && echo \"$t\" >> \"$src/swapped\"\n\
             \x20 fi\n\
             done\n"
        );
        let swap_out = format!(
            "set -eu\nroot=$1\nsrc={src}\n\
             [ -e \"$src/active\" ] || exit 0\n\
             if [ -e \"$src/swapped\" ]; then\n\
             \x20 sort -u \"$src/swapped\" | while read -r t; do mv -f \"$root/usr/bin/$t.kiln-emulated\" \"$root/usr/bin/$t\"; done\n\
             fi\n\
             rm -r \"$root{libdir}\" \"$root{LOADER}\"\n\
             rm -f \"$src/active\" \"$src/swapped\"\n"
        );
        std::fs::write(dir.path().join("in.sh"), swap_in)?;
        std::fs::write(dir.path().join("out.sh"), swap_out)?;
        Ok(Prepared { dir, put_in })
    }
}

impl Prepared {
    /// mmdebstrap's hook command that swaps the host's tools in (`$1` is the chroot).
    pub fn swap_in(&self) -> String {
        format!("sh {} \"$1\"", shell_quote(&self.dir.path().join("in.sh")))
    }

    /// The hook command that puts the emulated tools back and removes the host's files.
    pub fn swap_out(&self) -> String {
        format!("sh {} \"$1\"", shell_quote(&self.dir.path().join("out.sh")))
    }

    /// Which host file put in `bytes` are, if any.
    fn host_file(&self, bytes: &[u8]) -> Option<&String> {
        self.put_in.get(&<[u8; 32]>::from(Sha256::digest(bytes)))
    }

    /// The first file of the staged base `tar`, or of an initramfs in it, that holds the
    /// bytes of a host file put in, or the first initramfs kiln cannot read: Ok(None) when
    /// there is neither.
    pub fn find_leak(&self, tar: &Path) -> std::io::Result<Option<Leak>> {
        let mut archive = tar::Archive::new(std::fs::File::open(tar)?);
        for entry in archive.entries()? {
            let mut entry = entry?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = format!("/{}", entry.path()?.to_string_lossy().trim_start_matches("./").trim_start_matches('/'));
            let initrd = path.starts_with("/boot/initrd.img-");
            // The host's files are ELF; reading only those keeps the scan to the binaries.
            let mut bytes = Vec::new();
            (&mut entry).take(4).read_to_end(&mut bytes)?;
            if !initrd && bytes != b"\x7fELF" {
                continue;
            }
            entry.read_to_end(&mut bytes)?;
            if let Some(name) = self.host_file(&bytes) {
                return Ok(Some(Leak::HostFile { path, host_file: name.clone() }));
            }
            if initrd {
                let mut found = None;
                let read = kiln_formats::initramfs::for_each_entry(&bytes, |e| {
                    if found.is_none() {
                        if let Some(name) = self.host_file(e.data) {
                            found =
                                Some(Leak::HostFile { path: format!("{path}:/{}", e.name), host_file: name.clone() });
                        }
                    }
                });
                if let Err(e) = read {
                    // Unread is unproven: the base is staged again, as for a host file.
                    return Ok(Some(Leak::Unreadable { path, why: e.to_string() }));
                }
                if found.is_some() {
                    return Ok(found);
                }
            }
        }
        Ok(None)
    }
}

/// Why a staged base made with the host's tools is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leak {
    /// A file holds a host file's bytes: `path` in the base, or `INITRD:/path` inside an
    /// initramfs; `host_file` is where that file was put in.
    HostFile { path: String, host_file: String },
    /// An initramfs kiln cannot read, so cannot check.
    Unreadable { path: String, why: String },
}

impl std::fmt::Display for Leak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leak::HostFile { path, host_file } => write!(
                f,
                "{path} holds the host's {host_file}: a package copied one of the host's tools while they stood in for the chroot's"
            ),
            Leak::Unreadable { path, why } => write!(f, "{path} cannot be checked for the host's tools: {why}"),
        }
    }
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn run_hook(hook: &str, root: &Path) {
        let st = Command::new("sh").arg("-c").arg(hook).arg("exec").arg(root).status().unwrap();
        assert!(st.success(), "{hook} failed");
    }

    /// Every file under `root` with its bytes and mode, and every directory.
    fn snapshot(root: &Path) -> Vec<(String, Vec<u8>, u32)> {
        let mut v = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let meta = std::fs::symlink_metadata(&p).unwrap();
                let bytes = if meta.is_file() { std::fs::read(&p).unwrap() } else { Vec::new() };
                if meta.is_dir() {
                    stack.push(p.clone());
                }
                v.push((
                    p.strip_prefix(root).unwrap().display().to_string(),
                    bytes,
                    std::os::unix::fs::PermissionsExt::mode(&meta.permissions()),
                ));
            }
        }
        v.sort();
        v
    }

    /// The hooks on a stand-in chroot: the host's tools run in it without a /lib64, the tools
    /// it had come back byte for byte, and nothing of the host's stays behind.
    #[test]
    fn host_tools_run_in_a_chroot_and_leave_nothing_behind() {
        let Some(tools) = host_tools(false) else { return };
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        for name in ["dash", "realpath", "cp", "cat"] {
            std::fs::write(root.join("usr/bin").join(name), format!("the chroot's own {name}\n")).unwrap();
        }
        std::os::unix::fs::symlink("dash", root.join("usr/bin/sh")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        let before = snapshot(&root);
        let prepared = tools.prepare(t.path()).unwrap();
        run_hook(&prepared.swap_in(), &root);
        // dpkg installs a package over the tool that stands in for its own: the next run puts
        // the host's back, and what dpkg installed is what comes back at the end.
        std::fs::remove_file(root.join("usr/bin/cp")).unwrap();
        std::fs::write(root.join("usr/bin/cp"), "the chroot's own cp\n").unwrap();
        run_hook(&prepared.swap_in(), &root);
        run_hook(&prepared.swap_in(), &root);
        assert_eq!(
            std::fs::read(root.join("usr/bin/cp")).unwrap(),
            std::fs::read(t.path().join(prepared.dir.path().join("bin/cp"))).unwrap()
        );
        assert!(!root.join("lib64").exists(), "mkinitramfs would copy a /lib64 into the initramfs");
        let realpath = std::fs::read(root.join("usr/bin/realpath")).unwrap();
        assert_eq!(
            kiln_formats::elf::machine(&realpath),
            kiln_formats::elf::machine(&std::fs::read("/bin/true").unwrap())
        );
        assert_eq!(std::fs::read(root.join("usr/bin/realpath.kiln-emulated")).unwrap(), b"the chroot's own realpath\n");
        // The kernel runs them there, through the loader they now name.
        if unsafe { libc::geteuid() } == 0 {
            let out = Command::new("chroot")
                .arg(&root)
                .args(["/bin/sh", "-c", "realpath -ms /a/../b && cat /usr/bin/cp.kiln-emulated"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(String::from_utf8_lossy(&out.stdout), "/b\nthe chroot's own cp\n");
        }
        // A leak of one of them into the base, or into an initramfs in it, is found.
        let base = |files: &[(&str, &[u8])]| {
            let p = t.path().join("base.tar");
            let mut b = tar::Builder::new(std::fs::File::create(&p).unwrap());
            for (path, data) in files {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o755);
                h.set_cksum();
                b.append_data(&mut h, path, *data).unwrap();
            }
            b.into_inner().unwrap();
            p
        };
        let clean = base(&[("./usr/bin/realpath", b"\x7fELF the chroot's"), ("./etc/motd", b"hi")]);
        assert_eq!(prepared.find_leak(&clean).unwrap(), None);
        let leaked = base(&[("./usr/local/bin/rp", &realpath)]);
        let found = prepared.find_leak(&leaked).unwrap().expect("a host binary in the base went unseen");
        assert_eq!(found, Leak::HostFile { path: "/usr/local/bin/rp".into(), host_file: "/usr/bin/realpath".into() });
        let mut cpio = Vec::new();
        let header = format!(
            "070701{:08x}{:08x}{}{:08x}{}{:08x}{:08x}",
            1,
            0o100755,
            "0".repeat(32),
            realpath.len(),
            "0".repeat(32),
            12,
            0
        );
        cpio.extend_from_slice(header.as_bytes());
        cpio.extend_from_slice(b"usr/bin/cat\0");
        cpio.resize(cpio.len().div_ceil(4) * 4, 0);
        cpio.extend_from_slice(&realpath);
        cpio.resize(cpio.len().div_ceil(4) * 4, 0);
        cpio.extend_from_slice(format!("070701{}{:08x}{:08x}", "0".repeat(8 * 11), 11, 0).as_bytes());
        cpio.extend_from_slice(b"TRAILER!!!\0\0\0\0");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&cpio).unwrap();
        let in_initrd = base(&[("./boot/initrd.img-6.1.0-57-cloud-arm64", &gz.finish().unwrap())]);
        let found = prepared.find_leak(&in_initrd).unwrap().expect("a host binary in the initramfs went unseen");
        assert!(
            matches!(&found, Leak::HostFile { path, .. } if path == "/boot/initrd.img-6.1.0-57-cloud-arm64:/usr/bin/cat"),
            "{found:?}"
        );
        let unreadable = base(&[("./boot/initrd.img-6.1.0-57-cloud-arm64", b"\xfd7zXZ\0 xz")]);
        assert!(
            matches!(prepared.find_leak(&unreadable).unwrap(), Some(Leak::Unreadable { .. })),
            "an initramfs kiln cannot read counts as checked"
        );
        // Out again: the chroot is as it was.
        run_hook(&prepared.swap_out(), &root);
        assert_eq!(snapshot(&root), before);
    }

    #[test]
    fn reads_loader_and_libraries_from_ldd() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\tlibselinux.so.1 => /lib/x86_64-linux-gnu/libselinux.so.1 (0x00007f1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let (loader, libs) = parse_ldd(text).unwrap();
        assert_eq!(loader, Path::new("/lib64/ld-linux-x86-64.so.2"));
        assert_eq!(
            libs,
            [Path::new("/lib/x86_64-linux-gnu/libselinux.so.1"), Path::new("/lib/x86_64-linux-gnu/libc.so.6")]
        );
        assert_eq!(parse_ldd("\tlibfoo.so.1 => not found\n\t/lib64/ld-linux-x86-64.so.2 (0x1)\n"), None);
        assert_eq!(parse_ldd("\tnot a dynamic executable\n"), None);
    }
}
