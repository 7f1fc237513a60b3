//! Length-delimited framing for stream transports (TCP, Unix sockets, QUIC streams).
//!
//! Each message is preceded by its length as a 4-byte big-endian unsigned integer. WebSocket
//! already delimits messages and does not use this.

use super::{Limits, WireError};

/// Size of the length prefix in front of each frame.
pub const FRAME_HEADER_LEN: usize = 4;

/// Prefixes `payload` with its length. Fails when the payload is larger than `limits` allow,
/// so a sender never produces a frame its peer must refuse.
pub fn encode_frame(payload: &[u8], limits: Limits) -> Result<Vec<u8>, WireError> {
    let too_large = WireError::FrameTooLarge { len: payload.len() as u64, max: limits.max_message_len };
    if payload.len() > limits.max_message_len {
        return Err(too_large);
    }
    let len = u32::try_from(payload.len()).map_err(|_| too_large)?;
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// Reassembles frames from a byte stream, holding at most one frame at a time.
///
/// Feed it with [`Framer::push`], which takes only as many bytes as complete the current
/// frame, and drain it with [`Framer::next_frame`]. A length prefix larger than the limit is
/// reported before any of that frame's payload is buffered; the stream cannot be resynchronised
/// after that, and the framer keeps reporting the error.
#[derive(Debug)]
pub struct Framer {
    max: usize,
    buf: Vec<u8>,
    oversized: Option<u64>,
}

impl Framer {
    /// A framer that refuses frames longer than `limits.max_message_len`.
    pub fn new(limits: Limits) -> Self {
        Framer { max: limits.max_message_len, buf: Vec::new(), oversized: None }
    }

    /// Buffers bytes from `input` until a frame is complete and returns how many it took. The
    /// caller passes the rest again after draining [`Framer::next_frame`].
    pub fn push(&mut self, mut input: &[u8]) -> usize {
        let offered = input.len();
        while !input.is_empty() && self.oversized.is_none() && !self.frame_complete() {
            let needed = match self.announced() {
                None => FRAME_HEADER_LEN - self.buf.len(),
                Some(len) => FRAME_HEADER_LEN + len - self.buf.len(),
            };
            let (taken, rest) = input.split_at(needed.min(input.len()));
            self.buf.extend_from_slice(taken);
            input = rest;
            if self.buf.len() == FRAME_HEADER_LEN {
                let len = u64::from(u32::from_be_bytes(self.header()));
                if len > self.max as u64 {
                    self.oversized = Some(len);
                }
            }
        }
        offered - input.len()
    }

    /// The next complete frame's payload, an error if the stream announced an oversized frame,
    /// or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Result<Vec<u8>, WireError>> {
        if let Some(len) = self.oversized {
            return Some(Err(WireError::FrameTooLarge { len, max: self.max }));
        }
        if !self.frame_complete() {
            return None;
        }
        let payload = self.buf.split_off(FRAME_HEADER_LEN);
        self.buf.clear();
        Some(Ok(payload))
    }

    fn header(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut header = [0u8; FRAME_HEADER_LEN];
        header.copy_from_slice(&self.buf[..FRAME_HEADER_LEN]);
        header
    }

    fn announced(&self) -> Option<usize> {
        if self.buf.len() < FRAME_HEADER_LEN || self.oversized.is_some() {
            return None;
        }
        // Below the limit, which is a usize, so the conversion cannot truncate.
        Some(u32::from_be_bytes(self.header()) as usize)
    }

    fn frame_complete(&self) -> bool {
        matches!(self.announced(), Some(len) if self.buf.len() == FRAME_HEADER_LEN + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits(max: usize) -> Limits {
        Limits { max_message_len: max }
    }

    fn drain(framer: &mut Framer, mut stream: &[u8]) -> Vec<Result<Vec<u8>, WireError>> {
        let mut frames = Vec::new();
        loop {
            let taken = framer.push(stream);
            stream = &stream[taken..];
            match framer.next_frame() {
                Some(Err(e)) => {
                    frames.push(Err(e));
                    return frames;
                }
                Some(Ok(frame)) => frames.push(Ok(frame)),
                None if stream.is_empty() => return frames,
                None => {}
            }
        }
    }

    #[test]
    fn an_oversized_prefix_is_refused_before_its_payload_is_buffered() {
        let mut framer = Framer::new(limits(16));
        let mut stream = 17u32.to_be_bytes().to_vec();
        stream.extend_from_slice(&[0; 17]);
        assert_eq!(framer.push(&stream), FRAME_HEADER_LEN);
        assert!(matches!(framer.next_frame(), Some(Err(WireError::FrameTooLarge { len: 17, max: 16 }))));
        assert_eq!(framer.push(&stream[4..]), 0, "a desynchronised stream takes nothing more");
    }

    #[test]
    fn encoding_refuses_what_the_peer_would_refuse() {
        assert!(encode_frame(&[0; 17], limits(16)).is_err());
        assert_eq!(encode_frame(b"ab", limits(16)).expect("fits"), b"\0\0\0\x02ab");
    }

    proptest! {
        #[test]
        fn frames_survive_any_split_of_the_stream(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            chunk in 1usize..20,
        ) {
            let stream: Vec<u8> = payloads
                .iter()
                .flat_map(|p| encode_frame(p, limits(64)).expect("fits"))
                .collect();
            let mut framer = Framer::new(limits(64));
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                for frame in drain(&mut framer, piece) {
                    got.push(frame.expect("well-formed stream"));
                }
            }
            prop_assert_eq!(got, payloads);
        }

        #[test]
        fn any_stream_yields_frames_or_a_typed_error_and_stays_bounded(
            stream in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut framer = Framer::new(limits(32));
            for frame in drain(&mut framer, &stream).into_iter().flatten() {
                prop_assert!(frame.len() <= 32);
            }
            prop_assert!(framer.buf.capacity() <= 64 + FRAME_HEADER_LEN);
        }
    }
}
