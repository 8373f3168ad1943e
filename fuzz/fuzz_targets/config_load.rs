//! YAML/JSON text -> resources -> compiled snapshot must never panic, whatever the input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(loaded) = policy::parse_manifests(text, "<fuzz>") {
        let _ = policy::compile(&loaded, &policy::CompileOptions::default());
    }
});
