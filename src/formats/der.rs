//! DER, written directly, for the few fixed structures kiln signs (Authenticode's SignedData,
//! self-signed certificates): a tag, a definite length, the contents.

pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = n.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

pub(crate) fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// A DER SET OF: its elements sorted by their encodings.
pub(crate) fn set_of(mut parts: Vec<Vec<u8>>) -> Vec<u8> {
    parts.sort();
    tlv(0x31, &parts.concat())
}

/// An OBJECT IDENTIFIER from its contents octets.
pub(crate) fn oid(der_body: &[u8]) -> Vec<u8> {
    tlv(0x06, der_body)
}

/// A non-negative INTEGER from big-endian magnitude bytes (a leading zero where the top bit
/// is set, none where it is not needed).
pub(crate) fn uint(be: &[u8]) -> Vec<u8> {
    let trimmed: &[u8] = match be.iter().position(|&b| b != 0) {
        Some(i) => &be[i..],
        None => &[0],
    };
    let mut body = Vec::with_capacity(trimmed.len() + 1);
    if trimmed[0] & 0x80 != 0 {
        body.push(0);
    }
    body.extend_from_slice(trimmed);
    tlv(0x02, &body)
}

pub(crate) const NULL: &[u8] = &[0x05, 0x00];

/// The length of a DER value's contents, read from its header.
pub(crate) fn content_len(der: &[u8]) -> usize {
    match der[1] {
        n if n < 0x80 => n as usize,
        n => der[2..2 + (n & 0x7f) as usize].iter().fold(0, |acc, &b| acc << 8 | b as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_integers_are_minimal() {
        assert_eq!(tlv(0x04, &[7; 3]), [0x04, 3, 7, 7, 7]);
        let long = tlv(0x04, &[0; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(content_len(&long), 300);
        assert_eq!(uint(&[0, 0, 0x7f]), [0x02, 1, 0x7f]);
        assert_eq!(uint(&[0x80]), [0x02, 2, 0, 0x80]);
        assert_eq!(uint(&[0, 0]), [0x02, 1, 0]);
    }
}
