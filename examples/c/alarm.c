/*
 * A reactor driven by messages only: it takes the sensor filter's `temperature`
 * records (kilnd.toml: inbox = ["sensor/temperature"]) and publishes an alarm on
 * `alarm` for each whose filtered value is above the config's threshold:
 *
 *   {"from":"sensor/temperature","n":14,"filtered":22.61,"above":22.5}
 *
 * Config: `above=22.5` (the default). Built by scripts/c-examples.sh, like
 * sensor-filter.c.
 */
#include <stdlib.h>
#include <string.h>

#include "kiln.h"

static double above = 22.5;

int32_t kiln_init(void) {
    char value[32];
    if (kiln_config_value("above", value, sizeof value) >= 0) {
        char *end;
        above = strtod(value, &end);
        if (end == value || *end != '\0') {
            kiln_error("init failed: above `%s` is not a number", value);
            return 1;
        }
    }
    kiln_info("alarm above %.2f", above);
    return 0;
}

/* The number after `"key":` in a JSON record, if there is one. */
static int number(const char *json, const char *key, double *out) {
    const char *at = strstr(json, key);
    if (!at) return 0;
    char *end;
    *out = strtod(at + strlen(key), &end);
    return end != at + strlen(key);
}

int32_t kiln_on_message(int32_t len) {
    char record[512], topic[130];
    if (len >= (int32_t)sizeof record) {
        kiln_warn("a record of %d bytes is too long, skipped", (int)len);
        return 0;
    }
    int32_t n = kiln_message_read(record, sizeof record - 1);
    int32_t status = n < 0 ? n : kiln_message_topic(topic, sizeof topic);
    if (status < 0) {
        kiln_error("on_message failed: %s", kiln_strerror(status));
        return 1;
    }
    record[n] = '\0';
    double seq, filtered;
    if (!number(record, "\"n\":", &seq) || !number(record, "\"filtered\":", &filtered)) {
        kiln_warn("not a sensor record from %s: %s", topic, record);
        return 0;
    }
    if (filtered <= above) return 0;
    status = kiln_publishf("alarm", "{\"from\":\"%s\",\"n\":%.0f,\"filtered\":%.2f,\"above\":%.2f}",
                           topic, seq, filtered, above);
    if (status < 0) {
        kiln_error("on_message failed: %s", kiln_strerror(status));
        return 1;
    }
    return 0;
}
