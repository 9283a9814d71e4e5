/*
 * A temperature sensor read through a file kilnd.toml grants (the `file` capability),
 * as Linux's IIO subsystem gives one: `/sys/bus/iio/devices/iio:deviceN/in_temp_input`
 * holds the temperature in millidegrees Celsius, followed by a newline. Each tick the
 * module reads it again and publishes on `temp`:
 *
 *   {"mC":23456}
 *
 * or {"error":"..."} when the file holds no number. Config: `file=NAME` (default
 * `temp`). Built by scripts/c-examples.sh.
 */
#include <stdint.h>

#include "kiln.h"

static int32_t file = -1;

int32_t kiln_init(void) {
    char name[65] = "temp";
    if (kiln_config_value("file", name, sizeof name) == KILN_E_TRUNCATED) return 1;
    file = kiln_file_open(name);
    if (file < 0) {
        kiln_error("no file `%s`: %s", name, kiln_strerror(file));
        return 1;
    }
    kiln_info("reading the temperature from file `%s`", name);
    return 0;
}

int32_t kiln_tick(void) {
    char text[32];
    int32_t n = kiln_file_read(file, text, sizeof text);
    if (n < 0) {
        kiln_publishf("temp", "{\"error\":\"%s\"}", kiln_strerror(n));
        return 0;
    }
    int64_t mc = 0;
    int32_t i = 0, negative = n > 0 && text[0] == '-';
    int32_t digits = 0;
    for (i = negative; i < n && text[i] >= '0' && text[i] <= '9' && digits < 12; i++, digits++)
        mc = mc * 10 + (text[i] - '0');
    if (digits == 0 || (i < n && text[i] != '\n')) {
        kiln_publishf("temp", "{\"error\":\"not a number\"}");
        return 0;
    }
    kiln_publishf("temp", "{\"mC\":%lld}", (long long)(negative ? -mc : mc));
    return 0;
}
