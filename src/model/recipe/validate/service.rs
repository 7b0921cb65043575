//! `[[repositories]]`, `[packages].local`, `[[users]]` and `[[steps]]`: the service layer.
//! What can be judged from the recipe and the files it names is judged here; what needs Debian's
//! tools (a repository's signature, a package's architecture and dependencies) is judged when
//! the layer is staged, with the same `file:line:column`.

use super::super::raw::{RawRepository, RawStep, RawUser};
use super::super::service::{LocalPackage, Repository, Service, Step, StepAction, User};
use super::files::image_path_problem;
use super::*;

/// The name a repository may not take: kiln writes Debian's own sources as `debian.sources`.
const RESERVED_REPOSITORY: &str = "debian";

/// A login name as Debian's adduser accepts it.
pub(super) fn valid_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
}

pub(super) const USER_NAME_HELP: &str = "a login name as Debian's adduser accepts it: lower-case letters, digits, `_` and `-`, starting with a letter or `_`, at most 32 characters";

/// Key types OpenSSH accepts in authorized_keys.
const SSH_KEY_TYPES: [&str; 8] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

pub(super) fn check_service(v: &mut V, raw: &RawRecipe, base: &Base) -> Service {
    let mut service = Service::default();
    let tarball = matches!(base, Base::Tarball(_));
    let tarball_help = || {
        Some("the service layer is installed with Debian's apt and dpkg on top of a staged Debian base; set `os` instead of `base.tarball`".to_string())
    };
    let mut names: BTreeMap<String, Span> = BTreeMap::new();
    for (i, r) in raw.repositories.iter().flatten().enumerate() {
        if tarball {
            v.err(r.span, format!("repositories[{i}]"), "[[repositories]] needs an OS base", tarball_help());
            continue;
        }
        if let Some(repo) = check_repository(v, i, r, &mut names) {
            service.repositories.push(repo);
        }
    }
    if let Some(p) = &raw.packages {
        for (i, l) in p.value.local.iter().flat_map(|l| &l.value).enumerate() {
            if tarball {
                v.err(l.span, "packages.local", "[packages].local needs an OS base", tarball_help());
                continue;
            }
            if let Some(pkg) = check_local(v, i, l) {
                service.local.push(pkg);
            }
        }
    }
    let mut user_names: BTreeMap<String, Span> = BTreeMap::new();
    let mut uids: BTreeMap<u32, String> = BTreeMap::new();
    for (i, u) in raw.users.iter().flatten().enumerate() {
        if tarball {
            v.err(u.span, format!("users[{i}]"), "[[users]] needs an OS base", tarball_help());
            continue;
        }
        if let Some(user) = check_user(v, i, u, &mut user_names, &mut uids) {
            service.users.push(user);
        }
    }
    for (i, s) in raw.steps.iter().flatten().enumerate() {
        if tarball {
            v.err(s.span, format!("steps[{i}]"), "[[steps]] needs an OS base", tarball_help());
            continue;
        }
        if let Some(step) = check_step(v, i, s) {
            service.steps.push(step);
        }
    }
    service
}

fn header(span: Span) -> Span {
    Span { end: span.start, ..span }
}

fn check_repository(
    v: &mut V,
    i: usize,
    r: &Loc<RawRepository>,
    names: &mut BTreeMap<String, Span>,
) -> Option<Repository> {
    let raw = &r.value;
    let k = |name: &str| format!("repositories[{i}].{name}");
    let mut ok = true;
    let name = match &raw.name {
        None => {
            v.err(
                header(r.span),
                format!("repositories[{i}]"),
                "[[repositories]] entry has no `name`",
                Some("add `name = \"vendor\"`: the image gets /etc/apt/sources.list.d/vendor.sources".into()),
            );
            ok = false;
            String::new()
        }
        Some(n) => {
            let s = &n.value;
            let valid = !s.is_empty()
                && s.len() <= 63
                && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
            if !valid {
                v.err(
                    n.span,
                    k("name"),
                    format!("`{s}` is not a repository name"),
                    Some("lower-case letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most 63 characters (it names files in the image)".into()),
                );
                ok = false;
            } else if s == RESERVED_REPOSITORY {
                v.err(
                    n.span,
                    k("name"),
                    "`debian` is the name of the image's own Debian sources",
                    Some("choose another name; Debian's archive is set with [image].mirror and apt_mirror".into()),
                );
                ok = false;
            } else if let Some(first) = names.get(s) {
                let at = v.origin(*first);
                v.err(n.span, k("name"), format!("repository `{s}` is named twice"), Some(format!("first at {at}")));
                ok = false;
            } else {
                names.insert(s.clone(), n.span);
            }
            s.clone()
        }
    };
    let uri = match &raw.uri {
        None => {
            v.err(
                header(r.span),
                k("uri"),
                format!("repository `{name}` has no `uri`"),
                Some("add `uri = \"https://packages.example.com/debian\"` (http, https or file:)".into()),
            );
            ok = false;
            String::new()
        }
        Some(u) => {
            let s = u.value.trim_end_matches('/');
            let scheme_ok = ["http://", "https://", "file:/"].iter().any(|p| s.starts_with(p));
            let host_ok = !matches!(s, "http:/" | "https:/" | "file:") && s.len() > "file:/".len();
            if !scheme_ok || !host_ok || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                v.err(
                    u.span,
                    k("uri"),
                    format!("`{}` is not a repository URI", u.value),
                    Some("an http://, https:// or file:/ URI without spaces, like \"https://packages.example.com/debian\"".into()),
                );
                ok = false;
            }
            s.to_string()
        }
    };
    let word_ok = |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control() || c == '#');
    let suites: Vec<String> = match &raw.suites {
        Some(l) if !l.value.is_empty() => {
            for s in &l.value {
                if !word_ok(&s.value) {
                    v.err(
                        s.span,
                        k("suites"),
                        format!("`{}` is not a suite", s.value),
                        Some("one word, like \"stable\" or \"bookworm\"".into()),
                    );
                    ok = false;
                }
            }
            l.value.iter().map(|s| s.value.clone()).collect()
        }
        other => {
            v.err(
                other.as_ref().map(|l| l.span).unwrap_or(header(r.span)),
                k("suites"),
                format!("repository `{name}` names no suite"),
                Some("add `suites = [\"stable\"]` (what the repository's dists/ directory holds), or `[\"./\"]` for a flat repository".into()),
            );
            ok = false;
            Vec::new()
        }
    };
    let flat = suites.iter().any(|s| s.ends_with('/'));
    if flat && suites.len() > 1 {
        v.err(
            raw.suites.as_ref().map(|l| l.span).unwrap_or(r.span),
            k("suites"),
            "a flat repository has exactly one path (ending in `/`)",
            Some("write `suites = [\"./\"]` alone, or name the suites of a repository with dists/".into()),
        );
        ok = false;
    }
    let components: Vec<String> = match &raw.components {
        Some(l) if flat => {
            v.err(
                l.span,
                k("components"),
                "a flat repository (its suite ends in `/`) has no components",
                Some("remove `components`".into()),
            );
            ok = false;
            Vec::new()
        }
        Some(l) if l.value.is_empty() => {
            v.err(l.span, k("components"), "`components` is empty", Some("leave it out for `[\"main\"]`".into()));
            ok = false;
            Vec::new()
        }
        Some(l) => {
            for c in &l.value {
                if !word_ok(&c.value) {
                    v.err(
                        c.span,
                        k("components"),
                        format!("`{}` is not a component", c.value),
                        Some("one word, like \"main\"".into()),
                    );
                    ok = false;
                }
            }
            l.value.iter().map(|c| c.value.clone()).collect()
        }
        None if flat => Vec::new(),
        None => vec!["main".into()],
    };
    let (key, key_armored) = match &raw.key {
        None => {
            v.err(
                header(r.span),
                k("key"),
                format!("repository `{name}` has no `key`"),
                Some("add `key = \"keys/vendor.asc\"`, the repository's OpenPGP public key (armored or binary), relative to this recipe; kiln installs only from repositories it can verify".into()),
            );
            ok = false;
            (PathBuf::new(), false)
        }
        Some(kl) => {
            let path = v.resolve(kl);
            let armored = match check_source_file(v, kl, &k("key"), &path) {
                None => {
                    ok = false;
                    false
                }
                Some(_) => match key_format(&path) {
                    Ok(armored) => armored,
                    Err(problem) => {
                        v.err(kl.span, k("key"), format!("key `{}` {problem}", kl.value), Some("export the repository's public key with `gpg --export` (binary) or `gpg --armor --export` (armored)".into()));
                        ok = false;
                        false
                    }
                },
            };
            (path, armored)
        }
    };
    let origin = v.origin(r.span);
    ok.then_some(Repository { name, uri, suites, components, key, key_armored, origin })
}

/// Whether an OpenPGP public key file is armored; refuses what is no public key at all (a
/// private key above all: it would be installed into the image).
fn key_format(path: &Path) -> Result<bool, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot be read: {e}"))?;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
    if text.contains("PRIVATE KEY") {
        return Err("is a private key; name the repository's public key".into());
    }
    if text.trim_start().starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----") {
        return Ok(true);
    }
    // A binary key starts with a public-key packet: tag 6, old format (0x98/0x99) or new (0xC6).
    match bytes.first() {
        Some(0x98 | 0x99 | 0xC6) => Ok(false),
        _ => Err("is not an OpenPGP public key (neither `-----BEGIN PGP PUBLIC KEY BLOCK-----` nor a binary public-key packet)".into()),
    }
}

/// The first bytes of every `.deb`: an ar archive whose first member is `debian-binary`.
const DEB_MAGIC: &[u8] = b"!<arch>\ndebian-binary";

fn check_local(v: &mut V, i: usize, l: &Loc<String>) -> Option<LocalPackage> {
    let _ = i;
    let path = v.resolve(l);
    check_source_file(v, l, "packages.local", &path)?;
    let mut head = [0u8; DEB_MAGIC.len()];
    let is_deb = std::fs::File::open(&path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .map(|_| head == DEB_MAGIC)
        .unwrap_or(false);
    if !is_deb {
        v.err(
            l.span,
            "packages.local",
            format!("`{}` is not a .deb package", l.value),
            Some(format!(
                "{} does not start like a Debian binary package (an ar archive with debian-binary first); build it with dpkg-deb --build or dpkg-buildpackage",
                path.display()
            )),
        );
        return None;
    }
    Some(LocalPackage { path, written: l.value.clone(), origin: v.origin(l.span) })
}

fn check_user(
    v: &mut V,
    i: usize,
    u: &Loc<RawUser>,
    names: &mut BTreeMap<String, Span>,
    uids: &mut BTreeMap<u32, String>,
) -> Option<User> {
    let raw = &u.value;
    let k = |name: &str| format!("users[{i}].{name}");
    let mut ok = true;
    let Some(n) = &raw.name else {
        v.err(
            header(u.span),
            format!("users[{i}]"),
            "[[users]] entry has no `name`",
            Some("add `name = \"svc\"`".into()),
        );
        return None;
    };
    let name = n.value.clone();
    if !valid_user_name(&name) {
        v.err(n.span, k("name"), format!("`{name}` is not a user name"), Some(USER_NAME_HELP.into()));
        ok = false;
    } else if name == "root" {
        v.err(
            n.span,
            k("name"),
            "`root` already exists",
            Some("[[users]] creates new users; root's settings come from the base".into()),
        );
        ok = false;
    } else if let Some(first) = names.get(&name) {
        let at = v.origin(*first);
        v.err(n.span, k("name"), format!("user `{name}` is created twice"), Some(format!("first at {at}")));
        ok = false;
    } else {
        names.insert(name.clone(), n.span);
    }
    let uid = raw.uid.as_ref().and_then(|id| {
        if !(1..=59_999).contains(&id.value) {
            v.err(
                id.span,
                k("uid"),
                format!("uid {} is out of range", id.value),
                Some("from 1 to 59999 (Debian keeps 0 for root and 60000 and up for itself); leave `uid` out for the next free id from 1000".into()),
            );
            ok = false;
            return None;
        }
        let id32 = id.value as u32;
        if let Some(other) = uids.get(&id32) {
            v.err(id.span, k("uid"), format!("uid {id32} is already `{other}`'s"), None);
            ok = false;
            return None;
        }
        uids.insert(id32, name.clone());
        Some(id32)
    });
    let mut groups = Vec::new();
    for g in raw.groups.iter().flat_map(|l| &l.value) {
        if valid_user_name(&g.value) {
            groups.push(g.value.clone());
        } else {
            v.err(
                g.span,
                k("groups"),
                format!("`{}` is not a group name", g.value),
                Some(USER_NAME_HELP.replace("login", "group")),
            );
            ok = false;
        }
    }
    let mut abs_path = |at: &Option<Loc<String>>, key: &str, example: &str| {
        at.as_ref().and_then(|p| match image_path_problem(&p.value) {
            None => Some(p.value.clone()),
            Some(problem) => {
                v.err(
                    p.span,
                    k(key),
                    format!("`{}` is not an absolute path in the image", p.value),
                    Some(format!("{problem}; like \"{example}\"")),
                );
                ok = false;
                None
            }
        })
    };
    let shell = abs_path(&raw.shell, "shell", "/usr/sbin/nologin");
    let home = abs_path(&raw.home, "home", "/var/lib/svc");
    let mut authorized_keys = Vec::new();
    for key in raw.authorized_keys.iter().flat_map(|l| &l.value) {
        let line = key.value.trim();
        let typed = line.split_whitespace().take(2).any(|w| SSH_KEY_TYPES.contains(&w));
        if line.contains("PRIVATE KEY") {
            v.err(
                key.span,
                k("authorized_keys"),
                "this is a private key",
                Some("authorized_keys holds public keys: the line of the `.pub` file".into()),
            );
            ok = false;
        } else if !typed || line.contains('\n') || line.contains('\r') {
            v.err(
                key.span,
                k("authorized_keys"),
                "not an OpenSSH public key line",
                Some(format!(
                    "one line of a `.pub` file, like \"ssh-ed25519 AAAA… ops@example\" (types: {})",
                    list(&SSH_KEY_TYPES)
                )),
            );
            ok = false;
        } else {
            authorized_keys.push(line.to_string());
        }
    }
    let origin = v.origin(u.span);
    ok.then_some(User { name, uid, groups, shell, home, authorized_keys, origin })
}

fn check_step(v: &mut V, i: usize, s: &Loc<RawStep>) -> Option<Step> {
    let raw = &s.value;
    let k = |name: &str| format!("steps[{i}].{name}");
    let origin = v.origin(s.span);
    match (&raw.run, &raw.script) {
        (Some(r), Some(sc)) => {
            let _ = r;
            v.err(
                sc.span,
                k("script"),
                "a step sets both `run` and `script`",
                Some("each step runs one thing: make two steps".into()),
            );
            None
        }
        (None, None) => {
            v.err(
                header(s.span),
                format!("steps[{i}]"),
                "[[steps]] entry says nothing to run",
                Some("add `run = \"command\"` or `script = \"scripts/setup.sh\"` (relative to this recipe)".into()),
            );
            None
        }
        (Some(r), None) => {
            if r.value.trim().is_empty() {
                v.err(
                    r.span,
                    k("run"),
                    "an empty command",
                    Some("a shell command, run with /bin/sh -c inside the image's root".into()),
                );
                return None;
            }
            Some(Step { action: StepAction::Run(r.value.clone()), origin })
        }
        (None, Some(sc)) => {
            let path = v.resolve(sc);
            check_source_file(v, sc, &k("script"), &path)?;
            Some(Step { action: StepAction::Script(path), origin })
        }
    }
}
