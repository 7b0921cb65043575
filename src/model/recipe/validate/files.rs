//! `[[files]]`: image paths, modes, owners, sources, and files kiln itself writes.

use super::*;

/// An absolute, normalised path in the image: `/` then components that are not empty, `.`
/// or `..`, and no NUL.
pub(super) fn image_path_problem(p: &str) -> Option<&'static str> {
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

pub(super) fn parse_mode(s: &str) -> Option<u16> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 5 {
        return None;
    }
    u16::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

/// The user or group half of an `owner`: an id, or a name the stage looks up in the image
/// (with id 0 until then).
type OwnerPart = (u32, Option<String>);

/// `root`, a number, or a name kept for the stage to look up.
pub(super) fn parse_owner_part(s: &str) -> Option<OwnerPart> {
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

pub(super) fn check_file(v: &mut V, e: &Entry, raw: &RawFile) -> Option<FileEntry> {
    let Some(path) = &raw.path else {
        v.err(
            e.header(),
            e.name(),
            "[[files]] entry has no `path`",
            Some("add `path = \"/etc/example\"`, the absolute path in the image".into()),
        );
        return None;
    };
    let image_path = check_path(v, e, path);
    if !creates_one_thing(v, e, raw, path) {
        return None;
    }
    let kind = check_kind(v, e, raw);
    let mode = check_mode(v, e, raw.mode.as_ref());
    let owner = check_owner(v, e, raw.owner.as_ref());
    let (kind, default_mode) = kind?;
    let ((uid, user), (gid, group)) = owner?;
    Some(FileEntry {
        path: image_path?,
        kind,
        mode: mode?.unwrap_or(default_mode),
        uid,
        gid,
        user,
        group,
        origin: v.origin(e.span),
    })
}

fn check_path(v: &mut V, e: &Entry, path: &Loc<String>) -> Option<String> {
    let Some(problem) = image_path_problem(&path.value) else { return Some(path.value.clone()) };
    v.err(path.span, e.key("path"), format!("`{}` is not a valid path in the image", path.value), Some(problem.into()));
    None
}

/// Whether the entry says what to create, and only one thing.
fn creates_one_thing(v: &mut V, e: &Entry, raw: &RawFile, path: &Loc<String>) -> bool {
    let given: Vec<(&str, Span)> = [
        ("content", raw.content.as_ref().map(|x| x.span)),
        ("source", raw.source.as_ref().map(|x| x.span)),
        ("symlink", raw.symlink.as_ref().map(|x| x.span)),
        ("dir", raw.dir.as_ref().filter(|d| d.value).map(|x| x.span)),
    ]
    .into_iter()
    .filter_map(|(n, s)| s.map(|s| (n, s)))
    .collect();
    let kinds_help = "one of `content = \"text\"`, `source = \"path/on/host\"`, `symlink = \"target\"` or `dir = true`";
    match given.len() {
        0 => {
            v.err(
                path.span,
                e.key("path"),
                format!("[[files]] entry for {} says nothing to create", path.value),
                Some(format!("add {kinds_help}")),
            );
            false
        }
        1 => true,
        _ => {
            let names: Vec<String> = given.iter().map(|g| format!("`{}`", g.0)).collect();
            v.err(
                given[1].1,
                e.key(given[1].0),
                format!("[[files]] entry for {} sets both {}", path.value, names.join(" and ")),
                Some(format!("each entry creates one thing: {kinds_help}")),
            );
            false
        }
    }
}

/// What the entry creates (it creates one thing), and the mode it gets when `mode` is left out.
fn check_kind(v: &mut V, e: &Entry, raw: &RawFile) -> Option<(FileKind, u16)> {
    if let Some(c) = &raw.content {
        return Some((FileKind::File { content: FileContent::Inline(c.value.clone().into_bytes()) }, 0o644));
    }
    if let Some(s) = &raw.source {
        let p = v.resolve(s);
        let meta = check_source_file(v, s, &e.key("source"), &p);
        // A source marked executable stays executable (git records that bit, so it is
        // as reproducible as the content).
        let default_mode = match meta {
            Some(m) if is_executable(&m) => 0o755,
            _ => 0o644,
        };
        return Some((FileKind::File { content: FileContent::Source(p) }, default_mode));
    }
    if let Some(t) = &raw.symlink {
        return check_symlink(v, e, t, raw.mode.as_ref()).map(|kind| (kind, 0o777));
    }
    Some((FileKind::Dir, 0o755))
}

fn check_symlink(v: &mut V, e: &Entry, target: &Loc<String>, mode: Option<&Loc<String>>) -> Option<FileKind> {
    let mut ok = true;
    if target.value.is_empty() || target.value.contains('\0') || target.value.len() > 4095 {
        v.err(
            target.span,
            e.key("symlink"),
            "invalid symlink target",
            Some("a non-empty path without NUL, at most 4095 bytes".into()),
        );
        ok = false;
    }
    if let Some(m) = mode {
        v.err(
            m.span,
            e.key("mode"),
            "symlinks have no mode of their own",
            Some("remove `mode`; access is decided by the target's mode".into()),
        );
        ok = false;
    }
    ok.then(|| FileKind::Symlink { target: target.value.clone() })
}

fn check_mode(v: &mut V, e: &Entry, mode: Option<&Loc<String>>) -> Option<Option<u16>> {
    let Some(m) = mode else { return Some(None) };
    if let Some(mode) = parse_mode(&m.value) {
        return Some(Some(mode));
    }
    v.err(
        m.span,
        e.key("mode"),
        format!("`{}` is not a file mode", m.value),
        Some("an octal string from \"0000\" to \"7777\", like \"0644\" or \"0755\"".into()),
    );
    None
}

/// `owner`: `user:group`, root's when left out.
fn check_owner(v: &mut V, e: &Entry, owner: Option<&Loc<String>>) -> Option<(OwnerPart, OwnerPart)> {
    let Some(o) = owner else { return Some(((0, None), (0, None))) };
    let parsed = o.value.split_once(':').and_then(|(u, g)| Some((parse_owner_part(u)?, parse_owner_part(g)?)));
    if parsed.is_none() {
        v.err(
            o.span,
            e.key("owner"),
            format!("`{}` is not an owner", o.value),
            Some(
                "write \"user:group\" with names or numbers, like \"root:root\", \"0:0\" or \"www-data:www-data\""
                    .into(),
            ),
        );
    }
    parsed
}

#[cfg(unix)]
pub(super) fn is_executable(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.permissions().mode() & 0o100 != 0
}

/// A host file the recipe names must exist and be a regular file (symlinks followed).
pub(super) fn check_source_file(v: &mut V, at: &Loc<String>, key: &str, path: &Path) -> Option<std::fs::Metadata> {
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

/// `[[files]]` entries that kiln's own generated files would silently replace, or that a
/// mount would hide.
pub(super) fn check_generated_conflicts(v: &mut V, files: &Option<Vec<Loc<RawFile>>>, system: &System) {
    for (e, f) in entries("files", files) {
        let Some(p) = &f.path else { continue };
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
            v.err(p.span, e.key("path"), format!("{path} would be replaced: {why}"), Some(what.into()));
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
