/* rio: random 4 KiB direct I/O on a block device, for scripts/bench_dma.py.
 *
 * The bench's Linux guest has only busybox, whose dd costs a process start-up per I/O (several
 * milliseconds under TCG): a loop of dd measures the guest's fork/exec more than the disk. This
 * tool does COUNT I/Os (pread/pwrite of one 4 KiB block at a random block of the first BLOCKS,
 * O_DIRECT) in one process per job, as fio's randread/randwrite/randrw with ioengine=psync,
 * iodepth=1 and numjobs=JOBS would; written by hand because fio does not fit the guest's
 * initramfs (dynamically linked, with its libraries). Built static by the bench with the host's
 * gcc and appended to the guest's initramfs as a second cpio archive (the stock image is
 * unchanged).
 *
 *   rio DEVICE r|w|m COUNT BLOCKS SEED [JOBS]     (m: 70 % reads)
 *
 * Prints "rio N ios in S s" and exits 0, or names the failing I/O and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t next(uint64_t *s) {          /* xorshift64* */
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

static int job(const char *dev, char op, long count, uint64_t blocks, uint64_t seed) {
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) {
        fprintf(stderr, "rio: %s: %s\n", dev, strerror(errno));
        return 1;
    }
    void *buf;
    if (posix_memalign(&buf, 4096, 4096))
        return 1;
    uint64_t s = seed * 0x9E3779B97F4A7C15ULL + 1;
    for (int i = 0; i < 4096; i++)
        ((unsigned char *)buf)[i] = (unsigned char)next(&s);
    for (long i = 0; i < count; i++) {
        uint64_t r = next(&s);
        off_t off = (off_t)((r >> 8) % blocks) * 4096;
        int write = op == 'w' || (op == 'm' && (r & 0xFF) >= 179);     /* 77/256 = 30 % writes */
        ssize_t got = write ? pwrite(fd, buf, 4096, off) : pread(fd, buf, 4096, off);
        if (got != 4096) {
            fprintf(stderr, "rio: %s of 4096 bytes at %lld: %s\n", write ? "write" : "read", (long long)off,
                    got < 0 ? strerror(errno) : "short");
            return 1;
        }
    }
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 6 || !strchr("rwm", argv[2][0])) {
        fprintf(stderr, "usage: rio DEVICE r|w|m COUNT BLOCKS SEED [JOBS]\n");
        return 2;
    }
    long count = atol(argv[3]), jobs = argc > 6 ? atol(argv[6]) : 1;
    uint64_t blocks = strtoull(argv[4], NULL, 10), seed = strtoull(argv[5], NULL, 10);
    if (count < 1 || blocks < 1 || jobs < 1 || jobs > 64) {
        fprintf(stderr, "rio: COUNT and BLOCKS >= 1, JOBS 1..64\n");
        return 2;
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int failed = 0;
    if (jobs == 1) {
        failed = job(argv[1], argv[2][0], count, blocks, seed);
    } else {
        for (long j = 0; j < jobs; j++) {
            pid_t pid = fork();
            if (pid == 0)
                _exit(job(argv[1], argv[2][0], count / jobs + (j < count % jobs), blocks, seed + (uint64_t)j));
            if (pid < 0)
                return 1;
        }
        int st;
        while (wait(&st) > 0)
            failed |= !WIFEXITED(st) || WEXITSTATUS(st);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (failed)
        return 1;
    printf("rio %ld ios in %.3f s\n", count, (double)(t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
