//! `[image]` base and `[packages]`: where the root comes from (a Debian suite or a tarball) and what
//! mmdebstrap installs.

use super::super::raw::{LocList, RawBase};
use super::*;

pub(super) fn check_base(v: &mut V, image: &RawImage, image_header: Span) -> (Option<Os>, Base) {
    if let Some(b) = &image.base {
        return (None, Base::Tarball(check_tarball_base(v, image, b)));
    }
    let os = check_os(v, image.os.as_ref(), image_header);
    let snapshot = image.snapshot.as_ref().and_then(|s| check_snapshot(v, s));
    let mirror = image.mirror.as_ref().and_then(|m| check_mirror(v, m, image.snapshot.is_some(), snapshot));
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
    let components = check_components(v, image.components.as_ref());
    let suite = os.map(|o| o.suite().to_string()).unwrap_or_default();
    let snapshot = snapshot.map(str::to_string);
    (os, Base::Debian { suite, mirror, snapshot, components, apt_mirror, apt_security_mirror })
}

/// `base = { tarball = … }`: a root used as it is, so none of the keys that choose what
/// Debian archive to stage from apply to it. Its path, which is empty when `base` names none.
fn check_tarball_base(v: &mut V, image: &RawImage, base: &Loc<RawBase>) -> PathBuf {
    let Some(t) = &base.value.tarball else {
        v.err(
            base.span,
            "image.base",
            "`base` needs a `tarball`",
            Some("write `base = { tarball = \"rootfs.tar\" }`, or leave `base` out and set `os`".into()),
        );
        return PathBuf::new();
    };
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
    path
}

/// `os`, which a recipe without a tarball base needs.
fn check_os(v: &mut V, os: Option<&Loc<String>>, image_header: Span) -> Option<Os> {
    let accepted = Os::ALL.map(Os::as_str);
    let Some(o) = os else {
        v.err(
            image_header,
            "image.os",
            "missing `os` in [image]",
            Some(format!(
                "set `os` to {}, or start from a root tarball with `base = {{ tarball = \"rootfs.tar\" }}`",
                list(&accepted)
            )),
        );
        return None;
    };
    if let Some(os) = Os::parse(&o.value) {
        return Some(os);
    }
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

/// `snapshot`: a timestamp as snapshot services write it, `YYYYMMDDTHHMMSSZ`.
fn check_snapshot<'a>(v: &mut V, s: &'a Loc<String>) -> Option<&'a str> {
    let ok = s.value.len() == 16
        && s.value.char_indices().all(|(i, c)| match i {
            8 => c == 'T',
            15 => c == 'Z',
            _ => c.is_ascii_digit(),
        });
    if ok {
        return Some(&s.value);
    }
    v.err(
        s.span,
        "image.snapshot",
        format!("`{}` is not a snapshot timestamp", s.value),
        Some("write it as YYYYMMDDTHHMMSSZ in UTC, like \"20240601T000000Z\"".into()),
    );
    None
}

/// `mirror`, with the snapshot's timestamp put in: it has a `{snapshot}` placeholder exactly
/// when `snapshot` is given (`snapshot` is the given one if valid).
fn check_mirror(v: &mut V, m: &Loc<String>, snapshot_given: bool, snapshot: Option<&str>) -> Option<String> {
    let u = archive_url(v, m, "image.mirror")?;
    if u.contains("{snapshot}") != snapshot_given {
        let help = if snapshot_given {
            "with `snapshot` set, the mirror must say where the timestamp goes, like \"https://snapshots.example.org/archive/debian/{snapshot}\""
        } else {
            "`{snapshot}` in the mirror needs `snapshot = \"YYYYMMDDTHHMMSSZ\"` in [image]"
        };
        v.err(m.span, "image.mirror", "`mirror` and `snapshot` do not agree", Some(help.into()));
        return None;
    }
    Some(match snapshot {
        Some(s) => u.replace("{snapshot}", s),
        None => u.clone(),
    })
}

/// `components` of Debian's archive: `["main"]` when left out, and never without it.
fn check_components(v: &mut V, components: Option<&LocList<String>>) -> Vec<String> {
    const COMPONENTS: [&str; 4] = ["main", "contrib", "non-free", "non-free-firmware"];
    let Some(c) = components else { return vec!["main".to_string()] };
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

/// Whether a URL is one apt fetches and kiln accepts: http, https or a local directory.
pub(super) fn has_apt_scheme(u: &str) -> bool {
    ["http://", "https://", "file:/"].iter().any(|p| u.starts_with(p))
}

/// An archive URL (`mirror`, `apt_mirror`, `apt_security_mirror`), or a diagnostic.
pub(super) fn archive_url<'a>(v: &mut V, m: &'a Loc<String>, key: &str) -> Option<&'a String> {
    let u = &m.value;
    if !has_apt_scheme(u) || u.chars().any(char::is_whitespace) {
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
pub(super) fn valid_package(s: &str) -> bool {
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

pub(super) fn package_name(s: &str) -> &str {
    s.split('=').next().unwrap_or(s)
}

pub(super) fn check_packages(v: &mut V, raw: &RawRecipe, base: &Base, arch: Arch) -> (Vec<String>, Vec<String>) {
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
    let required = arch.required_packages();
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
