//! The stream framer, fed any bytes in any split, yields frames within the limit or a typed
//! error, and never buffers more than one frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viworks_core::wire::{Framer, Limits};

fuzz_target!(|input: (u8, &[u8])| {
    let (chunk, mut stream) = input;
    let limits = Limits {
        max_message_len: 256,
    };
    let mut framer = Framer::new(limits);
    let chunk = usize::from(chunk).max(1);
    while !stream.is_empty() {
        let piece = &stream[..chunk.min(stream.len())];
        let taken = framer.push(piece);
        stream = &stream[taken..];
        match framer.next_frame() {
            Some(Ok(frame)) => assert!(frame.len() <= limits.max_message_len),
            Some(Err(_)) => return,
            None => assert!(taken > 0 || piece.is_empty()),
        }
    }
});
