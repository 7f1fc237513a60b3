//! Key derivation. All keys are 32 bytes; each is used for one direction of one purpose.
//!
//! ```text
//! agent_key          = derive_key("viworks v1 agent key",               master_key || agent_id)
//! hello key          = derive_key("viworks v1 handshake agent-to-host", agent_key || channel_binding)
//! welcome/reject key = derive_key("viworks v1 handshake host-to-agent", agent_key || channel_binding)
//! agent→host key     = derive_key("viworks v1 session agent-to-host",   agent_key || agent_nonce || host_nonce)
//! host→agent key     = derive_key("viworks v1 session host-to-agent",   agent_key || agent_nonce || host_nonce)
//! anonymous REJECT   = derive_key("viworks v1 anonymous reject",        "")
//! ```
//! `derive_key` is BLAKE3's key derivation mode; `agent_id` is its UTF-8 bytes. Every other
//! input has a fixed length, so the concatenations are unambiguous.

use std::fmt;

use super::AuthError;
use crate::wire::{AgentId, Nonce};

const AGENT_KEY: &str = "viworks v1 agent key";
const HANDSHAKE_A2H: &str = "viworks v1 handshake agent-to-host";
const HANDSHAKE_H2A: &str = "viworks v1 handshake host-to-agent";
const SESSION_A2H: &str = "viworks v1 session agent-to-host";
const SESSION_H2A: &str = "viworks v1 session host-to-agent";
const ANONYMOUS_REJECT: &str = "viworks v1 anonymous reject";

fn derive(context: &str, parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(context);
    for part in parts {
        hasher.update(part);
    }
    *hasher.finalize().as_bytes()
}

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name([u8; 32]);

        impl $name {
            /// The key made of these bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                $name(bytes)
            }

            /// The key's bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The key as 64 lowercase hexadecimal digits, the form stored in files.
            pub fn to_hex(&self) -> String {
                crate::hex::encode32(&self.0)
            }

            /// Parses the form written by `to_hex`.
            pub fn from_hex(s: &str) -> Result<Self, AuthError> {
                crate::hex::decode32(s.trim()).map($name).ok_or(AuthError::BadKey)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }
    };
}

secret_key!(
    /// The host's root secret. Every agent key is derived from it; whoever holds it can
    /// impersonate any agent, so it never leaves the host.
    MasterKey
);
secret_key!(
    /// One agent's long-term key, derived from the master key and the agent id and handed to
    /// the agent at enrollment.
    AgentKey
);
secret_key!(
    /// A key that authenticates messages in one direction of one phase.
    MacKey
);

impl MacKey {
    /// The public key that seals a REJECT when the host cannot know the agent's key (unknown
    /// agent, unreadable or forged HELLO). Anyone can compute it, so such a REJECT proves
    /// nothing about its sender: agents treat it as a reason to back off, never as more.
    pub fn anonymous_reject() -> Self {
        MacKey(derive(ANONYMOUS_REJECT, &[]))
    }
}

impl AgentKey {
    /// The key of agent `agent_id` under `master`.
    pub fn derive(master: &MasterKey, agent_id: &AgentId) -> Self {
        AgentKey(derive(AGENT_KEY, &[&master.0, agent_id.as_str().as_bytes()]))
    }
}

/// 32 bytes both ends of one connection derive from their transport and no other connection
/// shares: over TLS, the exporter of RFC 9266 (label `EXPORTER-Channel-Binding`, no context,
/// 32 bytes). Mixed into the handshake keys, it makes a HELLO, a WELCOME or a REJECT useless on
/// any other connection, so none of them can be relayed between connections or host
/// instances. Transports without one use [`ChannelBinding::NONE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChannelBinding(pub [u8; 32]);

impl ChannelBinding {
    /// No binding: 32 zero bytes.
    pub const NONE: ChannelBinding = ChannelBinding([0; 32]);
}

/// The pair of keys for one phase of a session, one per direction, so that no message can be
/// reflected back to its sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectionKeys {
    /// Authenticates what the agent sends.
    pub agent_to_host: MacKey,
    /// Authenticates what the host sends.
    pub host_to_agent: MacKey,
}

impl DirectionKeys {
    /// The keys for HELLO (agent to host) and WELCOME or REJECT (host to agent) on the
    /// connection identified by `binding`.
    pub fn handshake(agent_key: &AgentKey, binding: &ChannelBinding) -> Self {
        let parts: [&[u8]; 2] = [&agent_key.0, &binding.0];
        DirectionKeys {
            agent_to_host: MacKey(derive(HANDSHAKE_A2H, &parts)),
            host_to_agent: MacKey(derive(HANDSHAKE_H2A, &parts)),
        }
    }

    /// The keys for everything after the handshake, fresh for every connection because both
    /// nonces are.
    pub fn session(agent_key: &AgentKey, agent_nonce: &Nonce, host_nonce: &Nonce) -> Self {
        let parts: [&[u8]; 3] = [&agent_key.0, &agent_nonce.0, &host_nonce.0];
        DirectionKeys {
            agent_to_host: MacKey(derive(SESSION_A2H, &parts)),
            host_to_agent: MacKey(derive(SESSION_H2A, &parts)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str) -> AgentId {
        AgentId::new(id).expect("valid id")
    }

    #[test]
    fn every_derived_key_is_distinct() {
        let master = MasterKey::from_bytes([7; 32]);
        let key = AgentKey::derive(&master, &agent("gw-1"));
        assert_ne!(key, AgentKey::derive(&master, &agent("gw-2")));
        assert_ne!(key, AgentKey::derive(&MasterKey::from_bytes([8; 32]), &agent("gw-1")));
        let handshake = DirectionKeys::handshake(&key, &ChannelBinding::NONE);
        assert_ne!(handshake, DirectionKeys::handshake(&key, &ChannelBinding([1; 32])));
        let session = DirectionKeys::session(&key, &Nonce([1; 32]), &Nonce([2; 32]));
        let swapped = DirectionKeys::session(&key, &Nonce([2; 32]), &Nonce([1; 32]));
        let all = [
            &handshake.agent_to_host,
            &handshake.host_to_agent,
            &session.agent_to_host,
            &session.host_to_agent,
            &swapped.agent_to_host,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn keys_round_trip_through_hex_and_never_print() {
        let key = AgentKey::derive(&MasterKey::from_bytes([1; 32]), &agent("a"));
        assert_eq!(AgentKey::from_hex(&key.to_hex()).expect("round trip"), key);
        assert!(matches!(AgentKey::from_hex("00"), Err(AuthError::BadKey)));
        assert_eq!(format!("{key:?}"), "AgentKey(..)");
    }
}
