/* pace: a fixed-rate HTTP/1.1 client with nanosecond timestamps, for `make bench`'s (d).
 *
 *     pace -c 4 -q 250 -d 10 [-t 5] http://127.0.0.1:PORT/small
 *
 * hey 0.1.4's load model (requester.go), only timed with CLOCK_MONOTONIC instead of printed in
 * 0.1 ms steps: C keep-alive connections (-c), one request in flight on each; each connection has
 * its own periodic ticker of -q ticks per second (hey's -q is per worker too), all started at the
 * same instant, so their ticks line up and the C requests of a tick go out together, as hey's
 * workers send theirs. A tick that comes while its connection's request is outstanding is kept, at
 * most one (Go's ticker channel buffers one tick and drops the rest), and the next request goes as
 * soon as the response is in. New requests go for -d seconds; those still outstanding then are
 * waited for, each at most -t seconds after it started (default 5, as the bench ran `hey -t 5`).
 *
 * A request's latency runs from just before its write (before the connect when the connection has
 * to be opened first: hey's time includes the dial too) to the read that completes the response:
 * the head and Content-Length bytes of body. A response without Content-Length (chunked, or
 * delimited by close), a malformed head, bytes beyond the response in the read that completes it, a
 * connection refused, reset or closed while its request is outstanding, and a request past its
 * timeout are errors: counted by kind, not timed, and the connection is opened again for the next
 * request. A connection the server closes while idle is opened again without an error (counted as
 * `reopened`), as Go's client does; a response that says `Connection: close` is timed and its
 * connection opened again likewise. Bytes that come on an idle connection, after a response timed
 * whole, belong to no request: they are counted as `unsolicited`, not as a request's error, and the
 * connection (out of step with its responses) is opened again for the next request, as Go's client
 * does ("Unsolicited response received on idle HTTP channel": the connection closed, no error).
 *
 * Prints one JSON object on stdout: the counts, statuses, what became of every tick (see ticks_due),
 * the run's span (first request's start to the last response's end), the client's own CPU time
 * (hey's, on the cores it shares with the proxies, was 5-7x this: bench/README.md), and every
 * successful request's latency in ns, in the order they completed: the harness (bench/load.py)
 * computes the percentiles. Every latency rather than a histogram: 10,000 numbers for (d)'s run,
 * and any resolution stays possible.
 * Exit status 0 when the run took place (its errors are in the summary), 1 when the client could
 * not run (no epoll or timer), 2 for bad arguments; both with one line on stderr.
 *
 * http:// on IPv4 loopback only: a benchmark client on one machine, never pointed elsewhere.
 * Linux only (epoll, timerfd). Built by bench/cbuild.py with the system C compiler. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
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
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 256           /* a latency client, not a flood: also bounds the fds (2 per connection) */
#define MAX_RATE 100000.0       /* per connection: a 10 µs period is already below what a tick costs */
#define MAX_DURATION_S 3600.0   /* an hour: more is a mistake, and the sample array is sized from it */
#define MAX_TIMEOUT_S 600.0     /* a request that takes minutes is an error, not a latency */
#define MAX_SAMPLES (8u << 20)  /* 64 MiB of latencies; (d) keeps 10,000 */
#define HEAD_MAX 8192           /* a response head must fit: nginx's is ~250 bytes, a proxy adds a few */
#define READ_CHUNK 65536        /* body bytes are read in these and dropped: (d)'s body is 64 bytes */
#define REQ_MAX 2048            /* the request: request line, Host, nothing else */
#define EVENTS_MAX (2 * MAX_CONNS)
#define NS 1000000000LL

enum state { DOWN, CONNECTING, IDLE, BUSY };
enum err { E_CONNECT, E_WRITE, E_CLOSED, E_RESPONSE, E_TIMEOUT, E_KINDS };
static const char *const ERR_NAMES[E_KINDS] = {"connect", "write", "closed", "bad_response", "timeout"};

struct conn {
    int fd, tfd;
    enum state state;
    int tick_pending;   /* at most one: Go's ticker channel holds one */
    int close_after;    /* the response said `Connection: close` */
    uint64_t ticks;     /* expirations seen, so the current tick's due time is known */
    int64_t t_start, deadline;
    size_t used;        /* head bytes in buf */
    long long body_left; /* -1 while the head is being read */
    int status;
    char buf[HEAD_MAX];
};

static struct conn conns[MAX_CONNS];
static int nconns, epfd;
static char request[REQ_MAX];
static size_t request_len;
static struct sockaddr_in target;
static int64_t *samples;
static size_t nsamples, max_samples;
static unsigned long long errors[E_KINDS], reopened, unsolicited, statuses[1000];
/* Ticks due within the run, and what became of them: each began a request (`sent`) or was dropped,
 * because its connection's client was late (expirations coalesced: the client itself was held up),
 * because a tick was already kept while its request was outstanding, or because the run ended
 * before a kept tick could go. ticks == sent + the three drops, and sent == responses + errors. */
static unsigned long long ticks_due, sent, dropped_late, dropped_busy, dropped_end;
static int64_t first_start = -1, last_end = -1, period_ns, timeout_ns, t0, t_end;
static uint64_t ticks_in_run; /* each connection's ticks 1..ticks_in_run are due within the run */
static char scratch[READ_CHUNK];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static void die(int code, const char *msg) {
    fprintf(stderr, "pace: %s\n", msg);
    exit(code);
}

static void usage_error(const char *msg) {
    fprintf(stderr, "pace: %s (usage: pace -c CONNS -q RATE_PER_CONN -d SECONDS [-t TIMEOUT_S] "
                    "http://127.x.y.z:PORT/PATH)\n", msg);
    exit(2);
}

static double number(const char *opt, const char *s, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s %.40s: not a number in %g..%g", opt, s, lo, hi);
        usage_error(msg);
    }
    return v;
}

/* http://127.x.y.z[:port][/path]: the request and the address; anything else is refused. */
static void parse_url(const char *url) {
    const char *p = url, *host, *host_end, *path;
    if (strncmp(p, "http://", 7) != 0)
        usage_error("only http:// URLs");
    host = p + 7;
    host_end = host + strcspn(host, ":/?#");
    char addr[16];
    size_t hl = (size_t)(host_end - host);
    if (hl == 0 || hl >= sizeof addr)
        usage_error("the host must be an IPv4 loopback address (127.0.0.0/8)");
    memcpy(addr, host, hl);
    addr[hl] = 0;
    memset(&target, 0, sizeof target);
    target.sin_family = AF_INET;
    if (inet_pton(AF_INET, addr, &target.sin_addr) != 1 || (ntohl(target.sin_addr.s_addr) >> 24) != 127)
        usage_error("the host must be an IPv4 loopback address (127.0.0.0/8)");
    long port = 80;
    p = host_end;
    if (*p == ':') {
        char *end;
        errno = 0;
        port = strtol(p + 1, &end, 10);
        if (errno || end == p + 1 || port < 1 || port > 65535)
            usage_error("bad port");
        p = end;
    }
    if (*p && *p != '/')
        usage_error("the URL must be http://127.x.y.z[:port][/path]");
    target.sin_port = htons((uint16_t)port);
    path = *p ? p : "/";
    for (const char *c = path; *c; c++)
        if ((unsigned char)*c <= ' ' || *c == 0x7f)
            usage_error("the path holds a space or a control character");
    int n = snprintf(request, sizeof request, "GET %s HTTP/1.1\r\nHost: %.*s\r\nUser-Agent: pace\r\n\r\n",
                     path, (int)(p - host), host);
    if (n < 0 || (size_t)n >= sizeof request)
        usage_error("the URL is too long");
    request_len = (size_t)n;
}

static void ep(int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = {.events = events, .data.u64 = data};
    if (epoll_ctl(epfd, op, fd, &ev) != 0) {
        char msg[80];
        snprintf(msg, sizeof msg, "epoll_ctl: %s", strerror(errno));
        die(1, msg);
    }
}

static void drop(struct conn *c) {
    if (c->fd >= 0)
        close(c->fd); /* also leaves the epoll set */
    c->fd = -1;
    c->state = DOWN;
}

static void begin(struct conn *c, int64_t now);
static int all_ticks_seen(void);

/* After a response or an error: the kept tick, if any, goes at once (hey's worker takes the
 * buffered tick at once); none once the run's time is up (hey's worker checks its stop channel). */
static void next(struct conn *c, int64_t now) {
    if (!c->tick_pending)
        return;
    c->tick_pending = 0;
    if (now < t_end)
        begin(c, now);
    else
        dropped_end++;
}

static void fail(struct conn *c, enum err kind, int64_t now) {
    errors[kind]++;
    drop(c);
    next(c, now);
}

static void send_request(struct conn *c, int64_t now) {
    /* One request in flight and a fresh or drained socket: its send buffer takes the whole request
     * (< REQ_MAX) at once, so a short write is a broken connection, not back-pressure. */
    ssize_t n = send(c->fd, request, request_len, MSG_NOSIGNAL);
    if (n != (ssize_t)request_len) {
        fail(c, E_WRITE, now);
        return;
    }
    c->state = BUSY;
}

static void begin(struct conn *c, int64_t now) {
    sent++;
    c->t_start = now_ns();
    c->deadline = c->t_start + timeout_ns;
    if (first_start < 0)
        first_start = c->t_start;
    c->used = 0;
    c->body_left = -1;
    c->status = 0;
    c->close_after = 0;
    if (c->state == IDLE) {
        send_request(c, now);
        return;
    }
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        fail(c, E_CONNECT, now);
        return;
    }
    int one = 1; /* as Go's net package: a request is one write, never held back */
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint64_t idx = (uint64_t)(c - conns);
    if (connect(c->fd, (struct sockaddr *)&target, sizeof target) == 0) {
        ep(EPOLL_CTL_ADD, c->fd, EPOLLIN, idx << 1);
        send_request(c, now);
    } else if (errno == EINPROGRESS) {
        ep(EPOLL_CTL_ADD, c->fd, EPOLLOUT, idx << 1);
        c->state = CONNECTING;
    } else {
        fail(c, E_CONNECT, now);
    }
}

static void connected(struct conn *c, int64_t now) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
        fail(c, E_CONNECT, now);
        return;
    }
    ep(EPOLL_CTL_MOD, c->fd, EPOLLIN, (uint64_t)(c - conns) << 1);
    send_request(c, now);
}

static int header_is(const char *line, size_t len, const char *name) {
    size_t n = strlen(name);
    return len > n && line[n] == ':' && strncasecmp(line, name, n) == 0;
}

/* The head in c->buf[0..end): status, Content-Length (required), Connection: close. 0 or -1. */
static int parse_head(struct conn *c, size_t end) {
    const char *b = c->buf;
    if (end < 12 || (strncmp(b, "HTTP/1.1 ", 9) != 0 && strncmp(b, "HTTP/1.0 ", 9) != 0))
        return -1;
    if (b[9] < '1' || b[9] > '5' || b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9')
        return -1;
    c->status = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
    if (c->status < 200)
        return -1; /* a 1xx interim response: not something (d) asks for */
    long long length = -1;
    const char *line = memchr(b, '\n', end);
    while (line && (size_t)(line + 1 - b) < end) {
        line++;
        const char *eol = memchr(line, '\n', end - (size_t)(line - b));
        if (!eol)
            break;
        size_t len = (size_t)(eol - line);
        if (len && line[len - 1] == '\r')
            len--;
        if (header_is(line, len, "content-length")) {
            const char *v = line + 15, *e = line + len;
            while (v < e && (*v == ' ' || *v == '\t'))
                v++;
            long long n = 0;
            int digits = 0;
            for (; v < e && *v >= '0' && *v <= '9' && digits < 15; v++, digits++)
                n = n * 10 + (*v - '0');
            while (v < e && (*v == ' ' || *v == '\t'))
                v++;
            if (!digits || v != e || (length >= 0 && length != n))
                return -1;
            length = n;
        } else if (header_is(line, len, "transfer-encoding")) {
            return -1; /* chunked: not read here */
        } else if (header_is(line, len, "connection")) {
            for (const char *v = line + 11; v + 5 <= line + len; v++)
                if (strncasecmp(v, "close", 5) == 0)
                    c->close_after = 1;
        }
        line = eol;
    }
    if (length < 0)
        return -1;
    c->body_left = length;
    return 0;
}

static void complete(struct conn *c, int64_t now) {
    if (nsamples < max_samples)
        samples[nsamples++] = now - c->t_start;
    statuses[c->status]++;
    last_end = now;
    if (c->close_after) {
        drop(c);
        reopened++;
    } else {
        c->state = IDLE;
    }
    next(c, now);
}

static void readable(struct conn *c) {
    for (;;) {
        ssize_t n;
        if (c->body_left < 0) {
            n = read(c->fd, c->buf + c->used, HEAD_MAX - c->used);
        } else {
            n = read(c->fd, scratch, sizeof scratch);
        }
        int64_t now = now_ns();
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n <= 0) { /* closed or reset */
            if (c->state == IDLE) {
                drop(c); /* an idle keep-alive connection the server let go: opened again on use */
                reopened++;
            } else {
                fail(c, E_CLOSED, now);
            }
            return;
        }
        if (c->state != BUSY) { /* bytes nobody asked for, after a whole response: no request's error */
            drop(c);
            unsolicited++;
            return;
        }
        long long body_bytes;
        if (c->body_left < 0) {
            size_t old = c->used;
            c->used += (size_t)n;
            size_t from = old > 3 ? old - 3 : 0;
            char *end = memmem(c->buf + from, c->used - from, "\r\n\r\n", 4);
            if (!end) {
                if (c->used < HEAD_MAX)
                    continue;
                fail(c, E_RESPONSE, now); /* a head longer than we keep */
                return;
            }
            size_t head = (size_t)(end - c->buf) + 4;
            if (parse_head(c, head) != 0) {
                fail(c, E_RESPONSE, now);
                return;
            }
            body_bytes = (long long)(c->used - head);
        } else {
            body_bytes = n;
        }
        if (body_bytes > c->body_left) {
            fail(c, E_RESPONSE, now); /* more than Content-Length: garbage after the response */
            return;
        }
        c->body_left -= body_bytes;
        if (c->body_left == 0) {
            complete(c, now);
            return;
        }
    }
}

static void tick(struct conn *c, int64_t now) {
    uint64_t expirations;
    if (read(c->tfd, &expirations, sizeof expirations) != sizeof expirations)
        return; /* not yet due (a spurious wake-up) */
    uint64_t due = expirations;
    c->ticks += expirations;
    if (t0 + (int64_t)c->ticks * period_ns > t_end) {
        struct itimerspec off = {0};
        timerfd_settime(c->tfd, 0, &off, NULL); /* the run's time is up: no more requests */
        uint64_t seen = c->ticks - expirations;
        due = ticks_in_run > seen ? ticks_in_run - seen : 0;
        if (due == 0)
            return;
    }
    ticks_due += due;
    dropped_late += due - 1; /* Go's ticker drops those a late receiver missed too */
    if (c->state == DOWN || c->state == IDLE)
        begin(c, now);
    else if (c->tick_pending)
        dropped_busy++; /* Go's ticker: one tick buffered, the rest dropped */
    else
        c->tick_pending = 1;
}

static void check_timeouts(int64_t now) {
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if ((c->state == BUSY || c->state == CONNECTING) && now >= c->deadline)
            fail(c, E_TIMEOUT, now);
    }
}

/* How long epoll may sleep: until the next request deadline or the end of the run, in ms, rounded
 * up (an early wake-up only loops once more); -1 when nothing but timers can wake us. */
static int wait_ms(int64_t now) {
    int64_t until = -1;
    if (now < t_end)
        until = t_end;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if ((c->state == BUSY || c->state == CONNECTING) && (until < 0 || c->deadline < until))
            until = c->deadline;
    }
    if (until < 0)
        return all_ticks_seen() ? -1 : 1; /* past the end: only a last tick to come, at once */
    int64_t ms = (until - now + 999999) / 1000000;
    return ms < 0 ? 0 : (int)ms;
}

/* Every tick due within the run has been read: the last may be due at the very end, and a timer
 * can be reported a little after its time; waiting for it makes the count exact (-c x -q x -d). */
static int all_ticks_seen(void) {
    for (int i = 0; i < nconns; i++)
        if (conns[i].ticks < ticks_in_run)
            return 0;
    return 1;
}

static int outstanding(void) {
    for (int i = 0; i < nconns; i++)
        if (conns[i].state == BUSY || conns[i].state == CONNECTING)
            return 1;
    return 0;
}

static void print_summary(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    long long cpu_us = (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000LL +
                       ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
    printf("{\"client\":\"pace\",\"connections\":%d,\"period_ns\":%lld,\"requests\":%zu,\"errors\":{",
           nconns, (long long)period_ns, nsamples);
    for (int k = 0; k < E_KINDS; k++)
        printf("%s\"%s\":%llu", k ? "," : "", ERR_NAMES[k], errors[k]);
    printf("},\"reopened\":%llu,\"unsolicited\":%llu,\"ticks\":%llu,\"sent\":%llu,\"dropped\":{"
           "\"late\":%llu,\"busy\":%llu,\"end\":%llu},\"statuses\":{",
           reopened, unsolicited, ticks_due, sent, dropped_late, dropped_busy, dropped_end);
    int first = 1;
    for (int s = 0; s < 1000; s++)
        if (statuses[s]) {
            printf("%s\"%d\":%llu", first ? "" : ",", s, statuses[s]);
            first = 0;
        }
    long long span = first_start >= 0 && last_end >= first_start ? (long long)(last_end - first_start) : 0;
    printf("},\"span_ns\":%lld,\"elapsed_ns\":%lld,\"cpu_us\":%lld,\"latencies_ns\":[", span,
           (long long)(now_ns() - t0), cpu_us);
    for (size_t i = 0; i < nsamples; i++)
        printf("%s%lld", i ? "," : "", (long long)samples[i]);
    printf("]}\n");
    if (fflush(stdout) != 0)
        die(1, "cannot write the summary");
}

int main(int argc, char **argv) {
    double conns_arg = 0, rate = 0, duration = 0, timeout = 5.0;
    const char *url = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] == '-' && a[1] && !a[2] && strchr("cqdt", a[1])) {
            if (i + 1 >= argc)
                usage_error("an option without its value");
            const char *v = argv[++i];
            switch (a[1]) {
            case 'c': conns_arg = number("-c", v, 1, MAX_CONNS); break;
            case 'q': rate = number("-q", v, 1e-3, MAX_RATE); break;
            case 'd': duration = number("-d", v, 1e-3, MAX_DURATION_S); break;
            default: timeout = number("-t", v, 1e-3, MAX_TIMEOUT_S); break;
            }
        } else if (a[0] == '-') {
            char msg[80];
            snprintf(msg, sizeof msg, "unknown option %.20s", a);
            usage_error(msg);
        } else if (url) {
            usage_error("more than one URL");
        } else {
            url = a;
        }
    }
    if (!url || !conns_arg || !rate || !duration)
        usage_error("-c, -q, -d and a URL are required");
    if (conns_arg != floor(conns_arg))
        usage_error("-c must be a whole number");
    parse_url(url);
    nconns = (int)conns_arg;
    period_ns = llround(1e9 / rate);
    timeout_ns = llround(timeout * 1e9);
    /* A connection starts at most one request per tick, and one more for a kept tick. */
    double bound = (double)nconns * (floor(duration * 1e9 / (double)period_ns) + 2);
    if (bound > MAX_SAMPLES)
        usage_error("-c x -q x -d asks for more requests than the client keeps (8 Mi)");
    max_samples = (size_t)bound;
    samples = malloc(max_samples * sizeof *samples);
    if (!samples)
        die(1, "out of memory for the samples");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die(1, "epoll_create1 failed");
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        conns[i].state = DOWN;
        conns[i].tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (conns[i].tfd < 0)
            die(1, "timerfd_create failed");
        ep(EPOLL_CTL_ADD, conns[i].tfd, EPOLLIN, ((uint64_t)i << 1) | 1);
    }
    /* Every ticker from the same instant, first tick one period later (as time.Tick): the
     * connections' requests of a tick go out together, as hey's workers' do. */
    t0 = now_ns();
    t_end = t0 + llround(duration * 1e9);
    ticks_in_run = (uint64_t)((t_end - t0) / period_ns);
    struct itimerspec its = {
        .it_value = {.tv_sec = (t0 + period_ns) / NS, .tv_nsec = (t0 + period_ns) % NS},
        .it_interval = {.tv_sec = period_ns / NS, .tv_nsec = period_ns % NS},
    };
    for (int i = 0; i < nconns; i++)
        if (timerfd_settime(conns[i].tfd, TFD_TIMER_ABSTIME, &its, NULL) != 0)
            die(1, "timerfd_settime failed");
    struct epoll_event events[EVENTS_MAX];
    for (;;) {
        int64_t now = now_ns();
        check_timeouts(now);
        if (now >= t_end && all_ticks_seen() && !outstanding())
            break;
        int n = epoll_wait(epfd, events, EVENTS_MAX, wait_ms(now));
        if (n < 0 && errno != EINTR)
            die(1, "epoll_wait failed");
        for (int i = 0; i < n; i++) {
            struct conn *c = &conns[events[i].data.u64 >> 1];
            now = now_ns();
            if (events[i].data.u64 & 1)
                tick(c, now);
            else if (c->state == CONNECTING)
                connected(c, now);
            else if (c->fd >= 0)
                readable(c);
        }
    }
    for (int i = 0; i < nconns; i++)
        dropped_end += (unsigned long long)conns[i].tick_pending; /* kept when the run ended */
    print_summary();
    return 0;
}
