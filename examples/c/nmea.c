/*
 * A GPS receiver on a serial port (the `serial` capability: kilnd.toml grants the
 * port as `gps` to this module). Each tick it reads what the receiver sent, and for
 * each NMEA GGA sentence (a position fix) whose checksum holds it publishes on `fix`:
 *
 *   {"time":"123519","lat_udeg":48117300,"lon_udeg":11516666,"sats":8,"alt_dm":5454,"bad":0}
 *
 * Positions in micro-degrees and the altitude in decimetres are integers, so the Rust
 * version (examples/nmea) prints the same bytes. `bad` counts the sentences refused
 * so far (a checksum that does not hold, a field that is not a number, a line longer
 * than 82 characters, as NMEA 0183 allows). Config: `port=gps` (the default).
 * Built by scripts/c-examples.sh.
 */
#include <stdint.h>
#include <string.h>

#include "kiln.h"

static int32_t port = -1;
static char line[83];
static size_t used;
static int too_long;
static uint32_t bad;

int32_t kiln_init(void) {
    char name[65] = "gps";
    if (kiln_config_value("port", name, sizeof name) == KILN_E_TRUNCATED) return 1;
    port = kiln_serial_open(name);
    if (port < 0) {
        kiln_error("no serial port `%s`: %s", name, kiln_strerror(port));
        return 1;
    }
    kiln_info("reading NMEA from serial port `%s`", name);
    return 0;
}

static int hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The n-th comma-separated field of `s` (0 is the sentence id), copied into `out`. */
static int field(const char *s, int n, char *out, size_t cap) {
    for (; n > 0; n--) {
        s = strchr(s, ',');
        if (!s) return 0;
        s++;
    }
    size_t len = strcspn(s, ",*");
    if (len >= cap) return 0;
    memcpy(out, s, len);
    out[len] = '\0';
    return 1;
}

/* Digits only, at least one. */
static int digits(const char *s, int64_t *out) {
    int64_t v = 0;
    if (!*s) return 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > 100000000000LL) return 0;
        v = v * 10 + (*s - '0');
    }
    *out = v;
    return 1;
}

/* `ddmm.mmmm` (or `dddmm.mmmm`) and its hemisphere, in micro-degrees. */
static int degrees(const char *text, const char *hemisphere, int64_t *out) {
    char whole[12], frac[8] = "0";
    const char *dot = strchr(text, '.');
    size_t w = dot ? (size_t)(dot - text) : strlen(text);
    if (w < 3 || w >= sizeof whole) return 0;
    memcpy(whole, text, w);
    whole[w] = '\0';
    if (dot && dot[1]) {
        if (strlen(dot + 1) > 6) return 0;
        strcpy(frac, dot + 1);
    }
    int64_t ddmm, f, scale = 1;
    if (!digits(whole, &ddmm) || !digits(frac, &f)) return 0;
    for (size_t i = dot && dot[1] ? strlen(dot + 1) : 1; i > 0; i--) scale *= 10;
    int64_t minutes = ddmm % 100;
    if (minutes >= 60) return 0;
    int64_t v = (ddmm / 100) * 1000000 + (minutes * scale + f) * 1000000 / (60 * scale);
    if (!strcmp(hemisphere, "S") || !strcmp(hemisphere, "W")) v = -v;
    else if (strcmp(hemisphere, "N") && strcmp(hemisphere, "E")) return 0;
    *out = v;
    return 1;
}

/* `545.4` (or `-12`) in decimetres. */
static int decimetres(const char *text, int64_t *out) {
    int negative = *text == '-';
    if (negative) text++;
    char whole[12];
    const char *dot = strchr(text, '.');
    size_t w = dot ? (size_t)(dot - text) : strlen(text);
    if (w == 0 || w >= sizeof whole) return 0;
    memcpy(whole, text, w);
    whole[w] = '\0';
    int64_t v, tenth = 0;
    if (!digits(whole, &v)) return 0;
    if (dot && dot[1]) {
        if (dot[1] < '0' || dot[1] > '9') return 0;
        tenth = dot[1] - '0';
    }
    v = v * 10 + tenth;
    *out = negative ? -v : v;
    return 1;
}

static void sentence(const char *s) {
    /* $..GGA,...*hh with the XOR of what is between $ and * */
    const char *star = strrchr(s, '*');
    if (s[0] != '$' || !star || strlen(star) != 3) goto refused;
    unsigned sum = 0;
    for (const char *p = s + 1; p < star; p++) sum ^= (unsigned char)*p;
    int hi = hex(star[1]), lo = hex(star[2]);
    if (hi < 0 || lo < 0 || (unsigned)(hi * 16 + lo) != sum) goto refused;
    if (strncmp(s + 3, "GGA,", 4)) return; /* another sentence: not ours */
    char time[16], lat[16], ns[4], lon[16], ew[4], sats[4], alt[16];
    int64_t lat_udeg, lon_udeg, n, alt_dm;
    if (!field(s, 1, time, sizeof time) || !field(s, 2, lat, sizeof lat) ||
        !field(s, 3, ns, sizeof ns) || !field(s, 4, lon, sizeof lon) ||
        !field(s, 5, ew, sizeof ew) || !field(s, 7, sats, sizeof sats) ||
        !field(s, 9, alt, sizeof alt))
        goto refused;
    if (strlen(time) < 6 || !degrees(lat, ns, &lat_udeg) || !degrees(lon, ew, &lon_udeg) ||
        !digits(sats, &n) || !decimetres(alt, &alt_dm))
        goto refused;
    time[6] = '\0';
    kiln_publishf("fix",
                  "{\"time\":\"%s\",\"lat_udeg\":%lld,\"lon_udeg\":%lld,\"sats\":%lld,"
                  "\"alt_dm\":%lld,\"bad\":%u}",
                  time, (long long)lat_udeg, (long long)lon_udeg, (long long)n,
                  (long long)alt_dm, (unsigned)bad);
    return;
refused:
    bad++;
}

int32_t kiln_tick(void) {
    char buf[256];
    for (;;) {
        int32_t n = kiln_serial_read(port, buf, sizeof buf, 0);
        if (n < 0) {
            kiln_error("serial read failed: %s", kiln_strerror(n));
            return 1;
        }
        if (n == 0) return 0;
        for (int32_t i = 0; i < n; i++) {
            char c = buf[i];
            if (c == '\r') continue;
            if (c == '\n') {
                line[used] = '\0';
                if (too_long) bad++;
                else if (used > 0) sentence(line);
                used = 0;
                too_long = 0;
            } else if (used < sizeof line - 1) {
                line[used++] = c;
            } else {
                too_long = 1;
            }
        }
    }
}
