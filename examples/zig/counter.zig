//! The Zig twin of examples/c/counter.c and examples/fixtures/counter.wat, written
//! against the kiln host ABI directly (docs/src/abi.md): each tick publishes `burst`
//! records on stream `n`, each the next value of a counter as 8 hex digits
//! (00000001, 00000002, ...). `burst` is the config as a decimal number (10 without
//! config). Built for wasm32-freestanding, so it imports nothing but `kiln` and runs
//! on the lean kilnd too. Built by scripts/zig-examples.sh with Zig from PyPI.

extern "kiln" fn publish(stream: [*]const u8, stream_len: i32, data: [*]const u8, data_len: i32) i32;
extern "kiln" fn log(level: i32, line: [*]const u8, len: i32) i32;
extern "kiln" fn config_read(buf: [*]u8, len: i32) i32;

var n: u32 = 0;
var burst: u32 = 10;

export fn kiln_init() i32 {
    var config: [16]u8 = undefined;
    const len = config_read(&config, config.len);
    if (len > 0) {
        var v: u32 = 0;
        for (config[0..@intCast(len)]) |c| {
            if (c < '0' or c > '9') {
                const msg = "init failed: the config is not a decimal number";
                _ = log(0, msg, msg.len);
                return 1;
            }
            v = v *% 10 +% (c - '0');
        }
        burst = v;
    }
    return 0;
}

export fn kiln_tick() i32 {
    const hex = "0123456789abcdef";
    var k: u32 = 0;
    while (k < burst) : (k += 1) {
        var record: [8]u8 = undefined;
        n +%= 1;
        for (&record, 0..) |*digit, i| {
            const shift: u5 = @intCast(28 - 4 * i);
            digit.* = hex[(n >> shift) & 15];
        }
        if (publish("n", 1, &record, record.len) < 0) return 1;
    }
    return 0;
}
