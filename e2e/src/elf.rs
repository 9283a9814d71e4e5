//! What the tests ask of a kilnd binary's ELF header and program headers: whether it
//! is position-independent and whether it names a program interpreter (is dynamically
//! linked). ELF64, little-endian: every device target.

use std::path::Path;

const ET_DYN: u16 = 3;
const PT_INTERP: u32 = 3;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn read(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.len() >= 64 && bytes[..4] == *b"\x7fELF" && bytes[4] == 2 && bytes[5] == 1,
        "{}: not a 64-bit little-endian ELF file",
        path.display()
    );
    bytes
}

/// ET_DYN: the kernel (or the binary's own start code) places it at a random address.
pub fn is_position_independent(path: &Path) -> bool {
    u16_at(&read(path), 16) == ET_DYN
}

/// A PT_INTERP program header: the dynamic loader runs before the binary does.
pub fn has_interpreter(path: &Path) -> bool {
    let b = read(path);
    let (phoff, size, count) = (
        u64_at(&b, 0x20) as usize,
        u16_at(&b, 0x36) as usize,
        u16_at(&b, 0x38) as usize,
    );
    (0..count).any(|i| u32_at(&b, phoff + i * size) == PT_INTERP)
}
