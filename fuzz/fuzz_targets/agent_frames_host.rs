//! What the host decodes from a (hostile) guest agent: a stream of frames split at arbitrary
//! points. Decoding must never panic, never allocate past the frame cap, and the blocking
//! readers (`read_frame`, and the client's buffered `FrameReader` fed in pieces of the same
//! size) must agree with the incremental decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_init::agent::AgentMessage;
use msb_init::frame::{read_frame, FrameDecoder, FrameReader, MAX_FRAME_LEN};

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
    let mut d = FrameDecoder::new();
    let mut incremental = Vec::new();
    'outer: for chunk in rest.chunks(usize::from(split).max(1)) {
        d.push(chunk);
        assert!(d.pending() <= rest.len());
        loop {
            match d.next_frame::<AgentMessage>() {
                Ok(Some(m)) => {
                    if let AgentMessage::Response { response, .. } = &m {
                        let _ = response.is_final();
                        assert!(response.payload_len() <= MAX_FRAME_LEN);
                    }
                    incremental.push(m);
                }
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
    let mut r = rest;
    let mut buf = Vec::new();
    for m in &incremental {
        assert_eq!(read_frame::<AgentMessage, _>(&mut r, &mut buf).ok().flatten().as_ref(), Some(m));
    }
    let step = usize::from(split).max(1);
    let mut fr = FrameReader::new(Trickle { data: rest, step }, step * 3);
    for m in &incremental {
        assert_eq!(fr.read_frame::<AgentMessage>().ok().flatten().as_ref(), Some(m));
    }
    // Whatever follows the last whole frame: an error or the end, never a panic.
    let _ = fr.read_frame::<AgentMessage>();
});
