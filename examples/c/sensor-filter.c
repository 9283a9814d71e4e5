/*
 * examples/sensor-filter in C, record for record: each tick it reads a simulated
 * temperature sensor (a slow wave plus noise), smooths it with an exponential moving
 * average and publishes both on the `temperature` stream as
 *
 *   {"sensor":"greenhouse-1","n":1,"raw":20.73,"filtered":20.73}
 *
 * Its config sets the sensor id and the filter's alpha; a message `alpha=0.5` retunes
 * it while it runs.
 *
 *   sensor=greenhouse-1
 *   alpha=0.2
 *
 * Built by scripts/c-examples.sh:
 *   clang-19 --target=wasm32-wasi -mexec-model=reactor -O2 -I guest/c \
 *       examples/c/sensor-filter.c -o sensor_filter.wasm
 */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "kiln.h"

static char sensor[KILN_MAX_STREAM + 1] = "sim-0";
static double alpha = 0.2;
static double filtered;
static bool have_filtered;
static uint64_t ticks;
static uint64_t noise = 0x9E3779B97F4A7C15ull;

/* The simulated sensor: 21 °C, a ±2 °C wave over ~60 ticks, ±0.5 °C of noise. */
static double read_sensor(void) {
    /* xorshift64: deterministic noise, no WASI random needed. */
    noise ^= noise << 13;
    noise ^= noise >> 7;
    noise ^= noise << 17;
    double n = (double)(noise % 1000) / 1000.0 - 0.5;
    return 21.0 + 2.0 * sin((double)ticks / 10.0) + n;
}

/* A number in (0, 1], written the way Rust's f64 parser takes it: no leading space,
 * nothing after it. */
static bool parse_alpha(const char *text, double *out) {
    if (text[0] == '\0' || text[0] == ' ' || text[0] == '\t' || strpbrk(text, "xX"))
        return false;
    char *end;
    double a = strtod(text, &end);
    if (*end != '\0' || !(a > 0.0 && a <= 1.0)) return false;
    *out = a;
    return true;
}

int32_t kiln_init(void) {
    char value[64];
    int32_t n = kiln_config_value("sensor", sensor, sizeof sensor);
    if (n == KILN_E_TRUNCATED || n == KILN_E_TOO_LARGE) {
        kiln_error("init failed: config `sensor`: %s", kiln_strerror(n));
        return 1;
    }
    if (n < 0) strcpy(sensor, "sim-0");
    n = kiln_config_value("alpha", value, sizeof value);
    if (n >= 0 && !parse_alpha(value, &alpha)) {
        kiln_error("init failed: alpha `%s` must be a number in (0, 1]", value);
        return 1;
    }
    if (n == KILN_E_TRUNCATED || n == KILN_E_TOO_LARGE) {
        kiln_error("init failed: config `alpha`: %s", kiln_strerror(n));
        return 1;
    }
    kiln_info("sensor %s ready, alpha %g", sensor, alpha);
    return 0;
}

int32_t kiln_tick(void) {
    double raw = read_sensor();
    filtered = have_filtered ? filtered + alpha * (raw - filtered) : raw;
    have_filtered = true;
    ticks++;
    int32_t status = kiln_publishf("temperature",
                                   "{\"sensor\":\"%s\",\"n\":%llu,\"raw\":%.2f,\"filtered\":%.2f}",
                                   sensor, (unsigned long long)ticks, raw, filtered);
    if (status < 0) {
        kiln_error("tick failed: %s", kiln_strerror(status));
        return 1;
    }
    return 0;
}

int32_t kiln_on_message(int32_t len) {
    char text[256], topic[130];
    (void)len;
    int32_t n = kiln_message_read(text, sizeof text - 1);
    int32_t status = n < 0 ? n : kiln_message_topic(topic, sizeof topic);
    if (status < 0) {
        kiln_error("on_message failed: %s", kiln_strerror(status));
        return 1;
    }
    text[n] = '\0';
    /* Trimmed, like the Rust example's `text.trim()`. */
    char *t = text;
    while (*t == ' ' || *t == '\t' || *t == '\r' || *t == '\n') t++;
    char *e = t + strlen(t);
    while (e > t && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r' || e[-1] == '\n')) *--e = '\0';
    if (strncmp(t, "alpha=", 6) == 0) {
        if (!parse_alpha(t + 6, &alpha)) {
            kiln_error("on_message failed: alpha `%s` must be a number in (0, 1]", t + 6);
            return 1;
        }
        kiln_info("alpha set to %g by %s", alpha, topic);
    }
    return 0;
}
