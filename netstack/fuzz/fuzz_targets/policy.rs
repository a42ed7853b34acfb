//! Host side: fuzzes policy files, host names and URLs: parsing never
//! panics, and a decision is always one of the rules that matched.
#![no_main]
use libfuzzer_sys::fuzz_target;
use netstack::host::HostName;
use netstack::policy::{Policy, Request, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (policy_text, probe) = text.split_once('\n').unwrap_or((text, "a.example.com"));
    let _ = Target::parse_url(probe);
    let policy = Policy::from_toml(policy_text).or_else(|_| Policy::preset("balanced")).unwrap();
    if let Ok(host) = HostName::parse(probe) {
        for (port, http) in [(443, None), (80, Some(("GET", "/")))] {
            let req = Request { host: &host, port, http };
            let decision = policy.decide(&req);
            if let Some(rule) = &decision.rule {
                assert!(policy.explain(&req).contains(&rule));
            }
        }
    }
});
