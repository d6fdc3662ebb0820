#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mta_fuzz::targets::smtp_session(data));
