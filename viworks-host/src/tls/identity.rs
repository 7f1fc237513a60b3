//! What an accepted connection proves: the agent id its client certificate names, and the
//! channel binding both ends derive from the TLS session (RFC 9266 `tls-exporter`).

use viworks_core::auth::ChannelBinding;
use viworks_core::wire::AgentId;

use super::TlsError;

/// Most of a malformed common name worth putting in a log line.
const MAX_REPORTED_NAME: usize = 160;

/// The agent id named by the subject common name of the client's leaf certificate.
///
/// Call it after the handshake of the agent endpoint, whose verifier has already checked the
/// chain, so the name is the CA's word. Fails if there is no peer certificate, the subject has
/// no common name or more than one, or the name is not a valid [`AgentId`]. The caller must
/// still compare it with the id the agent claims in its HELLO.
pub fn agent_identity(conn: &rustls::ServerConnection) -> Result<AgentId, TlsError> {
    let leaf = conn.peer_certificates().and_then(|chain| chain.first()).ok_or(TlsError::NoPeerCertificate)?;
    agent_id_of_certificate(leaf.as_ref())
}

fn agent_id_of_certificate(der: &[u8]) -> Result<AgentId, TlsError> {
    let bad = |reason: &str| TlsError::BadPeerCertificate { reason: reason.into() };
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| bad("not a DER X.509 certificate"))?;
    let mut names = cert.subject().iter_common_name();
    let name = names.next().ok_or_else(|| bad("the subject has no common name"))?;
    if names.next().is_some() {
        return Err(bad("the subject has more than one common name"));
    }
    let text = name.as_str().map_err(|_| bad("the subject common name is not a UTF-8 or ASCII string"))?;
    AgentId::new(text)
        .map_err(|source| TlsError::BadAgentId { common_name: text.chars().take(MAX_REPORTED_NAME).collect(), source })
}

/// The RFC 9266 channel binding of an accepted connection, as the host side computes it.
/// Fails before the handshake completes, and on anything but TLS 1.3.
pub fn channel_binding_server(conn: &rustls::ServerConnection) -> Result<ChannelBinding, TlsError> {
    channel_binding(conn)
}

/// The RFC 9266 channel binding of an established connection, as the agent side computes it;
/// equal to the host's [`channel_binding_server`] on the same connection and different on any
/// other. Fails before the handshake completes, and on anything but TLS 1.3.
pub fn channel_binding_client(conn: &rustls::ClientConnection) -> Result<ChannelBinding, TlsError> {
    channel_binding(conn)
}

fn channel_binding<Data>(conn: &rustls::ConnectionCommon<Data>) -> Result<ChannelBinding, TlsError> {
    viworks_gateway::tls::channel_binding(conn).map_err(|e| TlsError::ChannelBinding { reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair};
    use rustls_pki_types::CertificateDer;

    use super::*;
    use crate::tls::Validity;
    use crate::tls::test_support::{self, fixture};

    #[tokio::test]
    async fn the_agent_id_reads_back_and_bindings_agree_per_connection_and_differ_across() {
        let (_dir, pki) = fixture();
        let agent = AgentId::new("gw-fra-01.example_2").expect("id");
        let issued = pki.issue_agent(&agent, Validity::agent_default()).expect("issue");

        let first = test_support::connect_agent(&pki, &issued).await;
        let (server, client) = (first.server.expect("accepted"), first.client.expect("connected"));
        assert_eq!(server.identity, agent);
        assert_eq!(server.binding, client.binding, "both ends derive the same binding");
        assert_ne!(server.binding, ChannelBinding::NONE);

        let second = test_support::connect_agent(&pki, &issued).await;
        let (server2, client2) = (second.server.expect("accepted"), second.client.expect("connected"));
        assert_eq!(server2.binding, client2.binding);
        assert_ne!(server2.binding, server.binding, "another connection, another binding");
    }

    #[tokio::test]
    async fn a_resumed_session_keeps_the_identity_and_gets_a_fresh_binding() {
        let (_dir, pki) = fixture();
        let agent = AgentId::new("gw-resume").expect("id");
        let issued = pki.issue_agent(&agent, Validity::agent_default()).expect("issue");
        let server = crate::tls::agent_server_config(&pki).expect("server");
        let (client, _report) = test_support::client_config(&pki, &issued);

        let (s1, c1) = test_support::handshake(server.clone(), client.clone()).await;
        let (mut s1, mut c1) = (s1.expect("accepted"), c1.expect("connected"));
        // Tickets are sent after the handshake; let the client read them.
        test_support::exchange(&mut s1, &mut c1).await;
        let first = channel_binding_server(s1.get_ref().1).expect("binding");

        let (s2, c2) = test_support::handshake(server, client).await;
        let (s2, c2) = (s2.expect("accepted"), c2.expect("connected"));
        let conn = s2.get_ref().1;
        assert!(matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed)), "{:?}", conn.handshake_kind());
        assert_eq!(agent_identity(conn).expect("identity"), agent);
        let second = channel_binding_server(conn).expect("binding");
        assert_eq!(second, channel_binding_client(c2.get_ref().1).expect("binding"));
        assert_ne!(second, first);
    }

    fn certificate_with(pki: &crate::tls::Pki, names: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (i, name) in names.iter().enumerate() {
            let ty = if i == 0 { DnType::CommonName } else { DnType::CustomDnType(vec![2, 5, 4, 3]) };
            params.distinguished_name.push(ty, *name);
        }
        pki.sign(&params, &key).der().to_vec()
    }

    #[test]
    fn common_names_that_are_not_agent_ids_are_refused() {
        let (_dir, pki) = fixture();
        assert!(matches!(
            agent_id_of_certificate(&certificate_with(&pki, &["bad id"])),
            Err(TlsError::BadAgentId { common_name, .. }) if common_name == "bad id"
        ));
        assert!(matches!(
            agent_id_of_certificate(&certificate_with(&pki, &[])),
            Err(TlsError::BadPeerCertificate { .. })
        ));
        assert!(matches!(
            agent_id_of_certificate(&certificate_with(&pki, &["a", "b"])),
            Err(TlsError::BadPeerCertificate { .. })
        ));
        assert!(matches!(agent_id_of_certificate(b"junk"), Err(TlsError::BadPeerCertificate { .. })));
        let ok = certificate_with(&pki, &["gw-1"]);
        assert_eq!(agent_id_of_certificate(CertificateDer::from(ok).as_ref()).expect("id").as_str(), "gw-1");
    }
}
