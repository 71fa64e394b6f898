/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * mktme_shim.c - qemu-mktme's TCG plugin: count every guest load and store against the page of
 * guest RAM it touches (Python assigns each page its KeyID), and stream the accesses to watched
 * pages into a shared region that Python reads (qemu_mktme/trace/layout.py declares the
 * same layout in numpy).
 *
 * Built by qemu_mktme/trace/shim/build.py with the system gcc, one variant per plugin API:
 *   MKTME_PLUGIN_ABI=1  QEMU 7.2 .. 8.2   qemu_plugin_insn_data returns a pointer
 *   MKTME_PLUGIN_ABI=2  QEMU 9.0          the loader requires version >= 2
 *   MKTME_PLUGIN_ABI=3  QEMU 9.1 .. 10.x  qemu_plugin_insn_data copies into a buffer
 *
 * The cost is in the per-access callback (billions per guest boot), so it is built to do
 * little there:
 *  - a per-vCPU software TLB maps the virtual page to its guest-RAM page;
 *    qemu_plugin_get_hwaddr + qemu_plugin_hwaddr_phys_addr (a RAMBlock search on 7.2) run
 *    only on a miss. Instructions that can change translations (MOV to CRn, INVLPG,
 *    INVPCID, WRMSR, LMSW, RSM, far JMP/CALL, VMRUN, INVLPGA) are found at translation time
 *    and bump the vCPU's generation before they execute; their own accesses are never cached.
 *    (IRET, SYSRET and interrupts do not change CR3 in IA-32e mode; a 32-bit task switch
 *    through IRET with NT=1, SMI entry and a #VMEXIT are not seen, which is what the next
 *    check is for.) Every Nth hit is looked up again and compared (verify=N); a disagreement
 *    is counted, so the cache shows it is honest.
 *  - the hit path decodes the access size and direction from qemu_plugin_meminfo_t inline
 *    (QEMU 7.2 .. 10.x build it as MemOpIdx | rw << 16, MemOpIdx = memop << 4 | mmu_idx):
 *    calling qemu_plugin_mem_size_shift and qemu_plugin_mem_is_store cost more than all the
 *    attribution. Every slow-path access cross-checks the decoding against those calls; on a
 *    disagreement the shim counts it and uses the calls from then on (decode=api forces that).
 *  - a hit counts in its TLB entry, the line the hit path has just read: a separate counter
 *    line per page cost a third of the hit path (perf, QEMU 7.2). The counts move to the
 *    page's counters when the entry changes page and whenever Python reads (see "fold").
 *  - watched pages, verification rounds and misses all leave the hit path by one branch.
 *  - per-KeyID totals are not counted here: a page's KeyID is Python's to change, so Python
 *    folds a page's counters into its old KeyID's total when it re-keys the page.
 *
 * Options (key=value; anything else is an error and QEMU does not start):
 *   region=PATH   the shared region, created and initialised by Python (required)
 *   size=BYTES    its size (required)                 layout=N   its layout version (required)
 *   phys=ramaddr|gpa  what qemu_plugin_hwaddr_phys_addr returns: the RAMBlock address (QEMU
 *                 before 8.2) or the guest-physical address (8.2 on; mapped to a backend
 *                 offset through the region's range table)                 (default ramaddr)
 *   tlb=on|off    the software TLB                                         (default on)
 *   verify=N      re-check every Nth TLB hit; 0 = never                    (default 1024)
 *   decode=inline|api   how the hit path learns an access's size and direction (inline)
 *   mode=attribute|count|none   full attribution; count callbacks only (a measurement
 *                 floor); or instrument nothing                            (default attribute)
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MKTME_PLUGIN_ABI
#error "define MKTME_PLUGIN_ABI (1, 2 or 3)"
#endif
#if MKTME_PLUGIN_ABI < 1 || MKTME_PLUGIN_ABI > 3
#error "MKTME_PLUGIN_ABI must be 1, 2 or 3"
#endif

#define EXPORT __attribute__((visibility("default")))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* ------------------------------------------------------------------------------------------
 * The QEMU TCG plugin ABI: only what this file uses, declared here from the documented API
 * (QEMU's docs/devel/tcg-plugins.rst); no QEMU header is needed.
 */
typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
struct qemu_plugin_hwaddr;

typedef struct {
    const char *target_name;
    struct { int min, cur; } version;            /* plugin API versions QEMU accepts */
    bool system_emulation;
    union { struct { int smp_vcpus, max_vcpus; } system; };
} qemu_info_t;

enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_mem_rw { QEMU_PLUGIN_MEM_R = 1, QEMU_PLUGIN_MEM_W = 2, QEMU_PLUGIN_MEM_RW = 3 };

typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_vcpu_mem_cb_t)(unsigned int vcpu_index, qemu_plugin_meminfo_t info,
                                          uint64_t vaddr, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
#if MKTME_PLUGIN_ABI >= 3
size_t qemu_plugin_insn_data(const struct qemu_plugin_insn *insn, void *dest, size_t len);
#else
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
#endif
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_udata_cb_t cb,
                                            enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_mem_cb_t cb,
                                      enum qemu_plugin_cb_flags flags, enum qemu_plugin_mem_rw rw,
                                      void *userdata);
unsigned int qemu_plugin_mem_size_shift(qemu_plugin_meminfo_t info);
bool qemu_plugin_mem_is_store(qemu_plugin_meminfo_t info);
struct qemu_plugin_hwaddr *qemu_plugin_get_hwaddr(qemu_plugin_meminfo_t info, uint64_t vaddr);
bool qemu_plugin_hwaddr_is_io(const struct qemu_plugin_hwaddr *haddr);
uint64_t qemu_plugin_hwaddr_phys_addr(const struct qemu_plugin_hwaddr *haddr);

EXPORT int qemu_plugin_version = MKTME_PLUGIN_ABI;
EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv);

/* The inline decoding of qemu_plugin_meminfo_t (checked against the API, see above). */
#define MEMINFO_STORE_BIT 17                     /* QEMU_PLUGIN_MEM_W << 16 */
#define MEMINFO_SIZE_SHIFT 4                     /* MemOp in MemOpIdx, MO_SIZE its low bits */
#define MEMINFO_SIZE_MASK 7u

/* ------------------------------------------------------------------------------------------
 * The shared region, layout version 1. Python creates it and fills in the geometry; the shim
 * checks every field against its own idea and writes what it is. Sections, each 4 KiB
 * aligned, in this order:
 *
 *   struct shim_header                               4 KiB
 *   per-vCPU blocks         [nvcpus]                 SHIM_VCPU_BLOCK bytes each:
 *       struct shim_vcpu                             ring indices, TLB stamp, statistics
 *       struct stlb_entry   [STLB_ENTRIES]           the software TLB (the shim's own)
 *   struct shim_page_attr   [npages]                 written by Python: KeyID, watch flags
 *   struct shim_counters    [nvcpus][npages]         per-page traffic
 *   struct shim_record      [nvcpus][ring_entries]
 *
 * Pages are indexed by their offset in the guest-RAM backend (>> 12), not by GPA: the table
 * stays dense across the hole below 4 GiB; Python maps offsets to GPAs.
 */
#define SHIM_MAGIC 0x4d4853454d544b4dULL         /* "MKTMESHM" */
#define SHIM_LAYOUT_VERSION 1
#define SHIM_HEADER_BYTES 4096
#define SHIM_PAGE_SHIFT 12
#define SHIM_MAX_RANGES 8
#define SHIM_WATCH_LOAD 1u                       /* shim_page_attr.watch: 1 << kind */
#define SHIM_WATCH_STORE 2u
enum { KIND_LOAD = 0, KIND_STORE = 1 };
enum { STATE_CREATED = 0, STATE_ATTACHED = 1, STATE_EXITED = 2 };
enum { PHYS_RAMADDR = 0, PHYS_GPA = 1 };
enum { MODE_ATTRIBUTE = 0, MODE_COUNT = 1, MODE_NONE = 2 };

struct shim_range {                              /* guest RAM at [gpa, gpa + size) (phys=gpa) */
    uint64_t gpa, size, offset;
};

struct shim_header {
    /* written by Python when it creates the region */
    uint64_t magic;
    uint32_t layout_version;
    uint32_t header_size;                        /* sizeof(struct shim_header) Python expects */
    uint64_t region_size;
    uint64_t npages;                             /* guest-RAM backend bytes >> 12 */
    uint32_t nvcpus;
    uint32_t ring_entries;                       /* records per vCPU ring, a power of two */
    uint32_t vcpu_block;                         /* bytes per vCPU block */
    uint32_t record_size;
    uint64_t vcpu_offset, attr_offset, page_ctr_offset, ring_offset;
    /* written by Python before the vCPUs first run */
    uint64_t ram_base;                           /* RAMBlock address of guest RAM (ramaddr) */
    uint32_t nranges;
    uint32_t configured;
    struct shim_range ranges[SHIM_MAX_RANGES];
    /* written by the shim */
    uint32_t shim_state;
    uint32_t shim_abi;
    uint32_t qemu_api_min, qemu_api_cur;
    uint32_t max_vcpus;
    uint32_t phys_mode;
    uint32_t sizeof_header, sizeof_vcpu, sizeof_record, sizeof_page_attr, sizeof_counters;
    uint32_t tlb_entries, verify_period, mode;
    uint64_t shim_pid;
    uint64_t insns_translated;                   /* guest instructions seen at translation */
    uint64_t insns_unique;                       /* distinct (pc, bytes) kept for records */
    uint64_t insns_untracked;                    /* not kept: the table was full */
    uint64_t insns_tlb_flush;                    /* instrumented as translation-changing */
    uint32_t decode_api;                         /* 1: the hit path calls the API */
    uint32_t pad0;
};
_Static_assert(sizeof(struct shim_header) == 392, "header layout");

struct shim_vcpu {
    /* written by the shim (producer) */
    uint64_t head;                               /* records published (release) */
    uint64_t seq;                                /* watched accesses seen: published + dropped */
    uint64_t dropped;                            /* records lost because the ring was full */
    uint64_t pad0[5];
    /* written by Python (consumer) */
    uint64_t tail;                               /* records consumed */
    uint64_t pad1[7];
    /* the hit path's line: attr_gen is Python's (bumped after it changes watch flags), the
     * rest the shim's own */
    uint32_t attr_gen;                           /* written by Python */
    uint32_t gen;                                /* translation generation (for reading) */
    uint32_t verify_left;                        /* TLB hits until the next verification */
    uint32_t pad2a;
    uint64_t tlb_key;                            /* gen << KEY_GEN_SHIFT | KEY_POISON */
    uint32_t pad2[10];
    /* statistics, written by the shim */
    uint64_t io[2];                              /* MMIO loads, stores: not RAM, not attributed */
    uint64_t other;                              /* RAM outside the guest-RAM backend (ROMs) */
    uint64_t lookup_failures;                    /* qemu_plugin_get_hwaddr found nothing */
    uint64_t tlb_misses;                         /* full lookups that refilled the TLB */
    uint64_t tlb_flushes;                        /* generation bumps */
    uint64_t verify_checks, verify_mismatches;
    uint64_t mismatch_vaddr, mismatch_cached, mismatch_actual;  /* the last mismatch */
    uint64_t callbacks;                          /* mode=count only */
    uint64_t decode_checks, decode_mismatches;   /* inline meminfo decoding vs the API */
    /* the TLB's counts: written by the shim, read by Python (SharedRegion.counts) */
    uint64_t fold_seq;                           /* odd while entries' counts move to the pages' */
    uint32_t folded_gen;                         /* attr_gen at the last fold of the whole TLB */
    uint32_t pad3a;
    uint64_t folds;                              /* whole-TLB folds (Python asked, or the generation wrapped) */
    uint64_t pad3[7];
};
_Static_assert(sizeof(struct shim_vcpu) == 384, "vcpu layout");
_Static_assert(offsetof(struct shim_vcpu, tail) == 64, "consumer index on its own line");
_Static_assert(offsetof(struct shim_vcpu, attr_gen) == 128 && offsetof(struct shim_vcpu, pad2) == 152,
               "the hit path's line");

struct shim_page_attr {
    uint16_t keyid;
    uint8_t watch;                               /* SHIM_WATCH_LOAD | SHIM_WATCH_STORE */
    uint8_t reserved;
};
_Static_assert(sizeof(struct shim_page_attr) == 4, "page attribute layout");

struct shim_counters {
    uint64_t n[2];                               /* loads, stores */
    uint64_t bytes[2];                           /* bytes loaded, bytes stored */
};
_Static_assert(sizeof(struct shim_counters) == 32, "counter layout");

struct shim_record {
    uint64_t seq;                                /* per-vCPU sequence number */
    uint64_t offset;                             /* guest-RAM backend offset of the first byte */
    uint64_t gpa;                                /* its guest-physical address, or UINT64_MAX */
    uint64_t vaddr;
    uint64_t pc;                                 /* vaddr of the instruction */
    uint16_t vcpu;
    uint16_t keyid;                              /* the page's KeyID at the access */
    uint8_t size;
    uint8_t kind;                                /* KIND_LOAD, KIND_STORE */
    uint8_t insn_len;                            /* 0: bytes unknown */
    uint8_t flags;
    uint8_t insn[16];
};
_Static_assert(sizeof(struct shim_record) == 64, "record layout");

/* ------------------------------------------------------------------------------------------
 * State (all static). Per-vCPU state is indexed by vCPU index: each vCPU thread touches only
 * its own, so the access path takes no lock.
 *
 * A software-TLB entry (one cache line) maps a virtual page to its guest-RAM page and counts
 * the hits on it: the hit path touches the vCPU's line and the entry's, nothing else. The
 * counts move to the page's counters ("fold") before the entry is given another page, when
 * the generation wraps, and when Python asks (it bumps attr_gen: the next access of the vCPU
 * folds the whole TLB and sets folded_gen); fold_seq is odd while a fold runs, so Python can
 * also read page counters + entry counts consistently from a vCPU that is not running.
 * An entry hits while its key equals the vCPU's (the virtual page number | the vCPU's
 * tlb_key: the translation generation, which translation-changing instructions bump) and its
 * attribute generation equals shim_vcpu.attr_gen (Python bumps it after changing watch flags;
 * then only the attributes are re-read, not the translation). A 64-bit address's page number
 * has 52 bits; the generation and the flags take the 12 above them.
 * Entries of watched pages carry KEY_NOHIT so that they never hit: their accesses take the
 * slow path, which records them. KEY_POISON in the vCPU's key sends every access there
 * (decode=api).
 */
#define STLB_BITS 12
#define STLB_ENTRIES (1u << STLB_BITS)
#define KEY_VPN_BITS (64 - SHIM_PAGE_SHIFT)
#define KEY_VPN_MASK ((1ull << KEY_VPN_BITS) - 1)
#define KEY_GEN_SHIFT KEY_VPN_BITS
#define GEN_LIMIT (1u << 10)                     /* gen in bits 52..61 */
#define KEY_POISON (1ull << 62)                  /* only in the vCPU's key */
#define KEY_NOHIT (1ull << 63)                   /* only in entries */
#define KEY_IDENTITY (~(KEY_POISON | KEY_NOHIT))

struct stlb_entry {
    uint64_t key;                                /* vpn | gen << 52 | KEY_NOHIT; 0: never valid */
    uint32_t attr_gen;                           /* shim_vcpu.attr_gen at the fill */
    uint32_t page;                               /* backend page (npages < 2^32) */
    struct shim_counters ctr;                    /* hits not yet folded into page's counters */
    uint64_t pad[2];
} __attribute__((aligned(64)));
_Static_assert(sizeof(struct stlb_entry) == 64, "software TLB entry");

struct vcpu_block {                              /* one per vCPU in the region */
    struct shim_vcpu s;
    struct stlb_entry tlb[STLB_ENTRIES] __attribute__((aligned(128)));
};
_Static_assert(offsetof(struct vcpu_block, tlb) == 384, "TLB right after the vCPU header");
#define SHIM_VCPU_BLOCK (align_page(sizeof(struct vcpu_block)))

struct vcpu_local {                              /* the slow path's private per-vCPU state */
    struct vcpu_block *block;
    struct shim_counters *page_ctr;
    struct shim_record *ring;
    uint64_t head, seq;                          /* producer's copies */
    struct stlb_entry scratch;                   /* tlb=off: the entry of the current access */
};

struct insn_info {                               /* one per distinct (pc, bytes) */
    uint64_t pc;
    uint8_t len;
    uint8_t flushes_tlb;
    uint8_t bytes[16];
};

static struct shim_header *hdr;
static struct shim_page_attr *attrs;
#define MAX_VCPUS 4096                           /* trace/layout.py Geometry's bound */
static struct vcpu_block *vcpu_blocks[MAX_VCPUS];  /* the hit path's only table: one load */
static struct vcpu_local *vcpus;
static unsigned nvcpus;
static uint64_t npages, ring_mask;
static uint32_t verify_period, phys_mode, mode;
static bool tlb_on, decode_api;
static struct insn_info untracked_insn;          /* stand-ins for instructions not kept */
static struct insn_info untracked_flush_insn = { .flushes_tlb = 1 };

#define NO_PAGE UINT64_MAX

static inline uint64_t align_page(uint64_t n) { return (n + 4095) & ~(uint64_t)4095; }

static inline uint32_t attr_gen_of(const struct vcpu_block *b)
{
    return __atomic_load_n(&b->s.attr_gen, __ATOMIC_ACQUIRE);
}

static uint32_t reset_verify(void)
{
    return verify_period ? verify_period : UINT32_MAX;
}

/* ------------------------------------------------------------------------------------------
 * The slow path: physical lookup, refill, verification, and recording watched accesses.
 */
static uint64_t phys_to_page(uint64_t phys)
{
    if (phys_mode == PHYS_RAMADDR) {
        uint64_t off = phys - __atomic_load_n(&hdr->ram_base, __ATOMIC_RELAXED);
        return off >> SHIM_PAGE_SHIFT < npages ? off >> SHIM_PAGE_SHIFT : NO_PAGE;
    }
    uint32_t n = __atomic_load_n(&hdr->nranges, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n && i < SHIM_MAX_RANGES; i++) {
        const struct shim_range *r = &hdr->ranges[i];
        if (phys - r->gpa < r->size) {
            uint64_t page = (r->offset + (phys - r->gpa)) >> SHIM_PAGE_SHIFT;
            return page < npages ? page : NO_PAGE;
        }
    }
    return NO_PAGE;
}

/* Where an access goes, as QEMU says (a full lookup; the statistics are the caller's to count). */
enum target { TO_PAGE, TO_OTHER, TO_IO, TO_NOTHING };

static enum target lookup_page(qemu_plugin_meminfo_t info, uint64_t vaddr, uint64_t *page)
{
    struct qemu_plugin_hwaddr *hw = qemu_plugin_get_hwaddr(info, vaddr);
    if (!hw)
        return TO_NOTHING;
    if (qemu_plugin_hwaddr_is_io(hw))
        return TO_IO;
    *page = phys_to_page(qemu_plugin_hwaddr_phys_addr(hw));
    return *page == NO_PAGE ? TO_OTHER : TO_PAGE;
}

static void count_target(struct shim_vcpu *s, enum target t, unsigned kind)
{
    if (t == TO_NOTHING)
        s->lookup_failures++;
    else if (t == TO_IO)
        s->io[kind]++;
    else if (t == TO_OTHER)
        s->other++;
}

/* Move an entry's counts to its page's counters; inside a fold_seq window (fold_begin/end). */
static void fold_entry(struct vcpu_local *v, struct stlb_entry *e)
{
    struct shim_counters *c = &v->page_ctr[e->page];
    if (!(e->ctr.n[0] | e->ctr.n[1]))
        return;
    for (int k = 0; k < 2; k++) {
        c->n[k] += e->ctr.n[k];
        c->bytes[k] += e->ctr.bytes[k];
    }
    memset(&e->ctr, 0, sizeof(e->ctr));
}

static void fold_begin(struct shim_vcpu *s)
{
    __atomic_store_n(&s->fold_seq, s->fold_seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);     /* odd before any counter moves (x86: no instruction) */
}

static void fold_end(struct shim_vcpu *s)
{
    __atomic_store_n(&s->fold_seq, s->fold_seq + 1, __ATOMIC_RELEASE);
}

/* Every entry's counts to the pages' counters: Python asked (attr_gen moved past folded_gen),
 * or the generation wraps, or QEMU exits. */
static void fold_all(struct vcpu_local *v, uint32_t attr_gen)
{
    struct shim_vcpu *s = &v->block->s;
    fold_begin(s);
    for (unsigned i = 0; i < STLB_ENTRIES; i++)
        fold_entry(v, &v->block->tlb[i]);
    fold_end(s);
    s->folds++;
    __atomic_store_n(&s->folded_gen, attr_gen, __ATOMIC_RELEASE);
}

/* An entry for a page under the vCPU's current generations; the counts it holds for another
 * page go to that page first (Python reads e->page and the counts together: the page changes
 * inside a fold_seq window). */
static void fill_entry(struct vcpu_local *v, struct stlb_entry *e, uint64_t vpn, uint64_t key, uint32_t attr_gen,
                       uint64_t page)
{
    if (e->page != page && e == &v->scratch) {   /* tlb=off: never counts, Python never reads it */
        e->page = (uint32_t)page;
    } else if (e->page != page) {
        fold_begin(&v->block->s);
        fold_entry(v, e);
        e->page = (uint32_t)page;
        fold_end(&v->block->s);
    }
    e->attr_gen = attr_gen;
    e->key = vpn | (key & KEY_IDENTITY & ~KEY_VPN_MASK) | (attrs[page].watch ? KEY_NOHIT : 0);
}

/* The backend page this access is to be counted in, or NO_PAGE when it is not to guest RAM
 * (MMIO, ROMs: counted apart and never cached: the chipset maps RAM over the BIOS ROMs and
 * back without a translation change). The accesses of a translation-changing instruction are
 * never cached either: its generation bump comes before it executes, the change after. */
static uint64_t resolve(struct vcpu_local *v, qemu_plugin_meminfo_t info, uint64_t vaddr, unsigned kind,
                        const struct insn_info *insn, bool *watched)
{
    struct shim_vcpu *s = &v->block->s;
    uint64_t vpn = vaddr >> SHIM_PAGE_SHIFT;
    uint32_t attr_gen = attr_gen_of(v->block);
    uint64_t key = __atomic_load_n(&s->tlb_key, __ATOMIC_RELAXED);
    if (unlikely(attr_gen != s->folded_gen))
        fold_all(v, attr_gen);
    bool cacheable = tlb_on && !insn->flushes_tlb;
    struct stlb_entry *e = cacheable ? &v->block->tlb[vpn & (STLB_ENTRIES - 1)] : &v->scratch;
    bool translated = cacheable && e->key && (e->key & KEY_IDENTITY) == ((vpn | key) & KEY_IDENTITY);
    uint64_t page = NO_PAGE;
    enum target t;

    if (translated && e->attr_gen == attr_gen) {
        /* A hit that came here because the page is watched or decode=api (verify_left > 0:
         * count it down here), or because verify_left ran out on the hit path (0). */
        page = e->page;
        if (!s->verify_left || !--s->verify_left) {
            uint64_t actual = NO_PAGE;
            t = lookup_page(info, vaddr, &actual);
            s->verify_checks++;
            s->verify_left = reset_verify();
            if (t != TO_PAGE || actual != page) {
                s->verify_mismatches++;
                s->mismatch_vaddr = vaddr;
                s->mismatch_cached = page << SHIM_PAGE_SHIFT;
                s->mismatch_actual = t == TO_PAGE ? actual << SHIM_PAGE_SHIFT : UINT64_MAX;
                e->key = 0;
                if (t != TO_PAGE) {
                    count_target(s, t, kind);
                    return NO_PAGE;
                }
                fill_entry(v, e, vpn, key, attr_gen, page = actual);
            }
        }
    } else if (translated) {                     /* only the watch flags changed */
        fill_entry(v, e, vpn, key, attr_gen, page = e->page);
    } else {
        s->tlb_misses++;
        t = lookup_page(info, vaddr, &page);
        if (t != TO_PAGE) {
            count_target(s, t, kind);
            e->key = 0;
            return NO_PAGE;
        }
        fill_entry(v, e, vpn, key, attr_gen, page);
    }
    *watched = e->key & KEY_NOHIT;
    return page;
}

static void set_generation(struct vcpu_block *b, uint32_t gen, bool poison)
{
    b->s.gen = gen;
    __atomic_store_n(&b->s.tlb_key, (uint64_t)gen << KEY_GEN_SHIFT | (poison ? KEY_POISON : 0), __ATOMIC_RELAXED);
}

static void flush_tlb(unsigned int vcpu_index, void *udata)
{
    struct vcpu_block *b = vcpu_blocks[vcpu_index];
    uint32_t gen = b->s.gen + 1;
    (void)udata;
    if (gen >= GEN_LIMIT) {                      /* the generation wraps: forget every entry */
        fold_all(&vcpus[vcpu_index], b->s.folded_gen);
        fold_begin(&b->s);
        memset(b->tlb, 0, sizeof(b->tlb));
        fold_end(&b->s);
        gen = 1;
    }
    set_generation(b, gen, b->s.tlb_key & KEY_POISON);
    b->s.tlb_flushes++;
}

/* The GPA at which a backend offset appears (the range table Python filled in). */
static uint64_t offset_to_gpa(uint64_t offset)
{
    uint32_t n = __atomic_load_n(&hdr->nranges, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n && i < SHIM_MAX_RANGES; i++) {
        const struct shim_range *r = &hdr->ranges[i];
        if (offset - r->offset < r->size)
            return r->gpa + (offset - r->offset);
    }
    return UINT64_MAX;
}

/* The event ring: single producer (this vCPU's thread), single consumer (Python). The producer
 * never waits: when the ring is full the record is dropped and counted. */
static void emit(struct vcpu_local *v, unsigned int vcpu_index, uint64_t page, uint64_t vaddr,
                 unsigned size, unsigned kind, const struct insn_info *insn)
{
    struct shim_vcpu *s = &v->block->s;
    uint64_t seq = v->seq++;
    uint64_t tail = __atomic_load_n(&s->tail, __ATOMIC_ACQUIRE);

    if (v->head - tail > ring_mask) {            /* full (or a nonsensical tail): drop */
        __atomic_store_n(&s->dropped, s->dropped + 1, __ATOMIC_RELAXED);
        __atomic_store_n(&s->seq, v->seq, __ATOMIC_RELAXED);
        return;
    }
    struct shim_record *r = &v->ring[v->head & ring_mask];
    r->seq = seq;
    r->offset = page << SHIM_PAGE_SHIFT | (vaddr & ((1u << SHIM_PAGE_SHIFT) - 1));
    r->gpa = offset_to_gpa(r->offset);
    r->vaddr = vaddr;
    r->pc = insn->pc;
    r->vcpu = (uint16_t)vcpu_index;
    r->keyid = attrs[page].keyid;
    r->size = (uint8_t)size;
    r->kind = (uint8_t)kind;
    r->insn_len = insn->len;
    r->flags = 0;
    memcpy(r->insn, insn->bytes, sizeof(r->insn));
    v->head++;
    __atomic_store_n(&s->seq, v->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&s->head, v->head, __ATOMIC_RELEASE);
}

static __attribute__((noinline)) void on_access_slow(unsigned int vcpu_index, qemu_plugin_meminfo_t info,
                                                     uint64_t vaddr, void *udata)
{
    struct vcpu_local *v = &vcpus[vcpu_index];
    struct shim_vcpu *s = &v->block->s;
    unsigned kind = qemu_plugin_mem_is_store(info);
    unsigned shift = qemu_plugin_mem_size_shift(info);
    bool watched;

    if (!(s->tlb_key & KEY_POISON)) {
        s->decode_checks++;
        if (((info >> MEMINFO_STORE_BIT) & 1) != kind || ((info >> MEMINFO_SIZE_SHIFT) & MEMINFO_SIZE_MASK) != shift) {
            s->decode_mismatches++;
            __atomic_store_n(&decode_api, true, __ATOMIC_RELAXED);
            __atomic_store_n(&hdr->decode_api, 1, __ATOMIC_RELAXED);
        }
        if (__atomic_load_n(&decode_api, __ATOMIC_RELAXED))   /* this vCPU's hits now come here */
            set_generation(v->block, s->gen, true);
    }
    uint64_t page = resolve(v, info, vaddr, kind, udata, &watched);
    if (page == NO_PAGE)
        return;
    unsigned size = 1u << shift;
    v->page_ctr[page].n[kind]++;
    v->page_ctr[page].bytes[kind] += size;
    if (watched && attrs[page].watch & (1u << kind))
        emit(v, vcpu_index, page, vaddr, size, kind, udata);
}

/* The memory callback, registered once per instruction for loads and stores together
 * (QEMU_PLUGIN_MEM_RW): QEMU 7.2's filter is off by one (a MEM_R callback also fires on stores
 * and a MEM_W one on loads), so separate registrations would count wrongly there. The hit
 * path is a leaf: the block (a static table), then the vCPU's line and the entry's line,
 * which holds the counts too; no calls. */
static void on_access(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    struct vcpu_block *b = vcpu_blocks[vcpu_index];
    uint64_t vpn = vaddr >> SHIM_PAGE_SHIFT;
    struct stlb_entry *e = &b->tlb[vpn & (STLB_ENTRIES - 1)];

    if (unlikely(e->key != (vpn | b->s.tlb_key) || e->attr_gen != attr_gen_of(b) || !--b->s.verify_left))
        return on_access_slow(vcpu_index, info, vaddr, udata);
    uintptr_t k = (info >> (MEMINFO_STORE_BIT - 3)) & 8;     /* byte offset of n[kind] */
    uint64_t size = 1u << ((info >> MEMINFO_SIZE_SHIFT) & MEMINFO_SIZE_MASK);
    struct shim_counters *c = (struct shim_counters *)((char *)&e->ctr + k);
    c->n[0]++;
    c->bytes[0] += size;
}

static void count_only(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr, void *udata)
{
    (void)info; (void)vaddr; (void)udata;
    vcpu_blocks[vcpu_index]->s.callbacks++;
}

/* ------------------------------------------------------------------------------------------
 * Translation time: which instructions change translations (x86 decoding, just enough).
 * QEMU hands over one instruction's bytes at a time, so prefixes and REX need no mode.
 */
static bool changes_translation(const uint8_t *b, size_t len)
{
    size_t i = 0;
    bool opsize = false;
    for (; i < len; i++) {                       /* legacy prefixes */
        uint8_t p = b[i];
        if (p == 0x66)
            opsize = true;
        else if (!(p == 0xF0 || p == 0xF2 || p == 0xF3 || p == 0x2E || p == 0x36 || p == 0x3E ||
                   p == 0x26 || p == 0x64 || p == 0x65 || p == 0x67))
            break;
    }
    if (i + 1 < len && (b[i] & 0xF0) == 0x40)    /* REX */
        i++;
    if (i >= len)
        return false;
    uint8_t op = b[i];
    if (op == 0xEA || op == 0x9A)                /* far JMP/CALL: may switch tasks (CR3) */
        return true;
    if (op == 0xFF && i + 1 < len) {             /* FF /3, FF /5: far CALL/JMP m16:xx */
        uint8_t m = b[i + 1], reg = (m >> 3) & 7;
        return (m >> 6) != 3 && (reg == 3 || reg == 5);
    }
    if (op != 0x0F || i + 1 >= len)
        return false;
    uint8_t modrm = i + 2 < len ? b[i + 2] : 0, reg = (modrm >> 3) & 7, mod = modrm >> 6;
    switch (b[i + 1]) {
    case 0x22:                                   /* MOV CRn, r */
    case 0x30:                                   /* WRMSR (EFER) */
    case 0xAA:                                   /* RSM: leaves SMM */
        return true;
    case 0x01:
        if (i + 2 >= len)
            return false;
        if (modrm == 0xD8 || modrm == 0xDF)      /* VMRUN, INVLPGA */
            return true;
        if (reg == 6)                            /* LMSW */
            return true;
        return reg == 7 && mod != 3;             /* INVLPG (mod 3 is SWAPGS, RDTSCP) */
    case 0x38:                                   /* 66 0F 38 82: INVPCID */
        return opsize && i + 2 < len && b[i + 2] == 0x82;
    }
    return false;
}

/* Distinct instructions, kept so that a record can carry the bytes of its instruction.
 * Translation runs on every vCPU thread, so the table has a lock (never taken per access). */
#define INSN_TABLE_MAX (1u << 21)
static pthread_mutex_t insn_lock = PTHREAD_MUTEX_INITIALIZER;
static struct insn_info **insn_table;
static uint64_t insn_table_size, insn_count;
static struct insn_info *insn_arena;
static size_t insn_arena_left;

static uint64_t insn_hash(uint64_t pc, const uint8_t *bytes, size_t len)
{
    uint64_t h = pc * 0x9E3779B97F4A7C15ULL ^ len;
    for (size_t i = 0; i < len; i++)
        h = (h ^ bytes[i]) * 0x100000001B3ULL;
    return h ^ (h >> 29);
}

static bool insn_table_grow(void)
{
    uint64_t size = insn_table_size ? insn_table_size * 2 : 1u << 14;
    struct insn_info **t = calloc(size, sizeof(*t));
    if (!t)
        return false;
    for (uint64_t i = 0; i < insn_table_size; i++) {
        struct insn_info *in = insn_table[i];
        if (!in)
            continue;
        uint64_t j = insn_hash(in->pc, in->bytes, in->len) & (size - 1);
        while (t[j])
            j = (j + 1) & (size - 1);
        t[j] = in;
    }
    free(insn_table);
    insn_table = t;
    insn_table_size = size;
    return true;
}

static const struct insn_info *intern_insn(uint64_t pc, const uint8_t *bytes, size_t len)
{
    const struct insn_info *found = &untracked_insn;
    uint64_t h = insn_hash(pc, bytes, len);
    pthread_mutex_lock(&insn_lock);
    if (insn_count * 2 >= insn_table_size && insn_count < INSN_TABLE_MAX && !insn_table_grow())
        goto out;
    for (uint64_t j = h & (insn_table_size - 1);; j = (j + 1) & (insn_table_size - 1)) {
        struct insn_info *in = insn_table[j];
        if (in && in->pc == pc && in->len == len && !memcmp(in->bytes, bytes, len)) {
            found = in;
            break;
        }
        if (in)
            continue;
        if (insn_count >= INSN_TABLE_MAX)
            break;
        if (!insn_arena_left) {
            insn_arena = calloc(4096, sizeof(*insn_arena));
            if (!insn_arena)
                break;
            insn_arena_left = 4096;
        }
        in = insn_arena++;
        insn_arena_left--;
        in->pc = pc;
        in->len = (uint8_t)len;
        memcpy(in->bytes, bytes, len);
        in->flushes_tlb = changes_translation(bytes, len);
        insn_table[j] = in;
        insn_count++;
        hdr->insns_unique = insn_count;
        found = in;
        break;
    }
out:
    if (found == &untracked_insn) {
        hdr->insns_untracked++;
        if (changes_translation(bytes, len))
            found = &untracked_flush_insn;
    }
    pthread_mutex_unlock(&insn_lock);
    return found;
}

static size_t insn_bytes(const struct qemu_plugin_insn *insn, uint8_t out[16])
{
    size_t len = qemu_plugin_insn_size(insn);
    if (len > 16)
        len = 16;
#if MKTME_PLUGIN_ABI >= 3
    len = qemu_plugin_insn_data(insn, out, len);
#else
    memcpy(out, qemu_plugin_insn_data(insn), len);
#endif
    return len;
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    (void)id;
    __atomic_fetch_add(&hdr->insns_translated, n, __ATOMIC_RELAXED);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        if (mode == MODE_COUNT) {
            qemu_plugin_register_vcpu_mem_cb(insn, count_only, QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_RW, NULL);
            continue;
        }
        uint8_t bytes[16] = {0};
        size_t len = insn_bytes(insn, bytes);
        const struct insn_info *info = intern_insn(qemu_plugin_insn_vaddr(insn), bytes, len);
        if (info->flushes_tlb) {
            __atomic_fetch_add(&hdr->insns_tlb_flush, 1, __ATOMIC_RELAXED);
            qemu_plugin_register_vcpu_insn_exec_cb(insn, flush_tlb, QEMU_PLUGIN_CB_NO_REGS, NULL);
        }
        qemu_plugin_register_vcpu_mem_cb(insn, tlb_on && !info->flushes_tlb ? on_access : on_access_slow,
                                         QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_RW, (void *)info);
    }
}

static void at_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id; (void)udata;
    for (unsigned i = 0; i < nvcpus && mode == MODE_ATTRIBUTE; i++)   /* the vCPUs have stopped */
        fold_all(&vcpus[i], vcpus[i].block->s.folded_gen);
    __atomic_store_n(&hdr->shim_state, STATE_EXITED, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------------------------------------
 * Installation: options, the region, per-vCPU state.
 */
static __attribute__((format(printf, 1, 2))) int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("mktme-shim: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return -1;
}

static bool parse_u64(const char *s, uint64_t *out)
{
    char *end;
    if (!*s || *s == '-' || *s == '+')
        return false;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end)
        return false;
    *out = v;
    return true;
}

static int parse_choice(const char *key, const char *val, const char *const *names, uint32_t *out)
{
    for (uint32_t i = 0; names[i]; i++) {
        if (!strcmp(val, names[i])) {
            *out = i;
            return 0;
        }
    }
    char known[128] = "";
    for (uint32_t i = 0; names[i]; i++)
        snprintf(known + strlen(known), sizeof(known) - strlen(known), "%s%s", i ? ", " : "", names[i]);
    return fail("%s=%s: expected one of %s", key, val, known);
}

struct options {
    const char *region;
    uint64_t size, layout, verify;
    bool have_size, have_layout;
    uint32_t phys, mode, tlb, decode;
};

static int parse_options(int argc, char **argv, struct options *o)
{
    static const char *const phys_names[] = { "ramaddr", "gpa", NULL };
    static const char *const mode_names[] = { "attribute", "count", "none", NULL };
    static const char *const tlb_names[] = { "off", "on", NULL };
    static const char *const decode_names[] = { "inline", "api", NULL };

    for (int i = 0; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq || eq == argv[i])
            return fail("option '%s' is not key=value", argv[i]);
        size_t klen = (size_t)(eq - argv[i]);
        const char *val = eq + 1;
#define KEY(k) (klen == sizeof(k) - 1 && !strncmp(argv[i], k, klen))
        if (KEY("region")) {
            if (!*val)
                return fail("region= needs a path");
            o->region = val;
        } else if (KEY("size")) {
            if (!parse_u64(val, &o->size))
                return fail("size=%s: not a number", val);
            o->have_size = true;
        } else if (KEY("layout")) {
            if (!parse_u64(val, &o->layout))
                return fail("layout=%s: not a number", val);
            o->have_layout = true;
        } else if (KEY("verify")) {
            if (!parse_u64(val, &o->verify) || o->verify > UINT32_MAX)
                return fail("verify=%s: expected a number of hits (0 = never)", val);
        } else if (KEY("phys")) {
            if (parse_choice("phys", val, phys_names, &o->phys))
                return -1;
        } else if (KEY("mode")) {
            if (parse_choice("mode", val, mode_names, &o->mode))
                return -1;
        } else if (KEY("tlb")) {
            if (parse_choice("tlb", val, tlb_names, &o->tlb))
                return -1;
        } else if (KEY("decode")) {
            if (parse_choice("decode", val, decode_names, &o->decode))
                return -1;
        } else {
            return fail("unknown option '%s' (known: region, size, layout, phys, tlb, verify, decode, mode)",
                        argv[i]);
        }
#undef KEY
    }
    if (!o->region || !o->have_size || !o->have_layout)
        return fail("region=, size= and layout= are required");
    return 0;
}

/* The section offsets are Python's (trace/layout.py, Geometry): the shim computes no layout of
 * its own, it only checks that each section is page aligned, follows the one before it, and
 * lies inside the region. */
static int check_sections(const struct shim_header *h)
{
    const struct { const char *what; uint64_t offset, bytes; } sections[] = {
        { "vCPU section", h->vcpu_offset, (uint64_t)h->nvcpus * SHIM_VCPU_BLOCK },
        { "attribute section", h->attr_offset, h->npages * sizeof(struct shim_page_attr) },
        { "page counters", h->page_ctr_offset, (uint64_t)h->nvcpus * h->npages * sizeof(struct shim_counters) },
        { "rings", h->ring_offset, (uint64_t)h->nvcpus * h->ring_entries * sizeof(struct shim_record) },
    };
    uint64_t free_from = SHIM_HEADER_BYTES;
    for (size_t i = 0; i < sizeof(sections) / sizeof(sections[0]); i++) {
        uint64_t off = sections[i].offset, bytes = sections[i].bytes;
        if (off % 4096 || off < free_from || off > h->region_size || bytes > h->region_size - off)
            return fail("region: the %s (%llu bytes at offset %llu) is not page aligned, overlaps the "
                        "section before it, or runs past the region's %llu bytes", sections[i].what,
                        (unsigned long long)bytes, (unsigned long long)off, (unsigned long long)h->region_size);
        free_from = off + bytes;
    }
    return 0;
}

static int check_header(const struct shim_header *h, uint64_t size, unsigned max_vcpus)
{
#define BAD(what, have, want) \
    return fail("region: " what " is %llu, expected %llu", (unsigned long long)(have), (unsigned long long)(want))
    if (h->magic != SHIM_MAGIC)
        return fail("region: bad magic (not a qemu-mktme shim region)");
    if (h->layout_version != SHIM_LAYOUT_VERSION)
        BAD("layout version", h->layout_version, SHIM_LAYOUT_VERSION);
    if (h->header_size != sizeof(struct shim_header))
        BAD("header size", h->header_size, sizeof(struct shim_header));
    if (h->record_size != sizeof(struct shim_record))
        BAD("record size", h->record_size, sizeof(struct shim_record));
    if (h->vcpu_block != SHIM_VCPU_BLOCK)
        BAD("vCPU block size", h->vcpu_block, SHIM_VCPU_BLOCK);
    if (h->nvcpus < max_vcpus)
        BAD("vCPU slot count", h->nvcpus, max_vcpus);
    if (h->ring_entries < 2 || (h->ring_entries & (h->ring_entries - 1)))
        return fail("region: ring size %u is not a power of two", h->ring_entries);
    if (!h->npages || h->npages > UINT32_MAX)
        return fail("region: page count %llu is out of range", (unsigned long long)h->npages);
    if (size < h->region_size) BAD("region size", size, h->region_size);
#undef BAD
    return check_sections(h);
}

/* Open and map the region (header checked); NULL after saying why not. */
static char *map_region(const struct options *o, unsigned max_vcpus)
{
    int fd = open(o->region, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        fail("cannot open region %s: %s", o->region, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) < 0 || (uint64_t)st.st_size != o->size) {
        close(fd);
        fail("region %s holds %llu bytes, size= says %llu", o->region,
             (unsigned long long)st.st_size, (unsigned long long)o->size);
        return NULL;
    }
    if (o->size < SHIM_HEADER_BYTES) {
        close(fd);
        fail("region %s is too small for a header (%llu bytes)", o->region, (unsigned long long)o->size);
        return NULL;
    }
    void *base = mmap(NULL, o->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        fail("cannot map region %s: %s", o->region, strerror(errno));
        return NULL;
    }
    if (check_header(base, o->size, max_vcpus)) {
        munmap(base, o->size);
        return NULL;
    }
    return base;
}

/* The per-vCPU state over the region's sections; -1, with nothing left allocated, when out of memory. */
static int setup_vcpus(char *base)
{
    if (nvcpus > MAX_VCPUS)
        return fail("%u vCPUs: the shim traces at most %u", nvcpus, MAX_VCPUS);
    vcpus = calloc(nvcpus, sizeof(*vcpus));
    if (!vcpus)
        return fail("out of memory");
    for (unsigned i = 0; i < nvcpus; i++) {
        struct vcpu_local *v = &vcpus[i];
        struct vcpu_block *b = (struct vcpu_block *)(base + hdr->vcpu_offset + (uint64_t)i * SHIM_VCPU_BLOCK);
        memset(b->tlb, 0, sizeof(b->tlb));
        b->s.verify_left = reset_verify();
        v->block = b;
        v->page_ctr = (struct shim_counters *)(base + hdr->page_ctr_offset) + (uint64_t)i * npages;
        set_generation(b, 1, decode_api);
        v->ring = (struct shim_record *)(base + hdr->ring_offset) + (uint64_t)i * hdr->ring_entries;
        v->head = b->s.head;
        v->seq = b->s.seq;
        vcpu_blocks[i] = b;
    }
    return 0;
}

/* What the shim is and how it runs, for Python to check (SharedRegion.check_attached). */
static void publish_install(const qemu_info_t *info, unsigned max_vcpus)
{
    hdr->shim_abi = MKTME_PLUGIN_ABI;
    hdr->qemu_api_min = (uint32_t)info->version.min;
    hdr->qemu_api_cur = (uint32_t)info->version.cur;
    hdr->max_vcpus = max_vcpus;
    hdr->phys_mode = phys_mode;
    hdr->sizeof_header = sizeof(struct shim_header);
    hdr->sizeof_vcpu = sizeof(struct shim_vcpu);
    hdr->sizeof_record = sizeof(struct shim_record);
    hdr->sizeof_page_attr = sizeof(struct shim_page_attr);
    hdr->sizeof_counters = sizeof(struct shim_counters);
    hdr->tlb_entries = tlb_on ? STLB_ENTRIES : 0;
    hdr->verify_period = verify_period;
    hdr->mode = mode;
    hdr->decode_api = decode_api;
    hdr->shim_pid = (uint64_t)getpid();
}

static int check_qemu(const struct options *o, const qemu_info_t *info)
{
    if (o->layout != SHIM_LAYOUT_VERSION)
        return fail("layout=%llu, but this shim speaks layout version %d",
                    (unsigned long long)o->layout, SHIM_LAYOUT_VERSION);
    if (!info->system_emulation || strcmp(info->target_name, "x86_64") != 0)
        return fail("needs qemu-system-x86_64, not %s%s", info->target_name,
                    info->system_emulation ? "" : " user-mode emulation");
    if (MKTME_PLUGIN_ABI < info->version.min || MKTME_PLUGIN_ABI > info->version.cur)
        return fail("built for plugin API %d, this QEMU speaks %d..%d",
                    MKTME_PLUGIN_ABI, info->version.min, info->version.cur);
    return 0;
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    struct options o = { .verify = 1024, .phys = PHYS_RAMADDR, .mode = MODE_ATTRIBUTE, .tlb = 1, .decode = 0 };

    if (parse_options(argc, argv, &o) || check_qemu(&o, info))
        return -1;
    unsigned max_vcpus = info->system.max_vcpus > 0 ? (unsigned)info->system.max_vcpus : 1;
    char *base = map_region(&o, max_vcpus);
    if (!base)
        return -1;
    hdr = (struct shim_header *)base;
    npages = hdr->npages;
    ring_mask = hdr->ring_entries - 1;
    tlb_on = o.tlb;
    verify_period = (uint32_t)o.verify;
    phys_mode = o.phys;
    mode = o.mode;
    decode_api = o.decode == 1;
    attrs = (struct shim_page_attr *)(base + hdr->attr_offset);
    nvcpus = max_vcpus;
    if (setup_vcpus(base)) {
        munmap(base, o.size);                    /* the mapping goes with the failed install */
        hdr = NULL;
        attrs = NULL;
        return -1;
    }
    publish_install(info, max_vcpus);
    if (mode != MODE_NONE)
        qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    __atomic_store_n(&hdr->shim_state, STATE_ATTACHED, __ATOMIC_RELEASE);
    return 0;
}
