/*
 * The shared test vectors (viworks-core/tests/vectors/v1.json) through the C API, byte for
 * byte: key derivation, every message opened and sealed again to the same bytes, and every
 * rejection refused with the error the vector names.
 *
 * The Rust side of the test flattens the JSON into lines the C side reads with sscanf:
 *   master <hex> | agent_key <id> <hex> | binding <hex> | nonces <agent> <host>
 *   key <name> <hex> | message <name> <key hex> <sealed hex>
 *   rejection <name> <key hex> <sealed hex> <error>
 */
#include "check.h"

#define LINE_MAX_LEN 65536

static uint8_t master[32], binding[32], agent_nonce[32], host_nonce[32], session_agent_key[32];
static viw_direction_keys handshake, session;

static void check_named_key(const char *name, const uint8_t key[32]) {
    const uint8_t *expected = NULL;
    if (strcmp(name, "handshake.agent_to_host") == 0) expected = handshake.agent_to_host;
    if (strcmp(name, "handshake.host_to_agent") == 0) expected = handshake.host_to_agent;
    if (strcmp(name, "session.agent_to_host") == 0) expected = session.agent_to_host;
    if (strcmp(name, "session.host_to_agent") == 0) expected = session.host_to_agent;
    CHECK(expected != NULL);
    CHECK(memcmp(expected, key, 32) == 0);
}

int main(int argc, char **argv) {
    CHECK(argc == 2);
    FILE *file = fopen(argv[1], "r");
    CHECK(file != NULL);
    char *line = malloc(LINE_MAX_LEN);
    char *a = malloc(LINE_MAX_LEN), *b = malloc(LINE_MAX_LEN), *c = malloc(LINE_MAX_LEN),
         *d = malloc(LINE_MAX_LEN);
    uint8_t *sealed = malloc(LINE_MAX_LEN), *resealed = malloc(LINE_MAX_LEN);
    char *json = malloc(LINE_MAX_LEN);
    int messages = 0, rejections = 0, keys = 0;

    while (fgets(line, LINE_MAX_LEN, file)) {
        uint8_t key[32];
        if (sscanf(line, "master %s", a) == 1) {
            CHECK(unhex(a, master, 32) == 32);
        } else if (sscanf(line, "agent_key %s %s", a, b) == 2) {
            uint8_t derived[32], expected[32];
            CHECK(unhex(b, expected, 32) == 32);
            CHECK_OK(viw_agent_key_derive(master, a, strlen(a), derived));
            CHECK(memcmp(derived, expected, 32) == 0);
            if (strcmp(a, "gw-fra-01") == 0) memcpy(session_agent_key, derived, 32);
        } else if (sscanf(line, "binding %s", a) == 1) {
            CHECK(unhex(a, binding, 32) == 32);
        } else if (sscanf(line, "nonces %s %s", a, b) == 2) {
            CHECK(unhex(a, agent_nonce, 32) == 32);
            CHECK(unhex(b, host_nonce, 32) == 32);
            CHECK_OK(viw_direction_keys_handshake(session_agent_key, binding, &handshake));
            CHECK_OK(viw_direction_keys_session(session_agent_key, agent_nonce, host_nonce, &session));
        } else if (sscanf(line, "key %s %s", a, b) == 2) {
            CHECK(unhex(b, key, 32) == 32);
            check_named_key(a, key);
            keys++;
        } else if (sscanf(line, "message %s %s %s", a, b, c) == 3) {
            CHECK(unhex(b, key, 32) == 32);
            long len = unhex(c, sealed, LINE_MAX_LEN);
            CHECK(len > 0);
            size_t json_len = 0, resealed_len = 0;
            CHECK_OK(viw_open(key, sealed, (size_t)len, 0, json, LINE_MAX_LEN, &json_len));
            /* What the tag covers is the version byte and exactly this JSON. */
            CHECK(json_len == (size_t)len - 33);
            CHECK(memcmp(json, sealed + 1, json_len) == 0);
            CHECK_OK(viw_seal(key, json, json_len, resealed, LINE_MAX_LEN, &resealed_len));
            CHECK(resealed_len == (size_t)len);
            CHECK(memcmp(resealed, sealed, resealed_len) == 0);
            messages++;
        } else if (sscanf(line, "rejection %s %s %s %s", a, b, c, d) == 4) {
            CHECK(unhex(b, key, 32) == 32);
            long len = unhex(c, sealed, LINE_MAX_LEN);
            CHECK(len > 0);
            size_t json_len = 0;
            viw_status status = viw_open(key, sealed, (size_t)len, 0, json, LINE_MAX_LEN, &json_len);
            if (strcmp(viw_status_name(status), d) != 0) {
                fprintf(stderr, "rejection %s: expected %s, got %s\n", a, d, viw_status_name(status));
                CHECK(0);
            }
            rejections++;
        }
    }
    CHECK(keys == 4);
    CHECK(messages == 11);
    CHECK(rejections >= 10);
    fclose(file);
    free(line), free(a), free(b), free(c), free(d), free(sealed), free(resealed), free(json);
    printf("%d messages, %d rejections\n", messages, rejections);
    report("test_vectors");
    return 0;
}
