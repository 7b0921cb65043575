//! EC2's rules for an AMI's settings: the values it accepts, as types, and the limits that tie
//! them together. The same rules judge a recipe (`kiln check`, `kiln build`, which point at the
//! line) and a manifest (`kiln publish`, which may be handed one that was edited or made by
//! another tool), so both say the same thing of the same mistake.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::platform::{Arch, BootMode};

/// One broken rule: which setting (`boot_mode`, `tpm`, `type`, `size`, `iops`, `throughput`),
/// what is wrong, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: &'static str,
    pub message: String,
    pub help: Option<String>,
}

fn problem(field: &'static str, message: String, help: Option<String>) -> Problem {
    Problem { field, message, help }
}

/// A value that is not one of an enumeration's names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid {what}; accepted values: {accepted}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
    pub accepted: String,
}

macro_rules! names {
    ($(#[$m:meta])* $ty:ident, $what:literal, { $($variant:ident = $name:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $ty {
            $(#[serde(rename = $name)] $variant,)+
        }
        impl $ty {
            /// Every value, as EC2 spells it.
            pub const NAMES: &'static [&'static str] = &[$($name),+];
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $name,)+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    _ => Err(UnknownValue { what: $what, value: s.into(), accepted: Self::NAMES.join(", ") }),
                }
            }
        }
    };
}

names!(
    /// RegisterImage `BootMode`.
    Ec2BootMode, "boot mode", { Uefi = "uefi", LegacyBios = "legacy-bios", UefiPreferred = "uefi-preferred" }
);
names!(
    /// EBS volume types.
    VolumeType, "volume type", {
        Gp2 = "gp2", Gp3 = "gp3", Io1 = "io1", Io2 = "io2", St1 = "st1", Sc1 = "sc1", Standard = "standard",
    }
);
names!(
    /// RegisterImage `ImdsSupport`: `v2.0` requires IMDSv2 tokens on every instance.
    ImdsSupport, "IMDS support", { V2 = "v2.0" }
);

names!(
    /// How an AMI reaches a region: CopyImage from the first region, or its own upload of the
    /// same blocks with the EBS direct APIs (in parallel, when a region's copy queue is slow).
    Delivery, "delivery", { Copy = "copy", Upload = "upload" }
);

impl Default for Delivery {
    /// What a region after the first gets unless it says otherwise.
    fn default() -> Delivery {
        Delivery::Copy
    }
}

/// The region a KMS key ARN (`arn:PARTITION:kms:REGION:ACCOUNT:key/ID` or `alias/NAME`) lives
/// in: a key is used only in its own region, so each region of an encrypted AMI needs its own.
pub fn kms_key_region(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    let (arn_word, partition, service, region, account, resource) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let ok = arn_word == "arn"
        && partition.starts_with("aws")
        && service == "kms"
        && !region.is_empty()
        && account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && (resource.strip_prefix("key/").or_else(|| resource.strip_prefix("alias/")).is_some_and(|r| !r.is_empty()));
    ok.then_some(region)
}

/// Why a KMS key ARN cannot encrypt what kiln makes in `region` the way `via` makes it, if it
/// cannot. CopyImage takes an alias ARN; StartSnapshot (an upload) takes only `key/…`. A key
/// of an image that is not `encrypted` encrypts nothing: a mistake too.
pub fn check_kms_key(arn: &str, region: Option<&str>, via: Delivery, encrypted: bool) -> Result<(), Problem> {
    let key = |message: String| {
        let like = format!(
            "like \"arn:aws:kms:{}:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab\"",
            region.unwrap_or("us-east-1")
        );
        problem("kms_key_arn", message, Some(like))
    };
    match (kms_key_region(arn), region) {
        (None, _) => Err(key(format!("`{arn}` is not a KMS key ARN"))),
        (Some(_), _) if via == Delivery::Upload && !arn.split(':').nth(5).is_some_and(|r| r.starts_with("key/")) => {
            Err(key(format!(
                "`{arn}` is an alias; the EBS direct APIs that upload the snapshot take only a key ARN (`…:key/ID`)"
            )))
        }
        (Some(k), Some(r)) if k != r => Err(key(format!(
            "the KMS key `{arn}` is in {k}, but it would encrypt the AMI in {r}; a key works only in its own region"
        ))),
        _ if !encrypted => Err(problem("kms_key_arn", "a KMS key needs `encrypted = true`".into(), None)),
        _ => Ok(()),
    }
}

/// An extra volume with its own KMS key, in an AMI that a region gets by its own upload.
pub fn volume_keys_and_uploads(region: &str) -> Problem {
    problem(
        "volumes",
        format!("an extra volume names a KMS key, which exists in one region only, but {region} registers its own AMI"),
        Some(
            "leave `kms_key_id` out of [[ami.volumes]] (the region's default key is used), or copy to that region"
                .into(),
        ),
    )
}

impl BootMode {
    /// How EC2 registers an image that boots this way.
    pub fn ec2_boot_mode(self) -> Ec2BootMode {
        match self {
            BootMode::Uefi => Ec2BootMode::Uefi,
            BootMode::Bios => Ec2BootMode::LegacyBios,
            BootMode::Hybrid => Ec2BootMode::UefiPreferred,
        }
    }
}

/// EBS limits per volume type (Amazon EBS volume types, User Guide): size in GiB, and for the
/// types that take them, provisioned IOPS and throughput (MiB/s) ranges and the largest
/// IOPS-per-GiB ratio.
#[derive(Debug, Clone, Copy)]
pub struct VolumeLimits {
    pub size_gib: (u32, u32),
    pub iops: Option<(u32, u32)>,
    pub iops_per_gib: u32,
    pub iops_required: bool,
    pub throughput: Option<(u32, u32)>,
    pub bootable: bool,
}

impl VolumeType {
    pub fn limits(self) -> VolumeLimits {
        let plain = |lo, hi, bootable| VolumeLimits {
            size_gib: (lo, hi),
            iops: None,
            iops_per_gib: 0,
            iops_required: false,
            throughput: None,
            bootable,
        };
        match self {
            VolumeType::Gp3 => VolumeLimits {
                size_gib: (1, 65_536),
                iops: Some((3_000, 80_000)),
                iops_per_gib: 500,
                iops_required: false,
                throughput: Some((125, 2_000)),
                bootable: true,
            },
            VolumeType::Io1 => VolumeLimits {
                size_gib: (4, 16_384),
                iops: Some((100, 64_000)),
                iops_per_gib: 50,
                iops_required: true,
                throughput: None,
                bootable: true,
            },
            VolumeType::Io2 => VolumeLimits {
                size_gib: (4, 65_536),
                iops: Some((100, 256_000)),
                iops_per_gib: 1_000,
                iops_required: true,
                throughput: None,
                bootable: true,
            },
            // Throughput-optimised and cold HDD cannot be boot volumes.
            VolumeType::St1 | VolumeType::Sc1 => plain(125, 16_384, false),
            VolumeType::Standard => plain(1, 1_024, true),
            VolumeType::Gp2 => plain(1, 16_384, true),
        }
    }
}

/// What a volume asks for; numbers as written (a recipe may hold any integer).
#[derive(Debug, Clone, Copy)]
pub struct VolumeRequest {
    pub volume_type: VolumeType,
    pub size_gib: Option<u32>,
    pub iops: Option<i64>,
    pub throughput: Option<i64>,
    pub root: bool,
}

/// The checked numbers of a volume that broke no rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeValues {
    pub iops: Option<u32>,
    pub throughput: Option<u32>,
}

/// Every rule `v` breaks, or its checked values.
pub fn check_volume(v: &VolumeRequest) -> Result<VolumeValues, Vec<Problem>> {
    let t = v.volume_type;
    let lim = t.limits();
    let mut out = Vec::new();
    if v.root && !lim.bootable {
        out.push(problem(
            "type",
            format!("{t} volumes cannot be boot volumes"),
            Some("use gp3 (or gp2, io1, io2) for the root volume".into()),
        ));
    }
    if let Some(g) = v.size_gib {
        if !(lim.size_gib.0..=lim.size_gib.1).contains(&g) {
            out.push(problem(
                "size",
                format!("{t} volumes are {} to {} GiB; {g} GiB is outside", lim.size_gib.0, lim.size_gib.1),
                None,
            ));
        }
    }
    let mut num = |value: Option<i64>, field: &'static str, range: Option<(u32, u32)>, unit: &str| -> Option<u32> {
        let value = value?;
        let Some((lo, hi)) = range else {
            let takes = if field == "iops" { "gp3, io1 and io2" } else { "gp3" };
            out.push(problem(
                field,
                format!("{t} volumes do not take `{field}`"),
                Some(format!("only {takes} volumes have provisioned {field}")),
            ));
            return None;
        };
        match u32::try_from(value) {
            Ok(n) if (lo..=hi).contains(&n) => Some(n),
            _ => {
                out.push(problem(
                    field,
                    format!("{field} {value} is out of range for {t}"),
                    Some(format!("{t} accepts {lo} to {hi} {unit}")),
                ));
                None
            }
        }
    };
    let iops = num(v.iops, "iops", lim.iops, "IOPS");
    let throughput = num(v.throughput, "throughput", lim.throughput, "MiB/s");
    if lim.iops_required && v.iops.is_none() {
        out.push(problem(
            "iops",
            format!("{t} volumes need `iops`"),
            Some(format!("set iops between {} and {}", lim.iops.map_or(0, |r| r.0), lim.iops.map_or(0, |r| r.1))),
        ));
    }
    // The per-GiB ratio applies above gp3's free baseline of 3000 IOPS.
    if let (Some(i), Some(g)) = (iops, v.size_gib) {
        let baseline = if t == VolumeType::Gp3 { 3_000 } else { 0 };
        if i > baseline && u64::from(i) > u64::from(g) * u64::from(lim.iops_per_gib) {
            out.push(problem(
                "iops",
                format!("{i} IOPS is more than {t} allows for {g} GiB"),
                Some(format!("{t} allows at most {} IOPS per GiB", lim.iops_per_gib)),
            ));
        }
    }
    // gp3 throughput is at most 0.25 MiB/s per provisioned IOPS.
    if let Some(tp) = throughput {
        let i = iops.unwrap_or(3_000);
        if tp > 125 && u64::from(tp) * 4 > u64::from(i) {
            out.push(problem(
                "throughput",
                format!("{tp} MiB/s needs at least {} IOPS", u64::from(tp) * 4),
                Some("gp3 throughput is at most 0.25 MiB/s per provisioned IOPS".into()),
            ));
        }
    }
    if out.is_empty() {
        Ok(VolumeValues { iops, throughput })
    } else {
        Err(out)
    }
}

/// The rules between the boot mode an AMI is registered with, the image and the architecture:
/// arm64 is UEFI only, the mode must be one the image boots, and NitroTPM needs UEFI.
/// `arch_from_flag` adds that arm64 was chosen on the command line, when it was.
pub fn check_boot(arch: Arch, image: BootMode, mode: Ec2BootMode, tpm: bool, arch_from_flag: bool) -> Vec<Problem> {
    let mut out = Vec::new();
    if arch == Arch::Arm64 && mode != Ec2BootMode::Uefi {
        let via = if arch_from_flag { " (arm64 was chosen with --arch)" } else { "" };
        out.push(problem(
            "boot_mode",
            format!("boot_mode = \"{mode}\" cannot be registered for arm64{via}"),
            Some("Graviton (arm64) instances boot UEFI only, so arm64 AMIs are registered as \"uefi\"; remove `boot_mode` or set it to \"uefi\"".into()),
        ));
    } else {
        let bootable = match mode {
            Ec2BootMode::LegacyBios => image.has_bios(),
            Ec2BootMode::Uefi => image.has_uefi(),
            Ec2BootMode::UefiPreferred => image == BootMode::Hybrid,
        };
        if !bootable {
            let how = match image {
                BootMode::Uefi => "UEFI only",
                BootMode::Bios => "legacy BIOS only",
                BootMode::Hybrid => "both ways",
            };
            out.push(problem(
                "boot_mode",
                format!("boot_mode = \"{mode}\" does not match the image, which boots {how}"),
                Some(format!("[image].boot = \"{image}\" registers as \"{}\"; set [image].boot = \"hybrid\" for an image that boots both ways", image.ec2_boot_mode())),
            ));
        }
    }
    if tpm && mode != Ec2BootMode::Uefi {
        out.push(problem(
            "tpm",
            format!("tpm = true needs UEFI boot; this AMI would be registered as \"{mode}\""),
            Some("NitroTPM is only available to AMIs registered with boot_mode = \"uefi\"; use [image].boot = \"uefi\" (or set boot_mode = \"uefi\" with a hybrid image), or remove tpm".into()),
        ));
    }
    out
}

/// `s3://bucket/prefix`, where bundles are uploaded: a bucket name S3 accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct S3Location {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl S3Location {
    pub fn parse(s: &str) -> Result<S3Location, BadS3Location> {
        let bad = || BadS3Location(s.to_string());
        let rest = s.strip_prefix("s3://").ok_or_else(bad)?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
            && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(bad());
        }
        Ok(S3Location { bucket: bucket.into(), prefix: prefix.trim_matches('/').into() })
    }

    pub fn key(&self, file: &str) -> String {
        if self.prefix.is_empty() {
            file.to_string()
        } else {
            format!("{}/{file}", self.prefix)
        }
    }
}

/// Why a text is not an S3 location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an S3 location: write s3://BUCKET/PREFIX (bucket names are 3 to 63 lowercase letters, digits, `-` and `.`)")]
pub struct BadS3Location(pub String);

/// EC2's rule for an AMI name, placeholders already filled in: 3 to 128 characters of letters,
/// digits, spaces and `( ) [ ] . / - ' @ _`.
pub const AMI_NAME_RULE: &str = "3 to 128 characters: letters, digits, spaces and ( ) [ ] . / - ' @ _";

/// Whether EC2 accepts `name` as an AMI name ([`AMI_NAME_RULE`]).
pub fn valid_ami_name(name: &str) -> bool {
    (3..=128).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c))
}

/// The root volume holds the whole image: a `size_gib` root volume (`shown` as the user wrote
/// it) for an image of `image_bytes`, or why it is too small.
pub fn root_too_small(size_gib: u32, shown: &str, image_bytes: u64) -> Option<Problem> {
    let image_gib = image_bytes.div_ceil(crate::recipe::size::GIB);
    (u64::from(size_gib) < image_gib).then(|| {
        problem(
            "size",
            format!("the root volume ({shown}) is smaller than the image ({image_gib} GiB)"),
            Some("the root volume holds the whole image: make it at least as large".into()),
        )
    })
}

/// When an AMI is deprecated (EnableImageDeprecation): a number of days after it is
/// published, or a fixed UTC time. EC2 takes a time at most 10 years ahead, 2 years for a
/// public AMI, and never in the past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deprecation {
    AfterDays(u32),
    /// Seconds since the Unix epoch.
    At(i64),
}

/// Days EC2 allows between now and an AMI's deprecation: 10 years, or 2 for a public AMI.
pub fn max_deprecation_days(public: bool) -> u32 {
    if public {
        730
    } else {
        3650
    }
}

impl Deprecation {
    /// `"180d"` or an RFC 3339 UTC time (`"2027-06-01T00:00:00Z"`).
    pub fn parse(s: &str) -> Result<Deprecation, String> {
        if let Some(days) = s.strip_suffix('d') {
            return match days.parse::<u32>() {
                Ok(n) if n >= 1 => Ok(Deprecation::AfterDays(n)),
                _ => Err(format!("`{s}` is not a number of days from 1 (like \"180d\")")),
            };
        }
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|_| {
            format!("`{s}` is neither a number of days (\"180d\") nor an RFC 3339 time (\"2027-06-01T00:00:00Z\")")
        })?;
        Ok(Deprecation::At(t.unix_timestamp()))
    }

    /// What can be judged of `s` without the clock: its form, and a number of days within
    /// EC2's limit. A fixed time is judged again at publish time, against the clock then.
    pub fn check(s: &str, public: bool) -> Result<(), String> {
        Deprecation::parse(s)?.check_days(public)
    }

    /// [`Deprecation::check`] of a parsed value: a number of days within EC2's limit.
    pub fn check_days(self, public: bool) -> Result<(), String> {
        match self {
            Deprecation::AfterDays(_) => self.at(0, public).map(|_| ()),
            Deprecation::At(_) => Ok(()),
        }
    }

    /// The deprecation time for an AMI published at `now` (Unix seconds), or why EC2 would
    /// refuse it.
    pub fn at(self, now: i64, public: bool) -> Result<i64, String> {
        let max = max_deprecation_days(public);
        let at = match self {
            Deprecation::AfterDays(d) if d > max => {
                return Err(format!(
                    "{d} days is more than EC2 allows ({max} days{})",
                    if public { " for a public AMI" } else { "" }
                ))
            }
            Deprecation::AfterDays(d) => now + i64::from(d) * 86_400,
            Deprecation::At(t) => t,
        };
        if at <= now {
            return Err("the deprecation time has passed".into());
        }
        if at > now + i64::from(max) * 86_400 {
            return Err(format!(
                "the deprecation time is more than {max} days ahead{}",
                if public { " (a public AMI)" } else { "" }
            ));
        }
        Ok(at)
    }
}

/// The placeholders an SSM parameter name may hold, filled in per region at publish time.
pub const SSM_PLACEHOLDERS: [&str; 5] = ["{name}", "{arch}", "{region}", "{date}", "{sha}"];

/// Whether SSM accepts `name` (with its placeholders filled in) as a parameter name: a path
/// from `/`, of letters, digits and `_ . - /`, at most 15 levels, at most 1011 characters (SSM
/// counts the ARN prefix too), not under the reserved `/aws` or `/ssm` prefixes.
pub fn check_ssm_parameter_name(name: &str) -> Result<(), String> {
    let mut plain = name.to_string();
    for p in SSM_PLACEHOLDERS {
        plain = plain.replace(p, "x");
    }
    if !plain.starts_with('/') {
        return Err("is not a parameter path: it must start with `/`".into());
    }
    if let Some(c) = plain.chars().find(|c| !(c.is_ascii_alphanumeric() || "_.-/".contains(*c))) {
        return Err(format!("holds {c:?}: SSM parameter names take letters, digits and `_ . - /`"));
    }
    let lower = plain.to_ascii_lowercase();
    if lower.starts_with("/aws") || lower.starts_with("/ssm") {
        return Err("is under a prefix SSM reserves (`/aws`, `/ssm`)".into());
    }
    if plain.contains("//") || plain.ends_with('/') {
        return Err("has an empty level".into());
    }
    if plain.matches('/').count() > 15 {
        return Err("is more than 15 levels deep".into());
    }
    if name.len() > 1011 {
        return Err("is longer than 1011 characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn kms_keys_belong_to_one_region() {
        let k = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_eq!(kms_key_region(k), Some("eu-west-1"));
        assert_eq!(kms_key_region("arn:aws-us-gov:kms:us-gov-west-1:123456789012:alias/golden"), Some("us-gov-west-1"));
        for bad in [
            "arn:aws:kms:eu-west-1:1234:key/x",
            "arn:aws:s3:eu-west-1:123456789012:key/x",
            "arn:aws:kms:eu-west-1:123456789012:key/",
            "arn:aws:kms::123456789012:key/x",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
        ] {
            assert_eq!(kms_key_region(bad), None, "{bad}");
        }
        assert!(check_kms_key(k, Some("eu-west-1"), Delivery::Upload, true).is_ok());
        assert!(check_kms_key(k, None, Delivery::Upload, true).is_ok());
        let e = check_kms_key(k, Some("eu-west-1"), Delivery::Upload, false).unwrap_err().message;
        assert!(e.contains("needs `encrypted = true`"), "{e}");
        let alias = "arn:aws:kms:eu-west-1:123456789012:alias/golden";
        assert!(check_kms_key(alias, Some("eu-west-1"), Delivery::Copy, true).is_ok());
        let e = check_kms_key(alias, Some("eu-west-1"), Delivery::Upload, true).unwrap_err().message;
        assert!(e.contains("is an alias"), "{e}");
        let e = check_kms_key(k, Some("us-east-1"), Delivery::Copy, true).unwrap_err().message;
        assert!(e.contains("is in eu-west-1") && e.contains("in us-east-1"), "{e}");
    }

    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for n in Ec2BootMode::NAMES {
            let m: Ec2BootMode = n.parse().unwrap();
            assert_eq!(m.as_str(), *n);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{n}\""));
        }
        for n in VolumeType::NAMES {
            let t: VolumeType = serde_json::from_str(&format!("\"{n}\"")).unwrap();
            assert_eq!(t.to_string(), *n);
        }
        let e = "gp4".parse::<VolumeType>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "`gp4` is not a valid volume type; accepted values: gp2, gp3, io1, io2, st1, sc1, standard"
        );
        assert!(serde_json::from_str::<ImdsSupport>("\"v1.0\"").is_err());
    }

    #[test]
    fn volume_rules() {
        let req =
            |t, size, iops, throughput, root| VolumeRequest { volume_type: t, size_gib: size, iops, throughput, root };
        assert_eq!(
            check_volume(&req(VolumeType::Gp3, Some(8), Some(4000), Some(250), true)),
            Ok(VolumeValues { iops: Some(4000), throughput: Some(250) })
        );
        let fields = |r: Result<VolumeValues, Vec<Problem>>| r.unwrap_err().iter().map(|p| p.field).collect::<Vec<_>>();
        assert_eq!(fields(check_volume(&req(VolumeType::St1, Some(500), None, None, true))), ["type"]);
        assert_eq!(fields(check_volume(&req(VolumeType::Gp2, Some(20_000), None, None, false))), ["size"]);
        assert_eq!(fields(check_volume(&req(VolumeType::Io2, Some(10), None, None, false))), ["iops"]);
        assert_eq!(fields(check_volume(&req(VolumeType::Io1, Some(10), Some(1000), None, false))), ["iops"]);
        assert_eq!(fields(check_volume(&req(VolumeType::Gp3, Some(8), Some(i64::MAX), None, false))), ["iops"]);
        assert_eq!(fields(check_volume(&req(VolumeType::Gp2, Some(8), None, Some(200), false))), ["throughput"]);
        assert_eq!(fields(check_volume(&req(VolumeType::Gp3, Some(100), None, Some(1000), false))), ["throughput"]);
    }

    #[test]
    fn boot_rules() {
        assert!(check_boot(Arch::X86_64, BootMode::Hybrid, Ec2BootMode::UefiPreferred, false, false).is_empty());
        assert!(check_boot(Arch::Arm64, BootMode::Uefi, Ec2BootMode::Uefi, true, false).is_empty());
        let p = check_boot(Arch::Arm64, BootMode::Hybrid, Ec2BootMode::LegacyBios, true, true);
        assert_eq!(p.iter().map(|p| p.field).collect::<Vec<_>>(), ["boot_mode", "tpm"]);
        assert!(p[0].message.ends_with("(arm64 was chosen with --arch)"));
        let p = check_boot(Arch::X86_64, BootMode::Uefi, Ec2BootMode::LegacyBios, false, false);
        assert_eq!(p[0].message, "boot_mode = \"legacy-bios\" does not match the image, which boots UEFI only");
    }
}

#[cfg(test)]
mod deprecation_tests {
    use super::*;

    #[test]
    fn days_and_times_within_ec2_limits() {
        let now = 1_800_000_000;
        assert_eq!(Deprecation::parse("180d").unwrap().at(now, false), Ok(now + 180 * 86_400));
        assert!(Deprecation::parse("3650d").unwrap().at(now, false).is_ok());
        assert!(Deprecation::parse("3651d").unwrap().at(now, false).unwrap_err().contains("3650 days"));
        assert!(Deprecation::parse("731d").unwrap().at(now, true).unwrap_err().contains("public"));
        let at = Deprecation::parse("2027-06-01T00:00:00Z").unwrap();
        assert_eq!(at, Deprecation::At(1_811_808_000));
        assert!(at.at(1_811_808_000, false).unwrap_err().contains("passed"));
        assert_eq!(at.at(1_800_000_000, false), Ok(1_811_808_000));
        assert!(at.at(1_700_000_000, true).unwrap_err().contains("730 days"));
        for bad in ["0d", "d", "-5d", "tomorrow", "2027-06-01"] {
            assert!(Deprecation::parse(bad).is_err(), "{bad}");
        }
    }
}

/// `[ami] protect`: EC2's deregistration protection, set on the AMI and every copy. With the
/// cooldown (`protect = "24h"`), protection stays 24 hours after it is removed, so a
/// compromised or mistaken caller cannot remove it and deregister at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    Enabled,
    EnabledWithCooldown,
}

impl Protection {
    /// EnableImageDeregistrationProtection's `WithCooldown`.
    pub fn with_cooldown(self) -> bool {
        self == Protection::EnabledWithCooldown
    }
}

/// A whole number of days written `"30d"`, from `min` to 3650 (what a retention window or a
/// grace period is measured in).
pub fn parse_days(s: &str, min: u32) -> Result<u32, String> {
    match s.strip_suffix('d').map(str::parse::<u32>) {
        Some(Ok(n)) if (min..=3650).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a number of days from {min} to 3650 (like \"30d\")")),
    }
}

/// CopyImage's `SnapshotCopyCompletionDurationMinutes`, written `"30m"` or `"2h"`: 15 minutes
/// to 48 hours in steps of 15 minutes (time-based copies).
pub fn parse_copy_within(s: &str) -> Result<u32, String> {
    let minutes = if let Some(m) = s.strip_suffix('m') {
        m.parse::<u32>().ok()
    } else {
        s.strip_suffix('h').and_then(|h| h.parse::<u32>().ok()).and_then(|h| h.checked_mul(60))
    };
    match minutes {
        Some(m) if (15..=2880).contains(&m) && m % 15 == 0 => Ok(m),
        _ => Err(format!(
            "`{s}` is not a copy duration EC2 accepts: 15 minutes to 48 hours in steps of 15 (\"30m\", \"2h\")"
        )),
    }
}

#[cfg(test)]
mod retention_tests {
    use super::*;

    #[test]
    fn days_and_copy_durations_are_what_ec2_takes() {
        assert_eq!(parse_days("30d", 1), Ok(30));
        assert_eq!(parse_days("0d", 0), Ok(0));
        for bad in ["0d", "30", "d", "-1d", "3651d", "1w"] {
            assert!(parse_days(bad, 1).is_err(), "{bad}");
        }
        assert_eq!(parse_copy_within("30m"), Ok(30));
        assert_eq!(parse_copy_within("2h"), Ok(120));
        assert_eq!(parse_copy_within("48h"), Ok(2880));
        for bad in ["10m", "20m", "49h", "0m", "30", "1d"] {
            assert!(parse_copy_within(bad).is_err(), "{bad}");
        }
        let p: Protection = serde_json::from_str("\"enabled-with-cooldown\"").unwrap();
        assert!(p.with_cooldown() && !Protection::Enabled.with_cooldown());
    }
}
