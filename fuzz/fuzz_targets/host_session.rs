//! A host session fed any script of messages, timeouts and polls stays within its rules: what
//! it sends opens under the session key with consecutive sequence numbers, it ends at most
//! once and says so last, and silence past the liveness timeout always ends it.
//!
//! The first byte chooses the way in. Even: a real agent's HELLO is admitted and the script
//! drives the established session. Odd: the HELLO is the script's first chunk, sealed under
//! the claimed agent's key when the second byte is odd, so the accept path past the MAC is
//! fuzzed; a refusal must carry a REJECT the agent can open.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use viworks_core::Timestamp;
use viworks_core::auth::{self, ChannelBinding, DirectionKeys, MacKey};
use viworks_core::session::{AgentSession, Host, HostEvent, HostSession};
use viworks_core::wire::{self, CloseCode, Command, CommandId, Message, Verb};
use viworks_fuzz::{
    ReceiveSeq, START, Script, TransmitCheck, agent_config, agent_key, covered, entropy, fix_up, host_config, master,
    seal_bytes, session_keys,
};

fuzz_target!(|data: &[u8]| {
    let mut script = Script::new(data);
    let mode = script.byte().unwrap_or(0);
    let mut host = Host::new(host_config(), Box::new(master()), entropy(mode), START).expect("a valid host config");
    let now = START;
    let (hello, session) = if mode.is_multiple_of(2) {
        let mut agent = AgentSession::new(&agent_config(), now, &mut entropy(mode / 2), &ChannelBinding::NONE)
            .expect("the agent's HELLO seals");
        let hello = agent.poll_transmit().expect("the HELLO is queued");
        let session = host.accept(now, &hello, None, &ChannelBinding::NONE).expect("a fresh agent is admitted");
        (hello, session)
    } else {
        let seal = script.byte().unwrap_or(0) % 2 == 1;
        let hello = hello_from(script.chunk(), seal);
        match host.accept(now, &hello, None, &ChannelBinding::NONE) {
            Ok(session) => (hello, session),
            Err(refusal) => {
                let key = match (&refusal.claimed_agent, refusal.authenticated) {
                    (Some(agent), true) => {
                        DirectionKeys::handshake(&agent_key(agent), &ChannelBinding::NONE).host_to_agent
                    }
                    (None, true) => panic!("an authenticated refusal names its agent"),
                    (_, false) => MacKey::anonymous_reject(),
                };
                let reply = auth::open(&key, &refusal.reply, wire::Limits::default()).expect("the REJECT opens");
                match reply.message {
                    Message::Reject(reject) => assert_eq!(reject.code, refusal.code),
                    other => panic!("a refusal replies with a REJECT, not {:?}", other.kind()),
                }
                assert_eq!(host.live_sessions(), 0);
                return;
            }
        }
    };
    assert_eq!(host.live_sessions(), 1);
    Drive::new(&mut host, session, &hello).run(&mut script, now);
});

/// The script's HELLO: `json` after the version byte, sealed under the handshake key of the
/// agent it claims (with `seq` and `ts` made acceptable) when `seal` is set, else the raw bytes.
fn hello_from(json: &[u8], seal: bool) -> Vec<u8> {
    if !seal {
        return json.to_vec();
    }
    let covered = covered(&fix_up(json, 0, START, &[]));
    let Ok(wire::Envelope { message: Message::Hello(hello), .. }) = wire::decode(&covered) else {
        return seal_bytes(&MacKey::from_bytes([0; 32]), &covered);
    };
    let key = DirectionKeys::handshake(&agent_key(&hello.agent_id), &ChannelBinding::NONE).agent_to_host;
    seal_bytes(&key, &covered)
}

/// An admitted session and what the script knows about it.
struct Drive<'h> {
    host: &'h mut Host,
    session: HostSession,
    sent: TransmitCheck,
    received: ReceiveSeq,
    last_delivered: Vec<u8>,
    results: Vec<CommandId>,
    commands: u32,
    closed_events: usize,
}

impl<'h> Drive<'h> {
    fn new(host: &'h mut Host, mut session: HostSession, hello: &[u8]) -> Self {
        let welcome = session.poll_transmit().expect("an admitted session's first transmit is the WELCOME");
        let keys = session_keys(session.agent_id(), hello, &welcome).expect("the WELCOME answers the HELLO");
        Drive {
            host,
            session,
            sent: TransmitCheck::new(keys.host_to_agent),
            received: ReceiveSeq::new(keys.agent_to_host),
            last_delivered: Vec::new(),
            results: Vec::new(),
            commands: 0,
            closed_events: 0,
        }
    }

    fn run(mut self, script: &mut Script<'_>, mut now: Timestamp) {
        while let Some(op) = script.byte() {
            match op % 9 {
                0 => self.deliver(now, script.chunk().to_vec()),
                1 => {
                    let sealed = seal_bytes(self.received.key(), &covered(script.chunk()));
                    self.deliver(now, sealed);
                }
                2 => {
                    let json = fix_up(script.chunk(), self.received.next(), now, &[]);
                    let sealed = seal_bytes(self.received.key(), &covered(&json));
                    self.deliver(now, sealed);
                }
                3 => {
                    now = now.saturating_add(Duration::from_millis(u64::from(script.u16())));
                    self.session.handle_timeout(now);
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
                _ => {
                    // The driver's loop: drain everything.
                    while self.transmit_one() {}
                    while self.event_one() {}
                }
            }
        }
        while self.transmit_one() {}
        while self.event_one() {}
        assert_eq!(self.session.is_closed(), self.closed_events == 1, "a closed session said so exactly once");
        assert_eq!(self.host.live_sessions(), usize::from(!self.session.is_closed()));
        assert_eq!(self.session.poll_timeout().is_none(), self.session.is_closed());
        // Nobody speaks any more: the liveness timeout must end the session.
        self.session.handle_timeout(now.saturating_add(Duration::from_secs(3600)));
        assert!(self.session.is_closed(), "silence past the liveness timeout ends the session");
        assert_eq!(self.host.live_sessions(), 0);
        while self.transmit_one() {}
        while self.event_one() {}
        assert_eq!(self.closed_events, 1);
    }

    fn deliver(&mut self, now: Timestamp, sealed: Vec<u8>) {
        if !self.session.is_closed() {
            self.received.delivered(&sealed);
        }
        self.session.handle_message(now, &sealed);
        self.last_delivered = sealed;
    }

    fn act(&mut self, script: &mut Script<'_>, now: Timestamp) {
        let choice = script.byte().unwrap_or(0);
        match choice % 6 {
            0 => {
                self.commands += 1;
                let command = Command {
                    command_id: CommandId::new(format!("cmd-{}", self.commands % 8)).expect("a valid id"),
                    verb: Verb::new("get_system_health").expect("a valid verb"),
                    args: serde_json::json!({}),
                    timeout_ms: 5_000,
                    attempt: 1,
                };
                if self.session.send_command(now, command).is_ok() {
                    assert!(self.session.in_flight() > 0, "a command sent is in flight");
                }
            }
            1 => {
                let stored = std::mem::take(&mut self.results);
                let _ = self.session.ack_results(now, &stored);
            }
            2 => {
                let _ = self.session.ack_telemetry(now, script.u64());
            }
            3 => self.session.close(now, CloseCode::GoingAway, "host shutting down"),
            4 => self.session.connection_lost(),
            _ => {
                let ids = (0..choice / 6 % 4).map(|n| CommandId::new(format!("cmd-{n}")).expect("a valid id"));
                self.session.resume(now, ids);
            }
        }
        if self.session.is_closed() {
            assert_eq!(self.session.credits(), 0, "a closed session takes no command");
        }
    }

    fn transmit_one(&mut self) -> bool {
        let Some(sealed) = self.session.poll_transmit() else { return false };
        self.sent.check(&sealed);
        true
    }

    fn event_one(&mut self) -> bool {
        let Some(event) = self.session.poll_event() else { return false };
        assert_eq!(self.closed_events, 0, "nothing happens after the session closed");
        match event {
            HostEvent::Closed { .. } => {
                self.closed_events += 1;
                assert!(self.session.is_closed());
            }
            HostEvent::Result(result) => self.results.push(result.command_id),
            _ => {}
        }
        true
    }
}
