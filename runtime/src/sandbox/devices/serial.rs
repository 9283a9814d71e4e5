//! The serial capability's host side: a granted port opened and set to raw mode, its
//! baud and framing, by the worker before it confines itself (`confine` then leaves it
//! only this descriptor, not the device directory), and reads and writes that wait at
//! most a bounded time with `poll`, so a silent sensor never hangs a call.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use kiln_protocol::capability::{Framing, Parity, SerialPort, MAX_SERIAL_WAIT_MS};

/// A granted port, opened.
pub struct Port {
    pub name: String,
    file: File,
}

/// Opens `port` non-blocking, as no controlling terminal, and sets it to raw mode at
/// its baud and framing.
pub fn open(port: &SerialPort) -> io::Result<Port> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&port.path)?;
    configure(&file, port.baud, port.framing)?;
    Ok(Port {
        name: port.name.clone(),
        file,
    })
}

fn speed(baud: u32) -> io::Result<libc::speed_t> {
    Ok(match baud {
        1200 => libc::B1200,
        2400 => libc::B2400,
        4800 => libc::B4800,
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        460800 => libc::B460800,
        921600 => libc::B921600,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("baud {baud} is not supported"),
            ))
        }
    })
}

/// Both directions at one speed, as glibc's `cfsetispeed`/`cfsetospeed` set them on
/// Linux (a test compares): the speed's code in `CBAUD` of `c_cflag` and in
/// `c_ispeed`/`c_ospeed`. Set here because the libc crate binds those two functions to
/// versioned glibc symbols, which the static kilnd cannot link.
fn set_speed(t: &mut libc::termios, speed: libc::speed_t) {
    t.c_cflag = (t.c_cflag & !libc::CBAUD) | speed;
    t.c_ispeed = speed;
    t.c_ospeed = speed;
}

fn configure(file: &File, baud: u32, framing: Framing) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: termios is plain data filled by tcgetattr before it is read; fd is open.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut t);
        let s = speed(baud)?;
        set_speed(&mut t, s);
        t.c_cflag &= !(libc::CSIZE | libc::PARENB | libc::PARODD | libc::CSTOPB | libc::CRTSCTS);
        t.c_cflag |= libc::CREAD | libc::CLOCAL;
        t.c_cflag |= if framing.data_bits == 7 {
            libc::CS7
        } else {
            libc::CS8
        };
        match framing.parity {
            Parity::None => {}
            Parity::Even => t.c_cflag |= libc::PARENB,
            Parity::Odd => t.c_cflag |= libc::PARENB | libc::PARODD,
        }
        if framing.stop_bits == 2 {
            t.c_cflag |= libc::CSTOPB;
        }
        t.c_cc[libc::VMIN] = 0;
        t.c_cc[libc::VTIME] = 0;
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Port {
    /// Waits at most `wait_ms` until the port is ready for `events`.
    fn ready(&self, events: libc::c_short, wait_ms: u32) -> io::Result<bool> {
        let wait = wait_ms.min(MAX_SERIAL_WAIT_MS) as libc::c_int;
        crate::poll::ready(self.file.as_raw_fd(), events, wait)
    }

    /// What came within `wait_ms` (nothing: an empty read).
    pub fn read(&mut self, buf: &mut [u8], wait_ms: u32) -> io::Result<usize> {
        if !self.ready(libc::POLLIN, wait_ms)? {
            return Ok(0);
        }
        match self.file.read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// What the port took within `wait_ms`.
    pub fn write(&mut self, data: &[u8], wait_ms: u32) -> io::Result<usize> {
        if !self.ready(libc::POLLOUT, wait_ms)? {
            return Ok(0);
        }
        match self.file.write(data) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pty pair: the test holds the master as the sensor, the port is the slave.
    fn pty() -> (File, String) {
        // SAFETY: openpty fills two descriptors and a name buffer of its size.
        unsafe {
            let (mut master, mut slave) = (0, 0);
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(
                libc::openpty(
                    &mut master,
                    &mut slave,
                    name.as_mut_ptr(),
                    std::ptr::null(),
                    std::ptr::null()
                ),
                0
            );
            libc::close(slave);
            let path = std::ffi::CStr::from_ptr(name.as_ptr())
                .to_string_lossy()
                .into_owned();
            (std::os::fd::FromRawFd::from_raw_fd(master), path)
        }
    }

    #[test]
    fn set_speed_sets_what_glibcs_cfsetispeed_and_cfsetospeed_set() {
        for baud in [1200, 9600, 38400, 57600, 115200, 230400, 921600] {
            let code = speed(baud).expect("a supported baud");
            // SAFETY: termios is plain data; both start from the same raw-mode bytes.
            let (ours, glibcs) = unsafe {
                let mut t: libc::termios = std::mem::zeroed();
                libc::cfmakeraw(&mut t);
                t.c_cflag |= libc::B2400;
                let mut glibcs = t;
                libc::cfsetispeed(&mut glibcs, code);
                libc::cfsetospeed(&mut glibcs, code);
                set_speed(&mut t, code);
                (t, glibcs)
            };
            assert_eq!(ours.c_cflag, glibcs.c_cflag, "c_cflag at {baud}");
            assert_eq!(ours.c_iflag, glibcs.c_iflag, "c_iflag at {baud}");
            assert_eq!(ours.c_ispeed, glibcs.c_ispeed, "c_ispeed at {baud}");
            assert_eq!(ours.c_ospeed, glibcs.c_ospeed, "c_ospeed at {baud}");
            // SAFETY: reads two fields of a filled termios.
            unsafe {
                assert_eq!(libc::cfgetispeed(&ours), code);
                assert_eq!(libc::cfgetospeed(&ours), code);
            }
        }
    }

    #[test]
    fn a_port_reads_what_the_other_end_wrote_and_waits_no_longer_than_asked() {
        let (mut sensor, path) = pty();
        let mut port = open(&SerialPort {
            name: "gps".into(),
            path,
            baud: 9600,
            framing: "8N1".parse().unwrap(),
        })
        .unwrap();
        let mut buf = [0u8; 64];
        let started = std::time::Instant::now();
        assert_eq!(port.read(&mut buf, 50).unwrap(), 0);
        assert!(started.elapsed() >= std::time::Duration::from_millis(45));
        sensor.write_all(b"$GPGGA,1\r\n").unwrap();
        let n = port.read(&mut buf, 1000).unwrap();
        assert_eq!(&buf[..n], b"$GPGGA,1\r\n");
        assert_eq!(port.write(b"PING\r\n", 1000).unwrap(), 6);
        let mut back = [0u8; 6];
        sensor.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"PING\r\n");
    }

    #[test]
    fn a_missing_port_is_an_error_naming_the_cause() {
        let e = open(&SerialPort {
            name: "gps".into(),
            path: "/dev/kiln-no-such-tty".into(),
            baud: 9600,
            framing: Framing::default(),
        })
        .err()
        .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
