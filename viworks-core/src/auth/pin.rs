//! SPKI pins: the SHA-256 of a certificate's SubjectPublicKeyInfo, in base64.
//!
//! A pin names a key, not a certificate, so a host can renew its certificate without
//! re-pinning agents as long as it keeps its key; rotating the key goes through a backup pin.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use super::AuthError;

/// The SHA-256 digest of a DER-encoded SubjectPublicKeyInfo. Written as standard base64
/// (44 characters, as `openssl ... | openssl dgst -sha256 -binary | base64` prints it).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpkiPin([u8; 32]);

impl SpkiPin {
    /// The pin of a DER-encoded X.509 certificate.
    pub fn of_certificate_der(der: &[u8]) -> Result<Self, AuthError> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|_| AuthError::BadCertificate("not a DER X.509 certificate"))?;
        Ok(SpkiPin::of_spki_der(certificate.tbs_certificate.subject_pki.raw))
    }

    /// The pin of the first certificate in PEM text.
    pub fn of_certificate_pem(pem: &[u8]) -> Result<Self, AuthError> {
        let (_, block) =
            x509_parser::pem::parse_x509_pem(pem).map_err(|_| AuthError::BadCertificate("no PEM block found"))?;
        if block.label != "CERTIFICATE" {
            return Err(AuthError::BadCertificate("the first PEM block is not a CERTIFICATE"));
        }
        SpkiPin::of_certificate_der(&block.contents)
    }

    /// The pin of a DER-encoded SubjectPublicKeyInfo.
    pub fn of_spki_der(spki: &[u8]) -> Self {
        SpkiPin(Sha256::digest(spki).into())
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The pin in standard base64.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl FromStr for SpkiPin {
    type Err = AuthError;

    /// Parses standard base64 of 32 bytes, optionally prefixed with `sha256/`.
    fn from_str(s: &str) -> Result<Self, AuthError> {
        let s = s.trim();
        let encoded = s.strip_prefix("sha256/").unwrap_or(s);
        let bytes = STANDARD.decode(encoded).map_err(|_| AuthError::BadPin)?;
        <[u8; 32]>::try_from(bytes).map(SpkiPin).map_err(|_| AuthError::BadPin)
    }
}

impl fmt::Display for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpkiPin({})", self.to_base64())
    }
}

/// Which configured pin a certificate matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinMatch {
    /// The primary pin: the normal case.
    Primary,
    /// The backup pin: a key rotation is under way, and operators should be told.
    Backup,
}

/// The pins a client accepts for its server: a primary and, during a key rotation, a backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinSet {
    /// The pin of the server's current key.
    pub primary: SpkiPin,
    /// The pin of the key the server is moving to (or from).
    pub backup: Option<SpkiPin>,
}

impl PinSet {
    /// Which pin `pin` matches, or [`AuthError::PinMismatch`].
    pub fn check(&self, pin: &SpkiPin) -> Result<PinMatch, AuthError> {
        if *pin == self.primary {
            Ok(PinMatch::Primary)
        } else if self.backup.as_ref() == Some(pin) {
            Ok(PinMatch::Backup)
        } else {
            Err(AuthError::PinMismatch { got: *pin })
        }
    }

    /// Which pin the DER certificate `der` matches.
    pub fn check_certificate_der(&self, der: &[u8]) -> Result<PinMatch, AuthError> {
        self.check(&SpkiPin::of_certificate_der(der)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate() -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(vec!["host.test".into()]).expect("generates")
    }

    #[test]
    fn the_pin_is_sha256_of_the_spki_and_ignores_the_rest_of_the_certificate() {
        let issued = certificate();
        let pin = SpkiPin::of_certificate_der(issued.cert.der()).expect("parses");
        assert_eq!(pin, SpkiPin::of_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&issued.signing_key)));
        let renewed = rcgen::CertificateParams::new(vec!["other.test".into()])
            .expect("params")
            .self_signed(&issued.signing_key)
            .expect("signs");
        assert_eq!(SpkiPin::of_certificate_der(renewed.der()).expect("parses"), pin, "same key, same pin");
        assert_eq!(SpkiPin::of_certificate_pem(issued.cert.pem().as_bytes()).expect("parses"), pin);
    }

    #[test]
    fn pins_parse_with_or_without_prefix_and_refuse_other_lengths() {
        let pin = SpkiPin::of_spki_der(b"key");
        assert_eq!(pin.to_base64().parse::<SpkiPin>().expect("parses"), pin);
        assert_eq!(format!("sha256/{pin}").parse::<SpkiPin>().expect("parses"), pin);
        assert!(matches!("AAAA".parse::<SpkiPin>(), Err(AuthError::BadPin)));
        assert!(matches!("not base64!".parse::<SpkiPin>(), Err(AuthError::BadPin)));
    }

    #[test]
    fn the_set_reports_which_pin_matched() {
        let (a, b, c) = (SpkiPin::of_spki_der(b"a"), SpkiPin::of_spki_der(b"b"), SpkiPin::of_spki_der(b"c"));
        let set = PinSet { primary: a, backup: Some(b) };
        assert_eq!(set.check(&a).expect("matches"), PinMatch::Primary);
        assert_eq!(set.check(&b).expect("matches"), PinMatch::Backup);
        assert!(matches!(set.check(&c), Err(AuthError::PinMismatch { got }) if got == c));
        assert!(matches!(set.check_certificate_der(b"junk"), Err(AuthError::BadCertificate(_))));
    }
}
