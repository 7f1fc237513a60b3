//! Opening arbitrary bytes never panics and never accepts a message that was not sealed under
//! the key; sealing what opened reproduces the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viworks_core::auth::{self, MacKey};
use viworks_core::wire::Limits;

fuzz_target!(|data: &[u8]| {
    let key = MacKey::from_bytes([0x42; 32]);
    if let Ok(envelope) = auth::open(&key, data, Limits::default()) {
        // Only bytes carrying a valid tag open, and the tag covers the exact bytes.
        let resealed = auth::seal(&key, &envelope).expect("an opened message re-seals");
        let reopened = auth::open(&key, &resealed, Limits::default()).expect("re-sealed opens");
        assert_eq!(reopened, envelope);
    }
    // A tag computed here over the fuzzer's bytes must verify, and one flipped bit must not.
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(blake3::keyed_hash(key.as_bytes(), data).as_bytes());
    if auth::verify(&key, &sealed, Limits::default()).is_ok() {
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(auth::verify(&key, &sealed, Limits::default()).is_err());
    }
});
