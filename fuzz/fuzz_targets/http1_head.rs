//! The HTTP/1 handling the project does itself: protocol sniffing of the first bytes of a
//! tunnel, and x-forwarded-for parsing; neither may panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proxy::listener::looks_like_http(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = proxy::request::xff_client(text);
    }
});
