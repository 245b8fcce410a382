/*
 * loadgen.c: the benchmark's WebSocket load generator, and a trivial fan-out
 * server to measure it against.
 *
 * Python cannot receive millions of WebSocket frames a second, so the load is
 * made here: one thread, one epoll loop, non-blocking sockets, one read() per
 * readable socket per loop turn, one clock_gettime() per read() (every frame
 * in a read arrived at the same moment), latencies into a log-linear
 * histogram.  benchmarks.loadgen compiles this file with gcc on first use
 * and drives it line by line: commands on stdin, one JSON object per line on
 * stdout.  Nothing here is specific to webchat beyond the chat's wire
 * protocol: a text message M from connection N reaches every other
 * connection as "id N: M".
 *
 *   loadgen client IP PORT HOST PATH [tls]
 *                                        commands on stdin (below); with
 *                                        "tls", every connection speaks TLS
 *                                        (OpenSSL, certificate not checked:
 *                                        a loopback benchmark) before HTTP
 *   loadgen serve PORT                   trivial fan-out server on 127.0.0.1
 *
 * Client commands, each answered by exactly one JSON line (progress lines,
 * {"type": "progress", ...}, may come before it):
 *
 *   open ROLE N CONCURRENCY TIMEOUT_S [PORT]
 *       Open N WebSockets, at most CONCURRENCY handshakes in flight; to PORT
 *       on the same IP if given (another node of a cluster), else to PORT
 *       of the command line.  Each port is a "target": a step reports its
 *       receivers' counts and latencies per target too ("targets").
 *       ROLE recv: counts and times every message of the current step.
 *       ROLE send: sends the step's messages; reads (and drops) the rest.
 *       ROLE slow: never reads a byte after its handshake.
 *       ROLE resume: JSON, counts the message events it is sent (history
 *       replays) and the welcome's "recovered"; see "catchup".  Its open
 *       starts the reconnect storm's clock.
 *   step ID RATE SECONDS PAYLOAD DRAIN_S SETTLE_S
 *       Senders send RATE messages/s in all (spread evenly) for SECONDS.
 *       Each payload is PAYLOAD bytes: "<ID, 8 digits> <CLOCK_MONOTONIC ns
 *       when the frame was made, 20 digits> xxx...".  Sending never waits for
 *       the server (frames queue in the sender's buffer when its socket is
 *       full), so that stamp counts every wait the server causes; how late
 *       the generator itself made each frame against its schedule is
 *       reported apart, as "send_lag".  Then wait up to DRAIN_S for every
 *       receiver to have every message, then up to SETTLE_S for the line to
 *       go quiet.
 *   codec seed|json
 *       Connections opened from now on speak the seed's protocol (send text,
 *       receive "id N: text"), or offer the subprotocol webchat.v1.json (the
 *       server must accept it): they send {"type":"message","text":PAYLOAD}
 *       and find PAYLOAD in the "text" of each {"type":"message",...} event;
 *       other events (welcome, join, ack, ...) are counted as "other".
 *   rooms R PREFIX
 *       Connections opened from now on go to PREFIX0 .. PREFIX<R-1> in turn
 *       (the k-th connection of an "open" to room k mod R); "rooms 0 -" goes
 *       back to the command line's PATH (one room).  A message reaches the
 *       receivers of its sender's room only: a step expects, per sender, its
 *       messages times its room's receivers.
 *   query R QUERY
 *       Connections opened from now on to room R (0 with one room) add QUERY
 *       (e.g. "?since=10&epoch=abc", no spaces) to their path; "query clear"
 *       forgets every one.
 *   catchup EXPECT TIMEOUT_S
 *       Wait until every open "resume" connection has been sent EXPECT
 *       message events (or TIMEOUT_S); report when each had its last one,
 *       from its connect and from the storm's start, and what the welcomes
 *       said about "recovered".
 *   check      state of every connection (and the slow readers' TCP state)
 *   reset      reset every connection and forget it
 *   quit       reset every connection and exit
 *
 * Client frames are masked with a fresh key each; the server's
 * Sec-WebSocket-Accept is checked; pings are answered, as the servers under
 * test ping idle clients and drop the silent ones.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define READ_CHUNK (256 * 1024)
#define MAX_FRAME (1024 * 1024)
#define SENDER_OUT_CAP (4 * 1024 * 1024)
#define SERVER_OUT_CAP (1024 * 1024)
#define MAX_EVENTS 1024
#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
    printf("{\"type\": \"error\", \"error\": \"%s: %s\"}\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

/* -- SHA-1 and base64, for Sec-WebSocket-Accept ------------------------------ */

#define ROL(x, n) (((x) << (n)) | ((x) >> (32 - (n))))

static void sha1_block(uint32_t h[5], const uint8_t *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = ROL(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t t = ROL(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = ROL(b, 30);
        b = a;
        a = t;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
}

static void sha1(const uint8_t *data, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t i = 0;
    for (; i + 64 <= len; i += 64) sha1_block(h, data + i);
    uint8_t tail[128];
    size_t r = len - i;
    memcpy(tail, data + i, r);
    tail[r++] = 0x80;
    size_t total = (r + 8 <= 64) ? 64 : 128;
    memset(tail + r, 0, total - r);
    uint64_t bits = (uint64_t)len * 8;
    for (int j = 0; j < 8; j++) tail[total - 1 - j] = (uint8_t)(bits >> (8 * j));
    sha1_block(h, tail);
    if (total == 128) sha1_block(h, tail + 64);
    for (int j = 0; j < 5; j++) {
        out[4 * j] = (uint8_t)(h[j] >> 24);
        out[4 * j + 1] = (uint8_t)(h[j] >> 16);
        out[4 * j + 2] = (uint8_t)(h[j] >> 8);
        out[4 * j + 3] = (uint8_t)h[j];
    }
}

static void base64(const uint8_t *in, size_t n, char *out) {
    static const char tab[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = tab[(v >> 18) & 63];
        out[o++] = tab[(v >> 12) & 63];
        out[o++] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? tab[v & 63] : '=';
    }
    out[o] = 0;
}

/* The Sec-WebSocket-Accept answer to a Sec-WebSocket-Key (RFC 6455 4.2.2). */
static void ws_accept(const char *key, size_t key_len, char out[32]) {
    char buf[128];
    uint8_t digest[20];
    if (key_len > 60) key_len = 60;
    memcpy(buf, key, key_len);
    memcpy(buf + key_len, WS_GUID, sizeof WS_GUID - 1);
    sha1((const uint8_t *)buf, key_len + sizeof WS_GUID - 1, digest);
    base64(digest, 20, out);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t rng32(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* -- latency histogram: log-linear, 128 sub-buckets per power of two (<1%) -- */

#define HBITS 7
#define HSUB (1 << HBITS)
#define HBUCKETS ((64 - HBITS + 1) * HSUB)

typedef struct {
    uint64_t count[HBUCKETS];
    uint64_t n, max;
} hist_t;

static inline int hist_index(uint64_t v) {
    if (v < HSUB) return (int)v;
    int e = 63 - __builtin_clzll(v);
    return (e - HBITS + 1) * HSUB + (int)((v >> (e - HBITS)) & (HSUB - 1));
}

static uint64_t hist_value(int idx) { /* middle of the bucket */
    if (idx < HSUB) return (uint64_t)idx;
    int e = idx / HSUB + HBITS - 1;
    uint64_t m = (uint64_t)(idx % HSUB + HSUB);
    uint64_t width = 1ull << (e - HBITS);
    return (m << (e - HBITS)) + width / 2;
}

static inline void hist_add(hist_t *h, uint64_t v, uint64_t times) {
    h->count[hist_index(v)] += times;
    h->n += times;
    if (v > h->max) h->max = v;
}

static double hist_ms(const hist_t *h, double q) {
    if (h->n == 0) return -1;
    uint64_t target = (uint64_t)(q * (double)h->n);
    if (target < 1) target = 1;
    uint64_t seen = 0;
    for (int i = 0; i < HBUCKETS; i++) {
        seen += h->count[i];
        if (seen >= target) {
            uint64_t v = hist_value(i);
            return (v > h->max ? h->max : v) / 1e6;
        }
    }
    return h->max / 1e6;
}

static void hist_json(const char *name, const hist_t *h) {
    printf("\"%s\": {\"count\": %llu, \"p50_ms\": %.4f, \"p90_ms\": %.4f, "
           "\"p99_ms\": %.4f, \"p999_ms\": %.4f, \"max_ms\": %.4f}",
           name, (unsigned long long)h->n, hist_ms(h, 0.50), hist_ms(h, 0.90),
           hist_ms(h, 0.99), hist_ms(h, 0.999), h->n ? h->max / 1e6 : -1.0);
}

/* -- connections ------------------------------------------------------------ */

enum role { ROLE_RECV, ROLE_SEND, ROLE_SLOW, ROLE_SERVER, ROLE_RESUME };
enum state { ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_CLOSED };
static const char *role_names[] = {"recv", "send", "slow", "server", "resume"};
/* What a resume connection's welcome said: not yet seen, true, false, absent. */
enum recovered { REC_UNSEEN, REC_TRUE, REC_FALSE, REC_ABSENT };

typedef struct {
    uint8_t *p;
    uint32_t len, off, cap;
} buf_t;

typedef struct conn {
    int fd;
    uint8_t role, state, dirty;
    uint8_t target;      /* index into target_ports (client mode) */
    uint8_t json;        /* speaks webchat.v1.json (client mode) */
    uint8_t in_room;     /* opened under "rooms R": its path is room_prefix + room */
    uint32_t room;       /* index of its room, 0 with one room (client mode) */
    uint8_t recovered;   /* resume role: enum recovered */
    uint16_t close_code; /* from the peer's close frame, 0 if none */
    uint32_t interest;   /* epoll events registered, 0 = not in the epoll set */
    uint8_t tls_hs;      /* TLS handshake under way (state stays ST_CONNECTING) */
    SSL *ssl;            /* NULL: plain TCP */
    int index;           /* position in its list (server mode) */
    uint32_t chat_id;    /* server mode */
    uint64_t t_start;
    char key[32];
    buf_t in, out;
    uint64_t got;  /* this step's messages received (recv role) */
    uint64_t seq;  /* this step's messages sent (send role) */
    uint64_t due0; /* this step's schedule origin (send role) */
    uint64_t t_last; /* when its last message event arrived (resume role) */
    const char *error;
} conn_t;

static int epfd;
static uint8_t *rbuf;
/* "client ... tls": every client connection speaks TLS; NULL = plain TCP. */
static SSL_CTX *tls_ctx;
static uint64_t now;

static int tag_stdin, tag_timer, tag_listen;

static void set_interest(conn_t *c, uint32_t events) {
    if (c->interest == events || c->state == ST_CLOSED) return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    int op = c->interest == 0 ? EPOLL_CTL_ADD : events == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD;
    epoll_ctl(epfd, op, c->fd, &ev);
    c->interest = events;
}

static int buf_reserve(buf_t *b, uint32_t extra, uint32_t limit) {
    if (b->off > 0 && b->off == b->len) b->off = b->len = 0;
    if (b->len + extra <= b->cap) return 1;
    if (b->off > 0) { /* slide the unsent part down first */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
        if (b->len + extra <= b->cap) return 1;
    }
    if (b->len + extra > limit) return 0;
    uint32_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) return 0;
    b->p = p;
    b->cap = cap;
    return 1;
}

static void buf_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->off = b->cap = 0;
}

/* A masked client frame (mask=1) or a plain server frame (mask=0). */
static int frame_header(uint8_t *h, int opcode, size_t len, int mask) {
    int n = 0;
    h[n++] = (uint8_t)(0x80 | opcode);
    uint8_t mbit = mask ? 0x80 : 0;
    if (len < 126) {
        h[n++] = mbit | (uint8_t)len;
    } else if (len < 65536) {
        h[n++] = mbit | 126;
        h[n++] = (uint8_t)(len >> 8);
        h[n++] = (uint8_t)len;
    } else {
        h[n++] = mbit | 127;
        for (int i = 7; i >= 0; i--) h[n++] = (uint8_t)((uint64_t)len >> (8 * i));
    }
    return n;
}

static int queue_frame(conn_t *c, int opcode, const uint8_t *payload, size_t len,
                       int mask, uint32_t limit) {
    if (!buf_reserve(&c->out, (uint32_t)len + 14, limit)) return 0;
    uint8_t *p = c->out.p + c->out.len;
    int n = frame_header(p, opcode, len, mask);
    if (mask) {
        uint32_t key = rng32();
        uint8_t k[4];
        memcpy(k, &key, 4);
        memcpy(p + n, k, 4);
        n += 4;
        for (size_t i = 0; i < len; i++) p[n + i] = payload[i] ^ k[i & 3];
    } else {
        memcpy(p + n, payload, len);
    }
    c->out.len += (uint32_t)(n + len);
    return 1;
}

/* -- client state ----------------------------------------------------------- */

static struct sockaddr_in server_addr;
/* The ports connections go to: [0] is the command line's, the rest come from
   "open ... PORT".  Latencies are kept per target and merged for "latency". */
#define MAX_TARGETS 8
static uint16_t target_ports[MAX_TARGETS];
static int ntargets = 1;
static hist_t target_lat[MAX_TARGETS];
static uint64_t target_received[MAX_TARGETS];
static const char *host_header = "127.0.0.1";
static const char *url_path = "/";
/* What "codec" and "rooms" set for the connections opened next. */
static int open_json;
static uint32_t open_rooms; /* 0: every connection to url_path */
static char room_prefix[256];
/* "query R QUERY": what room R's connections add to their path. */
static char **room_queries;
static uint32_t nroom_queries;
/* The reconnect storm: when its "open resume" began, and what came back. */
static uint64_t storm_t0;
static uint64_t storm_history, storm_errors, storm_other, storm_closed;
#define JSON_SUBPROTOCOL "webchat.v1.json"
#define JSON_SEND_HEAD "{\"type\":\"message\",\"text\":\""
#define JSON_SEND_TAIL "\"}"
#define JSON_EVENT_HEAD "{\"type\":\"message\","
#define JSON_TEXT_KEY "\"text\":\""

static conn_t **conns;
static size_t nconns, conns_cap;

/* The step in progress. */
static uint32_t step_id;
static uint32_t payload_bytes = 64;
static hist_t lat, send_lag;
static uint64_t step_received, step_stale, step_bad, step_other, step_bytes;
static uint64_t step_closed[3];
static uint64_t total_sent_all_steps;

/* The open command in progress. */
static hist_t hs;
static uint64_t open_ok, open_failed, open_inflight;
static uint64_t err_refused, err_reset, err_timeout, err_http;

static conn_t **dirty;
static size_t ndirty, dirty_cap;

static void mark_dirty(conn_t *c) {
    if (c->dirty) return;
    if (ndirty == dirty_cap) {
        dirty_cap = dirty_cap ? dirty_cap * 2 : 1024;
        dirty = realloc(dirty, dirty_cap * sizeof *dirty);
    }
    dirty[ndirty++] = c;
    c->dirty = 1;
}

static void member_remove(conn_t *c);

static void conn_close(conn_t *c, const char *why, int reset) {
    if (c->state == ST_CLOSED) return;
    if (c->role == ROLE_SERVER) {
        member_remove(c);
    } else if (c->state == ST_CONNECTING || c->state == ST_HANDSHAKE) {
        open_inflight--;
        open_failed++;
    } else if (c->role <= ROLE_SLOW) {
        step_closed[c->role]++;
    } else if (c->role == ROLE_RESUME) {
        storm_closed++;
    }
    if (reset) {
        struct linger lg = {1, 0}; /* RST: no TIME_WAIT pile-up across runs */
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    }
    if (c->interest) epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->ssl) {
        SSL_free(c->ssl); /* no close_notify: the socket is closed (or reset) now */
        c->ssl = NULL;
    }
    close(c->fd);
    c->interest = 0;
    c->state = ST_CLOSED;
    c->error = why;
    buf_free(&c->in);
    buf_free(&c->out);
}

/* write(2), or SSL_write for a TLS connection, with write(2)'s results. */
static ssize_t conn_write(conn_t *c, const uint8_t *p, size_t n) {
    if (!c->ssl) return write(c->fd, p, n);
    ERR_clear_error();
    int r = SSL_write(c->ssl, p, n > INT32_MAX ? INT32_MAX : (int)n);
    if (r > 0) return r;
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
        errno = EAGAIN;
    } else if (!(e == SSL_ERROR_SYSCALL && errno)) {
        errno = ECONNRESET;
    }
    return -1;
}

/* read(2), or SSL_read for a TLS connection (as many records as are there,
   up to n), with read(2)'s results: 0 = the peer is done. */
static ssize_t conn_read(conn_t *c, uint8_t *p, size_t n) {
    if (!c->ssl) return read(c->fd, p, n);
    size_t got = 0;
    while (got < n) {
        ERR_clear_error();
        int r = SSL_read(c->ssl, p + got, (int)(n - got));
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (got) break;
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            errno = EAGAIN;
            return -1;
        }
        if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && errno == 0)) return 0;
        if (!(e == SSL_ERROR_SYSCALL && errno)) errno = ECONNRESET;
        return -1;
    }
    return (ssize_t)got;
}

static void conn_flush(conn_t *c) {
    while (c->state != ST_CLOSED && c->out.off < c->out.len) {
        ssize_t n = conn_write(c, c->out.p + c->out.off, c->out.len - c->out.off);
        if (n > 0) {
            c->out.off += (uint32_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            conn_close(c, errno == ECONNRESET || errno == EPIPE ? "reset" : "write error", 0);
            return;
        }
    }
    if (c->state == ST_CLOSED) return;
    int pending = c->out.off < c->out.len;
    if (pending == 0) c->out.off = c->out.len = 0;
    if (c->role == ROLE_SLOW && c->state == ST_OPEN) return; /* never in the epoll set */
    uint32_t want = (c->role == ROLE_SERVER || c->state != ST_CONNECTING) ? EPOLLIN : 0;
    set_interest(c, want | (pending ? EPOLLOUT : 0));
}

static void flush_dirty(void) {
    for (size_t i = 0; i < ndirty; i++) {
        dirty[i]->dirty = 0;
        conn_flush(dirty[i]);
    }
    ndirty = 0;
}

static inline uint64_t parse_digits(const uint8_t *p, int n, int *ok) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        unsigned d = (unsigned)(p[i] - '0');
        if (d > 9) {
            *ok = 0;
            return 0;
        }
        v = v * 10 + d;
    }
    return v;
}

#define HAS(p, len, s) (memmem((p), (len), (s), sizeof(s) - 1) != NULL)
#define STARTS(p, len, s) ((len) >= sizeof(s) - 1 && memcmp((p), (s), sizeof(s) - 1) == 0)

/* A resume connection: its welcome's "recovered", then the replay. */
static void resume_text(conn_t *c, const uint8_t *p, uint64_t len, uint64_t t) {
    if (STARTS(p, len, JSON_EVENT_HEAD)) {
        c->got++;
        c->t_last = t;
        if (HAS(p, len, "\"history\":true")) storm_history++;
    } else if (STARTS(p, len, "{\"type\":\"welcome\"")) {
        c->recovered = HAS(p, len, "\"recovered\":true")    ? REC_TRUE
                       : HAS(p, len, "\"recovered\":false") ? REC_FALSE
                                                             : REC_ABSENT;
    } else if (STARTS(p, len, "{\"type\":\"error\"")) {
        storm_errors++;
    } else {
        storm_other++; /* join, leave, ... */
    }
}

static void client_text(conn_t *c, const uint8_t *p, uint64_t len, uint64_t t) {
    if (c->role == ROLE_RESUME) {
        resume_text(c, p, len, t);
        return;
    }
    if (c->role != ROLE_RECV) {
        step_other++;
        return;
    }
    const uint8_t *mine;
    if (c->json) {
        /* {"type":"message","room":..,"id":..,"name":..,"text":"PAYLOAD",...} */
        size_t head = sizeof JSON_EVENT_HEAD - 1, key = sizeof JSON_TEXT_KEY - 1;
        if (len < head || memcmp(p, JSON_EVENT_HEAD, head) != 0) {
            step_other++; /* welcome, join, leave, ...: not a chat message */
            return;
        }
        const uint8_t *text = memmem(p, len, JSON_TEXT_KEY, key);
        if (!text || (uint64_t)(p + len - (text + key)) < payload_bytes + 1 ||
            text[key + payload_bytes] != '"') {
            step_bad++;
            return;
        }
        mine = text + key;
    } else {
        if (len < payload_bytes || len < 3 || memcmp(p, "id ", 3) != 0) {
            step_bad++;
            return;
        }
        mine = p + len - payload_bytes;
    }
    int ok = 1;
    uint64_t sid = parse_digits(mine, 8, &ok);
    uint64_t ts = parse_digits(mine + 9, 20, &ok);
    if (!ok) {
        step_bad++;
        return;
    }
    if (sid != step_id) {
        step_stale++;
        return;
    }
    c->got++;
    step_received++;
    target_received[c->target]++;
    hist_add(&target_lat[c->target], t > ts ? t - ts : 0, 1);
}

/* Parse the frames in p[0..n); return how many bytes were consumed. */
static size_t client_frames(conn_t *c, const uint8_t *p, size_t n, uint64_t t) {
    size_t at = 0;
    while (n - at >= 2 && c->state == ST_OPEN) {
        const uint8_t *f = p + at;
        int opcode = f[0] & 0x0F;
        int masked = f[1] & 0x80;
        uint64_t len = f[1] & 0x7F;
        size_t head = 2;
        if (len == 126) {
            if (n - at < 4) break;
            len = (uint64_t)f[2] << 8 | f[3];
            head = 4;
        } else if (len == 127) {
            if (n - at < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | f[2 + i];
            head = 10;
        }
        if (masked || len > MAX_FRAME) {
            conn_close(c, "bad frame from server", 1);
            return at;
        }
        if (n - at < head + len) break;
        const uint8_t *payload = f + head;
        step_bytes += head + len;
        switch (opcode) {
        case 1:
            if (f[0] & 0x80)
                client_text(c, payload, len, t);
            else
                step_bad++;
            break;
        case 8:
            c->close_code = len >= 2 ? (uint16_t)(payload[0] << 8 | payload[1]) : 1005;
            queue_frame(c, 8, payload, len >= 2 ? 2 : 0, 1, SENDER_OUT_CAP);
            conn_flush(c);
            conn_close(c, "closed by server", 0);
            return at + head + len;
        case 9:
            queue_frame(c, 10, payload, len, 1, SENDER_OUT_CAP);
            mark_dirty(c);
            break;
        case 10:
            break;
        default:
            step_bad++;
        }
        at += head + len;
    }
    return at;
}

static void client_readable(conn_t *c) {
    size_t keep = c->in.len;
    if (keep) memcpy(rbuf, c->in.p, keep);
    ssize_t n = conn_read(c, rbuf + keep, READ_CHUNK);
    if (n == 0) {
        conn_close(c, "eof", 0);
        return;
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return;
        if (c->state == ST_HANDSHAKE) err_reset++;
        conn_close(c, errno == ECONNRESET ? "reset" : "read error", 0);
        return;
    }
    uint64_t t = now_ns();
    size_t have = keep + (size_t)n;
    size_t used = 0;
    if (c->state == ST_HANDSHAKE) {
        uint8_t *end = memmem(rbuf, have, "\r\n\r\n", 4);
        if (!end) {
            if (have > 8192) {
                err_http++;
                conn_close(c, "handshake too long", 1);
            } else {
                buf_reserve(&c->in, (uint32_t)have, MAX_FRAME);
                memcpy(c->in.p, rbuf, have);
                c->in.len = (uint32_t)have;
            }
            return;
        }
        size_t head_len = (size_t)(end - rbuf) + 4;
        if (head_len > 8192) {
            err_http++;
            conn_close(c, "handshake too long", 1);
            return;
        }
        char head[8193];
        memcpy(head, rbuf, head_len);
        head[head_len] = 0;
        char expected[32];
        ws_accept(c->key, strlen(c->key), expected);
        char *accept = strcasestr(head, "\r\nsec-websocket-accept:");
        int good = strncmp(head, "HTTP/1.1 101", 12) == 0 && accept != NULL;
        if (good) {
            accept += 23;
            while (*accept == ' ') accept++;
            good = strncmp(accept, expected, strlen(expected)) == 0;
        }
        if (good && c->json) { /* the server must have chosen the JSON codec */
            char *proto = strcasestr(head, "\r\nsec-websocket-protocol:");
            if (proto) {
                proto += 26;
                while (*proto == ' ') proto++;
            }
            good = proto && strncmp(proto, JSON_SUBPROTOCOL, strlen(JSON_SUBPROTOCOL)) == 0 &&
                   (proto[strlen(JSON_SUBPROTOCOL)] == '\r' || proto[strlen(JSON_SUBPROTOCOL)] == ' ');
        }
        if (!good) {
            err_http++;
            conn_close(c, "handshake refused", 1);
            return;
        }
        c->state = ST_OPEN;
        open_inflight--;
        open_ok++;
        hist_add(&hs, t - c->t_start, 1);
        used = head_len;
        if (c->role == ROLE_SLOW) {
            set_interest(c, 0);
            return;
        }
    }
    used += client_frames(c, rbuf + used, have - used, t);
    if (c->state == ST_CLOSED) return;
    c->in.len = 0;
    if (have > used) {
        if (!buf_reserve(&c->in, (uint32_t)(have - used), MAX_FRAME)) {
            conn_close(c, "frame too large", 1);
            return;
        }
        memcpy(c->in.p, rbuf + used, have - used);
        c->in.len = (uint32_t)(have - used);
    }
}

static void send_upgrade(conn_t *c);

/* Go on with a TLS handshake; on its end, the HTTP upgrade. */
static void tls_handshake(conn_t *c) {
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        c->tls_hs = 0;
        send_upgrade(c);
        return;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        set_interest(c, EPOLLIN);
    } else if (e == SSL_ERROR_WANT_WRITE) {
        set_interest(c, EPOLLOUT);
    } else {
        err_reset++;
        conn_close(c, "tls handshake failed", 0);
    }
}

static void client_writable(conn_t *c) {
    if (c->state == ST_CONNECTING && c->tls_hs) {
        tls_handshake(c);
        return;
    }
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            if (err == ECONNREFUSED)
                err_refused++;
            else if (err == ECONNRESET)
                err_reset++;
            conn_close(c, "connect failed", 0);
            return;
        }
        if (tls_ctx) {
            c->ssl = SSL_new(tls_ctx);
            SSL_set_fd(c->ssl, c->fd);
            SSL_set_connect_state(c->ssl);
            c->tls_hs = 1;
            tls_handshake(c);
            return;
        }
        send_upgrade(c);
        return;
    }
    conn_flush(c);
}

/* Queue the HTTP upgrade request and start sending it. */
static void send_upgrade(conn_t *c) {
    {
        uint8_t raw[16];
        for (int i = 0; i < 16; i += 4) {
            uint32_t r = rng32();
            memcpy(raw + i, &r, 4);
        }
        base64(raw, 16, c->key);
        char req[1536], path[800];
        const char *query = c->room < nroom_queries && room_queries[c->room]
                                ? room_queries[c->room]
                                : "";
        if (c->in_room)
            snprintf(path, sizeof path, "%s%u%s", room_prefix, c->room, query);
        else
            snprintf(path, sizeof path, "%s%s", url_path, query);
        int n = snprintf(req, sizeof req,
                         "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                         "Sec-WebSocket-Version: 13\r\n%s\r\n",
                         path, host_header, c->key,
                         c->json ? "Sec-WebSocket-Protocol: " JSON_SUBPROTOCOL "\r\n" : "");
        buf_reserve(&c->out, (uint32_t)n, 4096);
        memcpy(c->out.p + c->out.len, req, (size_t)n);
        c->out.len += (uint32_t)n;
        c->state = ST_HANDSHAKE;
    }
    conn_flush(c);
}

static void client_event(conn_t *c, uint32_t events) {
    if (c->state == ST_CONNECTING && c->tls_hs) {
        tls_handshake(c);
        return;
    }
    if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP) && c->state == ST_CONNECTING) {
        client_writable(c);
        return;
    }
    if (events & EPOLLOUT) conn_flush(c);
    if (c->state != ST_CLOSED && events & (EPOLLIN | EPOLLHUP | EPOLLERR)) client_readable(c);
}

static conn_t *client_connect(int role, int target, uint64_t k) {
    conn_t *c = calloc(1, sizeof *c);
    c->role = (uint8_t)role;
    c->target = (uint8_t)target;
    c->json = (uint8_t)open_json;
    c->in_room = open_rooms > 0;
    c->room = open_rooms ? (uint32_t)(k % open_rooms) : 0;
    c->t_start = now_ns();
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (nconns == conns_cap) {
        conns_cap = conns_cap ? conns_cap * 2 : 1024;
        conns = realloc(conns, conns_cap * sizeof *conns);
    }
    conns[nconns++] = c;
    if (c->fd < 0) { /* out of descriptors: counted as an "other" failure */
        open_failed++;
        c->state = ST_CLOSED;
        c->error = "socket() failed";
        return c;
    }
    open_inflight++;
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (role == ROLE_SLOW) {
        int small = 4096; /* a small window fills, and backs the server up, sooner */
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    }
    c->state = ST_CONNECTING;
    struct sockaddr_in addr = server_addr;
    addr.sin_port = htons(target_ports[target]);
    int r = connect(c->fd, (struct sockaddr *)&addr, sizeof addr);
    if (r < 0 && errno != EINPROGRESS) {
        if (errno == ECONNREFUSED) err_refused++;
        conn_close(c, "connect failed", 0);
        return c;
    }
    set_interest(c, EPOLLOUT);
    return c;
}

/* -- the event loop ------------------------------------------------------------ */

static int timer_fd;
static uint64_t timer_armed;

static void arm_timer(uint64_t at) {
    if (at == timer_armed) return;
    struct itimerspec its = {0};
    its.it_value.tv_sec = (time_t)(at / 1000000000ull);
    its.it_value.tv_nsec = (long)(at % 1000000000ull);
    timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
    timer_armed = at;
}

static int stdin_ready;

/* One epoll_wait and the handling of what it returned. */
static void poll_once(int timeout_ms, void (*on_event)(conn_t *, uint32_t)) {
    struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(epfd, evs, MAX_EVENTS, timeout_ms);
    for (int i = 0; i < n; i++) {
        void *ptr = evs[i].data.ptr;
        if (ptr == &tag_stdin) {
            stdin_ready = 1;
        } else if (ptr == &tag_timer) {
            uint64_t ticks;
            if (read(timer_fd, &ticks, sizeof ticks) < 0) { /* nothing to do */
            }
            timer_armed = 0;
        } else if (ptr == &tag_listen) {
            on_event(NULL, evs[i].events);
        } else {
            on_event((conn_t *)ptr, evs[i].events);
        }
    }
    flush_dirty();
    now = now_ns();
}

static void progress(const char *phase, uint64_t t0, uint64_t sent, double cpu0) {
    double wall = (now - t0) / 1e9;
    printf("{\"type\": \"progress\", \"phase\": \"%s\", \"elapsed_s\": %.2f, "
           "\"sent\": %llu, \"received\": %llu, \"opened\": %llu, \"failed\": %llu, "
           "\"loadgen_cpu\": %.3f}\n",
           phase, wall, (unsigned long long)sent, (unsigned long long)step_received,
           (unsigned long long)open_ok, (unsigned long long)open_failed,
           wall > 0 ? (cpu_seconds() - cpu0) / wall : 0.0);
    fflush(stdout);
}

static void cmd_open(int role, uint64_t count, uint64_t concurrency, double timeout_s,
                     int target) {
    memset(&hs, 0, sizeof hs);
    open_ok = open_failed = open_inflight = 0;
    err_refused = err_reset = err_timeout = err_http = 0;
    size_t first = nconns;
    uint64_t started = 0;
    now = now_ns();
    uint64_t t0 = now, deadline = now + (uint64_t)(timeout_s * 1e9), next_report = now + 1000000000ull;
    double cpu0 = cpu_seconds();
    if (role == ROLE_RESUME) {
        storm_t0 = t0;
        storm_history = storm_errors = storm_other = storm_closed = 0;
    }
    while (open_ok + open_failed < count && now < deadline) {
        while (open_inflight < concurrency && started < count) {
            client_connect(role, target, started);
            started++;
        }
        poll_once(10, client_event);
        if (now >= next_report) {
            progress("open", t0, 0, cpu0);
            next_report += 1000000000ull;
        }
    }
    uint64_t t_end = now;
    for (size_t i = first; i < nconns; i++) {
        conn_t *c = conns[i];
        if (c->state == ST_CONNECTING || c->state == ST_HANDSHAKE) {
            err_timeout++;
            conn_close(c, "timeout", 1);
        }
    }
    open_failed += count - started; /* never even started before the deadline */
    double wall = (t_end - t0) / 1e9;
    printf("{\"type\": \"opened\", \"role\": \"%s\", \"requested\": %llu, \"ok\": %llu, "
           "\"failed\": %llu, \"elapsed_s\": %.4f, \"per_s\": %.1f, \"loadgen_cpu\": %.3f, "
           "\"errors\": {\"refused\": %llu, \"reset\": %llu, \"timeout\": %llu, "
           "\"http\": %llu, \"other\": %llu}, ",
           role_names[role], (unsigned long long)count, (unsigned long long)open_ok,
           (unsigned long long)open_failed, wall, wall > 0 ? open_ok / wall : 0.0,
           wall > 0 ? (cpu_seconds() - cpu0) / wall : 0.0, (unsigned long long)err_refused,
           (unsigned long long)err_reset, (unsigned long long)err_timeout,
           (unsigned long long)err_http,
           (unsigned long long)(open_failed - err_refused - err_reset - err_timeout - err_http));
    hist_json("handshake", &hs);
    printf("}\n");
    fflush(stdout);
}

static uint64_t sender_due(conn_t *c, uint64_t interval) { return c->due0 + c->seq * interval; }

static void cmd_step(uint32_t id, double rate, double seconds, uint32_t payload,
                     double drain_s, double settle_s) {
    conn_t **senders = malloc((nconns + 1) * sizeof *senders);
    size_t nsend = 0, nrecv = 0;
    uint32_t nrooms = 1; /* rooms are 0 .. nrooms-1 */
    for (size_t i = 0; i < nconns; i++)
        if (conns[i]->room >= nrooms) nrooms = conns[i]->room + 1;
    /* per room: open receivers now, and messages sent this step */
    uint64_t *room_recv = calloc(nrooms, sizeof *room_recv);
    uint64_t *room_sent = calloc(nrooms, sizeof *room_sent);
    for (size_t i = 0; i < nconns; i++) {
        conn_t *c = conns[i];
        if (c->state != ST_OPEN) continue;
        c->got = 0;
        c->seq = 0;
        if (c->role == ROLE_SEND) senders[nsend++] = c;
        if (c->role == ROLE_RECV) {
            nrecv++;
            room_recv[c->room]++;
        }
    }
    step_id = id;
    payload_bytes = payload;
    memset(&lat, 0, sizeof lat);
    memset(target_lat, 0, sizeof target_lat);
    memset(target_received, 0, sizeof target_received);
    memset(&send_lag, 0, sizeof send_lag);
    step_received = step_stale = step_bad = step_other = step_bytes = 0;
    memset(step_closed, 0, sizeof step_closed);
    uint64_t sent = 0, overflow = 0;
    /* Per sender: rate/nsend messages a second, staggered so they interleave. */
    uint64_t interval = nsend ? (uint64_t)(1e9 * nsend / rate) : 0;
    if (interval == 0) interval = 1;
    now = now_ns();
    uint64_t t0 = now + 1000000ull, t_end = t0 + (uint64_t)(seconds * 1e9);
    for (size_t i = 0; i < nsend; i++) senders[i]->due0 = t0 + interval * i / nsend;
    double cpu0 = cpu_seconds();
    uint64_t next_report = t0 + 1000000000ull;
    /* The frame's text: the payload, or the payload inside a JSON message event. */
    size_t jhead = sizeof JSON_SEND_HEAD - 1, jtail = sizeof JSON_SEND_TAIL - 1;
    uint8_t *json_msg = malloc(jhead + payload + jtail);
    memcpy(json_msg, JSON_SEND_HEAD, jhead);
    memset(json_msg + jhead, 'x', payload);
    memcpy(json_msg + jhead + payload, JSON_SEND_TAIL, jtail);
    uint8_t *msg = malloc(payload + 1);
    memset(msg, 'x', payload);
    while (now < t_end) {
        uint64_t next_due = t_end;
        uint64_t stamp = now_ns();
        for (size_t i = 0; i < nsend; i++) {
            conn_t *c = senders[i];
            if (c->state != ST_OPEN) continue;
            uint64_t due;
            while ((due = sender_due(c, interval)) <= stamp && due < t_end) {
                char head[32];
                snprintf(head, sizeof head, "%08u %020llu ", id, (unsigned long long)stamp);
                hist_add(&send_lag, stamp - due, 1);
                int queued;
                if (c->json) {
                    memcpy(json_msg + jhead, head, 30 < payload ? 30 : payload);
                    queued = queue_frame(c, 1, json_msg, jhead + payload + jtail, 1,
                                         SENDER_OUT_CAP);
                } else {
                    memcpy(msg, head, 30 < payload ? 30 : payload);
                    queued = queue_frame(c, 1, msg, payload, 1, SENDER_OUT_CAP);
                }
                if (!queued) {
                    overflow++; /* the server is not reading: this one is never sent */
                } else {
                    sent++;
                    room_sent[c->room]++;
                }
                c->seq++;
            }
            if (due < next_due) next_due = due;
            if (c->out.len > c->out.off) mark_dirty(c);
        }
        flush_dirty();
        arm_timer(next_due);
        poll_once(50, client_event);
        if (now >= next_report) {
            progress("send", t0, sent, cpu0);
            next_report += 1000000000ull;
        }
    }
    double send_wall = (now - t0) / 1e9;
    double send_cpu = (cpu_seconds() - cpu0) / send_wall;
    uint64_t expected = 0;
    for (uint32_t r = 0; r < nrooms; r++) expected += room_sent[r] * room_recv[r];
    uint64_t drain_start = now, drain_end = now + (uint64_t)(drain_s * 1e9);
    uint64_t last_change = now, last_seen = step_received;
    progress("drain", t0, sent, cpu0);
    while (step_received < expected && now < drain_end && now - last_change < 1000000000ull) {
        poll_once(10, client_event);
        if (step_received != last_seen) {
            last_seen = step_received;
            last_change = now;
        }
    }
    double drain_wall = (now - drain_start) / 1e9;
    /* Settle: let what an overloaded server still owes arrive before the next step. */
    uint64_t settle_end = now + (uint64_t)(settle_s * 1e9), quiet_since = now;
    uint64_t bytes_seen = step_bytes;
    while (now < settle_end && now - quiet_since < 300000000ull) {
        poll_once(10, client_event);
        if (step_bytes != bytes_seen) {
            bytes_seen = step_bytes;
            quiet_since = now;
        }
    }
    total_sent_all_steps += sent;
    uint64_t short_receivers = 0, min_got = nrecv ? UINT64_MAX : 0;
    for (size_t i = 0; i < nconns; i++) {
        conn_t *c = conns[i];
        if (c->role != ROLE_RECV) continue;
        if (c->got < room_sent[c->room] && (c->state == ST_OPEN || c->got > 0))
            short_receivers++;
        if (c->state == ST_OPEN && c->got < min_got) min_got = c->got;
    }
    if (min_got == UINT64_MAX) min_got = 0;
    printf("{\"type\": \"step\", \"id\": %u, \"rate\": %.1f, \"seconds\": %.3f, "
           "\"senders\": %zu, \"receivers\": %zu, \"sent\": %llu, \"overflow\": %llu, "
           "\"expected\": %llu, \"received\": %llu, \"lost\": %lld, \"stale\": %llu, "
           "\"bad\": %llu, \"other\": %llu, \"bytes\": %llu, \"short_receivers\": %llu, "
           "\"min_received\": %llu, \"closed\": {\"recv\": %llu, \"send\": %llu, "
           "\"slow\": %llu}, \"loadgen_cpu\": %.3f, \"drain_s\": %.3f, "
           "\"total_sent\": %llu, ",
           id, rate, send_wall, nsend, nrecv, (unsigned long long)sent,
           (unsigned long long)overflow, (unsigned long long)expected,
           (unsigned long long)step_received, (long long)(expected - step_received),
           (unsigned long long)step_stale, (unsigned long long)step_bad,
           (unsigned long long)step_other, (unsigned long long)step_bytes,
           (unsigned long long)short_receivers, (unsigned long long)min_got,
           (unsigned long long)step_closed[0], (unsigned long long)step_closed[1],
           (unsigned long long)step_closed[2], send_cpu, drain_wall,
           (unsigned long long)total_sent_all_steps);
    size_t target_recv[MAX_TARGETS] = {0};
    for (size_t i = 0; i < nconns; i++)
        if (conns[i]->role == ROLE_RECV && conns[i]->state == ST_OPEN)
            target_recv[conns[i]->target]++;
    for (int g = 0; g < ntargets; g++) { /* "latency": all targets together */
        for (int i = 0; i < HBUCKETS; i++) lat.count[i] += target_lat[g].count[i];
        lat.n += target_lat[g].n;
        if (target_lat[g].max > lat.max) lat.max = target_lat[g].max;
    }
    printf("\"targets\": [");
    for (int g = 0; g < ntargets; g++) {
        printf("%s{\"port\": %u, \"receivers\": %zu, \"received\": %llu, ", g ? ", " : "",
               target_ports[g], target_recv[g], (unsigned long long)target_received[g]);
        hist_json("latency", &target_lat[g]);
        printf("}");
    }
    printf("], ");
    hist_json("latency", &lat);
    printf(", ");
    hist_json("send_lag", &send_lag);
    printf("}\n");
    fflush(stdout);
    free(msg);
    free(json_msg);
    free(senders);
    free(room_recv);
    free(room_sent);
}

static const char *tcp_state_name(int fd) {
    struct tcp_info info;
    socklen_t len = sizeof info;
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) < 0) return "unknown";
    switch (info.tcpi_state) {
    case TCP_ESTABLISHED: return "established";
    case TCP_CLOSE_WAIT: return "close_wait"; /* the server sent FIN */
    case TCP_CLOSE: return "closed";          /* reset by the server */
    default: return "other";
    }
}

static void cmd_check(void) {
    size_t open[3] = {0}, closed[3] = {0};
    printf("{\"type\": \"check\", \"slow\": [");
    int first = 1;
    for (size_t i = 0; i < nconns; i++) {
        conn_t *c = conns[i];
        if (c->role > ROLE_SLOW) continue;
        if (c->state == ST_OPEN) open[c->role]++;
        if (c->state == ST_CLOSED) closed[c->role]++;
        if (c->role == ROLE_SLOW && c->fd >= 0 && c->state != ST_CONNECTING) {
            printf("%s{\"tcp_state\": \"%s\", \"state\": \"%s\"}", first ? "" : ", ",
                   c->state == ST_CLOSED ? "closed" : tcp_state_name(c->fd),
                   c->state == ST_OPEN ? "open" : c->error ? c->error : "closed");
            first = 0;
        }
    }
    printf("], \"open\": {\"recv\": %zu, \"send\": %zu, \"slow\": %zu}, "
           "\"closed\": {\"recv\": %zu, \"send\": %zu, \"slow\": %zu}, \"close_codes\": {",
           open[0], open[1], open[2], closed[0], closed[1], closed[2]);
    /* close codes the server sent, by code */
    int codes[64], counts[64], ncodes = 0;
    for (size_t i = 0; i < nconns; i++) {
        int code = conns[i]->close_code;
        if (!code) continue;
        int j = 0;
        while (j < ncodes && codes[j] != code) j++;
        if (j == ncodes && ncodes < 64) {
            codes[ncodes] = code;
            counts[ncodes++] = 0;
        }
        if (j < 64) counts[j]++;
    }
    for (int j = 0; j < ncodes; j++) printf("%s\"%d\": %d", j ? ", " : "", codes[j], counts[j]);
    printf("}}\n");
    fflush(stdout);
}

static void cmd_query(uint32_t room, const char *query) {
    if (room >= nroom_queries) {
        uint32_t n = room + 1 > nroom_queries * 2 ? room + 1 : nroom_queries * 2;
        room_queries = realloc(room_queries, n * sizeof *room_queries);
        memset(room_queries + nroom_queries, 0, (n - nroom_queries) * sizeof *room_queries);
        nroom_queries = n;
    }
    free(room_queries[room]);
    room_queries[room] = strdup(query);
    printf("{\"type\": \"query\", \"room\": %u}\n", room);
    fflush(stdout);
}

static void cmd_query_clear(void) {
    for (uint32_t r = 0; r < nroom_queries; r++) free(room_queries[r]);
    free(room_queries);
    room_queries = NULL;
    nroom_queries = 0;
    printf("{\"type\": \"query\", \"room\": null}\n");
    fflush(stdout);
}

/* Every open resume connection has had `expect` message events (or the time is up). */
static void cmd_catchup(uint64_t expect, double timeout_s) {
    now = now_ns();
    uint64_t t0 = now, deadline = now + (uint64_t)(timeout_s * 1e9), next_report = now + 1000000000ull;
    double cpu0 = cpu_seconds();
    for (;;) {
        uint64_t behind = 0, got = 0;
        for (size_t i = 0; i < nconns; i++) {
            conn_t *c = conns[i];
            if (c->role != ROLE_RESUME) continue;
            got += c->got;
            if (c->state == ST_OPEN && c->got < expect) behind++;
        }
        if (behind == 0 || now >= deadline) break;
        poll_once(10, client_event);
        if (now >= next_report) {
            step_received = got;
            progress("catchup", t0, 0, cpu0);
            next_report += 1000000000ull;
        }
    }
    hist_t from_connect, from_start;
    memset(&from_connect, 0, sizeof from_connect);
    memset(&from_start, 0, sizeof from_start);
    uint64_t clients = 0, open = 0, caught_up = 0, messages = 0, extra = 0, last = 0;
    uint64_t rec[4] = {0};
    for (size_t i = 0; i < nconns; i++) {
        conn_t *c = conns[i];
        if (c->role != ROLE_RESUME) continue;
        clients++;
        if (c->state == ST_OPEN) open++;
        rec[c->recovered]++;
        messages += c->got;
        if (c->got > expect) extra += c->got - expect;
        if (c->got >= expect) {
            caught_up++;
            uint64_t at = expect ? c->t_last : c->t_start;
            hist_add(&from_connect, at > c->t_start ? at - c->t_start : 0, 1);
            hist_add(&from_start, at > storm_t0 ? at - storm_t0 : 0, 1);
            if (at > last) last = at;
        }
    }
    printf("{\"type\": \"catchup\", \"expect\": %llu, \"clients\": %llu, \"open\": %llu, "
           "\"caught_up\": %llu, \"messages\": %llu, \"history\": %llu, \"extra\": %llu, "
           "\"errors\": %llu, \"other\": %llu, \"closed\": %llu, "
           "\"recovered\": {\"true\": %llu, \"false\": %llu, \"absent\": %llu, "
           "\"no_welcome\": %llu}, \"all_caught_up_s\": %.4f, \"waited_s\": %.3f, "
           "\"loadgen_cpu\": %.3f, ",
           (unsigned long long)expect, (unsigned long long)clients, (unsigned long long)open,
           (unsigned long long)caught_up, (unsigned long long)messages,
           (unsigned long long)storm_history, (unsigned long long)extra,
           (unsigned long long)storm_errors, (unsigned long long)storm_other,
           (unsigned long long)storm_closed, (unsigned long long)rec[REC_TRUE],
           (unsigned long long)rec[REC_FALSE], (unsigned long long)rec[REC_ABSENT],
           (unsigned long long)rec[REC_UNSEEN],
           caught_up == clients && clients ? (last - storm_t0) / 1e9 : -1.0,
           (now - t0) / 1e9, now > t0 ? (cpu_seconds() - cpu0) / ((now - t0) / 1e9) : 0.0);
    hist_json("from_connect", &from_connect);
    printf(", ");
    hist_json("from_start", &from_start);
    printf("}\n");
    fflush(stdout);
}

static char line[4096];
static size_t line_len;

/* Read stdin until a whole command line is in `line`; keep the sockets served meanwhile. */
static int next_command(void) {
    for (;;) {
        char *nl = memchr(line, '\n', line_len);
        if (nl) {
            *nl = 0;
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &tag_stdin};
        /* stdin is watched only between commands: a line typed ahead is not
           read (nor busy-polled) while a step runs */
        stdin_ready = epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) < 0; /* not a pipe */
        while (!stdin_ready) poll_once(1000, client_event);
        epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
        ssize_t n = read(0, line + line_len, sizeof line - 1 - line_len);
        if (n <= 0) return 0; /* the driver is gone */
        line_len += (size_t)n;
    }
}

static void consume_command(void) {
    size_t used = strlen(line) + 1; /* next_command put a NUL on the newline */
    memmove(line, line + used, line_len - used);
    line_len -= used;
}

static void quit_all(void) {
    for (size_t i = 0; i < nconns; i++) conn_close(conns[i], "quit", 1);
}

static void cmd_reset(void) {
    size_t n = nconns;
    quit_all();
    ndirty = 0;
    for (size_t i = 0; i < nconns; i++) free(conns[i]);
    nconns = 0;
    printf("{\"type\": \"reset\", \"closed\": %zu}\n", n);
    fflush(stdout);
}

static int client_main(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: loadgen client IP PORT HOST PATH\n");
        return 2;
    }
    server_addr.sin_family = AF_INET;
    server_addr.sin_port = htons((uint16_t)atoi(argv[3]));
    target_ports[0] = (uint16_t)atoi(argv[3]);
    if (inet_pton(AF_INET, argv[2], &server_addr.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", argv[2]);
        return 2;
    }
    host_header = argv[4];
    url_path = argv[5];
    if (argc >= 7 && strcmp(argv[6], "tls") == 0) {
        tls_ctx = SSL_CTX_new(TLS_client_method());
        if (!tls_ctx) die("SSL_CTX_new");
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
        /* A frame queue that grows (realloc) may move between a write that
           would block and its retry; a retry may also carry more. */
        SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                      SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    }
    printf("{\"type\": \"ready\", \"pid\": %d, \"tls\": %s}\n", getpid(),
           tls_ctx ? "true" : "false");
    fflush(stdout);
    while (next_command()) {
        char role[16], query[701];
        unsigned long long count, concurrency;
        unsigned id, payload, port = target_ports[0];
        double a, b, c, d;
        if (sscanf(line, "open %15s %llu %llu %lf %u", role, &count, &concurrency, &a, &port) >= 4) {
            int r = strcmp(role, "send") == 0     ? ROLE_SEND
                    : strcmp(role, "slow") == 0   ? ROLE_SLOW
                    : strcmp(role, "resume") == 0 ? ROLE_RESUME
                                                  : ROLE_RECV;
            int target = 0;
            while (target < ntargets && target_ports[target] != port) target++;
            if (target == ntargets && (ntargets == MAX_TARGETS || port == 0 || port > 65535)) {
                printf("{\"type\": \"error\", \"error\": \"bad port, or too many ports\"}\n");
                fflush(stdout);
            } else {
                if (target == ntargets) target_ports[ntargets++] = (uint16_t)port;
                cmd_open(r, count, concurrency, a, target);
            }
        } else if (sscanf(line, "step %u %lf %lf %u %lf %lf", &id, &a, &b, &payload, &c, &d) == 6) {
            if (payload < 30 || payload > 60000 || a <= 0 || b <= 0) {
                printf("{\"type\": \"error\", \"error\": \"bad step: payload 30..60000, rate > 0\"}\n");
                fflush(stdout);
            } else {
                cmd_step(id, a, b, payload, c, d);
            }
        } else if (strcmp(line, "codec seed") == 0 || strcmp(line, "codec json") == 0) {
            open_json = strcmp(line, "codec json") == 0;
            printf("{\"type\": \"codec\", \"json\": %s}\n", open_json ? "true" : "false");
            fflush(stdout);
        } else if (sscanf(line, "rooms %u %255s", &id, room_prefix) == 2) {
            open_rooms = id;
            printf("{\"type\": \"rooms\", \"rooms\": %u}\n", open_rooms);
            fflush(stdout);
        } else if (strcmp(line, "query clear") == 0) {
            cmd_query_clear();
        } else if (sscanf(line, "query %u %700s", &id, query) == 2) {
            cmd_query(id, query);
        } else if (sscanf(line, "catchup %llu %lf", &count, &a) == 2) {
            cmd_catchup(count, a);
        } else if (strncmp(line, "check", 5) == 0) {
            cmd_check();
        } else if (strncmp(line, "reset", 5) == 0) {
            cmd_reset();
        } else if (strncmp(line, "quit", 4) == 0) {
            quit_all();
            printf("{\"type\": \"bye\"}\n");
            fflush(stdout);
            return 0;
        } else {
            printf("{\"type\": \"error\", \"error\": \"unknown command\"}\n");
            fflush(stdout);
        }
        consume_command();
    }
    quit_all();
    return 0;
}

/* -- a trivial fan-out server, to find the load generator's own ceiling ------- */

static conn_t **members;
static size_t nmembers, members_cap;
static int listen_fd;
static uint32_t next_chat_id = 1;
static uint64_t served_messages, served_deliveries;

static void member_remove(conn_t *c) {
    if (c->index < 0) return;
    conn_t *last = members[--nmembers];
    members[c->index] = last;
    last->index = c->index;
    c->index = -1;
}

/* Not freed: a closed conn may still sit in this turn's event or dirty list,
   and this server only lives for a calibration run. */
static void server_close(conn_t *c) { conn_close(c, "closed", 0); }

static void server_broadcast(conn_t *from, const uint8_t *payload, size_t len) {
    static uint8_t frame[MAX_FRAME + 64];
    char prefix[24];
    int plen = snprintf(prefix, sizeof prefix, "id %u: ", from->chat_id);
    int h = frame_header(frame, 1, len + (size_t)plen, 0);
    memcpy(frame + h, prefix, (size_t)plen);
    memcpy(frame + h + plen, payload, len);
    size_t total = (size_t)h + (size_t)plen + len;
    served_messages++;
    for (size_t i = 0; i < nmembers; i++) {
        conn_t *c = members[i];
        if (c == from) continue;
        if (!buf_reserve(&c->out, (uint32_t)total, SERVER_OUT_CAP)) {
            server_close(c); /* too slow */
            i--;
            continue;
        }
        memcpy(c->out.p + c->out.len, frame, total);
        c->out.len += (uint32_t)total;
        served_deliveries++;
        mark_dirty(c);
    }
}

static void server_readable(conn_t *c) {
    size_t keep = c->in.len;
    if (keep) memcpy(rbuf, c->in.p, keep);
    ssize_t n = read(c->fd, rbuf + keep, READ_CHUNK);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        server_close(c);
        return;
    }
    size_t have = keep + (size_t)n, at = 0;
    if (c->state == ST_HANDSHAKE) {
        uint8_t *end = memmem(rbuf, have, "\r\n\r\n", 4);
        if (!end) {
            if (have > 8192) {
                server_close(c);
                return;
            }
            buf_reserve(&c->in, (uint32_t)have, MAX_FRAME);
            memcpy(c->in.p, rbuf, have);
            c->in.len = (uint32_t)have;
            return;
        }
        at = (size_t)(end - rbuf) + 4;
        if (at > 8192) {
            server_close(c);
            return;
        }
        char head[8193];
        memcpy(head, rbuf, at);
        head[at] = 0;
        char *key = strcasestr(head, "\r\nsec-websocket-key:");
        if (!key) {
            server_close(c);
            return;
        }
        key += 20;
        while (*key == ' ') key++;
        size_t key_len = strcspn(key, "\r\n ");
        char accept[32], resp[256];
        ws_accept(key, key_len, accept);
        int rn = snprintf(resp, sizeof resp,
                          "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                          accept);
        buf_reserve(&c->out, (uint32_t)rn, SERVER_OUT_CAP);
        memcpy(c->out.p + c->out.len, resp, (size_t)rn);
        c->out.len += (uint32_t)rn;
        mark_dirty(c);
        c->state = ST_OPEN;
        c->chat_id = next_chat_id++;
        if (nmembers == members_cap) {
            members_cap = members_cap ? members_cap * 2 : 1024;
            members = realloc(members, members_cap * sizeof *members);
        }
        c->index = (int)nmembers;
        members[nmembers++] = c;
    }
    while (have - at >= 6 && c->state == ST_OPEN) {
        uint8_t *f = rbuf + at;
        int opcode = f[0] & 0x0F;
        uint64_t len = f[1] & 0x7F;
        size_t head = 2;
        if (!(f[1] & 0x80)) {
            server_close(c); /* clients must mask */
            return;
        }
        if (len == 126) {
            len = (uint64_t)f[2] << 8 | f[3];
            head = 4;
        } else if (len == 127) {
            if (have - at < 14) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | f[2 + i];
            head = 10;
        }
        if (len > MAX_FRAME - 64) {
            server_close(c);
            return;
        }
        if (have - at < head + 4 + len) break;
        uint8_t *k = f + head, *payload = f + head + 4;
        for (uint64_t i = 0; i < len; i++) payload[i] ^= k[i & 3];
        if (opcode == 1) {
            server_broadcast(c, payload, len);
        } else if (opcode == 8) {
            queue_frame(c, 8, payload, len >= 2 ? 2 : 0, 0, SERVER_OUT_CAP + 64);
            conn_flush(c);
            server_close(c);
            return;
        } else if (opcode == 9) {
            queue_frame(c, 10, payload, len, 0, SERVER_OUT_CAP + 64);
            mark_dirty(c);
        }
        at += head + 4 + len;
    }
    c->in.len = 0;
    if (have > at) {
        buf_reserve(&c->in, (uint32_t)(have - at), MAX_FRAME);
        memcpy(c->in.p, rbuf + at, have - at);
        c->in.len = (uint32_t)(have - at);
    }
}

static void server_event(conn_t *c, uint32_t events) {
    if (c == NULL) {
        for (;;) {
            int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0) return;
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            conn_t *n = calloc(1, sizeof *n);
            n->fd = fd;
            n->role = ROLE_SERVER;
            n->state = ST_HANDSHAKE;
            n->index = -1;
            set_interest(n, EPOLLIN);
        }
    }
    if (c->state == ST_CLOSED) return;
    if (events & EPOLLOUT) conn_flush(c);
    if (c->state != ST_CLOSED && events & (EPOLLIN | EPOLLHUP | EPOLLERR)) server_readable(c);
}

static int serve_main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: loadgen serve PORT\n");
        return 2;
    }
    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listen_fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(listen_fd, 1024) < 0) die("listen");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &tag_listen};
    epoll_ctl(epfd, EPOLL_CTL_ADD, listen_fd, &ev);
    printf("{\"type\": \"ready\", \"pid\": %d}\n", getpid());
    fflush(stdout);
    for (;;) poll_once(1000, server_event);
}

int main(int argc, char **argv) {
    /* Die with the driver, whatever becomes of it. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) return 1;
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake on time: the send schedule is in ns */
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    rng_state ^= now_ns() ^ ((uint64_t)getpid() << 32);
    rbuf = malloc(READ_CHUNK + MAX_FRAME + 64);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &tag_timer};
    epoll_ctl(epfd, EPOLL_CTL_ADD, timer_fd, &ev);
    if (argc >= 2 && strcmp(argv[1], "client") == 0) return client_main(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "serve") == 0) return serve_main(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "selftest") == 0) {
        char out[32];
        ws_accept("dGhlIHNhbXBsZSBub25jZQ==", 24, out);
        printf("{\"type\": \"selftest\", \"accept_ok\": %s}\n",
               strcmp(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") == 0 ? "true" : "false");
        return strcmp(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") != 0;
    }
    fprintf(stderr, "usage: loadgen client IP PORT HOST PATH | serve PORT | selftest\n");
    return 2;
}
