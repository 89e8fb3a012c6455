//! Configuration parsing, both sides: the control plane's resource files (a YAML stream
//! of documents, then the mesh snapshot built from them) and the proxy's own file.
//! An operator's typo or a hostile ConfigMap must give an error, never a panic.
//!
//! Property: never panics, and every error has a message.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tessera_mesh::resources;
use tessera_mesh::snapshot::MeshSnapshot;
use tessera_proxy::ProxyConfig;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    match resources::parse_file(file, text) {
        Ok(parsed) => {
            let trust_domain = match resources::mesh_config(&parsed) {
                Ok(mesh) => mesh.trust_domain,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    tessera_mesh::spiffe::DEFAULT_TRUST_DOMAIN.to_string()
                }
            };
            if let Err(e) = MeshSnapshot::from_resources(&trust_domain, &parsed) {
                assert!(!e.to_string().is_empty());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if let Err(e) = ProxyConfig::parse(text, file) {
        assert!(!e.to_string().is_empty());
    }
});
