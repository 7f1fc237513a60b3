/*
 * A host and agents driven through the C API in memory: admission and refusals, a command
 * and its result, telemetry, forged and replayed messages, timers, and every way a session
 * ends, with the null-pointer, short-buffer and bad-input paths of each session function.
 */
#include "check.h"

#define T0 1767225600000ull /* 2026-01-01T00:00:00Z */
#define BUF 65536

static uint8_t master[32] = {42};
static uint8_t buf[BUF];

static viw_host *new_host(void) {
    viw_host_config config;
    CHECK_OK(viw_host_config_default(&config));
    CHECK(config.heartbeat_interval_ms == 15000 && config.liveness_timeout_ms == 45000);
    config.heartbeat_interval_ms = 1000;
    config.liveness_timeout_ms = 3000;
    config.skew_window_ms = 10000;
    config.max_sessions = 4;
    uint8_t seed[32] = {1};
    viw_host *host = NULL;
    viw_host_config broken = config;
    broken.max_sessions = 0;
    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_host_new(&broken, master, seed, T0, &host));
    CHECK(host == NULL);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_new(NULL, master, seed, T0, &host));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_new(&config, NULL, seed, T0, &host));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_new(&config, master, NULL, T0, &host));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_new(&config, master, seed, T0, NULL));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_config_default(NULL));
    CHECK_OK(viw_host_new(&config, master, seed, T0, &host));
    return host;
}

static viw_agent_config agent_config(const char *id) {
    viw_agent_config config;
    CHECK_OK(viw_agent_config_default(&config));
    config.agent_id = (viw_str){id, strlen(id)};
    CHECK_OK(viw_agent_key_derive(master, id, strlen(id), config.agent_key));
    config.site = (viw_str){"fra", 3};
    config.hostname = (viw_str){"gw.example", 10};
    config.capabilities_json = (viw_str){"[\"docker\",\"scripts\"]", 20};
    config.max_concurrency = 2;
    config.max_violations = 10;
    return config;
}

static viw_agent_session *new_agent(const char *id, uint64_t now, uint8_t seed_byte) {
    viw_agent_config config = agent_config(id);
    uint8_t seed[32] = {seed_byte};
    viw_agent_session *agent = NULL;
    CHECK_OK(viw_agent_session_new(&config, now, seed, NULL, &agent));
    return agent;
}

static size_t agent_next(viw_agent_session *agent) {
    size_t len = 0;
    CHECK_OK(viw_agent_session_poll_transmit(agent, buf, BUF, &len));
    return len;
}

static size_t host_next(viw_host_session *session) {
    size_t len = 0;
    CHECK_OK(viw_host_session_poll_transmit(session, buf, BUF, &len));
    return len;
}

static void host_event(viw_host_session *session, viw_event_kind kind, viw_event *event) {
    CHECK_OK(viw_host_session_poll_event(session, event));
    if (event->kind != kind) fprintf(stderr, "host event %d, expected %d\n", event->kind, kind);
    CHECK(event->kind == kind);
}

static void agent_event(viw_agent_session *agent, viw_event_kind kind, viw_event *event) {
    CHECK_OK(viw_agent_session_poll_event(agent, event));
    if (event->kind != kind) fprintf(stderr, "agent event %d, expected %d\n", event->kind, kind);
    CHECK(event->kind == kind);
}

/* Moves every queued message both ways until both sides are quiet. */
static void pump(viw_host_session *session, viw_agent_session *agent, uint64_t now) {
    for (;;) {
        size_t len, moved = 0;
        while ((len = host_next(session)) > 0) {
            CHECK_OK(viw_agent_session_handle_message(agent, now, buf, len));
            moved++;
        }
        while ((len = agent_next(agent)) > 0) {
            CHECK_OK(viw_host_session_handle_message(session, now, buf, len));
            moved++;
        }
        if (moved == 0) return;
    }
}

static void agent_config_errors(void) {
    viw_agent_config config = agent_config("gw-x");
    uint8_t seed[32] = {0};
    viw_agent_session *agent = (viw_agent_session *)1;
    config.agent_id = (viw_str){"gw x", 4};
    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_agent_session_new(&config, T0, seed, NULL, &agent));
    CHECK(agent == NULL);
    config = agent_config("gw-x");
    config.site = (viw_str){"\xff", 1};
    CHECK_STATUS(VIW_ERR_INVALID_UTF8, viw_agent_session_new(&config, T0, seed, NULL, &agent));
    config = agent_config("gw-x");
    config.capabilities_json = (viw_str){"[docker]", 8};
    CHECK_STATUS(VIW_ERR_MALFORMED, viw_agent_session_new(&config, T0, seed, NULL, &agent));
    config = agent_config("gw-x");
    config.hostname = (viw_str){NULL, 3};
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_new(&config, T0, seed, NULL, &agent));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_new(NULL, T0, seed, NULL, &agent));
    config = agent_config("gw-x");
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_new(&config, T0, NULL, NULL, &agent));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_new(&config, T0, seed, NULL, NULL));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_config_default(NULL));
}

/* Admission: a HELLO accepted, then replayed, forged, for another identity, duplicated. */
static void admission(viw_host *host, viw_host_session **out_session, viw_agent_session **out_agent) {
    uint64_t now = T0 + 1000;
    viw_agent_session *agent = new_agent("gw-1", now, 1);
    bool flag = true;
    CHECK_OK(viw_agent_session_is_established(agent, &flag));
    CHECK(!flag);
    CHECK_STATUS(VIW_ERR_NOT_ESTABLISHED, viw_agent_session_send_ack(agent, now, "c", 1));

    /* The HELLO, asked for with a buffer too small: the length comes back, the message stays. */
    size_t hello_len = 0;
    CHECK_STATUS(VIW_ERR_SHORT_BUFFER, viw_agent_session_poll_transmit(agent, NULL, 0, &hello_len));
    CHECK(hello_len > 33);
    size_t again = 0;
    CHECK_STATUS(VIW_ERR_SHORT_BUFFER, viw_agent_session_poll_transmit(agent, buf, hello_len - 1, &again));
    CHECK(again == hello_len);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_poll_transmit(agent, buf, BUF, NULL));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_poll_transmit(NULL, buf, BUF, &again));
    uint8_t hello[8192];
    CHECK_OK(viw_agent_session_poll_transmit(agent, hello, sizeof hello, &again));
    CHECK(again == hello_len);
    CHECK(agent_next(agent) == 0);

    viw_refusal refusal;
    viw_host_session *session = NULL;
    CHECK_STATUS(VIW_ERR_INVALID_UTF8,
                 viw_host_accept(host, now, hello, hello_len, "\xff", 1, NULL, &session, &refusal));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_accept(NULL, now, hello, hello_len, NULL, 0, NULL, &session, &refusal));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_accept(host, now, NULL, hello_len, NULL, 0, NULL, &session, &refusal));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_accept(host, now, hello, hello_len, NULL, 0, NULL, NULL, &refusal));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_accept(host, now, hello, hello_len, NULL, 0, NULL, &session, NULL));

    /* Forged: refused anonymously, before the nonce is remembered. */
    uint8_t forged[8192];
    memcpy(forged, hello, hello_len);
    forged[hello_len - 5] ^= 1;
    CHECK_STATUS(VIW_ERR_REFUSED, viw_host_accept(host, now, forged, hello_len, NULL, 0, NULL, &session, &refusal));
    CHECK(session == NULL);
    CHECK(refusal.code == VIW_REJECT_CODE_BAD_MAC && !refusal.authenticated);
    CHECK(refusal.reply.len > 0 && strcmp(refusal.claimed_agent, "gw-1") == 0);
    viw_refusal_free(&refusal);
    CHECK(refusal.reply.data == NULL && refusal.claimed_agent == NULL);
    viw_refusal_free(&refusal);

    /* For another identity than the transport proved. */
    CHECK_STATUS(VIW_ERR_REFUSED, viw_host_accept(host, now, hello, hello_len, "gw-2", 4, NULL, &session, &refusal));
    CHECK(refusal.code == VIW_REJECT_CODE_IDENTITY_MISMATCH);
    viw_refusal_free(&refusal);

    CHECK_OK(viw_host_accept(host, now, hello, hello_len, "gw-1", 4, NULL, &session, &refusal));
    CHECK(session != NULL && refusal.reply.data == NULL && refusal.claimed_agent == NULL);
    size_t live = 0;
    CHECK_OK(viw_host_live_sessions(host, &live));
    CHECK(live == 1);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_live_sessions(host, NULL));
    char id[8];
    size_t id_len = 0;
    CHECK_STATUS(VIW_ERR_SHORT_BUFFER, viw_host_session_agent_id(session, id, 2, &id_len));
    CHECK(id_len == 4);
    CHECK_OK(viw_host_session_agent_id(session, id, sizeof id, &id_len));
    CHECK(id_len == 4 && memcmp(id, "gw-1", 4) == 0);

    /* The same HELLO again: an authenticated refusal as a replay. */
    viw_host_session *second = NULL;
    CHECK_STATUS(VIW_ERR_REFUSED, viw_host_accept(host, now, hello, hello_len, NULL, 0, NULL, &second, &refusal));
    CHECK(second == NULL && refusal.code == VIW_REJECT_CODE_REPLAY && refusal.authenticated);
    viw_refusal_free(&refusal);

    /* The WELCOME, handed over as library-owned bytes. */
    viw_bytes welcome;
    CHECK_OK(viw_host_session_poll_transmit_owned(session, &welcome));
    CHECK(welcome.len > 0);
    CHECK_OK(viw_agent_session_handle_message(agent, now, welcome.data, welcome.len));
    viw_bytes_free(&welcome);
    CHECK(welcome.data == NULL && welcome.len == 0);
    viw_bytes_free(&welcome);
    CHECK_OK(viw_host_session_poll_transmit_owned(session, &welcome));
    CHECK(welcome.data == NULL && welcome.len == 0);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_poll_transmit_owned(session, NULL));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_poll_transmit_owned(NULL, &welcome));

    viw_event event;
    agent_event(agent, VIW_EVENT_KIND_ESTABLISHED, &event);
    CHECK(event.heartbeat_interval_ms == 1000 && event.liveness_timeout_ms == 3000);
    viw_event_free(&event);
    CHECK_OK(viw_agent_session_is_established(agent, &flag));
    CHECK(flag);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_is_established(agent, NULL));

    /* A second agent with the same id while the first is live: refused as a duplicate, and
       the REJECT reaches that agent as an authenticated Rejected event. */
    viw_agent_session *twin = new_agent("gw-1", now, 2);
    size_t len = agent_next(twin);
    CHECK_STATUS(VIW_ERR_REFUSED, viw_host_accept(host, now, buf, len, NULL, 0, NULL, &second, &refusal));
    CHECK(refusal.code == VIW_REJECT_CODE_DUPLICATE_AGENT);
    CHECK_OK(viw_agent_session_handle_message(twin, now, refusal.reply.data, refusal.reply.len));
    viw_refusal_free(&refusal);
    agent_event(twin, VIW_EVENT_KIND_REJECTED, &event);
    CHECK(event.reject_code == VIW_REJECT_CODE_DUPLICATE_AGENT && event.authenticated);
    CHECK(event.has_retry_after && event.retry_after_ms == 3000 && event.text != NULL);
    viw_event_free(&event);
    CHECK_OK(viw_agent_session_is_closed(twin, &flag));
    CHECK(flag);
    viw_agent_session_free(twin);

    *out_session = session;
    *out_agent = agent;
}

static void command_and_result(viw_host_session *session, viw_agent_session *agent) {
    uint64_t now = T0 + 1100;
    viw_event event;
    const char *command =
        "{\"command_id\":\"cmd-1\",\"verb\":\"get_system_health\",\"args\":{\"x\":1},\"timeout_ms\":5000,\"attempt\":1}";
    CHECK_STATUS(VIW_ERR_MALFORMED, viw_host_session_send_command(session, now, "[1]", 3));
    CHECK_STATUS(VIW_ERR_MALFORMED, viw_host_session_send_command(session, now, "{\"verb\":1}", 10));
    CHECK_STATUS(VIW_ERR_INVALID_UTF8, viw_host_session_send_command(session, now, "{\"\xc0\"}", 5));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_send_command(session, now, NULL, 5));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_send_command(NULL, now, command, strlen(command)));
    CHECK_OK(viw_host_session_send_command(session, now, command, strlen(command)));

    /* Forged on the way: refused with bad_mac, reported as a Violation too. */
    uint8_t sent[4096];
    size_t len = host_next(session);
    CHECK(len > 0 && len < sizeof sent);
    memcpy(sent, buf, len);
    sent[len / 2] ^= 0x04;
    CHECK_STATUS(VIW_ERR_BAD_MAC, viw_agent_session_handle_message(agent, now, sent, len));
    agent_event(agent, VIW_EVENT_KIND_VIOLATION, &event);
    CHECK(event.violation == VIW_VIOLATION_BAD_MAC && strcmp(event.text, "bad_mac") == 0);
    viw_event_free(&event);
    sent[len / 2] ^= 0x04;
    CHECK_OK(viw_agent_session_handle_message(agent, now, sent, len));
    /* Replayed: authentic but out of sequence. */
    CHECK_STATUS(VIW_ERR_REPLAY, viw_agent_session_handle_message(agent, now, sent, len));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_handle_message(agent, now, NULL, len));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_handle_message(NULL, now, sent, len));

    agent_event(agent, VIW_EVENT_KIND_COMMAND, &event);
    CHECK(strcmp(event.command_id, "cmd-1") == 0 && strcmp(event.verb, "get_system_health") == 0);
    CHECK(event.timeout_ms == 5000 && event.attempt == 1);
    CHECK(event.json_len == strlen(event.json) && strstr(event.json, "\"args\":{\"x\":1}") != NULL);
    viw_event_free(&event);
    viw_event_free(&event);
    CHECK(event.kind == VIW_EVENT_KIND_NONE && event.json == NULL);
    agent_event(agent, VIW_EVENT_KIND_VIOLATION, &event);
    CHECK(event.violation == VIW_VIOLATION_OUT_OF_SEQUENCE);
    viw_event_free(&event);
    agent_event(agent, VIW_EVENT_KIND_NONE, &event);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_poll_event(agent, NULL));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_poll_event(NULL, &event));

    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_agent_session_send_ack(agent, now, "cmd 1", 5));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_send_ack(agent, now, NULL, 5));
    CHECK_OK(viw_agent_session_send_ack(agent, now, "cmd-1", 5));
    const char *result = "{\"command_id\":\"cmd-1\",\"status\":\"succeeded\",\"exit_code\":0,"
                         "\"output\":{\"cpu\":12.5},\"duration_ms\":7}";
    CHECK_STATUS(VIW_ERR_MALFORMED, viw_agent_session_send_result(agent, now, "{}", 2));
    CHECK_STATUS(VIW_ERR_INVALID_UTF8, viw_agent_session_send_result(agent, now, "\xff", 1));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_send_result(agent, now, NULL, 1));
    CHECK_OK(viw_agent_session_send_result(agent, now, result, strlen(result)));
    const char *telemetry = "{\"batch_id\":7,\"samples\":[{\"ts\":1767225601000,\"key\":\"cpu.usage_pct\","
                            "\"value\":12.5}],\"dropped\":0}";
    CHECK_STATUS(VIW_ERR_MALFORMED, viw_agent_session_send_telemetry(agent, now, "{\"batch_id\":1}", 14));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_send_telemetry(NULL, now, telemetry, strlen(telemetry)));
    CHECK_OK(viw_agent_session_send_telemetry(agent, now, telemetry, strlen(telemetry)));
    pump(session, agent, now);

    host_event(session, VIW_EVENT_KIND_ACKED, &event);
    CHECK(strcmp(event.command_id, "cmd-1") == 0);
    viw_event_free(&event);
    host_event(session, VIW_EVENT_KIND_RESULT, &event);
    CHECK(strcmp(event.command_id, "cmd-1") == 0 && event.result_status == VIW_RESULT_STATUS_SUCCEEDED);
    CHECK(strstr(event.json, "\"output\":{\"cpu\":12.5}") != NULL);
    viw_event_free(&event);
    host_event(session, VIW_EVENT_KIND_TELEMETRY, &event);
    CHECK(event.batch_id == 7 && strstr(event.json, "cpu.usage_pct") != NULL);
    viw_event_free(&event);
    host_event(session, VIW_EVENT_KIND_NONE, &event);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_poll_event(session, NULL));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_poll_event(NULL, &event));

    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_host_session_ack_result(session, now, "", 0));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_ack_result(session, now, NULL, 5));
    CHECK_OK(viw_host_session_ack_result(session, now, "cmd-1", 5));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_ack_telemetry(NULL, now, 7));
    CHECK_OK(viw_host_session_ack_telemetry(session, now, 7));
    pump(session, agent, now);
    agent_event(agent, VIW_EVENT_KIND_RESULTS_ACKED, &event);
    CHECK(strcmp(event.json, "[\"cmd-1\"]") == 0);
    viw_event_free(&event);
    agent_event(agent, VIW_EVENT_KIND_TELEMETRY_ACKED, &event);
    CHECK(event.batch_id == 7);
    viw_event_free(&event);

    /* Credits: the agent advertised two commands at once. */
    const char *c2 = "{\"command_id\":\"cmd-2\",\"verb\":\"docker.ps\",\"timeout_ms\":1000,\"attempt\":1}";
    const char *c3 = "{\"command_id\":\"cmd-3\",\"verb\":\"docker.ps\",\"timeout_ms\":1000,\"attempt\":1}";
    const char *c4 = "{\"command_id\":\"cmd-4\",\"verb\":\"docker.ps\",\"timeout_ms\":1000,\"attempt\":1}";
    CHECK_OK(viw_host_session_send_command(session, now, c2, strlen(c2)));
    CHECK_OK(viw_host_session_send_command(session, now, c3, strlen(c3)));
    CHECK_STATUS(VIW_ERR_NO_CREDIT, viw_host_session_send_command(session, now, c4, strlen(c4)));
    pump(session, agent, now);
    agent_event(agent, VIW_EVENT_KIND_COMMAND, &event);
    viw_event_free(&event);
    agent_event(agent, VIW_EVENT_KIND_COMMAND, &event);
    viw_event_free(&event);
}

static void timers_and_close(viw_host_session *session, viw_agent_session *agent) {
    uint64_t now = T0 + 1100, at = 0;
    bool has = false;
    viw_event event;
    CHECK_OK(viw_host_session_poll_timeout(session, &has, &at));
    CHECK(has && at > now && at <= now + 1000);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_poll_timeout(session, NULL, &at));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_poll_timeout(session, &has, NULL));
    CHECK_OK(viw_agent_session_poll_timeout(agent, &has, &at));
    CHECK(has && at > now);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_poll_timeout(NULL, &has, &at));

    /* A heartbeat each way once the interval has passed. */
    now += 1000;
    CHECK_OK(viw_host_session_handle_timeout(session, now));
    CHECK_OK(viw_agent_session_handle_timeout(agent, now));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_handle_timeout(NULL, now));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_handle_timeout(NULL, now));
    size_t len = host_next(session);
    CHECK(len > 0);
    CHECK_OK(viw_agent_session_handle_message(agent, now, buf, len));
    len = agent_next(agent);
    CHECK(len > 0);
    CHECK_OK(viw_host_session_handle_message(session, now, buf, len));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_handle_message(session, now, NULL, len));

    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_host_session_close(session, now, 99, "bye", 3));
    CHECK_STATUS(VIW_ERR_INVALID_UTF8, viw_host_session_close(session, now, 1, "\xff", 1));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_close(NULL, now, 1, "bye", 3));
    CHECK_OK(viw_host_session_close(session, now, VIW_CLOSE_CODE_NORMAL, "maintenance", 11));
    bool closed = false;
    CHECK_OK(viw_host_session_is_closed(session, &closed));
    CHECK(closed);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_is_closed(session, NULL));
    host_event(session, VIW_EVENT_KIND_CLOSED, &event);
    CHECK(event.close_code == VIW_CLOSE_CODE_NORMAL && !event.by_peer);
    CHECK(strstr(event.json, "\"command_id\":\"cmd-2\"") != NULL);
    CHECK(strstr(event.json, "\"command_id\":\"cmd-3\"") != NULL);
    viw_event_free(&event);
    pump(session, agent, now);
    agent_event(agent, VIW_EVENT_KIND_CLOSED, &event);
    CHECK(event.close_code == VIW_CLOSE_CODE_NORMAL && event.by_peer);
    viw_event_free(&event);

    CHECK_STATUS(VIW_ERR_CLOSED, viw_host_session_handle_message(session, now, buf, 40));
    CHECK_STATUS(VIW_ERR_CLOSED, viw_agent_session_handle_message(agent, now, buf, 40));
    const char *c5 = "{\"command_id\":\"cmd-5\",\"verb\":\"docker.ps\",\"timeout_ms\":1000,\"attempt\":1}";
    CHECK_STATUS(VIW_ERR_CLOSED, viw_host_session_send_command(session, now, c5, strlen(c5)));
    CHECK_STATUS(VIW_ERR_CLOSED, viw_host_session_ack_telemetry(session, now, 1));
    CHECK_STATUS(VIW_ERR_CLOSED, viw_agent_session_send_ack(agent, now, "cmd-2", 5));
    bool has_timeout = true;
    CHECK_OK(viw_host_session_poll_timeout(session, &has_timeout, &at));
    CHECK(!has_timeout);
    CHECK_OK(viw_agent_session_poll_timeout(agent, &has_timeout, &at));
    CHECK(!has_timeout);
}

/* The other ways a session ends: the agent closes, the transport drops, silence, and a
   WELCOME that never comes. */
static void other_endings(viw_host *host) {
    uint64_t now = T0 + 5000;
    viw_event event;
    viw_refusal refusal;
    viw_host_session *session = NULL;

    viw_agent_session *agent = new_agent("gw-2", now, 3);
    size_t len = agent_next(agent);
    CHECK_OK(viw_host_accept(host, now, buf, len, NULL, 0, NULL, &session, &refusal));
    pump(session, agent, now);
    agent_event(agent, VIW_EVENT_KIND_ESTABLISHED, &event);
    viw_event_free(&event);
    CHECK_STATUS(VIW_ERR_INVALID_ARGUMENT, viw_agent_session_close(agent, now, 0, "", 0));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_close(agent, now, 2, NULL, 0));
    CHECK_OK(viw_agent_session_close(agent, now, VIW_CLOSE_CODE_GOING_AWAY, "restarting", 10));
    pump(session, agent, now);
    host_event(session, VIW_EVENT_KIND_CLOSED, &event);
    CHECK(event.close_code == VIW_CLOSE_CODE_GOING_AWAY && event.by_peer && strcmp(event.json, "[]") == 0);
    viw_event_free(&event);
    viw_host_session_free(session);
    viw_agent_session_free(agent);

    /* The transport drops: each side is told, and the host's session ends by silence too. */
    now += 100;
    agent = new_agent("gw-3", now, 4);
    len = agent_next(agent);
    CHECK_OK(viw_host_accept(host, now, buf, len, NULL, 0, NULL, &session, &refusal));
    pump(session, agent, now);
    CHECK_OK(viw_agent_session_connection_lost(agent));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_connection_lost(NULL));
    agent_event(agent, VIW_EVENT_KIND_ESTABLISHED, &event);
    viw_event_free(&event);
    agent_event(agent, VIW_EVENT_KIND_CLOSED, &event);
    CHECK(event.close_code == VIW_CLOSE_CODE_GOING_AWAY && event.by_peer);
    viw_event_free(&event);
    CHECK_OK(viw_host_session_handle_timeout(session, now + 3001));
    host_event(session, VIW_EVENT_KIND_CLOSED, &event);
    CHECK(event.close_code == VIW_CLOSE_CODE_LIVENESS_TIMEOUT && !event.by_peer);
    viw_event_free(&event);
    CHECK_OK(viw_host_session_connection_lost(session));
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_host_session_connection_lost(NULL));
    viw_host_session_free(session);
    viw_agent_session_free(agent);

    /* No WELCOME within the handshake timeout. */
    agent = new_agent("gw-4", now, 5);
    CHECK(agent_next(agent) > 0);
    CHECK_OK(viw_agent_session_handle_timeout(agent, now + 30001));
    agent_event(agent, VIW_EVENT_KIND_CLOSED, &event);
    CHECK(event.close_code == VIW_CLOSE_CODE_LIVENESS_TIMEOUT);
    viw_event_free(&event);
    bool closed = false;
    CHECK_OK(viw_agent_session_is_closed(agent, &closed));
    CHECK(closed);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_is_closed(NULL, &closed));
    viw_bytes nothing;
    CHECK_OK(viw_agent_session_poll_transmit_owned(agent, &nothing));
    CHECK(nothing.len == 0);
    CHECK_STATUS(VIW_ERR_NULL_POINTER, viw_agent_session_poll_transmit_owned(agent, NULL));
    viw_agent_session_free(agent);
}

int main(void) {
    agent_config_errors();
    viw_host *host = new_host();
    viw_host_session *session = NULL;
    viw_agent_session *agent = NULL;
    admission(host, &session, &agent);
    command_and_result(session, agent);
    timers_and_close(session, agent);
    /* A session outlives its host: free the host first. */
    viw_host_free(host);
    viw_host_session_free(session);
    viw_agent_session_free(agent);
    host = new_host();
    other_endings(host);
    viw_host_free(host);
    report("test_sessions");
    return 0;
}
