//! Host side: figures about the VMM process itself — resident memory
//! outside guest RAM, read from /proc/self/smaps.

/// Resident KiB of this process not in any of `guest` (host address, len).
pub fn rss_outside_guest_kib(guest: &[(u64, u64)]) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    Some(rss_outside(&smaps, guest))
}

fn rss_outside(smaps: &str, guest: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                in_guest = guest.iter().any(|(g, len)| start >= *g && end <= g + len);
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix("Rss:") {
            if !in_guest {
                total += rest.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_mappings_are_left_out() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 1 /usr/bin/sbx
Size:               1024 kB
Rss:                 300 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:              100000 kB
7fff00000000-7fff00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
";
        assert_eq!(rss_outside(smaps, &[(0x7f00_0000_0000, 0x1000_0000)]), 312);
        assert_eq!(rss_outside(smaps, &[]), 100_312);
    }

    #[test]
    fn reads_this_process() {
        assert!(rss_outside_guest_kib(&[]).unwrap() > 0);
    }
}
