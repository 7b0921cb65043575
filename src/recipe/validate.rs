//! Raw (merged) recipe → [`Recipe`]: every rule a value must follow, each failure reported at
//! the value's position with what is accepted. Problems are collected, not stopped at, so one
//! `kiln check` shows all of them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use toml::de::{DeTable, DeValue};

use super::error::{list, list_and, nearest, Diagnostic, SourceMap, Span};
use super::raw::{Loc, RawAmi, RawBundle, RawFile, RawImage, RawRecipe, RawSystem, RawVolume};
use super::size::{self, DiskSize, GIB, MIB, TIB};
use super::{default_boot, Base, FileContent, FileEntry, FileKind, Loaded, Network, Os, Recipe, RecipeError, System};
use crate::manifest::{AmiSettings, BundleSettings, ExtraVolume, LaunchPermissions, RootVolume};
use crate::platform::{Arch, BootMode};

/// Smallest image worth building: a GPT, an ESP and an ext4 root do not fit in less.
const MIN_IMAGE_BYTES: u64 = 64 * MIB;
/// EBS's largest volume (io2 Block Express, and gp3 since 2025) is 64 TiB.
const MAX_IMAGE_BYTES: u64 = 64 * TIB;
/// 9999-12-31T23:59:59Z: later dates do not fit the formats timestamps are written in.
const MAX_EPOCH: i64 = 253_402_300_799;
/// EC2 allows 50 tags per resource; kiln adds its own (image SHA-256, recipe hash, name).
const MAX_USER_TAGS: usize = 45;

/// Converts a toml deserialization error in file `id` into a diagnostic naming the key.
pub(super) fn toml_diagnostic(sources: &SourceMap, id: usize, e: &toml::de::Error) -> Diagnostic {
    let range = e.span().unwrap_or(0..0);
    let span = Span { file: id, start: range.start, end: range.end };
    let text = &sources.files[id].text;
    let path: Vec<String> = match DeTable::parse(text) {
        Ok(t) => {
            let mut p = Vec::new();
            key_path_at(t.get_ref(), range.start, &mut p);
            p
        }
        // A syntax error: there is no table to find keys in.
        Err(_) => {
            let msg = e.message().trim_end().replace('\n', "; ");
            return sources.diagnostic(
                span,
                None,
                format!("invalid TOML: {msg}"),
                Some("see https://toml.io for the syntax".into()),
            );
        }
    };
    let key = (!path.is_empty()).then(|| path.join("."));
    let msg = e.message();
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        // serde's wording: unknown field `x`, expected one of `a`, `b` (or `a` or `b`).
        let names: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        let field = rest.split('`').next().unwrap_or("");
        let (table, where_) = if path.len() > 1 {
            let t = table_name(&path[..path.len() - 1]);
            (t.clone(), format!("in {t}"))
        } else {
            ("the top level".to_string(), "at the top level".to_string())
        };
        let mut help = String::new();
        if let Some(s) = nearest(field, names.iter().copied()) {
            help.push_str(&format!("did you mean `{s}`? "));
        } else if let Some(section) = home_of(field, &table) {
            help.push_str(&format!("`{field}` belongs in {section}. "));
        }
        if names.is_empty() {
            help.push_str("this table takes no keys");
        } else {
            help.push_str(&format!("accepted keys in {table}: {}", list(&names)));
        }
        return sources.diagnostic(span, key, format!("unknown key `{field}` {where_}"), Some(help));
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        let what = key.as_deref().map(|k| format!("wrong type for `{k}`: ")).unwrap_or_default();
        let rest = toml_words(rest);
        let hint = path.last().and_then(|k| type_hint(k.split('[').next().unwrap_or(k)));
        return sources.diagnostic(span, key, format!("{what}found {rest}"), hint.map(str::to_string));
    }
    let what = key.as_deref().map(|k| format!("`{k}`: ")).unwrap_or_default();
    sources.diagnostic(span, key, format!("{what}{}", msg.trim_end()), None)
}

/// serde's type names in TOML's words (`sequence` is an array, `map` a table, and a struct
/// of this module is a table too).
fn toml_words(serde_msg: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut words = serde_msg.split(' ').peekable();
    while let Some(w) = words.next() {
        let (core, tail) = w.split_at(w.trim_end_matches([',', '.']).len());
        let replaced = match core {
            "struct" if words.peek().is_some_and(|n| n.starts_with("Raw")) => {
                let next = words.next().unwrap_or_default();
                let punct = &next[next.trim_end_matches([',', '.']).len()..];
                out.push(format!("table{punct}"));
                continue;
            }
            "sequence" => "array",
            "map" => "table",
            "i64" => "an integer",
            _ => core,
        };
        out.push(format!("{replaced}{tail}"));
    }
    out.join(" ").replace("a array", "an array").replace("expected table", "expected a table")
}

/// `[image]`, `[ami.root_volume]`, or `[[files]] entry 2` for `files[1]`.
fn table_name(path: &[String]) -> String {
    let dotted = path.join(".");
    match dotted.rsplit_once('[') {
        Some((array, index)) if dotted.ends_with(']') => {
            let n: usize = index.trim_end_matches(']').parse().unwrap_or(0);
            format!("[[{array}]] entry {}", n + 1)
        }
        _ => format!("[{dotted}]"),
    }
}

/// Where a key belongs when it is written in the wrong table (`name = …` before `[image]`,
/// `extends` under `[image]`): the keys of the sections users most often mix up.
fn home_of(field: &str, current: &str) -> Option<&'static str> {
    let home = match field {
        "extends" => "the top level, before the first [section]",
        "name" | "os" | "arch" | "boot" | "size" | "base" | "mirror" | "snapshot" | "components"
        | "source_date_epoch" => "[image]",
        "include" | "exclude" => "[packages]",
        "path" | "content" | "source" | "symlink" | "dir" | "mode" | "owner" => "a [[files]] entry",
        "hostname" | "services" | "kernel_cmdline" | "timezone" | "locale" | "network" | "mount_esp" => "[system]",
        "regions" | "root_volume" | "ena" | "tpm" | "imds" | "boot_mode" | "launch_permissions" | "tags" => "[ami]",
        _ => return None,
    };
    (!home.contains(current)).then_some(home)
}

/// What a key's value should look like, for wrong-type errors.
fn type_hint(key: &str) -> Option<&'static str> {
    Some(match key {
        "size" => "sizes are strings with a unit, like \"2GiB\" or \"512MiB\", or \"auto\"",
        "mode" => "write the mode as an octal string, like \"0644\" (a TOML integer cannot tell 644 from 0o644)",
        "owner" => "write the owner as \"user:group\", like \"root:root\" or \"0:0\"",
        "include" | "exclude" | "enable" | "disable" | "kernel_cmdline" | "regions" | "accounts" => {
            "this is a list of strings, like [\"a\", \"b\"]"
        }
        "files" => "files are an array of tables: write each entry as a [[files]] section",
        "volumes" => "volumes are an array of tables: write each as an [[ami.volumes]] section",
        "account" => "write the account id as a string of 12 digits, like \"123456789012\" (ids may start with 0)",
        "source_date_epoch" => "seconds since 1970-01-01 UTC, as an integer",
        "extends" => "the path of one recipe, relative to this one, like \"base.toml\"",
        "image" | "packages" | "system" | "ami" | "bundle" => {
            "this is a table: write it as a [section] header (not [[section]]) with keys under it"
        }
        "services" => "`services` is a table: write `services.enable = [\"ssh\"]` (and `services.disable`)",
        "root_volume" => "`root_volume` is a table, like { size = \"8GiB\", type = \"gp3\" }",
        "launch_permissions" => {
            "`launch_permissions` is a table, like { accounts = [\"123456789012\"], public = false }"
        }
        "base" => "`base` is a table, like { tarball = \"rootfs.tar\" }",
        "tags" => "`tags` is a table of strings, like { team = \"platform\" }",
        _ => return None,
    })
}

/// Finds the dotted key whose key or value contains `offset`.
fn key_path_at(table: &DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
    for (k, v) in table.iter() {
        let name = k.get_ref().to_string();
        if k.span().contains(&offset) {
            path.push(name);
            return true;
        }
        match v.get_ref() {
            DeValue::Table(t) => {
                path.push(name.clone());
                if key_path_at(t, offset, path) {
                    return true;
                }
                path.pop();
            }
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    path.push(format!("{name}[{i}]"));
                    if let DeValue::Table(t) = item.get_ref() {
                        if key_path_at(t, offset, path) {
                            return true;
                        }
                    }
                    if item.span().contains(&offset) {
                        return true;
                    }
                    path.pop();
                }
            }
            _ => {}
        }
        if v.span().contains(&offset) {
            path.push(name);
            return true;
        }
    }
    false
}

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
        self.err(at.span, key, format!("`{}` is not a valid `{key}`", at.value), Some(help));
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
                v.one_of(a, "arch", &["x86_64", "arm64"]);
                super::DEFAULT_ARCH
            }
        },
    };
    let boot = match &image.boot {
        None => default_boot(arch),
        Some(b) => match v.one_of(b, "boot", &["uefi", "bios", "hybrid"]) {
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

    if !v.diags.is_empty() {
        return Err(v.into_error());
    }
    let sha256 = recipe_hash(&mut v, &raw.files, &files, &base, &image.base);
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
        warnings,
        loaded: loaded.clone(),
    })
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
        for (key, val) in [("os", &image.os), ("mirror", &image.mirror), ("snapshot", &image.snapshot)] {
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
        let u = &m.value;
        let scheme_ok = ["http://", "https://", "file:/"].iter().any(|p| u.starts_with(p));
        if !scheme_ok || u.chars().any(char::is_whitespace) {
            v.err(
                m.span,
                "image.mirror",
                format!("`{u}` is not an archive URL"),
                Some("an http://, https:// or file:/ URL of a Debian archive (the directory holding dists/ and pool/)".into()),
            );
            return None;
        }
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
    (os, Base::Debian { suite, mirror, snapshot: snapshot.map(|s| s.value.clone()), components })
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
            "/etc/hostname" | "/etc/hosts" if system.hostname.is_some() => {
                Some(("kiln writes /etc/hostname and /etc/hosts from [system].hostname", "set one or the other"))
            }
            "/etc/localtime" | "/etc/timezone" if system.timezone.is_some() => {
                Some(("kiln writes /etc/localtime and /etc/timezone from [system].timezone", "set one or the other"))
            }
            "/etc/default/locale" if system.locale.is_some() => {
                Some(("kiln writes /etc/default/locale from [system].locale", "set one or the other"))
            }
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

// ---- [ami] ----------------------------------------------------------------------------------

const VOLUME_TYPES: [&str; 7] = ["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"];

/// EBS limits per volume type (Amazon EBS volume types, User Guide): size in GiB, and for the
/// types that take them, provisioned IOPS and throughput (MiB/s) ranges and the largest
/// IOPS-per-GiB ratio.
struct VolumeLimits {
    size_gib: (u32, u32),
    iops: Option<(u32, u32)>,
    iops_per_gib: u32,
    iops_required: bool,
    throughput: Option<(u32, u32)>,
    bootable: bool,
}

fn limits(t: &str) -> VolumeLimits {
    let plain = |lo, hi, bootable| VolumeLimits {
        size_gib: (lo, hi),
        iops: None,
        iops_per_gib: 0,
        iops_required: false,
        throughput: None,
        bootable,
    };
    match t {
        "gp3" => VolumeLimits {
            size_gib: (1, 65_536),
            iops: Some((3_000, 80_000)),
            iops_per_gib: 500,
            iops_required: false,
            throughput: Some((125, 2_000)),
            bootable: true,
        },
        "io1" => VolumeLimits {
            size_gib: (4, 16_384),
            iops: Some((100, 64_000)),
            iops_per_gib: 50,
            iops_required: true,
            throughput: None,
            bootable: true,
        },
        "io2" => VolumeLimits {
            size_gib: (4, 65_536),
            iops: Some((100, 256_000)),
            iops_per_gib: 1_000,
            iops_required: true,
            throughput: None,
            bootable: true,
        },
        // Throughput-optimised and cold HDD cannot be boot volumes.
        "st1" | "sc1" => plain(125, 16_384, false),
        "standard" => plain(1, 1_024, true),
        _ => plain(1, 16_384, true), // gp2
    }
}

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
    volume_type: String,
    iops: Option<u32>,
    throughput: Option<u32>,
}

fn check_volume(v: &mut V, vol: &Loc<RawVolume>, prefix: &str, root: bool) -> Option<CheckedVolume> {
    let r = &vol.value;
    let before = v.diags.len();
    let volume_type = match &r.volume_type {
        None => "gp3".to_string(),
        Some(t) => match v.one_of(t, &format!("{prefix}.type"), &VOLUME_TYPES) {
            Some(t) => t.to_string(),
            None => {
                // Without a type the other limits are unknown; the size can still be checked.
                if let Some(s) = &r.size {
                    gib_of(v, s, &format!("{prefix}.size"));
                }
                return None;
            }
        },
    };
    let lim = limits(&volume_type);
    if root && !lim.bootable {
        let t = r.volume_type.as_ref().expect("type given");
        v.err(
            t.span,
            format!("{prefix}.type"),
            format!("{volume_type} volumes cannot be boot volumes"),
            Some("use gp3 (or gp2, io1, io2) for the root volume".into()),
        );
    }
    let size_gib = r.size.as_ref().and_then(|s| gib_of(v, s, &format!("{prefix}.size")));
    if let (Some(g), Some(s)) = (size_gib, &r.size) {
        if !(lim.size_gib.0..=lim.size_gib.1).contains(&g) {
            v.err(
                s.span,
                format!("{prefix}.size"),
                format!(
                    "{volume_type} volumes are {} to {} GiB; {} is outside",
                    lim.size_gib.0, lim.size_gib.1, s.value
                ),
                None,
            );
        }
    }
    let mut num = |field: &Option<Loc<i64>>, name: &str, range: Option<(u32, u32)>, unit: &str| -> Option<u32> {
        let f = field.as_ref()?;
        let key = format!("{prefix}.{name}");
        let Some((lo, hi)) = range else {
            let takes = if name == "iops" { "gp3, io1 and io2" } else { "gp3" };
            v.err(
                f.span,
                key,
                format!("{volume_type} volumes do not take `{name}`"),
                Some(format!("only {takes} volumes have provisioned {name}")),
            );
            return None;
        };
        match u32::try_from(f.value) {
            Ok(n) if (lo..=hi).contains(&n) => Some(n),
            _ => {
                v.err(
                    f.span,
                    key,
                    format!("{name} {} is out of range for {volume_type}", f.value),
                    Some(format!("{volume_type} accepts {lo} to {hi} {unit}")),
                );
                None
            }
        }
    };
    let iops = num(&r.iops, "iops", lim.iops, "IOPS");
    let throughput = num(&r.throughput, "throughput", lim.throughput, "MiB/s");
    if lim.iops_required && r.iops.is_none() {
        v.err(
            Span { end: vol.span.start, ..vol.span },
            format!("{prefix}.iops"),
            format!("{volume_type} volumes need `iops`"),
            Some(format!("set iops between {} and {}", lim.iops.map_or(0, |r| r.0), lim.iops.map_or(0, |r| r.1))),
        );
    }
    // The per-GiB ratio applies above gp3's free baseline of 3000 IOPS.
    if let (Some(i), Some(g), Some(f)) = (iops, size_gib, &r.iops) {
        let baseline = if volume_type == "gp3" { 3_000 } else { 0 };
        if i > baseline && u64::from(i) > u64::from(g) * u64::from(lim.iops_per_gib) {
            v.err(
                f.span,
                format!("{prefix}.iops"),
                format!("{i} IOPS is more than {volume_type} allows for {g} GiB"),
                Some(format!("{volume_type} allows at most {} IOPS per GiB", lim.iops_per_gib)),
            );
        }
    }
    // gp3 throughput is at most 0.25 MiB/s per provisioned IOPS.
    if let (Some(t), Some(f)) = (throughput, &r.throughput) {
        let i = iops.unwrap_or(3_000);
        if t > 125 && u64::from(t) * 4 > u64::from(i) {
            v.err(
                f.span,
                format!("{prefix}.throughput"),
                format!("{t} MiB/s needs at least {} IOPS", u64::from(t) * 4),
                Some("gp3 throughput is at most 0.25 MiB/s per provisioned IOPS".into()),
            );
        }
    }
    (v.diags.len() == before).then_some(CheckedVolume { size_gib, volume_type, iops, throughput })
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

fn check_ami(
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
    let mut regions = Vec::new();
    for reg in r.regions.iter().flat_map(|l| l.value.iter()) {
        if !valid_region(&reg.value) {
            v.err(
                reg.span,
                "ami.regions",
                format!("`{}` is not an AWS region name", reg.value),
                Some("like \"us-east-1\" or \"eu-west-1\"".into()),
            );
        } else if regions.contains(&reg.value) {
            v.err(reg.span, "ami.regions", format!("region `{}` is listed twice", reg.value), None);
        } else {
            regions.push(reg.value.clone());
        }
    }

    // Boot mode: from [image].boot unless set, and only one the image can actually boot.
    let boot_mode = match &r.boot_mode {
        None => boot.ec2_boot_mode().to_string(),
        Some(b) => {
            let m =
                v.one_of(b, "ami.boot_mode", &["uefi", "legacy-bios", "uefi-preferred"]).unwrap_or("uefi").to_string();
            if arch == Arch::Arm64 && m != "uefi" {
                let via = if arch_from_flag { " (arm64 was chosen with --arch)" } else { "" };
                v.err(
                    b.span,
                    "ami.boot_mode",
                    format!("boot_mode = \"{m}\" cannot be registered for arm64{via}"),
                    Some("Graviton (arm64) instances boot UEFI only, so arm64 AMIs are registered as \"uefi\"; remove `boot_mode` or set it to \"uefi\"".into()),
                );
            } else {
                let bootable = match m.as_str() {
                    "legacy-bios" => boot.has_bios(),
                    "uefi" => boot.has_uefi(),
                    _ => boot == BootMode::Hybrid,
                };
                if !bootable {
                    v.err(
                        b.span,
                        "ami.boot_mode",
                        format!("boot_mode = \"{m}\" does not match the image, which boots {}", match boot {
                            BootMode::Uefi => "UEFI only",
                            BootMode::Bios => "legacy BIOS only",
                            BootMode::Hybrid => "both ways",
                        }),
                        Some(format!("[image].boot = \"{boot}\" registers as \"{}\"; set [image].boot = \"hybrid\" for an image that boots both ways", boot.ec2_boot_mode())),
                    );
                }
            }
            m
        }
    };
    let tpm = r.tpm.as_ref().is_some_and(|t| t.value);
    if tpm && boot_mode != "uefi" {
        let t = r.tpm.as_ref().expect("tpm set");
        v.err(
            t.span,
            "ami.tpm",
            format!("tpm = true needs UEFI boot; this AMI would be registered as \"{boot_mode}\""),
            Some("NitroTPM is only available to AMIs registered with boot_mode = \"uefi\"; use [image].boot = \"uefi\" (or set boot_mode = \"uefi\" with a hybrid image), or remove tpm".into()),
        );
    }
    let imds = match &r.imds {
        None => Some("v2.0".to_string()),
        Some(i) => match v.one_of(i, "ami.imds", &["v2.0", "optional"]) {
            Some("optional") => None,
            _ => Some("v2.0".to_string()),
        },
    };

    let default_root = Loc { span: Span { end: a.span.start, ..a.span }, value: RawVolume::default() };
    let root_raw = r.root_volume.as_ref().unwrap_or(&default_root);
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
    let root_device = match &root_raw.value.device {
        None => "/dev/xvda".to_string(),
        Some(d) => {
            v.one_of(d, "ami.root_volume.device", &["/dev/xvda", "/dev/sda1"]).unwrap_or("/dev/xvda").to_string()
        }
    };
    let root = check_volume(v, root_raw, "ami.root_volume", true);
    let image_gib = image_bytes.map(|b| b.div_ceil(GIB));
    if let (Some(root), Some(img), Some(s)) = (&root, image_gib, &root_raw.value.size) {
        if root.size_gib.is_some_and(|g| u64::from(g) < img) {
            v.err(
                s.span,
                "ami.root_volume.size",
                format!("the root volume ({}) is smaller than the image ({img} GiB)", s.value),
                Some("the root volume holds the whole image: make it at least as large".into()),
            );
        }
    }

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
        if let (Some(device), Some(c)) = (device, checked) {
            volumes.push(ExtraVolume {
                device,
                size_gib: c.size_gib.unwrap_or(0),
                volume_type: c.volume_type,
                iops: c.iops,
                throughput: c.throughput,
                encrypted,
                kms_key_id,
                delete_on_termination: vol.value.delete_on_termination.as_ref().is_none_or(|d| d.value),
            });
        }
    }

    let mut launch = LaunchPermissions::default();
    if let Some(lp) = &r.launch_permissions {
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
    }

    let mut tags = BTreeMap::new();
    if let Some(t) = &r.tags {
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
    }

    let kms_key_arn = r.kms_key_arn.as_ref().map(|k| k.value.clone());
    if let Some(k) = &r.kms_key_arn {
        if !(k.value.starts_with("arn:aws") && k.value.contains(":kms:")) {
            v.err(
                k.span,
                "ami.kms_key_arn",
                format!("`{}` is not a KMS key ARN", k.value),
                Some("like \"arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab\"".into()),
            );
        }
    }
    let encrypted = r.encrypted.as_ref().map(|e| e.value).unwrap_or(kms_key_arn.is_some());
    if let (Some(k), false) = (&r.kms_key_arn, encrypted) {
        v.err(k.span, "ami.kms_key_arn", "`kms_key_arn` needs `encrypted = true`", None);
    }

    if v.diags.len() != before {
        return None;
    }
    let root = root?;
    Some(AmiSettings {
        name,
        description: r.description.as_ref().map(|d| d.value.clone()),
        regions,
        root_volume: RootVolume {
            device: root_device,
            // 0: not set; the image's size rounded up to whole GiB (known once it is built).
            size_gib: root.size_gib.or(image_gib.and_then(|g| u32::try_from(g).ok())).unwrap_or(0),
            volume_type: root.volume_type,
            iops: root.iops,
            throughput: root.throughput,
            delete_on_termination: root_raw.value.delete_on_termination.as_ref().is_none_or(|d| d.value),
        },
        ena: r.ena.as_ref().is_none_or(|e| e.value),
        sriov: r.sriov.as_ref().is_some_and(|s| s.value),
        tpm,
        imds,
        boot_mode,
        launch_permissions: launch,
        tags,
        volumes,
        encrypted,
        kms_key_arn,
    })
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
    // EC2: 3–128 characters: letters, digits, ( ) [ ] space . / - ' @ _
    let ok_chars = rest.chars().all(|c| c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c));
    if !ok_chars || n.value.len() < 3 || n.value.len() > 128 {
        v.err(n.span, "ami.name", format!("`{}` is not a valid AMI name", n.value), Some("3 to 128 characters: letters, digits, spaces and ( ) [ ] . / - ' @ _, plus the placeholders {name} {arch} {date} {sha}".into()));
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

fn check_bundle(v: &mut V, b: &Loc<RawBundle>, arch: Arch, boot: BootMode) -> Option<BundleSettings> {
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
        let bucket = u.value.strip_prefix("s3://").map(|rest| rest.split('/').next().unwrap_or(""));
        let ok = bucket.is_some_and(|b| {
            (3..=63).contains(&b.len())
                && b.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
                && b.starts_with(|c: char| c.is_ascii_alphanumeric())
                && b.ends_with(|c: char| c.is_ascii_alphanumeric())
        });
        if !ok {
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

// ---- hash -----------------------------------------------------------------------------------

/// The recipe hash, over, in this order:
/// 1. `kiln-recipe-v1\0`;
/// 2. each recipe file, base-most first: `recipe\0`, its length (u64 LE), its bytes;
/// 3. each `[[files]]` source, in `files` order: `source\0`, the image path, `\0`, the length
///    (u64 LE), the bytes;
/// 4. a tarball base: `tarball\0`, the length (u64 LE), the bytes.
///
/// Lengths frame every part, so no two different inputs hash the same bytes.
fn recipe_hash(
    v: &mut V,
    raw_files: &Option<Vec<Loc<RawFile>>>,
    files: &[FileEntry],
    base: &Base,
    raw_base: &Option<Loc<super::raw::RawBase>>,
) -> String {
    let mut h = Sha256::new();
    h.update(b"kiln-recipe-v1\0");
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
            hash_file(v, &mut h, p, at, "files.source");
        }
    }
    if let Base::Tarball(p) = base {
        h.update(b"tarball\0");
        let at = raw_base.as_ref().and_then(|b| b.value.tarball.as_ref());
        hash_file(v, &mut h, p, at, "image.base.tarball");
    }
    hex::encode(h.finalize())
}

fn hash_file(v: &mut V, h: &mut Sha256, path: &Path, at: Option<&Loc<String>>, key: &str) {
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::open(path)?;
        let len = f.metadata()?.len();
        h.update(len.to_le_bytes());
        let mut buf = vec![0u8; 1 << 20];
        let mut seen = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            seen += n as u64;
            h.update(&buf[..n]);
        }
        if seen != len {
            return Err(std::io::Error::other(format!("it changed while being read ({len} bytes, then {seen})")));
        }
        Ok(())
    })();
    if let Err(e) = res {
        let span = at.map(|a| a.span).unwrap_or(Span { file: 0, start: 0, end: 0 });
        v.err(span, key, format!("cannot read {}: {e}", path.display()), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert_eq!(table_name(&["image".into()]), "[image]");
        assert_eq!(table_name(&["ami".into(), "root_volume".into()]), "[ami.root_volume]");
        assert_eq!(table_name(&["files[1]".into()]), "[[files]] entry 2");
        assert_eq!(table_name(&["ami".into(), "volumes[0]".into()]), "[[ami.volumes]] entry 1");
        assert_eq!(home_of("extends", "[image]"), Some("the top level, before the first [section]"));
        assert_eq!(home_of("hostname", "the top level"), Some("[system]"));
        assert_eq!(home_of("name", "[image]"), None);
    }

    #[test]
    fn serde_words_become_toml_words() {
        assert_eq!(toml_words("string \"x\", expected struct RawImage"), "string \"x\", expected a table");
        assert_eq!(toml_words("sequence, expected a string"), "array, expected a string");
        assert_eq!(toml_words("string \"1\", expected i64"), "string \"1\", expected an integer");
        assert_eq!(toml_words("map, expected a sequence"), "table, expected an array");
    }

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
    fn regions_and_paths() {
        for ok in ["us-east-1", "eu-central-2", "us-gov-west-1", "ap-southeast-4", "il-central-1"] {
            assert!(valid_region(ok), "{ok}");
        }
        for bad in ["us-east", "useast1", "US-EAST-1", "us-east-100", "u-east-1", "us--1"] {
            assert!(!valid_region(bad), "{bad}");
        }
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
