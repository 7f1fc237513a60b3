//! The agent-side pinned client configuration (from `viworks_gateway::tls`) against this
//! host's real agent endpoint configuration: chain and pin must both hold.

use std::io;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use viworks_core::auth::{PinMatch, PinSet, SpkiPin};
use viworks_core::wire::AgentId;
use viworks_gateway::tls::TlsError;

use super::{PinReport, mismatched_pin, pinned_client_config};
use crate::tls::test_support::{self, fixture};
use crate::tls::{HandshakeFailure, IssuedAgent, Pki, Validity, agent_server_config};

fn issued(pki: &Pki) -> IssuedAgent {
    pki.issue_agent(&AgentId::new("gw-pin").expect("id"), Validity::agent_default()).expect("issue")
}

fn config(pki: &Pki, agent: &IssuedAgent, pins: PinSet) -> (Arc<ClientConfig>, PinReport) {
    pinned_client_config(pki.ca_pem().as_bytes(), agent.cert_pem.as_bytes(), agent.key_pem.as_bytes(), pins)
        .expect("client config")
}

/// The pin mismatch carried inside a failed connect, if that is why it failed.
fn mismatched_pin_of(err: &io::Error) -> Option<SpkiPin> {
    mismatched_pin(err.get_ref()?.downcast_ref::<rustls::Error>()?)
}

#[tokio::test]
async fn a_valid_chain_with_the_wrong_pin_is_refused() {
    let (_dir, pki) = fixture();
    let agent = issued(&pki);
    let wrong = PinSet { primary: SpkiPin::of_spki_der(b"someone else"), backup: None };
    let (client, report) = config(&pki, &agent, wrong);
    let (_, client) = test_support::handshake(agent_server_config(&pki).expect("server"), client).await;
    let err = client.expect_err("refused");
    assert_eq!(mismatched_pin_of(&err), Some(pki.host_pin()), "{err}");
    assert!(TlsError::PinMismatch { got: pki.host_pin() }.to_string().contains(&pki.host_pin().to_base64()));
    assert_eq!(report.last_match(), None);
}

#[tokio::test]
async fn the_primary_pin_is_reported_as_primary() {
    let (_dir, pki) = fixture();
    let agent = issued(&pki);
    let (client, report) = config(&pki, &agent, PinSet { primary: pki.host_pin(), backup: None });
    let (server, client) = test_support::handshake(agent_server_config(&pki).expect("server"), client).await;
    assert!(server.is_ok() && client.is_ok());
    assert_eq!(report.last_match(), Some(PinMatch::Primary));
}

#[tokio::test]
async fn the_backup_pin_is_accepted_and_reported() {
    let (_dir, pki) = fixture();
    let agent = issued(&pki);
    let pins = PinSet { primary: SpkiPin::of_spki_der(b"the next key"), backup: Some(pki.host_pin()) };
    let (client, report) = config(&pki, &agent, pins);
    let (server, client) = test_support::handshake(agent_server_config(&pki).expect("server"), client).await;
    assert!(server.is_ok());
    assert!(client.is_ok());
    assert_eq!(report.last_match(), Some(PinMatch::Backup));
}

#[tokio::test]
async fn the_right_pin_on_an_untrusted_chain_is_refused() {
    let (_dir, pki) = fixture();
    let (_other_dir, other) = fixture();
    let agent = issued(&pki);
    // Trust our CA, pin the other host's key: the other host's chain does not verify.
    let (client, report) = config(&pki, &agent, PinSet { primary: other.host_pin(), backup: None });
    let (_, client) = test_support::handshake(agent_server_config(&other).expect("server"), client).await;
    let err = client.expect_err("refused");
    assert_eq!(HandshakeFailure::classify(&err), HandshakeFailure::UnknownIssuer, "{err}");
    assert_eq!(report.last_match(), None);
}

#[tokio::test]
async fn a_name_outside_the_host_certificate_is_refused() {
    let (_dir, pki) = fixture();
    let agent = issued(&pki);
    let (client, _) = config(&pki, &agent, PinSet { primary: pki.host_pin(), backup: None });
    let name = ServerName::try_from("elsewhere.example").expect("name");
    let (_, client) =
        test_support::handshake_as(agent_server_config(&pki).expect("server"), client, name.to_owned()).await;
    assert!(client.is_err());
}

#[test]
fn malformed_inputs_name_what_is_wrong() {
    let (_dir, pki) = fixture();
    let agent = issued(&pki);
    let pins = PinSet { primary: pki.host_pin(), backup: None };
    let err = pinned_client_config(b"", agent.cert_pem.as_bytes(), agent.key_pem.as_bytes(), pins).expect_err("no CA");
    assert!(err.to_string().contains("CA certificate"), "{err}");
    let err =
        pinned_client_config(pki.ca_pem().as_bytes(), agent.cert_pem.as_bytes(), b"junk", pins).expect_err("no key");
    assert!(err.to_string().contains("client private key"), "{err}");
}
