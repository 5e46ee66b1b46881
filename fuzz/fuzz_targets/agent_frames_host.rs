//! What the host decodes from a (hostile) guest agent: a stream of frames split at arbitrary
//! points. Decoding must never panic, never allocate past the frame cap, and the client's
//! buffered `FrameReader`, fed in pieces of any size, must agree with `read_frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_init::agent::AgentMessage;
use msb_init::frame::{read_frame, FrameReader, MAX_FRAME_LEN};

/// Hands out at most `step` bytes per read.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    // The reference: one frame per call, length then body, straight from the bytes.
    let mut r = rest;
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    while let Ok(Some(m)) = read_frame::<AgentMessage, _>(&mut r, &mut buf) {
        if let AgentMessage::Response { response, .. } = &m {
            let _ = response.is_final();
            assert!(response.payload_len() <= MAX_FRAME_LEN);
        }
        frames.push(m);
    }
    // The client's buffered reader, fed in pieces, decodes the same frames.
    let step = usize::from(split).max(1);
    let mut fr = FrameReader::new(Trickle { data: rest, step }, step * 3);
    for m in &frames {
        assert_eq!(fr.read_frame::<AgentMessage>().ok().flatten().as_ref(), Some(m));
    }
    // Whatever follows the last whole frame: an error or the end, never a panic.
    let _ = fr.read_frame::<AgentMessage>();
});
