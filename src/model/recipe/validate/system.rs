//! `[system]`: host name, users, services, network, locale and the rest of the first boot.

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
