//! Sealing (encode, then append the tag) and opening (check size and version, verify the tag,
//! then decode).

use super::{AuthError, MacKey};
use crate::wire::{self, Envelope, Kind, Limits, MAX_HELLO_LEN, PROTOCOL_VERSION, TAG_LEN, WireError};

/// The smallest possible message: the version byte, `{}`, and the tag.
const MIN_MESSAGE_LEN: usize = 1 + 2 + TAG_LEN;

/// Encodes `envelope` and appends the BLAKE3 keyed MAC of those exact bytes under `key`.
///
/// Cost: one JSON encoding and one BLAKE3 pass over the message.
pub fn seal(key: &MacKey, envelope: &Envelope) -> Result<Vec<u8>, AuthError> {
    let mut bytes = wire::encode(envelope)?;
    let tag = blake3::keyed_hash(key.as_bytes(), &bytes);
    bytes.extend_from_slice(tag.as_bytes());
    Ok(bytes)
}

/// Checks the size, the version byte and the tag of `sealed`, and returns the bytes the tag
/// covers (version byte and JSON). Nothing is parsed before the tag is verified.
///
/// The tag comparison takes the same time wherever the first difference lies.
pub fn verify<'a>(key: &MacKey, sealed: &'a [u8], limits: Limits) -> Result<&'a [u8], AuthError> {
    let covered = precheck(sealed, limits.max_message_len)?;
    let (covered, tag) = sealed.split_at(covered);
    let mut expected = [0u8; TAG_LEN];
    expected.copy_from_slice(tag);
    // blake3::Hash compares in constant time.
    if blake3::keyed_hash(key.as_bytes(), covered) != blake3::Hash::from_bytes(expected) {
        return Err(AuthError::BadMac);
    }
    Ok(covered)
}

/// Verifies `sealed` under `key` (see [`verify`]) and only then decodes it.
pub fn open(key: &MacKey, sealed: &[u8], limits: Limits) -> Result<Envelope, AuthError> {
    let covered = verify(key, sealed, limits)?;
    // The tag was verified above; from here on the bytes are the peer's.
    Ok(wire::decode(covered)?)
}

/// Decodes a HELLO without verifying its tag, so that the receiver can learn which agent key
/// to verify it with. The HELLO is bounded to [`MAX_HELLO_LEN`] bytes, and the caller must
/// call [`verify`] with that agent's key before acting on anything in it.
pub fn read_hello_unverified(sealed: &[u8]) -> Result<Envelope, AuthError> {
    let covered = precheck(sealed, MAX_HELLO_LEN)?;
    let envelope = wire::decode(&sealed[..covered])?;
    match envelope.message.kind() {
        Kind::Hello => Ok(envelope),
        other => Err(AuthError::UnexpectedKind { expected: Kind::Hello.as_str(), got: other.as_str() }),
    }
}

/// Checks size and version before anything else and returns the length the tag covers.
fn precheck(sealed: &[u8], max: usize) -> Result<usize, WireError> {
    if sealed.len() > max {
        return Err(WireError::TooLarge { len: sealed.len(), max });
    }
    if sealed.len() < MIN_MESSAGE_LEN {
        return Err(WireError::TooShort { len: sealed.len() });
    }
    if sealed[0] != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(sealed[0]));
    }
    Ok(sealed.len() - TAG_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Timestamp;
    use crate::wire::{Heartbeat, Message};

    fn key(byte: u8) -> MacKey {
        MacKey::from_bytes([byte; 32])
    }

    fn heartbeat() -> Envelope {
        Envelope { seq: 1, ts: Timestamp::from_millis(9), message: Message::Heartbeat(Heartbeat {}) }
    }

    #[test]
    fn open_inverts_seal_and_refuses_other_keys() {
        let sealed = seal(&key(1), &heartbeat()).expect("seals");
        assert_eq!(open(&key(1), &sealed, Limits::default()).expect("opens"), heartbeat());
        assert!(matches!(open(&key(2), &sealed, Limits::default()), Err(AuthError::BadMac)));
    }

    #[test]
    fn size_and_version_are_checked_before_the_tag() {
        let sealed = seal(&key(1), &heartbeat()).expect("seals");
        let tight = Limits { max_message_len: sealed.len() - 1 };
        assert!(matches!(open(&key(1), &sealed, tight), Err(AuthError::Wire(WireError::TooLarge { .. }))));
        let mut future = sealed.clone();
        future[0] = 2;
        assert!(matches!(
            open(&key(1), &future, Limits::default()),
            Err(AuthError::Wire(WireError::UnsupportedVersion(2)))
        ));
        assert!(matches!(
            open(&key(1), &sealed[..10], Limits::default()),
            Err(AuthError::Wire(WireError::TooShort { len: 10 }))
        ));
    }

    #[test]
    fn only_a_hello_may_be_read_unverified() {
        let sealed = seal(&key(1), &heartbeat()).expect("seals");
        assert!(matches!(
            read_hello_unverified(&sealed),
            Err(AuthError::UnexpectedKind { expected: "hello", got: "heartbeat" })
        ));
        let huge = vec![PROTOCOL_VERSION; MAX_HELLO_LEN + 1];
        assert!(matches!(read_hello_unverified(&huge), Err(AuthError::Wire(WireError::TooLarge { .. }))));
    }
}
