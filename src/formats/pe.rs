//! PE/COFF images as UEFI loads them: where the fields Authenticode leaves out are, the
//! sections, and new sections appended to an image (how a unified kernel image is made from
//! systemd's stub). Only what kiln needs: no relocation, import or resource handling.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeError {
    #[error("is not a PE/COFF image ({0})")]
    NotPe(&'static str),
    #[error("is cut short: {0} runs past its end")]
    Truncated(&'static str),
    #[error("its signature table is not at its end, so it cannot be signed again without changing the image")]
    CertificateTableInside,
    #[error("has no room in its headers for {0} more section headers")]
    NoRoomForSections(usize),
    #[error("already has a {0} section")]
    DuplicateSection(String),
    #[error("is signed; strip its signature before adding sections")]
    Signed,
    #[error("section name {0:?} is longer than 8 bytes")]
    SectionName(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// One section header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub virtual_address: usize,
    pub virtual_size: usize,
    pub raw_offset: usize,
    pub raw_size: usize,
}

/// Where an image's header fields are, and what they say.
#[derive(Debug, Clone)]
pub struct Headers {
    /// The COFF header's NumberOfSections.
    pub(crate) sections_count_at: usize,
    /// The optional header's CheckSum.
    pub checksum: usize,
    /// The data directory entry of the certificate table (offset, size).
    pub cert_dir: usize,
    pub size_of_headers: usize,
    pub(crate) size_of_image_at: usize,
    pub section_alignment: usize,
    pub file_alignment: usize,
    /// Where the section table starts.
    pub(crate) section_table: usize,
    /// In header order.
    pub sections: Vec<Section>,
    /// The certificate table as the directory names it: (file offset, size); (0, 0) if none.
    pub cert_table: (usize, usize),
}

fn u16_at(b: &[u8], at: usize, what: &'static str) -> Result<usize, PeError> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]) as usize).ok_or(PeError::Truncated(what))
}

fn u32_at(b: &[u8], at: usize, what: &'static str) -> Result<usize, PeError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")) as usize)
        .ok_or(PeError::Truncated(what))
}

fn put_u32(b: &mut [u8], at: usize, v: usize) {
    b[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes());
}

const PE32: usize = 0x10b;
const PE32_PLUS: usize = 0x20b;
/// The certificate table's index among the data directories.
const CERTIFICATE_TABLE: usize = 4;
const SECTION_HEADER: usize = 40;
/// IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ: data the loader maps read-only.
const READ_ONLY_DATA: u32 = 0x0000_0040 | 0x4000_0000;

impl Headers {
    pub fn read(pe: &[u8]) -> Result<Headers, PeError> {
        if !pe.starts_with(b"MZ") {
            return Err(PeError::NotPe("no MZ header"));
        }
        let nt = u32_at(pe, 0x3c, "the DOS header")?;
        if pe.get(nt..nt + 4) != Some(b"PE\0\0") {
            return Err(PeError::NotPe("no PE signature where the DOS header points"));
        }
        let coff = nt + 4;
        let sections_count = u16_at(pe, coff + 2, "the COFF header")?;
        let optional_size = u16_at(pe, coff + 16, "the COFF header")?;
        let opt = coff + 20;
        let (dirs_count_at, dirs) = match u16_at(pe, opt, "the optional header")? {
            PE32 => (opt + 92, opt + 96),
            PE32_PLUS => (opt + 108, opt + 112),
            _ => return Err(PeError::NotPe("the optional header's magic is neither PE32 nor PE32+")),
        };
        if u32_at(pe, dirs_count_at, "the optional header")? <= CERTIFICATE_TABLE {
            return Err(PeError::NotPe("the optional header has no certificate table entry"));
        }
        let cert_dir = dirs + CERTIFICATE_TABLE * 8;
        let cert_table =
            (u32_at(pe, cert_dir, "the data directories")?, u32_at(pe, cert_dir + 4, "the data directories")?);
        let size_of_headers = u32_at(pe, opt + 60, "the optional header")?;
        let section_table = opt + optional_size;
        let mut sections = Vec::with_capacity(sections_count);
        for i in 0..sections_count {
            let h = section_table + i * SECTION_HEADER;
            let name = pe.get(h..h + 8).ok_or(PeError::Truncated("the section table"))?;
            let section = Section {
                name: String::from_utf8_lossy(name).trim_end_matches('\0').to_string(),
                virtual_size: u32_at(pe, h + 8, "the section table")?,
                virtual_address: u32_at(pe, h + 12, "the section table")?,
                raw_size: u32_at(pe, h + 16, "the section table")?,
                raw_offset: u32_at(pe, h + 20, "the section table")?,
            };
            if section.raw_offset.checked_add(section.raw_size).is_none_or(|end| end > pe.len()) {
                return Err(PeError::Truncated("a section"));
            }
            sections.push(section);
        }
        if size_of_headers > pe.len() || cert_dir + 8 > size_of_headers {
            return Err(PeError::Truncated("the headers"));
        }
        if cert_table.1 > 0 && cert_table.0.checked_add(cert_table.1).is_none_or(|end| end > pe.len()) {
            return Err(PeError::Truncated("the certificate table"));
        }
        Ok(Headers {
            sections_count_at: coff + 2,
            checksum: opt + 64,
            cert_dir,
            size_of_headers,
            size_of_image_at: opt + 56,
            section_alignment: u32_at(pe, opt + 32, "the optional header")?.max(1),
            file_alignment: u32_at(pe, opt + 36, "the optional header")?.max(1),
            section_table,
            sections,
            cert_table,
        })
    }

    /// The raw data of the named section (its bytes in the file, up to its virtual size).
    pub fn section<'a>(&self, pe: &'a [u8], name: &str) -> Option<&'a [u8]> {
        let s = self.sections.iter().find(|s| s.name == name)?;
        Some(&pe[s.raw_offset..s.raw_offset + s.raw_size.min(s.virtual_size.max(1))])
    }
}

/// `pe` with `sections` appended in order, each mapped read-only after the image's last
/// section at the image's section alignment, their raw data after the file's last byte at its
/// file alignment; SizeOfImage grows to cover them. The image must not be signed (a signature
/// is made over the final image).
pub fn append_sections(pe: &[u8], sections: &[(&str, &[u8])]) -> Result<Vec<u8>, PeError> {
    let h = Headers::read(pe)?;
    if h.cert_table.1 > 0 {
        return Err(PeError::Signed);
    }
    let table_end = h.section_table + (h.sections.len() + sections.len()) * SECTION_HEADER;
    let first_raw = h.sections.iter().filter(|s| s.raw_size > 0).map(|s| s.raw_offset).min().unwrap_or(pe.len());
    if table_end > h.size_of_headers.min(first_raw) {
        return Err(PeError::NoRoomForSections(sections.len()));
    }
    let mut out = pe.to_vec();
    let mut vaddr = h
        .sections
        .iter()
        .map(|s| s.virtual_address + s.virtual_size.max(s.raw_size))
        .max()
        .unwrap_or(h.size_of_headers)
        .next_multiple_of(h.section_alignment);
    for (i, (name, data)) in sections.iter().enumerate() {
        if name.len() > 8 {
            return Err(PeError::SectionName(name.to_string()));
        }
        if h.sections.iter().any(|s| s.name == *name) || sections[..i].iter().any(|(n, _)| n == name) {
            return Err(PeError::DuplicateSection(name.to_string()));
        }
        out.resize(out.len().next_multiple_of(h.file_alignment), 0);
        let raw_offset = out.len();
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(h.file_alignment), 0);
        let raw_size = out.len() - raw_offset;

        let at = h.section_table + (h.sections.len() + i) * SECTION_HEADER;
        out[at..at + SECTION_HEADER].fill(0);
        out[at..at + name.len()].copy_from_slice(name.as_bytes());
        put_u32(&mut out, at + 8, data.len());
        put_u32(&mut out, at + 12, vaddr);
        put_u32(&mut out, at + 16, raw_size);
        put_u32(&mut out, at + 20, raw_offset);
        out[at + 36..at + 40].copy_from_slice(&READ_ONLY_DATA.to_le_bytes());
        vaddr = (vaddr + data.len()).next_multiple_of(h.section_alignment);
    }
    let count = (h.sections.len() + sections.len()) as u16;
    out[h.sections_count_at..h.sections_count_at + 2].copy_from_slice(&count.to_le_bytes());
    put_u32(&mut out, h.size_of_image_at, vaddr);
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal PE32+ image: headers, one section, nothing else.
    pub(crate) fn tiny_pe() -> Vec<u8> {
        let mut pe = vec![0u8; 0x600];
        pe[..2].copy_from_slice(b"MZ");
        pe[0x3c] = 0x80;
        pe[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        pe[coff..coff + 2].copy_from_slice(&0x8664u16.to_le_bytes());
        pe[coff + 2] = 1; // one section
        pe[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        let opt = coff + 20;
        pe[opt..opt + 2].copy_from_slice(&0x20bu16.to_le_bytes());
        put_u32(&mut pe, opt + 32, 0x1000); // SectionAlignment
        put_u32(&mut pe, opt + 36, 0x200); // FileAlignment
        put_u32(&mut pe, opt + 56, 0x2000); // SizeOfImage
        put_u32(&mut pe, opt + 60, 0x400); // SizeOfHeaders
        put_u32(&mut pe, opt + 108, 16);
        let section = opt + 240;
        pe[section..section + 5].copy_from_slice(b".text");
        put_u32(&mut pe, section + 8, 0x200);
        put_u32(&mut pe, section + 12, 0x1000);
        put_u32(&mut pe, section + 16, 0x200);
        put_u32(&mut pe, section + 20, 0x400);
        for (i, b) in pe[0x400..].iter_mut().enumerate() {
            *b = i as u8;
        }
        pe
    }

    #[test]
    fn appended_sections_are_mapped_after_the_last_and_read_back() {
        let pe = append_sections(&tiny_pe(), &[(".osrel", b"ID=debian\n"), (".linux", &[7; 0x1234])]).unwrap();
        let h = Headers::read(&pe).unwrap();
        let names: Vec<_> = h.sections.iter().map(|s| (s.name.as_str(), s.virtual_address)).collect();
        assert_eq!(names, [(".text", 0x1000), (".osrel", 0x2000), (".linux", 0x3000)]);
        assert_eq!(h.section(&pe, ".osrel"), Some(&b"ID=debian\n"[..]));
        assert_eq!(h.section(&pe, ".linux").unwrap().len(), 0x1234);
        assert_eq!(u32_at(&pe, h.size_of_image_at, "").unwrap(), 0x5000);
        assert!(h.sections.iter().all(|s| s.raw_offset % 0x200 == 0));
        assert_eq!(pe.len() % 0x200, 0);
    }

    #[test]
    fn what_cannot_be_appended_is_refused() {
        let pe = tiny_pe();
        assert_eq!(append_sections(&pe, &[(".text", b"")]).err(), Some(PeError::DuplicateSection(".text".into())));
        assert_eq!(
            append_sections(&pe, &[(".waytoolong", b"")]).err(),
            Some(PeError::SectionName(".waytoolong".into()))
        );
        // The section table (0x188, one header) must stay within the 0x400 bytes of headers:
        // fourteen more headers fit, fifteen do not.
        let names: Vec<String> = (0..15).map(|i| format!(".s{i}")).collect();
        let many: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
        assert!(append_sections(&pe, &many[..14]).is_ok());
        assert_eq!(append_sections(&pe, &many).err(), Some(PeError::NoRoomForSections(15)));
        assert_eq!(Headers::read(b"ELF").err(), Some(PeError::NotPe("no MZ header")));
        let mut cut = pe.clone();
        cut.truncate(0x500);
        assert_eq!(Headers::read(&cut).err(), Some(PeError::Truncated("a section")));
    }
}
