//! SPIFFE ID parsing (`tessera_mesh::SpiffeId`): every identity the mesh compares,
//! logs and signs passes through it.
//!
//! Properties: never panics; an ID that parses is exactly its own string form, its parts
//! rebuild the same ID, and that string parses to an equal ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_mesh::SpiffeId;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(id) = text.parse::<SpiffeId>() else {
        return;
    };
    assert_eq!(id.as_str(), text, "parsed ID does not print as its input");
    assert_eq!(id.to_string(), text);
    let reparsed: SpiffeId = id
        .to_string()
        .parse()
        .unwrap_or_else(|e| panic!("{id} does not parse again: {e}"));
    assert_eq!(reparsed, id);
    let rebuilt = SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account())
        .unwrap_or_else(|e| panic!("parts of {id} are refused: {e}"));
    assert_eq!(rebuilt, id);
    for part in [id.trust_domain(), id.namespace(), id.service_account()] {
        assert!(
            !part.is_empty() && !part.contains('/'),
            "{id}: part {part:?}"
        );
    }
});
