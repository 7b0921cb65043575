//! GRUB's legacy-BIOS boot code placed the way `grub-bios-setup` places it, without a device:
//! `boot.img`'s code goes into the protective MBR, and `core.img` (made by `grub-mkimage -O
//! i386-pc`) goes into the BIOS boot partition, contiguous, with the sector addresses both
//! need patched in.
//!
//! Offsets are GRUB's (include/grub/i386/pc/boot.h): the MBR's code reads one sector at the
//! 64-bit LBA stored at 0x5c (the first sector of core.img, `diskboot.img`), whose block list
//! at the end of that sector names the remaining sectors of core.img to load.

/// Where boot.img keeps the LBA of core.img's first sector (GRUB_BOOT_MACHINE_KERNEL_SECTOR).
const KERNEL_SECTOR: usize = 0x5c;
/// boot.img's drive-check jump (GRUB_BOOT_MACHINE_DRIVE_CHECK). grub-bios-setup replaces it
/// with two NOPs unless told the disk may be a floppy, so BIOSes that pass odd drive numbers
/// still boot from the hard disk.
const DRIVE_CHECK: usize = 0x66;
/// Bytes of boot code an MBR may hold: from here on live the disk signature (0x1b8), the
/// partition table (0x1be) and the 0x55AA signature, which belong to the protective MBR.
const MBR_CODE_END: usize = 0x1b8;
/// The first block-list entry of diskboot.img: 12 bytes (u64 start, u16 sectors, u16 segment)
/// ending at the end of the sector (GRUB_BOOT_MACHINE_LIST_SIZE).
const BLOCKLIST: usize = 512 - 12;

pub const SECTOR: usize = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrubError {
    #[error("boot.img is {0} bytes; GRUB's boot.img is exactly 512")]
    BootImgSize(usize),
    #[error(
        "core.img is {0} bytes; it must be at least one sector and a whole number of sectors (grub-mkimage pads it)"
    )]
    CoreImgSize(usize),
    #[error("core.img needs {need} sectors but the BIOS boot partition has {have}")]
    CoreTooBig { need: u64, have: u64 },
    #[error("core.img's {0} sectors do not fit one block-list entry (65535 at most)")]
    CoreTooManySectors(u64),
    #[error("MBR sector is {0} bytes, not 512")]
    MbrSize(usize),
}

/// Writes boot.img's code into `mbr` (a protective MBR sector, whose partition table and
/// signature stay as they are) and points it at core.img's first sector.
pub fn install_boot_code(mbr: &mut [u8], boot_img: &[u8], core_lba: u64) -> Result<(), GrubError> {
    if boot_img.len() != SECTOR {
        return Err(GrubError::BootImgSize(boot_img.len()));
    }
    if mbr.len() != SECTOR {
        return Err(GrubError::MbrSize(mbr.len()));
    }
    mbr[..MBR_CODE_END].copy_from_slice(&boot_img[..MBR_CODE_END]);
    mbr[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&core_lba.to_le_bytes());
    mbr[DRIVE_CHECK..DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    Ok(())
}

/// Patches core.img's first sector so it loads the rest of core.img from the sectors that
/// follow `core_lba`. `partition_sectors` is the size of the BIOS boot partition.
pub fn place_core(core: &mut [u8], core_lba: u64, partition_sectors: u64) -> Result<(), GrubError> {
    if core.is_empty() || core.len() % SECTOR != 0 {
        return Err(GrubError::CoreImgSize(core.len()));
    }
    let sectors = (core.len() / SECTOR) as u64;
    if sectors > partition_sectors {
        return Err(GrubError::CoreTooBig { need: sectors, have: partition_sectors });
    }
    let rest = u16::try_from(sectors - 1).map_err(|_| GrubError::CoreTooManySectors(sectors))?;
    core[BLOCKLIST..BLOCKLIST + 8].copy_from_slice(&(core_lba + 1).to_le_bytes());
    core[BLOCKLIST + 8..BLOCKLIST + 10].copy_from_slice(&rest.to_le_bytes());
    // The segment word (BLOCKLIST + 10) keeps diskboot.img's own value: where it loads to.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_code_keeps_the_partition_table_and_points_at_core() {
        let mut mbr = [0u8; 512];
        mbr[0x1be..0x1ce].copy_from_slice(&[0xee; 16]);
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        let boot = [0xabu8; 512];
        install_boot_code(&mut mbr, &boot, 2048).unwrap();
        assert_eq!(&mbr[0x1be..0x1ce], &[0xee; 16]);
        assert_eq!(&mbr[510..], &[0x55, 0xaa]);
        assert_eq!(u64::from_le_bytes(mbr[0x5c..0x64].try_into().unwrap()), 2048);
        assert_eq!(&mbr[0x66..0x68], &[0x90, 0x90]);
        assert_eq!(mbr[0], 0xab);
        assert_eq!(install_boot_code(&mut mbr, &boot[..100], 1), Err(GrubError::BootImgSize(100)));
    }

    #[test]
    fn core_block_list_names_the_following_sectors() {
        let mut core = vec![0u8; 512 * 60];
        core[510..512].copy_from_slice(&0x820u16.to_le_bytes());
        place_core(&mut core, 2048, 2048).unwrap();
        assert_eq!(u64::from_le_bytes(core[500..508].try_into().unwrap()), 2049);
        assert_eq!(u16::from_le_bytes(core[508..510].try_into().unwrap()), 59);
        assert_eq!(u16::from_le_bytes(core[510..512].try_into().unwrap()), 0x820);
        assert_eq!(place_core(&mut core, 2048, 10), Err(GrubError::CoreTooBig { need: 60, have: 10 }));
        assert_eq!(place_core(&mut [0; 100], 0, 10), Err(GrubError::CoreImgSize(100)));
    }
}
