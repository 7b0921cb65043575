//! Raw (merged) recipe → [`Recipe`]: every rule a value must follow, each failure reported at
//! the value's position with what is accepted. Problems are collected, not stopped at, so one
//! `kiln check` shows all of them.
//!
//! [`diagnose`] turns the TOML parser's errors into the same kind of diagnostic; [`aws`] holds
//! the `[ami]` and `[bundle]` rules.

mod aws;
mod diagnose;

use aws::{check_ami, check_bundle};
pub(super) use diagnose::{entry_lines, toml_diagnostic};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::error::{list, list_and, nearest, Diagnostic, SourceMap, Span};
use super::raw::{Loc, RawFile, RawImage, RawRecipe, RawSystem, RawTest};
use super::size::{self, DiskSize, MIB, TIB};
use super::{
    default_boot, Base, DigestCache, FileContent, FileEntry, FileKind, Loaded, Network, Os, Recipe, RecipeError,
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

/// Where to point when a required key is missing: the table that should hold it, or the start
/// of the recipe given on the command line.
fn at_or_top<T>(table: Option<&Loc<T>>) -> Span {
    table.map(|t| Span { end: t.span.start, ..t.span }).unwrap_or(Span { file: 0, start: 0, end: 0 })
}

pub(super) fn validate(path: &Path, loaded: Arc<Loaded>, arch_override: Option<Arch>) -> Result<Recipe, RecipeError> {
    let raw: &RawRecipe = &loaded.merged;
    let mut v = V { src: &loaded.sources, diags: Vec::new(), warnings: Vec::new() };
    let default_image = Loc { span: at_or_top::<()>(None), value: RawImage::default() };
    let image_loc = raw.image.as_ref().unwrap_or(&default_image);
    let image = &image_loc.value;

    // [image]
    let name = match &image.name {
        Some(n) => {
            check_name(&mut v, n);
            n.value.clone()
        }
        None => {
            v.err(
                at_or_top(raw.image.as_ref()),
                "image.name",
                "missing `name` in [image]",
                Some(
                    "every recipe needs a name, like `name = \"debian-12-minimal\"`; outputs are called NAME-ARCH"
                        .into(),
                ),
            );
            String::new()
        }
    };
    let arch = match (&image.arch, arch_override) {
        (_, Some(a)) => a,
        (None, None) => super::DEFAULT_ARCH,
        (Some(a), None) => match Arch::parse(&a.value) {
            Some(arch) => arch,
            None => {
                v.one_of(a, "image.arch", &["x86_64", "arm64"]);
                super::DEFAULT_ARCH
            }
        },
    };
    let boot = match &image.boot {
        None => default_boot(arch),
        Some(b) => match v.one_of(b, "image.boot", &["uefi", "bios", "hybrid"]) {
            Some("bios") => BootMode::Bios,
            Some("hybrid") => BootMode::Hybrid,
            _ => BootMode::Uefi,
        },
    };
    if arch == Arch::Arm64 && boot.has_bios() {
        let b = image.boot.as_ref().expect("arm64 defaults to uefi");
        let via = if arch_override.is_some() { " (arm64 was chosen with --arch)" } else { "" };
        v.err(
            b.span,
            "image.boot",
            format!("boot = \"{}\" cannot be built for arm64{via}: arm64 machines have no legacy BIOS", boot),
            Some("Graviton instances and QEMU's virt machine boot UEFI only; use boot = \"uefi\" for arm64".into()),
        );
    }
    let size = match &image.size {
        None => DiskSize::Auto,
        Some(s) => check_image_size(&mut v, s),
    };
    let (os, base) = check_base(&mut v, image, at_or_top(raw.image.as_ref()));
    let source_date_epoch = image.source_date_epoch.as_ref().and_then(|e| {
        if (0..=MAX_EPOCH).contains(&e.value) {
            Some(e.value)
        } else {
            v.err(
                e.span,
                "image.source_date_epoch",
                format!("source_date_epoch {} is out of range", e.value),
                Some(format!("seconds since 1970-01-01 UTC, from 0 to {MAX_EPOCH} (year 9999)")),
            );
            None
        }
    });

    // [packages]
    let (packages, exclude_packages) = check_packages(&mut v, raw, &base, arch);

    // [[files]]
    let files: Vec<FileEntry> =
        raw.files.iter().flatten().enumerate().filter_map(|(i, f)| check_file(&mut v, i, f)).collect();

    // [system]
    let system = match &raw.system {
        Some(s) => check_system(&mut v, &s.value, boot, &base, &packages),
        None => System::default(),
    };
    check_generated_conflicts(&mut v, raw.files.as_deref().unwrap_or_default(), &system);

    let image_bytes = match size {
        DiskSize::Bytes(b) => Some(b),
        DiskSize::Auto => None,
    };
    let ami = raw.ami.as_ref().map(|a| check_ami(&mut v, a, arch, boot, image_bytes, arch_override.is_some()));
    let bundle = raw.bundle.as_ref().map(|b| check_bundle(&mut v, b, arch, boot));
    let test = raw.test.as_ref().map(|t| check_test(&mut v, &t.value)).unwrap_or_default();
    let mut audit_allow = Vec::new();
    for a in raw.audit.iter().flat_map(|a| a.value.allow.iter()).flat_map(|l| &l.value) {
        if a.value.starts_with('/') && !a.value.ends_with('/') && !a.value.split('/').any(|c| c == ".." || c == ".") {
            audit_allow.push(a.value.clone());
        } else {
            v.err(
                a.span,
                "audit.allow",
                format!("`{}` is not an absolute path to one file", a.value),
                Some("write the file's absolute path in the image, like \"/etc/app/tls.key\"".into()),
            );
        }
    }

    if !v.diags.is_empty() {
        return Err(v.into_error());
    }
    let sha256 = recipe_hash(&mut v, &loaded.digests, &raw.files, &files, &base, &image.base);
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
        system,
        source_date_epoch,
        ami: ami.flatten(),
        bundle: bundle.flatten(),
        test,
        audit_allow,
        warnings,
        loaded: loaded.clone(),
    })
}

fn check_test(v: &mut V, t: &RawTest) -> TestSpec {
    let user = t.user.as_ref().and_then(|u| {
        let s = &u.value;
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
        if !ok {
            v.err(
                u.span,
                "test.user",
                format!("`{s}` is not a user name"),
                Some("a login name as Debian's adduser accepts it: lower-case letters, digits, `_` and `-`, starting with a letter or `_`, at most 32 characters".into()),
            );
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

fn check_name(v: &mut V, n: &Loc<String>) {
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

fn check_base(v: &mut V, image: &RawImage, header: Span) -> (Option<Os>, Base) {
    let tarball = image.base.as_ref().map(|b| match &b.value.tarball {
        Some(t) => Some(t),
        None => {
            v.err(
                b.span,
                "image.base",
                "`base` needs a `tarball`",
                Some("write `base = { tarball = \"rootfs.tar\" }`, or leave `base` out and set `os`".into()),
            );
            None
        }
    });
    if let Some(t) = tarball {
        let Some(t) = t else { return (None, Base::Tarball(PathBuf::new())) };
        for (key, val) in [
            ("os", &image.os),
            ("mirror", &image.mirror),
            ("snapshot", &image.snapshot),
            ("apt_mirror", &image.apt_mirror),
            ("apt_security_mirror", &image.apt_security_mirror),
        ] {
            if let Some(val) = val {
                v.err(
                    val.span,
                    format!("image.{key}"),
                    format!("`{key}` cannot be combined with `base.tarball`"),
                    Some("a tarball base is used as it is; remove one of the two".into()),
                );
            }
        }
        if let Some(c) = &image.components {
            v.err(c.span, "image.components", "`components` cannot be combined with `base.tarball`", None);
        }
        let path = v.resolve(t);
        check_source_file(v, t, "image.base.tarball", &path);
        return (None, Base::Tarball(path));
    }

    let os = match &image.os {
        None => {
            v.err(
                header,
                "image.os",
                "missing `os` in [image]",
                Some(format!(
                    "set `os` to {}, or start from a root tarball with `base = {{ tarball = \"rootfs.tar\" }}`",
                    list(&Os::ALL.map(Os::as_str))
                )),
            );
            None
        }
        Some(o) => match Os::parse(&o.value) {
            Some(os) => Some(os),
            None => {
                let accepted = Os::ALL.map(Os::as_str);
                // Codenames are a natural thing to write; point to the spelling kiln uses.
                let by_codename = Os::ALL.into_iter().find(|os| os.suite() == o.value.to_ascii_lowercase());
                let mut help = format!("accepted values: {}", list(&accepted));
                if let Some(os) = by_codename {
                    help = format!("did you mean `{}` ({})? {help}", os.as_str(), os.suite());
                } else if let Some(s) = nearest(&o.value, accepted) {
                    help = format!("did you mean `{s}`? {help}");
                }
                v.err(o.span, "image.os", format!("`{}` is not a supported `os`", o.value), Some(help));
                None
            }
        },
    };
    let snapshot = image.snapshot.as_ref().and_then(|s| {
        let ok = s.value.len() == 16
            && s.value.char_indices().all(|(i, c)| match i {
                8 => c == 'T',
                15 => c == 'Z',
                _ => c.is_ascii_digit(),
            });
        if ok {
            Some(s)
        } else {
            v.err(
                s.span,
                "image.snapshot",
                format!("`{}` is not a snapshot timestamp", s.value),
                Some("write it as YYYYMMDDTHHMMSSZ in UTC, like \"20240601T000000Z\"".into()),
            );
            None
        }
    });
    let mirror = image.mirror.as_ref().and_then(|m| {
        let u = archive_url(v, m, "image.mirror")?;
        if u.contains("{snapshot}") != image.snapshot.is_some() {
            let help = if image.snapshot.is_some() {
                "with `snapshot` set, the mirror must say where the timestamp goes, like \"https://snapshots.example.org/archive/debian/{snapshot}\""
            } else {
                "`{snapshot}` in the mirror needs `snapshot = \"YYYYMMDDTHHMMSSZ\"` in [image]"
            };
            v.err(m.span, "image.mirror", "`mirror` and `snapshot` do not agree", Some(help.into()));
            return None;
        }
        Some(match snapshot {
            Some(s) => u.replace("{snapshot}", &s.value),
            None => u.clone(),
        })
    });
    let apt_mirror = image.apt_mirror.as_ref().and_then(|m| archive_url(v, m, "image.apt_mirror")).cloned();
    let apt_security_mirror =
        image.apt_security_mirror.as_ref().and_then(|m| archive_url(v, m, "image.apt_security_mirror")).cloned();
    if let (Some(s), None) = (&image.snapshot, &image.mirror) {
        v.err(
            s.span,
            "image.snapshot",
            "`snapshot` needs a `mirror` that serves snapshots",
            Some("kiln knows no snapshot service of its own: set `mirror` to one with a `{snapshot}` placeholder, like \"https://snapshots.example.org/archive/debian/{snapshot}\"".into()),
        );
    }
    const COMPONENTS: [&str; 4] = ["main", "contrib", "non-free", "non-free-firmware"];
    let components = match &image.components {
        None => vec!["main".to_string()],
        Some(c) => {
            let mut out: Vec<String> = Vec::new();
            for comp in &c.value {
                if v.one_of(comp, "image.components", &COMPONENTS).is_some() && !out.contains(&comp.value) {
                    out.push(comp.value.clone());
                }
            }
            if !out.iter().any(|c| c == "main") && !c.value.is_empty() {
                v.err(c.span, "image.components", "`components` must include `main`", None);
            }
            out
        }
    };
    let suite = os.map(|o| o.suite().to_string()).unwrap_or_default();
    (
        os,
        Base::Debian {
            suite,
            mirror,
            snapshot: snapshot.map(|s| s.value.clone()),
            components,
            apt_mirror,
            apt_security_mirror,
        },
    )
}

/// An archive URL (`mirror`, `apt_mirror`, `apt_security_mirror`), or a diagnostic.
fn archive_url<'a>(v: &mut V, m: &'a Loc<String>, key: &str) -> Option<&'a String> {
    let u = &m.value;
    let scheme_ok = ["http://", "https://", "file:/"].iter().any(|p| u.starts_with(p));
    if !scheme_ok || u.chars().any(char::is_whitespace) {
        v.err(
            m.span,
            key,
            format!("`{u}` is not an archive URL"),
            Some(
                "an http://, https:// or file:/ URL of a Debian archive (the directory holding dists/ and pool/)"
                    .into(),
            ),
        );
        return None;
    }
    Some(u)
}

/// Debian package names (policy §5.6.1): lowercase letters, digits, `+ - .`, at least two
/// characters, starting with a letter or digit; optionally `=version`.
fn valid_package(s: &str) -> bool {
    let (name, version) = match s.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    };
    let name_ok = name.len() >= 2
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'));
    let version_ok = version.is_none_or(|v| {
        !v.is_empty()
            && v.chars().next().is_some_and(|c| c.is_ascii_digit())
            && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '~' | '-' | ':'))
    });
    name_ok && version_ok
}

fn package_name(s: &str) -> &str {
    s.split('=').next().unwrap_or(s)
}

fn check_packages(v: &mut V, raw: &RawRecipe, base: &Base, arch: Arch) -> (Vec<String>, Vec<String>) {
    let Some(p) = &raw.packages else { return (Vec::new(), Vec::new()) };
    let p = &p.value;
    let include: Vec<&Loc<String>> = p.include.iter().flat_map(|l| l.value.iter()).collect();
    let exclude: Vec<&Loc<String>> = p.exclude.iter().flat_map(|l| l.value.iter()).collect();
    if matches!(base, Base::Tarball(_)) {
        if let Some(first) = p.include.as_ref().or(p.exclude.as_ref()) {
            v.err(
                first.span,
                "packages",
                "[packages] cannot be used with a tarball base",
                Some("a tarball base is used as it is; install packages into the tarball before kiln reads it".into()),
            );
        }
        return (Vec::new(), Vec::new());
    }
    for (key, items) in [("packages.include", &include), ("packages.exclude", &exclude)] {
        for it in items {
            if !valid_package(&it.value) || (key == "packages.exclude" && it.value.contains('=')) {
                v.err(
                    it.span,
                    key,
                    format!("`{}` is not a Debian package name", it.value),
                    Some("lowercase letters, digits, `+`, `-` and `.`, at least two characters (in `include`, optionally `=VERSION`)".into()),
                );
            }
        }
    }
    let required = crate::stage::debian::required_packages(arch);
    let mut excluded: BTreeSet<String> = BTreeSet::new();
    for it in &exclude {
        if required.contains(&it.value.as_str()) {
            v.err(
                it.span,
                "packages.exclude",
                format!("`{}` cannot be excluded: kiln needs it for a bootable image", it.value),
                Some(format!("kiln always installs {}", list_and(&required))),
            );
        }
        excluded.insert(it.value.clone());
    }
    let packages: BTreeSet<String> =
        include.iter().filter(|p| !excluded.contains(package_name(&p.value))).map(|p| p.value.clone()).collect();
    (packages.into_iter().collect(), excluded.into_iter().collect())
}

/// An absolute, normalised path in the image: `/` then components that are not empty, `.`
/// or `..`, and no NUL.
fn image_path_problem(p: &str) -> Option<&'static str> {
    if !p.starts_with('/') {
        return Some("paths in the image are absolute (start with `/`)");
    }
    if p == "/" {
        return Some("`/` is the root itself");
    }
    if p.contains('\0') {
        return Some("paths cannot contain NUL");
    }
    if p.len() > 4095 {
        return Some("paths are at most 4095 bytes (PATH_MAX)");
    }
    if p[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Some("no empty, `.` or `..` components and no trailing `/`");
    }
    if p[1..].split('/').any(|c| c.len() > 255) {
        return Some("each path component is at most 255 bytes");
    }
    None
}

fn parse_mode(s: &str) -> Option<u16> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 5 {
        return None;
    }
    u16::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

/// `root`, a number, or a name kept for the stage to look up.
fn parse_owner_part(s: &str) -> Option<(u32, Option<String>)> {
    if s == "root" {
        return Some((0, None));
    }
    if s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() {
        // uid_t is 32 bits, and (uid_t)-1 means "no change" to chown: not a real owner.
        return s.parse::<u32>().ok().filter(|n| *n != u32::MAX).map(|n| (n, None));
    }
    // useradd's default NAME_REGEX, plus the `$` machine accounts may end with.
    let ok = s.len() <= 32
        && s.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.trim_end_matches('$')
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    ok.then(|| (0, Some(s.to_string())))
}

fn check_file(v: &mut V, i: usize, f: &Loc<RawFile>) -> Option<FileEntry> {
    let raw = &f.value;
    let k = |name: &str| format!("files[{i}].{name}");
    let header = Span { end: f.span.start, ..f.span };
    let Some(path) = &raw.path else {
        v.err(
            header,
            format!("files[{i}]"),
            "[[files]] entry has no `path`",
            Some("add `path = \"/etc/example\"`, the absolute path in the image".into()),
        );
        return None;
    };
    let mut ok = true;
    if let Some(problem) = image_path_problem(&path.value) {
        v.err(path.span, k("path"), format!("`{}` is not a valid path in the image", path.value), Some(problem.into()));
        ok = false;
    }
    let dir = raw.dir.as_ref().filter(|d| d.value);
    let given: Vec<(&str, Span)> = [
        ("content", raw.content.as_ref().map(|x| x.span)),
        ("source", raw.source.as_ref().map(|x| x.span)),
        ("symlink", raw.symlink.as_ref().map(|x| x.span)),
        ("dir", dir.map(|x| x.span)),
    ]
    .into_iter()
    .filter_map(|(n, s)| s.map(|s| (n, s)))
    .collect();
    let kinds_help = "one of `content = \"text\"`, `source = \"path/on/host\"`, `symlink = \"target\"` or `dir = true`";
    match given.len() {
        0 => {
            v.err(
                path.span,
                k("path"),
                format!("[[files]] entry for {} says nothing to create", path.value),
                Some(format!("add {kinds_help}")),
            );
            return None;
        }
        1 => {}
        _ => {
            let names: Vec<String> = given.iter().map(|g| format!("`{}`", g.0)).collect();
            v.err(
                given[1].1,
                k(given[1].0),
                format!("[[files]] entry for {} sets both {}", path.value, names.join(" and ")),
                Some(format!("each entry creates one thing: {kinds_help}")),
            );
            return None;
        }
    }
    let mode_default;
    let kind = if let Some(c) = &raw.content {
        mode_default = 0o644;
        FileKind::File { content: FileContent::Inline(c.value.clone().into_bytes()) }
    } else if let Some(s) = &raw.source {
        let p = v.resolve(s);
        let meta = check_source_file(v, s, &k("source"), &p);
        // A source marked executable stays executable (git records that bit, so it is
        // as reproducible as the content).
        mode_default = match meta {
            Some(m) if is_executable(&m) => 0o755,
            _ => 0o644,
        };
        FileKind::File { content: FileContent::Source(p) }
    } else if let Some(t) = &raw.symlink {
        mode_default = 0o777;
        if t.value.is_empty() || t.value.contains('\0') || t.value.len() > 4095 {
            v.err(
                t.span,
                k("symlink"),
                "invalid symlink target",
                Some("a non-empty path without NUL, at most 4095 bytes".into()),
            );
            ok = false;
        }
        if let Some(m) = &raw.mode {
            v.err(
                m.span,
                k("mode"),
                "symlinks have no mode of their own",
                Some("remove `mode`; access is decided by the target's mode".into()),
            );
            ok = false;
        }
        FileKind::Symlink { target: t.value.clone() }
    } else {
        mode_default = 0o755;
        FileKind::Dir
    };
    let mode = match &raw.mode {
        None => mode_default,
        Some(m) => match parse_mode(&m.value) {
            Some(mode) => mode,
            None => {
                v.err(
                    m.span,
                    k("mode"),
                    format!("`{}` is not a file mode", m.value),
                    Some("an octal string from \"0000\" to \"7777\", like \"0644\" or \"0755\"".into()),
                );
                ok = false;
                0
            }
        },
    };
    let (mut uid, mut gid, mut user, mut group) = (0, 0, None, None);
    if let Some(o) = &raw.owner {
        let parsed = o.value.split_once(':').and_then(|(u, g)| Some((parse_owner_part(u)?, parse_owner_part(g)?)));
        match parsed {
            Some(((u, un), (g, gn))) => {
                (uid, gid, user, group) = (u, g, un, gn);
            }
            None => {
                v.err(
                    o.span,
                    k("owner"),
                    format!("`{}` is not an owner", o.value),
                    Some("write \"user:group\" with names or numbers, like \"root:root\", \"0:0\" or \"www-data:www-data\"".into()),
                );
                ok = false;
            }
        }
    }
    let origin = v.origin(f.span);
    ok.then(|| FileEntry { path: path.value.clone(), kind, mode, uid, gid, user, group, origin })
}

#[cfg(unix)]
fn is_executable(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o100 != 0
}

/// A host file the recipe names must exist and be a regular file (symlinks followed).
fn check_source_file(v: &mut V, at: &Loc<String>, key: &str, path: &Path) -> Option<std::fs::Metadata> {
    let rel_note = || {
        format!(
            "paths are relative to the directory of the recipe that names them ({})",
            v.src.files[at.span.file].dir().display()
        )
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Some(m),
        Ok(_) => {
            let help = Some(format!("{} is not a regular file; name each file separately", path.display()));
            v.err(at.span, key, format!("source `{}` is not a file", at.value), help);
            None
        }
        Err(e) => {
            let help = Some(rel_note());
            v.err(at.span, key, format!("source file `{}` cannot be read: {e} ({})", at.value, path.display()), help);
            None
        }
    }
}

fn valid_hostname(h: &str) -> bool {
    // Linux HOST_NAME_MAX is 64; each DNS label 1–63 letters, digits or hyphens (RFC 1123).
    h.len() <= 64
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn valid_unit(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 255
        && !u.starts_with('-')
        && u.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '@' | '-' | '\\'))
}

/// Services are named with or without `.service`; these compare equal.
fn unit_key(u: &str) -> String {
    if u.contains('.') {
        u.to_string()
    } else {
        format!("{u}.service")
    }
}

fn check_system(v: &mut V, s: &RawSystem, boot: BootMode, base: &Base, packages: &[String]) -> System {
    let mut out = System::default();
    if let Some(h) = &s.hostname {
        if valid_hostname(&h.value) {
            out.hostname = Some(h.value.clone());
        } else {
            v.err(
                h.span,
                "system.hostname",
                format!("`{}` is not a valid hostname", h.value),
                Some(
                    "dot-separated labels of letters, digits and `-` (not at either end), at most 64 characters".into(),
                ),
            );
        }
    }
    if let Some(services) = &s.services {
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for (which, list_) in [("enable", &services.value.enable), ("disable", &services.value.disable)] {
            for u in list_.iter().flat_map(|l| l.value.iter()) {
                let key = format!("system.services.{which}");
                if !valid_unit(&u.value) {
                    v.err(
                        u.span,
                        key,
                        format!("`{}` is not a systemd unit name", u.value),
                        Some("like \"ssh\", \"nginx.service\" or \"fstrim.timer\"".into()),
                    );
                    continue;
                }
                match seen.get(&unit_key(&u.value)) {
                    Some(prev) if *prev != which => {
                        v.err(
                            u.span,
                            key,
                            format!("`{}` is both enabled and disabled", u.value),
                            Some("keep it in one of the two lists".into()),
                        );
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(unit_key(&u.value), which);
                        if which == "enable" {
                            out.services_enable.push(u.value.clone());
                        } else {
                            out.services_disable.push(u.value.clone());
                        }
                    }
                }
            }
        }
    }
    for arg in s.kernel_cmdline.iter().flat_map(|l| l.value.iter()) {
        let a = &arg.value;
        if a.is_empty() || a.chars().any(|c| c.is_whitespace() || c == '"' || c.is_control()) {
            v.err(
                arg.span,
                "system.kernel_cmdline",
                format!("{a:?} is not one kernel argument"),
                Some("one argument per list item, without spaces or quotes: [\"quiet\", \"loglevel=3\"]".into()),
            );
        } else if a.starts_with("root=") {
            v.err(
                arg.span,
                "system.kernel_cmdline",
                "kiln sets `root=` itself",
                Some("the root is found by its partition UUID (root=PARTUUID=…); remove this argument".into()),
            );
        } else {
            out.kernel_cmdline.push(a.clone());
        }
    }
    if let Some(tz) = &s.timezone {
        let ok = !tz.value.is_empty()
            && tz.value.split('/').all(|c| {
                !c.is_empty()
                    && c != "."
                    && c != ".."
                    && c.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '+' | '-'))
            });
        if ok {
            out.timezone = Some(tz.value.clone());
        } else {
            v.err(
                tz.span,
                "system.timezone",
                format!("`{}` is not a time zone name", tz.value),
                Some("a name from the tz database, like \"Etc/UTC\" or \"Europe/Paris\"".into()),
            );
        }
    }
    if let Some(l) = &s.locale {
        let ok = !l.value.is_empty()
            && l.value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-'));
        let builtin = matches!(l.value.as_str(), "C" | "POSIX" | "C.UTF-8" | "C.utf8");
        if !ok {
            v.err(
                l.span,
                "system.locale",
                format!("`{}` is not a locale name", l.value),
                Some("like \"C.UTF-8\" or \"en_US.UTF-8\"".into()),
            );
        } else if !builtin
            && matches!(base, Base::Debian { .. })
            && !packages.iter().any(|p| package_name(p) == "locales-all")
        {
            v.err(
                l.span,
                "system.locale",
                format!("locale `{}` needs the `locales-all` package", l.value),
                Some("Debian's minimal system has only C.UTF-8; add \"locales-all\" to [packages].include (it ships every locale compiled, so nothing has to run in the image)".into()),
            );
        } else {
            out.locale = Some(l.value.clone());
        }
    }
    if let Some(n) = &s.network {
        out.network = match v.one_of(n, "system.network", &["dhcp", "none"]) {
            Some("none") => Network::None,
            _ => Network::Dhcp,
        };
    }
    if let Some(m) = &s.mount_esp {
        if let Some(problem) = image_path_problem(&m.value) {
            v.err(m.span, "system.mount_esp", format!("`{}` is not a mount point", m.value), Some(problem.into()));
        } else if !boot.has_uefi() {
            v.err(
                m.span,
                "system.mount_esp",
                format!("`mount_esp` needs an ESP, and boot = \"{boot}\" has none"),
                Some("use boot = \"uefi\" or \"hybrid\", or remove `mount_esp`".into()),
            );
        } else {
            out.mount_esp = Some(m.value.clone());
        }
    }
    out
}

/// `[[files]]` entries that kiln's own generated files would silently replace, or that a
/// mount would hide.
fn check_generated_conflicts(v: &mut V, files: &[Loc<RawFile>], system: &System) {
    for (i, f) in files.iter().enumerate() {
        let Some(p) = &f.value.path else { continue };
        let path = p.value.as_str();
        let generated = match path {
            "/etc/fstab" => Some((
                "kiln generates /etc/fstab (the root and ESP by UUID)",
                "add other mounts as systemd .mount units under /etc/systemd/system",
            )),
            "/etc/machine-id" => Some((
                "kiln leaves /etc/machine-id empty so every instance gets its own id on first boot",
                "remove this entry: a fixed machine id would be shared by every instance",
            )),
            "/etc/hostname" if system.hostname.is_some() => {
                Some(("kiln writes /etc/hostname from [system].hostname", "set one or the other"))
            }
            "/etc/hosts" => Some((
                "kiln writes /etc/hosts without a line for the host's own name, which changes at launch (systemd-resolved answers for it)",
                "add names with systemd-resolved or cloud-init's manage_etc_hosts instead",
            )),
            "/etc/resolv.conf" if system.network == Network::Dhcp => Some((
                "with network = \"dhcp\", /etc/resolv.conf points to systemd-resolved, which uses the resolver the network hands out",
                "set network = \"none\" to bring your own network configuration",
            )),
            "/etc/localtime" | "/etc/timezone" if system.timezone.is_some() => {
                Some(("kiln writes /etc/localtime and /etc/timezone from [system].timezone", "set one or the other"))
            }
            "/etc/default/locale" => Some((
                "kiln writes /etc/default/locale from [system].locale (C.UTF-8 by default)",
                "set [system].locale instead",
            )),
            _ => None,
        };
        if let Some((why, what)) = generated {
            v.err(p.span, format!("files[{i}].path"), format!("{path} would be replaced: {why}"), Some(what.into()));
        }
        if let Some(esp) = &system.mount_esp {
            if path.strip_prefix(esp.as_str()).is_some_and(|rest| rest.starts_with('/')) {
                v.warnings.push(format!(
                    "[[files]] {path} is under {esp}, where the ESP is mounted: the file goes into the root filesystem and the mount hides it"
                ));
            }
        }
    }
}

// ---- hash -----------------------------------------------------------------------------------

/// The recipe hash, over, in this order:
/// 1. `kiln-recipe-v2\0`;
/// 2. each recipe file, base-most first: `recipe\0`, its length (u64 LE), its bytes;
/// 3. each `[[files]]` source, in `files` order: `source\0`, the image path, `\0`, the file's
///    length (u64 LE) and SHA-256;
/// 4. a tarball base: `tarball\0`, its length (u64 LE) and SHA-256.
///
/// Lengths frame every part, so no two different inputs hash the same bytes. Files enter by
/// their own digest so an unchanged one need not be read again ([`DigestCache`]).
fn recipe_hash(
    v: &mut V,
    digests: &DigestCache,
    raw_files: &Option<Vec<Loc<RawFile>>>,
    files: &[FileEntry],
    base: &Base,
    raw_base: &Option<Loc<super::raw::RawBase>>,
) -> String {
    let mut h = Sha256::new();
    h.update(b"kiln-recipe-v2\0");
    for f in v.src.files.iter().rev() {
        h.update(b"recipe\0");
        h.update((f.text.len() as u64).to_le_bytes());
        h.update(f.text.as_bytes());
    }
    // Entries that failed validation were dropped, so match sources to their raw entry by
    // position among the raw entries with a source.
    let source_spans: Vec<&Loc<String>> = raw_files.iter().flatten().filter_map(|f| f.value.source.as_ref()).collect();
    let mut n = 0;
    for f in files {
        if let FileKind::File { content: FileContent::Source(p) } = &f.kind {
            let at = source_spans.get(n).copied();
            n += 1;
            h.update(b"source\0");
            h.update(f.path.as_bytes());
            h.update([0]);
            hash_file(v, digests, &mut h, p, at, "files.source");
        }
    }
    if let Base::Tarball(p) = base {
        h.update(b"tarball\0");
        let at = raw_base.as_ref().and_then(|b| b.value.tarball.as_ref());
        hash_file(v, digests, &mut h, p, at, "image.base.tarball");
    }
    hex::encode(h.finalize())
}

fn hash_file(v: &mut V, digests: &DigestCache, h: &mut Sha256, path: &Path, at: Option<&Loc<String>>, key: &str) {
    match digests.digest(path) {
        Ok(d) => {
            h.update(d.len.to_le_bytes());
            h.update(d.sha256);
        }
        Err(e) => {
            let span = at.map(|a| a.span).unwrap_or(Span { file: 0, start: 0, end: 0 });
            v.err(span, key, format!("cannot read {}: {e}", path.display()), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
