//! Unified kernel images (the UAPI group's UKI specification): systemd's EFI stub with the
//! kernel, the initrd, the command line and os-release as sections of one PE image, so that
//! one signature covers all of them. Made the way `ukify` lays them out: the stub's own
//! sections, then `.osrel`, `.cmdline`, `.uname`, `.initrd` and `.linux` last.

use super::pe::{self, PeError};

/// What goes into a UKI besides the stub.
pub struct UkiParts<'a> {
    /// The image's `/etc/os-release` (or `/usr/lib/os-release`).
    pub os_release: &'a [u8],
    /// The kernel command line, without a trailing newline.
    pub cmdline: &'a str,
    /// The kernel's release (`uname -r`), as systemd-boot shows it.
    pub uname: &'a str,
    pub initrd: &'a [u8],
    pub kernel: &'a [u8],
}

/// The UKI: `stub` (systemd's `linux*.efi.stub`) with `parts` appended. Unsigned.
pub fn build(stub: &[u8], parts: &UkiParts) -> Result<Vec<u8>, PeError> {
    pe::append_sections(
        stub,
        &[
            (".osrel", parts.os_release),
            (".cmdline", parts.cmdline.as_bytes()),
            (".uname", parts.uname.as_bytes()),
            (".initrd", parts.initrd),
            (".linux", parts.kernel),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pe::tests::tiny_pe;
    use crate::pe::Headers;

    #[test]
    fn the_parts_are_sections_the_stub_finds_by_name() {
        let parts = UkiParts {
            os_release: b"ID=debian\n",
            cmdline: "root=PARTUUID=x console=ttyS0",
            uname: "6.1.0-28-cloud-amd64",
            initrd: &[1; 3000],
            kernel: &[2; 5000],
        };
        let uki = build(&tiny_pe(), &parts).unwrap();
        let h = Headers::read(&uki).unwrap();
        let names: Vec<_> = h.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [".text", ".osrel", ".cmdline", ".uname", ".initrd", ".linux"]);
        assert_eq!(h.section(&uki, ".cmdline"), Some(parts.cmdline.as_bytes()));
        assert_eq!(h.section(&uki, ".linux"), Some(parts.kernel));
    }
}
