//! The one form of an HTTP request that is both authorized and forwarded.
//!
//! Policy decides on a request's authority and path; the application then acts on them.
//! Wherever the two could read one request differently — two `Host` fields, an authority
//! with userinfo or percent-escapes, a path whose escapes spell new ones — a DENY can be
//! walked around. So every request is put in a single form before anything reads it,
//! a request that has none is refused with 400, and what the policy saw is exactly what
//! the application receives. The rules:
//! - One authority: the request target's (absolute form, or HTTP/2 `:authority`), else
//!   the single `Host` field; more than one `Host` is refused (RFC 9112 §3.2), as is an
//!   HTTP/1.1 request with none. A `Host` beside a target authority is made to agree
//!   with it (RFC 9112 §3.2.2, RFC 9113 §8.3.1).
//! - An authority is a host name (letters, digits, `-._~`), an IPv4 address or a
//!   bracketed IPv6 address, with an optional decimal port: no userinfo, no escapes, no
//!   spaces; policy compares it case-insensitively and without its port.
//! - The path is in [`policy::normalize_path`]'s form; `*` is only `OPTIONS *`.

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Version};
use tessera_mesh::policy::{self, InvalidPath};

/// Why a request has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("more than one Host field")]
    RepeatedHost,
    #[error("HTTP/1.1 request without Host")]
    MissingHost,
    #[error("authority carries userinfo")]
    Userinfo,
    #[error("authority is not a host name or IP address")]
    InvalidHost,
    #[error("authority has an invalid port")]
    InvalidPort,
    #[error("`*` target on a method other than OPTIONS")]
    AsteriskTarget,
    #[error("path: {0}")]
    Path(#[from] InvalidPath),
    #[error("normalized path does not form a URI")]
    UnparsablePath,
}

/// Puts `request` in its canonical form, or says why it has none.
pub fn canonicalize<B>(request: &mut Request<B>) -> Result<(), Malformed> {
    canonicalize_authority(request)?;
    canonicalize_path(request)
}

/// The request's single authority, checked; the `Host` field made to agree with it.
fn canonicalize_authority<B>(request: &mut Request<B>) -> Result<(), Malformed> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Malformed::RepeatedHost);
    }
    match request.uri().authority() {
        Some(authority) => {
            check_authority(authority.as_str().as_bytes())?;
            if let Some(host) = host
                && host.as_bytes() != authority.as_str().as_bytes()
            {
                let agreed = HeaderValue::from_str(authority.as_str())
                    .map_err(|_| Malformed::InvalidHost)?;
                request.headers_mut().insert(header::HOST, agreed);
            }
            Ok(())
        }
        None => match host {
            Some(host) => check_authority(host.as_bytes()),
            // HTTP/1.0 needs no Host, and HTTP/2 may omit its authority (RFC 9113 §8.3.1).
            None if request.version() == Version::HTTP_11 => Err(Malformed::MissingHost),
            None => Ok(()),
        },
    }
}

/// The host a canonical request is addressed to, as policy reads it: the target's
/// authority, else the `Host` field; empty for an HTTP/1.0 request with neither.
pub fn host<B>(request: &Request<B>) -> &str {
    request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("")
}

/// A field of a canonical request as a policy condition reads it (repeated fields are
/// joined by then). UTF-8, not only visible ASCII: a value a condition cannot read must
/// not slip past a DENY because of one non-ASCII character. Without a `Host` field (over
/// HTTP/2 the authority comes alone), `host` reads the authority.
pub fn header<'a, B>(request: &'a Request<B>, name: &HeaderName) -> Option<&'a str> {
    let value = request
        .headers()
        .get(name)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok());
    if value.is_none() && name == header::HOST {
        return request.uri().authority().map(|a| a.as_str());
    }
    value
}

/// `host[:port]` with a plain host name, IPv4 address or bracketed IPv6 address.
pub fn check_authority(authority: &[u8]) -> Result<(), Malformed> {
    if authority.contains(&b'@') {
        return Err(Malformed::Userinfo);
    }
    let (host, port) = match authority.first() {
        Some(b'[') => {
            let close = authority
                .iter()
                .position(|&b| b == b']')
                .ok_or(Malformed::InvalidHost)?;
            let inner = &authority[1..close];
            let ipv6 = inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
            if inner.is_empty() || !ipv6 {
                return Err(Malformed::InvalidHost);
            }
            match &authority[close + 1..] {
                [] => (inner, None),
                [b':', port @ ..] => (inner, Some(port)),
                _ => return Err(Malformed::InvalidHost),
            }
        }
        _ => match authority.iter().rposition(|&b| b == b':') {
            Some(colon) => (&authority[..colon], Some(&authority[colon + 1..])),
            None => (authority, None),
        },
    };
    let name = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    if host.is_empty() || (authority[0] != b'[' && !host.iter().all(name)) {
        return Err(Malformed::InvalidHost);
    }
    match port {
        None => Ok(()),
        Some(port) if valid_port(port) => Ok(()),
        Some(_) => Err(Malformed::InvalidPort),
    }
}

/// One to five decimal digits, at most 65535.
fn valid_port(port: &[u8]) -> bool {
    (1..=5).contains(&port.len())
        && port.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(port)
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
            .is_some()
}

/// The path in its normal form (the query untouched); `OPTIONS *` as it is.
fn canonicalize_path<B>(request: &mut Request<B>) -> Result<(), Malformed> {
    let path = request.uri().path();
    if path == "*" {
        return if request.method() == Method::OPTIONS {
            Ok(())
        } else {
            Err(Malformed::AsteriskTarget)
        };
    }
    // CONNECT names an authority and has no path; the authority was checked.
    if request.method() == Method::CONNECT && path.is_empty() {
        return Ok(());
    }
    let normalized = policy::normalize_path(path)?;
    if normalized == path {
        return Ok(());
    }
    let mut parts = request.uri().clone().into_parts();
    let path_and_query = match parts.path_and_query.as_ref().and_then(|p| p.query()) {
        Some(query) => format!("{normalized}?{query}"),
        None => normalized.into_owned(),
    };
    // The normal form is visible ASCII without `?` or `#`, so this is not expected to
    // fail; if it does, the request is refused rather than forwarded unnormalized.
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| Malformed::UnparsablePath)?,
    );
    *request.uri_mut() = http::Uri::from_parts(parts).map_err(|_| Malformed::UnparsablePath)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request with `hosts` as its `Host` fields, in order (also used by the router's tests).
    pub(crate) fn request(version: Version, target: &str, hosts: &[&str]) -> Request<()> {
        let mut request = Request::builder()
            .version(version)
            .uri(target)
            .body(())
            .unwrap();
        for host in hosts {
            request
                .headers_mut()
                .append(header::HOST, HeaderValue::from_str(host).unwrap());
        }
        request
    }

    #[test]
    fn one_authority_or_none_at_all() {
        let two = &mut request(Version::HTTP_11, "/", &["evil", "orders"]);
        assert_eq!(canonicalize(two), Err(Malformed::RepeatedHost));
        let two_h2 = &mut request(Version::HTTP_2, "/", &["evil", "orders"]);
        assert_eq!(canonicalize(two_h2), Err(Malformed::RepeatedHost));
        let none = &mut request(Version::HTTP_11, "/", &[]);
        assert_eq!(canonicalize(none), Err(Malformed::MissingHost));
        // HTTP/1.0 needs no Host; HTTP/2 may carry no authority.
        assert_eq!(
            canonicalize(&mut request(Version::HTTP_10, "/", &[])),
            Ok(())
        );
        assert_eq!(
            canonicalize(&mut request(Version::HTTP_2, "/", &[])),
            Ok(())
        );
    }

    #[test]
    fn the_target_authority_wins_over_host() {
        let absolute = &mut request(Version::HTTP_11, "http://orders:8080/x", &["evil"]);
        assert_eq!(canonicalize(absolute), Ok(()));
        assert_eq!(absolute.headers()[header::HOST], "orders:8080");
        assert_eq!(absolute.headers().get_all(header::HOST).iter().count(), 1);
    }

    #[test]
    fn authorities_that_could_be_read_two_ways_are_refused() {
        let cases: &[(&str, Malformed)] = &[
            ("x@evil", Malformed::Userinfo),
            ("ev%69l", Malformed::InvalidHost),
            ("evil orders", Malformed::InvalidHost),
            ("evil,orders", Malformed::InvalidHost),
            ("", Malformed::InvalidHost),
            (":80", Malformed::InvalidHost),
            ("evil:", Malformed::InvalidPort),
            ("evil:65536", Malformed::InvalidPort),
            ("evil:8a", Malformed::InvalidPort),
            ("evil:80:80", Malformed::InvalidHost),
            ("[fd00::1", Malformed::InvalidHost),
            ("[fd00::1]x", Malformed::InvalidHost),
            ("[]", Malformed::InvalidHost),
            ("[fd00::g]", Malformed::InvalidHost),
            ("évil", Malformed::InvalidHost),
        ];
        for (authority, expected) in cases {
            assert_eq!(
                check_authority(authority.as_bytes()),
                Err(expected.clone()),
                "{authority:?}"
            );
        }
        for fine in [
            "orders",
            "Orders.shop.svc.cluster.local.",
            "orders:8080",
            "10.0.0.1:80",
            "[fd00::1]",
            "[FD00::1]:80",
            "[::ffff:10.0.0.1]:443",
            "a_b-c~d",
        ] {
            assert_eq!(check_authority(fine.as_bytes()), Ok(()), "{fine:?}");
        }
    }

    #[test]
    fn userinfo_in_an_absolute_target_is_refused() {
        let absolute = &mut request(Version::HTTP_11, "http://x@evil/", &[]);
        assert_eq!(canonicalize(absolute), Err(Malformed::Userinfo));
    }

    #[test]
    fn asterisk_only_for_options() {
        let mut get = request(Version::HTTP_11, "*", &["orders"]);
        assert_eq!(canonicalize(&mut get), Err(Malformed::AsteriskTarget));
        let mut options = request(Version::HTTP_11, "*", &["orders"]);
        *options.method_mut() = Method::OPTIONS;
        assert_eq!(canonicalize(&mut options), Ok(()));
        assert_eq!(options.uri().path(), "*");
    }

    #[test]
    fn the_path_is_normalized_and_the_query_kept() {
        let mut dotted = request(Version::HTTP_11, "/a/../admin//x?q=1&r=/..", &["orders"]);
        assert_eq!(canonicalize(&mut dotted), Ok(()));
        assert_eq!(dotted.uri().path(), "/admin/x");
        assert_eq!(dotted.uri().query(), Some("q=1&r=/.."));
        let mut broken = request(Version::HTTP_11, "/%%36%31dmin", &["orders"]);
        assert!(matches!(canonicalize(&mut broken), Err(Malformed::Path(_))));
    }

    #[test]
    fn what_is_refused_with_400_and_why() {
        let cases: &[(Version, &str, &[&str], Malformed)] = &[
            (Version::HTTP_11, "/", &["a", "a"], Malformed::RepeatedHost),
            (Version::HTTP_11, "/", &[], Malformed::MissingHost),
            (Version::HTTP_11, "/", &["x@orders"], Malformed::Userinfo),
            (
                Version::HTTP_11,
                "/",
                &["orders:http"],
                Malformed::InvalidPort,
            ),
            (
                Version::HTTP_2,
                "/",
                &["orders:99999"],
                Malformed::InvalidPort,
            ),
            (
                Version::HTTP_11,
                "*",
                &["orders"],
                Malformed::AsteriskTarget,
            ),
            (
                Version::HTTP_11,
                "/admin%2Fsecret",
                &["orders"],
                Malformed::Path(InvalidPath::EncodedSeparator { at: 6, byte: b'/' }),
            ),
            (
                Version::HTTP_2,
                "http://orders/a%5cb",
                &[],
                Malformed::Path(InvalidPath::EncodedSeparator { at: 2, byte: b'\\' }),
            ),
            (
                Version::HTTP_11,
                "/a%00",
                &["orders"],
                Malformed::Path(InvalidPath::ControlCharacter { at: 2, byte: 0 }),
            ),
            (
                Version::HTTP_11,
                "/%%36%31dmin",
                &["orders"],
                Malformed::Path(InvalidPath::MalformedEscape(1)),
            ),
        ];
        for (version, target, hosts, expected) in cases {
            let mut refused = request(*version, target, hosts);
            assert_eq!(
                canonicalize(&mut refused),
                Err(expected.clone()),
                "{version:?} {target} {hosts:?}"
            );
        }
    }

    #[test]
    fn every_spelling_of_a_path_is_forwarded_in_one_form() {
        for (target, forwarded) in [
            ("/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("//admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/%2e%2E/admin", "/admin"),
            ("/./a/b/..", "/a/"),
            ("/%c3%a9//x", "/%C3%A9/x"),
            ("/a%3bb?x=%2F", "/a%3Bb?x=%2F"),
        ] {
            let mut spelled = request(Version::HTTP_11, target, &["orders"]);
            assert_eq!(canonicalize(&mut spelled), Ok(()), "{target}");
            let path_and_query = spelled.uri().path_and_query().map(|p| p.as_str());
            assert_eq!(path_and_query, Some(forwarded), "{target}");
        }
        // An already-normal target is left exactly as it came.
        let mut normal = request(Version::HTTP_2, "http://orders:8080/api/v1?q=1", &[]);
        let before = normal.uri().clone();
        assert_eq!(canonicalize(&mut normal), Ok(()));
        assert_eq!(normal.uri(), &before);
        // CONNECT names an authority only.
        let mut connect = request(Version::HTTP_11, "orders:443", &["orders:443"]);
        *connect.method_mut() = Method::CONNECT;
        assert_eq!(canonicalize(&mut connect), Ok(()));
    }

    #[test]
    fn policy_reads_the_authority_the_application_receives() {
        // HTTP/2: the `:authority` wins and the `Host` field is made to agree.
        let mut h2 = request(Version::HTTP_2, "http://orders.shop/x", &["admin.shop"]);
        assert_eq!(canonicalize(&mut h2), Ok(()));
        assert_eq!(host(&h2), "orders.shop");
        assert_eq!(header(&h2, &header::HOST), Some("orders.shop"));
        assert_eq!(h2.headers()[header::HOST], "orders.shop");
        // HTTP/2 without a `Host` field: conditions on `host` read the authority.
        let mut alone = request(Version::HTTP_2, "http://Orders.Shop:8080/x", &[]);
        assert_eq!(canonicalize(&mut alone), Ok(()));
        assert_eq!(header(&alone, &header::HOST), Some("Orders.Shop:8080"));
        assert!(alone.headers().get(header::HOST).is_none());
        // Origin form: the one `Host` field.
        let mut origin = request(Version::HTTP_11, "/x", &["orders.shop:80"]);
        assert_eq!(canonicalize(&mut origin), Ok(()));
        assert_eq!(host(&origin), "orders.shop:80");
        // HTTP/1.0 may name no host at all.
        let mut old = request(Version::HTTP_10, "/x", &[]);
        assert_eq!(canonicalize(&mut old), Ok(()));
        assert_eq!(host(&old), "");
        assert_eq!(header(&old, &header::HOST), None);
    }

    #[test]
    fn conditions_read_utf8_values_and_nothing_else() {
        let mut request = request(Version::HTTP_11, "/", &["orders"]);
        let name = HeaderName::from_static("x-user");
        let utf8 = HeaderValue::from_bytes("José".as_bytes()).unwrap();
        request.headers_mut().insert(name.clone(), utf8);
        assert_eq!(header(&request, &name), Some("José"));
        let invalid = HeaderValue::from_bytes(b"\xff\xfe").unwrap();
        request.headers_mut().insert(name.clone(), invalid);
        assert_eq!(header(&request, &name), None);
        assert_eq!(header(&request, &HeaderName::from_static("x-absent")), None);
    }
}
