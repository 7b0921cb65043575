//! Staging: the root tree an image is made from. The OS base comes from Debian's own tooling
//! (cached by its inputs), then recipe files and generated system files are laid over it.

pub mod audit;
pub mod debian;
pub mod generalize;
pub mod grub;
pub mod layer;
pub mod system;
