/*
 * httpload: the HTTP API's load generator (issue #15), one thread, epoll.
 *
 *   httpload IP PORT HOST REQUEST_FILE CONNECTIONS SECONDS WARMUP_S WS_PATH MEMBERS
 *
 * First MEMBERS seed-format WebSocket clients join WS_PATH (say, /ws/r) and
 * from then on only count the text frames they are sent.  Then CONNECTIONS
 * HTTP/1.1 keep-alive connections each send REQUEST_FILE's bytes (a whole
 * request: request line, headers, body), wait for the whole response
 * (Content-Length or chunked), and send it again at once: one request in
 * flight per connection, no pipelining, as an app's HTTP client pool does.
 * A connection the server closes (Connection: close, or a request cap) is
 * opened again and counted.  The first WARMUP_S seconds are not measured;
 * SECONDS are.  Then the responses still in flight are awaited, and the
 * members until each has as many frames as there were 2xx answers (or 5 s
 * without progress).
 *
 * Prints one JSON line: requests and answers by status in the measured
 * window, requests/s, latency p50/p90/p99/max (from writing the request to
 * the end of its response), reconnects, errors, the 2xx answers in all, the
 * members' least and most frames, and the CPU seconds this process used.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    int member; /* a WebSocket member, else an HTTP connection */
    char *buf;
    size_t len, cap;
    uint64_t sent_at; /* ns; 0: no request in flight */
    size_t wrote;     /* bytes of the request written so far */
    uint64_t frames;  /* members: text frames seen */
} conn_t;

static struct sockaddr_in addr;
static char *request;
static size_t request_len;
static uint32_t *lat_us;
static size_t nlat, lat_cap;
static uint64_t status_count[6]; /* 1xx .. 5xx; [0]: unparsable */
static uint64_t ok_total, reconnects, errors, measured;
static int epfd;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    printf("{\"error\": \"%s: %s\"}\n", what, strerror(errno));
    exit(1);
}

static void reserve(conn_t *c, size_t more) {
    if (c->len + more <= c->cap) return;
    c->cap = (c->len + more) * 2;
    c->buf = realloc(c->buf, c->cap);
    if (!c->buf) die("realloc");
}

static int dial(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void watch(conn_t *c) {
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
}

/* A seed-format member: the opening handshake, blocking, then counted frames. */
static conn_t *join(const char *host, const char *path) {
    conn_t *c = calloc(1, sizeof *c);
    c->member = 1;
    c->fd = dial();
    char req[1024];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     path, host);
    if (write(c->fd, req, (size_t)n) != n) die("write handshake");
    char head[4096];
    size_t got = 0;
    while (got < sizeof head - 1) {
        ssize_t r = read(c->fd, head + got, sizeof head - 1 - got);
        if (r <= 0) die("read handshake");
        got += (size_t)r;
        head[got] = 0;
        char *end = strstr(head, "\r\n\r\n");
        if (end) {
            if (strncmp(head, "HTTP/1.1 101", 12) != 0) {
                printf("{\"error\": \"member refused: %.12s\"}\n", head);
                exit(1);
            }
            size_t rest = got - (size_t)(end + 4 - head);
            reserve(c, rest + 65536);
            memcpy(c->buf, end + 4, rest);
            c->len = rest;
            watch(c);
            return c;
        }
    }
    die("handshake too long");
    return NULL;
}

/* Count whole server frames in the member's buffer; keep a partial one. */
static void member_frames(conn_t *c) {
    size_t at = 0;
    while (c->len - at >= 2) {
        uint8_t *p = (uint8_t *)c->buf + at;
        uint64_t len = p[1] & 0x7f;
        size_t head = 2;
        if (len == 126) {
            if (c->len - at < 4) break;
            len = (uint64_t)p[2] << 8 | p[3];
            head = 4;
        } else if (len == 127) {
            if (c->len - at < 10) break;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | p[2 + i];
            head = 10;
        }
        if (c->len - at < head + len) break;
        if ((p[0] & 0x0f) == 1) c->frames++;
        at += head + len;
    }
    memmove(c->buf, c->buf + at, c->len - at);
    c->len -= at;
}

static void send_request(conn_t *c) {
    if (c->wrote == 0) c->sent_at = now_ns();
    while (c->wrote < request_len) {
        ssize_t w = write(c->fd, request + c->wrote, request_len - c->wrote);
        if (w < 0) {
            if (errno == EAGAIN) { /* the request is small: a full buffer is rare */
                struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
                epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
                return;
            }
            errors++;
            return;
        }
        c->wrote += (size_t)w;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Length of a complete response at the start of the buffer, 0 if not yet whole. */
static size_t response_length(conn_t *c, int *status, int *closing) {
    char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end + 4 - c->buf);
    *status = c->len > 12 ? atoi(c->buf + 9) : 0;
    *closing = 0;
    long content = -1;
    int chunked = 0;
    for (char *line = memchr(c->buf, '\n', head); line && line < end;
         line = memchr(line + 1, '\n', (size_t)(end - line))) {
        char *h = line + 1;
        if (strncasecmp(h, "Content-Length:", 15) == 0) content = atol(h + 15);
        if (strncasecmp(h, "Transfer-Encoding:", 18) == 0 &&
            memmem(h, (size_t)(end - h) < 64 ? (size_t)(end - h) : 64, "chunked", 7))
            chunked = 1;
        if (strncasecmp(h, "Connection:", 11) == 0 &&
            memmem(h, (size_t)(end - h) < 64 ? (size_t)(end - h) : 64, "close", 5))
            *closing = 1;
    }
    if (!chunked) {
        if (content < 0) content = 0;
        return c->len >= head + (size_t)content ? head + (size_t)content : 0;
    }
    size_t at = head;
    for (;;) {
        char *crlf = memmem(c->buf + at, c->len - at, "\r\n", 2);
        if (!crlf) return 0;
        size_t size = strtoul(c->buf + at, NULL, 16);
        at = (size_t)(crlf + 2 - c->buf) + size + 2;
        if (at > c->len) return 0;
        if (size == 0) return at;
    }
}

static void reopen(conn_t *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = dial();
    c->len = 0;
    c->wrote = 0;
    c->sent_at = 0;
    reconnects++;
    watch(c);
}

/*
 * Read what came; count a complete response.  Returns 1 when the connection
 * is ready for its next request (a response completed, or the server closed
 * it and it was opened again).
 */
static int http_readable(conn_t *c, uint64_t measure_from, uint64_t measure_to) {
    int eof = 0;
    for (;;) {
        reserve(c, 16384);
        ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
        if (r > 0) {
            c->len += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EAGAIN) break;
        eof = 1; /* closed (or reset) by the server, maybe after a last answer */
        break;
    }
    int status = 0, closing = 0;
    size_t whole = response_length(c, &status, &closing);
    if (whole) {
        uint64_t done = now_ns();
        if (status >= 200 && status < 300) ok_total++;
        if (c->sent_at >= measure_from && done <= measure_to) {
            measured++;
            status_count[status >= 100 && status < 600 ? status / 100 : 0]++;
            if (nlat == lat_cap) {
                lat_cap = lat_cap ? lat_cap * 2 : 65536;
                lat_us = realloc(lat_us, lat_cap * sizeof *lat_us);
            }
            lat_us[nlat++] = (uint32_t)((done - c->sent_at) / 1000);
        }
        memmove(c->buf, c->buf + whole, c->len - whole);
        c->len -= whole;
        c->sent_at = 0;
        c->wrote = 0;
    } else if (eof && c->sent_at) {
        errors++; /* the request in flight got no answer */
    }
    if (eof || closing) {
        reopen(c);
        return 1;
    }
    return whole != 0;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_ms(double p) {
    if (!nlat) return -1;
    size_t i = (size_t)(p * (double)(nlat - 1));
    return lat_us[i] / 1000.0;
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr,
                "usage: httpload IP PORT HOST REQUEST_FILE CONNECTIONS SECONDS WARMUP_S "
                "WS_PATH MEMBERS\n");
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) die("address");
    FILE *f = fopen(argv[4], "rb");
    if (!f) die("request file");
    request = malloc(65536);
    request_len = fread(request, 1, 65536, f);
    fclose(f);
    int nhttp = atoi(argv[5]), nmembers = atoi(argv[9]);
    double seconds = atof(argv[6]), warmup = atof(argv[7]);
    epfd = epoll_create1(0);
    conn_t **members = calloc((size_t)nmembers + 1, sizeof *members);
    for (int i = 0; i < nmembers; i++) members[i] = join(argv[3], argv[8]);
    conn_t **http = calloc((size_t)nhttp, sizeof *http);
    for (int i = 0; i < nhttp; i++) {
        http[i] = calloc(1, sizeof(conn_t));
        http[i]->fd = dial();
        watch(http[i]);
    }
    uint64_t start = now_ns();
    uint64_t measure_from = start + (uint64_t)(warmup * 1e9);
    uint64_t stop = measure_from + (uint64_t)(seconds * 1e9);
    for (int i = 0; i < nhttp; i++) send_request(http[i]);
    struct epoll_event events[256];
    uint64_t last_progress = now_ns();
    int in_flight = nhttp;
    for (;;) {
        uint64_t t = now_ns();
        if (t >= stop) {
            in_flight = 0;
            for (int i = 0; i < nhttp; i++) in_flight += http[i]->sent_at != 0;
            uint64_t least = UINT64_MAX;
            for (int i = 0; i < nmembers; i++)
                if (members[i]->frames < least) least = members[i]->frames;
            int members_done = nmembers == 0 || least >= ok_total;
            if ((in_flight == 0 && members_done) || t - last_progress > 5000000000ull ||
                t - stop > 60000000000ull)
                break;
        }
        int n = epoll_wait(epfd, events, 256, 100);
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c->member) {
                reserve(c, 65536);
                ssize_t r;
                while ((r = read(c->fd, c->buf + c->len, c->cap - c->len)) > 0) {
                    c->len += (size_t)r;
                    member_frames(c);
                    reserve(c, 65536);
                }
                last_progress = now_ns();
                continue;
            }
            if (events[i].events & EPOLLOUT && c->sent_at && c->wrote < request_len) {
                send_request(c);
                continue;
            }
            if (http_readable(c, measure_from, stop)) {
                last_progress = now_ns();
                if (now_ns() < stop) send_request(c);
            }
        }
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
                 (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    qsort(lat_us, nlat, sizeof *lat_us, cmp_u32);
    uint64_t least = nmembers ? UINT64_MAX : 0, most = 0;
    for (int i = 0; i < nmembers; i++) {
        if (members[i]->frames < least) least = members[i]->frames;
        if (members[i]->frames > most) most = members[i]->frames;
    }
    printf("{\"requests\": %llu, \"seconds\": %.3f, \"req_per_s\": %.1f, "
           "\"status\": {\"1xx\": %llu, \"2xx\": %llu, \"3xx\": %llu, \"4xx\": %llu, "
           "\"5xx\": %llu, \"other\": %llu}, "
           "\"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, \"max_ms\": %.3f, "
           "\"connections\": %d, \"reconnects\": %llu, \"errors\": %llu, "
           "\"accepted_total\": %llu, \"members\": %d, \"member_frames_min\": %llu, "
           "\"member_frames_max\": %llu, \"unanswered\": %d, \"cpu_s\": %.3f}\n",
           (unsigned long long)measured, seconds, measured / seconds,
           (unsigned long long)status_count[1], (unsigned long long)status_count[2],
           (unsigned long long)status_count[3], (unsigned long long)status_count[4],
           (unsigned long long)status_count[5], (unsigned long long)status_count[0],
           pct_ms(0.50), pct_ms(0.90), pct_ms(0.99), nlat ? lat_us[nlat - 1] / 1000.0 : -1,
           nhttp, (unsigned long long)reconnects, (unsigned long long)errors,
           (unsigned long long)ok_total, nmembers, (unsigned long long)least,
           (unsigned long long)most, in_flight, cpu);
    return 0;
}
