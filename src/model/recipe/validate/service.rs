//! `[[repositories]]`, `[packages].local`, `[[users]]` and `[[steps]]`: the service layer.
//! What can be judged from the recipe and the files it names is judged here; what needs Debian's
//! tools (a repository's signature, a package's architecture and dependencies) is judged when
//! the layer is staged, with the same `file:line:column`.

use super::super::raw::{LocList, RawRepository, RawStep, RawUser};
use super::super::service::{LocalPackage, Repository, Service, Step, StepAction, User};
use super::base::has_apt_scheme;
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
    if matches!(base, Base::Tarball(_)) {
        refuse_on_tarball(v, raw);
        return Service::default();
    }
    let mut repository_names = BTreeMap::new();
    let repositories = entries("repositories", &raw.repositories)
        .filter_map(|(e, r)| check_repository(v, &e, r, &mut repository_names))
        .collect();
    let local = local_packages(raw).filter_map(|l| check_local(v, l)).collect();
    let (mut user_names, mut uids) = (BTreeMap::new(), BTreeMap::new());
    let users =
        entries("users", &raw.users).filter_map(|(e, u)| check_user(v, &e, u, &mut user_names, &mut uids)).collect();
    let steps = entries("steps", &raw.steps).filter_map(|(e, s)| check_step(v, &e, s)).collect();
    Service { repositories, local, users, steps }
}

/// `[packages].local`, in recipe order.
fn local_packages(raw: &RawRecipe) -> impl Iterator<Item = &Loc<String>> {
    raw.packages.iter().flat_map(|p| p.value.local.iter()).flat_map(|l| &l.value)
}

/// A tarball base has no apt or dpkg to install with: every service-layer entry is refused.
fn refuse_on_tarball(v: &mut V, raw: &RawRecipe) {
    const HELP: &str = "the service layer is installed with Debian's apt and dpkg on top of a staged Debian base; set `os` instead of `base.tarball`";
    for (e, _) in entries("repositories", &raw.repositories) {
        v.err(e.span, e.name(), "[[repositories]] needs an OS base", Some(HELP.into()));
    }
    for l in local_packages(raw) {
        v.err(l.span, "packages.local", "[packages].local needs an OS base", Some(HELP.into()));
    }
    for (e, _) in entries("users", &raw.users) {
        v.err(e.span, e.name(), "[[users]] needs an OS base", Some(HELP.into()));
    }
    for (e, _) in entries("steps", &raw.steps) {
        v.err(e.span, e.name(), "[[steps]] needs an OS base", Some(HELP.into()));
    }
}

/// Checks every item of a list, reporting each it refuses, and gives them all if it refused
/// none.
fn check_all<'a, T>(
    v: &mut V,
    items: impl IntoIterator<Item = &'a Loc<String>>,
    mut check: impl FnMut(&mut V, &'a Loc<String>) -> Option<T>,
) -> Option<Vec<T>> {
    let mut out = Vec::new();
    let mut ok = true;
    for it in items {
        match check(v, it) {
            Some(x) => out.push(x),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn check_repository(
    v: &mut V,
    e: &Entry,
    raw: &RawRepository,
    names: &mut BTreeMap<String, Span>,
) -> Option<Repository> {
    // Messages about the other keys name the repository as written, even a refused name.
    let written = raw.name.as_ref().map_or("", |n| n.value.as_str());
    let name = check_repository_name(v, e, raw.name.as_ref(), names);
    let uri = check_repository_uri(v, e, raw.uri.as_ref(), written);
    let suites = check_suites(v, e, raw.suites.as_ref(), written);
    let components = check_components(v, e, raw.components.as_ref(), is_flat(raw.suites.as_ref()));
    let key = check_key(v, e, raw.key.as_ref(), written);
    let (key, key_armored) = key?;
    Some(Repository {
        name: name?,
        uri: uri?,
        suites: suites?,
        components: components?,
        key,
        key_armored,
        origin: v.origin(e.span),
    })
}

/// Repository names become file names in the image (`/etc/apt/sources.list.d/NAME.sources`).
fn valid_repository_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

fn check_repository_name(
    v: &mut V,
    e: &Entry,
    name: Option<&Loc<String>>,
    names: &mut BTreeMap<String, Span>,
) -> Option<String> {
    let Some(n) = name else {
        v.err(
            e.header(),
            e.name(),
            "[[repositories]] entry has no `name`",
            Some("add `name = \"vendor\"`: the image gets /etc/apt/sources.list.d/vendor.sources".into()),
        );
        return None;
    };
    let s = &n.value;
    if !valid_repository_name(s) {
        v.err(
            n.span,
            e.key("name"),
            format!("`{s}` is not a repository name"),
            Some("lower-case letters, digits, `.`, `_` and `-`, starting with a letter or digit, at most 63 characters (it names files in the image)".into()),
        );
        return None;
    }
    if s == RESERVED_REPOSITORY {
        v.err(
            n.span,
            e.key("name"),
            "`debian` is the name of the image's own Debian sources",
            Some("choose another name; Debian's archive is set with [image].mirror and apt_mirror".into()),
        );
        return None;
    }
    v.first_use(names, n, e.key("name"), format!("repository `{s}` is named twice")).then(|| s.clone())
}

/// `uri`, without the trailing `/`s.
fn check_repository_uri(v: &mut V, e: &Entry, uri: Option<&Loc<String>>, name: &str) -> Option<String> {
    let Some(u) = uri else {
        v.err(
            e.header(),
            e.key("uri"),
            format!("repository `{name}` has no `uri`"),
            Some("add `uri = \"https://packages.example.com/debian\"` (http, https or file:)".into()),
        );
        return None;
    };
    let s = u.value.trim_end_matches('/');
    let host_ok = !matches!(s, "http:/" | "https:/" | "file:") && s.len() > "file:/".len();
    if !has_apt_scheme(s) || !host_ok || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        v.err(
            u.span,
            e.key("uri"),
            format!("`{}` is not a repository URI", u.value),
            Some(
                "an http://, https:// or file:/ URI without spaces, like \"https://packages.example.com/debian\""
                    .into(),
            ),
        );
        return None;
    }
    Some(s.to_string())
}

/// A flat repository names the one directory that holds its index, ending in `/`, for a suite.
fn is_flat(suites: Option<&LocList<String>>) -> bool {
    suites.is_some_and(|l| l.value.iter().any(|s| s.value.ends_with('/')))
}

/// `suites`: at least one, each one word; a flat repository's path alone.
fn check_suites(v: &mut V, e: &Entry, suites: Option<&LocList<String>>, name: &str) -> Option<Vec<String>> {
    let Some(l) = suites.filter(|l| !l.value.is_empty()) else {
        v.err(
            suites.map_or(e.header(), |l| l.span),
            e.key("suites"),
            format!("repository `{name}` names no suite"),
            Some("add `suites = [\"stable\"]` (what the repository's dists/ directory holds), or `[\"./\"]` for a flat repository".into()),
        );
        return None;
    };
    let words = check_all(v, &l.value, |v, s| check_word(v, s, e.key("suites"), "suite", "\"stable\" or \"bookworm\""));
    if is_flat(suites) && l.value.len() > 1 {
        v.err(
            l.span,
            e.key("suites"),
            "a flat repository has exactly one path (ending in `/`)",
            Some("write `suites = [\"./\"]` alone, or name the suites of a repository with dists/".into()),
        );
        return None;
    }
    words
}

/// `components`: `["main"]` when left out; none in a flat repository.
fn check_components(v: &mut V, e: &Entry, components: Option<&LocList<String>>, flat: bool) -> Option<Vec<String>> {
    match components {
        Some(l) if flat => {
            v.err(
                l.span,
                e.key("components"),
                "a flat repository (its suite ends in `/`) has no components",
                Some("remove `components`".into()),
            );
            None
        }
        Some(l) if l.value.is_empty() => {
            v.err(l.span, e.key("components"), "`components` is empty", Some("leave it out for `[\"main\"]`".into()));
            None
        }
        Some(l) => check_all(v, &l.value, |v, c| check_word(v, c, e.key("components"), "component", "\"main\"")),
        None if flat => Some(Vec::new()),
        None => Some(vec!["main".into()]),
    }
}

/// A suite or a component: one word of a sources file's field.
fn check_word(v: &mut V, at: &Loc<String>, key: String, what: &str, like: &str) -> Option<String> {
    let s = &at.value;
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control() || c == '#') {
        v.err(at.span, key, format!("`{s}` is not a {what}"), Some(format!("one word, like {like}")));
        return None;
    }
    Some(s.clone())
}

/// `key`: the repository's OpenPGP public key file, and whether it is armored.
fn check_key(v: &mut V, e: &Entry, key: Option<&Loc<String>>, name: &str) -> Option<(PathBuf, bool)> {
    let Some(kl) = key else {
        v.err(
            e.header(),
            e.key("key"),
            format!("repository `{name}` has no `key`"),
            Some("add `key = \"keys/vendor.asc\"`, the repository's OpenPGP public key (armored or binary), relative to this recipe; kiln installs only from repositories it can verify".into()),
        );
        return None;
    };
    let path = v.resolve(kl);
    check_source_file(v, kl, &e.key("key"), &path)?;
    match key_format(&path) {
        Ok(armored) => Some((path, armored)),
        Err(problem) => {
            v.err(kl.span, e.key("key"), format!("key `{}` {problem}", kl.value), Some("export the repository's public key with `gpg --export` (binary) or `gpg --armor --export` (armored)".into()));
            None
        }
    }
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

fn check_local(v: &mut V, l: &Loc<String>) -> Option<LocalPackage> {
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
    e: &Entry,
    raw: &RawUser,
    names: &mut BTreeMap<String, Span>,
    uids: &mut BTreeMap<u32, String>,
) -> Option<User> {
    let Some(n) = &raw.name else {
        v.err(e.header(), e.name(), "[[users]] entry has no `name`", Some("add `name = \"svc\"`".into()));
        return None;
    };
    let name = check_user_name(v, e, n, names);
    let uid = check_uid(v, e, raw.uid.as_ref(), &n.value, uids);
    let groups = check_all(v, raw.groups.iter().flat_map(|l| &l.value), |v, g| check_group(v, e, g));
    let shell = check_absolute_path(v, e, raw.shell.as_ref(), "shell", "/usr/sbin/nologin");
    let home = check_absolute_path(v, e, raw.home.as_ref(), "home", "/var/lib/svc");
    let authorized_keys =
        check_all(v, raw.authorized_keys.iter().flat_map(|l| &l.value), |v, k| check_authorized_key(v, e, k));
    Some(User {
        name: name?,
        uid: uid?,
        groups: groups?,
        shell: shell?,
        home: home?,
        authorized_keys: authorized_keys?,
        origin: v.origin(e.span),
    })
}

/// `name`: a login name, not root's, and no other entry's.
fn check_user_name(v: &mut V, e: &Entry, n: &Loc<String>, names: &mut BTreeMap<String, Span>) -> Option<String> {
    let name = &n.value;
    if !valid_user_name(name) {
        v.err(n.span, e.key("name"), format!("`{name}` is not a user name"), Some(USER_NAME_HELP.into()));
        return None;
    }
    if name == "root" {
        v.err(
            n.span,
            e.key("name"),
            "`root` already exists",
            Some("[[users]] creates new users; root's settings come from the base".into()),
        );
        return None;
    }
    v.first_use(names, n, e.key("name"), format!("user `{name}` is created twice")).then(|| name.clone())
}

/// `uid`: in the range Debian leaves to local accounts, and no other user's (`uids` holds the
/// ones taken, by user `name`).
fn check_uid(
    v: &mut V,
    e: &Entry,
    uid: Option<&Loc<i64>>,
    name: &str,
    uids: &mut BTreeMap<u32, String>,
) -> Option<Option<u32>> {
    let Some(id) = uid else { return Some(None) };
    if !(1..=59_999).contains(&id.value) {
        v.err(
            id.span,
            e.key("uid"),
            format!("uid {} is out of range", id.value),
            Some("from 1 to 59999 (Debian keeps 0 for root and 60000 and up for itself); leave `uid` out for the next free id from 1000".into()),
        );
        return None;
    }
    let id32 = id.value as u32;
    if let Some(other) = uids.get(&id32) {
        v.err(id.span, e.key("uid"), format!("uid {id32} is already `{other}`'s"), None);
        return None;
    }
    uids.insert(id32, name.to_string());
    Some(Some(id32))
}

fn check_group(v: &mut V, e: &Entry, g: &Loc<String>) -> Option<String> {
    if valid_user_name(&g.value) {
        return Some(g.value.clone());
    }
    v.err(
        g.span,
        e.key("groups"),
        format!("`{}` is not a group name", g.value),
        Some(USER_NAME_HELP.replace("login", "group")),
    );
    None
}

/// `shell` or `home`: an absolute path in the image, written like `example`.
fn check_absolute_path(
    v: &mut V,
    e: &Entry,
    at: Option<&Loc<String>>,
    key: &str,
    example: &str,
) -> Option<Option<String>> {
    let Some(p) = at else { return Some(None) };
    let Some(problem) = image_path_problem(&p.value) else { return Some(Some(p.value.clone())) };
    v.err(
        p.span,
        e.key(key),
        format!("`{}` is not an absolute path in the image", p.value),
        Some(format!("{problem}; like \"{example}\"")),
    );
    None
}

/// One line of an `authorized_keys` file: a public key, never a private one.
fn check_authorized_key(v: &mut V, e: &Entry, key: &Loc<String>) -> Option<String> {
    let line = key.value.trim();
    let typed = line.split_whitespace().take(2).any(|w| SSH_KEY_TYPES.contains(&w));
    if line.contains("PRIVATE KEY") {
        v.err(
            key.span,
            e.key("authorized_keys"),
            "this is a private key",
            Some("authorized_keys holds public keys: the line of the `.pub` file".into()),
        );
        return None;
    }
    if !typed || line.contains('\n') || line.contains('\r') {
        v.err(
            key.span,
            e.key("authorized_keys"),
            "not an OpenSSH public key line",
            Some(format!(
                "one line of a `.pub` file, like \"ssh-ed25519 AAAA… ops@example\" (types: {})",
                list(&SSH_KEY_TYPES)
            )),
        );
        return None;
    }
    Some(line.to_string())
}

fn check_step(v: &mut V, e: &Entry, raw: &RawStep) -> Option<Step> {
    let origin = v.origin(e.span);
    match (&raw.run, &raw.script) {
        (Some(_), Some(sc)) => {
            v.err(
                sc.span,
                e.key("script"),
                "a step sets both `run` and `script`",
                Some("each step runs one thing: make two steps".into()),
            );
            None
        }
        (None, None) => {
            v.err(
                e.header(),
                e.name(),
                "[[steps]] entry says nothing to run",
                Some("add `run = \"command\"` or `script = \"scripts/setup.sh\"` (relative to this recipe)".into()),
            );
            None
        }
        (Some(r), None) => {
            if r.value.trim().is_empty() {
                v.err(
                    r.span,
                    e.key("run"),
                    "an empty command",
                    Some("a shell command, run with /bin/sh -c inside the image's root".into()),
                );
                return None;
            }
            Some(Step { action: StepAction::Run(r.value.clone()), origin })
        }
        (None, Some(sc)) => {
            let path = v.resolve(sc);
            check_source_file(v, sc, &e.key("script"), &path)?;
            Some(Step { action: StepAction::Script(path), origin })
        }
    }
}
