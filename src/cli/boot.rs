//! `kiln boot` (not built yet).

use std::path::Path;

/// (not built yet)
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`kiln boot` is not built yet")
}

pub fn boot_built(_image: &Path, _arch: kiln::platform::Arch, _p: &dyn kiln::progress::Progress) -> anyhow::Result<()> {
    anyhow::bail!("`kiln boot` is not built yet")
}
