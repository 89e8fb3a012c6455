//! Join tokens: how a workload outside Kubernetes proves its identity the first time.
//!
//! A token names one namespace and service account, expires, and is signed with
//! HMAC-SHA256 under a key that never leaves the control plane's state directory. It is
//! `tessera-join.v1.<payload>.<mac>`, both parts base64url; the payload is JSON. Only the
//! control plane verifies its own tokens, so a symmetric key is all it needs, and a token
//! from another control plane (another key) fails like a tampered one.
//!
//! A token is single-use by default (as SPIRE's join tokens are): the first certificate
//! issued with it consumes it, so a token copied from a log, a shell history or a disk
//! image is worth nothing once its workload has joined. `--reusable` marks a token, inside
//! the signed payload, as usable until it expires — for a fleet or an autoscaling group
//! that boots many instances from one token. Consumed token ids are appended (and
//! fsync'd) to `used-join-tokens` in the state directory before the certificate is
//! returned, loaded at start, and forgotten once the token has expired, so memory and
//! the file are bounded by the tokens issued within one token lifetime (at most 30 days).
//!
//! Limitation: each control plane keeps the consumed set it loaded at start plus what
//! it consumed itself. Two replicas sharing one state directory do not see each other's
//! consumptions until they restart, so a single-use token can be used once per replica
//! in between. Run one control plane per state directory (as `tessera control-plane`
//! does), or use Kubernetes service-account tokens where there are replicas.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use tessera_mesh::SpiffeId;

use crate::ca::{CaError, file_error};

const PREFIX: &str = "tessera-join.v1.";
const KEY_FILE: &str = "join-token.key";
/// Ids of consumed single-use tokens, one `<id> <expiry>` line each.
const USED_FILE: &str = "used-join-tokens";
/// The longest-lived token we hand out; tokens bootstrap, certificates do the rest.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longer inputs are refused before any parsing.
const MAX_TOKEN_LEN: usize = 2048;
/// Token ids are the base64url of 12 random bytes; anything else was not made here.
const MAX_TOKEN_ID_LEN: usize = 64;
/// The used-token file is rewritten without expired lines once it holds this many
/// more lines than live entries.
const COMPACT_SLACK: usize = if cfg!(test) { 8 } else { 1024 };

/// Why a token is refused. Deliberately coarse on the wire; precise in the log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenRefusal {
    #[error("join token is malformed")]
    Malformed,
    #[error("join token signature does not verify (tampered, or issued by another control plane)")]
    BadSignature,
    #[error("join token expired at {0}")]
    Expired(String),
    #[error("join token is for trust domain {0:?}, not this mesh's")]
    ForeignTrustDomain(String),
    #[error(
        "join token already used: tokens are single-use; create a new one, or one with --reusable for a fleet"
    )]
    AlreadyUsed,
}

/// Why a single-use token could not be consumed.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Refused(#[from] TokenRefusal),
    /// Not recorded durably, so not consumed: the certificate must not be handed out.
    #[error("cannot record the join token as used: {0}")]
    Record(#[from] CaError),
}

/// How often a token may be presented for a first certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// Once: the first certificate issued with it consumes it.
    SingleUse,
    /// Any number of times until it expires (fleets, autoscaling groups).
    Reusable,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    /// SPIFFE ID the token entitles to.
    sub: String,
    /// Expiry, Unix seconds.
    exp: u64,
    /// Issued at, Unix seconds.
    iat: u64,
    /// Random nonce so two tokens for one identity differ; the id a consumed token is
    /// remembered by.
    jti: String,
    /// Usable until expiry rather than once. Absent (single-use) in tokens made before
    /// single use existed; inside the MAC, so a holder cannot add it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    reusable: bool,
}

/// A token whose signature, expiry and trust domain checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    identity: SpiffeId,
    id: String,
    expires: u64,
    usage: TokenUse,
}

impl VerifiedToken {
    /// The identity the token entitles to.
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn usage(&self) -> TokenUse {
        self.usage
    }
}

/// Signs and verifies join tokens, and remembers which single-use ones were consumed.
pub struct TokenAuthority {
    key: hmac::Key,
    used: UsedTokens,
}

impl TokenAuthority {
    /// Loads the signing key and the consumed-token record from the state directory,
    /// creating the key on first use. For the control plane; `tessera token create` uses
    /// [`create_in`], which leaves the record alone.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, CaError> {
        Ok(Self {
            key: load_or_create_key(state_dir)?,
            used: UsedTokens::load(&state_dir.join(USED_FILE), unix_now())?,
        })
    }

    /// Creates a token for `identity`, valid for `ttl`.
    pub fn create(&self, identity: &SpiffeId, ttl: Duration, usage: TokenUse) -> String {
        sign(&self.key, identity, ttl, usage)
    }

    /// Checks a token and returns what it proves. A consumed single-use token is refused
    /// here already; [`TokenAuthority::consume`] is what makes the use count.
    pub fn verify(&self, token: &str, trust_domain: &str) -> Result<VerifiedToken, TokenRefusal> {
        let verified = verify_signed(&self.key, token, trust_domain, unix_now())?;
        if verified.usage == TokenUse::SingleUse && self.used.contains(&verified.id) {
            return Err(TokenRefusal::AlreadyUsed);
        }
        Ok(verified)
    }

    /// Marks a single-use token used, durably, before the certificate it earned is handed
    /// out; refuses it if another request consumed it first. Blocks on a file write and
    /// fsync: call it off the async runtime. Reusable tokens pass untouched.
    pub fn consume(&self, token: &VerifiedToken) -> Result<(), ConsumeError> {
        if token.usage == TokenUse::Reusable {
            return Ok(());
        }
        self.used.consume(&token.id, token.expires, unix_now())
    }
}

/// Creates a token with the key in `state_dir` (creating the key on first use), as
/// `tessera token create` does; a running control plane verifies it.
pub fn create_in(
    state_dir: &Path,
    identity: &SpiffeId,
    ttl: Duration,
    usage: TokenUse,
) -> Result<String, CaError> {
    Ok(sign(&load_or_create_key(state_dir)?, identity, ttl, usage))
}

fn load_or_create_key(state_dir: &Path) -> Result<hmac::Key, CaError> {
    let path = state_dir.join(KEY_FILE);
    if !path.exists() {
        let secret: [u8; 32] = rand::random();
        crate::state::write_private(&path, URL_SAFE_NO_PAD.encode(secret).as_bytes())?;
    }
    let encoded = crate::state::read_private(&path)?;
    let secret = URL_SAFE_NO_PAD
        .decode(encoded.trim())
        .map_err(|_| file_error(&path, "not a base64url key"))?;
    if secret.len() < 32 {
        return Err(file_error(&path, "key shorter than 32 bytes"));
    }
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &secret))
}

fn sign(key: &hmac::Key, identity: &SpiffeId, ttl: Duration, usage: TokenUse) -> String {
    let now = unix_now();
    let claims = Claims {
        sub: identity.to_string(),
        iat: now,
        exp: now + ttl.as_secs(),
        jti: URL_SAFE_NO_PAD.encode(rand::random::<[u8; 12]>()),
        reusable: usage == TokenUse::Reusable,
    };
    // Serializing a struct of strings, integers and a bool cannot fail.
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
    let mac = hmac::sign(key, payload.as_bytes());
    format!("{PREFIX}{payload}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
}

fn verify_signed(
    key: &hmac::Key,
    token: &str,
    trust_domain: &str,
    now: u64,
) -> Result<VerifiedToken, TokenRefusal> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenRefusal::Malformed);
    }
    let body = token.strip_prefix(PREFIX).ok_or(TokenRefusal::Malformed)?;
    let (payload, mac) = body.split_once('.').ok_or(TokenRefusal::Malformed)?;
    let mac = URL_SAFE_NO_PAD
        .decode(mac)
        .map_err(|_| TokenRefusal::Malformed)?;
    // Constant-time comparison, before anything in the payload is trusted.
    hmac::verify(key, payload.as_bytes(), &mac).map_err(|_| TokenRefusal::BadSignature)?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or(TokenRefusal::Malformed)?;
    if claims.exp <= now {
        return Err(TokenRefusal::Expired(rfc3339(claims.exp)));
    }
    if !is_token_id(&claims.jti) {
        return Err(TokenRefusal::Malformed);
    }
    let identity: SpiffeId = claims.sub.parse().map_err(|_| TokenRefusal::Malformed)?;
    if identity.trust_domain() != trust_domain {
        return Err(TokenRefusal::ForeignTrustDomain(
            identity.trust_domain().to_string(),
        ));
    }
    Ok(VerifiedToken {
        identity,
        id: claims.jti,
        expires: claims.exp,
        usage: if claims.reusable {
            TokenUse::Reusable
        } else {
            TokenUse::SingleUse
        },
    })
}

/// A token id as `sign` makes them: base64url, so it fits one line of the record.
fn is_token_id(id: &str) -> bool {
    (1..=MAX_TOKEN_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Consumed single-use tokens: in memory for lookups, in an append-only file for
/// restarts. Entries leave memory once their token has expired (an expired token is
/// refused anyway), and the file is rewritten without them at start and when dead lines
/// pile up.
struct UsedTokens {
    path: PathBuf,
    /// Never held across I/O, so a lookup on the async runtime never waits on a disk.
    live: Mutex<Live>,
    /// Held while appending or rewriting the file (off the async runtime only).
    record: Mutex<Record>,
}

struct Live {
    /// Token id → expiry, Unix seconds.
    expiries: HashMap<String, u64>,
    /// The earliest expiry in `expiries`: nothing to prune before then.
    next_expiry: u64,
}

struct Record {
    file: File,
    /// Lines in the file, live or not: when to compact.
    lines: usize,
    /// A write failed and may have left a partial line, which the next line would
    /// run into: rewrite the file whole before anything else.
    torn: bool,
}

impl Live {
    fn prune(&mut self, now: u64) {
        if now < self.next_expiry {
            return;
        }
        self.expiries.retain(|_, expires| *expires > now);
        self.next_expiry = self.expiries.values().copied().min().unwrap_or(u64::MAX);
    }
}

impl UsedTokens {
    /// Reads the record (skipping expired and unreadable lines — a line torn by a crash
    /// was never acknowledged), then rewrites it with the live entries only.
    fn load(path: &Path, now: u64) -> Result<Self, CaError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(file_error(path, e)),
        };
        let mut expiries = HashMap::new();
        for line in text.lines() {
            let Some((id, expires)) = line.split_once(' ') else {
                continue;
            };
            match expires.parse::<u64>() {
                Ok(expires) if expires > now && is_token_id(id) => {
                    expiries.insert(id.to_string(), expires);
                }
                _ => {}
            }
        }
        let live = Live {
            next_expiry: expiries.values().copied().min().unwrap_or(u64::MAX),
            expiries,
        };
        let record = Record {
            file: rewrite(path, &live.expiries)?,
            lines: live.expiries.len(),
            torn: false,
        };
        Ok(Self {
            path: path.to_path_buf(),
            live: Mutex::new(live),
            record: Mutex::new(record),
        })
    }

    fn contains(&self, id: &str) -> bool {
        lock(&self.live).expiries.contains_key(id)
    }

    #[cfg(test)]
    fn contains_none(&self) -> bool {
        lock(&self.live).expiries.is_empty()
    }

    fn consume(&self, id: &str, expires: u64, now: u64) -> Result<(), ConsumeError> {
        {
            // Reserve first: of two requests racing with one token, exactly one wins.
            let mut live = lock(&self.live);
            live.prune(now);
            if live.expiries.contains_key(id) {
                return Err(TokenRefusal::AlreadyUsed.into());
            }
            live.expiries.insert(id.to_string(), expires);
            live.next_expiry = live.next_expiry.min(expires);
        }
        let recorded = self.append(id, expires);
        if recorded.is_err() {
            // Not durable, so not consumed: the caller refuses and the holder may retry.
            lock(&self.live).expiries.remove(id);
        }
        recorded.map_err(ConsumeError::Record)
    }

    fn append(&self, id: &str, expires: u64) -> Result<(), CaError> {
        let mut record = lock(&self.record);
        let live_len = lock(&self.live).expiries.len();
        if record.torn || record.lines >= 2 * live_len + COMPACT_SLACK {
            // The live set already holds `id`: the rewrite records it.
            let live = lock(&self.live).expiries.clone();
            record.file = rewrite(&self.path, &live)?;
            record.lines = live.len();
            record.torn = false;
            return Ok(());
        }
        // One write of one short line to an O_APPEND file: whole, or torn at the end.
        let line = format!("{id} {expires}\n");
        let written = record
            .file
            .write_all(line.as_bytes())
            .and_then(|()| record.file.sync_data());
        if let Err(error) = written {
            record.torn = true;
            return Err(file_error(&self.path, error));
        }
        record.lines += 1;
        Ok(())
    }
}

/// Replaces the record with `entries` (atomically, fsync'd) and opens it for appending.
fn rewrite(path: &Path, entries: &HashMap<String, u64>) -> Result<File, CaError> {
    let contents: String = entries
        .iter()
        .map(|(id, expires)| format!("{id} {expires}\n"))
        .collect();
    crate::state::write_private(path, contents.as_bytes())?;
    if let Some(dir) = path.parent() {
        // The rename is durable only once the directory is.
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| file_error(dir, e))?;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_error(path, e))
}

/// A poisoned lock only means another request panicked mid-update of a map of plain
/// values; the map is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn rfc3339(unix_seconds: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix_seconds.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> PathBuf {
        std::env::temp_dir().join(format!("tessera-token-{}", rand::random::<u64>()))
    }

    fn authority() -> TokenAuthority {
        TokenAuthority::load_or_create(&tempdir()).unwrap()
    }

    fn frontend() -> SpiffeId {
        "spiffe://cluster.local/ns/shop/sa/frontend"
            .parse()
            .unwrap()
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn round_trip() {
        let authority = authority();
        for usage in [TokenUse::SingleUse, TokenUse::Reusable] {
            let token = authority.create(&frontend(), MINUTE, usage);
            let verified = authority.verify(&token, "cluster.local").unwrap();
            assert_eq!(verified.identity(), &frontend());
            assert_eq!(verified.usage(), usage);
        }
    }

    #[test]
    fn refusals() {
        let authority = authority();
        let token = authority.create(&frontend(), MINUTE, TokenUse::SingleUse);
        assert_eq!(
            authority.verify(&token, "other.domain").unwrap_err(),
            TokenRefusal::ForeignTrustDomain("cluster.local".into())
        );
        let expired = authority.create(&frontend(), Duration::ZERO, TokenUse::Reusable);
        assert!(matches!(
            authority.verify(&expired, "cluster.local"),
            Err(TokenRefusal::Expired(_))
        ));
        let foreign = self::authority().create(&frontend(), MINUTE, TokenUse::SingleUse);
        assert_eq!(
            authority.verify(&foreign, "cluster.local").unwrap_err(),
            TokenRefusal::BadSignature
        );
        // Swap the payload for one naming another identity, keep the MAC.
        let other = authority.create(
            &"spiffe://cluster.local/ns/shop/sa/admin".parse().unwrap(),
            MINUTE,
            TokenUse::SingleUse,
        );
        let mac = token.rsplit_once('.').unwrap().1;
        let forged = format!("{}.{mac}", other.rsplit_once('.').unwrap().0);
        assert_eq!(
            authority.verify(&forged, "cluster.local").unwrap_err(),
            TokenRefusal::BadSignature
        );
        for garbage in ["", "tessera-join.v1.", "tessera-join.v1.a.b", "x.y.z"] {
            assert!(authority.verify(garbage, "cluster.local").is_err());
        }
        assert_eq!(
            authority
                .verify(&"a".repeat(5000), "cluster.local")
                .unwrap_err(),
            TokenRefusal::Malformed
        );
    }

    #[test]
    fn a_token_is_single_use_by_default() {
        let authority = authority();
        let token = authority.create(&frontend(), MINUTE, TokenUse::SingleUse);
        let first = authority.verify(&token, "cluster.local").unwrap();
        // Verifying alone does not use it up (a request refused for its CSR keeps it).
        let again = authority.verify(&token, "cluster.local").unwrap();
        authority.consume(&first).unwrap();
        assert_eq!(
            authority.verify(&token, "cluster.local").unwrap_err(),
            TokenRefusal::AlreadyUsed
        );
        // A request that verified before the first one was issued loses the race.
        assert!(matches!(
            authority.consume(&again),
            Err(ConsumeError::Refused(TokenRefusal::AlreadyUsed))
        ));
        // Another token for the same identity is still good.
        let next = authority.create(&frontend(), MINUTE, TokenUse::SingleUse);
        authority
            .consume(&authority.verify(&next, "cluster.local").unwrap())
            .unwrap();
    }

    #[test]
    fn racing_requests_consume_a_token_once() {
        let authority = std::sync::Arc::new(authority());
        let token = authority.create(&frontend(), MINUTE, TokenUse::SingleUse);
        let verified = authority.verify(&token, "cluster.local").unwrap();
        let winners: usize = (0..8)
            .map(|_| {
                let (authority, verified) = (authority.clone(), verified.clone());
                std::thread::spawn(move || authority.consume(&verified).is_ok())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| usize::from(t.join().unwrap()))
            .sum();
        assert_eq!(winners, 1);
    }

    #[test]
    fn a_reusable_token_is_usable_until_it_expires() {
        let authority = authority();
        let token = authority.create(&frontend(), MINUTE, TokenUse::Reusable);
        for _ in 0..4 {
            let verified = authority.verify(&token, "cluster.local").unwrap();
            authority.consume(&verified).unwrap();
        }
        assert!(authority.used.contains_none());
    }

    #[test]
    fn the_holder_cannot_make_a_token_reusable() {
        let authority = authority();
        let token = authority.create(&frontend(), MINUTE, TokenUse::SingleUse);
        let (head, mac) = token.rsplit_once('.').unwrap();
        let payload = head.strip_prefix(PREFIX).unwrap();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        claims["reusable"] = true.into();
        let edited = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        assert_eq!(
            authority
                .verify(&format!("{PREFIX}{edited}.{mac}"), "cluster.local")
                .unwrap_err(),
            TokenRefusal::BadSignature
        );
    }

    #[test]
    fn consumed_tokens_survive_a_restart() {
        let dir = tempdir();
        let authority = TokenAuthority::load_or_create(&dir).unwrap();
        let used = authority.create(&frontend(), MINUTE, TokenUse::SingleUse);
        let unused = authority.create(&frontend(), MINUTE, TokenUse::SingleUse);
        authority
            .consume(&authority.verify(&used, "cluster.local").unwrap())
            .unwrap();
        drop(authority);

        let restarted = TokenAuthority::load_or_create(&dir).unwrap();
        assert_eq!(
            restarted.verify(&used, "cluster.local").unwrap_err(),
            TokenRefusal::AlreadyUsed
        );
        restarted.verify(&unused, "cluster.local").unwrap();
        // The record holds ids and expiries, never a token.
        let record = std::fs::read_to_string(dir.join(USED_FILE)).unwrap();
        assert_eq!(record.lines().count(), 1, "{record}");
        assert!(!record.contains(&used) && !record.contains(PREFIX));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(USED_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn expired_entries_are_forgotten_in_memory_and_on_disk() {
        let path = tempdir().join(USED_FILE);
        let used = UsedTokens::load(&path, 1_000).unwrap();
        used.consume("early", 1_100, 1_000).unwrap();
        used.consume("late", 5_000, 1_000).unwrap();
        assert!(used.contains("early") && used.contains("late"));
        // Once "early" has expired, the next consumption drops it.
        used.consume("later", 6_000, 1_200).unwrap();
        assert!(!used.contains("early"));
        assert_eq!(lock(&used.live).expiries.len(), 2);
        drop(used);

        // A torn last line (a crash mid-write, never acknowledged) and junk are skipped.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"not a line\nbad id! 9000\ntorn 9000")
            .unwrap();
        let reloaded = UsedTokens::load(&path, 5_500).unwrap();
        assert!(!reloaded.contains("late") && reloaded.contains("later"));
        assert_eq!(lock(&reloaded.live).expiries.len(), 2, "later, torn");
        // The reload rewrote the file without the expired lines.
        let record = std::fs::read_to_string(&path).unwrap();
        assert!(!record.contains("early") && !record.contains("late "));
    }

    #[test]
    fn the_record_is_compacted_when_dead_lines_pile_up() {
        let path = tempdir().join(USED_FILE);
        let used = UsedTokens::load(&path, 0).unwrap();
        // Each token expires before the next is consumed: one live entry at a time.
        for n in 0..100u64 {
            used.consume(&format!("t{n}"), 10 * n + 5, 10 * n).unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(
            lines <= 2 + COMPACT_SLACK + 1,
            "{lines} lines for 1 live entry"
        );
        assert_eq!(lock(&used.live).expiries.len(), 1);
        // And what is on disk is still complete.
        let reloaded = UsedTokens::load(&path, 990).unwrap();
        assert!(reloaded.contains("t99"));
    }
}
