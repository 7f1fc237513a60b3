/*
 * A host and an agent talking over a socketpair through the ViWorkS C API: the handshake, one
 * command, its result and the result's acknowledgement, then a graceful close.
 *
 * Each side runs the loop every driver runs: read a frame -> handle_message -> drain
 * poll_transmit to the socket -> drain poll_event -> sleep until poll_timeout. Frames on the
 * stream are length-delimited: a 4-byte big-endian length, then the message.
 *
 * The two sides run on two threads, each with its own handles: handles are not thread-safe,
 * but different handles on different threads are fine.
 *
 * Build (after `cargo build -p viworks-ffi`):
 *   cc -I ffi/include ffi/examples/host_agent.c target/debug/libviworks.a -lpthread -ldl -lm
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "viworks.h"

#define MAX_MESSAGE (1024 * 1024)

/* In a real deployment both come from the operating system's generator (getrandom). */
static const uint8_t MASTER_KEY[VIW_KEY_LEN] = {0x6d, 0x61, 0x73, 0x74, 0x65, 0x72};
static const char AGENT_ID[] = "gw-fra-01";

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void fail(const char *who, const char *what, viw_status status) {
    char message[512];
    viw_last_error(message, sizeof message);
    fprintf(stderr, "%s: %s failed: %s (%s)\n", who, what, viw_status_name(status), message);
    exit(1);
}

#define TRY(who, call)                                                                             \
    do {                                                                                           \
        viw_status status_ = (call);                                                               \
        if (status_ != VIW_OK) fail(who, #call, status_);                                          \
    } while (0)

static int write_all(int fd, const uint8_t *bytes, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, bytes, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        bytes += n, len -= (size_t)n;
    }
    return 0;
}

static int read_all(int fd, uint8_t *bytes, size_t len) {
    while (len > 0) {
        ssize_t n = read(fd, bytes, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        bytes += n, len -= (size_t)n;
    }
    return 0;
}

static int send_frame(int fd, const uint8_t *message, size_t len) {
    uint8_t header[4] = {(uint8_t)(len >> 24), (uint8_t)(len >> 16), (uint8_t)(len >> 8), (uint8_t)len};
    return write_all(fd, header, 4) == 0 ? write_all(fd, message, len) : -1;
}

/* Reads one frame into buf (MAX_MESSAGE bytes); returns its length, or -1 at end of stream. */
static long recv_frame(int fd, uint8_t *buf) {
    uint8_t header[4];
    if (read_all(fd, header, 4) != 0) return -1;
    size_t len = (size_t)header[0] << 24 | (size_t)header[1] << 16 | (size_t)header[2] << 8 | header[3];
    if (len > MAX_MESSAGE) return -1; /* refuse before buffering anything of it */
    return read_all(fd, buf, len) == 0 ? (long)len : -1;
}

/* Waits until fd is readable or the session's next timeout; returns 1 when readable. */
static int wait_readable(int fd, bool has_timeout, uint64_t at_ms) {
    int timeout = -1;
    if (has_timeout) {
        uint64_t now = now_ms();
        timeout = at_ms > now ? (int)(at_ms - now) : 0;
    }
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    return poll(&pfd, 1, timeout) > 0;
}

/* ---- The host: admits the agent, sends one command, stores and acknowledges the result. --- */

struct side {
    int fd;
    int ok;
};

static void host_flush(viw_host_session *session, int fd) {
    viw_bytes out;
    for (;;) {
        /* The library-owned variant: no buffer to size, one viw_bytes_free per message. */
        TRY("host", viw_host_session_poll_transmit_owned(session, &out));
        if (out.len == 0) return;
        int sent = send_frame(fd, out.data, out.len);
        viw_bytes_free(&out);
        if (sent != 0) return;
    }
}

static void *host_main(void *arg) {
    struct side *side = arg;
    uint8_t *buf = malloc(MAX_MESSAGE);
    uint8_t seed[VIW_KEY_LEN] = {1}; /* from getrandom in a real host */
    viw_host_config config;
    TRY("host", viw_host_config_default(&config));
    viw_host *host = NULL;
    TRY("host", viw_host_new(&config, MASTER_KEY, seed, now_ms() - 1000, &host));

    long len = recv_frame(side->fd, buf);
    if (len < 0) return NULL;
    viw_host_session *session = NULL;
    viw_refusal refusal;
    /* Over TLS, pass the client certificate's identity and the RFC 9266 channel binding. */
    viw_status status = viw_host_accept(host, now_ms(), buf, (size_t)len, AGENT_ID, strlen(AGENT_ID), NULL,
                                        &session, &refusal);
    if (status == VIW_ERR_REFUSED) {
        fprintf(stderr, "host: refused the HELLO (code %d)\n", refusal.code);
        send_frame(side->fd, refusal.reply.data, refusal.reply.len);
        viw_refusal_free(&refusal);
        viw_host_free(host);
        free(buf);
        return NULL;
    }
    TRY("host", status);
    printf("host: admitted %s\n", AGENT_ID);

    const char *command = "{\"command_id\":\"cmd-0001\",\"verb\":\"get_system_health\",\"args\":{},"
                          "\"timeout_ms\":30000,\"attempt\":1}";
    TRY("host", viw_host_session_send_command(session, now_ms(), command, strlen(command)));
    host_flush(session, side->fd);

    bool closed = false;
    while (!closed) {
        bool has_timeout;
        uint64_t at_ms;
        TRY("host", viw_host_session_poll_timeout(session, &has_timeout, &at_ms));
        if (wait_readable(side->fd, has_timeout, at_ms)) {
            len = recv_frame(side->fd, buf);
            if (len < 0) {
                TRY("host", viw_host_session_connection_lost(session));
            } else {
                status = viw_host_session_handle_message(session, now_ms(), buf, (size_t)len);
                /* A refused message is counted by the session and also reported as an event. */
                if (status != VIW_OK) fprintf(stderr, "host: refused a message: %s\n", viw_status_name(status));
            }
        } else {
            TRY("host", viw_host_session_handle_timeout(session, now_ms()));
        }
        viw_event event;
        for (;;) {
            TRY("host", viw_host_session_poll_event(session, &event));
            if (event.kind == VIW_EVENT_KIND_NONE) break;
            switch (event.kind) {
            case VIW_EVENT_KIND_ACKED:
                printf("host: %s acknowledged\n", event.command_id);
                break;
            case VIW_EVENT_KIND_RESULT:
                /* Store the result durably first; the acknowledgement promises it is stored. */
                printf("host: result of %s: %s\n", event.command_id, event.json);
                TRY("host", viw_host_session_ack_result(session, now_ms(), event.command_id,
                                                        strlen(event.command_id)));
                side->ok = event.result_status == VIW_RESULT_STATUS_SUCCEEDED;
                break;
            case VIW_EVENT_KIND_CLOSED:
                printf("host: session closed (code %d, by %s)\n", event.close_code,
                       event.by_peer ? "agent" : "host");
                closed = true;
                break;
            default:
                break;
            }
            viw_event_free(&event);
        }
        host_flush(session, side->fd);
    }
    viw_host_session_free(session);
    viw_host_free(host);
    free(buf);
    return NULL;
}

/* ---- The agent: runs the command, reports the result, closes once it is stored. ---------- */

static void agent_flush(viw_agent_session *agent, int fd, uint8_t *buf) {
    for (;;) {
        size_t len = 0;
        /* The caller-buffer variant: buf holds MAX_MESSAGE bytes, the largest message. */
        TRY("agent", viw_agent_session_poll_transmit(agent, buf, MAX_MESSAGE, &len));
        if (len == 0 || send_frame(fd, buf, len) != 0) return;
    }
}

static void *agent_main(void *arg) {
    struct side *side = arg;
    uint8_t *in = malloc(MAX_MESSAGE), *out = malloc(MAX_MESSAGE);
    viw_agent_config config;
    TRY("agent", viw_agent_config_default(&config));
    config.agent_id = (viw_str){AGENT_ID, strlen(AGENT_ID)};
    /* Handed out at enrollment; derived here because this example plays both sides. */
    TRY("agent", viw_agent_key_derive(MASTER_KEY, AGENT_ID, strlen(AGENT_ID), config.agent_key));
    config.site = (viw_str){"fra", 3};
    config.capabilities_json = (viw_str){"[\"docker\"]", 10};
    uint8_t seed[VIW_KEY_LEN] = {2}; /* from getrandom in a real agent */
    viw_agent_session *agent = NULL;
    TRY("agent", viw_agent_session_new(&config, now_ms(), seed, NULL, &agent));
    agent_flush(agent, side->fd, out); /* the HELLO */

    bool closed = false;
    while (!closed) {
        bool has_timeout;
        uint64_t at_ms;
        TRY("agent", viw_agent_session_poll_timeout(agent, &has_timeout, &at_ms));
        if (wait_readable(side->fd, has_timeout, at_ms)) {
            long len = recv_frame(side->fd, in);
            if (len < 0) {
                TRY("agent", viw_agent_session_connection_lost(agent));
            } else {
                viw_status status = viw_agent_session_handle_message(agent, now_ms(), in, (size_t)len);
                if (status != VIW_OK) fprintf(stderr, "agent: refused a message: %s\n", viw_status_name(status));
            }
        } else {
            TRY("agent", viw_agent_session_handle_timeout(agent, now_ms()));
        }
        viw_event event;
        for (;;) {
            TRY("agent", viw_agent_session_poll_event(agent, &event));
            if (event.kind == VIW_EVENT_KIND_NONE) break;
            switch (event.kind) {
            case VIW_EVENT_KIND_ESTABLISHED:
                printf("agent: established, heartbeat every %llu ms\n",
                       (unsigned long long)event.heartbeat_interval_ms);
                break;
            case VIW_EVENT_KIND_REJECTED:
                printf("agent: rejected: %s\n", event.text);
                closed = true;
                break;
            case VIW_EVENT_KIND_COMMAND: {
                printf("agent: running %s (%s)\n", event.verb, event.command_id);
                /* Record it durably, acknowledge, run it, report. */
                TRY("agent", viw_agent_session_send_ack(agent, now_ms(), event.command_id,
                                                        strlen(event.command_id)));
                char result[512];
                int n = snprintf(result, sizeof result,
                                 "{\"command_id\":\"%s\",\"status\":\"succeeded\","
                                 "\"output\":{\"cpu_usage_pct\":12.5},\"duration_ms\":3}",
                                 event.command_id);
                TRY("agent", viw_agent_session_send_result(agent, now_ms(), result, (size_t)n));
                break;
            }
            case VIW_EVENT_KIND_RESULTS_ACKED:
                printf("agent: host stored %s; closing\n", event.json);
                TRY("agent", viw_agent_session_close(agent, now_ms(), VIW_CLOSE_CODE_NORMAL, "done", 4));
                break;
            case VIW_EVENT_KIND_CLOSED:
                closed = true;
                break;
            default:
                break;
            }
            viw_event_free(&event);
        }
        agent_flush(agent, side->fd, out); /* after close, this sends the CLOSE */
    }
    viw_agent_session_free(agent);
    free(in);
    free(out);
    return NULL;
}

int main(void) {
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) {
        perror("socketpair");
        return 1;
    }
    struct side host = {fds[0], 0}, agent = {fds[1], 0};
    pthread_t host_thread, agent_thread;
    pthread_create(&host_thread, NULL, host_main, &host);
    pthread_create(&agent_thread, NULL, agent_main, &agent);
    pthread_join(agent_thread, NULL);
    pthread_join(host_thread, NULL);
    close(fds[0]);
    close(fds[1]);
    if (!host.ok) {
        fprintf(stderr, "the command did not complete\n");
        return 1;
    }
    printf("handshake, command, result and close completed\n");
    return 0;
}
