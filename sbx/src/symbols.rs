//! Host side: turns a guest kernel address into `function+0xoffset` using
//! the System.map built with the kernel, for error reports.

use std::path::Path;

pub struct SystemMap {
    /// Text symbols sorted by address.
    text: Vec<(u64, String)>,
}

impl SystemMap {
    pub fn parse(content: &str) -> SystemMap {
        let mut text: Vec<(u64, String)> = content
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                matches!(kind, "t" | "T" | "W" | "w").then(|| (addr, name.to_string()))
            })
            .collect();
        text.sort();
        SystemMap { text }
    }

    /// Reads `System.map` next to the kernel image, if there is one.
    pub fn for_kernel(kernel: &Path) -> Option<SystemMap> {
        let path = kernel.parent()?.join("System.map");
        std::fs::read_to_string(path).ok().map(|c| SystemMap::parse(&c))
    }

    pub fn describe(&self, addr: u64) -> Option<String> {
        let idx = self.text.partition_point(|(a, _)| *a <= addr);
        let (base, name) = self.text.get(idx.checked_sub(1)?)?;
        Some(format!("{name}+{:#x}", addr - base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_enclosing_function() {
        let map = SystemMap::parse(
            "ffffffff81000000 T _text\nffffffff81000100 t fpu__drop\nffffffff81000200 D some_data\nbad line\nffffffff81000180 T next_fn\n",
        );
        assert_eq!(map.describe(0xffffffff81000110).as_deref(), Some("fpu__drop+0x10"));
        assert_eq!(map.describe(0xffffffff81000180).as_deref(), Some("next_fn+0x0"));
        assert_eq!(map.describe(0xffffffff81000250).as_deref(), Some("next_fn+0xd0"));
        assert_eq!(map.describe(0x1000), None);
    }
}
