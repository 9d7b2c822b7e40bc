/*
 * loadgen - SMTP load generator for mailgate's `make bench`.
 *
 * One thread per session, blocking sockets, TCP_NODELAY, no PIPELINING:
 * connect, read the banner, EHLO, then --per-conn transactions
 * (MAIL, RCPT, DATA, message, ".") in lockstep, QUIT, reconnect. Sessions stop
 * opening connections when --duration has passed or --max-messages
 * transactions have been started, whichever comes first.
 *
 * Latency of a message: from sending MAIL FROM to receiving the reply to the
 * final "." (with --lat-from-connect, the first message of a connection is
 * timed from connect() instead, which includes connect, banner and EHLO).
 * Only transactions whose final reply is 2xx count as messages; every other
 * outcome (4xx/5xx at any step, I/O error, timeout, failed connect) counts as
 * an error and never as a message.
 *
 * --message-file PATH sends the message in that file (headers and body) for every
 * transaction instead of the generated one: bare LF line ends become CRLF, a
 * final CRLF is added if missing, lines starting with "." are dot-stuffed, and
 * --size is ignored. Without it, messages are generated: From, To, Subject,
 * Date, a unique Message-ID, then 76-character lines, --size bytes in total.
 *
 * Output: one JSON line on stdout. Diagnostics (first few errors) on stderr.
 *
 * Build: cc -std=c11 -O2 -pthread -o loadgen loadgen.c
 */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define LINE_CHARS 76 /* characters per body line, CRLF not included */
#define MAX_ERR_REPORTS 5

/* ------------------------------------------------------------ options */
static const char *opt_target;
static const char *opt_source_ip;
static const char *opt_message_file;
static const char *opt_from = "sender@loadgen.test";
static const char *opt_to = "rcpt@loadgen.test";
static const char *opt_helo = "loadgen.test";
static long opt_sessions = 1;
static long opt_per_conn = 10;
static long opt_size = 4096;
static double opt_duration = 4.0;
static long opt_max_messages = 10000000;
static long opt_io_timeout = 10;
static int opt_lat_from_connect;

/* ------------------------------------------------------------ shared state */
static struct addrinfo *g_dst;
static struct addrinfo *g_src;
static char *g_body; /* pre-built body lines, CRLF, ends with ".\r\n" */
static size_t g_body_len; /* including the terminating ".\r\n" */
static size_t g_header_len; /* every header block has exactly this length; 0 with a file */
static size_t g_message_bytes; /* the message as the server stores it (unstuffed) */
static char g_date[64];
static unsigned long g_run_id; /* wall-clock start, keeps Message-IDs unique across runs */
static double g_deadline;   /* stop opening connections */
static double g_hard_stop;  /* abandon a connection between transactions */
static atomic_long g_claimed;
static atomic_int g_err_reports;

typedef struct {
    uint32_t *v;
    size_t n, cap;
} latvec_t;

typedef struct {
    int index;
    pthread_t thread;
    latvec_t lat;
    long messages, errors, io_errors, connections;
} session_t;

typedef struct {
    int fd;
    size_t len, off;
    char buf[4096];
    char last[256]; /* last reply line, for error reports */
} conn_t;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

/* the first few errors go to stderr: stage, then the reply line or errno text */
static void report_error(const char *stage, int code, const char *text)
{
    if (atomic_fetch_add(&g_err_reports, 1) >= MAX_ERR_REPORTS)
        return;
    if (code > 0 && text && text[0] >= '1' && text[0] <= '5')
        fprintf(stderr, "loadgen: %s: %s\n", stage, text);
    else
        fprintf(stderr, "loadgen: %s: %d %s\n", stage, code, text ? text : "");
}

static int lat_push(latvec_t *l, uint32_t us)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4096;
        uint32_t *v = realloc(l->v, cap * sizeof *v);
        if (!v)
            return -1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = us;
    return 0;
}

/* ------------------------------------------------------------ SMTP I/O */
static int send_iov(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t) n};
        ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        size_t left = (size_t) w;
        while (n > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *) iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

static int send_str(int fd, const char *s)
{
    struct iovec iov = {.iov_base = (void *) s, .iov_len = strlen(s)};
    return send_iov(fd, &iov, 1);
}

/* Read one complete (possibly multi-line) reply. Returns the code, or -1 on
 * I/O error, timeout, or a malformed reply. */
static int read_reply(conn_t *c)
{
    for (;;) {
        char *start = c->buf + c->off;
        char *nl = memchr(start, '\n', c->len - c->off);
        if (nl) {
            size_t ll = (size_t) (nl - start) + 1;
            c->off += ll;
            size_t cp = ll < sizeof c->last ? ll : sizeof c->last - 1;
            memcpy(c->last, start, cp);
            while (cp && (c->last[cp - 1] == '\n' || c->last[cp - 1] == '\r'))
                cp--;
            c->last[cp] = '\0';
            if (ll < 4 || start[0] < '1' || start[0] > '5' || start[1] < '0' || start[1] > '9' ||
                start[2] < '0' || start[2] > '9' || (start[3] != ' ' && start[3] != '-' &&
                                                     start[3] != '\r' && start[3] != '\n'))
                return -1;
            if (start[3] == '-')
                continue;
            return (start[0] - '0') * 100 + (start[1] - '0') * 10 + (start[2] - '0');
        }
        if (c->off > 0) {
            memmove(c->buf, c->buf + c->off, c->len - c->off);
            c->len -= c->off;
            c->off = 0;
        }
        if (c->len == sizeof c->buf)
            return -1; /* line longer than the buffer */
        ssize_t r = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        c->len += (size_t) r;
    }
}

static int command(conn_t *c, const char *line)
{
    if (send_str(c->fd, line) < 0)
        return -1;
    return read_reply(c);
}

static int open_conn(conn_t *c)
{
    c->len = c->off = 0;
    c->last[0] = '\0';
    c->fd = socket(g_dst->ai_family, SOCK_STREAM, 0);
    if (c->fd < 0)
        return -1;
    struct timeval tv = {.tv_sec = opt_io_timeout, .tv_usec = 0};
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (g_src && bind(c->fd, g_src->ai_addr, g_src->ai_addrlen) < 0)
        goto fail;
    if (connect(c->fd, g_dst->ai_addr, g_dst->ai_addrlen) < 0)
        goto fail;
    return 0;
fail:
    close(c->fd);
    c->fd = -1;
    return -1;
}

/* ------------------------------------------------------------ message */
/* Header block with a fixed length so that every message has the same size. */
static size_t format_header(char *out, size_t cap, int session, long seq)
{
    int n = snprintf(out, cap,
                     "From: <%s>\r\n"
                     "To: <%s>\r\n"
                     "Subject: loadgen message %04d-%010ld\r\n"
                     "Date: %s\r\n"
                     "Message-ID: <%08lx.%08lx.%04d.%010ld@%s>\r\n"
                     "\r\n",
                     opt_from, opt_to, session, seq, g_date, g_run_id, (unsigned long) getpid() & 0xffffffffUL,
                     session, seq, opt_helo);
    return n < 0 ? 0 : (size_t) n;
}

/* Body of CRLF lines of LINE_CHARS characters (the last one shorter) so that
 * header + body is opt_size bytes when possible. No line starts with ".". */
static int build_body(void)
{
    char probe[2048];
    g_header_len = format_header(probe, sizeof probe, 0, 0);
    if (g_header_len == 0 || g_header_len >= sizeof probe)
        return -1;
    long want = opt_size - (long) g_header_len;
    if (want < 3)
        want = 3; /* one short line at least */
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    g_body = malloc((size_t) want + 8);
    if (!g_body)
        return -1;
    size_t p = 0;
    long line = 0;
    while ((long) p < want) {
        long rem = want - (long) p;
        long chars = LINE_CHARS;
        if (rem < LINE_CHARS + 2)
            chars = rem - 2; /* last line: what is left */
        else if (rem < LINE_CHARS + 2 + 3)
            chars = rem - 2 - 3; /* leave room for a last line of >= 1 char */
        if (chars < 1)
            chars = 1;
        for (long i = 0; i < chars; i++)
            g_body[p++] = alphabet[(line + i) % (long) (sizeof alphabet - 1)];
        g_body[p++] = '\r';
        g_body[p++] = '\n';
        line++;
    }
    memcpy(g_body + p, ".\r\n", 3);
    g_body_len = p + 3;
    g_message_bytes = g_header_len + p;
    return 0;
}

/* --message-file: the whole message, sent as is for every transaction. g_body gets
 * the DATA payload: CRLF line ends, dot-stuffed, ending with ".\r\n". */
static int load_message_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "loadgen: %s: %s\n", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fileno(f), &st) < 0 || st.st_size < 0 || st.st_size > 100L * 1024 * 1024) {
        fprintf(stderr, "loadgen: %s: not a regular file of at most 100 MiB\n", path);
        fclose(f);
        return -1;
    }
    size_t n = (size_t) st.st_size;
    char *raw = malloc(n + 1);
    if (!raw || fread(raw, 1, n, f) != n) {
        fprintf(stderr, "loadgen: %s: cannot read it\n", path);
        free(raw);
        fclose(f);
        return -1;
    }
    fclose(f);
    /* worst case: every byte a bare LF (2x), every line dot-stuffed (+1 each),
     * the final CRLF and the ".\r\n" terminator */
    g_body = malloc(3 * n + 8);
    if (!g_body) {
        free(raw);
        return -1;
    }
    size_t p = 0, stuffed = 0;
    int bol = 1; /* at the beginning of a line */
    for (size_t i = 0; i < n; i++) {
        char ch = raw[i];
        if (bol && ch == '.') {
            g_body[p++] = '.';
            stuffed++;
        }
        if (ch == '\n' && (p == 0 || g_body[p - 1] != '\r')) {
            g_body[p++] = '\r';
        }
        g_body[p++] = ch;
        bol = ch == '\n';
    }
    free(raw);
    if (p == 0) {
        fprintf(stderr, "loadgen: %s: empty\n", path);
        return -1;
    }
    if (!bol) {
        g_body[p++] = '\r';
        g_body[p++] = '\n';
    }
    g_message_bytes = p - stuffed;
    memcpy(g_body + p, ".\r\n", 3);
    g_body_len = p + 3;
    g_header_len = 0;
    return 0;
}

/* ------------------------------------------------------------ session */
static int claim(void)
{
    return atomic_fetch_add(&g_claimed, 1) < opt_max_messages;
}

static void fail(session_t *s, conn_t *c, const char *stage, int code)
{
    s->errors++;
    if (code < 0) {
        s->io_errors++;
        char msg[320];
        snprintf(msg, sizeof msg, "I/O error, timeout or malformed reply (last line: \"%s\")",
                 c->last);
        report_error(stage, code, msg);
    } else {
        report_error(stage, code, c->last); /* c->last is the reply line itself */
    }
}

static void *session_main(void *arg)
{
    session_t *s = arg;
    conn_t *c = malloc(sizeof *c);
    char line[600];
    char header[2048];
    long seq = 0;
    if (!c)
        return NULL;

    while (now_s() < g_deadline && atomic_load(&g_claimed) < opt_max_messages) {
        double t_conn = now_s();
        if (open_conn(c) < 0) {
            s->errors++;
            s->io_errors++;
            report_error("connect", errno, strerror(errno));
            sleep_ms(10);
            continue;
        }
        s->connections++;
        int code = read_reply(c);
        if (code != 220) {
            fail(s, c, "banner", code);
            close(c->fd);
            sleep_ms(10);
            continue;
        }
        snprintf(line, sizeof line, "EHLO %s\r\n", opt_helo);
        code = command(c, line);
        if (code != 250) {
            fail(s, c, "ehlo", code);
            close(c->fd);
            sleep_ms(10);
            continue;
        }
        int alive = 1;
        for (long i = 0; i < opt_per_conn && alive; i++) {
            if (now_s() >= g_hard_stop || !claim())
                break;
            double t0 = (i == 0 && opt_lat_from_connect) ? t_conn : now_s();
            const char *stage = "mail";
            snprintf(line, sizeof line, "MAIL FROM:<%s>\r\n", opt_from);
            code = command(c, line);
            if (code / 100 == 2) {
                stage = "rcpt";
                snprintf(line, sizeof line, "RCPT TO:<%s>\r\n", opt_to);
                code = command(c, line);
                if (code / 100 == 2) {
                    stage = "data";
                    code = command(c, "DATA\r\n");
                    if (code == 354) {
                        stage = "dot";
                        size_t hl = 0;
                        if (!opt_message_file)
                            hl = format_header(header, sizeof header, s->index, ++seq);
                        struct iovec iov[2] = {{.iov_base = header, .iov_len = hl},
                                               {.iov_base = g_body, .iov_len = g_body_len}};
                        code = send_iov(c->fd, hl ? iov : iov + 1, hl ? 2 : 1) < 0
                                   ? -1
                                   : read_reply(c);
                        if (code / 100 == 2) {
                            double dt = now_s() - t0;
                            s->messages++;
                            lat_push(&s->lat, (uint32_t) (dt * 1e6 + 0.5));
                            continue;
                        }
                    }
                }
            }
            fail(s, c, stage, code);
            /* I/O error, 421, or a 2xx/3xx out of place: drop the connection */
            if (code < 400 || code == 421)
                alive = 0;
            else if (command(c, "RSET\r\n") != 250)
                alive = 0;
        }
        if (alive)
            (void) command(c, "QUIT\r\n");
        close(c->fd);
    }
    free(c);
    return NULL;
}

/* ------------------------------------------------------------ main */
static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *) a, y = *(const uint32_t *) b;
    return (x > y) - (x < y);
}

/* nearest-rank percentile of a sorted array */
static uint32_t pct(const uint32_t *v, size_t n, double q)
{
    if (n == 0)
        return 0;
    double r = q * (double) n;
    size_t k = (size_t) r;
    if ((double) k < r)
        k++;
    if (k < 1)
        k = 1;
    return v[k - 1];
}

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen --target HOST:PORT [--sessions N] [--per-conn M] [--size BYTES]\n"
            "               [--duration SECONDS] [--max-messages K] [--from ADDR] [--to ADDR]\n"
            "               [--source-ip IP] [--helo NAME] [--io-timeout SECONDS]\n"
            "               [--message-file PATH] [--lat-from-connect]\n");
    exit(2);
}

static long parse_long(const char *name, const char *v, long lo, long hi)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || end == v || x < lo || x > hi) {
        fprintf(stderr, "loadgen: bad %s: %s (allowed %ld..%ld)\n", name, v, lo, hi);
        exit(2);
    }
    return x;
}

static struct addrinfo *resolve(const char *host, const char *port, int passive)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0)};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "loadgen: cannot resolve %s: %s\n", host, gai_strerror(rc));
        exit(2);
    }
    return res;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--lat-from-connect") == 0) {
            opt_lat_from_connect = 1;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0 || i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (strcmp(a, "--target") == 0)
            opt_target = v;
        else if (strcmp(a, "--sessions") == 0)
            opt_sessions = parse_long(a, v, 1, 5000);
        else if (strcmp(a, "--per-conn") == 0)
            opt_per_conn = parse_long(a, v, 1, 1000000);
        else if (strcmp(a, "--size") == 0)
            opt_size = parse_long(a, v, 0, 100L * 1024 * 1024);
        else if (strcmp(a, "--duration") == 0) {
            char *end;
            opt_duration = strtod(v, &end);
            if (*end || end == v || !(opt_duration > 0) || opt_duration > 86400)
                usage();
        } else if (strcmp(a, "--max-messages") == 0)
            opt_max_messages = parse_long(a, v, 1, 1000000000L);
        else if (strcmp(a, "--from") == 0)
            opt_from = v;
        else if (strcmp(a, "--to") == 0)
            opt_to = v;
        else if (strcmp(a, "--source-ip") == 0)
            opt_source_ip = v;
        else if (strcmp(a, "--helo") == 0)
            opt_helo = v;
        else if (strcmp(a, "--io-timeout") == 0)
            opt_io_timeout = parse_long(a, v, 1, 3600);
        else if (strcmp(a, "--message-file") == 0)
            opt_message_file = v;
        else
            usage();
    }
    if (!opt_target)
        usage();
    if (strlen(opt_from) > 256 || strlen(opt_to) > 256 || strlen(opt_helo) > 255) {
        fprintf(stderr, "loadgen: address or HELO name too long\n");
        return 2;
    }

    /* HOST:PORT, or [V6]:PORT */
    char host[256];
    const char *colon = strrchr(opt_target, ':');
    if (!colon || colon == opt_target || (size_t) (colon - opt_target) >= sizeof host)
        usage();
    size_t hl = (size_t) (colon - opt_target);
    memcpy(host, opt_target, hl);
    host[hl] = '\0';
    if (host[0] == '[' && hl >= 2 && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = '\0';
    }
    g_dst = resolve(host, colon + 1, 0);
    if (opt_source_ip) {
        g_src = resolve(opt_source_ip, "0", 1);
        if (g_src->ai_family != g_dst->ai_family) {
            fprintf(stderr, "loadgen: --source-ip and --target differ in address family\n");
            return 2;
        }
    }

    time_t wall = time(NULL);
    g_run_id = (unsigned long) wall & 0xffffffffUL;
    struct tm tm;
    gmtime_r(&wall, &tm);
    strftime(g_date, sizeof g_date, "%a, %d %b %Y %H:%M:%S +0000", &tm);
    if (opt_message_file) {
        if (load_message_file(opt_message_file) < 0)
            return 2;
    } else if (build_body() < 0) {
        fprintf(stderr, "loadgen: cannot build the message\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    session_t *ss = calloc((size_t) opt_sessions, sizeof *ss);
    if (!ss)
        return 2;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);

    double t_start = now_s();
    g_deadline = t_start + opt_duration;
    g_hard_stop = g_deadline + (double) opt_io_timeout;
    long started = 0;
    for (long i = 0; i < opt_sessions; i++) {
        ss[i].index = (int) i;
        if (pthread_create(&ss[i].thread, &attr, session_main, &ss[i]) != 0) {
            fprintf(stderr, "loadgen: cannot start session thread %ld\n", i);
            break;
        }
        started++;
    }
    for (long i = 0; i < started; i++)
        pthread_join(ss[i].thread, NULL);
    double elapsed = now_s() - t_start;

    long messages = 0, errors = 0, io_errors = 0, connections = 0;
    size_t nlat = 0;
    for (long i = 0; i < started; i++) {
        messages += ss[i].messages;
        errors += ss[i].errors;
        io_errors += ss[i].io_errors;
        connections += ss[i].connections;
        nlat += ss[i].lat.n;
    }
    uint32_t *lat = malloc((nlat ? nlat : 1) * sizeof *lat);
    if (!lat)
        return 2;
    size_t k = 0;
    for (long i = 0; i < started; i++) {
        if (ss[i].lat.n)
            memcpy(lat + k, ss[i].lat.v, ss[i].lat.n * sizeof *lat);
        k += ss[i].lat.n;
        free(ss[i].lat.v);
    }
    qsort(lat, nlat, sizeof *lat, cmp_u32);

    printf("{\"messages\": %ld, \"errors\": %ld, \"elapsed_s\": %.4f, \"msgs_per_s\": %.1f, "
           "\"lat_us\": {\"p50\": %u, \"p90\": %u, \"p99\": %u, \"max\": %u}, "
           "\"io_errors\": %ld, \"connections\": %ld, \"latency_samples\": %zu, "
           "\"message_bytes\": %zu, \"sessions\": %ld, \"per_conn\": %ld}\n",
           messages, errors, elapsed, elapsed > 0 ? (double) messages / elapsed : 0.0,
           pct(lat, nlat, 0.50), pct(lat, nlat, 0.90), pct(lat, nlat, 0.99),
           nlat ? lat[nlat - 1] : 0, io_errors, connections, nlat,
           g_message_bytes, started, opt_per_conn);
    fflush(stdout);
    free(lat);
    free(ss);
    free(g_body);
    freeaddrinfo(g_dst);
    if (g_src)
        freeaddrinfo(g_src);
    return 0;
}
