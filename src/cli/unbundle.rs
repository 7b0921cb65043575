//! `kiln unbundle`: restore the image of an instance-store bundle.

use std::path::PathBuf;

use anyhow::Context as _;
use kiln::formats::bundle;

/// Check an instance-store bundle and restore its image.
///
/// Verifies the manifest's signature with your key, every part's SHA-1, decrypts the key and
/// IV wrapped for you, then decrypts, decompresses and checks the tar stream's SHA-1 while the
/// image is restored (sparse). The output appears only when every check passed.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  \
kiln unbundle out/bundle/web.manifest.xml --user-key pk.pem -o web.raw && kiln boot --firmware bios web.raw")]
pub struct Args {
    /// NAME.manifest.xml; the parts are read from beside it.
    pub manifest: PathBuf,
    /// The RSA private key the bundle was made for (PEM).
    #[arg(long, value_name = "pk.pem")]
    pub user_key: PathBuf,
    /// Where to write the image.
    #[arg(short = 'o', long = "output", value_name = "IMAGE")]
    pub output: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let what = || format!("unbundling {}", a.manifest.display());
    let key = bundle::load_private_key(&a.user_key).with_context(what)?;
    let progress = super::progress::TermProgress::new(false);
    let s = bundle::unbundle(&a.manifest, &key, &a.output, &progress).with_context(what)?;
    println!("{}  ({} bytes, tar SHA-1 {})", s.output.display(), s.manifest.size, s.manifest.tar_sha1);
    Ok(())
}
