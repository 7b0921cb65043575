//! kiln's on-disk formats, a crate of their own: the tree a root file system is built from,
//! tar in, ext4, FAT, GPT, the GRUB BIOS boot area, the EC2 instance-store bundle, the image
//! stream with its digests, SPDX out, and for Secure Boot PE/COFF with Authenticode, unified
//! kernel images and UEFI variable stores. Each is a plain library. This crate depends on no
//! AWS SDK, async runtime, command line, terminal or manifest code, and because it is a
//! separate crate the compiler holds it to that: nothing here can name kiln's other modules.
//! The fuzz targets (`fuzz/`) build against it alone.

pub mod atomic;
pub mod authenticode;
pub mod bundle;
mod der;
pub mod device;
pub mod efi_vars;
pub mod elf;
pub mod ext4;
pub mod fat;
pub mod gpt;
pub mod grub_pc;
pub mod image;
pub mod initramfs;
pub mod inspect;
pub mod intoto;
pub mod mbr;
pub mod pe;
pub mod progress;
pub mod spdx;
pub mod tar;
pub mod tpm;
pub mod tree;
pub mod uki;
pub mod x509;
