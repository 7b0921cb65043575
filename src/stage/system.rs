//! Files kiln generates in the root tree so the image boots and behaves as a fresh machine:
//! fstab by UUID, hostname, an empty machine-id, DHCP on the first NIC, and enabled services as
//! the symlinks `systemctl enable` would make (read from each unit's `[Install]` section, since
//! systemctl cannot run against an in-memory tree).

use std::sync::Arc;

use crate::formats::tree::{Content, Kind, Meta, OnExisting, Timestamp, Tree, TreeError};

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("service {unit:?} has no unit file in the image (looked in /etc/systemd/system, /usr/lib/systemd/system, /lib/systemd/system); is the package that ships it in [packages].include?")]
    NoUnit { unit: String },
    #[error("service {unit:?} has no [Install] section, so it cannot be enabled (it is started by another unit or by socket activation)")]
    NotInstallable { unit: String },
    #[error("generating {path}")]
    Tree { path: String, source: TreeError },
    #[error("time zone {tz:?} is not in the image (no /usr/share/zoneinfo/{tz}); add \"tzdata\" to [packages].include, or check the name against the tz database")]
    NoTimezone { tz: String },
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    pub hostname: Option<String>,
    pub services_enable: Vec<String>,
    pub services_disable: Vec<String>,
    /// ext4 UUID of the root filesystem (lowercase, hyphenated).
    pub root_fs_uuid: String,
    /// FAT volume id of the ESP (`ABCD-1234`) and where to mount it, when the image mounts it.
    pub esp_mount: Option<(String, String)>,
    /// Time given to every generated file.
    pub time: Timestamp,
    /// tz database name (`Europe/Paris`): `/etc/localtime` links into `/usr/share/zoneinfo`.
    pub timezone: Option<String>,
    /// `LANG` in `/etc/default/locale`.
    pub locale: Option<String>,
    /// DHCP on every Ethernet NIC with systemd-networkd; false when the recipe brings its own
    /// network configuration (`[system].network = "none"`).
    pub dhcp: bool,
    /// The image's own apt sources, when the base is a Debian suite.
    pub apt: Option<AptSources>,
}

/// What the instance's apt reads: the suite and its `-updates` from the mirror, and the suite's
/// security updates, as one deb822 file (`/etc/apt/sources.list.d/debian.sources`).
#[derive(Debug, Clone)]
pub struct AptSources {
    pub suite: String,
    pub mirror: String,
    /// None: the build host names no security archive, and the image gets none.
    pub security_mirror: Option<String>,
    pub components: Vec<String>,
}

impl AptSources {
    pub fn deb822(&self) -> String {
        let key = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let comps = self.components.join(" ");
        let mut s = format!(
            "# Written by kiln.\nTypes: deb\nURIs: {}\nSuites: {s} {s}-updates\nComponents: {comps}\nSigned-By: {key}\n",
            self.mirror,
            s = self.suite
        );
        if let Some(sec) = &self.security_mirror {
            s.push_str(&format!(
                "\nTypes: deb\nURIs: {sec}\nSuites: {}-security\nComponents: {comps}\nSigned-By: {key}\n",
                self.suite
            ));
        }
        s
    }
}

/// Built into Debian's libc: needs no `locales` package and no generation.
pub const DEFAULT_LOCALE: &str = "C.UTF-8";

const HOSTS: &str =
    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n";

/// Host keys are made on the instance, never baked: before sshd first starts, when none exist.
/// (cloud-init, where installed, replaces them again with its own at first boot.)
const SSH_HOSTKEYS_UNIT: &str = "# Written by kiln: SSH host keys are made per instance, at first boot.
[Unit]
Description=Generate SSH host keys for this instance
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service ssh.socket

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target ssh.service ssh.socket
";

/// Grows the root partition to the end of its volume (moving the backup GPT there), then the
/// file system, at every boot: EC2 volumes are usually larger than the image and can be
/// enlarged later. growpart (cloud-guest-utils) is what cloud-init itself uses, and works
/// with or without cloud-init.
const GROWROOT_SCRIPT: &str = r#"#!/bin/sh
# Written by kiln: grow / to fill its volume.
set -eu
root=$(findmnt -no SOURCE /)
disk=/dev/$(lsblk -no PKNAME "$root")
part=$(cat "/sys/class/block/${root#/dev/}/partition")
if out=$(growpart "$disk" "$part" 2>&1); then
  echo "$out"
  resize2fs "$root"
else
  case "$out" in
    NOCHANGE*) echo "$out" ;;
    *) echo "$out" >&2; exit 1 ;;
  esac
fi
"#;

const GROWROOT_UNIT: &str = "# Written by kiln: grow / to fill its volume.
[Unit]
Description=Grow the root partition and file system to fill the volume
DefaultDependencies=no
After=systemd-remount-fs.service
Before=local-fs.target shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/kiln-growroot

[Install]
WantedBy=local-fs.target
";

const UNIT_DIRS: [&str; 3] = ["/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"];

fn put_file(tree: &mut Tree, path: &str, text: &str, perm: u16, time: Timestamp) -> Result<(), SystemError> {
    let err = |source| SystemError::Tree { path: path.to_string(), source };
    let dir_meta = Meta::new(0o755, 0, 0, time);
    tree.create_parents(path.as_bytes(), &dir_meta).map_err(err)?;
    let content = Content::inline(Arc::<[u8]>::from(text.as_bytes()));
    tree.insert(path.as_bytes(), Kind::File(content), Meta::new(perm, 0, 0, time), OnExisting::Replace).map_err(err)?;
    Ok(())
}

fn put_symlink(tree: &mut Tree, path: &str, target: &str, time: Timestamp) -> Result<(), SystemError> {
    let err = |source| SystemError::Tree { path: path.to_string(), source };
    tree.create_parents(path.as_bytes(), &Meta::new(0o755, 0, 0, time)).map_err(err)?;
    tree.insert(
        path.as_bytes(),
        Kind::Symlink(target.as_bytes().to_vec()),
        Meta::new(0o777, 0, 0, time),
        OnExisting::Replace,
    )
    .map_err(err)?;
    Ok(())
}

/// The image's `/etc/passwd` and `/etc/group` as text (empty when missing), for resolving
/// owners given by name (`recipe::FileEntry::resolve_owner`).
pub fn user_db(tree: &Tree) -> (String, String) {
    (read_text(tree, "/etc/passwd").unwrap_or_default(), read_text(tree, "/etc/group").unwrap_or_default())
}

/// The name of cloud-init's default user as the image configures it: `system_info.default_user.name`
/// in `/etc/cloud/cloud.cfg`, overridden by `/etc/cloud/cloud.cfg.d/*.cfg` in name order (as
/// cloud-init merges them). Reads only that key's simple block form.
pub fn cloud_init_default_user(tree: &Tree) -> Option<String> {
    let mut files = vec!["/etc/cloud/cloud.cfg".to_string()];
    if let Ok(id) = tree.resolve(b"/etc/cloud/cloud.cfg.d") {
        if let Kind::Dir(d) = &tree.inode(id).kind {
            files.extend(
                d.entries
                    .keys()
                    .filter(|n| n.ends_with(b".cfg"))
                    .map(|n| format!("/etc/cloud/cloud.cfg.d/{}", String::from_utf8_lossy(n))),
            );
        }
    }
    files.iter().rev().filter_map(|f| read_text(tree, f)).find_map(|t| default_user_in(&t))
}

fn default_user_in(yaml: &str) -> Option<String> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut block: Option<usize> = None;
    for line in yaml.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match block {
            Some(i) if indent(line) > i => {
                if let Some(v) = t.strip_prefix("name:") {
                    let v = v.split('#').next().unwrap_or("").trim().trim_matches(['"', '\'']);
                    if !v.is_empty() {
                        return Some(v.to_string());
                    }
                }
            }
            _ => block = (t == "default_user:").then(|| indent(line)),
        }
    }
    None
}

fn read_text(tree: &Tree, path: &str) -> Option<String> {
    let bytes = tree.file_bytes(path.as_bytes()).ok()??;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Applies `cfg` to the tree. Returns notes worth showing the user.
pub fn configure(tree: &mut Tree, cfg: &SystemConfig) -> Result<Vec<String>, SystemError> {
    let t = cfg.time;
    let mut notes = Vec::new();

    let mut fstab = String::from("# Generated by kiln: filesystems by UUID, so device names may change freely.\n");
    // x-systemd.growfs grows the root to fill its partition when a larger volume is attached.
    fstab.push_str(&format!("UUID={}\t/\text4\tdefaults,discard,x-systemd.growfs\t0\t1\n", cfg.root_fs_uuid));
    if let Some((vol, mnt)) = &cfg.esp_mount {
        fstab.push_str(&format!("UUID={vol}\t{mnt}\tvfat\tumask=0077,nofail\t0\t2\n"));
        let mnt_meta = Meta::new(0o755, 0, 0, t);
        tree.create_parents(format!("{mnt}/x").as_bytes(), &mnt_meta)
            .map_err(|source| SystemError::Tree { path: mnt.clone(), source })?;
        // The boot entry loads /vmlinuz and /initrd.img from the ESP. With the ESP mounted,
        // keep them current when a kernel or initramfs is upgraded inside the instance.
        let hook = esp_hook(mnt);
        put_file(tree, "/etc/kernel/postinst.d/zz-kiln-esp", &hook, 0o755, t)?;
        put_file(tree, "/etc/initramfs/post-update.d/zz-kiln-esp", &hook, 0o755, t)?;
    }
    put_file(tree, "/etc/fstab", &fstab, 0o644, t)?;

    if let Some(apt) = &cfg.apt {
        let _ = tree.remove(b"/etc/apt/sources.list");
        put_file(tree, "/etc/apt/sources.list.d/debian.sources", &apt.deb822(), 0o644, t)?;
    }

    if let Some(h) = &cfg.hostname {
        put_file(tree, "/etc/hostname", &format!("{h}\n"), 0o644, t)?;
    }
    // No line for the host's own name: an instance's name changes at launch (cloud-init sets
    // it from the metadata service), and a stale `127.0.1.1 name` line would outlive it. The
    // current name resolves through systemd-resolved, which answers for it itself.
    put_file(tree, "/etc/hosts", HOSTS, 0o644, t)?;

    // systemd treats an empty machine-id as "first boot" and generates a fresh one.
    put_file(tree, "/etc/machine-id", "", 0o444, t)?;
    let _ = tree.remove(b"/var/lib/dbus/machine-id");

    if let Some(tz) = &cfg.timezone {
        // Debian's own layout (what `dpkg-reconfigure tzdata` writes): an absolute symlink
        // plus the name in /etc/timezone.
        let zone = format!("/usr/share/zoneinfo/{tz}");
        if tree.resolve(zone.as_bytes()).is_err() {
            return Err(SystemError::NoTimezone { tz: tz.clone() });
        }
        put_symlink(tree, "/etc/localtime", &zone, t)?;
        put_file(tree, "/etc/timezone", &format!("{tz}\n"), 0o644, t)?;
    }
    let locale = cfg.locale.as_deref().unwrap_or(DEFAULT_LOCALE);
    put_file(tree, "/etc/default/locale", &format!("LANG={locale}\n"), 0o644, t)?;

    let mut enable: Vec<String> = Vec::new();
    if cfg.dhcp {
        // DHCP on every Ethernet NIC (EC2's ENA shows up as ens5/enp*; QEMU's as enp0s*).
        put_file(
            tree,
            "/etc/systemd/network/80-kiln-dhcp.network",
            "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n\n[DHCPv4]\nUseHostname=false\n",
            0o644,
            t,
        )?;
        enable.push("systemd-networkd.service".into());
        if find_unit(tree, "systemd-resolved.service").is_some() {
            enable.push("systemd-resolved.service".into());
            // The resolver is the one the network hands out, kept by resolved at boot.
            put_symlink(tree, "/etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf", t)?;
        }
    }
    if tree.resolve(b"/usr/sbin/sshd").is_ok() {
        put_file(tree, "/etc/systemd/system/kiln-ssh-hostkeys.service", SSH_HOSTKEYS_UNIT, 0o644, t)?;
        enable.push("kiln-ssh-hostkeys.service".into());
    }
    if tree.resolve(b"/usr/bin/growpart").is_ok() {
        put_file(tree, "/usr/local/sbin/kiln-growroot", GROWROOT_SCRIPT, 0o755, t)?;
        put_file(tree, "/etc/systemd/system/kiln-growroot.service", GROWROOT_UNIT, 0o644, t)?;
        enable.push("kiln-growroot.service".into());
    }
    if tree.resolve(b"/usr/bin/cloud-init").is_ok() {
        // cloud-init's locale module otherwise sets en_US.UTF-8, which minbase cannot generate.
        let locale = cfg.locale.as_deref().unwrap_or(DEFAULT_LOCALE);
        put_file(
            tree,
            "/etc/cloud/cloud.cfg.d/00_kiln_locale.cfg",
            &format!("# Written by kiln: the image's locale, so cloud-init leaves it as it is.\nlocale: {locale}\n"),
            0o644,
            t,
        )?;
    }
    enable.extend(cfg.services_enable.iter().map(|u| unit_name(u)));
    let mut done = Vec::new();
    for u in &enable {
        enable_unit(tree, u, t, &mut done)?;
    }
    for u in &cfg.services_disable {
        disable_unit(tree, &unit_name(u));
    }
    // Said only when SSH would not start: Debian's package enables it, and a recipe that
    // disables it means it.
    let enabled = tree.lookup(b"/etc/systemd/system/multi-user.target.wants/ssh.service").is_ok();
    let disabled = cfg.services_disable.iter().any(|u| unit_name(u) == "ssh.service");
    if tree.resolve(b"/usr/sbin/sshd").is_ok() && !enabled && !disabled {
        notes.push("openssh-server is installed but ssh.service is not enabled, so no SSH server starts at boot; add `ssh` to [system].services.enable".into());
    }
    Ok(notes)
}

/// A hook for kernel postinst (`$1` = version) and initramfs post-update (`$1` = version,
/// `$2` = initrd): copies the newest installed kernel and its initrd to the ESP, each written
/// beside the old one and renamed, so an interrupted copy never leaves a broken boot file.
fn esp_hook(esp: &str) -> String {
    format!(
        r#"#!/bin/sh
# Installed by kiln: the ESP's boot entry loads /vmlinuz and /initrd.img; keep them current.
set -e
esp="{esp}"
[ -d "$esp/loader/entries" ] || exit 0
version=$(ls /boot/vmlinuz-* 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -V | tail -n 1)
[ -n "$version" ] && [ -e "/boot/initrd.img-$version" ] || exit 0
cp "/boot/vmlinuz-$version" "$esp/vmlinuz.kiln-new" && mv "$esp/vmlinuz.kiln-new" "$esp/vmlinuz"
cp "/boot/initrd.img-$version" "$esp/initrd.img.kiln-new" && mv "$esp/initrd.img.kiln-new" "$esp/initrd.img"
"#
    )
}

fn unit_name(u: &str) -> String {
    if u.contains('.') {
        u.to_string()
    } else {
        format!("{u}.service")
    }
}

/// Where a unit's file is, as the absolute path a symlink should point to.
fn find_unit(tree: &Tree, unit: &str) -> Option<String> {
    UNIT_DIRS.iter().map(|d| format!("{d}/{unit}")).find(|p| tree.resolve(p.as_bytes()).is_ok()).map(|p| {
        // Debian's merged /usr makes /lib a symlink; point at the canonical /usr/lib path.
        p.strip_prefix("/lib/").map(|rest| format!("/usr/lib/{rest}")).unwrap_or(p)
    })
}

fn enable_unit(tree: &mut Tree, unit: &str, t: Timestamp, done: &mut Vec<String>) -> Result<(), SystemError> {
    if done.iter().any(|d| d == unit) {
        return Ok(());
    }
    done.push(unit.to_string());
    // `name@instance.service` is enabled from its template `name@.service`.
    let (file_unit, instance) = match unit.split_once('@') {
        Some((pre, rest)) if !rest.starts_with('.') => {
            let suffix = rest.rsplit_once('.').map(|(_, s)| s).unwrap_or("service");
            (format!("{pre}@.{suffix}"), Some(unit.to_string()))
        }
        _ => (unit.to_string(), None),
    };
    let path = find_unit(tree, &file_unit).ok_or_else(|| SystemError::NoUnit { unit: unit.to_string() })?;
    let text = read_text(tree, &path).unwrap_or_default();
    let install = parse_install(&text);
    if install.is_empty() {
        return Err(SystemError::NotInstallable { unit: unit.to_string() });
    }
    let link_name = instance.clone().unwrap_or_else(|| file_unit.clone());
    for (key, value) in install {
        match key.as_str() {
            "WantedBy" | "RequiredBy" => {
                let suffix = if key == "WantedBy" { "wants" } else { "requires" };
                for target in value.split_whitespace() {
                    put_symlink(tree, &format!("/etc/systemd/system/{target}.{suffix}/{link_name}"), &path, t)?;
                }
            }
            "Alias" => {
                for alias in value.split_whitespace() {
                    put_symlink(tree, &format!("/etc/systemd/system/{alias}"), &path, t)?;
                }
            }
            "Also" => {
                for also in value.split_whitespace() {
                    enable_unit(tree, also, t, done)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn disable_unit(tree: &mut Tree, unit: &str) {
    let Ok(etc) = tree.lookup(b"/etc/systemd/system") else { return };
    let Kind::Dir(d) = &tree.inode(etc).kind else { return };
    let dirs: Vec<Vec<u8>> =
        d.entries.keys().filter(|n| n.ends_with(b".wants") || n.ends_with(b".requires")).cloned().collect();
    for dname in dirs {
        let mut p = b"/etc/systemd/system/".to_vec();
        p.extend_from_slice(&dname);
        p.push(b'/');
        p.extend_from_slice(unit.as_bytes());
        let _ = tree.remove(&p);
    }
}

/// `(key, value)` pairs of a unit's `[Install]` section.
fn parse_install(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_install = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        if !in_install || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_with_unit(unit: &str, text: &str) -> Tree {
        let t = Timestamp::default();
        let mut tree = Tree::new(Meta::new(0o755, 0, 0, t));
        put_file(&mut tree, &format!("/usr/lib/systemd/system/{unit}"), text, 0o644, t).unwrap();
        put_symlink(&mut tree, "/lib", "usr/lib", t).unwrap();
        tree
    }

    #[test]
    fn cloud_init_default_user_comes_from_the_last_file_that_sets_it() {
        let debian = "system_info:\n   distro: debian\n   # default user\n   default_user:\n     name: debian\n     lock_passwd: True\n   paths:\n     cloud_dir: /var/lib/cloud/\n";
        assert_eq!(default_user_in(debian).as_deref(), Some("debian"));
        assert_eq!(default_user_in("users:\n  - name: bob\n"), None);
        let t = Timestamp::default();
        let mut tree = Tree::new(Meta::new(0o755, 0, 0, t));
        put_file(&mut tree, "/etc/cloud/cloud.cfg", debian, 0o644, t).unwrap();
        assert_eq!(cloud_init_default_user(&tree).as_deref(), Some("debian"));
        put_file(
            &mut tree,
            "/etc/cloud/cloud.cfg.d/01_user.cfg",
            "system_info:\n  default_user:\n    name: \"admin\"  # as Debian's AMIs\n",
            0o644,
            t,
        )
        .unwrap();
        put_file(&mut tree, "/etc/cloud/cloud.cfg.d/05_logging.cfg", "output: {}\n", 0o644, t).unwrap();
        assert_eq!(cloud_init_default_user(&tree).as_deref(), Some("admin"));
    }

    #[test]
    fn apt_sources_carry_updates_and_security() {
        let a = AptSources {
            suite: "bookworm".into(),
            mirror: "http://mirror.example/debian".into(),
            security_mirror: Some("http://security.example/debian-security".into()),
            components: vec!["main".into()],
        };
        let text = a.deb822();
        assert!(text.contains("URIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"), "{text}");
        assert!(text.contains("URIs: http://security.example/debian-security\nSuites: bookworm-security\n"), "{text}");
        assert_eq!(text.matches("Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg").count(), 2);
    }

    #[test]
    fn enable_follows_install_section() {
        let mut tree = tree_with_unit(
            "ssh.service",
            "[Unit]\nDescription=x\n[Install]\nWantedBy=multi-user.target\nAlias=sshd.service\n",
        );
        let mut done = vec![];
        enable_unit(&mut tree, "ssh.service", Timestamp::default(), &mut done).unwrap();
        let id = tree.lookup(b"/etc/systemd/system/multi-user.target.wants/ssh.service").unwrap();
        assert_eq!(tree.inode(id).kind, Kind::Symlink(b"/usr/lib/systemd/system/ssh.service".to_vec()));
        assert!(tree.lookup(b"/etc/systemd/system/sshd.service").is_ok());
        disable_unit(&mut tree, "ssh.service");
        assert!(tree.lookup(b"/etc/systemd/system/multi-user.target.wants/ssh.service").is_err());
    }

    #[test]
    fn ssh_that_would_not_start_is_noted_and_only_then() {
        let unit = "[Unit]\nDescription=x\n[Install]\nWantedBy=multi-user.target\n";
        let noted = |enable: &[&str], disable: &[&str], already: bool| {
            let t = Timestamp::default();
            let mut tree = tree_with_unit("ssh.service", unit);
            put_file(&mut tree, "/usr/sbin/sshd", "", 0o755, t).unwrap();
            if already {
                enable_unit(&mut tree, "ssh.service", t, &mut vec![]).unwrap();
            }
            let mut c = cfg();
            c.dhcp = false;
            c.services_enable = enable.iter().map(|s| s.to_string()).collect();
            c.services_disable = disable.iter().map(|s| s.to_string()).collect();
            configure(&mut tree, &c).unwrap().iter().any(|n| n.contains("no SSH server starts at boot"))
        };
        // Debian's package enabled it: nothing to say (the README's first command).
        assert!(!noted(&[], &[], true));
        assert!(!noted(&["ssh"], &[], false));
        assert!(!noted(&[], &["ssh"], false));
        assert!(noted(&[], &[], false));
    }

    fn cfg() -> SystemConfig {
        SystemConfig {
            hostname: None,
            services_enable: vec![],
            services_disable: vec![],
            root_fs_uuid: "0f0e0d0c-0b0a-0908-0706-050403020100".into(),
            esp_mount: None,
            time: Timestamp::default(),
            timezone: None,
            locale: None,
            dhcp: true,
            apt: None,
        }
    }

    fn symlink_target(tree: &Tree, path: &str) -> Option<Vec<u8>> {
        let id = tree.lookup(path.as_bytes()).ok()?;
        match &tree.inode(id).kind {
            Kind::Symlink(t) => Some(t.clone()),
            _ => None,
        }
    }

    #[test]
    fn timezone_locale_and_network_settings() {
        let mut tree = tree_with_unit("systemd-networkd.service", "[Install]\nWantedBy=multi-user.target\n");
        let t = Timestamp::default();
        put_file(&mut tree, "/usr/share/zoneinfo/Europe/Paris", "TZif", 0o644, t).unwrap();
        put_symlink(&mut tree, "/etc/localtime", "/usr/share/zoneinfo/Etc/UTC", t).unwrap();
        let c = SystemConfig { timezone: Some("Europe/Paris".into()), locale: Some("en_US.UTF-8".into()), ..cfg() };
        configure(&mut tree, &c).unwrap();
        assert_eq!(symlink_target(&tree, "/etc/localtime").as_deref(), Some(&b"/usr/share/zoneinfo/Europe/Paris"[..]));
        assert_eq!(read_text(&tree, "/etc/timezone").as_deref(), Some("Europe/Paris\n"));
        assert_eq!(read_text(&tree, "/etc/default/locale").as_deref(), Some("LANG=en_US.UTF-8\n"));
        assert!(read_text(&tree, "/etc/systemd/network/80-kiln-dhcp.network").is_some());
        assert!(tree.lookup(b"/etc/systemd/system/multi-user.target.wants/systemd-networkd.service").is_ok());

        let mut bare = tree_with_unit("systemd-networkd.service", "[Install]\nWantedBy=multi-user.target\n");
        configure(&mut bare, &SystemConfig { dhcp: false, ..cfg() }).unwrap();
        assert!(read_text(&bare, "/etc/systemd/network/80-kiln-dhcp.network").is_none());
        assert!(bare.lookup(b"/etc/systemd/system/multi-user.target.wants/systemd-networkd.service").is_err());

        let e = configure(&mut bare, &SystemConfig { timezone: Some("Mars/Olympus".into()), ..cfg() }).unwrap_err();
        assert!(e.to_string().contains("tzdata"), "{e}");
    }

    #[test]
    fn enabling_a_missing_or_static_unit_says_why() {
        let mut tree = tree_with_unit("static.service", "[Unit]\nDescription=x\n");
        let mut done = vec![];
        let e = enable_unit(&mut tree, "nope.service", Timestamp::default(), &mut done).unwrap_err();
        assert!(e.to_string().contains("no unit file"), "{e}");
        let e = enable_unit(&mut tree, "static.service", Timestamp::default(), &mut done).unwrap_err();
        assert!(e.to_string().contains("no [Install] section"), "{e}");
    }
}
