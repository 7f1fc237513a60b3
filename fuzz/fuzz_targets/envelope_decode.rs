//! Any bytes given to the envelope decoder and the unverified HELLO reader yield a message or
//! a typed error; whatever decodes re-encodes and decodes to the same message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viworks_core::{auth, wire};

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = wire::decode(data) {
        let encoded = wire::encode(&envelope).expect("a decoded message re-encodes");
        let again = wire::decode(&encoded).expect("a re-encoded message decodes");
        assert_eq!(again, envelope);
    }
    let _ = auth::read_hello_unverified(data);
});
