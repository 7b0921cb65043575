//! Raw (merged) recipe → [`Recipe`]: every rule a value must follow, each failure reported at
//! the value's position with what is accepted. Problems are collected, not stopped at, so one
//! `kiln check` shows all of them.
//!
//! This module holds the whole-recipe pass and `[image]`'s own keys; each section's rules are
//! a module of their own: [`base`] (the root's source and `[packages]`), [`service`]
//! (`[[repositories]]`, `[packages].local`, `[[users]]`, `[[steps]]`), [`files`], [`system`],
//! [`aws`] (`[ami]` and `[bundle]`, with EC2's rules from `crate::ec2`), [`secure_boot`]. [`hash`] is the recipe
//! hash, whose file reading lives in `recipe::digest`; [`diagnose`] turns the TOML parser's
//! errors into the same kind of diagnostic.
//!
//! A `check_*` function reports what it finds wrong; one that returns an `Option` returns
//! `None` for what it refused and, where the key is optional, `Some(None)` for a key left out.
mod aws;
mod base;
mod diagnose;
mod files;
mod hash;
mod secure_boot;
mod service;
mod system;

use aws::{check_ami, check_bundle};
use base::{check_base, check_packages};
pub(super) use diagnose::{entry_lines, toml_diagnostic};
use files::{check_file, check_generated_conflicts, check_source_file};
use hash::recipe_hash;
use secure_boot::check_secure_boot;
use service::check_service;
use system::check_system;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{list, list_and, nearest, Diagnostic, SourceMap, Span};
use super::raw::{Loc, RawFile, RawImage, RawRecipe, RawSystem, RawTest};
use super::size::{self, DiskSize, MIB, TIB};
use super::{
    default_boot, Base, FileContent, FileDigests, FileEntry, FileKind, Loaded, Network, Os, Recipe, RecipeError,
    System, TestSpec,
};
use crate::platform::{Arch, BootMode};

/// Smallest image worth building: a GPT, an ESP and an ext4 root do not fit in less.
const MIN_IMAGE_BYTES: u64 = 64 * MIB;

/// EBS's largest volume (io2 Block Express, and gp3 since 2025) is 64 TiB.
const MAX_IMAGE_BYTES: u64 = 64 * TIB;

/// 9999-12-31T23:59:59Z: later dates do not fit the formats timestamps are written in.
const MAX_EPOCH: i64 = 253_402_300_799;

struct V<'a> {
    src: &'a SourceMap,
    /// With the span they point at, so they can be reported in file order.
    diags: Vec<(Span, Diagnostic)>,
    warnings: Vec<String>,
}

impl V<'_> {
    fn err(&mut self, span: Span, key: impl Into<String>, message: impl Into<String>, help: Option<String>) {
        let d = self.src.diagnostic(span, Some(key.into()), message.into(), help);
        self.diags.push((span, d));
    }
    fn into_error(mut self) -> RecipeError {
        self.diags.sort_by_key(|(s, _)| (s.file, s.start));
        RecipeError::Invalid { diagnostics: self.diags.into_iter().map(|(_, d)| d).collect() }
    }
    /// `file:line:col` of a span, for messages from later stages.
    fn origin(&self, span: Span) -> String {
        let (p, _) = self.src.locate(span);
        format!("{}:{}:{}", p.file.display(), p.line, p.column)
    }
    /// Resolves a path written in a recipe against that recipe's own directory.
    fn resolve(&self, at: &Loc<String>) -> PathBuf {
        self.src.files[at.span.file].dir().join(&at.value)
    }
    /// Whether `at` is the first of its value (in `seen`, with where each was); a repeat is
    /// reported as `message`, with where the first one is.
    fn first_use(&mut self, seen: &mut BTreeMap<String, Span>, at: &Loc<String>, key: String, message: String) -> bool {
        if let Some(first) = seen.get(&at.value) {
            let first_at = self.origin(*first);
            self.err(at.span, key, message, Some(format!("first at {first_at}")));
            return false;
        }
        seen.insert(at.value.clone(), at.span);
        true
    }
    /// Checks `value` is one of `accepted`, suggesting the nearest otherwise.
    fn one_of<'v>(&mut self, at: &'v Loc<String>, key: &str, accepted: &[&str]) -> Option<&'v str> {
        if accepted.contains(&at.value.as_str()) {
            return Some(&at.value);
        }
        let mut help = format!("accepted values: {}", list(accepted));
        if let Some(s) = nearest(&at.value, accepted.iter().copied()) {
            help = format!("did you mean `{s}`? {help}");
        }
        let short = key.rsplit('.').next().unwrap_or(key);
        self.err(at.span, key, format!("`{}` is not a valid `{short}`", at.value), Some(help));
        None
    }
}

/// Where a missing key is reported: the start of the table that should hold it, the line a
/// reader looks at.
fn header(table: Span) -> Span {
    Span { end: table.start, ..table }
}

/// Where to point when a required key is missing: the table that should hold it, or the start
/// of the recipe given on the command line.
fn at_or_top<T>(table: Option<&Loc<T>>) -> Span {
    table.map(|t| header(t.span)).unwrap_or(Span { file: 0, start: 0, end: 0 })
}

/// One entry of an array of tables (`[[files]]`, `[[users]]`, …), as diagnostics name it.
struct Entry {
    array: &'static str,
    index: usize,
    span: Span,
}

impl Entry {
    /// `users[2]`: the entry as a whole.
    fn name(&self) -> String {
        format!("{}[{}]", self.array, self.index)
    }
    /// `users[2].uid`: one of its keys.
    fn key(&self, key: &str) -> String {
        format!("{}[{}].{key}", self.array, self.index)
    }
    /// Where a key the entry lacks is reported: its `[[…]]` line.
    fn header(&self) -> Span {
        header(self.span)
    }
}

/// The entries of the array of tables `array`, in recipe order.
fn entries<'a, T>(array: &'static str, list: &'a Option<Vec<Loc<T>>>) -> impl Iterator<Item = (Entry, &'a T)> {
    list.iter().flatten().enumerate().map(move |(index, at)| (Entry { array, index, span: at.span }, &at.value))
}

/// Checks the merged recipe section by section. Diagnostics are reported in file order; where
/// two point at the same place (a missing `name` and a missing `os`, both at `[image]`), in the
/// order of the checks below.
pub(super) fn validate(path: &Path, loaded: Arc<Loaded>, arch_override: Option<Arch>) -> Result<Recipe, RecipeError> {
    let raw: &RawRecipe = &loaded.merged;
    let mut v = V { src: &loaded.sources, diags: Vec::new(), warnings: Vec::new() };
    let default_image = RawImage::default();
    let image = raw.image.as_ref().map_or(&default_image, |i| &i.value);
    let image_header = at_or_top(raw.image.as_ref());

    // [image]
    let name = check_name(&mut v, image.name.as_ref(), image_header);
    let arch = check_arch(&mut v, image.arch.as_ref(), arch_override);
    let boot = check_boot(&mut v, image.boot.as_ref(), arch, arch_override.is_some());
    let size = image.size.as_ref().map_or(DiskSize::Auto, |s| check_image_size(&mut v, s));
    let (os, base) = check_base(&mut v, image, image_header);
    let source_date_epoch = image.source_date_epoch.as_ref().and_then(|e| check_source_date_epoch(&mut v, e));

    // [packages]
    let (packages, exclude_packages) = check_packages(&mut v, raw, &base, arch);

    // [[repositories]], [packages].local, [[users]], [[steps]]: the service layer.
    let service = check_service(&mut v, raw, &base);

    // [[files]]
    let files: Vec<FileEntry> = entries("files", &raw.files).filter_map(|(e, f)| check_file(&mut v, &e, f)).collect();

    // [system], and the files it would have kiln write over the recipe's.
    let system = match &raw.system {
        Some(s) => check_system(&mut v, &s.value, boot, &base, &packages),
        None => System::default(),
    };
    check_generated_conflicts(&mut v, &raw.files, &system);

    // [ami], [bundle], [test], [audit]
    let image_bytes = match size {
        DiskSize::Bytes(b) => Some(b),
        DiskSize::Auto => None,
    };
    let ami = raw.ami.as_ref().map(|a| check_ami(&mut v, a, arch, boot, image_bytes, arch_override.is_some()));
    let bundle = raw.bundle.as_ref().map(|b| check_bundle(&mut v, b, arch, boot));
    let ami_boot_mode = raw.ami.as_ref().and_then(|a| a.value.boot_mode.as_ref()).map(|b| b.span);
    let secure_boot = raw
        .secure_boot
        .as_ref()
        .and_then(|s| check_secure_boot(&mut v, s, boot, ami.as_ref().and_then(|a| a.as_ref()), ami_boot_mode));
    let test = raw.test.as_ref().map(|t| check_test(&mut v, &t.value)).unwrap_or_default();
    let audit_allow = check_audit_allow(&mut v, raw);

    if !v.diags.is_empty() {
        return Err(v.into_error());
    }
    let sha256 = recipe_hash(&mut v, &loaded.digests, raw, &files, &base, &service, secure_boot.as_ref());
    if !v.diags.is_empty() {
        return Err(v.into_error());
    }
    let warnings = v.warnings;
    Ok(Recipe {
        path: path.to_path_buf(),
        sha256,
        name,
        os,
        arch,
        boot,
        size,
        base,
        packages,
        exclude_packages,
        files,
        service,
        system,
        source_date_epoch,
        ami: ami.flatten(),
        bundle: bundle.flatten(),
        secure_boot,
        test,
        audit_allow,
        warnings,
        loaded: loaded.clone(),
    })
}

/// `name`, which every recipe needs: outputs are named after it.
fn check_name(v: &mut V, name: Option<&Loc<String>>, image_header: Span) -> String {
    let Some(n) = name else {
        v.err(
            image_header,
            "image.name",
            "missing `name` in [image]",
            Some("every recipe needs a name, like `name = \"debian-12-minimal\"`; outputs are called NAME-ARCH".into()),
        );
        return String::new();
    };
    let s = &n.value;
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        v.err(
            n.span,
            "image.name",
            format!("`{s}` is not a valid image name"),
            Some("1 to 64 characters: letters, digits, `.`, `_` and `-`, starting with a letter or digit (it becomes a file name)".into()),
        );
    }
    s.clone()
}

/// `arch`; `--arch` wins over it, and it is not even checked then.
fn check_arch(v: &mut V, arch: Option<&Loc<String>>, arch_override: Option<Arch>) -> Arch {
    match (arch, arch_override) {
        (_, Some(a)) => a,
        (None, None) => super::DEFAULT_ARCH,
        (Some(a), None) => match Arch::parse(&a.value) {
            Some(arch) => arch,
            None => {
                v.one_of(a, "image.arch", &["x86_64", "arm64"]);
                super::DEFAULT_ARCH
            }
        },
    }
}

/// `boot`, which must be one the architecture's machines can start.
fn check_boot(v: &mut V, boot: Option<&Loc<String>>, arch: Arch, arch_overridden: bool) -> BootMode {
    let mode = match boot {
        None => default_boot(arch),
        Some(b) => match v.one_of(b, "image.boot", &["uefi", "bios", "hybrid"]) {
            Some("bios") => BootMode::Bios,
            Some("hybrid") => BootMode::Hybrid,
            _ => BootMode::Uefi,
        },
    };
    if arch == Arch::Arm64 && mode.has_bios() {
        let b = boot.expect("arm64 defaults to uefi");
        let via = if arch_overridden { " (arm64 was chosen with --arch)" } else { "" };
        v.err(
            b.span,
            "image.boot",
            format!("boot = \"{}\" cannot be built for arm64{via}: arm64 machines have no legacy BIOS", mode),
            Some("Graviton instances and QEMU's virt machine boot UEFI only; use boot = \"uefi\" for arm64".into()),
        );
    }
    mode
}

fn check_source_date_epoch(v: &mut V, e: &Loc<i64>) -> Option<i64> {
    if (0..=MAX_EPOCH).contains(&e.value) {
        return Some(e.value);
    }
    v.err(
        e.span,
        "image.source_date_epoch",
        format!("source_date_epoch {} is out of range", e.value),
        Some(format!("seconds since 1970-01-01 UTC, from 0 to {MAX_EPOCH} (year 9999)")),
    );
    None
}

/// `[audit].allow`: each an absolute path to one file, as the audit reports them.
fn check_audit_allow(v: &mut V, raw: &RawRecipe) -> Vec<String> {
    let mut allow = Vec::new();
    for a in raw.audit.iter().flat_map(|a| a.value.allow.iter()).flat_map(|l| &l.value) {
        if a.value.starts_with('/') && !a.value.ends_with('/') && !a.value.split('/').any(|c| c == ".." || c == ".") {
            allow.push(a.value.clone());
        } else {
            v.err(
                a.span,
                "audit.allow",
                format!("`{}` is not an absolute path to one file", a.value),
                Some("write the file's absolute path in the image, like \"/etc/app/tls.key\"".into()),
            );
        }
    }
    allow
}

fn check_test(v: &mut V, t: &RawTest) -> TestSpec {
    let user = t.user.as_ref().and_then(|u| {
        let s = &u.value;
        let ok = service::valid_user_name(s);
        if !ok {
            v.err(u.span, "test.user", format!("`{s}` is not a user name"), Some(service::USER_NAME_HELP.into()));
        }
        ok.then(|| s.clone())
    });
    let mut commands = Vec::new();
    for c in t.commands.iter().flat_map(|l| &l.value) {
        if c.value.trim().is_empty() {
            v.err(
                c.span,
                "test.commands",
                "an empty command",
                Some("each entry is a shell command run over SSH; it must exit 0".into()),
            );
        } else {
            commands.push(c.value.clone());
        }
    }
    TestSpec { user, commands }
}

fn check_image_size(v: &mut V, s: &Loc<String>) -> DiskSize {
    match size::parse_disk_size(&s.value) {
        Err(e) => {
            v.err(
                s.span,
                "image.size",
                format!("invalid `size`: {e}"),
                Some(format!("{} or \"auto\"", size::ACCEPTED)),
            );
            DiskSize::Auto
        }
        Ok(DiskSize::Bytes(b)) if b % MIB != 0 => {
            v.err(
                s.span,
                "image.size",
                format!("`size` {} is not a whole number of MiB", s.value),
                Some("partitions are aligned to 1 MiB, so the disk size must be too".into()),
            );
            DiskSize::Auto
        }
        Ok(DiskSize::Bytes(b)) if !(MIN_IMAGE_BYTES..=MAX_IMAGE_BYTES).contains(&b) => {
            v.err(
                s.span,
                "image.size",
                format!("`size` {} is out of range", s.value),
                Some(format!(
                    "from {} (room for a partition table, an ESP and a root) to {} (EBS's largest volume)",
                    size::display_bytes(MIN_IMAGE_BYTES),
                    size::display_bytes(MAX_IMAGE_BYTES)
                )),
            );
            DiskSize::Auto
        }
        Ok(d) => d,
    }
}

#[cfg(test)]
mod tests {
    use super::base::valid_package;
    use super::files::{image_path_problem, parse_mode, parse_owner_part};
    use super::system::valid_hostname;

    #[test]
    fn package_names() {
        for ok in
            ["nginx", "openssh-server", "libc6", "g++", "linux-image-cloud-amd64", "nginx=1.22.1-9", "ca-certificates"]
        {
            assert!(valid_package(ok), "{ok}");
        }
        for bad in ["Nginx", "a", "-x", "nginx=", "nginx =1", "foo bar", "nginx=abc"] {
            assert!(!valid_package(bad), "{bad}");
        }
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644"), Some(0o644));
        assert_eq!(parse_mode("644"), Some(0o644));
        assert_eq!(parse_mode("4755"), Some(0o4755));
        assert_eq!(parse_mode("0o600"), Some(0o600));
        assert_eq!(parse_mode("0888"), None);
        assert_eq!(parse_mode("17777"), None);
        assert_eq!(parse_mode(""), None);
    }

    #[test]
    fn owners() {
        assert_eq!(parse_owner_part("root"), Some((0, None)));
        assert_eq!(parse_owner_part("33"), Some((33, None)));
        assert_eq!(parse_owner_part("www-data"), Some((0, Some("www-data".into()))));
        assert_eq!(parse_owner_part("4294967295"), None);
        assert_eq!(parse_owner_part("Bad"), None);
        assert_eq!(parse_owner_part(""), None);
    }

    #[test]
    fn paths_and_hostnames() {
        assert!(image_path_problem("/etc/motd").is_none());
        for bad in ["etc/motd", "/", "/etc/", "/etc//motd", "/etc/../x", "/./x"] {
            assert!(image_path_problem(bad).is_some(), "{bad}");
        }
        assert!(valid_hostname("golden"));
        assert!(valid_hostname("web-1.example"));
        assert!(!valid_hostname("-web"));
        assert!(!valid_hostname("web_1"));
    }
}
