/* SPDX-License-Identifier: GPL-2.0-or-later
 *
 * The bare-metal test guest of qemu-mktme: a few KiB of long-mode code that runs workloads given
 * on the kernel command line (separated by ';') and then reads more from COM1, one per line.
 * Every memory access a command makes is documented, so the tracer's counts can be checked
 * exactly: `fill` makes LEN/WIDTH stores of WIDTH bytes, `crc` makes LEN one-byte loads.
 *
 * Output lines: "ok <command> <results>" or "err <reason>", so tests match them with a regex.
 */
#include <stdint.h>
#include <stddef.h>

#define COM1 0x3F8
#define IMAGE_START 0x100000UL
#define IDENT_LIMIT (64UL << 30)   /* identity mapping built in boot.S */
#define VERSION "1"

extern char _image_end[];

/* Known place for the host to read guest state (the tick counter, last CRC). */
struct mailbox {
    uint64_t magic;
    uint64_t ticks;
    uint64_t last_crc;
    uint64_t commands;
} __attribute__((aligned(64)));
struct mailbox mailbox = { 0x786f626c69616d4bULL, 0, 0, 0 };   /* "Kmailbox" */

/* ---------------------------------------------------------------- port I/O and serial */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void serial_init(void)
{
    outb(COM1 + 1, 0x00);      /* no interrupts while configuring */
    outb(COM1 + 3, 0x80);      /* DLAB */
    outb(COM1 + 0, 0x01);      /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);      /* 8N1 */
    outb(COM1 + 2, 0x00);      /* no FIFO: enabling it would drop input that arrived before us */
    outb(COM1 + 4, 0x0B);      /* DTR, RTS, OUT2 (routes the IRQ) */
    outb(COM1 + 1, 0x01);      /* interrupt on received data */
}

static void putc_raw(char c)
{
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, (uint8_t)c);
}

static void putc(char c)
{
    if (c == '\n')
        putc_raw('\r');
    putc_raw(c);
}

static void puts(const char *s) { while (*s) putc(*s++); }

static void put_hex(uint64_t v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts(&buf[i]);
}

static void put_hex_fixed(uint64_t v, int digits)
{
    for (int s = (digits - 1) * 4; s >= 0; s -= 4)
        putc("0123456789abcdef"[(v >> s) & 15]);
}

static void put_dec(uint64_t v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(&buf[i]);
}

static int serial_ready(void) { return inb(COM1 + 5) & 1; }

/* Wait for a byte with the CPU halted (an idle guest costs the host nothing). */
static char getc_wait(void)
{
    __asm__ volatile("cli");
    while (!serial_ready())
        __asm__ volatile("sti; hlt; cli");
    __asm__ volatile("sti");
    return (char)inb(COM1);
}

/* ---------------------------------------------------------------- interrupts */

struct idt_entry {
    uint16_t off_lo, sel;
    uint8_t ist, type;
    uint16_t off_mid;
    uint32_t off_hi, zero;
} __attribute__((packed));

static struct idt_entry idt[48] __attribute__((aligned(16)));

struct trap_frame {
    uint64_t r11, r10, r9, r8, rdi, rsi, rdx, rcx, rax;
    uint64_t vector, error, rip, cs, rflags, rsp, ss;
};

void trap(struct trap_frame *f)
{
    if (f->vector >= 32) {
        if (f->vector >= 40)
            outb(0xA0, 0x20);
        outb(0x20, 0x20);
        return;
    }
    puts("\nerr fault vector=");
    put_dec(f->vector);
    puts(" error=");
    put_hex(f->error);
    puts(" rip=");
    put_hex(f->rip);
    if (f->vector == 14) {
        uint64_t cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        puts(" cr2=");
        put_hex(cr2);
    }
    puts("\n");
    for (;;)
        __asm__ volatile("cli; hlt");
}

#define ISR(n) extern void isr##n(void);
ISR(0) ISR(1) ISR(2) ISR(3) ISR(4) ISR(5) ISR(6) ISR(7) ISR(8) ISR(9) ISR(10) ISR(11) ISR(12)
ISR(13) ISR(14) ISR(15) ISR(16) ISR(17) ISR(18) ISR(19) ISR(32) ISR(33) ISR(34) ISR(35) ISR(36)
ISR(37) ISR(38) ISR(39) ISR(40) ISR(41) ISR(42) ISR(43) ISR(44) ISR(45) ISR(46) ISR(47)

static void (*const isrs[48])(void) = {
    isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7, isr8, isr9, isr10, isr11, isr12, isr13,
    isr14, isr15, isr16, isr17, isr18, isr19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    isr32, isr33, isr34, isr35, isr36, isr37, isr38, isr39, isr40, isr41, isr42, isr43,
    isr44, isr45, isr46, isr47,
};

static void interrupts_init(void)
{
    for (int v = 0; v < 48; v++) {
        uint64_t a = (uint64_t)isrs[v];
        if (!a)
            continue;
        idt[v] = (struct idt_entry){ (uint16_t)a, 0x08, 0, 0x8E, (uint16_t)(a >> 16), (uint32_t)(a >> 32), 0 };
    }
    struct { uint16_t limit; uint64_t base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" :: "m"(idtr));
    /* 8259 PICs: vectors 32..47, only the cascade and COM1 (IRQ 4) unmasked */
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 32);   outb(0xA1, 40);
    outb(0x21, 4);    outb(0xA1, 2);
    outb(0x21, 1);    outb(0xA1, 1);
    outb(0x21, 0xEB); outb(0xA1, 0xFF);
}

/* ---------------------------------------------------------------- memory map (multiboot) */

struct mb_info {
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
} __attribute__((packed));

struct mb_mmap {
    uint32_t size;
    uint64_t addr, len;
    uint32_t type;
} __attribute__((packed));

#define MAX_RANGES 16
static struct { uint64_t start, end; } ram[MAX_RANGES];
static int nram;

static void mmap_init(const struct mb_info *mbi)
{
    if (!(mbi->flags & (1 << 6)))
        return;
    uint64_t p = mbi->mmap_addr, end = p + mbi->mmap_length;
    while (p < end && nram < MAX_RANGES) {
        const struct mb_mmap *m = (const struct mb_mmap *)p;
        if (m->type == 1) {
            ram[nram].start = m->addr;
            ram[nram].end = m->addr + m->len;
            nram++;
        }
        p += m->size + 4;
    }
}

/* A range the guest may touch: inside one RAM range, clear of this image, below the mapping. */
static const char *check_range(uint64_t addr, uint64_t len)
{
    if (len == 0)
        return "empty range";
    if (addr + len < addr || addr + len > IDENT_LIMIT)
        return "beyond the identity mapping";
    if (addr < (uint64_t)_image_end && addr + len > IMAGE_START)
        return "overlaps the guest image";
    for (int i = 0; i < nram; i++)
        if (addr >= ram[i].start && addr + len <= ram[i].end)
            return 0;
    return "not RAM";
}

/* ---------------------------------------------------------------- workloads */

static uint32_t crc_table[256];

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* CRC-32 as zlib computes it; exactly one 1-byte load per byte of the range. */
static uint32_t crc32_range(uint64_t addr, uint64_t len)
{
    const volatile uint8_t *p = (const volatile uint8_t *)addr;
    uint32_t c = 0xFFFFFFFFU;
    for (uint64_t i = 0; i < len; i++)
        c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFU;
}

static void fill(uint64_t addr, uint64_t len, uint8_t byte, int width)
{
    uint64_t v = byte * 0x0101010101010101ULL;
    uint64_t n = len / (uint64_t)width;
    switch (width) {
    case 1: { volatile uint8_t *p = (volatile uint8_t *)addr; for (uint64_t i = 0; i < n; i++) p[i] = (uint8_t)v; break; }
    case 2: { volatile uint16_t *p = (volatile uint16_t *)addr; for (uint64_t i = 0; i < n; i++) p[i] = (uint16_t)v; break; }
    case 4: { volatile uint32_t *p = (volatile uint32_t *)addr; for (uint64_t i = 0; i < n; i++) p[i] = (uint32_t)v; break; }
    default: { volatile uint64_t *p = (volatile uint64_t *)addr; for (uint64_t i = 0; i < n; i++) p[i] = v; break; }
    }
}

static void busy(uint64_t n)
{
    for (volatile uint64_t i = 0; i < n; i++)
        ;
}

static void poweroff(void)
{
    outw(0x604, 0x2000);       /* ICH9 / PIIX ACPI PM1a_CNT: SLP_TYP S5 | SLP_EN */
    outw(0xB004, 0x2000);      /* older PIIX PM base */
}

/* ---------------------------------------------------------------- command language */

static int is_space(char c) { return c == ' ' || c == '\t'; }

static const char *skip_space(const char *s) { while (is_space(*s)) s++; return s; }

static int streq_word(const char *s, const char *w)
{
    while (*w && *s == *w) { s++; w++; }
    return !*w && (!*s || is_space(*s));
}

/* Parse a number: decimal or 0x-hex, optional K/M/G suffix. Returns the rest or 0 on error. */
static const char *parse_num(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    int digits = 0;
    s = skip_space(s);
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2;; s++, digits++) {
            char c = *s;
            int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 :
                    c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (d < 0) break;
            if (v >> 60) return 0;
            v = v << 4 | (uint64_t)d;
        }
    } else {
        for (;; s++, digits++) {
            if (*s < '0' || *s > '9') break;
            if (v > 0x1999999999999999ULL) return 0;
            v = v * 10 + (uint64_t)(*s - '0');
        }
    }
    if (!digits) return 0;
    if (*s == 'K' || *s == 'k') { v <<= 10; s++; }
    else if (*s == 'M' || *s == 'm') { v <<= 20; s++; }
    else if (*s == 'G' || *s == 'g') { v <<= 30; s++; }
    if (*s && !is_space(*s)) return 0;
    *out = v;
    return s;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 :
           c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static void err(const char *why) { puts("err "); puts(why); puts("\n"); }

static void ok_addr_len(const char *cmd, uint64_t addr, uint64_t len)
{
    puts("ok "); puts(cmd); puts(" "); put_hex(addr); puts(" "); put_dec(len);
}

static int halted;

/* ---------------------------------------------------------------- victims of the attack lab */

/* A PIN-protected secret, as the Linux `pin` workload: the wrong-PIN counter is a 32-bit word of
 * RAM at the address `pinset` names, loaded at the start of every `pin` and stored after it. */
static volatile uint32_t *pin_counter;
static uint64_t pin_secret;

static void cmd_pin(uint64_t guess)
{
    if (!pin_counter) return err("pinset first");
    uint32_t tries = *pin_counter;
    if (tries >= 3) { puts("ok pin locked "); put_dec(tries); puts("\n"); return; }
    if (guess == pin_secret) { *pin_counter = 0; puts("ok pin unlocked\n"); return; }
    *pin_counter = tries + 1;
    puts("ok pin wrong "); put_dec(tries + 1); puts("\n");
}

/* Secret-indexed table lookups, as a fixed-window exponentiation: the public table's entries are
 * stored one by one at ADDR (a 64-bit variable), then, for each W-bit window of BITS (a string
 * of 0 and 1), the entry it indexes; each store is followed by DELAY rounds of busy work. */
static uint64_t table_entry(uint64_t i) { return (i + 1) * 0x0101010101010101ULL ^ 0x5DEECE66DULL; }

static void cmd_table(uint64_t addr, const char *bits, uint64_t width, uint64_t delay)
{
    volatile uint64_t *var = (volatile uint64_t *)addr;
    uint64_t n = 0;
    for (uint64_t i = 0; i < (1ULL << width); i++) {
        *var = table_entry(i);
        busy(delay);
    }
    while (*bits == '0' || *bits == '1') {
        uint64_t w = 0;
        for (uint64_t j = 0; j < width; j++) {
            w = w << 1 | (uint64_t)(*bits == '1');
            if (*bits == '0' || *bits == '1') bits++;
        }
        *var = table_entry(w);
        n++;
        busy(delay);
    }
    puts("ok table "); put_dec(n); puts("\n");
}

static void cmd_help(void)
{
    puts("commands: echo TEXT | write ADDR TEXT | writehex ADDR HEX | fill ADDR LEN BYTE [WIDTH]\n"
         "          crc ADDR LEN | read ADDR LEN | loop N | ticks N [DELAY] | mem | halt | poweroff\n"
         "          pinset ADDR PIN | pin GUESS | table ADDR BITS WIDTH DELAY\n");
}

static void run_command(const char *s)
{
    uint64_t addr, len, val, width, delay;
    const char *why;
    s = skip_space(s);
    if (!*s)
        return;
    mailbox.commands++;
    if (streq_word(s, "help")) {
        cmd_help();
    } else if (streq_word(s, "echo")) {
        s = skip_space(s + 4);
        puts("ok echo "); puts(s); puts("\n");
    } else if (streq_word(s, "write")) {
        if (!(s = parse_num(s + 5, &addr)) || !*s) return err("usage: write ADDR TEXT");
        s++;                                   /* exactly one separator; the rest is data */
        for (len = 0; s[len]; len++)
            ;
        if ((why = check_range(addr, len))) return err(why);
        volatile uint8_t *p = (volatile uint8_t *)addr;
        for (uint64_t i = 0; i < len; i++)
            p[i] = (uint8_t)s[i];
        ok_addr_len("write", addr, len); puts("\n");
    } else if (streq_word(s, "writehex")) {
        if (!(s = parse_num(s + 8, &addr))) return err("usage: writehex ADDR HEX");
        s = skip_space(s);
        for (len = 0; hexval(s[2 * len]) >= 0 && hexval(s[2 * len + 1]) >= 0; len++)
            ;
        if (s[2 * len] && !is_space(s[2 * len])) return err("bad hex");
        if ((why = check_range(addr, len))) return err(why);
        volatile uint8_t *p = (volatile uint8_t *)addr;
        for (uint64_t i = 0; i < len; i++)
            p[i] = (uint8_t)(hexval(s[2 * i]) << 4 | hexval(s[2 * i + 1]));
        ok_addr_len("writehex", addr, len); puts("\n");
    } else if (streq_word(s, "fill")) {
        if (!(s = parse_num(s + 4, &addr)) || !(s = parse_num(s, &len)) || !(s = parse_num(s, &val)) || val > 255)
            return err("usage: fill ADDR LEN BYTE [WIDTH]");
        width = 1;
        if (*skip_space(s) && (!(s = parse_num(s, &width)) || (width != 1 && width != 2 && width != 4 && width != 8)))
            return err("WIDTH must be 1, 2, 4 or 8");
        if (len % width || addr % width) return err("ADDR and LEN must be multiples of WIDTH");
        if ((why = check_range(addr, len))) return err(why);
        fill(addr, len, (uint8_t)val, (int)width);
        ok_addr_len("fill", addr, len); puts(" "); put_hex(val); puts(" "); put_dec(width); puts("\n");
    } else if (streq_word(s, "crc")) {
        if (!(s = parse_num(s + 3, &addr)) || !(s = parse_num(s, &len))) return err("usage: crc ADDR LEN");
        if ((why = check_range(addr, len))) return err(why);
        uint32_t c = crc32_range(addr, len);
        mailbox.last_crc = c;
        ok_addr_len("crc32", addr, len); puts(" 0x"); put_hex_fixed(c, 8); puts("\n");
    } else if (streq_word(s, "read")) {
        if (!(s = parse_num(s + 4, &addr)) || !(s = parse_num(s, &len))) return err("usage: read ADDR LEN");
        if (len > 4096) return err("read at most 4096 bytes");
        if ((why = check_range(addr, len))) return err(why);
        ok_addr_len("read", addr, len); puts(" ");
        const volatile uint8_t *p = (const volatile uint8_t *)addr;
        for (uint64_t i = 0; i < len; i++)
            put_hex_fixed(p[i], 2);
        puts("\n");
    } else if (streq_word(s, "loop")) {
        if (!(s = parse_num(s + 4, &len))) return err("usage: loop N");
        uint64_t x = 88172645463325252ULL;
        for (uint64_t i = 0; i < len; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            __asm__ volatile("" : "+r"(x));
        }
        puts("ok loop "); put_dec(len); puts(" "); put_hex(x); puts("\n");
    } else if (streq_word(s, "ticks")) {
        uint64_t delay = 2000000;
        if (!(s = parse_num(s + 5, &len)) || (*skip_space(s) && !parse_num(s, &delay)))
            return err("usage: ticks N [DELAY]   (N = 0: until a key is pressed)");
        for (uint64_t i = 0; len == 0 || i < len; i++) {
            busy(delay);
            mailbox.ticks++;
            puts("tick "); put_dec(mailbox.ticks); puts("\n");
            if (len == 0 && serial_ready())
                break;
        }
        puts("ok ticks "); put_dec(mailbox.ticks); puts("\n");
    } else if (streq_word(s, "pinset")) {
        if (!(s = parse_num(s + 6, &addr)) || !parse_num(s, &val)) return err("usage: pinset ADDR PIN");
        if (addr % 4) return err("ADDR must be 4-byte aligned");
        if ((why = check_range(addr, 4))) return err(why);
        pin_counter = (volatile uint32_t *)addr;
        pin_secret = val;
        *pin_counter = 0;
        puts("ok pinset "); put_hex(addr); puts("\n");
    } else if (streq_word(s, "pin")) {
        if (!parse_num(s + 3, &val)) return err("usage: pin GUESS");
        cmd_pin(val);
    } else if (streq_word(s, "table")) {
        if (!(s = parse_num(s + 5, &addr))) return err("usage: table ADDR BITS WIDTH DELAY");
        s = skip_space(s);
        const char *bits = s;
        while (*s == '0' || *s == '1') s++;
        if (s == bits || !(s = parse_num(s, &width)) || !parse_num(s, &delay) || width < 1 || width > 4)
            return err("usage: table ADDR BITS WIDTH DELAY (BITS of 0 and 1, WIDTH 1..4)");
        if (addr % 8) return err("ADDR must be 8-byte aligned");
        if ((why = check_range(addr, 8))) return err(why);
        cmd_table(addr, bits, width, delay);
    } else if (streq_word(s, "mem")) {
        for (int i = 0; i < nram; i++) {
            puts("ok mem "); put_hex(ram[i].start); puts(" "); put_hex(ram[i].end); puts("\n");
        }
    } else if (streq_word(s, "halt")) {
        puts("ok halt\n");
        halted = 1;
    } else if (streq_word(s, "poweroff")) {
        puts("ok poweroff\n");
        poweroff();
        busy(500000000);       /* QEMU acts on the request asynchronously */
        err("poweroff did not happen");
    } else {
        err("unknown command (try help)");
    }
}

/* Run ';'-separated commands from a writable copy of the command line. */
static void run_line(char *line)
{
    for (char *s = line; !halted;) {
        char *e = s;
        while (*e && *e != ';')
            e++;
        char saved = *e;
        *e = 0;
        run_command(s);
        if (!saved)
            break;
        s = e + 1;
    }
}

static char linebuf[4096];

static void repl(void)
{
    for (;;) {
        size_t n = 0;
        puts("mktme> ");
        for (;;) {
            char c = getc_wait();
            if (c == '\r' || c == '\n') {
                puts("\n");
                break;
            }
            if (c == 0x7F || c == '\b') {
                if (n) { n--; puts("\b \b"); }
                continue;
            }
            if (n + 1 < sizeof(linebuf)) {
                linebuf[n++] = c;
                putc(c);
            }
        }
        linebuf[n] = 0;
        run_line(linebuf);
        if (halted)
            return;
    }
}

void kmain(uint32_t mbi_addr)
{
    const struct mb_info *mbi = (const struct mb_info *)(uint64_t)mbi_addr;
    serial_init();
    interrupts_init();
    crc_init();
    mmap_init(mbi);
    puts("\nmktme-baremetal " VERSION " ready mailbox=");
    put_hex((uint64_t)&mailbox);
    puts(" image_end=");
    put_hex((uint64_t)_image_end);
    puts("\n");
    if (mbi->flags & (1 << 2)) {
        /* QEMU passes "<kernel path> <append>": skip the path */
        const char *c = (const char *)(uint64_t)mbi->cmdline;
        while (*c && !is_space(*c)) c++;
        c = skip_space(c);
        size_t n = 0;
        while (c[n] && n + 1 < sizeof(linebuf)) { linebuf[n] = c[n]; n++; }
        linebuf[n] = 0;
        run_line(linebuf);
    }
    if (!halted)
        repl();
    for (;;)
        __asm__ volatile("cli; hlt");
}
