//! `kiln build`: a recipe becomes a bootable raw disk, its checksum and its manifest.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kiln::build::{self, BuildOptions};
use kiln::launch::request::TestRequest;
use kiln::pipeline::{self, PipelineOptions, Step};
use kiln::platform::Arch;
use kiln::publish::PublishOptions;

use super::progress::TermProgress;

/// Build a bootable raw disk image from a recipe.
///
/// Stages the OS with mmdebstrap from the suite, its -updates and its security suite. The staged
/// base is cached by its inputs and by the state of the archive (each suite's InRelease): a
/// rebuild that changes only files or system settings reuses it. When the archive changed,
/// apt's resolution decides: a re-signed suite with the same package versions reuses the base,
/// a new version of any package in it (a security fix) stages afresh; --json says which
/// (base_origin). --offline uses the cache as it is. --cache-url shares staged bases with other
/// runners through S3 (see README.md, "CI fleets"). A foreign architecture (arm64 on an
/// x86_64 host) is staged under qemu-user with the host's shell and file tools standing in
/// for the chroot's while packages are configured: the same bytes, several times faster
/// (KILN_NATIVE_TOOLS=0 stages fully emulated). Then kiln lays
/// the recipe's files and generated system files over the base, and writes a GPT disk with a
/// FAT32 ESP (systemd-boot) and an ext4 root in one ordered pass.
///
/// A recipe's service layer ([[repositories]], [packages].local .deb files, [[users]],
/// [[steps]]) is staged on top of the cached base and cached by its own inputs: a new build of
/// the team's .deb re-runs only that layer, never Debian's staging. Repositories are verified
/// with their keys before anything is staged; a failing step stops the build, no image written.
///
/// Outputs, each written under a temporary name and renamed when complete:
///   OUT/NAME-ARCH.raw             the sparse raw disk
///   OUT/NAME-ARCH.raw.sha256      checkable with `sha256sum -c`
///   OUT/NAME-ARCH.manifest.json   packages, partitions, SHA-256, per-512 KiB block digests
///
/// Examples:
///   kiln build recipes/debian-12-minimal.toml
///   kiln build recipes/web-server.toml --arch arm64 --out /srv/images
///   recipes/hello-service/build-deb.sh && kiln build recipes/hello-service.toml
///   SOURCE_DATE_EPOCH=1700000000 kiln build recipe.toml --json
///   KILN_CACHE_URL=s3://ci-kiln/fleet kiln build recipes/debian-12-ec2.toml --arch arm64
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// The recipe (TOML) to build.
    pub recipe: PathBuf,
    /// Directory for the outputs.
    #[arg(long, short, default_value = "out")]
    pub out: PathBuf,
    /// Build for this architecture instead of the recipe's (x86_64, arm64).
    #[arg(long)]
    pub arch: Option<Arch>,
    /// Debian mirror URL, used when the recipe names none (default: the host's apt sources).
    #[arg(long)]
    pub mirror: Option<String>,
    /// The archive the image's own apt reads, when it is not the build mirror (the recipe's
    /// `apt_mirror` wins).
    #[arg(long, value_name = "URL")]
    pub apt_mirror: Option<String>,
    /// Use the newest staged base in the cache without asking the archive whether it changed
    /// (no network); says how old the base is.
    #[arg(long)]
    pub offline: bool,
    /// Cache for staged bases [default: $KILN_CACHE_DIR, else ~/.cache/kiln].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Share staged bases with other runners through S3 (s3://BUCKET/PREFIX): a base another
    /// runner staged from the same archive state is downloaded and verified instead of staged,
    /// and one staged here is uploaded. The local cache stays in front. Any S3-compatible
    /// store through AWS_ENDPOINT_URL; the bucket's region from AWS_REGION.
    #[arg(long, env = "KILN_CACHE_URL", value_name = "s3://BUCKET/PREFIX")]
    pub cache_url: Option<kiln::share::ShareUrl>,
    /// Sign the image's provenance statement (NAME.intoto.jsonl, an in-toto Statement in a
    /// DSSE envelope) with this key: PKCS#8 PEM, Ed25519 or ECDSA P-256 (`openssl genpkey
    /// -algorithm ed25519 -out sign.pem`). Without it the statement is written unsigned.
    #[arg(long, env = "KILN_SIGN_KEY", value_name = "PEM")]
    pub sign_key: Option<PathBuf>,
    /// Print a JSON summary (manifest path, image, SHA-256, timings) on stdout; logs go to stderr.
    #[arg(long)]
    pub json: bool,
    /// Boot the image under QEMU after building and wait for the login prompt.
    #[arg(long)]
    pub boot: bool,
    /// Launch the image after building the way EC2 would and check it (see `kiln test --help`);
    /// the result is recorded in the manifest, and a failure stops --publish.
    #[arg(long)]
    pub test: bool,
    /// Publish the image after building: EBS snapshot and AMI per the recipe's [ami] section
    /// (see `kiln publish --help`; AWS credentials and region from the usual chain).
    #[arg(long)]
    pub publish: bool,
    /// With --publish: send requests to this endpoint (a local stand-in, a VPC endpoint).
    #[arg(long, requires = "publish")]
    pub endpoint_url: Option<String>,
    /// With --publish: share what kiln remembers of published images through S3 (see
    /// `kiln publish --help`).
    #[arg(long, env = "KILN_STATE_URL", value_name = "s3://BUCKET/PREFIX")]
    pub state_url: Option<kiln::share::ShareUrl>,
    /// With --publish: also add the AMIs to this Packer manifest (see `kiln publish --help`).
    #[arg(long, requires = "publish", value_name = "FILE")]
    pub packer_manifest: Option<PathBuf>,
    /// Only warnings and errors on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn source_date_epoch_from_env() -> Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => Ok(Some(
            v.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a whole number of seconds"))?,
        )),
        _ => Ok(None),
    }
}

pub fn run(args: Args) -> Result<()> {
    kiln::interrupt::install().context("setting up signal handling")?;
    let cache_dir = args.cache_dir.clone().unwrap_or_else(build::default_cache_dir);
    let mut recipe = kiln::recipe::load_with(&args.recipe, build::digest_cache(&cache_dir))?;
    if let Some(arch) = args.arch {
        recipe = recipe.with_arch(arch)?;
    }
    let quiet = args.quiet || args.json;
    let progress = TermProgress::new(quiet);
    let opts = PipelineOptions {
        build: BuildOptions {
            out_dir: args.out.clone(),
            cache_dir,
            mirror: args.mirror.clone(),
            apt_mirror: args.apt_mirror.clone(),
            source_date_epoch: source_date_epoch_from_env()?,
            offline: args.offline,
            cache_url: args.cache_url.clone(),
            sign_key: args.sign_key.clone(),
        },
        boot: args.boot,
        test: args.test.then(TestRequest::default),
        publish: args.publish.then(|| PublishOptions {
            endpoint_url: args.endpoint_url.clone(),
            // What `kiln publish` remembers, so tomorrow's build uploads only what changed.
            state_dir: Some(kiln::publish::history::default_state_dir()),
            state_url: args.state_url.clone(),
            sign_key: args.sign_key.clone(),
            ..Default::default()
        }),
    };
    let mut packer = Ok(());
    pipeline::run(&recipe, &opts, &progress, |step| match step {
        Step::Built(out) => print_built(out, &args),
        Step::Testing { image, options } if !quiet => super::test::print_banner(image, options),
        Step::Tested(outcome) if !quiet => super::test::print_report(outcome),
        Step::Published { path, record } => {
            if let Some(p) = &args.packer_manifest {
                packer = super::publish::write_packer_manifest(p, record);
            }
            if !args.quiet {
                eprintln!("kiln: published; record in {}", path.display())
            }
        }
        _ => {}
    })?;
    packer
}

fn print_built(out: &build::BuildOutput, args: &Args) {
    let m = &out.manifest;
    if args.json {
        let summary = serde_json::json!({
            "manifest": out.manifest_path,
            "image": out.image_path,
            "name": m.name,
            "arch": m.arch,
            "size_bytes": m.image.size_bytes,
            "sha256": m.image.sha256,
            "data_blocks": m.blocks.data_blocks.len(),
            "base_cached": out.base_cached,
            "base_age_secs": out.base_age_secs,
            "base_origin": out.base_origin,
            "base": m.base,
            "seconds": out.seconds,
        });
        println!("{summary}");
    } else if !args.quiet {
        eprintln!(
            "kiln: built {} ({}, sha256 {}) in {:.1} s{}\nkiln: manifest {}",
            out.image_path.display(),
            build::human_bytes(m.image.size_bytes),
            m.image.sha256,
            out.seconds,
            match &out.base_origin {
                Some(kiln::stage::debian::Origin::Cache(_)) => ", staged base from cache",
                Some(kiln::stage::debian::Origin::Shared(_)) => ", staged base from the shared cache",
                _ => "",
            },
            out.manifest_path.display()
        );
    }
}
