//! Host capabilities: hardware a module may use only when the device grants it, never
//! ambiently. `kilnd.toml` names each resource and the modules granted it (a fleet's
//! desired state cannot grant hardware: what a device wires to its pins is the
//! device's to say). A module that imports a capability's functions without a grant
//! is refused at load, naming the capability.
//!
//! The one capability today is `serial`: a port opened (and set to raw mode, its baud
//! and framing) by the worker before it confines itself, so the module reaches that
//! port and nothing else, by the name the grant gives it.

use serde::{Deserialize, Serialize};

/// The `kiln` imports of the serial capability.
pub const SERIAL_IMPORTS: &[&str] = &["serial_open", "serial_read", "serial_write"];
/// Ports one module may be granted.
pub const MAX_SERIAL_PORTS: usize = 8;
/// Bytes one `serial_read` or `serial_write` moves at most.
pub const MAX_SERIAL_IO: usize = 4096;
/// The longest a `serial_read` or `serial_write` waits; a module's call watchdog
/// (`timeout_ms`) still bounds the whole call.
pub const MAX_SERIAL_WAIT_MS: u32 = 5000;
/// Baud rates a port may be set to (what `termios` offers everywhere).
pub const BAUDS: &[u32] = &[
    1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600,
];

/// The capability a `kiln` import needs, if it needs one.
pub fn needed_by(import: &str) -> Option<&'static str> {
    SERIAL_IMPORTS.contains(&import).then_some("serial")
}

/// A serial port granted to a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPort {
    /// What the module opens it by (`serial_open("gps")`).
    pub name: String,
    /// The device file (`/dev/ttyUSB0`, `/dev/serial/by-id/...`).
    pub path: String,
    pub baud: u32,
    pub framing: Framing,
}

/// Data bits, parity and stop bits, as `8N1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Framing {
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Parity {
    None,
    Even,
    Odd,
}

impl Default for Framing {
    fn default() -> Self {
        Self {
            data_bits: 8,
            parity: Parity::None,
            stop_bits: 1,
        }
    }
}

impl std::str::FromStr for Framing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("framing `{s}` is not one of 8N1, 8E1, 8O1, 8N2, 7E1, 7O1, 7N1, 7E2");
        let b = s.as_bytes();
        if b.len() != 3 {
            return Err(bad());
        }
        let data_bits = match b[0] {
            b'7' => 7,
            b'8' => 8,
            _ => return Err(bad()),
        };
        let parity = match b[1].to_ascii_uppercase() {
            b'N' => Parity::None,
            b'E' => Parity::Even,
            b'O' => Parity::Odd,
            _ => return Err(bad()),
        };
        let stop_bits = match b[2] {
            b'1' => 1,
            b'2' => 2,
            _ => return Err(bad()),
        };
        Ok(Self {
            data_bits,
            parity,
            stop_bits,
        })
    }
}

impl std::fmt::Display for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parity = match self.parity {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        };
        write!(f, "{}{parity}{}", self.data_bits, self.stop_bits)
    }
}

impl SerialPort {
    /// Its name, path and baud, checked.
    pub fn check(&self) -> Result<(), String> {
        crate::names::check(crate::names::Kind::Stream, &self.name)
            .map_err(|e| format!("serial port name: {e}"))?;
        if !self.path.starts_with('/') || self.path.contains('\0') {
            return Err(format!(
                "serial port `{}`: path `{}` is not an absolute path",
                self.name, self.path
            ));
        }
        if !BAUDS.contains(&self.baud) {
            return Err(format!(
                "serial port `{}`: baud {} is not one of {BAUDS:?}",
                self.name, self.baud
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framings_parse_and_print_back() {
        for text in ["8N1", "8E1", "8O1", "8N2", "7E1", "7O1", "7N1", "7E2"] {
            let f: Framing = text.parse().unwrap();
            assert_eq!(f.to_string(), text);
        }
        assert_eq!("8n1".parse::<Framing>().unwrap(), Framing::default());
        for bad in ["", "9N1", "8X1", "8N3", "8N11", "N81"] {
            assert!(bad
                .parse::<Framing>()
                .unwrap_err()
                .contains("is not one of"));
        }
    }

    #[test]
    fn a_port_needs_a_name_an_absolute_path_and_a_standard_baud() {
        let port = SerialPort {
            name: "gps".into(),
            path: "/dev/ttyUSB0".into(),
            baud: 9600,
            framing: Framing::default(),
        };
        assert_eq!(port.check(), Ok(()));
        let bad = |f: fn(&mut SerialPort)| {
            let mut p = port.clone();
            f(&mut p);
            p.check().unwrap_err()
        };
        assert!(bad(|p| p.name = "a/b".into()).contains("serial port name"));
        assert!(bad(|p| p.path = "ttyUSB0".into()).contains("absolute"));
        assert!(bad(|p| p.baud = 9601).contains("baud 9601"));
        assert_eq!(needed_by("serial_read"), Some("serial"));
        assert_eq!(needed_by("publish"), None);
    }
}
