//! The I2C capability's host side, on the kernel's i2c-dev character device: the
//! worker opens the bus and binds the descriptor to the granted 7-bit address
//! (`I2C_SLAVE`) before it confines itself; afterwards its syscall filter lets
//! through only `I2C_SMBUS` transfers, so the descriptor cannot be pointed at another
//! device. Register reads and writes are SMBus "byte data" for one byte and "I2C
//! block" for 2 to 32, what most sensors and EEPROMs speak (and what the kernel's
//! `i2c-stub` emulates).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use kiln_protocol::capability::{I2cDevice, MAX_I2C_IO};

pub const I2C_SLAVE: u32 = 0x0703;
pub const I2C_SMBUS: u32 = 0x0720;
const READ: u8 = 1;
const WRITE: u8 = 0;
const BYTE_DATA: u32 = 2;
const I2C_BLOCK_DATA: u32 = 8;
const BLOCK_MAX: usize = 32;
const _: () = assert!(MAX_I2C_IO == BLOCK_MAX);

#[repr(C)]
union Data {
    byte: u8,
    /// `block[0]` is the length; two more bytes for a PEC and the kernel's use.
    block: [u8; BLOCK_MAX + 2],
}

#[repr(C)]
struct IoctlData {
    read_write: u8,
    command: u8,
    size: u32,
    data: *mut Data,
}

/// A granted device, its bus descriptor bound to its address.
pub struct Device {
    pub name: String,
    bus: File,
}

/// Opens the bus and binds it to the device's address. A kernel driver holding that
/// address makes this fail (EBUSY): kilnd never forces it.
pub fn open(grant: &I2cDevice) -> io::Result<Device> {
    let bus = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&grant.bus)?;
    // SAFETY: I2C_SLAVE takes the address as its argument.
    let r = unsafe {
        libc::ioctl(
            bus.as_raw_fd(),
            I2C_SLAVE as _,
            libc::c_ulong::from(grant.address),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Device {
        name: grant.name.clone(),
        bus,
    })
}

impl Device {
    fn transfer(&self, read_write: u8, reg: u8, size: u32, data: &mut Data) -> io::Result<()> {
        let mut args = IoctlData {
            read_write,
            command: reg,
            size,
            data,
        };
        // SAFETY: `args` points at `data`, which outlives the call.
        let r = unsafe { libc::ioctl(self.bus.as_raw_fd(), I2C_SMBUS as _, &mut args) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads `buf.len()` (1 to 32) bytes from register `reg`.
    pub fn read(&self, reg: u8, buf: &mut [u8]) -> io::Result<usize> {
        // The length goes in `block[0]` (an I2C block read); byte data ignores it.
        let mut block = [0u8; BLOCK_MAX + 2];
        block[0] = buf.len().min(BLOCK_MAX) as u8;
        let mut data = Data { block };
        match buf.len() {
            1 => {
                self.transfer(READ, reg, BYTE_DATA, &mut data)?;
                // SAFETY: every variant is plain bytes; byte data fills `byte`.
                buf[0] = unsafe { data.byte };
                Ok(1)
            }
            n @ 2..=BLOCK_MAX => {
                self.transfer(READ, reg, I2C_BLOCK_DATA, &mut data)?;
                // SAFETY: the kernel wrote the length it read and the bytes after it.
                let block = unsafe { data.block };
                let got = (block[0] as usize).min(n);
                buf[..got].copy_from_slice(&block[1..=got]);
                Ok(got)
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "1 to 32 bytes")),
        }
    }

    /// Writes `bytes` (1 to 32) to register `reg`.
    pub fn write(&self, reg: u8, bytes: &[u8]) -> io::Result<usize> {
        let mut data = Data {
            block: [0; BLOCK_MAX + 2],
        };
        match bytes.len() {
            1 => {
                data.byte = bytes[0];
                self.transfer(WRITE, reg, BYTE_DATA, &mut data)?;
            }
            n @ 2..=BLOCK_MAX => {
                let mut block = [0u8; BLOCK_MAX + 2];
                block[0] = n as u8;
                block[1..=n].copy_from_slice(bytes);
                data.block = block;
                self.transfer(WRITE, reg, I2C_BLOCK_DATA, &mut data)?;
            }
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "1 to 32 bytes")),
        }
        Ok(bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_bus_is_an_error_naming_the_cause() {
        let e = open(&I2cDevice {
            name: "eeprom".into(),
            bus: "/dev/kiln-no-such-i2c".into(),
            address: 0x50,
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_ioctl_data_has_the_kernels_layout() {
        // struct i2c_smbus_ioctl_data: u8, u8, u32, pointer.
        assert_eq!(
            std::mem::size_of::<IoctlData>(),
            8 + std::mem::size_of::<usize>()
        );
        assert_eq!(std::mem::size_of::<Data>(), BLOCK_MAX + 2);
    }
}
