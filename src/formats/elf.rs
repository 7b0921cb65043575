//! The two things kiln does with ELF files: read which machine one runs on, and point a
//! dynamically linked executable at another program interpreter (its `PT_INTERP`), in place.

/// `e_machine` of x86_64.
pub const X86_64: u16 = 62;
/// `e_machine` of AArch64.
pub const AARCH64: u16 = 183;

/// The machine an ELF file (its first 20 bytes are enough) was built for; None for anything
/// that is not ELF.
pub fn machine(bytes: &[u8]) -> Option<u16> {
    let h = bytes.get(..20)?;
    if &h[..4] != b"\x7fELF" {
        return None;
    }
    let m = [h[18], h[19]];
    // EI_DATA: 1 little-endian, 2 big-endian.
    Some(if h[5] == 2 { u16::from_be_bytes(m) } else { u16::from_le_bytes(m) })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not a 64-bit little-endian ELF file")]
    Format,
    #[error("the file names no program interpreter (it is static, or a library)")]
    NoInterpreter,
    #[error("the interpreter path {0} is longer than the {1} bytes the file holds for it")]
    TooLong(String, usize),
}

/// Rewrites the program interpreter `exe` names (`/lib64/ld-linux-x86-64.so.2`) to `path`, in
/// the bytes the file already holds for it: `path` may be no longer than the old one, and the
/// rest is zero-filled, as the loader reads up to the first zero.
pub fn set_interpreter(exe: &mut [u8], path: &str) -> Result<(), ElfError> {
    let u16_at = |b: &[u8], o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u64_at = |b: &[u8], o: usize| b.get(o..o + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()));
    // EI_CLASS 2 (64-bit), EI_DATA 1 (little-endian): the only ELF kiln's hosts run.
    if exe.get(..6) != Some(&b"\x7fELF\x02\x01"[..]) {
        return Err(ElfError::Format);
    }
    let phoff = u64_at(exe, 0x20).ok_or(ElfError::Format)? as usize;
    let phentsize = u16_at(exe, 0x36).ok_or(ElfError::Format)? as usize;
    let phnum = u16_at(exe, 0x38).ok_or(ElfError::Format)? as usize;
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = exe.get(ph..ph + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]])).ok_or(ElfError::Format)?;
        if kind != PT_INTERP {
            continue;
        }
        let offset = u64_at(exe, ph + 8).ok_or(ElfError::Format)? as usize;
        let size = u64_at(exe, ph + 32).ok_or(ElfError::Format)? as usize;
        let slot = exe.get_mut(offset..offset + size).ok_or(ElfError::Format)?;
        if path.len() >= size {
            return Err(ElfError::TooLong(path.to_string(), size - 1));
        }
        slot.fill(0);
        slot[..path.len()].copy_from_slice(path.as_bytes());
        return Ok(());
    }
    Err(ElfError::NoInterpreter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_machine_of_the_running_binary() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let want = if cfg!(target_arch = "x86_64") { X86_64 } else { AARCH64 };
        assert_eq!(machine(&me), Some(want));
        assert_eq!(machine(b"#!/bin/sh\nexit 0\n"), None);
        assert_eq!(machine(b"\x7fELF"), None, "too short to say");
    }

    /// The kernel itself is the oracle: a copy of `true` pointed at a copy of the loader
    /// elsewhere runs, and pointed at a path where none is, it does not.
    #[test]
    fn a_binary_pointed_at_a_moved_loader_runs_from_there() {
        let Some(loader) = ["/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let moved = dir.path().join("ld.so");
        std::fs::copy(loader, &moved).unwrap();
        let mut exe = std::fs::read("/bin/true").unwrap();
        let path = moved.to_str().unwrap();
        if path.len() >= loader.len() {
            return; // a temporary directory with a long name: nothing to prove with it
        }
        set_interpreter(&mut exe, path).unwrap();
        let run = |bytes: &[u8]| {
            let p = dir.path().join("true");
            let _ = std::fs::remove_file(&p);
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            std::process::Command::new(&p).status()
        };
        assert!(run(&exe).unwrap().success());
        let mut nowhere = std::fs::read("/bin/true").unwrap();
        set_interpreter(&mut nowhere, "/nonexistent/ld.so").unwrap();
        assert!(run(&nowhere).is_err(), "the kernel found a loader at a path that has none");
        let long = "/".repeat(loader.len() + 1);
        assert_eq!(set_interpreter(&mut exe, &long), Err(ElfError::TooLong(long.clone(), loader.len())));
        assert_eq!(set_interpreter(&mut b"#!/bin/sh".to_vec(), "/x"), Err(ElfError::Format));
    }
}
