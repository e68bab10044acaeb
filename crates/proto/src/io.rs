//! Async frame reading and writing over tokio streams.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::codec::{encode_into, payload_len, CodecError, RawFrame, HEADER_LEN};
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
/// Never allocates more than [`crate::MAX_FRAME_PAYLOAD`] for a payload.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: BufReader<R>,
    payload: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner: BufReader::with_capacity(64 * 1024, inner),
            payload: Vec::new(),
        }
    }

    /// The next message, or `None` when the peer closed the stream between frames.
    pub async fn read_message(&mut self) -> Result<Option<Message>, ReadError> {
        loop {
            let Some(frame_type) = self.read_raw().await? else {
                return Ok(None);
            };
            let frame = RawFrame {
                frame_type,
                payload: &self.payload,
            };
            if let Some(msg) = Message::from_frame(frame)? {
                return Ok(Some(msg));
            }
            // Unknown frame type: a newer peer's addition; skip it.
        }
    }

    /// Reads one frame of any type into the internal payload buffer and
    /// returns its type, or `None` at a clean end of stream.
    async fn read_raw(&mut self) -> Result<Option<u8>, ReadError> {
        let mut header = [0u8; HEADER_LEN];
        let first = self.inner.read(&mut header[..1]).await?;
        if first == 0 {
            return Ok(None);
        }
        read_exact(&mut self.inner, &mut header[1..]).await?;
        let len = payload_len(header[..4].try_into().expect("4-byte slice"))?;
        self.payload.clear();
        self.payload.resize(len, 0);
        read_exact(&mut self.inner, &mut self.payload).await?;
        if self.payload.capacity() > 256 * 1024 {
            // Do not keep a 1 MiB buffer alive for a connection that sent one big frame.
            self.payload.shrink_to(256 * 1024);
        }
        Ok(Some(header[4]))
    }

    /// Gives back the stream and any bytes already read past the last frame
    /// (used when a connection switches to raw bytes, as a tunnel does).
    pub fn into_parts(self) -> (R, Vec<u8>) {
        let leftover = self.inner.buffer().to_vec();
        (self.inner.into_inner(), leftover)
    }

    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), ReadError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ReadError::TruncatedFrame),
        Err(e) => Err(ReadError::Io(e)),
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
