//! Any verb name with any JSON arguments parses to checked arguments or a typed error, and
//! what parses is canonical: its `to_value` parses back to the same arguments, its default
//! timeout is accepted, and a script's argv never lets a value pass for a flag.
//!
//! The first byte picks a verb from the registry, or (past the registry) takes the verb name
//! from the next chunk; the rest of the input is the JSON text of the arguments.

#![no_main]

use libfuzzer_sys::fuzz_target;
use viworks_core::verbs::{self, REGISTRY};
use viworks_core::wire::Verb;
use viworks_fuzz::Script;

/// Every flag a user script takes; anything else in its argv is a value.
const SCRIPT_FLAGS: &[&str] = &["--username", "--full-name", "--ssh-public-key", "--remove-home", "--profile"];

fuzz_target!(|data: &[u8]| {
    let mut script = Script::new(data);
    let pick = usize::from(script.byte().unwrap_or(0));
    let name = match REGISTRY.get(pick) {
        Some(spec) => spec.name.to_owned(),
        None => String::from_utf8_lossy(script.chunk()).into_owned(),
    };
    let Ok(verb) = Verb::new(name) else { return };
    let rest = script.rest();
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) else { return };

    let parsed = verbs::parse(&verb, &value);
    assert_eq!(parsed.is_ok(), verbs::validate(&verb, &value).is_ok(), "validate agrees with parse");
    let Ok(args) = parsed else { return };
    assert_eq!(args.verb(), verb.as_str());
    let canonical = args.to_value();
    let again = verbs::parse(&verb, &canonical).expect("the canonical form of parsed arguments parses");
    assert_eq!(again, args, "the canonical form parses back to the same arguments");
    assert_eq!(again.to_value(), canonical, "the canonical form is a fixed point");
    let timeout = args.timeout(None).expect("the default timeout suits any valid arguments");
    assert!(timeout <= args.spec().max_timeout);
    if let Some((_, argv)) = args.script_argv() {
        for item in &argv {
            assert!(!item.contains('\0'));
            if item.starts_with('-') {
                assert!(SCRIPT_FLAGS.contains(&item.as_str()), "a script value {item:?} could pass for a flag");
            }
        }
    }
});
