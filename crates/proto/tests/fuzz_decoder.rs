//! Bounded fuzzing of the decoders with proptest (runs in the normal suite):
//! arbitrary bytes never panic, and no payload buffer beyond the frame limit
//! is ever requested.

use proptest::prelude::*;
use proto::*;

fn decode_all(mut input: &[u8]) {
    loop {
        match decode_frame(input) {
            Ok(Decoded::Frame { frame, consumed }) => {
                assert!(frame.payload.len() <= MAX_FRAME_PAYLOAD);
                let _ = Message::from_frame(frame);
                input = &input[consumed..];
            }
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed <= HEADER_LEN + MAX_FRAME_PAYLOAD);
                return;
            }
            Err(_) => return,
        }
    }
}

/// Frames whose headers are valid but whose payloads are random, for every known type.
fn framed(ty: u8, payload: Vec<u8>) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.push(ty);
    v.extend(payload);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        decode_all(&input);
    }

    #[test]
    fn arbitrary_payloads_of_known_types_never_panic(
        ty in 0u8..0x60,
        payload in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        decode_all(&framed(ty, payload));
    }

    #[test]
    fn json_like_payloads_never_panic(ty in 0u8..0x60, s in "\\{(\"[a-z_]{1,8}\":(\"[^\"]{0,8}\"|[0-9-]{1,25}|null|true|\\[\\]),?){0,6}\\}") {
        decode_all(&framed(ty, s.into_bytes()));
    }

    #[test]
    fn async_reader_never_panics_and_ends(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut r = FrameReader::new(&input[..]);
            for _ in 0..input.len() + 1 {
                match r.read_message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return,
                }
            }
            panic!("reader did not finish");
        });
    }

    #[test]
    fn data_messages_round_trip(data in proptest::collection::vec(any::<u8>(), 0..8192)) {
        for m in [Message::Stdout(data.clone()), Message::Stdin(data.clone()), Message::Data(data.clone())] {
            let bytes = encode(&m).unwrap();
            let Decoded::Frame { frame, consumed } = decode_frame(&bytes).unwrap() else { panic!() };
            prop_assert_eq!(consumed, bytes.len());
            prop_assert_eq!(Message::from_frame(frame).unwrap(), Some(m));
        }
    }

    #[test]
    fn exec_requests_round_trip(argv in proptest::collection::vec(".{0,20}", 0..6), cwd in proptest::option::of(".{0,30}"), timeout in proptest::option::of(any::<u64>())) {
        let m = Message::Exec(ExecRequest { argv, cwd, timeout_ms: timeout, ..ExecRequest::default() });
        let bytes = encode(&m).unwrap();
        let Decoded::Frame { frame, .. } = decode_frame(&bytes).unwrap() else { panic!() };
        prop_assert_eq!(Message::from_frame(frame).unwrap(), Some(m));
    }
}

#[test]
fn every_oversize_length_is_refused_before_allocation() {
    for len in [MAX_FRAME_PAYLOAD as u32 + 1, u32::MAX / 2, u32::MAX] {
        let mut header = len.to_be_bytes().to_vec();
        header.push(frame_type::DATA);
        assert!(matches!(
            decode_frame(&header),
            Err(CodecError::FrameTooLarge { .. })
        ));
    }
}
