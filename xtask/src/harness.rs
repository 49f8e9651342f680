//! What the benches share with the Kamailio bench (`sip`), so that `bench`
//! (which drives `sip`) and `sip` both depend on this and not on each
//! other.
use std::{path::Path, process::Command};

/// `tcpka unload` of a bench's installation, and its lock files (see
/// keepalive-user paths.rs).
pub fn unload(tcpka: &Path, pin_dir: &Path) {
    let _ = Command::new(tcpka)
        .env("TCPKA_PIN_DIR", pin_dir)
        .arg("unload")
        .output();
    let name: String = pin_dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    for ext in ["lock", "serve", "journal"] {
        let _ = std::fs::remove_file(format!("/run/tcpka/locks/{name}.{ext}"));
    }
}
