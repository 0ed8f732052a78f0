#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| stella_signer_fuzz::targets::request(
    data,
    signer_actors::codec::ContentType::Cbor
));
