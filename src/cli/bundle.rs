//! `kiln bundle`: an instance-store bundle (ec2-bundle-image format) of a built image.

use std::path::PathBuf;

use anyhow::Context as _;
use kiln::bundle::{self, BundleOptions};
use kiln::platform::Arch;

/// Package a built image as an EC2 instance-store bundle, optionally upload and register it.
///
/// Writes NAME.manifest.xml and NAME.part.N (manifest version 2007-10-10, the format of
/// ec2-bundle-image): the image as one sparse member of a GNU tar stream, gzip, AES-128-CBC
/// with a fresh random key and IV, 10 MiB parts, the key and IV RSA-wrapped for EC2 and for
/// you, and a signature by your key. One streaming pass; compression uses every core.
///
/// Settings come from the flags, else from the recipe's [bundle] section recorded in the build
/// manifest beside the image. Instance-store roots exist only on older x86_64 families that
/// boot legacy BIOS: arm64 is refused, and an image that cannot boot BIOS draws a warning.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
kiln bundle out/debian-12-hybrid-x86_64.raw --account 123456789012 \\\n      \
--user-cert cert.pem --user-key pk.pem --ec2-cert cert-ec2.pem -o out/bundle\n  \
kiln bundle out/web.manifest.json                 # everything from the recipe's [bundle]\n  \
kiln bundle out/web.raw --upload s3://my-bundles/web --register --region us-east-1\n  \
kiln unbundle out/bundle/web.manifest.xml --user-key pk.pem -o restored.raw\n\n\
See docs/bundle.md for the format, the S3 bucket settings EC2 needs, and the IAM permissions.")]
pub struct Args {
    /// The image (out/NAME.raw) or its build manifest (out/NAME.manifest.json).
    pub input: PathBuf,
    /// Your 12-digit AWS account id.
    #[arg(long, value_name = "ID")]
    pub account: Option<String>,
    /// Your X.509 signing certificate (PEM).
    #[arg(long, value_name = "cert.pem")]
    pub user_cert: Option<PathBuf>,
    /// The RSA private key of that certificate (PEM, PKCS#8 or PKCS#1).
    #[arg(long, value_name = "pk.pem")]
    pub user_key: Option<PathBuf>,
    /// EC2's certificate for the target region (cert-ec2.pem of the AMI tools).
    #[arg(long, value_name = "cert-ec2.pem")]
    pub ec2_cert: Option<PathBuf>,
    /// Output directory [default: NAME.bundle beside the image].
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Bundle name (file names NAME.part.N, NAME.manifest.xml) [default: the build's name].
    #[arg(long)]
    pub name: Option<String>,
    /// Architecture of a raw image that has no build manifest beside it.
    #[arg(long)]
    pub arch: Option<Arch>,
    /// gzip level: 1 is fastest, 9 smallest.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub level: u32,
    /// Compression threads [default: one per core].
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Upload the parts and manifest here (canned ACL aws-exec-read, Content-MD5).
    #[arg(long, value_name = "s3://BUCKET/PREFIX")]
    pub upload: Option<String>,
    /// Register the uploaded bundle as an AMI (RegisterImage with ImageLocation).
    #[arg(long)]
    pub register: bool,
    /// AMI name for --register [default: the bundle name].
    #[arg(long, value_name = "NAME")]
    pub ami_name: Option<String>,
    /// AMI description for --register.
    #[arg(long)]
    pub description: Option<String>,
    /// Region of the bucket and the AMI [default: the recipe's, then the AWS chain].
    #[arg(long)]
    pub region: Option<String>,
    /// Send requests here instead of AWS (also read from AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Parts uploaded at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub concurrency: u16,
    /// Print the bundle record as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = BundleOptions {
        input: a.input.clone(),
        account: a.account,
        user_cert: a.user_cert,
        user_key: a.user_key,
        ec2_cert: a.ec2_cert,
        out_dir: a.out_dir,
        name: a.name,
        arch: a.arch,
        level: a.level,
        threads: a.threads,
        upload: a.upload,
        register: a.register,
        ami_name: a.ami_name,
        description: a.description,
        region: a.region,
        endpoint_url: a.endpoint_url,
        concurrency: usize::from(a.concurrency),
    };
    let what = || format!("bundling {}", a.input.display());
    let resolved = bundle::resolve(&opts).with_context(what)?;
    let progress = super::progress::TermProgress::new(a.json);
    let rec = bundle::run(&resolved, &opts, &progress).with_context(what)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rec)?);
        return Ok(());
    }
    println!(
        "{}  ({} parts, {:.1} MiB from a {:.1} MiB image)",
        rec.manifest.display(),
        rec.parts.len(),
        rec.bundled_bytes as f64 / 1048576.0,
        rec.image_bytes as f64 / 1048576.0
    );
    if let Some(u) = &rec.uploaded {
        println!("uploaded to s3://{}", u.image_location);
        if let Some(id) = &u.image_id {
            println!("{}  {id}{}", u.region.as_deref().unwrap_or(""), if u.reused { "  (existing)" } else { "" });
        }
    }
    Ok(())
}
