//! The image audit: what must not be in a golden image, looked for in the finished root tree
//! at the end of every build. A build fails on a finding unless the recipe allows that path
//! (`[audit].allow`), for a file shipped on purpose.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::formats::tree::{Kind, Tree};

/// Files up to this size are searched for private key headers (keys are a few KiB; larger
/// files are data, not keys).
const KEY_SCAN_MAX_BYTES: u64 = 1 << 20;
/// A PEM or OpenSSH private key starts its file (after, at most, a comment line or two).
const KEY_SCAN_PREFIX_BYTES: usize = 4096;

/// Directories where world-writable entries are normal (with the sticky bit).
const TMP_DIRS: [&str; 4] = ["/tmp", "/var/tmp", "/dev/shm", "/var/lock"];

/// Per-machine state that must be made at first boot: present and non-empty means baked in.
const PER_MACHINE: [&str; 4] = [
    "/etc/machine-id",
    "/var/lib/systemd/random-seed",
    "/var/lib/systemd/credential.secret",
    "/var/lib/dbus/machine-id",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub path: String,
    /// What is wrong, in a few words.
    pub what: String,
}

/// Everything in `tree` that a golden image must not carry, except paths in `allow`.
pub fn audit(tree: &Tree, allow: &BTreeSet<String>) -> Vec<Finding> {
    let packaged = packaged_paths(tree);
    let mut out = Vec::new();
    let mut add = |path: &str, what: String| {
        if !allow.contains(path) {
            out.push(Finding { path: path.to_string(), what });
        }
    };
    for p in PER_MACHINE {
        if let Ok(id) = tree.lookup(p.as_bytes()) {
            if let Kind::File(c) = &tree.inode(id).kind {
                if c.size > 0 {
                    add(p, "per-machine state baked into the image (every instance would share it)".into());
                }
            }
        }
    }
    let mut paths: Vec<(String, crate::formats::tree::InodeId)> = Vec::new();
    tree.walk(|path, id, first| {
        if first {
            paths.push((String::from_utf8_lossy(path).into_owned(), id));
        }
    });
    let mut head = vec![0u8; KEY_SCAN_PREFIX_BYTES];
    for (path, id) in paths {
        let inode = tree.inode(id);
        let perm = inode.meta.perm;
        match &inode.kind {
            Kind::File(c) => {
                if path.starts_with("/etc/ssh/ssh_host_") {
                    add(&path, "an SSH host key: every instance would share it".into());
                } else if c.size <= KEY_SCAN_MAX_BYTES && c.size > 0 {
                    let n = (c.size as usize).min(KEY_SCAN_PREFIX_BYTES);
                    if tree.read_content(c, 0, &mut head[..n]).is_ok() && has_private_key(&head[..n]) {
                        add(&path, "a private key".into());
                    }
                }
                if perm & 0o002 != 0 && !in_tmp(&path) {
                    add(&path, format!("world-writable file (mode {:04o})", perm));
                }
                if perm & 0o6000 != 0 && !packaged.contains(path.as_str()) {
                    add(&path, format!("setuid/setgid file that no installed package ships (mode {:04o})", perm));
                }
            }
            Kind::Dir(_) if perm & 0o002 != 0 && perm & 0o1000 == 0 && !in_tmp(&path) => {
                add(&path, format!("world-writable directory without the sticky bit (mode {:04o})", perm));
            }
            _ => {}
        }
    }
    if let Ok(id) = tree.lookup(b"/etc/resolv.conf") {
        if matches!(tree.inode(id).kind, Kind::File(_)) {
            add(
                "/etc/resolv.conf",
                "a static resolver file: instances should use the resolver their network hands out".into(),
            );
        }
    }
    out
}

fn in_tmp(path: &str) -> bool {
    TMP_DIRS.iter().any(|d| path == *d || path.strip_prefix(d).is_some_and(|r| r.starts_with('/')))
}

fn has_private_key(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    text.lines().take(8).any(|l| {
        let l = l.trim();
        l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----")
    })
}

/// Every path dpkg says an installed package owns (`/var/lib/dpkg/info/*.list`).
fn packaged_paths(tree: &Tree) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(id) = tree.lookup(b"/var/lib/dpkg/info") else { return out };
    let Kind::Dir(d) = &tree.inode(id).kind else { return out };
    for name in d.entries.keys().filter(|n| n.ends_with(b".list")) {
        let p = format!("/var/lib/dpkg/info/{}", String::from_utf8_lossy(name));
        if let Ok(Some(bytes)) = tree.file_bytes(p.as_bytes()) {
            for l in String::from_utf8_lossy(&bytes).lines() {
                // Merged /usr: packages list /bin/x, /sbin/x, /lib/x; the tree has /usr/….
                if let Some(r) =
                    l.strip_prefix('/').filter(|r| ["bin/", "sbin/", "lib/"].iter().any(|d| r.starts_with(d)))
                {
                    out.insert(format!("/usr/{r}"));
                }
                out.insert(l.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::tree::{Content, Meta, OnExisting, Timestamp};
    use std::sync::Arc;

    fn file(tree: &mut Tree, path: &str, body: &[u8], perm: u16) {
        let t = Timestamp::default();
        tree.create_parents(path.as_bytes(), &Meta::new(0o755, 0, 0, t)).unwrap();
        let c = Content::inline(Arc::<[u8]>::from(body));
        tree.insert(path.as_bytes(), Kind::File(c), Meta::new(perm, 0, 0, t), OnExisting::Replace).unwrap();
    }

    fn clean() -> Tree {
        let mut tree = Tree::new(Meta::new(0o755, 0, 0, Timestamp::default()));
        file(&mut tree, "/etc/machine-id", b"", 0o444);
        file(&mut tree, "/usr/bin/passwd", b"\x7fELF", 0o4755);
        file(&mut tree, "/var/lib/dpkg/info/passwd.list", b"/.\n/usr\n/usr/bin\n/usr/bin/passwd\n", 0o644);
        file(
            &mut tree,
            "/etc/ssl/certs/ca.pem",
            b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            0o644,
        );
        file(&mut tree, "/tmp/.X11-unix/x", b"", 0o666);
        tree
    }

    #[test]
    fn a_clean_tree_has_no_findings() {
        assert_eq!(audit(&clean(), &BTreeSet::new()), vec![]);
    }

    #[test]
    fn each_planted_fault_is_found_and_can_be_allowed() {
        let cases: [(&str, &[u8], u16, &str); 7] = [
            ("/root/.ssh/id_ed25519", b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n", 0o600, "a private key"),
            ("/etc/app/tls.key", b"# app key\n-----BEGIN RSA PRIVATE KEY-----\nMIIE\n", 0o600, "a private key"),
            ("/etc/ssh/ssh_host_ed25519_key.pub", b"ssh-ed25519 AAAA\n", 0o644, "SSH host key"),
            ("/etc/machine-id", b"0123456789abcdef0123456789abcdef\n", 0o444, "per-machine"),
            ("/etc/resolv.conf", b"nameserver 10.0.0.2\n", 0o644, "static resolver"),
            ("/etc/app.conf", b"x\n", 0o666, "world-writable"),
            ("/usr/local/bin/rootme", b"\x7fELF", 0o4755, "setuid"),
        ];
        for (path, body, perm, what) in cases {
            let mut tree = clean();
            file(&mut tree, path, body, perm);
            let found = audit(&tree, &BTreeSet::new());
            assert_eq!(found.len(), 1, "{path}: {found:?}");
            assert_eq!(found[0].path, path);
            assert!(found[0].what.contains(what), "{path}: {}", found[0].what);
            assert_eq!(audit(&tree, &BTreeSet::from([path.to_string()])), vec![], "{path} allowed");
        }
    }
}
