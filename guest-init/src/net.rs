//! Guest side: configures the guest's network from the job — loopback up,
//! the virtio NIC (whose other end is the VMM's netstack) with a static
//! address and the default route, and /etc/resolv.conf naming netstack's
//! DNS server. Nothing here decides what the guest may reach: netstack on
//! the host does.

use std::fs;

use protocol::NetConfig;

use crate::sys;

/// The first network interface that is not loopback.
fn find_nic() -> Result<String, String> {
    let entries = fs::read_dir("/sys/class/net").map_err(|e| format!("Cannot list /sys/class/net: {e}"))?;
    let mut names: Vec<String> =
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n != "lo").collect();
    names.sort();
    names.into_iter().next().ok_or_else(|| "No network interface (the VMM attaches one)".to_string())
}

pub fn configure(net: &NetConfig) -> Result<(), String> {
    let sock = sys::config_socket().map_err(|e| format!("Cannot open a socket to configure the network: {e}"))?;
    sys::if_up(&sock, "lo").map_err(|e| format!("Cannot bring up lo: {e}"))?;
    let nic = find_nic()?;
    sys::if_set_addr(&sock, &nic, net.addr).map_err(|e| format!("Cannot set {nic}'s address: {e}"))?;
    sys::if_set_netmask(&sock, &nic, net.netmask()).map_err(|e| format!("Cannot set {nic}'s netmask: {e}"))?;
    sys::if_up(&sock, &nic).map_err(|e| format!("Cannot bring up {nic}: {e}"))?;
    sys::add_default_route(&sock, net.gateway).map_err(|e| format!("Cannot add the default route: {e}"))?;
    fs::write("/etc/resolv.conf", format!("nameserver {}\n", net.dns))
        .map_err(|e| format!("Cannot write /etc/resolv.conf: {e}"))?;
    Ok(())
}
