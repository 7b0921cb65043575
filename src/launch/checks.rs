//! What `kiln test` asks a launched instance, and how the answers are judged.
//!
//! One shell script (POSIX sh, run as root over SSH) prints every fact as a `==> name`
//! section; [`evaluate`] turns facts and expectations into pass/fail checks with their
//! evidence. Both halves are plain text in, plain values out, so the judge is unit-tested on
//! facts with planted faults as well as on real launches.

use std::collections::BTreeMap;

use serde::Serialize;

/// Printed by the instance, section by section. Every command may fail: the judge decides
/// what a missing answer means. Uses only what a Debian minbase has (coreutils, util-linux,
/// systemd, dd, od) plus the tools of the features being checked.
pub const FACTS_SCRIPT: &str = r#"
exec 2>/dev/null
sec() { echo "==> $1"; }
sec cmdline; cat /proc/cmdline
sec btime; awk '/^btime/ {print $2}' /proc/stat
sec system_state; systemctl is-system-running
sec failed_units; systemctl list-units --failed --no-legend --plain | awk '{print $1}'
sec cloud_init; command -v cloud-init
sec cloud_init_status; cloud-init status --long
sec cloud_init_result; cat /run/cloud-init/result.json
sec machine_id; cat /etc/machine-id; stat -c %Y /etc/machine-id
sec host_keys; for f in /etc/ssh/ssh_host_*_key.pub; do [ -e "$f" ] && echo "$(stat -c %Y "$f") $(ssh-keygen -lf "$f")"; done
sec resolv_conf_target; readlink -f /etc/resolv.conf
sec resolv_conf; cat /etc/resolv.conf
sec hostname; hostname
sec hostname_lookup; getent ahosts "$(hostname)" | head -n 1
sec link_dns; resolvectl dns 2>/dev/null || true
sec root_source; findmnt -no SOURCE /
root=$(findmnt -no SOURCE /); part=${root#/dev/}; disk=$(lsblk -no PKNAME "$root" | head -n 1)
sec root_partition; echo "$part $(cat /sys/class/block/$part/start) $(cat /sys/class/block/$part/size)"
sec disk; echo "$disk $(cat /sys/class/block/$disk/size)"
sec gpt_backup_lba; dd if=/dev/$disk bs=512 skip=1 count=1 | od -An -tu8 -j32 -N8 | tr -d ' '
sec root_fs_bytes; df -B1 --output=size / | tail -n 1 | tr -d ' '
sec mounts; findmnt -rno TARGET,FSTYPE
sec user_data_marker; cat /var/tmp/kiln-user-data
sec user_data_seen; sha256sum /var/lib/cloud/instance/user-data.txt | cut -d' ' -f1
sec secure_boot; od -An -tu1 /sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c | awk '{print $NF}'
sec tpm_pcrs; for p in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do f=/sys/class/tpm/tpm0/pcr-sha256/$p; [ -r $f ] && echo "$p $(cat $f)"; done
sec tpm_event_log; base64 -w0 /sys/kernel/security/tpm0/binary_bios_measurements; echo
sec end
"#;

/// Facts by section name, each the section's text trimmed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Facts(pub BTreeMap<String, String>);

impl Facts {
    pub fn parse(text: &str) -> Facts {
        let mut map = BTreeMap::new();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("==> ") {
                if let Some((n, v)) = current.take() {
                    map.insert(n, v.trim().to_string());
                }
                current = Some((name.trim().to_string(), String::new()));
            } else if let Some((_, v)) = current.as_mut() {
                v.push_str(line);
                v.push('\n');
            }
        }
        if let Some((n, v)) = current {
            map.insert(n, v.trim().to_string());
        }
        Facts(map)
    }

    pub fn get(&self, name: &str) -> &str {
        self.0.get(name).map(String::as_str).unwrap_or("")
    }

    /// True when the script ran to its end (a truncated answer is not judged as facts).
    pub fn complete(&self) -> bool {
        self.0.contains_key("end")
    }

    /// `/etc/machine-id` as the instance has it.
    pub fn machine_id(&self) -> &str {
        self.get("machine_id").lines().next().unwrap_or("").trim()
    }

    /// SSH host key fingerprints (`SHA256:…`), sorted.
    pub fn host_key_fingerprints(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.get("host_keys").lines().filter_map(|l| l.split_whitespace().nth(2)).map(String::from).collect();
        v.sort();
        v
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Not applicable to this image (said why in the evidence); never counted as a pass.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier (`systemd`, `growth`), for pipelines reading `--json`.
    pub id: String,
    pub status: Status,
    /// What was seen, in a line or a few.
    pub evidence: String,
}

impl Check {
    pub fn new(id: &str, ok: bool, evidence: impl Into<String>) -> Check {
        Check { id: id.into(), status: if ok { Status::Pass } else { Status::Fail }, evidence: evidence.into() }
    }
    pub fn skip(id: &str, evidence: impl Into<String>) -> Check {
        Check { id: id.into(), status: Status::Skip, evidence: evidence.into() }
    }
}

/// What a clean launch of this image must show.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// Size of the root volume the instance was given.
    pub volume_bytes: u64,
    /// Where the recipe mounts the ESP, if it does.
    pub esp_mount: Option<String>,
    /// Text the default user data writes to /var/tmp/kiln-user-data (kiln's own user data).
    pub user_data_marker: Option<String>,
    /// SHA-256 (hex) of the user data served, to compare with what cloud-init saw.
    pub user_data_sha256: Option<String>,
    /// Nameservers in the build host's resolv.conf: none may appear in the instance's.
    pub host_nameservers: Vec<String>,
    /// The image is signed and the firmware holds its keys: Secure Boot must be on.
    pub secure_boot: bool,
    /// PCR values (SHA-256 bank, hex) the build predicts; the instance has a TPM to read.
    pub pcrs: BTreeMap<u32, String>,
}

/// Kernel arguments EC2 needs: the serial console (EC2's console is ttyS0) and an NVMe I/O
/// timeout that never gives up on EBS.
pub const REQUIRED_CMDLINE: [&str; 2] = ["console=ttyS0", "nvme_core.io_timeout=4294967295"];

/// Judges one launch's facts: one check each, in the report's order.
pub fn evaluate(f: &Facts, e: &Expect) -> Vec<Check> {
    let mut out =
        vec![systemd(f), cloud_init(f), user_data(f, e), growth(f, e), machine_id(f), host_keys(f), dns(f, e)];
    out.push(kernel_cmdline(f));
    out.extend(e.esp_mount.as_deref().map(|mnt| esp_mount(f, mnt)));
    if e.secure_boot {
        out.push(secure_boot(f));
    }
    if !e.pcrs.is_empty() {
        out.push(pcrs(f, &e.pcrs));
    }
    out
}

/// The firmware booted with Secure Boot on: the SecureBoot variable (its attributes, then
/// one byte) says 1.
fn secure_boot(f: &Facts) -> Check {
    let v = f.get("secure_boot");
    Check::new(
        "secure-boot",
        v == "1",
        match v {
            "1" => "SecureBoot = 1: the firmware verified the boot chain against db".to_string(),
            "" => "no SecureBoot variable: the firmware does not do Secure Boot".to_string(),
            other => format!("SecureBoot = {other}: the firmware did not enforce signatures"),
        },
    )
}

/// The TPM's PCRs hold what the build predicted.
fn pcrs(f: &Facts, predicted: &BTreeMap<u32, String>) -> Check {
    let measured: BTreeMap<u32, String> = f
        .get("tpm_pcrs")
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(p, v)| Some((p.parse().ok()?, v.trim().to_ascii_lowercase())))
        .collect();
    if measured.is_empty() {
        return Check::new("pcrs", false, "no TPM PCRs to read in /sys/class/tpm/tpm0/pcr-sha256");
    }
    let wrong: Vec<String> = predicted
        .iter()
        .filter(|(p, v)| measured.get(p) != Some(&v.to_ascii_lowercase()))
        .map(|(p, v)| format!("PCR {p} is {}, predicted {v}", measured.get(p).map_or("unreadable", String::as_str)))
        .collect();
    let names: Vec<String> = predicted.keys().map(u32::to_string).collect();
    Check::new(
        "pcrs",
        wrong.is_empty(),
        if wrong.is_empty() { format!("PCR {} as the build predicted", names.join(", ")) } else { wrong.join("; ") },
    )
}

fn has_cloud_init(f: &Facts) -> bool {
    !f.get("cloud_init").is_empty()
}

/// The system reached `running` with no failed unit.
fn systemd(f: &Facts) -> Check {
    let state = f.get("system_state");
    let failed: Vec<&str> = f.get("failed_units").lines().filter(|l| !l.is_empty()).collect();
    Check::new(
        "systemd",
        state == "running" && failed.is_empty(),
        if failed.is_empty() {
            format!("is-system-running: {}", or_none(state))
        } else {
            format!("is-system-running: {}; failed units: {}", or_none(state), failed.join(", "))
        },
    )
}

/// cloud-init finished, without errors, with EC2's data source.
fn cloud_init(f: &Facts) -> Check {
    if !has_cloud_init(f) {
        return Check::skip("cloud-init", "cloud-init is not installed in the image");
    }
    let status = f.get("cloud_init_status");
    let first = status.lines().find(|l| l.starts_with("status:")).unwrap_or("status: (none)");
    let result: serde_json::Value = serde_json::from_str(f.get("cloud_init_result")).unwrap_or_default();
    let ds = result["v1"]["datasource"].as_str().unwrap_or("");
    let errors: Vec<String> = result["v1"]["errors"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().map(String::from).unwrap_or_else(|| x.to_string())).collect())
        .unwrap_or_default();
    let ok = first.trim() == "status: done" && errors.is_empty() && ds.contains("Ec2");
    let mut ev = format!("{}; datasource {}", first.trim(), or_none(ds));
    if !errors.is_empty() {
        ev.push_str(&format!("; errors: {}", errors.join(" | ")));
    }
    Check::new("cloud-init", ok, ev)
}

/// kiln's own user data ran (its marker is there), or cloud-init saw the user data served.
fn user_data(f: &Facts, e: &Expect) -> Check {
    if !has_cloud_init(f) {
        return Check::skip("user-data", "no cloud-init in the image to run user data");
    }
    match &e.user_data_marker {
        Some(marker) => {
            let seen = f.get("user_data_marker");
            Check::new(
                "user-data",
                seen == marker,
                if seen == marker {
                    "kiln's user data script ran (marker written)".to_string()
                } else {
                    format!("marker {:?} expected in /var/tmp/kiln-user-data, found {:?}", marker, seen)
                },
            )
        }
        None => {
            let seen = f.get("user_data_seen");
            let want = e.user_data_sha256.as_deref().unwrap_or("");
            Check::new(
                "user-data",
                seen == want,
                format!("cloud-init's copy of the user data has sha256 {}, served {}", or_none(seen), or_none(want)),
            )
        }
    }
}

/// The boot time, against which "made at this launch" is judged.
fn boot_time(f: &Facts) -> i64 {
    f.get("btime").parse().unwrap_or(i64::MAX)
}

/// /etc/machine-id was written at this boot, not baked into the image.
fn machine_id(f: &Facts) -> Check {
    let btime = boot_time(f);
    let mid = f.get("machine_id");
    let mut mid_lines = mid.lines();
    let id = mid_lines.next().unwrap_or("").trim();
    let id_time: i64 = mid_lines.next().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
    let id_ok = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && id_time >= btime;
    Check::new(
        "machine-id",
        id_ok,
        if id_ok {
            format!("{id}, written at this boot")
        } else if id.len() != 32 {
            format!("/etc/machine-id is {:?}, not 32 hex digits", id)
        } else {
            format!("{id} was not written at this boot (file time {id_time} < boot time {btime}): baked into the image")
        },
    )
}

/// Every SSH host key was generated at this boot.
fn host_keys(f: &Facts) -> Check {
    let btime = boot_time(f);
    let keys: Vec<(i64, &str)> = f
        .get("host_keys")
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, l))
        })
        .collect();
    if keys.is_empty() {
        return Check::new("host-keys", false, "no SSH host keys in /etc/ssh");
    }
    let old: Vec<&str> = keys.iter().filter(|(t, _)| *t < btime).map(|(_, l)| *l).collect();
    Check::new(
        "host-keys",
        old.is_empty(),
        if old.is_empty() {
            format!("{} host keys, all generated at this boot", keys.len())
        } else {
            format!("baked into the image, not generated at this boot: {}", old.join("; "))
        },
    )
}

/// The kernel runs with the arguments EC2 needs.
fn kernel_cmdline(f: &Facts) -> Check {
    let cmdline = f.get("cmdline");
    let missing: Vec<&str> =
        REQUIRED_CMDLINE.iter().copied().filter(|a| !cmdline.split_whitespace().any(|w| w.starts_with(a))).collect();
    Check::new(
        "kernel-cmdline",
        missing.is_empty() && !cmdline.is_empty(),
        if missing.is_empty() {
            format!("has {}", REQUIRED_CMDLINE.join(" and "))
        } else {
            format!("missing {}", missing.join(", "))
        },
    )
}

/// The ESP is mounted where the recipe says.
fn esp_mount(f: &Facts, mnt: &str) -> Check {
    let mounted = f.get("mounts").lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [mnt, "vfat"]);
    Check::new(
        "esp-mount",
        mounted,
        if mounted { format!("ESP mounted at {mnt}") } else { format!("no vfat file system mounted at {mnt}") },
    )
}

fn or_none(s: &str) -> &str {
    if s.is_empty() {
        "(none)"
    } else {
        s
    }
}

/// The root partition reaches the end of the volume, the backup GPT header sits in the
/// volume's last sector, and the file system fills its partition.
fn growth(f: &Facts, e: &Expect) -> Check {
    let nums = |s: &str| s.split_whitespace().skip(1).filter_map(|w| w.parse::<u64>().ok()).collect::<Vec<u64>>();
    let (disk, part) = (nums(f.get("disk")), nums(f.get("root_partition")));
    let (Some(&disk_sectors), Some((&start, &len))) = (disk.first(), part.first().zip(part.get(1))) else {
        return Check::new("growth", false, "could not read the root partition and its disk from /sys/class/block");
    };
    let disk_bytes = disk_sectors * 512;
    let part_end_bytes = (start + len) * 512;
    let backup: u64 = f.get("gpt_backup_lba").parse().unwrap_or(0);
    let fs: u64 = f.get("root_fs_bytes").parse().unwrap_or(0);
    let part_bytes = len * 512;
    // The primary GPT's alternate-LBA field names the backup header: the last sector.
    let backup_ok = backup + 1 == disk_sectors;
    // Backup entries (32 sectors) and header (1) follow the last partition; alignment may
    // leave up to 1 MiB more.
    let part_ok = disk_bytes >= part_end_bytes && disk_bytes - part_end_bytes <= (1 << 20) + 33 * 512;
    // statfs leaves ext4's own metadata (inode tables, journal: a few %) out of the size; a
    // file system that did not grow is far below 90 % of a partition that did.
    let fs_ok = fs > 0 && fs as f64 >= part_bytes as f64 * 0.9;
    let vol_ok = disk_bytes == e.volume_bytes;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Check::new(
        "growth",
        backup_ok && part_ok && fs_ok && vol_ok,
        format!(
            "volume {:.2} GiB{}; root partition ends {} bytes before its end{}; backup GPT at LBA {} of {}{}; / is {:.2} GiB of a {:.2} GiB partition{}",
            gib(disk_bytes),
            if vol_ok { String::new() } else { format!(" (expected {:.2} GiB)", gib(e.volume_bytes)) },
            disk_bytes.saturating_sub(part_end_bytes),
            if part_ok { "" } else { " (not grown)" },
            backup,
            disk_sectors,
            if backup_ok { "" } else { " (not at the end of the disk)" },
            gib(fs),
            gib(part_bytes),
            if fs_ok { "" } else { " (file system not grown)" },
        ),
    )
}

/// The resolver comes from the running network stack, not from a file made on the build host,
/// and the host's own name resolves.
fn dns(f: &Facts, e: &Expect) -> Check {
    let target = f.get("resolv_conf_target");
    let text = f.get("resolv_conf");
    let servers: Vec<&str> = text.lines().filter_map(|l| l.trim().strip_prefix("nameserver")).map(str::trim).collect();
    let from_host: Vec<&str> = servers.iter().copied().filter(|s| e.host_nameservers.iter().any(|h| h == s)).collect();
    let generated = target.starts_with("/run/");
    let host = f.get("hostname");
    let lookup = f.get("hostname_lookup");
    let ok = generated && from_host.is_empty() && !lookup.is_empty() && !host.is_empty();
    let mut ev = format!("/etc/resolv.conf -> {}; nameservers {}", or_none(target), or_none(&servers.join(" ")));
    if !generated {
        ev.push_str(" (a static file in the image, not written by the network stack at boot)");
    }
    if !from_host.is_empty() {
        ev.push_str(&format!(" (the build host's: {})", from_host.join(" ")));
    }
    let link = f.get("link_dns");
    if !link.is_empty() {
        ev.push_str(&format!("; per link: {}", link.replace('\n', "; ")));
    }
    if lookup.is_empty() {
        ev.push_str(&format!("; the hostname {:?} does not resolve", host));
    } else {
        ev.push_str(&format!("; {host} resolves to {}", lookup.split_whitespace().next().unwrap_or("")));
    }
    Check::new("dns", ok, ev)
}

/// Checks that compare launches: identity must differ between any two.
pub fn compare_launches(launches: &[Facts]) -> Check {
    let ids: Vec<&str> = launches.iter().map(|f| f.machine_id()).collect();
    let keys: Vec<Vec<String>> = launches.iter().map(|f| f.host_key_fingerprints()).collect();
    let mut same = Vec::new();
    for i in 0..launches.len() {
        for j in i + 1..launches.len() {
            if ids[i] == ids[j] {
                same.push(format!("launches {} and {} share machine-id {}", i + 1, j + 1, ids[i]));
            }
            for k in &keys[i] {
                if keys[j].contains(k) {
                    same.push(format!("launches {} and {} share host key {k}", i + 1, j + 1));
                }
            }
        }
    }
    Check::new(
        "unique-identity",
        same.is_empty(),
        if same.is_empty() {
            format!("{} launches: machine-ids and host keys all differ", launches.len())
        } else {
            same.join("; ")
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BTIME: i64 = 1_800_000_000;

    /// What a clean EC2 launch on an 8 GiB volume answers.
    fn good() -> String {
        let disk = 8u64 << 21; // sectors of 512 bytes in 8 GiB
        let start = 526_336u64;
        let len = disk - start - 34;
        format!(
            "==> cmdline\nroot=PARTUUID=x rw console=tty0 console=ttyS0,115200n8 nvme_core.io_timeout=4294967295\n\
             ==> btime\n{BTIME}\n==> system_state\nrunning\n==> failed_units\n\
             ==> cloud_init\n/usr/bin/cloud-init\n==> cloud_init_status\nstatus: done\ndetail:\nDataSourceEc2Local\n\
             ==> cloud_init_result\n{{\"v1\": {{\"datasource\": \"DataSourceEc2Local [http://169.254.169.254]\", \"errors\": []}}}}\n\
             ==> machine_id\n0123456789abcdef0123456789abcdef\n{t}\n\
             ==> host_keys\n{t} 256 SHA256:aaa root@host (ED25519)\n{t} 3072 SHA256:bbb root@host (RSA)\n\
             ==> resolv_conf_target\n/run/systemd/resolve/stub-resolv.conf\n==> resolv_conf\nnameserver 127.0.0.53\noptions edns0\n\
             ==> hostname\nip-169-254-0-15\n==> hostname_lookup\n169.254.0.15 STREAM ip-169-254-0-15\n\
             ==> root_source\n/dev/nvme0n1p2\n==> root_partition\nnvme0n1p2 {start} {len}\n==> disk\nnvme0n1 {disk}\n\
             ==> gpt_backup_lba\n{backup}\n==> root_fs_bytes\n{fs}\n==> mounts\n/ ext4\n/boot/efi vfat\n\
             ==> user_data_marker\nkiln-123\n==> user_data_seen\nabc\n==> secure_boot\n1\n\
             ==> tpm_pcrs\n0 {zero}\n4 {pcr4}\n7 {pcr7}\n==> tpm_event_log\nAAAA\n==> end\n",
            zero = "0".repeat(64),
            pcr4 = "AB".repeat(32),
            pcr7 = "CD".repeat(32),
            t = BTIME + 5,
            backup = disk - 1,
            fs = len * 512 - (len * 512 / 100),
        )
    }

    fn expect() -> Expect {
        Expect {
            volume_bytes: 8 << 30,
            esp_mount: Some("/boot/efi".into()),
            user_data_marker: Some("kiln-123".into()),
            user_data_sha256: None,
            host_nameservers: vec!["10.0.0.2".into()],
            secure_boot: true,
            pcrs: [(4, "ab".repeat(32)), (7, "cd".repeat(32))].into(),
        }
    }

    fn failing(facts: &str) -> Vec<String> {
        evaluate(&Facts::parse(facts), &expect())
            .into_iter()
            .filter(|c| c.status == Status::Fail)
            .map(|c| c.id)
            .collect()
    }

    #[test]
    fn a_clean_launch_passes_every_check() {
        let f = Facts::parse(&good());
        assert!(f.complete());
        let checks = evaluate(&f, &expect());
        assert!(checks.iter().all(|c| c.status == Status::Pass), "{checks:#?}");
        assert_eq!(checks.len(), 11);
        // An image that is not signed is not asked about Secure Boot or PCRs.
        let plain = Expect { secure_boot: false, pcrs: BTreeMap::new(), ..expect() };
        let ids: Vec<String> = evaluate(&f, &plain).into_iter().map(|c| c.id).collect();
        assert!(!ids.iter().any(|i| i == "secure-boot" || i == "pcrs"), "{ids:?}");
    }

    /// Each planted fault fails exactly the check that should catch it.
    #[test]
    fn each_planted_fault_fails_its_check() {
        let g = good();
        let cases: Vec<(&str, String)> = vec![
            (
                "systemd",
                g.replace("==> failed_units\n", "==> failed_units\nkiln-broken.service\n")
                    .replace("\nrunning\n", "\ndegraded\n"),
            ),
            ("cloud-init", g.replace("\"errors\": []", "\"errors\": [\"('scripts_user', RuntimeError())\"]")),
            ("cloud-init", g.replace("status: done", "status: error")),
            ("cloud-init", g.replace("DataSourceEc2Local [http://169.254.169.254]", "DataSourceNone")),
            ("user-data", g.replace("==> user_data_marker\nkiln-123", "==> user_data_marker\n")),
            ("growth", g.replace(&format!("==> gpt_backup_lba\n{}", (8u64 << 21) - 1), "==> gpt_backup_lba\n4194303")),
            ("growth", g.replace("nvme0n1p2 526336", "nvme0n1p2 526336 3667968\n==> ignored")),
            (
                "machine-id",
                g.replace(
                    &format!("0123456789abcdef0123456789abcdef\n{}", BTIME + 5),
                    "0123456789abcdef0123456789abcdef\n1700000000",
                ),
            ),
            ("machine-id", g.replace("0123456789abcdef0123456789abcdef", "uninitialized")),
            ("host-keys", g.replace(&format!("{} 3072", BTIME + 5), "1700000000 3072")),
            (
                "dns",
                g.replace("/run/systemd/resolve/stub-resolv.conf", "/etc/resolv.conf")
                    .replace("127.0.0.53", "10.0.0.2"),
            ),
            ("dns", g.replace("169.254.0.15 STREAM ip-169-254-0-15", "")),
            ("kernel-cmdline", g.replace(" nvme_core.io_timeout=4294967295", "")),
            ("esp-mount", g.replace("/boot/efi vfat", "/boot vfat")),
            ("secure-boot", g.replace("==> secure_boot\n1", "==> secure_boot\n0")),
            ("secure-boot", g.replace("==> secure_boot\n1", "==> secure_boot")),
            ("pcrs", g.replace(&format!("7 {}", "CD".repeat(32)), &format!("7 {}", "CE".repeat(32)))),
            ("pcrs", g.replace(&format!("\n4 {}", "AB".repeat(32)), "")),
            (
                "pcrs",
                g.replace(&format!("0 {}\n", "0".repeat(64)), "")
                    .replace(&format!("4 {}\n", "AB".repeat(32)), "")
                    .replace(&format!("7 {}\n", "CD".repeat(32)), ""),
            ),
        ];
        for (want, facts) in cases {
            assert_ne!(facts, g, "the fault for {want} was not planted");
            assert_eq!(failing(&facts), vec![want.to_string()], "planted fault for {want}");
        }
        // A file system that did not grow with its partition.
        let unresized = g.replace(
            &format!("==> root_fs_bytes\n{}", {
                let len = (8u64 << 21) - 526_336 - 34;
                len * 512 - (len * 512 / 100)
            }),
            "==> root_fs_bytes\n3221225472",
        );
        assert_eq!(failing(&unresized), vec!["growth".to_string()]);
    }

    #[test]
    fn images_without_cloud_init_skip_what_needs_it() {
        let f = Facts::parse(&good().replace("==> cloud_init\n/usr/bin/cloud-init", "==> cloud_init"));
        let checks = evaluate(&f, &expect());
        let skipped: Vec<&str> = checks.iter().filter(|c| c.status == Status::Skip).map(|c| c.id.as_str()).collect();
        assert_eq!(skipped, ["cloud-init", "user-data"]);
    }

    #[test]
    fn identity_must_differ_between_launches() {
        let a = Facts::parse(&good());
        let b = Facts::parse(
            &good()
                .replace("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210")
                .replace("SHA256:aaa", "SHA256:ccc")
                .replace("SHA256:bbb", "SHA256:ddd"),
        );
        assert_eq!(compare_launches(&[a.clone(), b.clone()]).status, Status::Pass);
        assert_eq!(compare_launches(&[a.clone(), a.clone()]).status, Status::Fail);
        let same_key =
            Facts::parse(&good().replace("0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"));
        let c = compare_launches(&[a, same_key]);
        assert_eq!(c.status, Status::Fail);
        assert!(c.evidence.contains("SHA256:aaa"), "{}", c.evidence);
    }

    #[test]
    fn a_truncated_answer_is_not_complete() {
        assert!(!Facts::parse("==> cmdline\nx\n==> btime\n").complete());
    }
}
