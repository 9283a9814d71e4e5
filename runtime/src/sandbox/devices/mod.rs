//! The hardware a module is granted (`kiln_protocol::capability`), opened by the
//! worker before it confines itself: confinement then leaves it these descriptors and
//! not the device files, and its syscall filter lets through only the few `ioctl`s
//! each kind needs afterwards (`confine::filter`). A handle the module holds is an
//! index into one of these lists.

pub mod gpio;
pub mod i2c;
pub mod serial;

use kiln_protocol::capability::Grants;

/// A module's granted hardware, opened.
#[derive(Default)]
pub struct Devices {
    pub serial: Vec<serial::Port>,
    pub gpio: Vec<gpio::Lines>,
    pub i2c: Vec<i2c::Device>,
}

impl Devices {
    /// Opens every grant; the first that cannot be opened is the error, naming it,
    /// its file and kilnd.toml.
    pub fn open(grants: &Grants) -> Result<Self, String> {
        let granted = |kind: &str, name: &str, path: &str, e: std::io::Error| {
            format!("cannot open {kind} `{name}` (`{path}`, granted in kilnd.toml): {e}")
        };
        Ok(Self {
            serial: grants
                .serial
                .iter()
                .map(|p| serial::open(p).map_err(|e| granted("serial port", &p.name, &p.path, e)))
                .collect::<Result<_, _>>()?,
            gpio: grants
                .gpio
                .iter()
                .map(|l| gpio::open(l).map_err(|e| granted("gpio lines", &l.name, &l.chip, e)))
                .collect::<Result<_, _>>()?,
            i2c: grants
                .i2c
                .iter()
                .map(|d| i2c::open(d).map_err(|e| granted("i2c device", &d.name, &d.bus, e)))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether any grant of `capability` is held.
    pub fn has(&self, capability: &str) -> bool {
        match capability {
            "serial" => !self.serial.is_empty(),
            "gpio" => !self.gpio.is_empty(),
            "i2c" => !self.i2c.is_empty(),
            _ => false,
        }
    }
}
