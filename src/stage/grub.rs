//! Legacy-BIOS boot: GRUB's core image built with `grub-mkimage` from the target's own
//! `grub-pc-bin` modules (taken out of the root tree), and a `grub.cfg` on the ESP that boots
//! the same kernel, initrd and command line as the systemd-boot entry. Placing the boot code
//! in the disk is `formats::grub_pc`'s job; nothing here needs a device, a mount or root.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::formats::tree::{Kind, Tree};

/// Where Debian's grub-pc-bin keeps the i386-pc modules and images.
const MODULE_DIR: &str = "/usr/lib/grub/i386-pc";

/// Modules baked into core.img: disk access, GPT, the ESP's FAT, finding the ESP by its volume
/// id, and what grub.cfg uses (serial console, linux loader).
const CORE_MODULES: &[&str] = &[
    "biosdisk",
    "part_gpt",
    "part_msdos",
    "fat",
    "ext2",
    "search",
    "search_fs_uuid",
    "normal",
    "configfile",
    "linux",
    "echo",
    "test",
    "serial",
    "terminal",
    "boot",
    "gzio",
];

#[derive(Debug, thiserror::Error)]
pub enum GrubStageError {
    #[error("the image has no GRUB BIOS modules in {MODULE_DIR}; add `grub-pc-bin` to [packages].include (kiln adds it for boot = \"bios\" and \"hybrid\")")]
    NoModules,
    #[error("grub-mkimage is not installed on this host; install grub-common (`apt-get install grub-pc-bin`, or run .ci/setup-host)")]
    NoMkimage,
    #[error("{cmd} failed with {status}:\n{stderr}")]
    Mkimage { cmd: String, status: String, stderr: String },
    #[error("{what} {path}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

/// GRUB's pieces for a BIOS boot: the MBR code and the core image (a whole number of sectors).
#[derive(Debug, Clone)]
pub struct BiosBoot {
    pub boot_img: Vec<u8>,
    pub core_img: Vec<u8>,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> GrubStageError + 'a {
    move |source| GrubStageError::Io { what, path: path.to_path_buf(), source }
}

/// Builds core.img with the host's grub-mkimage from the modules in `tree`. The embedded
/// config finds the ESP by its FAT volume id and reads `/grub/grub.cfg` from it.
pub fn build_bios_boot(tree: &Tree, esp_volume_id: &str) -> Result<BiosBoot, GrubStageError> {
    let mkimage = ["/usr/bin/grub-mkimage", "/bin/grub-mkimage"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or(GrubStageError::NoMkimage)?;
    let dir_id = tree.resolve(MODULE_DIR.as_bytes()).map_err(|_| GrubStageError::NoModules)?;
    let Kind::Dir(dir) = &tree.inode(dir_id).kind else { return Err(GrubStageError::NoModules) };

    let work = tempfile::tempdir().map_err(io("creating a temp dir", Path::new("/tmp")))?;
    let mods = work.path().join("i386-pc");
    std::fs::create_dir(&mods).map_err(io("creating", &mods))?;
    for (name, &id) in &dir.entries {
        if let Kind::File(c) = &tree.inode(id).kind {
            let mut buf = vec![0u8; c.size as usize];
            let path = mods.join(String::from_utf8_lossy(name).as_ref());
            tree.read_content(c, 0, &mut buf).map_err(io("reading from the tree", &path))?;
            std::fs::write(&path, &buf).map_err(io("writing", &path))?;
        }
    }
    let boot_img_path = mods.join("boot.img");
    let boot_img = std::fs::read(&boot_img_path).map_err(|_| GrubStageError::NoModules)?;

    let early = work.path().join("early.cfg");
    std::fs::write(
        &early,
        format!("search --no-floppy --fs-uuid --set=root {esp_volume_id}\nset prefix=($root)/grub\n"),
    )
    .map_err(io("writing", &early))?;
    let core = work.path().join("core.img");
    let mut cmd = Command::new(mkimage);
    cmd.arg("-O").arg("i386-pc").arg("-d").arg(&mods).arg("-o").arg(&core).arg("-c").arg(&early);
    cmd.arg("-p").arg("/grub").args(CORE_MODULES);
    let out = cmd.output().map_err(io("running grub-mkimage for", &core))?;
    if !out.status.success() {
        return Err(GrubStageError::Mkimage {
            cmd: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let mut core_img = std::fs::read(&core).map_err(io("reading", &core))?;
    core_img.resize(core_img.len().div_ceil(512) * 512, 0);
    Ok(BiosBoot { boot_img, core_img })
}

/// A grub.cfg equivalent of a Boot Loader Specification entry (`linux`, `initrd`, `options`
/// lines), with GRUB on the serial console as well as the screen.
pub fn grub_cfg_from_entry(entry: &str) -> String {
    let field =
        |k: &str| entry.lines().find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string())).unwrap_or_default();
    let title = field("title ");
    let title = if title.is_empty() { "Linux".to_string() } else { title };
    format!(
        "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n\
         set timeout=0\nmenuentry \"{title}\" {{\n\tlinux {} {}\n\tinitrd {}\n}}\n",
        field("linux "),
        field("options "),
        field("initrd ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_boots_what_the_loader_entry_boots() {
        let cfg = grub_cfg_from_entry(
            "title Debian\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=PARTUUID=x rw console=ttyS0\n",
        );
        assert!(cfg.contains("linux /vmlinuz root=PARTUUID=x rw console=ttyS0\n"), "{cfg}");
        assert!(cfg.contains("initrd /initrd.img\n"), "{cfg}");
        assert!(cfg.contains("menuentry \"Debian\""), "{cfg}");
    }
}
