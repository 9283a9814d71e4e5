//! Host capabilities: hardware a module may use only when the device grants it, never
//! ambiently. `kilnd.toml` names each resource and the modules granted it (a fleet's
//! desired state cannot grant hardware: what a device wires to its pins is the
//! device's to say). A module that imports a capability's functions without a grant
//! is refused at load, naming the capability.
//!
//! Three capabilities, each opened by the worker before it confines itself, so the
//! module reaches that resource and nothing else, by the name the grant gives it:
//!
//! - `serial`: a port set to raw mode, its baud and framing;
//! - `gpio`: lines of a GPIO chip (the kernel's character device, uAPI v2), requested
//!   as inputs or as outputs; the worker keeps the request's descriptor, never the
//!   chip's;
//! - `i2c`: one device (one 7-bit address) on an I2C bus, spoken to with SMBus
//!   register reads and writes; the worker keeps a descriptor bound to that address
//!   and cannot change it;
//! - `file`: one file opened read-only (an IIO sensor's or another driver's attribute
//!   under `/sys`), read again from its start on each call.

use serde::{Deserialize, Serialize};

/// The `kiln` imports of the serial capability.
pub const SERIAL_IMPORTS: &[&str] = &["serial_open", "serial_read", "serial_write"];
/// Bytes one `serial_read` or `serial_write` moves at most.
pub const MAX_SERIAL_IO: usize = 4096;
/// The longest a `serial_read` or `serial_write` waits; a module's call watchdog
/// (`timeout_ms`) still bounds the whole call.
pub const MAX_SERIAL_WAIT_MS: u32 = 5000;
/// Baud rates a port may be set to (what `termios` offers everywhere).
pub const BAUDS: &[u32] = &[
    1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600,
];

/// The `kiln` imports of the GPIO capability.
pub const GPIO_IMPORTS: &[&str] = &["gpio_open", "gpio_read", "gpio_write"];
/// Lines one grant may request (one read or write moves them all, a bit each of a
/// non-negative `i32`).
pub const MAX_GPIO_LINES: usize = 16;
/// The `kiln` imports of the I2C capability.
pub const I2C_IMPORTS: &[&str] = &["i2c_open", "i2c_read", "i2c_write"];
/// Bytes one `i2c_read` or `i2c_write` moves at most (SMBus's I2C block).
pub const MAX_I2C_IO: usize = 32;
/// The `kiln` imports of the file capability.
pub const FILE_IMPORTS: &[&str] = &["file_open", "file_read"];
/// Bytes one `file_read` returns at most.
pub const MAX_FILE_READ: usize = 4096;
/// Grants of one kind one module may hold.
pub const MAX_GRANTS: usize = 8;

/// The capability a `kiln` import needs, if it needs one.
pub fn needed_by(import: &str) -> Option<&'static str> {
    if SERIAL_IMPORTS.contains(&import) {
        Some("serial")
    } else if GPIO_IMPORTS.contains(&import) {
        Some("gpio")
    } else if I2C_IMPORTS.contains(&import) {
        Some("i2c")
    } else if FILE_IMPORTS.contains(&import) {
        Some("file")
    } else {
        None
    }
}

/// What one module is granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    pub serial: Vec<SerialPort>,
    pub gpio: Vec<GpioLines>,
    pub i2c: Vec<I2cDevice>,
    pub files: Vec<ReadFile>,
}

impl Grants {
    /// Whether any grant of `capability` (`serial`, `gpio`, `i2c`) is held.
    pub fn has(&self, capability: &str) -> bool {
        match capability {
            "serial" => !self.serial.is_empty(),
            "gpio" => !self.gpio.is_empty(),
            "i2c" => !self.i2c.is_empty(),
            "file" => !self.files.is_empty(),
            _ => false,
        }
    }
}

/// Lines of a GPIO chip granted to a module, all inputs or all outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpioLines {
    /// What the module opens them by (`gpio_open("relays")`).
    pub name: String,
    /// The chip's character device (`/dev/gpiochip0`, or a udev link to it).
    pub chip: String,
    /// Line offsets on the chip; bit `i` of a read or write is `lines[i]`.
    pub lines: Vec<u32>,
    /// Outputs (driven by `gpio_write`, starting low) or inputs (read only).
    pub output: bool,
    /// For inputs: the edges delivered to the module as messages on `gpio/NAME`.
    pub edges: Edges,
}

/// Which edges of input lines the kernel reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Edges {
    #[default]
    None,
    Rising,
    Falling,
    Both,
}

impl std::str::FromStr for Edges {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "none" => Edges::None,
            "rising" => Edges::Rising,
            "falling" => Edges::Falling,
            "both" => Edges::Both,
            _ => {
                return Err(format!(
                    "edges `{s}` is not one of none, rising, falling, both"
                ))
            }
        })
    }
}

/// A file granted to a module read-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFile {
    /// What the module opens it by (`file_open("temp")`).
    pub name: String,
    pub path: String,
}

impl ReadFile {
    /// Its name and path, checked.
    pub fn check(&self) -> Result<(), String> {
        crate::names::check(crate::names::Kind::Stream, &self.name)
            .map_err(|e| format!("file name: {e}"))?;
        absolute("file", &self.name, &self.path)
    }
}

impl GpioLines {
    /// Its name, chip path and lines, checked.
    pub fn check(&self) -> Result<(), String> {
        crate::names::check(crate::names::Kind::Stream, &self.name)
            .map_err(|e| format!("gpio name: {e}"))?;
        absolute("gpio", &self.name, &self.chip)?;
        if self.lines.is_empty() || self.lines.len() > MAX_GPIO_LINES {
            return Err(format!(
                "gpio `{}`: {} lines, where 1 to {MAX_GPIO_LINES} may be granted together",
                self.name,
                self.lines.len()
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = self.lines.iter().find(|l| !seen.insert(**l)) {
            return Err(format!("gpio `{}`: line {twice} is named twice", self.name));
        }
        if self.output && self.edges != Edges::None {
            return Err(format!(
                "gpio `{}`: edges are reported for inputs, not outputs",
                self.name
            ));
        }
        Ok(())
    }
}

/// One device on an I2C bus granted to a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I2cDevice {
    /// What the module opens it by (`i2c_open("eeprom")`).
    pub name: String,
    /// The bus's character device (`/dev/i2c-1`).
    pub bus: String,
    /// Its 7-bit address.
    pub address: u16,
}

impl I2cDevice {
    /// Its name, bus path and address, checked: the 7-bit addresses I2C reserves
    /// for the bus itself (0x00-0x07, 0x78-0x7f) are refused.
    pub fn check(&self) -> Result<(), String> {
        crate::names::check(crate::names::Kind::Stream, &self.name)
            .map_err(|e| format!("i2c name: {e}"))?;
        absolute("i2c", &self.name, &self.bus)?;
        if !(0x08..=0x77).contains(&self.address) {
            return Err(format!(
                "i2c `{}`: address {:#04x} is not a device's 7-bit address (0x08 to 0x77)",
                self.name, self.address
            ));
        }
        Ok(())
    }
}

fn absolute(kind: &str, name: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(format!(
            "{kind} `{name}`: path `{path}` is not an absolute path"
        ));
    }
    Ok(())
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
        absolute("serial port", &self.name, &self.path)?;
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

    #[test]
    fn gpio_and_i2c_grants_are_checked() {
        let lines = GpioLines {
            name: "relays".into(),
            chip: "/dev/gpiochip0".into(),
            lines: vec![0, 3],
            output: true,
            edges: Edges::None,
        };
        assert_eq!(lines.check(), Ok(()));
        assert_eq!("both".parse::<Edges>(), Ok(Edges::Both));
        assert!("up".parse::<Edges>().unwrap_err().contains("not one of"));
        let temp = ReadFile {
            name: "temp".into(),
            path: "/sys/bus/iio/devices/iio:device0/in_temp_input".into(),
        };
        assert_eq!(temp.check(), Ok(()));
        assert!(ReadFile {
            path: "in_temp_input".into(),
            ..temp.clone()
        }
        .check()
        .unwrap_err()
        .contains("absolute"));
        assert_eq!(needed_by("file_read"), Some("file"));
        let bad = |f: fn(&mut GpioLines)| {
            let mut l = lines.clone();
            f(&mut l);
            l.check().unwrap_err()
        };
        assert!(bad(|l| l.chip = "gpiochip0".into()).contains("absolute"));
        assert!(bad(|l| l.lines.clear()).contains("0 lines"));
        assert!(bad(|l| l.lines = (0..17).collect()).contains("17 lines"));
        assert!(bad(|l| l.lines = vec![1, 2, 1]).contains("line 1 is named twice"));
        assert!(bad(|l| l.edges = Edges::Both).contains("not outputs"));
        assert!(bad(|l| l.name = String::new()).contains("gpio name"));
        let eeprom = I2cDevice {
            name: "eeprom".into(),
            bus: "/dev/i2c-1".into(),
            address: 0x50,
        };
        assert_eq!(eeprom.check(), Ok(()));
        for address in [0x00, 0x07, 0x78, 0x7f, 0x3ff] {
            let d = I2cDevice {
                address,
                ..eeprom.clone()
            };
            assert!(
                d.check().unwrap_err().contains("7-bit address"),
                "{address}"
            );
        }
        assert_eq!(needed_by("gpio_write"), Some("gpio"));
        assert_eq!(needed_by("i2c_read"), Some("i2c"));
        let grants = Grants {
            i2c: vec![eeprom],
            ..Grants::default()
        };
        assert!(grants.has("i2c") && !grants.has("gpio") && !grants.has("serial"));
    }
}
