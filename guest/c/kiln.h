/*
 * kiln.h: write kiln reactor modules in C. Header-only; include it and build with
 *
 *   clang-19 --target=wasm32-wasi -mexec-model=reactor -O2 -s -I guest/c module.c -o module.wasm
 *
 * then `kiln compile module.wasm --target ... --sign ...`. The book's page
 * docs/src/c-sdk.md has the whole walk-through; the ABI itself is
 * protocol/src/abi.rs (docs/src/abi.md), version 1, which this header follows.
 *
 * What a module provides (define the ones you need; this header declares them with
 * their export names, so a definition is exported without any linker flag):
 *
 *   int32_t kiln_init(void);                once after instantiation (after WASI's
 *                                           _initialize); non-zero fails the start
 *   int32_t kiln_tick(void);                every tick_ms; non-zero is reported as a
 *                                           failed tick
 *   int32_t kiln_on_message(int32_t len);   once per message routed to the module
 *                                           (kilnd.toml's `inbox`); `len` is the
 *                                           message's length in bytes
 *   int32_t kiln_self_test(void);           optional, once after kiln_init; non-zero
 *                                           fails the start (an update on trial then
 *                                           rolls back)
 *
 * What the device provides: the imports of module `kiln` below, each with a typed
 * wrapper. Every call that returns int32_t returns a count (>= 0) or a negative
 * kiln_status; a pointer outside the module's memory gets KILN_E_OUT_OF_BOUNDS back,
 * never a trap. kilnd checks every import by name when a module starts and names the
 * one it does not provide, so there is no version call to make: a module built
 * against this header starts on every kilnd that speaks ABI version 1.
 *
 * The optional helpers at the end (kiln_logf, kiln_publishf, kiln_config_value) use
 * wasi-libc's vsnprintf and the module's stack (the buffer sizes are macros you may
 * define before the #include). Define KILN_NO_LIBC to leave them out and use the raw
 * calls only (then no libc function is linked in by this header).
 */
#ifndef KILN_H
#define KILN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The kiln host ABI version this header is written against. */
#define KILN_ABI_VERSION 1

/* Largest stream name, telemetry record and log line the device accepts. */
#define KILN_MAX_STREAM 64
#define KILN_MAX_PUBLISH (64 * 1024)
#define KILN_MAX_LOG (4 * 1024)

/* Negative results of the calls. The first four come from the device; the last two
 * only from this header's helpers. */
typedef enum kiln_status {
    KILN_OK = 0,
    /* a pointer/length pair is outside the module's memory */
    KILN_E_OUT_OF_BOUNDS = -1,
    /* more than the ABI accepts (KILN_MAX_*), or than a helper's buffer holds */
    KILN_E_TOO_LARGE = -2,
    /* a kiln_message_* call outside kiln_on_message */
    KILN_E_NO_MESSAGE = -3,
    /* a stream name that is empty, longer than 64 bytes or not [A-Za-z0-9._-]; a log
     * level outside 0..4 */
    KILN_E_INVALID = -4,
    /* a capability the module was not granted (a serial port, GPIO lines or an I2C
     * device by that name), or a write to GPIO lines granted as inputs */
    KILN_E_DENIED = -5,
    /* the device said no (an I/O error on a serial port, GPIO chip or I2C bus); try
     * again */
    KILN_E_IO = -6,
    /* kiln_config_value: the config has no such key (helpers only) */
    KILN_E_NOT_FOUND = -100,
    /* a helper's output did not fit the caller's buffer (helpers only) */
    KILN_E_TRUNCATED = -101
} kiln_status;

/* Log levels, as the numbers the ABI uses. */
typedef enum kiln_level {
    KILN_ERROR = 0,
    KILN_WARN = 1,
    KILN_INFO = 2,
    KILN_DEBUG = 3,
    KILN_TRACE = 4
} kiln_level;

/* What a status means, as a constant string ("ok" for 0 and any count). */
static inline const char *kiln_strerror(int32_t status) {
    switch (status) {
    case KILN_E_OUT_OF_BOUNDS: return "buffer outside the module's memory";
    case KILN_E_TOO_LARGE: return "larger than the kiln ABI accepts";
    case KILN_E_NO_MESSAGE: return "no message is being delivered";
    case KILN_E_INVALID: return "invalid argument";
    case KILN_E_DENIED: return "not granted to this module";
    case KILN_E_IO: return "the device reported an I/O error";
    case KILN_E_NOT_FOUND: return "no such config key";
    case KILN_E_TRUNCATED: return "did not fit the buffer";
    default: return status >= 0 ? "ok" : "unknown kiln status";
    }
}

/* ---- The module's exports (defined by you, exported under these names) ---------- */

#define KILN_EXPORT(name) __attribute__((export_name(#name)))

KILN_EXPORT(kiln_init) int32_t kiln_init(void);
KILN_EXPORT(kiln_tick) int32_t kiln_tick(void);
KILN_EXPORT(kiln_on_message) int32_t kiln_on_message(int32_t len);
KILN_EXPORT(kiln_self_test) int32_t kiln_self_test(void);

/* ---- The raw imports of module `kiln` (ABI version 1) ----------------------------
 * Pointers are offsets into the module's memory, lengths are in bytes. */

#define KILN_IMPORT(name) __attribute__((import_module("kiln"), import_name(#name)))

KILN_IMPORT(publish)
int32_t kiln_abi_publish(const void *stream, int32_t stream_len, const void *data,
                         int32_t data_len);
KILN_IMPORT(log) int32_t kiln_abi_log(int32_t level, const void *line, int32_t len);
KILN_IMPORT(config_len) int32_t kiln_abi_config_len(void);
KILN_IMPORT(config_read) int32_t kiln_abi_config_read(void *buf, int32_t len);
KILN_IMPORT(message_len) int32_t kiln_abi_message_len(void);
KILN_IMPORT(message_read) int32_t kiln_abi_message_read(void *buf, int32_t len);
KILN_IMPORT(message_topic) int32_t kiln_abi_message_topic(void *buf, int32_t len);
KILN_IMPORT(monotonic_ns) int64_t kiln_abi_monotonic_ns(void);
KILN_IMPORT(wall_ns) int64_t kiln_abi_wall_ns(void);
KILN_IMPORT(reply) int32_t kiln_abi_reply(const void *data, int32_t len);
KILN_IMPORT(serial_open) int32_t kiln_abi_serial_open(const void *name, int32_t len);
KILN_IMPORT(serial_read)
int32_t kiln_abi_serial_read(int32_t port, void *buf, int32_t len, int32_t wait_ms);
KILN_IMPORT(serial_write)
int32_t kiln_abi_serial_write(int32_t port, const void *data, int32_t len, int32_t wait_ms);
KILN_IMPORT(gpio_open) int32_t kiln_abi_gpio_open(const void *name, int32_t len);
KILN_IMPORT(gpio_read) int32_t kiln_abi_gpio_read(int32_t lines);
KILN_IMPORT(gpio_write) int32_t kiln_abi_gpio_write(int32_t lines, int32_t values, int32_t mask);
KILN_IMPORT(i2c_open) int32_t kiln_abi_i2c_open(const void *name, int32_t len);
KILN_IMPORT(i2c_read)
int32_t kiln_abi_i2c_read(int32_t device, int32_t reg, void *buf, int32_t len);
KILN_IMPORT(i2c_write)
int32_t kiln_abi_i2c_write(int32_t device, int32_t reg, const void *data, int32_t len);
KILN_IMPORT(file_open) int32_t kiln_abi_file_open(const void *name, int32_t len);
KILN_IMPORT(file_read) int32_t kiln_abi_file_read(int32_t file, void *buf, int32_t len);

/* ---- Typed wrappers ------------------------------------------------------------- */

static inline size_t kiln__strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

/* A length as the ABI's int32_t: anything past INT32_MAX is surely too large. */
static inline int32_t kiln__len(size_t len) {
    return len > (size_t)INT32_MAX ? INT32_MAX : (int32_t)len;
}

/* Publishes one telemetry record of `len` bytes on `stream` (a NUL-terminated name,
 * 1..64 bytes of [A-Za-z0-9._-]). The record goes out as the device's telemetry,
 * batched and spooled like every other (docs/src/telemetry.md).
 * Returns KILN_OK, KILN_E_INVALID (the stream name), KILN_E_TOO_LARGE (a name over 64
 * bytes or data over KILN_MAX_PUBLISH) or KILN_E_OUT_OF_BOUNDS. */
static inline int32_t kiln_publish(const char *stream, const void *data, size_t len) {
    return kiln_abi_publish(stream, kiln__len(kiln__strlen(stream)), data, kiln__len(len));
}

/* kiln_publish with a NUL-terminated text record. */
static inline int32_t kiln_publish_str(const char *stream, const char *text) {
    return kiln_publish(stream, text, kiln__strlen(text));
}

/* Sends one log line of `len` bytes at `level` (KILN_ERROR .. KILN_TRACE); it is
 * stored as UTF-8, invalid bytes replaced. Returns KILN_OK, KILN_E_INVALID (the
 * level), KILN_E_TOO_LARGE (over KILN_MAX_LOG) or KILN_E_OUT_OF_BOUNDS. */
static inline int32_t kiln_log_n(kiln_level level, const char *line, size_t len) {
    return kiln_abi_log((int32_t)level, line, kiln__len(len));
}

/* kiln_log_n with a NUL-terminated line. */
static inline int32_t kiln_log(kiln_level level, const char *line) {
    return kiln_log_n(level, line, kiln__strlen(line));
}

/* Length in bytes of this module's config (kilnd.toml's `config` or `config_file`;
 * 0 when it has none). Never fails. */
static inline int32_t kiln_config_len(void) {
    return kiln_abi_config_len();
}

/* Copies up to `cap` bytes of the config into `buf` (no NUL added) and returns how
 * many it copied: less than kiln_config_len() when `buf` is too small. Errors:
 * KILN_E_OUT_OF_BOUNDS. */
static inline int32_t kiln_config_read(void *buf, size_t cap) {
    return kiln_abi_config_read(buf, kiln__len(cap));
}

/* Inside kiln_on_message only (elsewhere they return KILN_E_NO_MESSAGE): */

/* Length in bytes of the message being delivered (the same as kiln_on_message's
 * `len`). */
static inline int32_t kiln_message_len(void) {
    return kiln_abi_message_len();
}

/* Copies up to `cap` bytes of the message into `buf` (no NUL added); returns the
 * count. Errors: KILN_E_NO_MESSAGE, KILN_E_OUT_OF_BOUNDS. */
static inline int32_t kiln_message_read(void *buf, size_t cap) {
    return kiln_abi_message_read(buf, kiln__len(cap));
}

/* Whether the message being delivered is a command from the fleet (`kiln send`): its
 * topic is `command/<topic>`. */
static inline int kiln_is_command(const char *topic) {
    const char *p = "command/";
    while (*p && *topic == *p) { p++; topic++; }
    return *p == '\0';
}

/* The reply to the command being delivered (at most 16 KiB; the last call counts):
 * `kiln send` prints it with kiln_on_message's return value. Errors:
 * KILN_E_NO_MESSAGE (not in a command), KILN_E_TOO_LARGE, KILN_E_OUT_OF_BOUNDS. */
static inline int32_t kiln_reply(const void *data, size_t len) {
    return kiln_abi_reply(data, kiln__len(len));
}

/* Copies the message's topic, `module/stream` of its sender, NUL-terminated, into
 * `buf` (at most cap - 1 bytes of it; `cap` must be at least 1); returns its length;
 * for a command from the fleet, `command/<topic>`. A topic is at most 129 bytes (two names of at most 64 and a slash), so a buffer
 * of 130 bytes always holds it. Errors: KILN_E_NO_MESSAGE, KILN_E_OUT_OF_BOUNDS. */
static inline int32_t kiln_message_topic(char *buf, size_t cap) {
    if (cap == 0) return KILN_E_TRUNCATED;
    int32_t n = kiln_abi_message_topic(buf, kiln__len(cap - 1));
    buf[n >= 0 ? n : 0] = '\0';
    return n;
}

/* ---- Serial ports (the `serial` capability) ---------------------------------------
 * Only ports kilnd.toml grants this module ([[serial]] ... modules = ["NAME"]); a
 * module that uses these without a grant is refused at load. kilnd opens the port and
 * sets its baud and framing; the module reads and writes bytes. */

/* A handle to the port granted under `name`. Errors: KILN_E_DENIED. */
static inline int32_t kiln_serial_open(const char *name) {
    return kiln_abi_serial_open(name, kiln__len(kiln__strlen(name)));
}

/* Bytes read into `buf` (at most 4096 per call), 0 if none came within `wait_ms`
 * (at most 5000; keep it under the module's timeout_ms). Errors: KILN_E_INVALID (a bad
 * handle), KILN_E_IO, KILN_E_OUT_OF_BOUNDS. */
static inline int32_t kiln_serial_read(int32_t port, void *buf, size_t cap, int32_t wait_ms) {
    return kiln_abi_serial_read(port, buf, kiln__len(cap), wait_ms);
}

/* Bytes the port took (at most 4096 per call), 0 if it took none within `wait_ms`.
 * Errors: KILN_E_INVALID, KILN_E_IO, KILN_E_TOO_LARGE, KILN_E_OUT_OF_BOUNDS. */
static inline int32_t kiln_serial_write(int32_t port, const void *data, size_t len,
                                        int32_t wait_ms) {
    return kiln_abi_serial_write(port, data, kiln__len(len), wait_ms);
}

/* ---- GPIO lines and I2C devices (the `gpio` and `i2c` capabilities) ---------------
 * Likewise only what kilnd.toml grants ([[gpio]] lines of a chip, all inputs or all
 * outputs; [[i2c]] one device, a bus and a 7-bit address). kilnd requests the lines
 * and binds the bus to the address; the module reads and writes values. */

/* A handle to the lines granted under `name`. Errors: KILN_E_DENIED. */
static inline int32_t kiln_gpio_open(const char *name) {
    return kiln_abi_gpio_open(name, kiln__len(kiln__strlen(name)));
}

/* The lines' values: bit i is the grant's i-th line (at most 16). Errors:
 * KILN_E_INVALID (a bad handle), KILN_E_IO. */
static inline int32_t kiln_gpio_read(int32_t lines) {
    return kiln_abi_gpio_read(lines);
}

/* Drives the lines whose bit is set in `mask` to their bit in `values`. Errors:
 * KILN_E_DENIED (lines granted as inputs), KILN_E_INVALID, KILN_E_IO. */
static inline int32_t kiln_gpio_write(int32_t lines, uint16_t values, uint16_t mask) {
    return kiln_abi_gpio_write(lines, values, mask);
}

/* A handle to the device granted under `name`. Errors: KILN_E_DENIED. */
static inline int32_t kiln_i2c_open(const char *name) {
    return kiln_abi_i2c_open(name, kiln__len(kiln__strlen(name)));
}

/* Reads `len` bytes (1 to 32) from register `reg` into `buf`: 1 is an SMBus "read
 * byte data", more an I2C block read. Returns the count. Errors: KILN_E_INVALID,
 * KILN_E_TOO_LARGE, KILN_E_IO (no device answered), KILN_E_OUT_OF_BOUNDS. */
static inline int32_t kiln_i2c_read(int32_t device, uint8_t reg, void *buf, size_t len) {
    return kiln_abi_i2c_read(device, reg, buf, kiln__len(len));
}

/* Writes `len` bytes (1 to 32) to register `reg`. Returns the count. Errors as
 * kiln_i2c_read. */
static inline int32_t kiln_i2c_write(int32_t device, uint8_t reg, const void *data,
                                     size_t len) {
    return kiln_abi_i2c_write(device, reg, data, kiln__len(len));
}

/* Edges of GPIO inputs granted with `edges` in kilnd.toml arrive in kiln_on_message
 * before the next tick, on topic "gpio/NAME", as {"line":0,"edge":"rising","ns":123}
 * (line: the input's place in the grant). */

/* ---- Read-only files (the `file` capability) --------------------------------------
 * A file kilnd.toml grants this module ([[file]]), such as an IIO sensor's attribute
 * under /sys: each read returns it as it is now, from its start. */

/* A handle to the file granted under `name`. Errors: KILN_E_DENIED. */
static inline int32_t kiln_file_open(const char *name) {
    return kiln_abi_file_open(name, kiln__len(kiln__strlen(name)));
}

/* The file from its start into `buf`, at most `cap` (and 4096) bytes; returns the
 * count. Errors: KILN_E_INVALID, KILN_E_IO, KILN_E_OUT_OF_BOUNDS. */
static inline int32_t kiln_file_read(int32_t file, void *buf, size_t cap) {
    return kiln_abi_file_read(file, buf, kiln__len(cap));
}

/* Nanoseconds since the worker started; never goes backwards. */
static inline int64_t kiln_monotonic_ns(void) {
    return kiln_abi_monotonic_ns();
}

/* Nanoseconds since the Unix epoch, by the device's clock (which may jump). */
static inline int64_t kiln_wall_ns(void) {
    return kiln_abi_wall_ns();
}

/* ---- Helpers (libc: vsnprintf; stack buffers) ----------------------------------- */

#ifndef KILN_NO_LIBC
#include <stdarg.h>
#include <stdio.h>

/* Buffer sizes of the helpers, on the module's stack (wasm-ld's default stack is 64
 * KiB). Define them before #include "kiln.h" to change them. */
#ifndef KILN_LOGF_MAX
#define KILN_LOGF_MAX 512
#endif
#ifndef KILN_PUBLISHF_MAX
#define KILN_PUBLISHF_MAX 1024
#endif
#ifndef KILN_CONFIG_MAX
#define KILN_CONFIG_MAX 4096
#endif

/* printf-style log line; a line longer than KILN_LOGF_MAX - 1 bytes is cut there
 * (a log line is still worth having). Returns what kiln_log_n returns. */
__attribute__((format(printf, 2, 3)))
static inline int32_t kiln_logf(kiln_level level, const char *fmt, ...) {
    char line[KILN_LOGF_MAX];
    va_list args;
    va_start(args, fmt);
    int n = vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    if (n < 0) return KILN_E_INVALID;
    if ((size_t)n >= sizeof line) n = (int)sizeof line - 1;
    return kiln_log_n(level, line, (size_t)n);
}

#define kiln_error(...) kiln_logf(KILN_ERROR, __VA_ARGS__)
#define kiln_warn(...) kiln_logf(KILN_WARN, __VA_ARGS__)
#define kiln_info(...) kiln_logf(KILN_INFO, __VA_ARGS__)
#define kiln_debug(...) kiln_logf(KILN_DEBUG, __VA_ARGS__)
#define kiln_trace(...) kiln_logf(KILN_TRACE, __VA_ARGS__)

/* printf-style telemetry record on `stream`. A record that does not fit
 * KILN_PUBLISHF_MAX - 1 bytes is not published (a cut record would be wrong data):
 * KILN_E_TRUNCATED. Otherwise returns what kiln_publish returns. */
__attribute__((format(printf, 2, 3)))
static inline int32_t kiln_publishf(const char *stream, const char *fmt, ...) {
    char record[KILN_PUBLISHF_MAX];
    va_list args;
    va_start(args, fmt);
    int n = vsnprintf(record, sizeof record, fmt, args);
    va_end(args);
    if (n < 0) return KILN_E_INVALID;
    if ((size_t)n >= sizeof record) return KILN_E_TRUNCATED;
    return kiln_publish(stream, record, (size_t)n);
}

static inline int kiln__space(char c) {
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
}

/* The value of `key` in a config of `key=value` lines (the common small text config,
 * read the same way as the Rust SDK's config_value: the first line whose text before
 * its first `=`, trimmed, is `key`; the value trimmed). Copies it NUL-terminated into
 * `out` and returns its length. Errors: KILN_E_NOT_FOUND (no such line, or no config),
 * KILN_E_TRUNCATED (the value does not fit `cap`), KILN_E_TOO_LARGE (the config is
 * longer than KILN_CONFIG_MAX; read it with kiln_config_read instead). */
static inline int32_t kiln_config_value(const char *key, char *out, size_t cap) {
    char config[KILN_CONFIG_MAX];
    int32_t len = kiln_config_len();
    if (len > (int32_t)sizeof config) return KILN_E_TOO_LARGE;
    len = kiln_config_read(config, sizeof config);
    if (len < 0) return len;
    size_t klen = kiln__strlen(key);
    size_t i = 0;
    while (i < (size_t)len) {
        size_t start = i, end = i, eq = (size_t)-1;
        while (end < (size_t)len && config[end] != '\n') {
            if (config[end] == '=' && eq == (size_t)-1) eq = end;
            end++;
        }
        i = end + 1;
        if (eq == (size_t)-1) continue;
        size_t ks = start, ke = eq;
        while (ks < ke && kiln__space(config[ks])) ks++;
        while (ke > ks && kiln__space(config[ke - 1])) ke--;
        if (ke - ks != klen) continue;
        size_t j = 0;
        while (j < klen && config[ks + j] == key[j]) j++;
        if (j != klen) continue;
        size_t vs = eq + 1, ve = end;
        while (vs < ve && kiln__space(config[vs])) vs++;
        while (ve > vs && kiln__space(config[ve - 1])) ve--;
        if (ve - vs >= cap) return KILN_E_TRUNCATED;
        for (j = 0; j < ve - vs; j++) out[j] = config[vs + j];
        out[ve - vs] = '\0';
        return (int32_t)(ve - vs);
    }
    return KILN_E_NOT_FOUND;
}
#endif /* KILN_NO_LIBC */

#ifdef __cplusplus
}
#endif

#endif /* KILN_H */
