//! An agent session fed any script of messages, timeouts and polls stays within its rules:
//! what it sends opens under the session key with consecutive sequence numbers, it ends at
//! most once and says so last, and silence past the liveness timeout always ends it.
//!
//! The first byte chooses the way in. Even: a real host admits the agent and the script
//! drives the established session. Odd: the host's answer to the HELLO is the script's first
//! chunk, sealed (as `seq` 0 answering the agent's nonce) under the handshake key, under the
//! anonymous REJECT key, or not at all, as the second byte says.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use viworks_core::Timestamp;
use viworks_core::auth::{ChannelBinding, DirectionKeys, MacKey};
use viworks_core::session::{AgentEvent, AgentSession, Host};
use viworks_core::wire::{
    self, CloseCode, CommandId, CommandResult, Message, MetricKey, ResultStatus, Sample, Telemetry,
};
use viworks_fuzz::{
    ReceiveSeq, START, Script, TransmitCheck, agent_config, agent_id, agent_key, covered, entropy, fix_up, host_config,
    master, seal_bytes, session_keys,
};

fuzz_target!(|data: &[u8]| {
    let mut script = Script::new(data);
    let mode = script.byte().unwrap_or(0);
    let now = START;
    let config = agent_config();
    let mut agent = AgentSession::new(&config, now, &mut entropy(mode / 2), &ChannelBinding::NONE)
        .expect("the agent's HELLO seals");
    let hello = agent.poll_transmit().expect("the HELLO is queued");
    let welcome = if mode.is_multiple_of(2) {
        let mut host = Host::new(host_config(), Box::new(master()), entropy(mode), now).expect("a valid host config");
        let mut session = host.accept(now, &hello, None, &ChannelBinding::NONE).expect("a fresh agent is admitted");
        session.poll_transmit().expect("the WELCOME is queued")
    } else {
        let how = script.byte().unwrap_or(0);
        answer_from(script.chunk(), how, &hello)
    };
    agent.handle_message(now, &welcome);
    let drive = Drive::new(agent, session_keys(&agent_id(), &hello, &welcome));
    if mode.is_multiple_of(2) {
        assert!(drive.agent.is_established(), "a real WELCOME establishes the session");
    }
    drive.run(&mut script, now);
});

/// The script's answer to `hello`: `json` after the version byte, with `seq` 0 and the
/// agent's nonce filled in, sealed under the handshake key (`how` 0), the anonymous REJECT key
/// (`how` 1), or left as the raw bytes.
fn answer_from(json: &[u8], how: u8, hello: &[u8]) -> Vec<u8> {
    let Ok(wire::Envelope { message: Message::Hello(sent), .. }) = viworks_core::auth::read_hello_unverified(hello)
    else {
        panic!("the agent's HELLO reads back");
    };
    let covered = covered(&fix_up(json, 0, START, &[("agent_nonce", &sent.nonce)]));
    match how % 3 {
        0 => {
            let key = DirectionKeys::handshake(&agent_key(&agent_id()), &ChannelBinding::NONE).host_to_agent;
            seal_bytes(&key, &covered)
        }
        1 => seal_bytes(&MacKey::anonymous_reject(), &covered),
        _ => json.to_vec(),
    }
}

/// An agent session and what the script knows about it.
struct Drive {
    agent: AgentSession,
    keys: Option<(TransmitCheck, ReceiveSeq)>,
    last_delivered: Vec<u8>,
    commands: Vec<CommandId>,
    batches: u64,
    closed_events: usize,
    handshake_over: bool,
}

impl Drive {
    fn new(agent: AgentSession, keys: Option<DirectionKeys>) -> Self {
        Drive {
            agent,
            keys: keys.map(|keys| (TransmitCheck::new(keys.agent_to_host), ReceiveSeq::new(keys.host_to_agent))),
            last_delivered: Vec::new(),
            commands: Vec::new(),
            batches: 0,
            closed_events: 0,
            handshake_over: false,
        }
    }

    fn run(mut self, script: &mut Script<'_>, mut now: Timestamp) {
        while let Some(op) = script.byte() {
            match op % 9 {
                0 => self.deliver(now, script.chunk().to_vec()),
                1 | 2 => {
                    let chunk = script.chunk();
                    let Some((_, received)) = &self.keys else { continue };
                    let json = if op % 9 == 2 { fix_up(chunk, received.next(), now, &[]) } else { chunk.to_vec() };
                    let sealed = seal_bytes(received.key(), &covered(&json));
                    self.deliver(now, sealed);
                }
                3 => {
                    now = now.saturating_add(Duration::from_millis(u64::from(script.u16())));
                    self.agent.handle_timeout(now);
                }
                4 => {
                    self.transmit_one();
                }
                5 => {
                    self.event_one();
                }
                6 => self.act(script, now),
                7 => {
                    let replay = self.last_delivered.clone();
                    self.deliver(now, replay);
                }
                _ => self.drain(),
            }
        }
        self.drain();
        assert_eq!(self.agent.is_closed(), self.closed_events == 1, "a closed session said so exactly once");
        assert_eq!(self.agent.poll_timeout().is_none(), self.agent.is_closed());
        // Nobody speaks any more: the liveness timeout (or the handshake timeout) must end it.
        self.agent.handle_timeout(now.saturating_add(Duration::from_secs(3600)));
        assert!(self.agent.is_closed(), "silence past the liveness timeout ends the session");
        self.drain();
        assert_eq!(self.closed_events, 1);
    }

    fn deliver(&mut self, now: Timestamp, sealed: Vec<u8>) {
        if let Some((_, received)) = &mut self.keys
            && self.agent.is_established()
        {
            received.delivered(&sealed);
        }
        self.agent.handle_message(now, &sealed);
        self.last_delivered = sealed;
    }

    fn act(&mut self, script: &mut Script<'_>, now: Timestamp) {
        let choice = script.byte().unwrap_or(0);
        match choice % 5 {
            0 => {
                let id = self.commands.first().cloned().unwrap_or_else(|| CommandId::new("cmd-0").expect("a valid id"));
                let _ = self.agent.send_ack(now, id);
            }
            1 => {
                let id = self.commands.pop().unwrap_or_else(|| CommandId::new("cmd-1").expect("a valid id"));
                let result = CommandResult {
                    command_id: id,
                    status: ResultStatus::Succeeded,
                    exit_code: Some(0),
                    output: serde_json::json!({ "bytes": String::from_utf8_lossy(script.chunk()) }),
                    error: None,
                    duration_ms: 5,
                };
                let _ = self.agent.send_result(now, result);
            }
            2 => {
                self.batches += 1;
                let value = f64::from_bits(script.u64());
                let sample = Sample { ts: now, key: MetricKey::new("cpu.usage_pct").expect("a valid key"), value };
                let telemetry = Telemetry { batch_id: self.batches, samples: vec![sample], dropped: 0 };
                let sent = self.agent.send_telemetry(now, telemetry);
                if !value.is_finite() {
                    assert!(sent.is_err(), "a non-finite sample cannot be sent");
                }
            }
            3 => self.agent.close(now, CloseCode::GoingAway, "agent shutting down"),
            _ => self.agent.connection_lost(),
        }
    }

    fn drain(&mut self) {
        while self.transmit_one() {}
        while self.event_one() {}
    }

    fn transmit_one(&mut self) -> bool {
        let Some(sealed) = self.agent.poll_transmit() else { return false };
        match &mut self.keys {
            Some((sent, _)) => {
                sent.check(&sealed);
            }
            None => panic!("an agent without a session sends nothing after its HELLO"),
        }
        true
    }

    fn event_one(&mut self) -> bool {
        let Some(event) = self.agent.poll_event() else { return false };
        assert_eq!(self.closed_events, 0, "nothing happens after the session closed");
        match event {
            AgentEvent::Closed(_) => {
                self.closed_events += 1;
                assert!(self.agent.is_closed());
            }
            AgentEvent::Rejected { .. } => {
                assert!(!self.handshake_over, "a REJECT only answers the HELLO");
                assert!(self.agent.is_closed());
                self.closed_events += 1;
            }
            AgentEvent::Established { .. } => {
                assert!(!self.handshake_over, "a session is established once");
                assert!(self.keys.is_some(), "only a WELCOME answering the HELLO establishes");
            }
            AgentEvent::Command(command) => self.commands.push(command.command_id),
            _ => {}
        }
        self.handshake_over = true;
        true
    }
}
