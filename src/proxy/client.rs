//! Who a call's client is (`client_key`): the peer's IP, a request header's value, or the
//! verified mTLS identity, hashed. Worked out only when a call must queue, so calls that find
//! a free slot pay nothing for it.

use std::hash::{Hash, Hasher};

use http::HeaderMap;
use rustc_hash::FxHasher;

use super::Peer;
use crate::balance::ClientId;
use crate::config::{ClientKeyConfig, RateKey};

/// The client a call belongs to, under `key`.
pub(super) fn client_id(key: &ClientKeyConfig, peer: &Peer, headers: &HeaderMap) -> ClientId {
    let mut hasher = FxHasher::default();
    match key {
        ClientKeyConfig::PeerIp => peer_ip(peer, &mut hasher),
        // Calls without the header share one key.
        ClientKeyConfig::Header(name) => {
            headers.get(&name.0).map(|v| v.as_bytes()).hash(&mut hasher)
        }
        ClientKeyConfig::TlsIdentity => match peer.cert.as_ref() {
            Some(cert) => cert.identity().hash(&mut hasher),
            None => peer_ip(peer, &mut hasher),
        },
    }
    hasher.finish()
}

/// The bucket a call takes a rate-limit token from: its client's, its client's for its
/// method, or the route's one.
pub(super) fn rate_key(
    per: RateKey,
    key: &ClientKeyConfig,
    peer: &Peer,
    request: &http::request::Parts,
) -> u64 {
    match per {
        RateKey::Route => 0,
        RateKey::Client => client_id(key, peer, &request.headers),
        RateKey::ClientMethod => {
            let mut hasher = FxHasher::default();
            client_id(key, peer, &request.headers).hash(&mut hasher);
            request.uri.path().hash(&mut hasher);
            hasher.finish()
        }
    }
}

fn peer_ip(peer: &Peer, hasher: &mut FxHasher) {
    peer.addr.map(|addr| addr.ip()).hash(hasher);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RequestHeader;

    fn peer(addr: &str) -> Peer {
        Peer {
            addr: Some(addr.parse().unwrap()),
            ..Peer::default()
        }
    }

    #[test]
    fn the_key_names_the_client_not_the_connection() {
        let none = HeaderMap::new();
        let by_ip = ClientKeyConfig::PeerIp;
        let one = client_id(&by_ip, &peer("10.0.0.1:1000"), &none);
        assert_eq!(one, client_id(&by_ip, &peer("10.0.0.1:2000"), &none));
        assert_ne!(one, client_id(&by_ip, &peer("10.0.0.2:1000"), &none));
        let by_header =
            ClientKeyConfig::Header(RequestHeader(http::HeaderName::from_static("x-tenant")));
        let mut tenant = HeaderMap::new();
        tenant.insert("x-tenant", http::HeaderValue::from_static("a"));
        let a = client_id(&by_header, &peer("10.0.0.1:1"), &tenant);
        assert_eq!(a, client_id(&by_header, &peer("10.0.0.2:1"), &tenant));
        assert_ne!(a, client_id(&by_header, &peer("10.0.0.1:1"), &none));
        // Without a certificate, the identity is the IP.
        let by_tls = ClientKeyConfig::TlsIdentity;
        assert_eq!(
            client_id(&by_tls, &peer("10.0.0.1:1"), &none),
            client_id(&by_tls, &peer("10.0.0.1:2"), &none)
        );
    }
}
