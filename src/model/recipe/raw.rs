//! The recipe as written: serde structs that mirror the TOML one to one, with unknown keys
//! refused and every value's position kept, so validation can point at it.
//!
//! Every field is optional here, because a recipe may take any value from the recipe it
//! extends; what is required is decided after merging, in `validate`. Enumerated values stay
//! strings until validation, so a bad one gets a message listing what is accepted rather than
//! serde's generic one.

use std::cell::Cell;
use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use super::error::{FileId, Span};

thread_local! {
    /// The file being deserialized, so [`Loc`] can say which file its span points into.
    static CURRENT_FILE: Cell<FileId> = const { Cell::new(0) };
}

/// Runs `f` with [`Loc`] spans attributed to `file`.
pub(crate) fn with_file<T>(file: FileId, f: impl FnOnce() -> T) -> T {
    let prev = CURRENT_FILE.with(|c| c.replace(file));
    let out = f();
    CURRENT_FILE.with(|c| c.set(prev));
    out
}

/// A value and where it is written: which recipe file, which bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Loc<T> {
    pub span: Span,
    pub value: T,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Loc<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = toml::Spanned::<T>::deserialize(d)?;
        let range = spanned.span();
        let file = CURRENT_FILE.with(|c| c.get());
        Ok(Loc { span: Span { file, start: range.start, end: range.end }, value: spanned.into_inner() })
    }
}

pub type LocList<T> = Loc<Vec<Loc<T>>>;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    pub extends: Option<Loc<String>>,
    pub image: Option<Loc<RawImage>>,
    pub packages: Option<Loc<RawPackages>>,
    pub files: Option<Vec<Loc<RawFile>>>,
    pub system: Option<Loc<RawSystem>>,
    pub ami: Option<Loc<RawAmi>>,
    pub bundle: Option<Loc<RawBundle>>,
    pub test: Option<Loc<RawTest>>,
    pub audit: Option<Loc<RawAudit>>,
    pub repositories: Option<Vec<Loc<RawRepository>>>,
    pub users: Option<Vec<Loc<RawUser>>>,
    pub steps: Option<Vec<Loc<RawStep>>>,
    pub secure_boot: Option<Loc<RawSecureBoot>>,
}

/// `[secure_boot]`: the key hierarchy (PEM certificates) and the db key that signs the boot
/// chain.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecureBoot {
    pub pk: Option<Loc<String>>,
    pub kek: Option<LocList<String>>,
    pub db: Option<LocList<String>>,
    pub dbx: Option<Loc<String>>,
    pub key: Option<Loc<String>>,
    pub generate: Option<Loc<bool>>,
}

/// One `[[repositories]]` entry: an apt repository beside Debian's, with its signing key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRepository {
    pub name: Option<Loc<String>>,
    pub uri: Option<Loc<String>>,
    pub suites: Option<LocList<String>>,
    pub components: Option<LocList<String>>,
    pub key: Option<Loc<String>>,
}

/// One `[[users]]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub name: Option<Loc<String>>,
    pub uid: Option<Loc<i64>>,
    pub groups: Option<LocList<String>>,
    pub shell: Option<Loc<String>>,
    pub home: Option<Loc<String>>,
    pub authorized_keys: Option<LocList<String>>,
}

/// One `[[steps]]` entry: a command or a script run inside the image's root.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub run: Option<Loc<String>>,
    pub script: Option<Loc<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub allow: Option<LocList<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTest {
    pub user: Option<Loc<String>>,
    pub commands: Option<LocList<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImage {
    pub name: Option<Loc<String>>,
    pub os: Option<Loc<String>>,
    pub arch: Option<Loc<String>>,
    pub boot: Option<Loc<String>>,
    pub size: Option<Loc<String>>,
    pub base: Option<Loc<RawBase>>,
    pub mirror: Option<Loc<String>>,
    pub snapshot: Option<Loc<String>>,
    pub apt_mirror: Option<Loc<String>>,
    pub apt_security_mirror: Option<Loc<String>>,
    pub components: Option<LocList<String>>,
    pub source_date_epoch: Option<Loc<i64>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBase {
    pub tarball: Option<Loc<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPackages {
    pub include: Option<LocList<String>>,
    pub exclude: Option<LocList<String>>,
    pub local: Option<LocList<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub path: Option<Loc<String>>,
    pub content: Option<Loc<String>>,
    pub source: Option<Loc<String>>,
    pub symlink: Option<Loc<String>>,
    pub dir: Option<Loc<bool>>,
    pub mode: Option<Loc<String>>,
    pub owner: Option<Loc<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSystem {
    pub hostname: Option<Loc<String>>,
    pub services: Option<Loc<RawServices>>,
    pub kernel_cmdline: Option<LocList<String>>,
    pub timezone: Option<Loc<String>>,
    pub locale: Option<Loc<String>>,
    pub network: Option<Loc<String>>,
    pub mount_esp: Option<Loc<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServices {
    pub enable: Option<LocList<String>>,
    pub disable: Option<LocList<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmi {
    pub name: Option<Loc<String>>,
    pub description: Option<Loc<String>>,
    pub regions: Option<LocList<RawRegion>>,
    pub root_volume: Option<Loc<RawVolume>>,
    pub ena: Option<Loc<bool>>,
    pub sriov: Option<Loc<bool>>,
    pub tpm: Option<Loc<bool>>,
    pub imds: Option<Loc<String>>,
    pub boot_mode: Option<Loc<String>>,
    pub launch_permissions: Option<Loc<RawLaunchPermissions>>,
    pub tags: Option<Loc<BTreeMap<String, Loc<String>>>>,
    pub volumes: Option<Vec<Loc<RawVolume>>>,
    pub encrypted: Option<Loc<bool>>,
    pub kms_key_arn: Option<Loc<String>>,
    pub keep: Option<Loc<i64>>,
    pub ssm: Option<Loc<RawSsm>>,
    pub deprecate_after: Option<Loc<String>>,
    pub protect: Option<Loc<RawProtect>>,
    pub keep_if_launched_within: Option<Loc<String>>,
    pub disable_before_delete: Option<Loc<String>>,
    pub copy_within: Option<Loc<String>>,
}

/// `[ami] protect`: `true`/`false`, or the cooldown `"24h"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawProtect {
    Bool(bool),
    Text(String),
}

/// One `[ami].regions` entry: a region name, or a table with the region's own settings
/// (`{ name = "eu-west-1", kms_key_arn = "…", via = "upload" }`).
#[derive(Debug, Clone, Default)]
pub struct RawRegion {
    pub name: String,
    pub kms_key_arn: Option<String>,
    pub via: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegionTable {
    name: String,
    kms_key_arn: Option<String>,
    via: Option<String>,
}

impl<'de> Deserialize<'de> for RawRegion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawRegion;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a region name, or a table like { name = \"eu-west-1\", kms_key_arn = \"…\", via = \"copy\" }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawRegion, E> {
                Ok(RawRegion { name: s.into(), ..RawRegion::default() })
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, m: M) -> Result<RawRegion, M::Error> {
                let t = RawRegionTable::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(RawRegion { name: t.name, kms_key_arn: t.kms_key_arn, via: t.via })
            }
        }
        d.deserialize_any(V)
    }
}

/// `[ami.ssm]`: SSM parameters that name the AMI.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSsm {
    pub parameters: Option<LocList<String>>,
    pub promote: Option<LocList<String>>,
}

/// `[ami].root_volume` and each `[[ami.volumes]]`; validation refuses the keys that do not
/// apply to the root volume.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVolume {
    pub device: Option<Loc<String>>,
    pub size: Option<Loc<String>>,
    #[serde(rename = "type")]
    pub volume_type: Option<Loc<String>>,
    pub iops: Option<Loc<i64>>,
    pub throughput: Option<Loc<i64>>,
    pub encrypted: Option<Loc<bool>>,
    pub kms_key_id: Option<Loc<String>>,
    pub delete_on_termination: Option<Loc<bool>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLaunchPermissions {
    pub accounts: Option<LocList<String>>,
    pub organizations: Option<LocList<String>>,
    pub organizational_units: Option<LocList<String>>,
    pub public: Option<Loc<bool>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBundle {
    pub account: Option<Loc<String>>,
    pub user_cert: Option<Loc<String>>,
    pub user_key: Option<Loc<String>>,
    pub ec2_cert: Option<Loc<String>>,
    pub upload: Option<Loc<String>>,
    pub region: Option<Loc<String>>,
}

// Merging for `extends`: the child's value wins key by key; tables merge recursively; the lists
// that add things (packages, files, services, kernel arguments) append the child's after the
// parent's. The merged table keeps the child's position when the child has the table.

fn pick<T>(parent: Option<T>, child: Option<T>) -> Option<T> {
    child.or(parent)
}

fn append<T>(parent: Option<LocList<T>>, child: Option<LocList<T>>) -> Option<LocList<T>> {
    match (parent, child) {
        (Some(mut p), Some(c)) => {
            p.value.extend(c.value);
            Some(Loc { span: c.span, value: p.value })
        }
        (p, c) => c.or(p),
    }
}

fn deep<T: Default>(parent: Option<Loc<T>>, child: Option<Loc<T>>, f: impl FnOnce(T, T) -> T) -> Option<Loc<T>> {
    match (parent, child) {
        (Some(p), Some(c)) => Some(Loc { span: c.span, value: f(p.value, c.value) }),
        (p, c) => c.or(p),
    }
}

/// Tables of arrays (`[[files]]`, `[[users]]`…) append: the parent's entries, then the child's.
fn entries<T>(parent: Option<Vec<T>>, child: Option<Vec<T>>) -> Option<Vec<T>> {
    match (parent, child) {
        (Some(mut p), Some(c)) => {
            p.extend(c);
            Some(p)
        }
        (p, c) => c.or(p),
    }
}

impl RawRecipe {
    /// `self` is the parent (the extended recipe), `child` the recipe that extends it.
    pub fn merge(self, child: RawRecipe) -> RawRecipe {
        RawRecipe {
            extends: child.extends,
            image: deep(self.image, child.image, RawImage::merge),
            packages: deep(self.packages, child.packages, |p, c| RawPackages {
                include: append(p.include, c.include),
                exclude: append(p.exclude, c.exclude),
                local: append(p.local, c.local),
            }),
            files: entries(self.files, child.files),
            repositories: entries(self.repositories, child.repositories),
            users: entries(self.users, child.users),
            steps: entries(self.steps, child.steps),
            system: deep(self.system, child.system, RawSystem::merge),
            ami: deep(self.ami, child.ami, RawAmi::merge),
            bundle: deep(self.bundle, child.bundle, |p, c| RawBundle {
                account: pick(p.account, c.account),
                user_cert: pick(p.user_cert, c.user_cert),
                user_key: pick(p.user_key, c.user_key),
                ec2_cert: pick(p.ec2_cert, c.ec2_cert),
                upload: pick(p.upload, c.upload),
                region: pick(p.region, c.region),
            }),
            audit: deep(self.audit, child.audit, |p, c| RawAudit { allow: append(p.allow, c.allow) }),
            test: deep(self.test, child.test, |p, c| RawTest {
                user: pick(p.user, c.user),
                commands: append(p.commands, c.commands),
            }),
            // Each key is one value: a child's db replaces the parent's, as a key hierarchy is
            // chosen whole.
            secure_boot: deep(self.secure_boot, child.secure_boot, |p, c| RawSecureBoot {
                pk: pick(p.pk, c.pk),
                kek: pick(p.kek, c.kek),
                db: pick(p.db, c.db),
                dbx: pick(p.dbx, c.dbx),
                key: pick(p.key, c.key),
                generate: pick(p.generate, c.generate),
            }),
        }
    }
}

impl RawImage {
    fn merge(p: RawImage, c: RawImage) -> RawImage {
        // A child that names a tarball base replaces an OS base and vice versa; validation
        // refuses a merged recipe that ends up with both.
        RawImage {
            name: pick(p.name, c.name),
            os: pick(p.os, c.os),
            arch: pick(p.arch, c.arch),
            boot: pick(p.boot, c.boot),
            size: pick(p.size, c.size),
            base: pick(p.base, c.base),
            mirror: pick(p.mirror, c.mirror),
            snapshot: pick(p.snapshot, c.snapshot),
            apt_mirror: pick(p.apt_mirror, c.apt_mirror),
            apt_security_mirror: pick(p.apt_security_mirror, c.apt_security_mirror),
            components: pick(p.components, c.components),
            source_date_epoch: pick(p.source_date_epoch, c.source_date_epoch),
        }
    }
}

impl RawSystem {
    fn merge(p: RawSystem, c: RawSystem) -> RawSystem {
        RawSystem {
            hostname: pick(p.hostname, c.hostname),
            services: deep(p.services, c.services, |p, c| RawServices {
                enable: append(p.enable, c.enable),
                disable: append(p.disable, c.disable),
            }),
            kernel_cmdline: append(p.kernel_cmdline, c.kernel_cmdline),
            timezone: pick(p.timezone, c.timezone),
            locale: pick(p.locale, c.locale),
            network: pick(p.network, c.network),
            mount_esp: pick(p.mount_esp, c.mount_esp),
        }
    }
}

impl RawAmi {
    fn merge(p: RawAmi, c: RawAmi) -> RawAmi {
        RawAmi {
            name: pick(p.name, c.name),
            description: pick(p.description, c.description),
            regions: pick(p.regions, c.regions),
            root_volume: deep(p.root_volume, c.root_volume, |p, c| RawVolume {
                device: pick(p.device, c.device),
                size: pick(p.size, c.size),
                volume_type: pick(p.volume_type, c.volume_type),
                iops: pick(p.iops, c.iops),
                throughput: pick(p.throughput, c.throughput),
                encrypted: pick(p.encrypted, c.encrypted),
                kms_key_id: pick(p.kms_key_id, c.kms_key_id),
                delete_on_termination: pick(p.delete_on_termination, c.delete_on_termination),
            }),
            ena: pick(p.ena, c.ena),
            sriov: pick(p.sriov, c.sriov),
            tpm: pick(p.tpm, c.tpm),
            imds: pick(p.imds, c.imds),
            boot_mode: pick(p.boot_mode, c.boot_mode),
            launch_permissions: deep(p.launch_permissions, c.launch_permissions, |p, c| RawLaunchPermissions {
                accounts: pick(p.accounts, c.accounts),
                organizations: pick(p.organizations, c.organizations),
                organizational_units: pick(p.organizational_units, c.organizational_units),
                public: pick(p.public, c.public),
            }),
            tags: deep(p.tags, c.tags, |mut p, c| {
                p.extend(c);
                p
            }),
            // A list of volumes is one value: the child's list replaces the parent's.
            volumes: pick(p.volumes, c.volumes),
            encrypted: pick(p.encrypted, c.encrypted),
            kms_key_arn: pick(p.kms_key_arn, c.kms_key_arn),
            keep: pick(p.keep, c.keep),
            ssm: pick(p.ssm, c.ssm),
            deprecate_after: pick(p.deprecate_after, c.deprecate_after),
            protect: pick(p.protect, c.protect),
            keep_if_launched_within: pick(p.keep_if_launched_within, c.keep_if_launched_within),
            disable_before_delete: pick(p.disable_before_delete, c.disable_before_delete),
            copy_within: pick(p.copy_within, c.copy_within),
        }
    }
}
