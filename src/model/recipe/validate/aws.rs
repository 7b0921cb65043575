//! `[ami]` and `[bundle]`: every value one EC2 accepts, and only boot modes the image can boot.

use std::collections::BTreeMap;

use super::{check_source_file, V};
use crate::ec2::{
    check_boot, check_volume as check_volume_rules, Delivery, Ec2BootMode, ImdsSupport, VolumeRequest, VolumeType,
};
use crate::manifest::{
    first_upload_region, AmiSettings, BundleSettings, DeprecateAfter, ExtraVolume, LaunchPermissions, RegionSettings,
    RootVolume,
};
use crate::platform::{Arch, BootMode};
use crate::recipe::error::{list, Span};
use crate::recipe::raw::{Loc, RawAmi, RawBundle, RawRegion, RawVolume};
use crate::recipe::size::{self, GIB};

/// EC2 allows 50 tags per resource; kiln adds its own (image SHA-256, recipe hash, name).
const MAX_USER_TAGS: usize = 45;

fn valid_region(r: &str) -> bool {
    // `us-east-1`, `eu-central-2`, `us-gov-west-1`, `ap-southeast-4`: a two-letter area,
    // one or more lowercase words, then a number.
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[0].chars().all(|c| c.is_ascii_lowercase())
        && parts[1..parts.len() - 1].iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts.last().is_some_and(|n| !n.is_empty() && n.len() <= 2 && n.chars().all(|c| c.is_ascii_digit()))
}

fn valid_account(a: &str) -> bool {
    a.len() == 12 && a.chars().all(|c| c.is_ascii_digit())
}

fn check_account(v: &mut V, a: &Loc<String>, key: &str) -> bool {
    if valid_account(&a.value) {
        return true;
    }
    v.err(
        a.span,
        key,
        format!("`{}` is not an AWS account id", a.value),
        Some("account ids are exactly 12 digits, like \"123456789012\"".into()),
    );
    false
}

fn gib_of(v: &mut V, s: &Loc<String>, key: &str) -> Option<u32> {
    match size::parse_bytes(&s.value) {
        Err(e) => {
            v.err(
                s.span,
                key,
                format!("invalid size: {e}"),
                Some(format!("{}; EBS volumes are whole GiB", size::ACCEPTED)),
            );
            None
        }
        Ok(b) if b % GIB != 0 || b == 0 => {
            v.err(
                s.span,
                key,
                format!("`{}` is not a whole number of GiB", s.value),
                Some("EBS volume sizes are whole GiB, like \"8GiB\"".into()),
            );
            None
        }
        Ok(b) => match u32::try_from(b / GIB) {
            Ok(g) => Some(g),
            Err(_) => {
                v.err(s.span, key, format!("`{}` is too large for a volume", s.value), None);
                None
            }
        },
    }
}

struct CheckedVolume {
    size_gib: Option<u32>,
    volume_type: VolumeType,
    iops: Option<u32>,
    throughput: Option<u32>,
}

/// A volume's type, size and performance, judged by EC2's rules ([`crate::ec2::check_volume`]),
/// each problem reported at the value it is about.
fn check_volume(v: &mut V, vol: &Loc<RawVolume>, prefix: &str, root: bool) -> Option<CheckedVolume> {
    let r = &vol.value;
    let volume_type = match &r.volume_type {
        None => VolumeType::Gp3,
        Some(t) => match v.one_of(t, &format!("{prefix}.type"), VolumeType::NAMES) {
            Some(t) => t.parse().expect("one of the names"),
            None => {
                // Without a type the other limits are unknown; the size can still be checked.
                if let Some(s) = &r.size {
                    gib_of(v, s, &format!("{prefix}.size"));
                }
                return None;
            }
        },
    };
    let size_given = r.size.is_some();
    let size_gib = r.size.as_ref().and_then(|s| gib_of(v, s, &format!("{prefix}.size")));
    if size_given && size_gib.is_none() {
        return None;
    }
    let req = VolumeRequest {
        volume_type,
        size_gib,
        iops: r.iops.as_ref().map(|l| l.value),
        throughput: r.throughput.as_ref().map(|l| l.value),
        root,
    };
    match check_volume_rules(&req) {
        Ok(values) => Some(CheckedVolume { size_gib, volume_type, iops: values.iops, throughput: values.throughput }),
        Err(problems) => {
            let header = Span { end: vol.span.start, ..vol.span };
            for p in problems {
                let span = match p.field {
                    "type" => r.volume_type.as_ref().map(|l| l.span),
                    "size" => r.size.as_ref().map(|l| l.span),
                    "iops" => r.iops.as_ref().map(|l| l.span),
                    "throughput" => r.throughput.as_ref().map(|l| l.span),
                    _ => None,
                };
                v.err(span.unwrap_or(header), format!("{prefix}.{}", p.field), p.message, p.help);
            }
            None
        }
    }
}

fn check_device(v: &mut V, d: &Loc<String>, key: &str) -> Option<char> {
    let letter = d.value.strip_prefix("/dev/sd").or_else(|| d.value.strip_prefix("/dev/xvd"));
    match letter {
        Some(l) if l.len() == 1 && ('b'..='z').contains(&l.chars().next().unwrap_or('a')) => l.chars().next(),
        _ => {
            v.err(
                d.span,
                key,
                format!("`{}` is not a device name for an extra volume", d.value),
                Some("use /dev/sdb … /dev/sdz or /dev/xvdb … /dev/xvdz (the root is /dev/xvda)".into()),
            );
            None
        }
    }
}

/// `[ami]`, judged part by part; each part reports its own problems, and the settings exist
/// only when no part found one.
pub(super) fn check_ami(
    v: &mut V,
    a: &Loc<RawAmi>,
    arch: Arch,
    boot: BootMode,
    image_bytes: Option<u64>,
    arch_from_flag: bool,
) -> Option<AmiSettings> {
    let r = &a.value;
    let before = v.diags.len();
    let name = match &r.name {
        None => "{name}-{arch}-{date}".to_string(),
        Some(n) => {
            check_ami_name(v, n);
            n.value.clone()
        }
    };
    check_description(v, r);
    let regions = check_regions(v, r);
    let (boot_mode, tpm) = check_boot_mode(v, a, arch, boot, arch_from_flag);
    let imds = check_imds(v, r);
    let root = check_root_volume(v, a, image_bytes);
    let volumes = check_extra_volumes(v, r, &regions.settings);
    let launch_permissions = check_launch_permissions(v, r);
    let tags = check_tags(v, r);
    let (encrypted, kms_key_arn) = check_encryption(v, r, &regions);
    let keep = check_keep(v, r);
    let ssm_parameters = check_ssm_parameters(v, r);
    let ssm_promote = check_ssm_promote(v, r, &ssm_parameters);
    let deprecate_after = check_deprecation(v, r, launch_permissions.public);
    let protect = check_protect(v, r);
    let days = |v: &mut V, f: &Option<Loc<String>>, field: &str| {
        let d = f.as_ref()?;
        crate::ec2::parse_days(&d.value, 1)
            .map_err(|why| v.err(d.span, field, why, Some("a number of days, like \"30d\"".into())))
            .ok()
    };
    let keep_if_launched_within_days = days(v, &r.keep_if_launched_within, "ami.keep_if_launched_within");
    let disable_before_delete_days = days(v, &r.disable_before_delete, "ami.disable_before_delete");
    let copy_within_minutes = r.copy_within.as_ref().and_then(|c| {
        crate::ec2::parse_copy_within(&c.value)
            .map_err(|why| {
                v.err(c.span, "ami.copy_within", why, Some("\"15m\" to \"48h\" in steps of 15 minutes".into()))
            })
            .ok()
    });

    if v.diags.len() != before {
        return None;
    }
    Some(AmiSettings {
        name,
        description: r.description.as_ref().map(|d| d.value.clone()),
        regions: regions.names,
        region_settings: regions.settings,
        root_volume: root?,
        ena: r.ena.as_ref().is_none_or(|e| e.value),
        sriov: r.sriov.as_ref().is_some_and(|s| s.value),
        tpm,
        imds,
        boot_mode,
        launch_permissions,
        tags,
        volumes,
        encrypted,
        kms_key_arn,
        keep,
        ssm_parameters,
        ssm_promote,
        deprecate_after,
        protect,
        keep_if_launched_within_days,
        disable_before_delete_days,
        copy_within_minutes,
    })
}

/// `protect`: `true`, `false`, or `"24h"` (protection with EC2's 24-hour cooldown).
fn check_protect(v: &mut V, r: &RawAmi) -> Option<crate::ec2::Protection> {
    use crate::recipe::raw::RawProtect;
    let p = r.protect.as_ref()?;
    match &p.value {
        RawProtect::Bool(true) => Some(crate::ec2::Protection::Enabled),
        RawProtect::Bool(false) => None,
        RawProtect::Text(t) if t == "24h" => Some(crate::ec2::Protection::EnabledWithCooldown),
        RawProtect::Text(t) => {
            v.err(
                p.span,
                "ami.protect",
                format!("`protect = \"{t}\"`: EC2's only cooldown is 24 hours"),
                Some("`protect = true`, or `protect = \"24h\"` to keep protection a day after it is removed".into()),
            );
            None
        }
    }
}

fn check_description(v: &mut V, r: &RawAmi) {
    if let Some(d) = &r.description {
        if d.value.len() > 255 {
            v.err(
                d.span,
                "ami.description",
                format!("the description is {} characters; EC2 allows 255", d.value.len()),
                None,
            );
        }
    }
}

/// `[ami].regions`: where the AMI goes, how each region after the first gets it, and the KMS
/// keys written in the entries.
struct Regions {
    names: Vec<String>,
    /// Regions after the first that are not plain copies with the default key.
    settings: BTreeMap<String, RegionSettings>,
    /// Each KMS key, judged once `encrypted` is known.
    keys: Vec<RegionKey>,
    /// The key written in the first region's entry, if any.
    first_entry_key: Option<String>,
}

struct RegionKey {
    region: String,
    arn: String,
    span: Span,
    field: String,
    via: Delivery,
}

fn check_regions(v: &mut V, r: &RawAmi) -> Regions {
    let mut names = Vec::new();
    let mut keys = Vec::new();
    let mut settings = BTreeMap::new();
    for (i, reg) in r.regions.iter().flat_map(|l| l.value.iter()).enumerate() {
        let name = &reg.value.name;
        if !valid_region(name) {
            v.err(
                reg.span,
                "ami.regions",
                format!("`{name}` is not an AWS region name"),
                Some("like \"us-east-1\" or \"eu-west-1\"".into()),
            );
            continue;
        } else if names.contains(name) {
            v.err(reg.span, "ami.regions", format!("region `{name}` is listed twice"), None);
            continue;
        }
        names.push(name.clone());
        let via = check_delivery(v, reg, i == 0);
        if let Some(k) = &reg.value.kms_key_arn {
            keys.push(RegionKey {
                region: name.clone(),
                arn: k.clone(),
                span: reg.span,
                field: format!("ami.regions.{name}.kms_key_arn"),
                via: if i == 0 { Delivery::Upload } else { via },
            });
        }
        if i > 0 && (via != Delivery::Copy || reg.value.kms_key_arn.is_some()) {
            settings.insert(name.clone(), RegionSettings::new(reg.value.kms_key_arn.clone(), via));
        }
    }
    let first_entry_key = r.regions.iter().flat_map(|l| l.value.first()).find_map(|f| f.value.kms_key_arn.clone());
    Regions { names, settings, keys, first_entry_key }
}

/// A region entry's `via`: a copy unless it says otherwise, and never a copy for the first
/// region, which receives the upload.
fn check_delivery(v: &mut V, reg: &Loc<RawRegion>, first: bool) -> Delivery {
    let name = &reg.value.name;
    let Some(via) = reg.value.via.as_deref() else { return Delivery::Copy };
    match via.parse::<Delivery>() {
        Ok(Delivery::Copy) if first => {
            v.err(
                reg.span,
                "ami.regions",
                format!("`{name}` is the first region, where the snapshot is uploaded: it cannot be a copy"),
                Some("leave `via` out of the first entry, or list the region you copy from first".into()),
            );
            Delivery::Copy
        }
        Ok(d) => d,
        Err(e) => {
            v.err(
                reg.span,
                "ami.regions",
                e.to_string(),
                Some("\"copy\" (CopyImage from the first region) or \"upload\" (the same blocks, uploaded there directly)".into()),
            );
            Delivery::Copy
        }
    }
}

/// Boot mode: from [image].boot unless set, and only one the image can actually boot; and
/// whether NitroTPM is asked for.
fn check_boot_mode(
    v: &mut V,
    a: &Loc<RawAmi>,
    arch: Arch,
    boot: BootMode,
    arch_from_flag: bool,
) -> (Ec2BootMode, bool) {
    let r = &a.value;
    let boot_mode = match &r.boot_mode {
        None => boot.ec2_boot_mode(),
        Some(b) => v
            .one_of(b, "ami.boot_mode", Ec2BootMode::NAMES)
            .map(|m| m.parse().expect("one of the names"))
            .unwrap_or(boot.ec2_boot_mode()),
    };
    let tpm = r.tpm.as_ref().is_some_and(|t| t.value);
    if r.boot_mode.is_some() || tpm {
        for p in check_boot(arch, boot, boot_mode, tpm, arch_from_flag) {
            let span = match p.field {
                "tpm" => r.tpm.as_ref().map(|t| t.span),
                _ => r.boot_mode.as_ref().map(|b| b.span),
            };
            v.err(span.unwrap_or(a.span), format!("ami.{}", p.field), p.message, p.help);
        }
    }
    (boot_mode, tpm)
}

/// IMDSv2 is required unless the recipe says `optional`.
fn check_imds(v: &mut V, r: &RawAmi) -> Option<ImdsSupport> {
    match &r.imds {
        None => Some(ImdsSupport::V2),
        Some(i) => match v.one_of(i, "ami.imds", &["v2.0", "optional"]) {
            Some("optional") => None,
            _ => Some(ImdsSupport::V2),
        },
    }
}

/// The root volume: its device, type, performance and size, which must hold the image. The
/// size is the image's own (whole GiB) when the recipe sets none, or None until it is built.
fn check_root_volume(v: &mut V, a: &Loc<RawAmi>, image_bytes: Option<u64>) -> Option<RootVolume> {
    let default_root = Loc { span: Span { end: a.span.start, ..a.span }, value: RawVolume::default() };
    let root_raw = a.value.root_volume.as_ref().unwrap_or(&default_root);
    for (key, span) in [
        ("encrypted", root_raw.value.encrypted.as_ref().map(|x| x.span)),
        ("kms_key_id", root_raw.value.kms_key_id.as_ref().map(|x| x.span)),
    ] {
        if let Some(span) = span {
            v.err(
                span,
                format!("ami.root_volume.{key}"),
                format!("`{key}` does not apply to the root volume"),
                Some(
                    "the root volume is as encrypted as its snapshot: set `encrypted` and `kms_key_arn` in [ami]"
                        .into(),
                ),
            );
        }
    }
    let device = match &root_raw.value.device {
        None => "/dev/xvda".to_string(),
        Some(d) => {
            v.one_of(d, "ami.root_volume.device", &["/dev/xvda", "/dev/sda1"]).unwrap_or("/dev/xvda").to_string()
        }
    };
    let root = check_volume(v, root_raw, "ami.root_volume", true);
    if let (Some(root), Some(bytes), Some(s)) = (&root, image_bytes, &root_raw.value.size) {
        if let Some(p) = root.size_gib.and_then(|g| crate::ec2::root_too_small(g, &s.value, bytes)) {
            v.err(s.span, "ami.root_volume.size", p.message, p.help);
        }
    }
    let image_gib = image_bytes.and_then(|b| u32::try_from(b.div_ceil(GIB)).ok());
    let root = root?;
    Some(RootVolume {
        device,
        size_gib: root.size_gib.or(image_gib),
        volume_type: root.volume_type,
        iops: root.iops,
        throughput: root.throughput,
        delete_on_termination: root_raw.value.delete_on_termination.as_ref().is_none_or(|d| d.value),
    })
}

/// `[[ami.volumes]]`: each needs a device of its own and a size; a KMS key needs encryption,
/// and cannot be used with a region of its own upload (keys are regional).
fn check_extra_volumes(v: &mut V, r: &RawAmi, region_settings: &BTreeMap<String, RegionSettings>) -> Vec<ExtraVolume> {
    let mut volumes = Vec::new();
    let mut letters: BTreeMap<char, &str> = BTreeMap::new();
    for (i, vol) in r.volumes.iter().flatten().enumerate() {
        let prefix = format!("ami.volumes[{i}]");
        let header = Span { end: vol.span.start, ..vol.span };
        let device = match &vol.value.device {
            None => {
                v.err(
                    header,
                    format!("{prefix}.device"),
                    "[[ami.volumes]] entry has no `device`",
                    Some("add `device = \"/dev/sdb\"`".into()),
                );
                None
            }
            Some(d) => {
                let l = check_device(v, d, &format!("{prefix}.device"));
                if let Some(l) = l {
                    if let Some(prev) = letters.insert(l, &d.value) {
                        v.err(
                            d.span,
                            format!("{prefix}.device"),
                            format!("`{}` is the same device as `{prev}`", d.value),
                            Some("/dev/sdX and /dev/xvdX name the same attachment point; use another letter".into()),
                        );
                    }
                }
                l.map(|_| d.value.clone())
            }
        };
        if vol.value.size.is_none() {
            v.err(
                header,
                format!("{prefix}.size"),
                "[[ami.volumes]] entry has no `size`",
                Some("add `size = \"100GiB\"`".into()),
            );
        }
        let checked = check_volume(v, vol, &prefix, false);
        let kms_key_id = vol.value.kms_key_id.as_ref().map(|k| k.value.clone());
        let encrypted = vol.value.encrypted.as_ref().map(|e| e.value).unwrap_or(kms_key_id.is_some());
        if let (Some(k), false) = (&vol.value.kms_key_id, encrypted) {
            v.err(k.span, format!("{prefix}.kms_key_id"), "`kms_key_id` needs `encrypted = true`", None);
        }
        if let (Some(k), Some(region)) = (&vol.value.kms_key_id, first_upload_region(region_settings)) {
            let p = crate::ec2::volume_keys_and_uploads(region);
            v.err(k.span, format!("{prefix}.kms_key_id"), p.message, p.help);
        }
        if let (Some(device), Some(c)) = (device, checked) {
            // A volume without a size was reported above; only sized ones get this far whole.
            if let Some(size_gib) = c.size_gib {
                volumes.push(ExtraVolume {
                    device,
                    size_gib,
                    volume_type: c.volume_type,
                    iops: c.iops,
                    throughput: c.throughput,
                    encrypted,
                    kms_key_id,
                    delete_on_termination: vol.value.delete_on_termination.as_ref().is_none_or(|d| d.value),
                });
            }
        }
    }
    volumes
}

/// Who may launch the AMI: accounts, organizations and OUs by well-formed id, and the public
/// only when the recipe says so.
fn check_launch_permissions(v: &mut V, r: &RawAmi) -> LaunchPermissions {
    let mut launch = LaunchPermissions::default();
    let Some(lp) = &r.launch_permissions else { return launch };
    let lp = &lp.value;
    for acc in lp.accounts.iter().flat_map(|l| l.value.iter()) {
        if check_account(v, acc, "ami.launch_permissions.accounts") {
            launch.accounts.push(acc.value.clone());
        }
    }
    for org in lp.organizations.iter().flat_map(|l| l.value.iter()) {
        if valid_org_arn(&org.value, false) {
            launch.organizations.push(org.value.clone());
        } else {
            v.err(
                org.span,
                "ami.launch_permissions.organizations",
                format!("`{}` is not an organization ARN", org.value),
                Some("like \"arn:aws:organizations::123456789012:organization/o-abcd123456\"".into()),
            );
        }
    }
    for ou in lp.organizational_units.iter().flat_map(|l| l.value.iter()) {
        if valid_org_arn(&ou.value, true) {
            launch.organizational_units.push(ou.value.clone());
        } else {
            v.err(
                ou.span,
                "ami.launch_permissions.organizational_units",
                format!("`{}` is not an organizational unit ARN", ou.value),
                Some("like \"arn:aws:organizations::123456789012:ou/o-abcd123456/ou-ab12-cdef3456\"".into()),
            );
        }
    }
    launch.public = lp.public.as_ref().is_some_and(|p| p.value);
    launch
}

/// The recipe's tags: as many as EC2 leaves room for beside kiln's own, each key and value
/// within EC2's limits.
fn check_tags(v: &mut V, r: &RawAmi) -> BTreeMap<String, String> {
    let mut tags = BTreeMap::new();
    let Some(t) = &r.tags else { return tags };
    if t.value.len() > MAX_USER_TAGS {
        v.err(
            t.span,
            "ami.tags",
            format!("{} tags; at most {MAX_USER_TAGS}", t.value.len()),
            Some("EC2 allows 50 tags per resource and kiln adds its own".into()),
        );
    }
    for (k, val) in &t.value {
        if k.is_empty() || k.len() > 128 || k.to_ascii_lowercase().starts_with("aws:") {
            v.err(
                val.span,
                format!("ami.tags.{k}"),
                format!("`{k}` is not a valid tag key"),
                Some("1 to 128 characters, not starting with `aws:`".into()),
            );
        } else if val.value.len() > 256 {
            v.err(val.span, format!("ami.tags.{k}"), "tag values are at most 256 characters", None);
        } else {
            tags.insert(k.clone(), val.value.clone());
        }
    }
    tags
}

/// Whether the snapshot is encrypted (by default, when any key is named) and the first
/// region's key, written either as `kms_key_arn` or in its `regions` entry (once); every key
/// judged against its region and how that region gets the AMI.
fn check_encryption(v: &mut V, r: &RawAmi, regions: &Regions) -> (bool, Option<String>) {
    if let (Some(top), Some(entry)) = (&r.kms_key_arn, &regions.first_entry_key) {
        if &top.value != entry {
            v.err(
                top.span,
                "ami.kms_key_arn",
                format!(
                    "`kms_key_arn` and the first `regions` entry name different keys for {}",
                    regions.names.first().map_or("the first region", String::as_str)
                ),
                Some("write the first region's key once".into()),
            );
        }
    }
    let top = r.kms_key_arn.as_ref().map(|k| RegionKey {
        region: regions.names.first().cloned().unwrap_or_default(),
        arn: k.value.clone(),
        span: k.span,
        field: "ami.kms_key_arn".into(),
        via: Delivery::Upload,
    });
    let keys: Vec<&RegionKey> = regions.keys.iter().chain(top.as_ref()).collect();
    let kms_key_arn = r.kms_key_arn.as_ref().map(|k| k.value.clone()).or(regions.first_entry_key.clone());
    let encrypted = r.encrypted.as_ref().map(|e| e.value).unwrap_or(!keys.is_empty());
    for k in keys {
        let region = Some(k.region.as_str()).filter(|r| !r.is_empty());
        if let Err(p) = crate::ec2::check_kms_key(&k.arn, region, k.via, encrypted) {
            v.err(k.span, k.field.clone(), p.message, p.help);
        }
    }
    (encrypted, kms_key_arn)
}

/// `keep`: EC2 allows at most 50,000 AMIs per region (a quota); a larger count keeps
/// everything, and 0 keeps nothing, so both are refused.
fn check_keep(v: &mut V, r: &RawAmi) -> Option<u32> {
    r.keep.as_ref().and_then(|k| match u32::try_from(k.value) {
        Ok(n @ 1..=50_000) => Some(n),
        _ => {
            v.err(
                k.span,
                "ami.keep",
                format!("`keep = {}` keeps no AMI at all or more than a region can hold", k.value),
                Some(
                    "keep the newest N AMIs of this image with N from 1 to 50000, or leave `keep` out to keep all"
                        .into(),
                ),
            );
            None
        }
    })
}

/// `[ami.ssm].parameters`: names SSM accepts, each once.
fn check_ssm_parameters(v: &mut V, r: &RawAmi) -> Vec<String> {
    let mut ssm_parameters = Vec::new();
    for p in r.ssm.iter().flat_map(|s| s.value.parameters.iter()).flat_map(|l| l.value.iter()) {
        match crate::ec2::check_ssm_parameter_name(&p.value) {
            Err(why) => v.err(
                p.span,
                "ami.ssm.parameters",
                format!("`{}` {why}", p.value),
                Some(format!(
                    "like \"/golden/{{name}}/{{arch}}/latest\"; placeholders: {}",
                    crate::ec2::SSM_PLACEHOLDERS.join(" ")
                )),
            ),
            Ok(()) if ssm_parameters.contains(&p.value) => {
                v.err(p.span, "ami.ssm.parameters", format!("`{}` is listed twice", p.value), None)
            }
            Ok(()) => ssm_parameters.push(p.value.clone()),
        }
    }
    ssm_parameters
}

/// `[ami.ssm] promote`: pointers one name each (no `{date}` or `{sha}`: those name a build),
/// apart from the parameters a publish writes.
fn check_ssm_promote(v: &mut V, r: &RawAmi, parameters: &[String]) -> Vec<String> {
    let mut promote: Vec<String> = Vec::new();
    for p in r.ssm.iter().flat_map(|s| s.value.promote.iter()).flat_map(|l| l.value.iter()) {
        let why = match crate::ec2::check_ssm_parameter_name(&p.value) {
            Err(why) => Some(format!("`{}` {why}", p.value)),
            Ok(()) if p.value.contains("{date}") || p.value.contains("{sha}") => Some(format!(
                "`{}` names one build ({{date}} or {{sha}}); a pointer that `kiln promote` moves names every build the same",
                p.value
            )),
            Ok(()) if parameters.contains(&p.value) => {
                Some(format!("`{}` is also in `parameters`, which every publish writes", p.value))
            }
            Ok(()) if promote.contains(&p.value) => Some(format!("`{}` is listed twice", p.value)),
            Ok(()) => None,
        };
        match why {
            Some(why) => v.err(
                p.span,
                "ami.ssm.promote",
                why,
                Some("like \"/golden/{name}/{arch}/latest\"; placeholders: {name} {arch} {region}".into()),
            ),
            None => promote.push(p.value.clone()),
        }
    }
    promote
}

/// `deprecate_after`, parsed once. Days are judged here; a fixed time again at publish time,
/// against the clock then.
fn check_deprecation(v: &mut V, r: &RawAmi, public: bool) -> Option<DeprecateAfter> {
    let d = r.deprecate_after.as_ref()?;
    let checked = DeprecateAfter::parse(&d.value).and_then(|dep| dep.when.check_days(public).map(|()| dep));
    match checked {
        Ok(dep) => Some(dep),
        Err(why) => {
            v.err(
                d.span,
                "ami.deprecate_after",
                why,
                Some(format!(
                    "days after publishing (\"180d\", at most {} for this AMI) or an RFC 3339 UTC time",
                    crate::ec2::max_deprecation_days(public)
                )),
            );
            None
        }
    }
}

/// The placeholders an AMI name may hold (see [`AmiSettings::name`]).
const AMI_PLACEHOLDERS: [&str; 4] = ["{name}", "{arch}", "{date}", "{sha}"];

fn check_ami_name(v: &mut V, n: &Loc<String>) {
    let mut rest = n.value.clone();
    for p in AMI_PLACEHOLDERS {
        rest = rest.replace(p, "x");
    }
    if let Some(start) = rest.find('{') {
        let bad: String = rest[start..].chars().take_while(|c| *c != '}').chain(std::iter::once('}')).collect();
        v.err(
            n.span,
            "ami.name",
            format!("unknown placeholder `{bad}` in the AMI name"),
            Some(format!("placeholders: {}", list(&AMI_PLACEHOLDERS))),
        );
        return;
    }
    // The placeholders stand for valid characters; the length counts the template as written.
    if !crate::ec2::valid_ami_name(&rest) || !(3..=128).contains(&n.value.len()) {
        v.err(
            n.span,
            "ami.name",
            format!("`{}` is not a valid AMI name", n.value),
            Some(format!("{}, plus the placeholders {}", crate::ec2::AMI_NAME_RULE, AMI_PLACEHOLDERS.join(" "))),
        );
    }
}

fn valid_org_arn(s: &str, ou: bool) -> bool {
    let Some(rest) = s.strip_prefix("arn:") else { return false };
    let parts: Vec<&str> = rest.splitn(5, ':').collect();
    if parts.len() != 5 || !parts[0].starts_with("aws") || parts[1] != "organizations" || !valid_account(parts[3]) {
        return false;
    }
    let resource = parts[4];
    if ou {
        resource.starts_with("ou/o-")
            && resource.matches('/').count() == 2
            && resource.rsplit('/').next().is_some_and(|x| x.starts_with("ou-"))
    } else {
        resource.starts_with("organization/o-") && resource.len() > "organization/o-".len()
    }
}

// ---- [bundle] -------------------------------------------------------------------------------

pub(super) fn check_bundle(v: &mut V, b: &Loc<RawBundle>, arch: Arch, boot: BootMode) -> Option<BundleSettings> {
    let r = &b.value;
    let before = v.diags.len();
    if arch == Arch::Arm64 {
        v.err(
            Span { end: b.span.start, ..b.span },
            "bundle",
            "instance-store bundles cannot be built for arm64",
            Some("instance-store roots exist only on older x86_64 instance families (C1, C3, D2, I2, M1, M2, M3, R3, X1), which boot legacy BIOS; use [ami] for arm64".into()),
        );
    }
    if !boot.has_bios() && arch == Arch::X86_64 {
        v.warnings.push(format!(
            "[bundle]: boot = \"{boot}\" cannot boot on the instance-store families, which boot legacy BIOS; set [image].boot = \"hybrid\" (or \"bios\")"
        ));
    }
    if let Some(a) = &r.account {
        check_account(v, a, "bundle.account");
    }
    let path = |v: &mut V, x: &Option<Loc<String>>, key: &str| {
        x.as_ref().map(|p| {
            let abs = v.resolve(p);
            check_source_file(v, p, key, &abs);
            abs
        })
    };
    let user_cert = path(v, &r.user_cert, "bundle.user_cert");
    let user_key = path(v, &r.user_key, "bundle.user_key");
    let ec2_cert = path(v, &r.ec2_cert, "bundle.ec2_cert");
    if let Some(u) = &r.upload {
        // The same rule `kiln bundle --upload` applies, so a recipe that checks clean uploads.
        if crate::ec2::S3Location::parse(&u.value).is_err() {
            v.err(
                u.span,
                "bundle.upload",
                format!("`{}` is not an S3 location", u.value),
                Some(
                    "write s3://BUCKET/PREFIX; bucket names are 3 to 63 lowercase letters, digits, `-` and `.`".into(),
                ),
            );
        }
    }
    if let Some(reg) = &r.region {
        if !valid_region(&reg.value) {
            v.err(
                reg.span,
                "bundle.region",
                format!("`{}` is not an AWS region name", reg.value),
                Some("like \"us-east-1\"".into()),
            );
        }
    }
    (v.diags.len() == before).then(|| BundleSettings {
        account: r.account.as_ref().map(|a| a.value.clone()),
        user_cert,
        user_key,
        ec2_cert,
        upload: r.upload.as_ref().map(|u| u.value.clone()),
        region: r.region.as_ref().map(|r| r.value.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions() {
        for ok in ["us-east-1", "eu-central-2", "us-gov-west-1", "ap-southeast-4", "il-central-1"] {
            assert!(valid_region(ok), "{ok}");
        }
        for bad in ["us-east", "useast1", "US-EAST-1", "us-east-100", "u-east-1", "us--1"] {
            assert!(!valid_region(bad), "{bad}");
        }
    }
}
