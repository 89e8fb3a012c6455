//! Protocol detection on a connection's first bytes (`tessera_proxy::detect::classify`).
//!
//! Properties: never panics; a verdict, once given, holds for every longer prefix (the
//! proxy decides on however many bytes have arrived, so a later byte must not change
//! the protocol); HTTP/2 exactly when the bytes start with the connection preface,
//! HTTP/1 exactly when they start with a method and a space.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_proxy::detect::{Detected, classify};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

fuzz_target!(|bytes: &[u8]| {
    // Detection never looks past the preface's length; a little more shows it stays put.
    let bytes = &bytes[..bytes.len().min(64)];
    let mut decided: Option<(usize, Detected)> = None;
    for end in 0..=bytes.len() {
        let verdict = classify(&bytes[..end]);
        if let Some((at, earlier)) = decided {
            assert_eq!(
                verdict,
                Some(earlier),
                "{:?} was {earlier:?} after {at} bytes, then {verdict:?} after {end}",
                String::from_utf8_lossy(bytes)
            );
        }
        decided = decided.or(verdict.map(|v| (end, v)));
    }
    let verdict = classify(bytes);
    let is_h2 = bytes.starts_with(H2_PREFACE);
    let is_h1 = METHODS.iter().any(|m| bytes.starts_with(m));
    assert_eq!(verdict == Some(Detected::Http2), is_h2, "{bytes:?}");
    assert_eq!(verdict == Some(Detected::Http1), is_h1, "{bytes:?}");
});
