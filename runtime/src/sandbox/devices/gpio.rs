//! The GPIO capability's host side, on the kernel's GPIO character device (uAPI v2,
//! `linux/gpio.h`): the worker opens the chip, requests the granted lines as inputs or
//! outputs, and keeps only the request's descriptor. Reads and writes are one `ioctl`
//! each on it (`GPIO_V2_LINE_GET_VALUES` / `SET_VALUES`), the only two the syscall
//! filter lets through for GPIO.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;

use kiln_protocol::capability::GpioLines;

const LINES_MAX: usize = 64;
const NAME_SIZE: usize = 32;
const ATTRS_MAX: usize = 10;
const FLAG_INPUT: u64 = 1 << 2;
const FLAG_OUTPUT: u64 = 1 << 3;

/// `_IOWR(0xB4, nr, size)`.
const fn iowr(nr: u32, size: usize) -> u32 {
    (3 << 30) | ((size as u32) << 16) | (0xB4 << 8) | nr
}
pub const GET_LINE: u32 = iowr(0x07, std::mem::size_of::<LineRequest>());
pub const GET_VALUES: u32 = iowr(0x0E, std::mem::size_of::<LineValues>());
pub const SET_VALUES: u32 = iowr(0x0F, std::mem::size_of::<LineValues>());

#[repr(C)]
#[derive(Clone, Copy)]
struct LineAttribute {
    id: u32,
    padding: u32,
    value: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ConfigAttribute {
    attr: LineAttribute,
    mask: u64,
}

#[repr(C)]
struct LineConfig {
    flags: u64,
    num_attrs: u32,
    padding: [u32; 5],
    attrs: [ConfigAttribute; ATTRS_MAX],
}

#[repr(C)]
struct LineRequest {
    offsets: [u32; LINES_MAX],
    consumer: [u8; NAME_SIZE],
    config: LineConfig,
    num_lines: u32,
    event_buffer_size: u32,
    padding: [u32; 5],
    fd: i32,
}

#[repr(C)]
struct LineValues {
    bits: u64,
    mask: u64,
}

// The sizes `linux/gpio.h` gives them (the ioctl numbers encode them).
const _: () = assert!(std::mem::size_of::<LineRequest>() == 592);
const _: () = assert!(std::mem::size_of::<LineValues>() == 16);

/// Granted lines, requested.
pub struct Lines {
    pub name: String,
    request: File,
    count: usize,
    pub output: bool,
}

/// Opens the chip, requests the lines (outputs start low), and keeps the request.
pub fn open(grant: &GpioLines) -> io::Result<Lines> {
    let chip = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&grant.chip)?;
    if grant.lines.is_empty() || grant.lines.len() > LINES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad line count",
        ));
    }
    // SAFETY: a plain-data struct the kernel reads; all zeroes is its empty value.
    let mut req: LineRequest = unsafe { std::mem::zeroed() };
    req.offsets[..grant.lines.len()].copy_from_slice(&grant.lines);
    let consumer = format!("kilnd:{}", grant.name);
    let n = consumer.len().min(NAME_SIZE - 1);
    req.consumer[..n].copy_from_slice(&consumer.as_bytes()[..n]);
    req.config.flags = if grant.output {
        FLAG_OUTPUT
    } else {
        FLAG_INPUT
    };
    req.num_lines = grant.lines.len() as u32;
    // SAFETY: `req` is a valid gpio_v2_line_request the kernel fills `fd` of.
    let r = unsafe { libc::ioctl(chip.as_raw_fd(), GET_LINE as _, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel handed over this descriptor; it is owned from here on.
    let request = unsafe { File::from_raw_fd(req.fd) };
    Ok(Lines {
        name: grant.name.clone(),
        request,
        count: grant.lines.len(),
        output: grant.output,
    })
}

impl Lines {
    fn all(&self) -> u64 {
        (1u64 << self.count) - 1
    }

    /// The lines' values, bit `i` for the grant's `i`th line.
    pub fn read(&self) -> io::Result<u64> {
        let mut v = LineValues {
            bits: 0,
            mask: self.all(),
        };
        // SAFETY: a valid gpio_v2_line_values on the request's descriptor.
        let r = unsafe { libc::ioctl(self.request.as_raw_fd(), GET_VALUES as _, &mut v) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(v.bits & self.all())
    }

    /// Drives the lines whose bit is set in `mask` to their bit in `values`.
    pub fn write(&self, values: u64, mask: u64) -> io::Result<()> {
        let mut v = LineValues {
            bits: values & self.all(),
            mask: mask & self.all(),
        };
        if v.mask == 0 {
            return Ok(());
        }
        // SAFETY: a valid gpio_v2_line_values on the request's descriptor.
        let r = unsafe { libc::ioctl(self.request.as_raw_fd(), SET_VALUES as _, &mut v) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_numbers_are_the_kernels() {
        // linux/gpio.h, as the kernel's headers expand them.
        assert_eq!(GET_LINE, 0xC250_B407);
        assert_eq!(GET_VALUES, 0xC010_B40E);
        assert_eq!(SET_VALUES, 0xC010_B40F);
    }

    #[test]
    fn a_missing_chip_is_an_error_naming_the_cause() {
        let e = open(&GpioLines {
            name: "relays".into(),
            chip: "/dev/kiln-no-such-gpiochip".into(),
            lines: vec![0],
            output: true,
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
