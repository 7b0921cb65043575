//! What UEFI firmware measures into a TPM's PCRs (SHA-256 bank) while it boots a signed image,
//! as the TCG PC Client Platform Firmware Profile lays the events out and EDK2 (OVMF, EC2's
//! firmware) records them: PCR 7, the Secure Boot policy and the db entry that verified the
//! boot chain; PCR 4, the boot attempt and every EFI application started. A prediction is the
//! PCR's value after those events, each extended in order: `PCR = SHA-256(PCR || digest)`.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::efi_vars::{SecureBootKeys, GLOBAL_VARIABLE, IMAGE_SECURITY_DATABASE};

/// `PCR = SHA-256(PCR || digest)`.
pub fn extend(pcr: [u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(pcr);
    h.update(digest);
    h.finalize().into()
}

/// A PCR after `digests`, from its reset value (zeros).
pub fn replay<'a>(digests: impl IntoIterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    digests.into_iter().fold([0; 32], extend)
}

/// `UEFI_VARIABLE_DATA`, the event of a measured variable: its vendor GUID, its name's length
/// in characters, its data's length, the name in UTF-16 (no terminator), the data.
pub fn uefi_variable_data(vendor: Uuid, name: &str, data: &[u8]) -> Vec<u8> {
    let name: Vec<u16> = name.encode_utf16().collect();
    let mut out = vendor.to_bytes_le().to_vec();
    out.extend_from_slice(&(name.len() as u64).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend(name.iter().flat_map(|c| c.to_le_bytes()));
    out.extend_from_slice(data);
    out
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `EV_SEPARATOR`'s digest: four zero bytes, the end of the pre-boot measurements.
fn separator() -> [u8; 32] {
    sha256(&[0; 4])
}

/// PCR 7 once `signer` (a certificate of db, DER) verified the boot chain: SecureBoot (on),
/// PK, KEK, db and dbx (empty when absent) as measured `EV_EFI_VARIABLE_DRIVER_CONFIG`, the
/// separator, and the db entry that verified the images as `EV_EFI_VARIABLE_AUTHORITY`,
/// measured once however many images it verified.
pub fn pcr7(keys: &SecureBootKeys, signer: &[u8]) -> [u8; 32] {
    let vars = keys.variables();
    let data = |name: &str| vars.iter().find(|v| v.name == name).map(|v| v.data.as_slice()).unwrap_or(&[]);
    let mut entry = keys.owner.to_bytes_le().to_vec();
    entry.extend_from_slice(signer);
    replay(&[
        sha256(&uefi_variable_data(GLOBAL_VARIABLE, "SecureBoot", &[1])),
        sha256(&uefi_variable_data(GLOBAL_VARIABLE, "PK", data("PK"))),
        sha256(&uefi_variable_data(GLOBAL_VARIABLE, "KEK", data("KEK"))),
        sha256(&uefi_variable_data(IMAGE_SECURITY_DATABASE, "db", data("db"))),
        sha256(&uefi_variable_data(IMAGE_SECURITY_DATABASE, "dbx", data("dbx"))),
        separator(),
        sha256(&uefi_variable_data(IMAGE_SECURITY_DATABASE, "db", &entry)),
    ])
}

/// What EDK2 measures when it starts the first boot option.
const CALLING: &[u8] = b"Calling EFI Application from Boot Option";

/// PCR 4 when the firmware boots the first boot option and it starts `images` in turn (their
/// Authenticode digests: the boot loader, then what it loads): the boot attempt
/// (`EV_EFI_ACTION`), the separator, then each image (`EV_EFI_BOOT_SERVICES_APPLICATION`).
pub fn pcr4(images: &[[u8; 32]]) -> [u8; 32] {
    let mut events = vec![sha256(CALLING), separator()];
    events.extend_from_slice(images);
    replay(&events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_laid_out_as_the_tcg_profile_says() {
        // SecureBoot = 1: a 32-byte header, "SecureBoot" in UTF-16, one byte.
        let ev = uefi_variable_data(GLOBAL_VARIABLE, "SecureBoot", &[1]);
        assert_eq!(ev.len(), 53);
        assert_eq!(&ev[16..24], &10u64.to_le_bytes());
        assert_eq!(&ev[24..32], &1u64.to_le_bytes());
        assert_eq!(&ev[32..34], b"S\0");
        // An absent dbx is measured with no data.
        assert_eq!(uefi_variable_data(IMAGE_SECURITY_DATABASE, "dbx", &[]).len(), 38);
        // The separator and the boot attempt, as every EDK2 event log shows them.
        assert_eq!(hex::encode(separator()), "df3f619804a92fdb4057192dc43dd748ea778adc52bc498ce80524c014b81119");
        assert_eq!(hex::encode(sha256(CALLING)), "3d6772b4f84ed47595d72a2c4c5ffd15f5bb72c7507fe26f2aaee2c69d5633ba");
    }

    #[test]
    fn a_replay_extends_in_order() {
        let (a, b) = ([1; 32], [2; 32]);
        assert_eq!(replay(&[a, b]), extend(extend([0; 32], &a), &b));
        assert_ne!(replay(&[a, b]), replay(&[b, a]));
        assert_ne!(pcr4(&[a]), pcr4(&[a, b]));
    }
}
