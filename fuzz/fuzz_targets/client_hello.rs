//! The TLSRoute ClientHello/SNI parser on arbitrary bytes: never panics, and a parse of a
//! prefix never claims an SNI the whole input does not have.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::listener::{Hello, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    let whole = parse_client_hello(data);
    if let Hello::Sni(Some(name)) = &whole {
        assert!(!name.is_empty());
    }
    // Fed in two pieces, the first piece alone either needs more or already agrees.
    let cut = data.len() / 2;
    match parse_client_hello(&data[..cut]) {
        Hello::Sni(sni) => assert_eq!(Hello::Sni(sni), whole),
        Hello::NeedMore | Hello::NotTls => {}
    }
});
