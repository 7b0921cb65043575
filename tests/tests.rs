//! kiln's integration tests: one binary, a module per area. Independent tools are the judges
//! (e2fsck, debugfs, fsck.fat, sgdisk, sfdisk, openssl, QEMU, sbverify, pesign, uefivars, swtpm), never kiln's own reader alone.

mod build;
mod bundle;
mod common;
mod diff;
mod disk;
mod ext4;
mod fleet;
mod launch;
mod messages;
mod moto;
mod provenance;
mod publish;
mod recipe;
mod release;
mod remote;
mod secure_boot;
mod service;
mod structure;
mod tar;
