//! On-disk formats. Each is a plain library: no AWS, no async, no CLI, no progress bars.

pub mod bundle;
pub mod ext4;
pub mod fat;
pub mod gpt;
pub mod grub_pc;
pub mod image;
pub mod spdx;
pub mod tar;
pub mod tree;
