//! Frame encoding and decoding over byte slices; no I/O.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::message::{frame_type as t, Message};
use crate::MAX_FRAME_PAYLOAD;

/// Bytes in a frame header: `u32` big-endian payload length, `u8` type.
pub const HEADER_LEN: usize = 5;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame payload of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed {name} payload")]
    Payload {
        name: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{name} frame must have an empty payload, got {len} bytes")]
    UnexpectedPayload { name: &'static str, len: usize },
}

/// One frame's type and payload, borrowed from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    pub frame_type: u8,
    pub payload: &'a [u8],
}

/// The result of looking for a frame at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame, and how many bytes of the input it used.
    Frame {
        frame: RawFrame<'a>,
        consumed: usize,
    },
    /// The buffer holds only part of a frame; at least this many bytes in all are needed.
    Incomplete { needed: usize },
}

/// Encodes `msg` as one complete frame (header and payload).
pub fn encode(msg: &Message) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Appends `msg` as one complete frame to `out`. On error `out` is left as it was.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let written = write_payload(msg, out);
    let len = out.len() - start - HEADER_LEN;
    if let Err(e) = written {
        out.truncate(start);
        return Err(e);
    }
    if len > MAX_FRAME_PAYLOAD {
        out.truncate(start);
        return Err(CodecError::FrameTooLarge {
            len,
            max: MAX_FRAME_PAYLOAD,
        });
    }
    // The length fits: MAX_FRAME_PAYLOAD is far below u32::MAX.
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    out[start + 4] = msg.frame_type();
    Ok(())
}

fn json_into<T: Serialize>(
    name: &'static str,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    serde_json::to_writer(&mut *out, value).map_err(|source| CodecError::Payload { name, source })
}

fn write_payload(msg: &Message, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let name = msg.name();
    match msg {
        Message::Stdin(b) | Message::Stdout(b) | Message::Stderr(b) | Message::Data(b) => {
            if b.len() > MAX_FRAME_PAYLOAD {
                return Err(CodecError::FrameTooLarge {
                    len: b.len(),
                    max: MAX_FRAME_PAYLOAD,
                });
            }
            out.extend_from_slice(b);
            Ok(())
        }
        Message::Ok
        | Message::StdinEof
        | Message::Detach
        | Message::SessionList
        | Message::ActivityQuery
        | Message::DataEnd
        | Message::TunnelOk
        | Message::ListPorts => Ok(()),
        Message::LegacyAuth(v) => json_into(name, v, out),
        Message::Challenge(v) => json_into(name, v, out),
        Message::Auth(v) => json_into(name, v, out),
        Message::AuthOk(v) => json_into(name, v, out),
        Message::Error(v) => json_into(name, v, out),
        Message::Exec(v) => json_into(name, v, out),
        Message::Started(v) => json_into(name, v, out),
        Message::Resize(v) => json_into(name, v, out),
        Message::Exit(v) => json_into(name, v, out),
        Message::Kill(v) => json_into(name, v, out),
        Message::SessionAttach(v) => json_into(name, v, out),
        Message::Sessions(v) => json_into(name, v, out),
        Message::SessionKill(v) => json_into(name, v, out),
        Message::SessionQuery(v) => json_into(name, v, out),
        Message::Session(v) => json_into(name, v, out),
        Message::Activity(v) => json_into(name, v, out),
        Message::FileRead(v) => json_into(name, v, out),
        Message::FileReadStart(v) => json_into(name, v, out),
        Message::FileReadEnd(v) => json_into(name, v, out),
        Message::FileWrite(v) => json_into(name, v, out),
        Message::FileWritten(v) => json_into(name, v, out),
        Message::Stat(v) => json_into(name, v, out),
        Message::StatResult(v) => json_into(name, v, out),
        Message::Ls(v) => json_into(name, v, out),
        Message::LsChunk(v) => json_into(name, v, out),
        Message::LsEnd(v) => json_into(name, v, out),
        Message::Tunnel(v) => json_into(name, v, out),
        Message::SetTime(v) => json_into(name, v, out),
        Message::PortList(v) => json_into(name, v, out),
    }
}

/// Fills in the header of a raw-data frame whose payload was written in
/// place after [`HEADER_LEN`] reserved bytes, so that output can be framed
/// without copying it: `buf[..HEADER_LEN]` gets the header for a payload of
/// `len` bytes of type `frame_type` (one of the raw-data types).
pub fn write_header(buf: &mut [u8], frame_type: u8, len: usize) -> Result<(), CodecError> {
    if len > MAX_FRAME_PAYLOAD {
        return Err(CodecError::FrameTooLarge {
            len,
            max: MAX_FRAME_PAYLOAD,
        });
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    buf[4] = frame_type;
    Ok(())
}

/// Looks for one frame at the start of `buf`. A header announcing more
/// than [`MAX_FRAME_PAYLOAD`] is an error before any of its payload is read.
pub fn decode_frame(buf: &[u8]) -> Result<Decoded<'_>, CodecError> {
    if buf.len() < HEADER_LEN {
        return Ok(Decoded::Incomplete { needed: HEADER_LEN });
    }
    let len = payload_len(buf[..4].try_into().expect("4-byte slice"))?;
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Ok(Decoded::Incomplete { needed: total });
    }
    Ok(Decoded::Frame {
        frame: RawFrame {
            frame_type: buf[4],
            payload: &buf[HEADER_LEN..total],
        },
        consumed: total,
    })
}

/// Reads the payload length from a header's first four bytes, enforcing the limit.
pub(crate) fn payload_len(len_bytes: [u8; 4]) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > MAX_FRAME_PAYLOAD {
        return Err(CodecError::FrameTooLarge {
            len,
            max: MAX_FRAME_PAYLOAD,
        });
    }
    Ok(len)
}

fn json<T: DeserializeOwned>(name: &'static str, payload: &[u8]) -> Result<T, CodecError> {
    serde_json::from_slice(payload).map_err(|source| CodecError::Payload { name, source })
}

fn empty(name: &'static str, msg: Message, payload: &[u8]) -> Result<Message, CodecError> {
    if payload.is_empty() {
        Ok(msg)
    } else {
        Err(CodecError::UnexpectedPayload {
            name,
            len: payload.len(),
        })
    }
}

impl Message {
    /// Decodes a frame's payload. `Ok(None)` means the frame type is unknown
    /// to this reader, which skips it.
    pub fn from_frame(frame: RawFrame<'_>) -> Result<Option<Message>, CodecError> {
        let p = frame.payload;
        let msg = match frame.frame_type {
            t::LEGACY_AUTH => Message::LegacyAuth(json("legacy_auth", p)?),
            t::CHALLENGE => Message::Challenge(json("challenge", p)?),
            t::AUTH => Message::Auth(json("auth", p)?),
            t::AUTH_OK => Message::AuthOk(json("auth_ok", p)?),
            t::ERROR => Message::Error(json("error", p)?),
            t::OK => empty("ok", Message::Ok, p)?,
            t::EXEC => Message::Exec(json("exec", p)?),
            t::STARTED => Message::Started(json("started", p)?),
            t::STDIN => Message::Stdin(p.to_vec()),
            t::STDIN_EOF => empty("stdin_eof", Message::StdinEof, p)?,
            t::STDOUT => Message::Stdout(p.to_vec()),
            t::STDERR => Message::Stderr(p.to_vec()),
            t::RESIZE => Message::Resize(json("resize", p)?),
            t::EXIT => Message::Exit(json("exit", p)?),
            t::KILL => Message::Kill(json("kill", p)?),
            t::DETACH => empty("detach", Message::Detach, p)?,
            t::SESSION_ATTACH => Message::SessionAttach(json("session_attach", p)?),
            t::SESSION_LIST => empty("session_list", Message::SessionList, p)?,
            t::SESSIONS => Message::Sessions(json("sessions", p)?),
            t::SESSION_KILL => Message::SessionKill(json("session_kill", p)?),
            t::SESSION_QUERY => Message::SessionQuery(json("session_query", p)?),
            t::SESSION => Message::Session(json("session", p)?),
            t::ACTIVITY_QUERY => empty("activity_query", Message::ActivityQuery, p)?,
            t::ACTIVITY => Message::Activity(json("activity", p)?),
            t::FILE_READ => Message::FileRead(json("file_read", p)?),
            t::FILE_READ_START => Message::FileReadStart(json("file_read_start", p)?),
            t::DATA => Message::Data(p.to_vec()),
            t::DATA_END => empty("data_end", Message::DataEnd, p)?,
            t::FILE_READ_END => Message::FileReadEnd(json("file_read_end", p)?),
            t::FILE_WRITE => Message::FileWrite(json("file_write", p)?),
            t::FILE_WRITTEN => Message::FileWritten(json("file_written", p)?),
            t::STAT => Message::Stat(json("stat", p)?),
            t::STAT_RESULT => Message::StatResult(json("stat_result", p)?),
            t::LS => Message::Ls(json("ls", p)?),
            t::LS_CHUNK => Message::LsChunk(json("ls_chunk", p)?),
            t::LS_END => Message::LsEnd(json("ls_end", p)?),
            t::TUNNEL => Message::Tunnel(json("tunnel", p)?),
            t::SET_TIME => Message::SetTime(json("set_time", p)?),
            t::TUNNEL_OK => empty("tunnel_ok", Message::TunnelOk, p)?,
            t::LIST_PORTS => empty("list_ports", Message::ListPorts, p)?,
            t::PORT_LIST => Message::PortList(json("port_list", p)?),
            _ => return Ok(None),
        };
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;

    #[test]
    fn round_trips_a_data_frame() {
        let msg = Message::Stdout(vec![0, 1, 2, 255]);
        let bytes = encode(&msg).unwrap();
        assert_eq!(bytes, [0, 0, 0, 4, t::STDOUT, 0, 1, 2, 255]);
        match decode_frame(&bytes).unwrap() {
            Decoded::Frame { frame, consumed } => {
                assert_eq!(consumed, bytes.len());
                assert_eq!(Message::from_frame(frame).unwrap(), Some(msg));
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[test]
    fn in_place_header_matches_encode() {
        let mut buf = vec![0u8; HEADER_LEN + 3];
        buf[HEADER_LEN..].copy_from_slice(b"abc");
        write_header(&mut buf, t::STDERR, 3).unwrap();
        assert_eq!(buf, encode(&Message::Stderr(b"abc".to_vec())).unwrap());
        assert!(write_header(&mut buf, t::STDERR, MAX_FRAME_PAYLOAD + 1).is_err());
    }

    #[test]
    fn reports_incomplete_input() {
        let bytes = encode(&Message::Tunnel(Tunnel { port: 80 })).unwrap();
        assert_eq!(
            decode_frame(&bytes[..3]).unwrap(),
            Decoded::Incomplete { needed: HEADER_LEN }
        );
        assert_eq!(
            decode_frame(&bytes[..bytes.len() - 1]).unwrap(),
            Decoded::Incomplete {
                needed: bytes.len()
            }
        );
    }

    #[test]
    fn refuses_to_encode_an_oversize_frame() {
        let mut out = vec![7];
        let err = encode_into(&Message::Data(vec![0; MAX_FRAME_PAYLOAD + 1]), &mut out);
        assert!(matches!(err, Err(CodecError::FrameTooLarge { .. })));
        assert_eq!(out, [7], "output left untouched");
        assert!(encode(&Message::Data(vec![0; MAX_FRAME_PAYLOAD])).is_ok());
    }

    #[test]
    fn refuses_an_oversize_header_before_its_payload_arrives() {
        let header = [0x00, 0x10, 0x00, 0x01, t::STDOUT];
        assert!(matches!(
            decode_frame(&header),
            Err(CodecError::FrameTooLarge { len: 0x100001, .. })
        ));
    }

    #[test]
    fn skips_unknown_frame_types() {
        let frame = RawFrame {
            frame_type: 0xee,
            payload: b"whatever",
        };
        assert_eq!(Message::from_frame(frame).unwrap(), None);
    }

    #[test]
    fn rejects_payload_on_empty_messages_and_bad_json() {
        let frame = RawFrame {
            frame_type: t::OK,
            payload: b"x",
        };
        assert!(Message::from_frame(frame).is_err());
        let frame = RawFrame {
            frame_type: t::EXEC,
            payload: b"{\"argv\": 3}",
        };
        assert!(Message::from_frame(frame).is_err());
    }

    #[test]
    fn unknown_error_codes_and_fields_are_tolerated() {
        let frame = RawFrame {
            frame_type: t::ERROR,
            payload: br#"{"code":"brand_new","message":"m","extra":1}"#,
        };
        assert_eq!(
            Message::from_frame(frame).unwrap(),
            Some(Message::error(ErrorCode::Unknown, "m"))
        );
    }
}
