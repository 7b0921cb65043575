//! `[system]`: host name, users, services, network, locale and the rest of the first boot.

use super::super::raw::{LocList, RawServices};
use super::base::package_name;
use super::files::image_path_problem;
use super::*;

pub(super) fn valid_hostname(h: &str) -> bool {
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

pub(super) fn valid_unit(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 255
        && !u.starts_with('-')
        && u.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '@' | '-' | '\\'))
}

/// Services are named with or without `.service`; these compare equal.
pub(super) fn unit_key(u: &str) -> String {
    if u.contains('.') {
        u.to_string()
    } else {
        format!("{u}.service")
    }
}

pub(super) fn check_system(v: &mut V, s: &RawSystem, boot: BootMode, base: &Base, packages: &[String]) -> System {
    let hostname = s.hostname.as_ref().and_then(|h| check_hostname(v, h));
    let (services_enable, services_disable) =
        s.services.as_ref().map(|services| check_services(v, &services.value)).unwrap_or_default();
    let kernel_cmdline = check_kernel_cmdline(v, s.kernel_cmdline.as_ref());
    let timezone = s.timezone.as_ref().and_then(|tz| check_timezone(v, tz));
    let locale = s.locale.as_ref().and_then(|l| check_locale(v, l, base, packages));
    let network = s.network.as_ref().map_or(Network::default(), |n| check_network(v, n));
    let mount_esp = s.mount_esp.as_ref().and_then(|m| check_mount_esp(v, m, boot));
    System { hostname, services_enable, services_disable, kernel_cmdline, timezone, locale, network, mount_esp }
}

fn check_hostname(v: &mut V, h: &Loc<String>) -> Option<String> {
    if valid_hostname(&h.value) {
        return Some(h.value.clone());
    }
    v.err(
        h.span,
        "system.hostname",
        format!("`{}` is not a valid hostname", h.value),
        Some("dot-separated labels of letters, digits and `-` (not at either end), at most 64 characters".into()),
    );
    None
}

/// `services.enable` and `services.disable`: unit names, each in one of the two lists; the
/// units to enable and to disable, each once, in recipe order.
fn check_services(v: &mut V, services: &RawServices) -> (Vec<String>, Vec<String>) {
    let (mut enable, mut disable) = (Vec::new(), Vec::new());
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for (which, list_) in [("enable", &services.enable), ("disable", &services.disable)] {
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
                        enable.push(u.value.clone());
                    } else {
                        disable.push(u.value.clone());
                    }
                }
            }
        }
    }
    (enable, disable)
}

/// `kernel_cmdline`: one argument an item, and never `root=`, which kiln sets.
fn check_kernel_cmdline(v: &mut V, args: Option<&LocList<String>>) -> Vec<String> {
    let mut out = Vec::new();
    for arg in args.iter().flat_map(|l| l.value.iter()) {
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
            out.push(a.clone());
        }
    }
    out
}

/// A tz database name: relative path components under /usr/share/zoneinfo.
fn valid_timezone(tz: &str) -> bool {
    !tz.is_empty()
        && tz.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '+' | '-'))
        })
}

fn check_timezone(v: &mut V, tz: &Loc<String>) -> Option<String> {
    if valid_timezone(&tz.value) {
        return Some(tz.value.clone());
    }
    v.err(
        tz.span,
        "system.timezone",
        format!("`{}` is not a time zone name", tz.value),
        Some("a name from the tz database, like \"Etc/UTC\" or \"Europe/Paris\"".into()),
    );
    None
}

/// `locale`: one the image has, which on a Debian base beyond C means `locales-all`.
fn check_locale(v: &mut V, l: &Loc<String>, base: &Base, packages: &[String]) -> Option<String> {
    let ok =
        !l.value.is_empty() && l.value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-'));
    let builtin = matches!(l.value.as_str(), "C" | "POSIX" | "C.UTF-8" | "C.utf8");
    if !ok {
        v.err(
            l.span,
            "system.locale",
            format!("`{}` is not a locale name", l.value),
            Some("like \"C.UTF-8\" or \"en_US.UTF-8\"".into()),
        );
        return None;
    }
    if !builtin && matches!(base, Base::Debian { .. }) && !packages.iter().any(|p| package_name(p) == "locales-all") {
        v.err(
            l.span,
            "system.locale",
            format!("locale `{}` needs the `locales-all` package", l.value),
            Some("Debian's minimal system has only C.UTF-8; add \"locales-all\" to [packages].include (it ships every locale compiled, so nothing has to run in the image)".into()),
        );
        return None;
    }
    Some(l.value.clone())
}

fn check_network(v: &mut V, n: &Loc<String>) -> Network {
    match v.one_of(n, "system.network", &["dhcp", "none"]) {
        Some("none") => Network::None,
        _ => Network::Dhcp,
    }
}

/// `mount_esp`: a mount point, for an image that has an ESP.
fn check_mount_esp(v: &mut V, m: &Loc<String>, boot: BootMode) -> Option<String> {
    if let Some(problem) = image_path_problem(&m.value) {
        v.err(m.span, "system.mount_esp", format!("`{}` is not a mount point", m.value), Some(problem.into()));
        return None;
    }
    if !boot.has_uefi() {
        v.err(
            m.span,
            "system.mount_esp",
            format!("`mount_esp` needs an ESP, and boot = \"{boot}\" has none"),
            Some("use boot = \"uefi\" or \"hybrid\", or remove `mount_esp`".into()),
        );
        return None;
    }
    Some(m.value.clone())
}
