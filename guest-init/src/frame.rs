//! Length-prefixed frames: `[len: u32 LE][postcard(message)]`.
//!
//! The readers take a stream that delivers frames in any split and treat it as hostile: a
//! length above the cap or a body that does not decode is an error, after which the caller
//! drops the stream (it has lost framing and nothing after it can be trusted).

use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

/// Largest frame body either side accepts. Output is sent in chunks far below this.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame body: {0}")]
    Malformed(String),
    #[error("stream ended inside a frame ({0} bytes pending)")]
    Truncated(usize),
}

/// Encodes `msg` as one frame, length prefix included.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let out = vec![0u8; 4];
    let mut body =
        postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = body.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    body[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(body)
}

/// Errors reading a frame from a blocking stream.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads one frame from a blocking stream; `Ok(None)` on a clean end of stream between frames.
/// `buf` is reused between calls to avoid an allocation per frame.
pub fn read_frame<T: DeserializeOwned, R: std::io::Read + ?Sized>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<T>, ReadError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated(got).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len).into());
    }
    // Grown once and never cleared: zeroing a frame-sized buffer per frame would cost a pass
    // over every payload byte.
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let buf = &mut buf[..len];
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ReadError::Frame(FrameError::Truncated(4))
        } else {
            ReadError::Io(e)
        }
    })?;
    postcard::from_bytes(buf)
        .map(Some)
        .map_err(|e| FrameError::Malformed(e.to_string()).into())
}

/// Reads frames from a blocking stream through one buffer: each read takes whatever the
/// stream has (many small frames at once), and each frame is decoded where it lies, so a
/// payload is copied once, from the buffer into its message.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl<R: std::io::Read> FrameReader<R> {
    /// Wraps `inner` with a buffer of `capacity` bytes (grown for a larger frame).
    pub fn new(inner: R, capacity: usize) -> Self {
        FrameReader {
            inner,
            buf: vec![0; capacity.max(4)],
            start: 0,
            end: 0,
        }
    }

    /// The next frame; `Ok(None)` on a clean end of stream between frames. After an I/O
    /// error such as a timeout, the bytes read so far stay buffered for the next call.
    pub fn read_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ReadError> {
        loop {
            let avail = self.end - self.start;
            let mut need = 4;
            if avail >= 4 {
                let mut len = [0u8; 4];
                len.copy_from_slice(&self.buf[self.start..self.start + 4]);
                let len = u32::from_le_bytes(len) as usize;
                if len > MAX_FRAME_LEN {
                    return Err(FrameError::TooLarge(len).into());
                }
                need = 4 + len;
                if avail >= need {
                    let body = &self.buf[self.start + 4..self.start + need];
                    let msg = postcard::from_bytes(body)
                        .map_err(|e| FrameError::Malformed(e.to_string()))?;
                    self.start += need;
                    if self.start == self.end {
                        (self.start, self.end) = (0, 0);
                    }
                    return Ok(Some(msg));
                }
            }
            // Room for the whole frame after `start`: move the partial frame to the front,
            // and grow the buffer for a frame larger than it.
            if self.buf.len() - self.start < need {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, avail);
                if self.buf.len() < need {
                    self.buf.resize(need, 0);
                }
            }
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) if avail == 0 => return Ok(None),
                Ok(0) => return Err(FrameError::Truncated(avail).into()),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Encodes `msg` and writes it as one frame.
pub fn write_frame<T: Serialize, W: std::io::Write + ?Sized>(
    w: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    let bytes = encode(msg).map_err(std::io::Error::other)?;
    w.write_all(&bytes)
}

/// A stream plus one frame-sized buffer that every frame is encoded in: the output path then
/// neither allocates (under musl, maps and unmaps) nor grows a buffer byte by byte per chunk.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: std::io::Write> FrameWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::new(),
        }
    }

    /// Encodes `msg` and writes it as one frame.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> std::io::Result<()> {
        if self.buf.is_empty() {
            // Zeroed pages from the allocator are only backed once written.
            self.buf = vec![0u8; 4 + MAX_FRAME_LEN];
        }
        let len = match postcard::to_slice(msg, &mut self.buf[4..]) {
            Ok(body) => body.len(),
            Err(postcard::Error::SerializeBufferFull) => {
                return Err(std::io::Error::other(FrameError::TooLarge(
                    MAX_FRAME_LEN + 1,
                )))
            }
            Err(e) => return Err(std::io::Error::other(FrameError::Malformed(e.to_string()))),
        };
        self.buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
        self.inner.write_all(&self.buf[..4 + len])?;
        self.inner.flush()
    }

    /// Writes a frame whose encoding is `head` (length prefix included) followed by `data`,
    /// in one writev: a payload goes from the caller's buffer to the stream without being
    /// copied into the frame buffer first.
    pub fn send_parts(&mut self, head: &[u8], data: &[u8]) -> std::io::Result<()> {
        let mut parts = [std::io::IoSlice::new(head), std::io::IoSlice::new(data)];
        let mut parts = &mut parts[..];
        while !parts.is_empty() {
            match self.inner.write_vectored(parts) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => std::io::IoSlice::advance_slices(&mut parts, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.inner.flush()
    }

    /// The stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentMessage as GuestMessage, ExitStatus, Response};

    #[test]
    fn blocking_reads() {
        let one = GuestMessage::Response {
            id: 5,
            response: Response::Stdout(b"one".to_vec()),
        };
        let mut stream = encode(&one).unwrap();
        write_frame(&mut stream, &GuestMessage::Hello { version: 9 }).unwrap();
        let mut r = stream.as_slice();
        let mut buf = Vec::new();
        assert_eq!(
            read_frame::<GuestMessage, _>(&mut r, &mut buf).unwrap(),
            Some(one)
        );
        assert_eq!(
            read_frame::<GuestMessage, _>(&mut r, &mut buf).unwrap(),
            Some(GuestMessage::Hello { version: 9 })
        );
        assert!(read_frame::<GuestMessage, _>(&mut r, &mut buf)
            .unwrap()
            .is_none());
        let mut cut: &[u8] = &[5, 0, 0, 0, 1];
        assert!(matches!(
            read_frame::<GuestMessage, _>(&mut cut, &mut buf),
            Err(ReadError::Frame(FrameError::Truncated(_)))
        ));
        let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<GuestMessage, _>(&mut huge, &mut buf),
            Err(ReadError::Frame(FrameError::TooLarge(_)))
        ));
    }

    /// A reader that returns at most `step` bytes per read.
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

    #[test]
    fn frame_reader_in_every_split_and_buffer_size() {
        let msgs = vec![
            GuestMessage::Hello { version: 1 },
            GuestMessage::Response {
                id: 1,
                response: Response::Stdout(vec![7; 3000]),
            },
            GuestMessage::Response {
                id: 2,
                response: Response::Stderr(vec![0, 255, 10]),
            },
            GuestMessage::Response {
                id: 1,
                response: Response::Exited {
                    status: ExitStatus::Code(3),
                    timed_out: false,
                    oom_killed: true,
                },
            },
        ];
        let stream: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
        for capacity in [1, 7, 64, 4096, 1 << 16] {
            for step in [1, 2, 3, 5, 100, 1000, stream.len()] {
                let mut r = FrameReader::new(
                    Trickle {
                        data: &stream,
                        step,
                    },
                    capacity,
                );
                let mut got = Vec::new();
                while let Some(m) = r.read_frame::<GuestMessage>().unwrap() {
                    got.push(m);
                }
                assert_eq!(got, msgs, "capacity {capacity}, step {step}");
            }
        }
        let cut = &stream[..stream.len() - 1];
        let mut r = FrameReader::new(Trickle { data: cut, step: 9 }, 64);
        let mut result = Ok(None);
        for _ in 0..msgs.len() {
            result = r.read_frame::<GuestMessage>();
        }
        assert!(matches!(
            result,
            Err(ReadError::Frame(FrameError::Truncated(_)))
        ));
        let huge = (MAX_FRAME_LEN as u32 + 1).to_le_bytes();
        let mut r = FrameReader::new(&huge[..], 64);
        assert!(matches!(
            r.read_frame::<GuestMessage>(),
            Err(ReadError::Frame(FrameError::TooLarge(_)))
        ));
        let mut r = FrameReader::new(&[2u8, 0, 0, 0, 0xff, 0xff][..], 64);
        assert!(matches!(
            r.read_frame::<GuestMessage>(),
            Err(ReadError::Frame(FrameError::Malformed(_)))
        ));
    }

    #[test]
    fn length_claims_more_than_the_body_decodes() {
        // A valid message followed by junk inside the same declared length still decodes the
        // message (postcard ignores trailing bytes); the framing stays in sync either way.
        let mut frame = encode(&GuestMessage::Hello { version: 1 }).unwrap();
        frame.push(0xaa);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        frame.extend(encode(&GuestMessage::Hello { version: 7 }).unwrap());
        let mut r = FrameReader::new(&frame[..], 64);
        assert_eq!(
            r.read_frame::<GuestMessage>().unwrap(),
            Some(GuestMessage::Hello { version: 1 })
        );
        assert_eq!(
            r.read_frame::<GuestMessage>().unwrap(),
            Some(GuestMessage::Hello { version: 7 })
        );
    }
}
