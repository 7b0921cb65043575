//! The classic MBR partition table, read back: the four primary entries of sector 0, for disks
//! that have no GPT (older AMIs and many images made elsewhere). Logical partitions inside an
//! extended partition are listed as the extended entry only.

/// One used primary entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbrPartition {
    /// 1 to 4.
    pub number: u32,
    pub bootable: bool,
    pub type_id: u8,
    pub first_lba: u64,
    pub sectors: u64,
}

/// A sector 0 that holds an MBR partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mbr {
    /// The 32-bit disk signature at byte 440, as `fdisk -l` prints it (`0x1234abcd`).
    pub signature: String,
    pub partitions: Vec<MbrPartition>,
}

/// What an MBR type byte means, for people.
pub fn type_name(t: u8) -> &'static str {
    match t {
        0x05 | 0x0f | 0x85 => "extended (logical partitions not read)",
        0x06 | 0x0b | 0x0c | 0x0e => "FAT",
        0x07 => "NTFS/exFAT",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xee => "GPT protective",
        0xef => "EFI System",
        0xfd => "Linux RAID",
        _ => "unknown",
    }
}

/// The MBR table in `sector0`, for a disk of `disk_sectors`; None when the sector is not one
/// (no 0x55AA signature, a status byte other than 0x00/0x80, an entry outside the disk, or no
/// entry at all), so a FAT boot sector or random bytes are not taken for a table.
pub fn parse(sector0: &[u8; 512], disk_sectors: u64) -> Option<Mbr> {
    if sector0[510..] != [0x55, 0xAA] {
        return None;
    }
    let mut partitions = Vec::new();
    for (i, e) in sector0[446..510].chunks_exact(16).enumerate() {
        let le32 = |at: usize| u64::from(u32::from_le_bytes(e[at..at + 4].try_into().expect("4 bytes")));
        let (status, type_id, first_lba, sectors) = (e[0], e[4], le32(8), le32(12));
        if status != 0 && status != 0x80 {
            return None;
        }
        if type_id == 0 {
            continue;
        }
        if first_lba == 0 || sectors == 0 || first_lba + sectors > disk_sectors {
            return None;
        }
        partitions.push(MbrPartition { number: i as u32 + 1, bootable: status == 0x80, type_id, first_lba, sectors });
    }
    if partitions.is_empty() {
        return None;
    }
    let signature = format!("0x{:08x}", u32::from_le_bytes(sector0[440..444].try_into().expect("4 bytes")));
    Some(Mbr { signature, partitions })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(s: &mut [u8; 512], i: usize, status: u8, t: u8, first: u32, n: u32) {
        let e = &mut s[446 + 16 * i..][..16];
        e[0] = status;
        e[4] = t;
        e[8..12].copy_from_slice(&first.to_le_bytes());
        e[12..16].copy_from_slice(&n.to_le_bytes());
    }

    #[test]
    fn reads_what_sfdisk_writes() {
        // sfdisk's dos label for "start=2048, size=20480, type=83, bootable" on a 16 MiB disk,
        // checked against a real one below when sfdisk is installed.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
        let ok = std::process::Command::new("sfdisk")
            .args(["-q", "--label", "dos"])
            .arg(&img)
            .stdin(
                std::fs::File::open({
                    let spec = dir.path().join("spec");
                    std::fs::write(
                        &spec,
                        "label-id: 0x1234abcd\nstart=2048, size=20480, type=83, bootable\nstart=22528, type=8e\n",
                    )
                    .unwrap();
                    spec
                })
                .unwrap(),
            )
            .status();
        match ok {
            Ok(s) if s.success() => {}
            _ => {
                eprintln!("note: sfdisk is not installed; the MBR test ran on a hand-made sector only");
                return;
            }
        }
        let bytes = std::fs::read(&img).unwrap();
        let mbr = parse(bytes[..512].try_into().unwrap(), 32768).expect("an MBR");
        assert_eq!(mbr.signature, "0x1234abcd");
        assert_eq!(
            mbr.partitions,
            [
                MbrPartition { number: 1, bootable: true, type_id: 0x83, first_lba: 2048, sectors: 20480 },
                MbrPartition { number: 2, bootable: false, type_id: 0x8e, first_lba: 22528, sectors: 32768 - 22528 },
            ]
        );
    }

    #[test]
    fn a_boot_sector_or_an_empty_table_is_not_an_mbr() {
        let mut s = [0u8; 512];
        entry(&mut s, 0, 0x80, 0x83, 2048, 100);
        assert!(parse(&s, 4096).is_none(), "no 55AA");
        s[510] = 0x55;
        s[511] = 0xAA;
        assert!(parse(&s, 4096).is_some());
        entry(&mut s, 1, 0x12, 0x83, 4000, 10);
        assert!(parse(&s, 4096).is_none(), "status byte of boot code");
        let mut e = [0u8; 512];
        e[510] = 0x55;
        e[511] = 0xAA;
        assert!(parse(&e, 4096).is_none(), "no entry");
    }
}
