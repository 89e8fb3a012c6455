//! Path normalization (`tessera_mesh::policy::normalize_path`): the form policies are
//! matched against and the application receives, so any way to spell a path twice is a
//! way around a DENY.
//!
//! Properties: never panics; normalizing a normal form changes nothing; the normal form
//! is ASCII, starts with `/` and has no empty, `.` or `..` segment; spellings the
//! normalization declares equivalent (a doubled slash, a `./` segment, an unreserved
//! character percent-encoded) normalize to the same form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_mesh::policy::normalize_path;

fuzz_target!(|bytes: &[u8]| {
    let path = String::from_utf8_lossy(bytes);
    let Ok(normal) = normalize_path(&path) else {
        return; // refused with 400: no policy is asked
    };
    let normal = normal.into_owned();
    let again = normalize_path(&normal)
        .unwrap_or_else(|e| panic!("{path:?} normalized to {normal:?}, which is refused: {e}"));
    assert_eq!(
        again, normal,
        "not idempotent: {path:?} -> {normal:?} -> {again:?}"
    );
    assert!(
        normal.is_ascii(),
        "{path:?} normalized to non-ASCII {normal:?}"
    );
    assert!(normal.starts_with('/'), "{path:?} normalized to {normal:?}");
    // Segments between slashes: the last may be empty (a trailing slash), none other.
    let segments: Vec<&str> = normal[1..].split('/').collect();
    for (index, segment) in segments.iter().enumerate() {
        let last = index + 1 == segments.len();
        assert!(
            !(segment.is_empty() && !last) && *segment != "." && *segment != "..",
            "{path:?} normalized to {normal:?}, with segment {segment:?}"
        );
    }

    // Equivalent spellings of the normal form.
    let equivalent = |spelling: String| {
        let form = normalize_path(&spelling)
            .unwrap_or_else(|e| panic!("{spelling:?} (spelling {normal:?}) is refused: {e}"));
        assert_eq!(
            form, normal,
            "{spelling:?} and {normal:?} differ once normal"
        );
    };
    equivalent(normal.replace('/', "//"));
    equivalent(format!("/.{normal}"));
    // Every unreserved character percent-encoded, escapes already there kept as they are.
    let mut encoded = String::with_capacity(normal.len() * 3);
    let mut rest = normal.as_str();
    while let Some(c) = rest.chars().next() {
        if c == '%'
            && let Some(escape) = rest.get(..3)
        {
            encoded.push_str(escape);
            rest = &rest[3..];
            continue;
        }
        if c.is_ascii_alphanumeric() || "-._~".contains(c) {
            encoded.push_str(&format!("%{:02X}", c as u32));
        } else {
            encoded.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    equivalent(encoded);
});
