//! in-toto attestations: a Statement (v1) in a DSSE envelope, as the in-toto and
//! securesystemslib libraries read them. Signing is the caller's: it signs [`pae`] of the
//! payload and hands back the signature.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The payload type of an in-toto Statement in a DSSE envelope.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";

/// An artifact the statement is about, by its digests (`sha256` → hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub kind: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub keyid: String,
    /// Base64.
    pub sig: String,
}

/// A DSSE envelope: the payload (base64), its type, the signatures over its [`pae`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<Signature>,
}

/// A signer: given the PAE, the key id and the raw signature.
pub type Sign<'a> = &'a dyn Fn(&[u8]) -> (String, Vec<u8>);

/// DSSE's pre-authentication encoding: what a signature covers.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// `statement` as the payload, signed by `sign` (which gets the PAE and returns the key
    /// id and the raw signature), or unsigned when `sign` is None.
    pub fn of(statement: &Statement, sign: Option<Sign>) -> Envelope {
        let body = serde_json::to_vec(statement).expect("a statement serializes");
        let b64 = base64::engine::general_purpose::STANDARD;
        let signatures = sign
            .map(|s| {
                let (keyid, sig) = s(&pae(PAYLOAD_TYPE, &body));
                vec![Signature { keyid, sig: b64.encode(sig) }]
            })
            .unwrap_or_default();
        Envelope { payload: b64.encode(&body), payload_type: PAYLOAD_TYPE.into(), signatures }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_is_dsse_v1() {
        // The DSSE specification's own example.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }
}
