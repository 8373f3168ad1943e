//! CONNECT `:authority` parsing: never panics; anything accepted round-trips as ip:port.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(addr) = proxy::listener::parse_authority(text) {
        let again = proxy::listener::parse_authority(&addr.to_string());
        assert_eq!(again, Some(addr));
    }
});
