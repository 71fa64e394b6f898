/* The vhost-user-blk dataplane: one thread per started virtqueue serves the plainly fast
 * requests (IN, OUT, FLUSH of whole sectors inside the disk, every buffer in the translation
 * mirror) by itself, straight between the disk fd and guest RAM, and hands everything else to
 * the Python device model (qemu_mktme/vhost/blk.py), whole and unchanged.
 *
 * Written by hand: no library serves a vhost-user-blk virtqueue with our IOMMU model in the
 * path (libvhost-user and libblkio map guest memory themselves and would bypass the model).
 * The rules are virtqueue.py's (VIRTIO 1.2 section 2.7): split ring, indirect tables, event
 * index both ways. Any chain this file would have to judge as an error, any address the mirror
 * does not hold, any request type other than IN/OUT/FLUSH, an I/O error: the queue goes to
 * Python (dp_run returns DP_HANDOFF_*) with the ring state where this file stopped, before any
 * side effect of that chain, and Python serves it as it always did (errors, logging, faults,
 * DEVICE_NEEDS_RESET). This file never calls into Python and never needs the GIL.
 *
 * The translation mirror (struct dp_mirror): IOVA 4 KiB frame -> (window, offset of the leaf in
 * the window, leaf size), filled only by Python from what the device's IOTLB holds for leaves
 * of the VM's own KeyID (host/dma.py), cleared by Python under the write lock whenever the
 * IOMMU domain changes. A fast request holds the read lock from its first ring access to its
 * used-ring entry, so a clear waits for it (the IOTLB invalidation wait) and the next request
 * sees the new domain. Every access is bounds-checked against its window.
 *
 * Adjacent requests of one batch are one I/O, as QEMU's virtio-blk merges them
 * (virtio_blk_submit_multireq): a driver that queues several requests continuing each other (a
 * file system's writeback, a large request split at seg_max) gets one preadv/pwritev, not one
 * O_DIRECT round trip each. A merged run is one read-lock hold, from its first ring access to its
 * last used entry.
 *
 * Polling (QEMU's iothread ``poll-max-ns``, adaptive as QEMU's AioContext polls): when the ring
 * runs empty the interrupt goes out first, then the thread watches the avail index for up to
 * ``poll_ns`` before it asks the driver for a kick and sleeps. While it watches, the driver's
 * next request needs no kick: under TCG a kick is an MMIO exit of the vCPU under QEMU's big
 * lock plus a wake-up of this thread, the largest cost of a request after the guest's own. The
 * window grows (4 us, doubling, up to ``poll_max_ns``) while requests come within
 * ``poll_max_ns`` of the ring running empty and drops to 0 when one comes later (an idle guest
 * costs one window). Between two looks the thread yields the CPU (sched_yield): QEMU's main
 * loop, which must deliver the interrupt just sent, runs first. A yield that lasted more than
 * 50 us gave the CPU to a busy thread (the vCPUs of a guest with as many vCPUs as the host has
 * cores, another program): polling would take CPU from it, so the window shuts for 50 ms, then
 * grows again from 4 us. The read lock is taken for each look only, so a mirror clear waits for
 * one look at most.
 *
 * No allocation per request; memory barriers where the ring needs them (acquire on the avail
 * index, release on the used index, a full fence before reading the event index).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define DP_API_VERSION 4
#define DP_WINDOWS 64
#define DP_MAX_SEGS 1026             /* IOV_MAX data segments + header + status */
#define SECTOR 512
#define DP_IOV_MAX 1024              /* segments of one merged preadv/pwritev (Linux's IOV_MAX) */
#define DP_MERGE_BYTES (4u << 20)    /* bytes a merge grows to (a first chain alone may be more) */
#define DP_MERGE_CHAINS 256          /* chains of one merged I/O */
#define DP_CHUNK 512                 /* table entries per chunk a clear empties */
#define DP_POLL_START 4000           /* ns: the first window, as QEMU's AioContext starts */
#define DP_YIELD_LONG 300000         /* ns: a yield that took longer gave the CPU to a busy thread */
#define DP_POLL_QUIET 50000000       /* ns: no polling for so long after that */
#define DP_COUNTERS 10

enum { DP_STOPPED = 0, DP_HANDOFF_CHAIN = 1, DP_HANDOFF_RING = 2, DP_KICK_GONE = 3, DP_CALL_DEAD = 4 };
enum { F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4 };
enum { T_IN = 0, T_OUT = 1, T_FLUSH = 4 };

struct dp_mirror {
    pthread_rwlock_t lock;
    const uint64_t *table;            /* per IOVA frame: leaf offset | window << 6 | leaf shift; 0: absent */
    uint64_t nframes;
    uint8_t *base[DP_WINDOWS];
    uint64_t size[DP_WINDOWS];
    /* counters, taken (and zeroed) by Python: fast requests and their DMA as host/dma.py counts the
     * Python path's (ring accesses included: each read or write of the ring is one DMA) */
    uint64_t requests, reads, read_bytes, writes, write_bytes;
    uint64_t merged;                  /* requests served by a preceding request's I/O (I/Os saved) */
    uint64_t polls, poll_hits, poll_ns;   /* windows watched, requests they found, ns spent in them */
    uint64_t poll_backoffs;           /* windows ended because another thread wanted the CPU */
};

struct dp_queue {                     /* filled by Python (blk.py, ctypes Structure of the same layout) */
    struct dp_mirror *m;
    uint64_t desc, avail, used;       /* ring IOVAs */
    uint64_t capacity;                /* sectors */
    uint64_t max_bytes;               /* bytes per chain */
    int32_t num, event_idx, indirect, readonly;
    int32_t kick, call, stop, disk, buffered;
    int32_t slow;                     /* set by Python: the ring to Python (transfer hooks want each request) */
    int32_t stopping;                 /* set by Python before it signals the stop eventfd */
    int32_t need_kick;                /* after a ring hand-off: wait for a kick before another */
    uint16_t last_avail, used_idx, signalled_used, pad;
    int32_t err;                      /* errno of the last hand-off's cause, for diagnostics */
    uint32_t pad2;
    uint64_t poll_max_ns;             /* set by Python: the longest window (0: never poll) */
    uint64_t poll_ns;                 /* C's: the window now (adaptive) */
    uint64_t poll_quiet_until;        /* C's: CLOCK_MONOTONIC ns before which the window stays shut */
};

EXPORT int dp_api_version(void) { return DP_API_VERSION; }
EXPORT size_t dp_mirror_sizeof(void) { return sizeof(struct dp_mirror); }
EXPORT size_t dp_queue_sizeof(void) { return sizeof(struct dp_queue); }

/* The mirror lives in memory Python allocated (dp_mirror_sizeof bytes); its table too. */
EXPORT int dp_mirror_init(struct dp_mirror *m, const uint64_t *table, uint64_t nframes) {
    pthread_rwlockattr_t attr;
    memset(m, 0, sizeof *m);
    m->table = table;
    m->nframes = nframes;
    pthread_rwlockattr_init(&attr);   /* a clear must not starve behind busy queues */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    int rc = pthread_rwlock_init(&m->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    return rc;
}

EXPORT void dp_mirror_destroy(struct dp_mirror *m) { pthread_rwlock_destroy(&m->lock); }

EXPORT void dp_mirror_window(struct dp_mirror *m, int index, uint8_t *base, uint64_t size) {
    pthread_rwlock_wrlock(&m->lock);
    m->base[index] = base;
    m->size[index] = size;
    pthread_rwlock_unlock(&m->lock);
}

/* Empty the table's chunks (512 frames each) named in ``chunks``, the only ones filled since
 * the last clear (and forget the windows when ``windows``), waiting for the fast request in
 * flight on every queue: after this returns no thread uses an old translation. (Only those: a
 * 1 TiB map has a 2 GiB table, whose every page a whole memset would make resident, on each
 * domain change.) */
EXPORT void dp_mirror_clear(struct dp_mirror *m, uint64_t *table, const uint64_t *chunks, uint64_t n, int windows) {
    pthread_rwlock_wrlock(&m->lock);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t first = chunks[i] * DP_CHUNK;
        if (first < m->nframes)
            memset(table + first, 0, (m->nframes - first < DP_CHUNK ? m->nframes - first : DP_CHUNK) * sizeof *table);
    }
    if (windows) {
        memset(m->base, 0, sizeof m->base);
        memset(m->size, 0, sizeof m->size);
    }
    pthread_rwlock_unlock(&m->lock);
}

EXPORT void dp_mirror_take(struct dp_mirror *m, uint64_t out[DP_COUNTERS]) {
    uint64_t *c[DP_COUNTERS] = {&m->requests, &m->reads, &m->read_bytes, &m->writes, &m->write_bytes, &m->merged,
                                &m->polls, &m->poll_hits, &m->poll_ns, &m->poll_backoffs};
    for (int i = 0; i < DP_COUNTERS; i++)
        out[i] = __atomic_exchange_n(c[i], 0, __ATOMIC_RELAXED);
}

/* Host pointer of [iova, iova + n) if the mirror holds it inside one leaf, else NULL. */
static uint8_t *xlate(const struct dp_mirror *m, uint64_t iova, uint64_t n) {
    uint64_t frame = iova >> 12;
    if (frame >= m->nframes)
        return NULL;
    uint64_t e = __atomic_load_n(&m->table[frame], __ATOMIC_RELAXED);
    if (!e)
        return NULL;
    unsigned shift = e & 63, win = (e >> 6) & 63;
    uint64_t inleaf = iova & ((1ULL << shift) - 1);
    if (n > (1ULL << shift) - inleaf)
        return NULL;                  /* the segment leaves its leaf */
    uint64_t off = (e & ~0xFFFULL) + inleaf;
    if (!m->base[win] || off > m->size[win] || n > m->size[win] - off)
        return NULL;
    return m->base[win] + off;
}

struct ring {                         /* the ring as mapped for one request (under the read lock) */
    uint8_t *desc;
    volatile uint16_t *avail;         /* flags, idx, ring[num], used_event */
    volatile uint16_t *used16;        /* flags, idx, ..., avail_event at 2 + 4 * num */
    volatile uint32_t *used_ring;     /* id, len pairs */
};

static int map_ring(struct dp_queue *q, struct ring *r) {
    uint64_t n = (uint64_t)q->num;
    r->desc = xlate(q->m, q->desc, 16 * n);
    uint8_t *a = xlate(q->m, q->avail, 6 + 2 * n), *u = xlate(q->m, q->used, 6 + 8 * n);
    if (!r->desc || !a || !u || ((uintptr_t)a & 1) || ((uintptr_t)u & 3))
        return -1;
    r->avail = (volatile uint16_t *)a;
    r->used16 = (volatile uint16_t *)u;
    r->used_ring = (volatile uint32_t *)(u + 4);
    return 0;
}

struct seg { uint8_t *p; uint64_t n; };

struct chain {                        /* one decoded chain: readable then writable segments */
    struct seg s[DP_MAX_SEGS];
    int nr, nw;
    uint64_t rlen, wlen;
    uint64_t table_reads, table_bytes;  /* descriptor DMA, as virtqueue.py reads them */
};

struct dma { uint64_t reads, read_bytes, writes, write_bytes; };

/* The ring accesses and the request's own transfers, counted as host/dma.py counts the Python
 * path's (each ring read or write through the IOMMU is one DMA). */
static void dma_read(struct dma *d, uint64_t n) { d->reads++; d->read_bytes += n; }
static void dma_write(struct dma *d, uint64_t n) { d->writes++; d->write_bytes += n; }

static void dma_commit(struct dp_mirror *m, struct dma *d) {
    __atomic_add_fetch(&m->reads, d->reads, __ATOMIC_RELAXED);
    __atomic_add_fetch(&m->read_bytes, d->read_bytes, __ATOMIC_RELAXED);
    __atomic_add_fetch(&m->writes, d->writes, __ATOMIC_RELAXED);
    __atomic_add_fetch(&m->write_bytes, d->write_bytes, __ATOMIC_RELAXED);
    memset(d, 0, sizeof *d);
}

/* Decode chain ``head`` as virtqueue.py's _walk does; 0, or -1 for anything Python must judge
 * (an error, a segment outside the mirror, more segments than one preadv takes). */
static int walk(struct dp_queue *q, const struct ring *r, unsigned head, struct chain *c) {
    const uint8_t *table = r->desc;
    uint64_t size = (uint64_t)q->num, index = head, seen = 0, total = 0;
    int indirect_done = 0;
    c->nr = c->nw = 0;
    c->rlen = c->wlen = 0;
    c->table_reads = c->table_bytes = 0;
    for (;;) {
        uint64_t addr; uint32_t len; uint16_t flags, next;
        if (index >= size || ++seen > size)
            return -1;
        const uint8_t *d = table + 16 * index;
        if (!indirect_done) {
            c->table_reads++;
            c->table_bytes += 16;
        }
        memcpy(&addr, d, 8);          /* one read of each field: the driver may change them */
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);
        if (flags & F_INDIRECT) {
            if (!q->indirect || indirect_done || (flags & F_NEXT) || len == 0 || len % 16 || len / 16 > 32768)
                return -1;
            table = xlate(q->m, addr, len);
            if (!table)
                return -1;
            c->table_reads++;             /* virtqueue.py reads an indirect table at once */
            c->table_bytes += len;
            size = len / 16;
            index = 0;
            seen = 0;
            indirect_done = 1;
            continue;
        }
        total += len;
        if (total > q->max_bytes || c->nr + c->nw >= DP_MAX_SEGS)
            return -1;
        uint8_t *p = xlate(q->m, addr, len);
        if (!p && len)
            return -1;
        struct seg *s = &c->s[c->nr + c->nw];
        s->p = p;
        s->n = len;
        if (flags & F_WRITE) {
            c->nw++;
            c->wlen += len;
        } else if (c->nw) {
            return -1;                /* readable after writable */
        } else {
            c->nr++;
            c->rlen += len;
        }
        if (!(flags & F_NEXT))
            return 0;
        index = next;
    }
}

/* preadv/pwritev of the whole iovec at ``off``, short transfers finished; with cache=none,
 * buffers O_DIRECT refuses (EINVAL) go through the buffered fd, as blk.py's _io does. A read
 * past the end of the file gives zeros. 0, or -1 (errno) for Python to redo and report. */
static int io(struct dp_queue *q, int write, struct iovec *iov, int cnt, uint64_t off) {
    while (cnt > 0) {
        ssize_t got = write ? pwritev(q->disk, iov, cnt, (off_t)off) : preadv(q->disk, iov, cnt, (off_t)off);
        if (got < 0 && errno == EINVAL && q->disk != q->buffered)
            got = write ? pwritev(q->buffered, iov, cnt, (off_t)off) : preadv(q->buffered, iov, cnt, (off_t)off);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (got == 0) {
            if (write) {
                errno = EIO;
                return -1;
            }
            for (int i = 0; i < cnt; i++)
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        off += (uint64_t)got;
        while (cnt > 0 && (size_t)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    return 0;
}

static int need_event(uint16_t event, uint16_t new, uint16_t old) {
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

/* Whether the driver wants an interrupt for what was pushed since the last signal (read under
 * the read lock; the interrupt itself, call(), is sent after it is released). */
static int notify(struct dp_queue *q, const struct ring *r, struct dma *d) {
    uint16_t old = q->signalled_used, new = q->used_idx;
    if (old == new)
        return 0;
    int want;
    dma_read(d, 2);                              /* used_event, or the avail flags */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);     /* our used index before the driver's event */
    if (q->event_idx)
        want = need_event(r->avail[2 + q->num], new, old);
    else
        want = !(r->avail[0] & 1);               /* VRING_AVAIL_F_NO_INTERRUPT */
    q->signalled_used = new;
    return want && q->call >= 0;
}

/* Interrupt the driver: 0, or -1 when the call fd is dead (Python logs it once and drops it).
 * Never with a lock held. O_NONBLOCK belongs to the open file description the front end shares:
 * it may clear it and fill the counter, so it is set again before each write; if the front end
 * wins that race, the write blocks this queue only, until dp_wakeup_signal() ends it. */
static void nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK))
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static int call(struct dp_queue *q) {
    nonblock(q->call);
    uint64_t one = 1;
    if (write(q->call, &one, 8) < 0 && errno != EAGAIN && errno != EINTR) {
        q->err = errno;
        return -1;
    }
    return 0;
}

static void wakeup(int sig) { (void)sig; }

/* Install (once) a handler that does nothing, without SA_RESTART, for the signal returned:
 * QueueThread.stop sends it (dp_wake) to a queue thread so a read or write the front end made
 * blocking returns EINTR and the thread sees it must stop. */
EXPORT int dp_wakeup_signal(void) {
    static int sig;
    if (!sig) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = wakeup;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGRTMIN + 7, &sa, NULL) == 0)
            sig = SIGRTMIN + 7;
    }
    return sig;
}

/* Send it to thread ``tid`` of this process (tgkill: a thread that has just ended is at worst
 * an ESRCH, never a use of a freed pthread_t). */
EXPORT int dp_wake(int tid) {
    int sig = dp_wakeup_signal();
    return sig ? tgkill(getpid(), tid, sig) : -1;
}

struct done { uint8_t *status; uint64_t nbytes; unsigned head; };   /* one chain of a merged run */

struct dp_thread_state {              /* per dp_run call, on its stack: no allocation */
    struct chain c;                   /* the chain being decoded (a run's earlier ones: in iov, run) */
    struct iovec iov[DP_MAX_SEGS];
    struct done run[DP_MERGE_CHAINS];
    struct dma dma;                   /* not yet added to the mirror's counters */
};

/* Decode the chain at avail slot ``idx`` into ``c`` and read its header: 0, or -1 for anything
 * Python must judge (or, for a later chain of a run, that ends the run). */
static int peek(struct dp_queue *q, const struct ring *r, uint16_t idx, struct chain *c, unsigned *head,
                uint32_t *type, uint64_t *sector) {
    *head = r->avail[2 + (idx & (q->num - 1))];
    if (*head >= (unsigned)q->num)
        return -1;
    if (walk(q, r, *head, c) || c->rlen < 16 || c->wlen < 1 || c->s[0].n != 16 || c->s[c->nr + c->nw - 1].n != 1)
        return -1;
    memcpy(type, c->s[0].p, 4);
    memcpy(sector, c->s[0].p + 8, 8);
    return 0;
}

/* The ring reads of a decoded chain, as the Python path counts them. */
static void account_chain(struct dma *d, const struct chain *c) {
    dma_read(d, 2);                   /* the avail index */
    dma_read(d, 2);                   /* the head */
    d->reads += c->table_reads;
    d->read_bytes += c->table_bytes;
    dma_read(d, 16);                  /* the header */
}

/* Append an IN/OUT chain's data segments to iov[*cnt...]; its data bytes. */
static uint64_t add_data(const struct chain *c, uint32_t type, struct iovec *iov, int *cnt) {
    int first = type == T_IN ? c->nr : 1, n = type == T_IN ? c->nw - 1 : c->nr - 1;
    for (int i = 0; i < n; i++) {
        iov[*cnt + i].iov_base = c->s[first + i].p;
        iov[*cnt + i].iov_len = c->s[first + i].n;
    }
    *cnt += n;
    return type == T_IN ? c->wlen - 1 : c->rlen - 16;
}

/* Serve the next available chain, and with a plain IN or OUT the following available ones of the
 * same type that continue it on the disk (as QEMU's virtio_blk_submit_multireq merges a batch):
 * one preadv/pwritev for the run, then each chain's status and used entry in order. A later chain
 * that does not fit ends the run untouched. The number of chains served, 0 ring empty, -1 hand the
 * first chain to Python (nothing of the run pushed: Python redoes each request, which is
 * idempotent), -2 hand the ring to Python. Called with the read lock held. */
static int serve_one(struct dp_queue *q, const struct ring *r, struct dp_thread_state *t) {
    uint16_t avail_idx = __atomic_load_n(&r->avail[1], __ATOMIC_ACQUIRE);
    uint16_t pending = (uint16_t)(avail_idx - q->last_avail);
    if (!pending) {
        dma_read(&t->dma, 2);
        return 0;
    }
    if (pending > q->num)
        return -2;                    /* Python raises the RingError: device needs reset */
    struct chain *c = &t->c;
    unsigned head; uint32_t type; uint64_t sector;
    if (peek(q, r, q->last_avail, c, &head, &type, &sector))
        return -1;
    struct dma d = {0};               /* the run's, kept only if it is served here */
    account_chain(&d, c);
    int n = 1;
    t->run[0].status = c->s[c->nr + c->nw - 1].p;
    t->run[0].head = head;
    t->run[0].nbytes = 0;
    if (type == T_IN || type == T_OUT) {
        int cnt = 0;
        uint64_t nbytes = add_data(c, type, t->iov, &cnt);
        if (nbytes % SECTOR || sector > q->capacity || nbytes / SECTOR > q->capacity - sector)
            return -1;                /* Python logs the range error once and answers IOERR */
        if (type == T_OUT && q->readonly)
            return -1;
        t->run[0].nbytes = nbytes;
        uint64_t total = nbytes, end = sector + nbytes / SECTOR;
        while (nbytes && n < DP_MERGE_CHAINS && n < pending && total < DP_MERGE_BYTES) {
            unsigned h; uint32_t ty; uint64_t s;
            if (peek(q, r, (uint16_t)(q->last_avail + n), c, &h, &ty, &s) || ty != type || s != end)
                break;
            int more = (type == T_IN ? c->nw - 1 : c->nr - 1);
            uint64_t nb = type == T_IN ? c->wlen - 1 : c->rlen - 16;
            if (!nb || nb % SECTOR || nb / SECTOR > q->capacity - end || nb > DP_MERGE_BYTES - total
                || cnt + more > DP_IOV_MAX)
                break;
            add_data(c, type, t->iov, &cnt);
            account_chain(&d, c);
            t->run[n].status = c->s[c->nr + c->nw - 1].p;
            t->run[n].head = h;
            t->run[n].nbytes = nb;
            n++;
            total += nb;
            end += nb / SECTOR;
        }
        if (total && io(q, type == T_OUT, t->iov, cnt, sector * SECTOR)) {
            q->err = errno;
            return -1;
        }
    } else if (type == T_FLUSH) {
        if (!q->readonly && fdatasync(q->disk)) {
            q->err = errno;
            return -1;
        }
    } else {
        return -1;                    /* GET_ID, DISCARD, WRITE_ZEROES, unknown: Python */
    }
    for (int i = 0; i < n; i++) {
        uint32_t written = 1;
        if (type == T_IN) {
            written += (uint32_t)t->run[i].nbytes;
            dma_write(&d, t->run[i].nbytes);
        } else if (type == T_OUT) {
            dma_read(&d, t->run[i].nbytes);
        }
        *t->run[i].status = 0;        /* VIRTIO_BLK_S_OK */
        dma_write(&d, 1);             /* the status byte */
        dma_write(&d, 8);             /* the used element */
        dma_write(&d, 2);             /* the used index */
        uint16_t slot = q->used_idx & (q->num - 1);
        r->used_ring[2 * slot] = t->run[i].head;
        r->used_ring[2 * slot + 1] = written;
        q->used_idx++;
        __atomic_store_n(&r->used16[1], q->used_idx, __ATOMIC_RELEASE);
        q->last_avail++;
    }
    __atomic_add_fetch(&q->m->requests, (uint64_t)n, __ATOMIC_RELAXED);
    if (n > 1)
        __atomic_add_fetch(&q->m->merged, (uint64_t)(n - 1), __ATOMIC_RELAXED);
    dma_commit(q->m, &d);
    return n;
}

/* Interrupt the driver if it wants one for what was pushed, the DMA counted, the read lock
 * released before the call (never with a lock held): -1 when the call fd is dead. */
static int notify_unlock(struct dp_queue *q, const struct ring *r, struct dma *d) {
    int want = notify(q, r, d);
    dma_commit(q->m, d);
    pthread_rwlock_unlock(&q->m->lock);
    return want && call(q) ? -1 : 0;
}

static int stop_asked(struct dp_queue *q) { return __atomic_load_n(&q->stopping, __ATOMIC_ACQUIRE); }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* The window after a wait of ``block`` ns from the ring running empty to the next request, as
 * QEMU's adaptive polling: kept when the window covered it, grown when a longer one would have,
 * dropped when no allowed one would; shut while a back-off lasts. */
static void poll_adapt(struct dp_queue *q, uint64_t block, uint64_t now) {
    uint64_t max = q->poll_max_ns;
    if (block <= q->poll_ns || now < q->poll_quiet_until)
        return;
    if (block > max)
        q->poll_ns = 0;
    else
        q->poll_ns = q->poll_ns ? (q->poll_ns * 2 < max ? q->poll_ns * 2 : max) : (DP_POLL_START < max ? DP_POLL_START : max);
}

/* Watch the avail index for up to the window (the read lock for each look only, the CPU yielded
 * between looks; each look is a 2-byte DMA read, as a device polling the ring would do): 1 a
 * request came, 0 none (or the ring is no longer C's to look at), -1 stop. A yield that took
 * long means a busy thread (a vCPU of a guest with as many vCPUs as the host has cores, another
 * program) ran meanwhile: polling would take CPU from it, so the window shuts for a while. */
static int poll_ring(struct dp_queue *q, uint64_t start) {
    uint64_t until = start + q->poll_ns, t = start, looks = 0;
    int found = 0;
    do {
        if (stop_asked(q))
            return -1;
        struct ring r;
        pthread_rwlock_rdlock(&q->m->lock);
        int gone = __atomic_load_n(&q->slow, __ATOMIC_RELAXED) || map_ring(q, &r);
        found = !gone && (uint16_t)(__atomic_load_n(&r.avail[1], __ATOMIC_ACQUIRE) - q->last_avail) != 0;
        looks += !gone;
        pthread_rwlock_unlock(&q->m->lock);
        if (gone || found)
            break;
        uint64_t before = now_ns();
        sched_yield();
        t = now_ns();
        if (t - before > DP_YIELD_LONG) {
            q->poll_ns = 0;
            q->poll_quiet_until = t + DP_POLL_QUIET;
            __atomic_add_fetch(&q->m->poll_backoffs, 1, __ATOMIC_RELAXED);
            break;
        }
    } while (t < until);
    struct dma d = {.reads = looks, .read_bytes = 2 * looks};
    dma_commit(q->m, &d);
    __atomic_add_fetch(&q->m->polls, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&q->m->poll_ns, now_ns() - start, __ATOMIC_RELAXED);
    if (found)
        __atomic_add_fetch(&q->m->poll_hits, 1, __ATOMIC_RELAXED);
    return found;
}

/* Serve the queue until it is stopped or Python must take it (the return value says why; the
 * ring state is in ``q``). The GIL is not held (ctypes releases it). */
EXPORT int dp_run(struct dp_queue *q) {
    struct dp_thread_state t;
    struct ring r;
    memset(&t.dma, 0, sizeof t.dma);
    unsigned served = 0;
    int polled = 0;                   /* the ring ran empty and the interrupt went out: watched or not, */
    uint64_t idle_since = 0;          /* since then; the next request adapts the window */
    for (;;) {
        int rc = 0;
        /* drain: one request (or one merged run) per read-lock hold, so a mirror clear waits for
         * that only */
        for (;;) {
            if (stop_asked(q))
                return DP_STOPPED;
            pthread_rwlock_rdlock(&q->m->lock);
            if (__atomic_load_n(&q->slow, __ATOMIC_RELAXED) || map_ring(q, &r)) {   /* Python's, whole */
                pthread_rwlock_unlock(&q->m->lock);
                rc = -2;
                break;
            }
            q->need_kick = 0;
            rc = serve_one(q, &r, &t);
            if (rc > 0) {
                if (idle_since) {
                    uint64_t now = now_ns();
                    poll_adapt(q, now - idle_since, now);
                }
                polled = 0;
                idle_since = 0;
            }
            if (rc == 0 && q->poll_max_ns && !polled) {   /* empty: the interrupt, then watch the ring */
                if (notify_unlock(q, &r, &t.dma))
                    return DP_CALL_DEAD;
                polled = 1;
                idle_since = now_ns();
                if (q->poll_ns && poll_ring(q, idle_since) < 0)
                    return DP_STOPPED;
                continue;             /* serve what came, or ask for a kick and sleep */
            }
            if (rc == 0) {            /* empty: ask for a kick, then look again (no lost wake-up) */
                if (q->event_idx) {
                    r.used16[2 + 4 * q->num] = q->last_avail;      /* avail_event */
                    dma_write(&t.dma, 2);
                }
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                dma_read(&t.dma, 2);
                if ((uint16_t)(__atomic_load_n(&r.avail[1], __ATOMIC_ACQUIRE) - q->last_avail)) {
                    pthread_rwlock_unlock(&q->m->lock);
                    continue;
                }
                if (notify_unlock(q, &r, &t.dma))
                    return DP_CALL_DEAD;
                break;
            }
            if (rc < 0) {
                if (notify_unlock(q, &r, &t.dma))    /* what was done so far, before Python takes over */
                    return DP_CALL_DEAD;
                break;
            }
            unsigned before = served;
            served += (unsigned)rc;
            int want = before / 32 != served / 32 && notify(q, &r, &t.dma);   /* a long stream: interrupts as it goes */
            pthread_rwlock_unlock(&q->m->lock);
            if (want && call(q))
                return DP_CALL_DEAD;
        }
        if (rc == -1) {
            q->need_kick = 0;
            return DP_HANDOFF_CHAIN;
        }
        if (rc == -2 && !q->need_kick) {
            q->need_kick = 1;         /* Python drains it; we come back after the next kick */
            return DP_HANDOFF_RING;
        }
        /* wait for a kick (or the stop eventfd) */
        struct pollfd p[2] = {{.fd = q->kick, .events = POLLIN}, {.fd = q->stop, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            q->err = errno;
            return DP_KICK_GONE;
        }
        if (p[1].revents || stop_asked(q))
            return DP_STOPPED;
        if (p[0].revents & POLLIN) {
            uint8_t buf[512];         /* an eventfd gives its 8-byte counter, a pipe its bytes */
            nonblock(q->kick);        /* the front end may have cleared it (see call()) */
            ssize_t got = read(q->kick, buf, sizeof buf);
            if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
                q->err = got < 0 ? errno : 0;
                return DP_KICK_GONE;
            }
        } else if (p[0].revents & (POLLHUP | POLLERR | POLLNVAL)) {
            q->err = 0;
            return DP_KICK_GONE;
        }
        q->need_kick = 0;             /* a kick: look at the ring again (Python's if still unmapped) */
    }
}
