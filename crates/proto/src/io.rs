//! Async frame reading and writing over tokio streams.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{decode_frame, encode_into, CodecError, Decoded};
use crate::message::Message;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    #[error("connection closed in the middle of a frame")]
    TruncatedFrame,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Reads frames from a stream, skipping frame types it does not know.
///
/// [`FrameReader::read_message`] is cancel-safe: bytes are only consumed
/// from the internal buffer once a whole frame is there, so it can sit in a
/// `tokio::select!` beside other branches. The buffer never grows beyond one
/// frame ([`crate::MAX_FRAME_PAYLOAD`] plus header) plus one read.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
}

const READ_CHUNK: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::with_capacity(READ_CHUNK),
            start: 0,
        }
    }

    /// The next message, or `None` when the peer closed the stream between frames.
    pub async fn read_message(&mut self) -> Result<Option<Message>, ReadError> {
        loop {
            match decode_frame(&self.buf[self.start..]) {
                Ok(Decoded::Frame { frame, consumed }) => {
                    let parsed = Message::from_frame(frame);
                    self.start += consumed;
                    if self.start == self.buf.len() {
                        self.buf.clear();
                        self.start = 0;
                    }
                    match parsed {
                        Ok(Some(msg)) => return Ok(Some(msg)),
                        // Unknown frame type: a newer peer's addition; skip it.
                        Ok(None) => continue,
                        Err(e) => return Err(ReadError::Codec(e)),
                    }
                }
                Ok(Decoded::Incomplete { needed }) => {
                    if !self.fill(needed).await? {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(ReadError::Codec(e)),
            }
        }
    }

    /// Reads more bytes towards a frame of `needed` bytes. Returns `false` at
    /// a clean end of stream. Cancel-safe: a read either appends or does nothing.
    async fn fill(&mut self, needed: usize) -> Result<bool, ReadError> {
        let buffered = self.buf.len() - self.start;
        if self.start > 0 && self.buf.capacity() - self.start < needed.max(READ_CHUNK) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        // Room for the rest of this frame, or one read chunk, whichever is larger.
        let room = (needed - buffered.min(needed)).max(READ_CHUNK);
        self.buf.reserve(room);
        let n = self.inner.read_buf(&mut self.buf).await?;
        if n == 0 {
            return if buffered == 0 {
                Ok(false)
            } else {
                Err(ReadError::TruncatedFrame)
            };
        }
        Ok(true)
    }

    /// Gives back the stream and any bytes already read past the last frame
    /// (used when a connection switches to raw bytes, as a tunnel does).
    pub fn into_parts(mut self) -> (R, Vec<u8>) {
        let leftover = self.buf.split_off(self.start);
        (self.inner, leftover)
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Writes each message as one frame with a single buffer write.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::with_capacity(4096),
        }
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), WriteError> {
        self.buf.clear();
        encode_into(msg, &mut self.buf)?;
        self.inner.write_all(&self.buf).await?;
        self.inner.flush().await?;
        if self.buf.capacity() > 256 * 1024 {
            self.buf = Vec::with_capacity(4096);
        }
        Ok(())
    }

    /// Writes bytes that are already a complete encoded frame (or several).
    pub async fn send_encoded(&mut self, frames: &[u8]) -> Result<(), WriteError> {
        self.inner.write_all(frames).await?;
        self.inner.flush().await?;
        Ok(())
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode, MAX_FRAME_PAYLOAD};

    #[tokio::test]
    async fn reads_frames_and_skips_unknown_types() {
        let mut bytes = encode(&Message::Ok).unwrap();
        bytes.extend_from_slice(&[0, 0, 0, 3, 0xee, 1, 2, 3]);
        bytes.extend(encode(&Message::Stdout(b"hi".to_vec())).unwrap());
        let mut r = FrameReader::new(&bytes[..]);
        assert_eq!(r.read_message().await.unwrap(), Some(Message::Ok));
        assert_eq!(
            r.read_message().await.unwrap(),
            Some(Message::Stdout(b"hi".to_vec()))
        );
        assert_eq!(r.read_message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_cut_frame_is_an_error_not_an_end() {
        let bytes = encode(&Message::Stdout(b"hello".to_vec())).unwrap();
        let mut r = FrameReader::new(&bytes[..bytes.len() - 1]);
        assert!(matches!(
            r.read_message().await,
            Err(ReadError::TruncatedFrame)
        ));
    }

    #[tokio::test]
    async fn an_oversize_header_is_refused() {
        let len = (MAX_FRAME_PAYLOAD as u32 + 1).to_be_bytes();
        let bytes = [len[0], len[1], len[2], len[3], 0x14];
        let mut r = FrameReader::new(&bytes[..]);
        assert!(matches!(
            r.read_message().await,
            Err(ReadError::Codec(CodecError::FrameTooLarge { .. }))
        ));
    }

    #[tokio::test]
    async fn writer_emits_whole_frames() {
        let mut w = FrameWriter::new(Vec::new());
        w.send(&Message::DataEnd).await.unwrap();
        w.send(&Message::Data(vec![9; 3])).await.unwrap();
        assert_eq!(
            w.into_inner(),
            [0, 0, 0, 0, 0x43, 0, 0, 0, 3, 0x42, 9, 9, 9]
        );
    }
}
