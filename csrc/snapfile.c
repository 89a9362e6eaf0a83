/*
** snapfile.c - a snapshot's file form: snap:save(path),
** kvm.load_snapshot(path), snap.meta, and the CPU check a restore makes
** (snap_check_cpu). snapshot.h says what a snapshot holds.
**
** The file format, version 1. Every integer is little-endian; CRC32C is
** the Castagnoli CRC (iSCSI, ext4: crc32c("123456789") = 0xe3069283).
**
**   header (96 bytes)
**     0   8  magic "LKVMSNAP"
**     8   4  format version: 1 (another is refused: nothing is converted)
**    12   4  header length: 96
**    16   4  flags: 0 (a set bit is refused)
**    20   4  CRC32C of the 96 header bytes, these 4 taken as zeroes
**    24   8  file length, the END section included
**    32   4  sections before END
**    36   4  0
**    40  12  the saving host's CPU vendor (KVM's CPUID leaf 0: "AuthenticAMD")
**    52  44  the saving host's KVM_GET_SUPPORTED_CPUID feature words, in the
**            order of cpu_words below: 1 ECX, 1 EDX, 7.0 EBX, 7.0 ECX,
**            7.0 EDX, 7.1 EAX, 0xd.0 EAX, 0xd.0 EDX, 0xd.1 EAX,
**            0x80000001 ECX, 0x80000001 EDX (what that host could give a
**            guest; told in a refusal, not checked: see snap_check_cpu)
**   sections, one after the other, each a 64-byte header and its payload
**     0   4  kind: 1 VM, 2 vCPU, 3 device (a part: SNAP_VM...), 16 memory,
**            17 meta, 255 END
**     4   4  id (a part's; END: the number of sections before it; else 0)
**     8  32  name, NUL-terminated (a device's kind; "" for the others)
**    40   8  addr (a device's; else 0)
**    48   8  payload length
**    56   4  CRC32C of the payload
**    60   4  CRC32C of this header's first 60 bytes
**   the parts come first in the snapshot's order, then the meta section
**   (when snap.meta is set), then one memory section per region, then END,
**   which ends the file. A part's payload is its bytes (snapshot.h); a VM's
**   and a vCPU's are checked to be whole records. A memory section's:
**     0   4  slot
**     4   4  flags (KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY)
**     8   8  guest address (a multiple of 4096)
**    16   8  size (a multiple of 4096, at most 2^46; guest + size <= 2^52)
**    24   8  pages stored: P, the bitmap's population count
**    32  8W  bitmap, W = ceil(size / 4096 / 64) words: bit i of word j says
**            page 64j + i is stored (it is not all zeroes); bits past the
**            last page are 0
**    ..  4096P  the stored pages in address order; the others are zeroes
**
** A reader trusts nothing: every length is checked against the bytes left
** in the file before anything is read or allocated for it, so a short file
** is "truncated at section N" and a huge length cannot allocate more than
** the file holds (a part or meta at most 64 MiB); each header and payload
** has its CRC checked; the bitmap's count must match the payload's length
** exactly. Loading streams: section by section, pages read in place into
** the snapshot's memory copy (preadv), never the whole file into a string.
** Saving writes PATH.tmp, fsyncs it, renames it to PATH and fsyncs the
** folder, so PATH is the old file or the whole new one, never a part.
**
** Model: Firecracker's versioned snapshot state with a CRC (its memory is a
** separate file, mmap'd: here it is one file, sparse in its own way, since
** a test VM's memory is mostly zeroes), QEMU's refusal of a migration
** stream whose CPU features the destination lacks.
*/

/***
@classmod kvm.snapshot
*/
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#include "snapshot.h"

#define SF_MAGIC      "LKVMSNAP"
#define SF_VERSION    1u
#define SF_HDR_LEN    96u
#define SF_SEC_LEN    64u
#define SF_MEM_HEAD   32u
#define SF_MAX_PART   (64u << 20)          /* a part's or meta's payload */
#define SF_MAX_MEM    (1ull << 46)         /* a region (as vm:memory allows) */
#define SF_MAX_GPA    (1ull << 52)
#define SF_MAX_PARTS  (1u << 20)           /* as snap_add_part takes */
#define SF_MAX_SECTIONS (SF_MAX_PARTS + KVM_MAX_REGIONS + 1)
#define SF_NWORDS     11

enum { SF_S_MEMORY = 16, SF_S_META = 17, SF_S_END = 255 };

/* ---- CRC32C ---- */

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;
static int crc_hw;

static void crc_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
    crc_table[i] = c;
  }
#if defined(__x86_64__)
  crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc_update_hw(uint32_t crc, const uint8_t *p, size_t n) {
  uint64_t c = crc;
  while (n > 0 && ((uintptr_t)p & 7)) { c = _mm_crc32_u8((uint32_t)c, *p++); n--; }
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
  }
  while (n-- > 0) c = _mm_crc32_u8((uint32_t)c, *p++);
  return (uint32_t)c;
}
#endif

/* the running CRC (start with 0xffffffff, end with ~) */
static uint32_t crc_update(uint32_t crc, const void *data, size_t n) {
  const uint8_t *p = data;
  pthread_once(&crc_once, crc_init);
#if defined(__x86_64__)
  if (crc_hw) return crc_update_hw(crc, p, n);
#endif
  while (n-- > 0) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return crc;
}

static uint32_t crc32c(const void *data, size_t n) {
  return ~crc_update(0xffffffffu, data, n);
}

/* ---- little-endian fields ---- */

static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) {
  return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* ---- the CPU ---- */

/* the feature words a snapshot's vCPUs are checked on, and the bits of
   each that are not checked:
   - 1 ECX 27 OSXSAVE and 7.0 ECX 4 OSPKE mirror the guest's CR4 (KVM sets
     them as the guest runs), so a saved CPUID has them and a supported one
     never does;
   - 1 ECX 31, the hypervisor bit: a VMM sets it (kvm.cpuid.guest), and any
     host with KVM is a hypervisor;
   - 1 ECX 24 TSC-deadline: hardware KVM reports it as a capability
     (KVM_CAP_TSC_DEADLINE_TIMER, it emulates the timer), not in its
     supported CPUID; that capability is checked instead;
   - 1 EDX 28 HTT: topology a VMM sets (kvm.cpuid.topology), not a feature.
   Every other bit a vCPU's CPUID sets must be in this host's
   KVM_GET_SUPPORTED_CPUID, even one the saving host lacked too: KVM vouches
   only for what it reports, and a guest told of a feature uses it. The APIC
   id (1 EBX) and the topology leaves are not feature words. */
static const struct {
  uint32_t func, index;
  int reg;                       /* 0 eax, 1 ebx, 2 ecx, 3 edx */
  uint32_t ignore;
} cpu_words[SF_NWORDS] = {
  {1, 0, 2, 1u << 27 | 1u << 31 | 1u << 24},
  {1, 0, 3, 1u << 28},
  {7, 0, 1, 0},
  {7, 0, 2, 1u << 4},
  {7, 0, 3, 0},
  {7, 1, 0, 0},
  {0xd, 0, 0, 0},
  {0xd, 0, 3, 0},
  {0xd, 1, 0, 0},
  {0x80000001, 0, 2, 0},
  {0x80000001, 0, 3, 0},
};

/* names for the bits a message may name (Linux's /proc/cpuinfo names) */
static const struct { int word, bit; const char *name; } cpu_names[] = {
  {0, 0, "sse3"}, {0, 1, "pclmulqdq"}, {0, 3, "monitor"}, {0, 5, "vmx"}, {0, 9, "ssse3"},
  {0, 12, "fma"}, {0, 13, "cx16"}, {0, 17, "pcid"}, {0, 19, "sse4_1"}, {0, 20, "sse4_2"},
  {0, 21, "x2apic"}, {0, 22, "movbe"}, {0, 23, "popcnt"}, {0, 24, "tsc_deadline_timer"},
  {0, 25, "aes"}, {0, 26, "xsave"}, {0, 28, "avx"}, {0, 29, "f16c"}, {0, 30, "rdrand"},
  {1, 0, "fpu"}, {1, 4, "tsc"}, {1, 5, "msr"}, {1, 6, "pae"}, {1, 8, "cx8"}, {1, 9, "apic"},
  {1, 11, "sep"}, {1, 12, "mtrr"}, {1, 13, "pge"}, {1, 15, "cmov"}, {1, 16, "pat"},
  {1, 19, "clflush"}, {1, 23, "mmx"}, {1, 24, "fxsr"}, {1, 25, "sse"}, {1, 26, "sse2"},
  {2, 0, "fsgsbase"}, {2, 3, "bmi1"}, {2, 4, "hle"}, {2, 5, "avx2"}, {2, 7, "smep"},
  {2, 8, "bmi2"}, {2, 9, "erms"}, {2, 10, "invpcid"}, {2, 11, "rtm"}, {2, 16, "avx512f"},
  {2, 18, "rdseed"}, {2, 19, "adx"}, {2, 20, "smap"}, {2, 23, "clflushopt"}, {2, 24, "clwb"},
  {2, 29, "sha_ni"}, {3, 1, "avx512vbmi"}, {3, 2, "umip"}, {3, 3, "pku"}, {3, 9, "vaes"},
  {3, 10, "vpclmulqdq"}, {3, 16, "la57"}, {3, 22, "rdpid"}, {4, 10, "md_clear"},
  {4, 26, "spec_ctrl"}, {4, 29, "arch_capabilities"}, {4, 31, "ssbd"}, {5, 4, "avx_vnni"},
  {5, 5, "avx512_bf16"}, {6, 2, "xcr0 avx"}, {6, 5, "xcr0 opmask"}, {6, 6, "xcr0 zmm_hi256"},
  {6, 7, "xcr0 hi16_zmm"}, {6, 9, "xcr0 pkru"}, {6, 17, "xcr0 xtilecfg"},
  {6, 18, "xcr0 xtiledata"}, {8, 0, "xsaveopt"}, {8, 1, "xsavec"}, {8, 2, "xgetbv1"},
  {8, 3, "xsaves"}, {9, 0, "lahf_lm"}, {9, 2, "svm"}, {9, 5, "abm"}, {9, 6, "sse4a"},
  {9, 8, "3dnowprefetch"}, {10, 11, "syscall"}, {10, 20, "nx"}, {10, 26, "pdpe1gb"},
  {10, 27, "rdtscp"}, {10, 29, "lm"},
};

static uint32_t cpuid_reg(const struct kvm_cpuid_entry2 *e, int reg) {
  return reg == 0 ? e->eax : reg == 1 ? e->ebx : reg == 2 ? e->ecx : e->edx;
}

static const struct kvm_cpuid_entry2 *cpuid_find(const struct kvm_cpuid_entry2 *e, size_t n,
                                                 uint32_t func, uint32_t index) {
  for (size_t i = 0; i < n; i++)
    if (e[i].function == func && e[i].index == index) return &e[i];
  return NULL;
}

/* this host's KVM_GET_SUPPORTED_CPUID: malloc'd entries in *out, their
   count in *n; -1 with errno */
static int supported_cpuid(int kvm_fd, struct kvm_cpuid_entry2 **out, size_t *n) {
  for (uint32_t cap = 128; cap <= 4096; cap *= 2) {
    size_t sz = sizeof(struct kvm_cpuid2) + (size_t)cap * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = calloc(1, sz);
    if (c == NULL) { errno = ENOMEM; return -1; }
    c->nent = cap;
    if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, c) == 0) {
      *n = c->nent;
      *out = malloc(c->nent * sizeof(struct kvm_cpuid_entry2) + 1);
      if (*out == NULL) { free(c); errno = ENOMEM; return -1; }
      memcpy(*out, c->entries, c->nent * sizeof(struct kvm_cpuid_entry2));
      free(c);
      return 0;
    }
    int en = errno;
    free(c);
    if (en != E2BIG) { errno = en; return -1; }
  }
  errno = E2BIG;
  return -1;
}

/* the host's vendor and feature words from its supported CPUID */
static void host_words(const struct kvm_cpuid_entry2 *e, size_t n, char vendor[12],
                       uint32_t words[SF_NWORDS]) {
  const struct kvm_cpuid_entry2 *l0 = cpuid_find(e, n, 0, 0);
  memset(vendor, 0, 12);
  if (l0) { memcpy(vendor, &l0->ebx, 4); memcpy(vendor + 4, &l0->edx, 4); memcpy(vendor + 8, &l0->ecx, 4); }
  for (int w = 0; w < SF_NWORDS; w++) {
    const struct kvm_cpuid_entry2 *x = cpuid_find(e, n, cpu_words[w].func, cpu_words[w].index);
    words[w] = x ? cpuid_reg(x, cpu_words[w].reg) : 0;
  }
}

/* append to err (at most errlen bytes, NUL-terminated) */
static void errcat(char *err, size_t errlen, const char *fmt, ...) {
  size_t used = strlen(err);
  if (used + 1 >= errlen) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err + used, errlen - used, fmt, ap);
  va_end(ap);
}

static const char *const reg_names[] = {"EAX", "EBX", "ECX", "EDX"};

/* the bits of one vCPU's CPUID (entries e, n) that this host lacks, named
   into err; 0 when there are none */
static int missing_bits(const struct kvm_cpuid_entry2 *e, size_t n, const uint32_t host[SF_NWORDS],
                        int tsc_deadline, char *err, size_t errlen) {
  int found = 0;
  for (int w = 0; w < SF_NWORDS; w++) {
    const struct kvm_cpuid_entry2 *x = cpuid_find(e, n, cpu_words[w].func, cpu_words[w].index);
    if (x == NULL) continue;
    uint32_t need = cpuid_reg(x, cpu_words[w].reg) & ~cpu_words[w].ignore;
    uint32_t miss = need & ~host[w];
    if (w == 0 && (cpuid_reg(x, 2) & 1u << 24) && !(host[0] & 1u << 24) && !tsc_deadline)
      miss |= 1u << 24;
    for (int b = 0; b < 32; b++) {
      if (!(miss & 1u << b)) continue;
      const char *name = NULL;
      for (size_t k = 0; k < sizeof cpu_names / sizeof cpu_names[0]; k++)
        if (cpu_names[k].word == w && cpu_names[k].bit == b) name = cpu_names[k].name;
      errcat(err, errlen, "%sCPUID 0x%x.%u %s bit %d%s%s%s", found ? ", " : "",
             (unsigned)cpu_words[w].func, (unsigned)cpu_words[w].index, reg_names[cpu_words[w].reg], b,
             name ? " (" : "", name ? name : "", name ? ")" : "");
      found = 1;
    }
  }
  return found;
}

int snap_check_cpu(const Snapshot *s, int kvm_fd, char *err, size_t errlen) {
  struct kvm_cpuid_entry2 *host = NULL;
  size_t nhost = 0;
  if (supported_cpuid(kvm_fd, &host, &nhost) != 0) {
    int en = errno;
    snprintf(err, errlen, "KVM_GET_SUPPORTED_CPUID: %s", strerror(en));
    errno = en;
    return -1;
  }
  char vendor[12];
  uint32_t words[SF_NWORDS];
  host_words(host, nhost, vendor, words);
  free(host);
  int tsc_deadline = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_TSC_DEADLINE_TIMER) > 0;
  for (int i = 0; i < s->nparts; i++) {
    const SnapPart *p = &s->parts[i];
    if (p->kind != SNAP_VCPU) continue;
    SnapRd r = {p->data, p->len, 0, 0};
    uint32_t tag, len;
    const uint8_t *d;
    int got;
    while ((got = snaprd_record(&r, &tag, &d, &len)) == 1) {
      if (tag != SNAP_R_CPUID) continue;
      size_t n = len / sizeof(struct kvm_cpuid_entry2);
      /* the record's bytes may be unaligned: copy them */
      struct kvm_cpuid_entry2 *e = malloc(n * sizeof *e + 1);
      if (e == NULL) {
        snprintf(err, errlen, "out of memory");
        errno = ENOMEM;
        return -1;
      }
      memcpy(e, d, n * sizeof *e);
      snprintf(err, errlen, "vCPU %u needs CPU features this host's KVM lacks: ", (unsigned)p->id);
      int miss = missing_bits(e, n, words, tsc_deadline, err, errlen);
      free(e);
      if (miss) { errno = ENOTSUP; return -1; }
    }
    if (got < 0) {
      snprintf(err, errlen, "vCPU %u: its state's records run past its end", (unsigned)p->id);
      errno = EINVAL;
      return -1;
    }
  }
  if (errlen) err[0] = '\0';
  return 0;
}

/* ---- writing ---- */

/* writes gathered into iovecs: small pieces copied into stage, large ones
   (parts, pages) pointed at where they are */
typedef struct Wr {
  int fd;
  struct iovec iov[IOV_MAX];
  int n;
  uint8_t stage[1 << 16];
  size_t staged;
  int err;                       /* errno of the first failure */
} Wr;

static void wr_flush(Wr *w) {
  int i = 0;
  while (!w->err && i < w->n) {
    ssize_t got = writev(w->fd, w->iov + i, w->n - i);
    if (got < 0) {
      if (errno == EINTR) continue;
      w->err = errno;
      break;
    }
    if (got == 0) { w->err = EIO; break; }
    size_t left = (size_t)got;
    while (i < w->n && left >= w->iov[i].iov_len) left -= w->iov[i++].iov_len;
    if (i < w->n) {
      w->iov[i].iov_base = (uint8_t *)w->iov[i].iov_base + left;
      w->iov[i].iov_len -= left;
    }
  }
  w->n = 0;
  w->staged = 0;
}

/* p stays valid until the save ends */
static void wr_ref(Wr *w, const void *p, size_t len) {
  while (len > 0) {
    /* one iovec at most 1 GiB: writev's total must fit in an ssize_t */
    size_t take = len < (1u << 30) ? len : (1u << 30);
    if (w->n == IOV_MAX) wr_flush(w);
    if (w->err) return;
    w->iov[w->n].iov_base = (void *)(uintptr_t)p;
    w->iov[w->n++].iov_len = take;
    p = (const uint8_t *)p + take;
    len -= take;
  }
}

/* p is copied (a header built on the stack) */
static void wr_copy(Wr *w, const void *p, size_t len) {
  if (len > sizeof w->stage) { w->err = EINVAL; return; }
  if (sizeof w->stage - w->staged < len || w->n == IOV_MAX) wr_flush(w);
  if (w->err) return;
  uint8_t *dst = w->stage + w->staged;
  memcpy(dst, p, len);
  w->staged += len;
  if (w->n > 0 && (uint8_t *)w->iov[w->n - 1].iov_base + w->iov[w->n - 1].iov_len == dst)
    w->iov[w->n - 1].iov_len += len;
  else
    wr_ref(w, dst, len);
}

static void sec_header(uint8_t h[SF_SEC_LEN], uint32_t kind, uint32_t id, const char *name,
                       uint64_t addr, uint64_t len, uint32_t crc) {
  memset(h, 0, SF_SEC_LEN);
  put32(h, kind);
  put32(h + 4, id);
  if (name) {
    size_t nl = strnlen(name, 31);
    memcpy(h + 8, name, nl);
  }
  put64(h + 40, addr);
  put64(h + 48, len);
  put32(h + 56, crc);
  put32(h + 60, crc32c(h, 60));
}

static uint64_t mem_words(const SnapMem *m) { return (m->size / SNAP_PAGE + 63) / 64; }

/* the last bitmap word, without bits past the last page */
static uint64_t mem_last_word(const SnapMem *m) {
  uint64_t pages = m->size / SNAP_PAGE, w = m->nonzero[mem_words(m) - 1];
  return pages % 64 ? w & ((1ull << (pages % 64)) - 1) : w;
}

static uint64_t mem_stored(const SnapMem *m) {
  uint64_t n = 0, words = mem_words(m);
  for (uint64_t i = 0; i + 1 < words; i++) n += (uint64_t)__builtin_popcountll(m->nonzero[i]);
  return n + (uint64_t)__builtin_popcountll(mem_last_word(m));
}

/* call fn(ctx, p, len) on each run of stored pages of m, in order */
static void mem_runs(const SnapMem *m, void (*fn)(void *, const uint8_t *, size_t), void *ctx) {
  uint64_t pages = m->size / SNAP_PAGE, i = 0;
  while (i < pages) {
    if (!(m->nonzero[i / 64] >> (i % 64) & 1)) {
      if (m->nonzero[i / 64] >> (i % 64) == 0) i = (i / 64 + 1) * 64;   /* the rest of the word */
      else i++;
      continue;
    }
    uint64_t j = i + 1;
    while (j < pages && (m->nonzero[j / 64] >> (j % 64) & 1)) j++;
    fn(ctx, m->pages + i * SNAP_PAGE, (size_t)((j - i) * SNAP_PAGE));
    i = j;
  }
}

static void run_crc(void *ctx, const uint8_t *p, size_t len) {
  uint32_t *crc = ctx;
  *crc = crc_update(*crc, p, len);
}

static void run_write(void *ctx, const uint8_t *p, size_t len) { wr_ref(ctx, p, len); }

/* the memory section's head (slot, flags, guest, size, pages stored) */
static void mem_head(const SnapMem *m, uint8_t h[SF_MEM_HEAD]) {
  put32(h, m->slot);
  put32(h + 4, m->flags);
  put64(h + 8, m->guest);
  put64(h + 16, m->size);
  put64(h + 24, mem_stored(m));
}

static uint64_t mem_payload(const SnapMem *m) {
  return SF_MEM_HEAD + mem_words(m) * 8 + mem_stored(m) * SNAP_PAGE;
}

/* the bitmap, little-endian words (the host's order: x86-64 only) */
static void mem_write_bitmap(Wr *w, const SnapMem *m, const uint64_t *last) {
  uint64_t words = mem_words(m);
  if (words > 1) wr_ref(w, m->nonzero, (size_t)(words - 1) * 8);
  wr_copy(w, last, 8);
}

/* the CRC of a memory section's payload (its pages read, not copied) */
static uint32_t mem_crc(const SnapMem *m, const uint8_t head[SF_MEM_HEAD], const uint64_t *last) {
  uint32_t crc = crc_update(0xffffffffu, head, SF_MEM_HEAD);
  uint64_t words = mem_words(m);
  if (words > 1) crc = crc_update(crc, m->nonzero, (size_t)(words - 1) * 8);
  crc = crc_update(crc, last, 8);
  mem_runs(m, run_crc, &crc);
  return ~crc;
}

/* write s to fd; 0, or an errno with err set */
static int save_fd(const Snapshot *s, int fd, const char vendor[12], const uint32_t words[SF_NWORDS],
                   char *err, size_t errlen) {
  Wr *w = malloc(sizeof *w);
  if (w == NULL) { snprintf(err, errlen, "out of memory"); return ENOMEM; }
  w->fd = fd;
  w->n = 0;
  w->staged = 0;
  w->err = 0;
  uint32_t sections = (uint32_t)s->nparts + (uint32_t)s->nmem + (s->meta != NULL);
  uint64_t total = SF_HDR_LEN + (uint64_t)(sections + 1) * SF_SEC_LEN;
  for (int i = 0; i < s->nparts; i++) total += s->parts[i].len;
  if (s->meta) total += s->metalen;
  for (int i = 0; i < s->nmem; i++) total += mem_payload(&s->mem[i]);

  uint8_t h[SF_HDR_LEN];
  memset(h, 0, sizeof h);
  static const uint8_t magic[8] = {'L', 'K', 'V', 'M', 'S', 'N', 'A', 'P'};
  memcpy(h, magic, sizeof magic);
  put32(h + 8, SF_VERSION);
  put32(h + 12, SF_HDR_LEN);
  put64(h + 24, total);
  put32(h + 32, sections);
  memcpy(h + 40, vendor, 12);
  for (size_t i = 0; i < SF_NWORDS; i++) put32(h + 52 + 4 * i, words[i]);
  put32(h + 20, crc32c(h, sizeof h));
  wr_copy(w, h, sizeof h);

  uint8_t sh[SF_SEC_LEN];
  for (int i = 0; i < s->nparts; i++) {
    const SnapPart *p = &s->parts[i];
    sec_header(sh, p->kind, p->id, p->name, p->addr, p->len, crc32c(p->data, p->len));
    wr_copy(w, sh, sizeof sh);
    wr_ref(w, p->data, p->len);
  }
  if (s->meta) {
    sec_header(sh, SF_S_META, 0, "", 0, s->metalen, crc32c(s->meta, s->metalen));
    wr_copy(w, sh, sizeof sh);
    wr_ref(w, s->meta, s->metalen);
  }
  for (int i = 0; i < s->nmem; i++) {
    const SnapMem *m = &s->mem[i];
    uint8_t mh[SF_MEM_HEAD];
    mem_head(m, mh);
    uint64_t last = mem_last_word(m);
    sec_header(sh, SF_S_MEMORY, 0, "", 0, mem_payload(m), mem_crc(m, mh, &last));
    wr_copy(w, sh, sizeof sh);
    wr_copy(w, mh, sizeof mh);
    mem_write_bitmap(w, m, &last);
    mem_runs(m, run_write, w);
  }
  sec_header(sh, SF_S_END, sections, "", 0, 0, crc32c("", 0));
  wr_copy(w, sh, sizeof sh);
  wr_flush(w);
  int en = w->err;
  free(w);
  if (en) snprintf(err, errlen, "write: %s", strerror(en));
  return en;
}

/* ---- reading ---- */

typedef struct Ld {
  int fd;
  uint64_t off, size;            /* where we are; the file's size (fstat) */
  char *err;
  size_t errlen;
} Ld;

static int ld_fail(Ld *ld, int en, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(ld->err, ld->errlen, fmt, ap);
  va_end(ap);
  return en;
}

/* read exactly the iovecs at ld->off: 0, or an errno (EIO for a short file,
   which the checks against ld->size make unexpected: it shrank) */
static int ld_readv(Ld *ld, struct iovec *iov, int n) {
  int i = 0;
  while (i < n) {
    ssize_t got = preadv(ld->fd, iov + i, n - i, (off_t)ld->off);
    if (got < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (got == 0) return EIO;
    ld->off += (uint64_t)got;
    size_t left = (size_t)got;
    while (i < n && left >= iov[i].iov_len) left -= iov[i++].iov_len;
    if (i < n) {
      iov[i].iov_base = (uint8_t *)iov[i].iov_base + left;
      iov[i].iov_len -= left;
    }
  }
  return 0;
}

static int ld_read(Ld *ld, void *dst, size_t n) {
  struct iovec v = {dst, n};
  return n ? ld_readv(ld, &v, 1) : 0;
}

/* the description of a section for messages: "vcpu 0", "device 'uart' 2" */
static void sec_desc(char *d, size_t dl, uint32_t kind, uint32_t id, const char *name) {
  switch (kind) {
  case SNAP_VM: snprintf(d, dl, "vm"); break;
  case SNAP_VCPU: snprintf(d, dl, "vcpu %u", (unsigned)id); break;
  case SNAP_DEVICE: snprintf(d, dl, "device '%s' %u", name, (unsigned)id); break;
  case SF_S_MEMORY: snprintf(d, dl, "memory"); break;
  case SF_S_META: snprintf(d, dl, "meta"); break;
  case SF_S_END: snprintf(d, dl, "END"); break;
  default: snprintf(d, dl, "kind %u", (unsigned)kind); break;
  }
}

/* a VM's or vCPU's payload: whole records; a vCPU's CPUID whole entries */
static int check_records(const uint8_t *p, size_t n, uint32_t kind) {
  SnapRd r = {p, n, 0, 0};
  uint32_t tag, len;
  const uint8_t *d;
  int got;
  while ((got = snaprd_record(&r, &tag, &d, &len)) == 1)
    if (kind == SNAP_VCPU && tag == SNAP_R_CPUID && len % sizeof(struct kvm_cpuid_entry2)) return -1;
  return got;
}

/* a memory section of len bytes, at ld->off (past its header) */
static int load_mem(Ld *ld, Snapshot *s, int k, uint64_t len, uint32_t want_crc) {
  uint8_t mh[SF_MEM_HEAD];
  if (len < SF_MEM_HEAD)
    return ld_fail(ld, EINVAL, "section %d (memory): %llu bytes, less than its %u-byte head", k,
                   (unsigned long long)len, SF_MEM_HEAD);
  int en = ld_read(ld, mh, sizeof mh);
  if (en) return ld_fail(ld, en, "section %d (memory): read: %s", k, strerror(en));
  uint32_t slot = get32(mh), flags = get32(mh + 4);
  uint64_t guest = get64(mh + 8), size = get64(mh + 16), stored = get64(mh + 24), end;
  if (slot >= KVM_MAX_REGIONS)
    return ld_fail(ld, EINVAL, "section %d (memory): slot %u (0..%d)", k, (unsigned)slot,
                   KVM_MAX_REGIONS - 1);
  for (int i = 0; i < s->nmem; i++)
    if (s->mem[i].slot == slot)
      return ld_fail(ld, EINVAL, "section %d (memory slot %u): a second region in that slot", k,
                     (unsigned)slot);
  if (flags & ~(uint32_t)(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY))
    return ld_fail(ld, EINVAL, "section %d (memory slot %u): unknown flags 0x%x", k, (unsigned)slot,
                   (unsigned)flags);
  if (size == 0 || size > SF_MAX_MEM || (size | guest) % SNAP_PAGE ||
      __builtin_add_overflow(guest, size, &end) || end > SF_MAX_GPA)
    return ld_fail(ld, EINVAL, "section %d (memory slot %u): a region of 0x%llx bytes at 0x%llx "
                   "(page-aligned, at most 2^46 bytes, below 2^52)", k, (unsigned)slot,
                   (unsigned long long)size, (unsigned long long)guest);
  for (int i = 0; i < s->nmem; i++)
    if (guest < s->mem[i].guest + s->mem[i].size && s->mem[i].guest < end)
      return ld_fail(ld, EINVAL, "section %d (memory slot %u): overlaps slot %u", k, (unsigned)slot,
                     (unsigned)s->mem[i].slot);
  uint64_t pages = size / SNAP_PAGE, words = (pages + 63) / 64;
  if (words * 8 > len - SF_MEM_HEAD || stored > pages ||
      stored * SNAP_PAGE != len - SF_MEM_HEAD - words * 8)
    return ld_fail(ld, EINVAL, "section %d (memory slot %u): %llu bytes do not hold a %llu-page "
                   "bitmap and %llu pages", k, (unsigned)slot, (unsigned long long)len,
                   (unsigned long long)pages, (unsigned long long)stored);
  SnapMem *m = snap_add_mem(s, slot, flags, guest, size);
  if (m == NULL)
    return ld_fail(ld, ENOMEM, "section %d (memory slot %u): out of memory for %llu bytes", k,
                   (unsigned)slot, (unsigned long long)size);
  en = ld_read(ld, m->nonzero, (size_t)words * 8);
  if (en) return ld_fail(ld, en, "section %d (memory slot %u): read: %s", k, (unsigned)slot, strerror(en));
  uint64_t count = 0;
  for (uint64_t i = 0; i < words; i++) count += (uint64_t)__builtin_popcountll(m->nonzero[i]);
  if (pages % 64 && m->nonzero[words - 1] >> (pages % 64))
    return ld_fail(ld, EINVAL, "section %d (memory slot %u): its bitmap marks pages past the "
                   "region's end", k, (unsigned)slot);
  if (count != stored)
    return ld_fail(ld, EINVAL, "section %d (memory slot %u): its bitmap has %llu pages, its head "
                   "says %llu", k, (unsigned)slot, (unsigned long long)count,
                   (unsigned long long)stored);
  uint32_t crc = crc_update(0xffffffffu, mh, sizeof mh);
  crc = crc_update(crc, m->nonzero, (size_t)words * 8);
  /* the pages, read in place: runs of stored pages, IOV_MAX runs a read;
     preadv moves its iovecs along, so the CRC goes over a copy of them */
  struct iovec *iov = malloc(2 * sizeof(struct iovec) * IOV_MAX);
  if (iov == NULL) return ld_fail(ld, ENOMEM, "out of memory");
  struct iovec *runs = iov + IOV_MAX;
  uint64_t i = 0;
  int n = 0;
  while (!en) {
    while (i < pages && !(m->nonzero[i / 64] >> (i % 64) & 1))
      i = (m->nonzero[i / 64] >> (i % 64)) == 0 ? (i / 64 + 1) * 64 : i + 1;
    if (i < pages) {
      uint64_t j = i + 1;
      while (j < pages && j - i < (1u << 18) && (m->nonzero[j / 64] >> (j % 64) & 1)) j++;
      runs[n].iov_base = m->pages + i * SNAP_PAGE;
      runs[n++].iov_len = (size_t)((j - i) * SNAP_PAGE);
      i = j;
    }
    if (n > 0 && (n == IOV_MAX || i >= pages)) {
      memcpy(iov, runs, sizeof(struct iovec) * (size_t)n);
      en = ld_readv(ld, iov, n);
      for (int v = 0; !en && v < n; v++) crc = crc_update(crc, runs[v].iov_base, runs[v].iov_len);
      n = 0;
    }
    if (i >= pages) break;
  }
  free(iov);
  if (en) return ld_fail(ld, en, "section %d (memory slot %u): read: %s", k, (unsigned)slot, strerror(en));
  if (~crc != want_crc)
    return ld_fail(ld, EINVAL, "bad checksum in section %d (memory slot %u)", k, (unsigned)slot);
  return 0;
}

/* the sections at ld->off into s; 0, or an errno with the message set */
static int load_sections(Ld *ld, Snapshot *s, const uint8_t *hdr) {
  uint64_t file_len = get64(hdr + 24);
  uint32_t sections = get32(hdr + 32);
  if (sections > SF_MAX_SECTIONS)
    return ld_fail(ld, EINVAL, "%u sections, more than a snapshot has (%u)", (unsigned)sections,
                   (unsigned)SF_MAX_SECTIONS);
  for (uint32_t k = 1;; k++) {
    uint8_t h[SF_SEC_LEN];
    char desc[64];
    if (ld->size - ld->off < SF_SEC_LEN) {
      if (ld->size < file_len)
        return ld_fail(ld, EINVAL, "truncated at section %u (%llu of %llu bytes)", (unsigned)k,
                       (unsigned long long)ld->size, (unsigned long long)file_len);
      return ld_fail(ld, EINVAL, "no END section: the file ends at section %u", (unsigned)k);
    }
    int en = ld_read(ld, h, sizeof h);
    if (en) return ld_fail(ld, en, "section %u: read: %s", (unsigned)k, strerror(en));
    if (crc32c(h, 60) != get32(h + 60))
      return ld_fail(ld, EINVAL, "bad checksum in the header of section %u", (unsigned)k);
    uint32_t kind = get32(h), id = get32(h + 4), crc = get32(h + 56);
    uint64_t addr = get64(h + 40), len = get64(h + 48);
    char name[32];
    memcpy(name, h + 8, sizeof name);
    if (memchr(name, 0, sizeof name) == NULL)
      return ld_fail(ld, EINVAL, "section %u: its name is not NUL-terminated", (unsigned)k);
    sec_desc(desc, sizeof desc, kind, id, name);
    if (len > ld->size - ld->off) {
      if (ld->size < file_len)
        return ld_fail(ld, EINVAL, "truncated at section %u (%s): %llu bytes, %llu left in the file",
                       (unsigned)k, desc, (unsigned long long)len,
                       (unsigned long long)(ld->size - ld->off));
      return ld_fail(ld, EINVAL, "section %u (%s): %llu bytes, %llu left in the file", (unsigned)k,
                     desc, (unsigned long long)len, (unsigned long long)(ld->size - ld->off));
    }
    if (kind == SF_S_END) {
      if (len != 0)
        return ld_fail(ld, EINVAL, "section %u (END): %llu bytes of payload, it has none",
                       (unsigned)k, (unsigned long long)len);
      if (id != k - 1)
        return ld_fail(ld, EINVAL, "section %u (END): it counts %u sections before it, there were %u",
                       (unsigned)k, (unsigned)id, (unsigned)(k - 1));
      if (k - 1 != sections)
        return ld_fail(ld, EINVAL, "section %u (END): the header says there are %u sections, there "
                       "were %u", (unsigned)k, (unsigned)sections, (unsigned)(k - 1));
      if (ld->off != ld->size)
        return ld_fail(ld, EINVAL, "%llu bytes after the END section",
                       (unsigned long long)(ld->size - ld->off));
      if (ld->size != file_len)
        return ld_fail(ld, EINVAL, "the header says the file has %llu bytes, it has %llu",
                       (unsigned long long)file_len, (unsigned long long)ld->size);
      return 0;
    }
    if (k > sections)
      return ld_fail(ld, EINVAL, "section %u (%s): the header says there are %u", (unsigned)k, desc,
                     (unsigned)sections);
    if (kind == SF_S_MEMORY) {
      if (id || addr || name[0])
        return ld_fail(ld, EINVAL, "section %u (memory): id, name and addr must be 0", (unsigned)k);
      en = load_mem(ld, s, (int)k, len, crc);
      if (en) return en;
      continue;
    }
    if (kind != SNAP_VM && kind != SNAP_VCPU && kind != SNAP_DEVICE && kind != SF_S_META)
      return ld_fail(ld, EINVAL, "section %u: unknown kind %u", (unsigned)k, (unsigned)kind);
    if (kind == SF_S_META && s->meta)
      return ld_fail(ld, EINVAL, "section %u: a second meta section", (unsigned)k);
    if (kind != SNAP_DEVICE && (name[0] || addr || (kind == SF_S_META && id)))
      return ld_fail(ld, EINVAL, "section %u (%s): only a device has a name and an address",
                     (unsigned)k, desc);
    if (len > SF_MAX_PART)
      return ld_fail(ld, EINVAL, "section %u (%s): %llu bytes, more than a part holds (%u MiB)",
                     (unsigned)k, desc, (unsigned long long)len, SF_MAX_PART >> 20);
    uint8_t *data = malloc((size_t)len + 1);
    if (data == NULL) return ld_fail(ld, ENOMEM, "section %u (%s): out of memory", (unsigned)k, desc);
    en = ld_read(ld, data, (size_t)len);
    if (en) { free(data); return ld_fail(ld, en, "section %u (%s): read: %s", (unsigned)k, desc, strerror(en)); }
    if (crc32c(data, (size_t)len) != crc) {
      free(data);
      return ld_fail(ld, EINVAL, "bad checksum in section %u (%s)", (unsigned)k, desc);
    }
    if ((kind == SNAP_VM || kind == SNAP_VCPU) && check_records(data, (size_t)len, kind) != 0) {
      free(data);
      return ld_fail(ld, EINVAL, "section %u (%s): its records run past its end", (unsigned)k, desc);
    }
    if (kind == SF_S_META) {
      s->meta = (char *)data;
      s->metalen = (size_t)len;
      continue;
    }
    if ((unsigned)s->nparts >= SF_MAX_PARTS) {
      free(data);
      return ld_fail(ld, EINVAL, "section %u (%s): more than %u parts", (unsigned)k, desc,
                     (unsigned)SF_MAX_PARTS);
    }
    if (snap_add_part(s, kind, id, name, addr, data, (size_t)len) == NULL)
      return ld_fail(ld, ENOMEM, "section %u (%s): out of memory", (unsigned)k, desc);
  }
}

/* fd's snapshot into s, checked against this host's CPU: 0, or an errno
   with err set */
static int load_fd(int fd, Snapshot *s, char *err, size_t errlen) {
  Ld ld = {fd, 0, 0, err, errlen};
  struct stat st;
  if (fstat(fd, &st) != 0) return ld_fail(&ld, errno, "fstat: %s", strerror(errno));
  if (S_ISDIR(st.st_mode)) return ld_fail(&ld, EISDIR, "%s", strerror(EISDIR));
  if (!S_ISREG(st.st_mode)) return ld_fail(&ld, EINVAL, "not a regular file");
  ld.size = (uint64_t)st.st_size;
  uint8_t h[SF_HDR_LEN];
  memset(h, 0, sizeof h);
  if (ld.size == 0) return ld_fail(&ld, EINVAL, "empty");
  int en = ld_read(&ld, h, ld.size < SF_HDR_LEN ? (size_t)ld.size : SF_HDR_LEN);
  if (en) return ld_fail(&ld, en, "read: %s", strerror(en));
  if (ld.size < 8 || memcmp(h, SF_MAGIC, 8) != 0)
    return ld_fail(&ld, EINVAL, "not a luakvm snapshot (no \"" SF_MAGIC "\" at its start)");
  if (ld.size < 12)
    return ld_fail(&ld, EINVAL, "truncated in its header (%llu bytes of %u)",
                   (unsigned long long)ld.size, SF_HDR_LEN);
  uint32_t version = get32(h + 8), hlen = get32(h + 12);
  if (version != SF_VERSION)
    return ld_fail(&ld, EINVAL, "format version %u, this luakvm reads %u", (unsigned)version, SF_VERSION);
  if (ld.size < SF_HDR_LEN)
    return ld_fail(&ld, EINVAL, "truncated in its header (%llu bytes of %u)",
                   (unsigned long long)ld.size, SF_HDR_LEN);
  uint32_t want = get32(h + 20);
  put32(h + 20, 0);
  if (crc32c(h, sizeof h) != want) return ld_fail(&ld, EINVAL, "bad checksum in the header");
  if (hlen != SF_HDR_LEN)
    return ld_fail(&ld, EINVAL, "a header of %u bytes, version 1's has %u", (unsigned)hlen, SF_HDR_LEN);
  if (get32(h + 16) != 0)
    return ld_fail(&ld, EINVAL, "unknown flags 0x%x", (unsigned)get32(h + 16));
  en = load_sections(&ld, s, h);
  if (en) return en;

  /* the CPU: the same vendor, and every feature the vCPUs were given */
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) {
    en = errno;
    return ld_fail(&ld, en, "cannot check its CPU features: open /dev/kvm: %s", strerror(en));
  }
  struct kvm_cpuid_entry2 *e = NULL;
  size_t n = 0;
  if (supported_cpuid(kvm, &e, &n) != 0) {
    en = errno;
    close(kvm);
    return ld_fail(&ld, en, "cannot check its CPU features: KVM_GET_SUPPORTED_CPUID: %s", strerror(en));
  }
  char vendor[13] = "", saved[13] = "";
  uint32_t words[SF_NWORDS];
  host_words(e, n, vendor, words);
  free(e);
  memcpy(saved, h + 40, 12);
  if (memcmp(vendor, saved, 12) != 0) {
    close(kvm);
    return ld_fail(&ld, ENOTSUP, "saved on a host whose CPU is \"%s\", this one's is \"%s\": a "
                   "guest does not move between CPU vendors", saved, vendor);
  }
  char cpu[200];
  if (snap_check_cpu(s, kvm, cpu, sizeof cpu) != 0) {
    en = errno;
    close(kvm);
    return ld_fail(&ld, en, "%s", cpu);
  }
  close(kvm);
  return 0;
}

int snap_load_fd(lua_State *L, int fd, const char *name) {
  char err[320];
  err[0] = '\0';
  Snapshot *s = snap_push(L);
  int en = load_fd(fd, s, err, sizeof err);
  if (en == 0) return 1;
  /* free what was read now, not at the next GC (a memory copy can be GiBs) */
  luaL_callmeta(L, -1, "__gc");
  lua_pop(L, 1);
  luaL_pushfail(L);
  lua_pushfstring(L, "snapshot file %s: %s", name, err);
  lua_pushinteger(L, en);
  return 3;
}

/***
Load a snapshot from a file `snap:save` wrote, in this process or another.
The file is checked whole before anything is returned: its format version,
every section's length and checksum, and that this host's CPU (its KVM's
supported CPUID) has every feature the saved vCPUs' CPUID gives them.
@function kvm.load_snapshot
@tparam string path
@treturn kvm.snapshot
@return[2] fail, "snapshot file PATH: why" (truncated, corrupt, another
format version, another CPU vendor, a CPU feature this host lacks, no
/dev/kvm to check it with), errno (EINVAL for a bad file, ENOTSUP for the
CPU, or the system call's)
@usage local snap = assert(kvm.load_snapshot("vm.snap")); vm:restore(snap)
*/
int l_load_snapshot(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  /* O_NONBLOCK: a FIFO must not wait for a writer (it is refused: not a
     regular file); reads of a regular file do not care */
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    int en = errno;
    luaL_pushfail(L);
    lua_pushfstring(L, "snapshot file %s: %s", path, strerror(en));
    lua_pushinteger(L, en);
    return 3;
  }
  /* a Lua error here (out of memory) must not leak fd: the load makes
     only C calls until it pushes its result */
  int n = snap_load_fd(L, fd, path);
  close(fd);
  return n;
}

/* the folder path is in, for its fsync after the rename ("." for none) */
static int open_dir_of(const char *path) {
  const char *slash = strrchr(path, '/');
  if (slash == NULL) return open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (slash == path) return open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  size_t n = (size_t)(slash - path);
  char *dir = malloc(n + 1);
  if (dir == NULL) { errno = ENOMEM; return -1; }
  memcpy(dir, path, n);
  dir[n] = '\0';
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int en = errno;
  free(dir);
  errno = en;
  return fd;
}

/* save s to path through tmp; 0, or an errno with err set */
static int save_path(const Snapshot *s, const char *path, const char *tmp, char *err, size_t errlen) {
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) {
    int en = errno;
    snprintf(err, errlen, "open /dev/kvm (for the host's CPUID): %s", strerror(en));
    return en;
  }
  struct kvm_cpuid_entry2 *e = NULL;
  size_t n = 0;
  int rc = supported_cpuid(kvm, &e, &n);
  int en = errno;
  close(kvm);
  if (rc != 0) {
    snprintf(err, errlen, "KVM_GET_SUPPORTED_CPUID: %s", strerror(en));
    return en;
  }
  char vendor[12];
  uint32_t words[SF_NWORDS];
  host_words(e, n, vendor, words);
  free(e);

  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd < 0) {
    en = errno;
    snprintf(err, errlen, "open %s: %s", tmp, strerror(en));
    return en;
  }
  en = save_fd(s, fd, vendor, words, err, errlen);
  if (!en && fsync(fd) != 0) {
    en = errno;
    snprintf(err, errlen, "fsync %s: %s", tmp, strerror(en));
  }
  if (close(fd) != 0 && !en) {
    en = errno;
    snprintf(err, errlen, "close %s: %s", tmp, strerror(en));
  }
  if (!en && rename(tmp, path) != 0) {
    en = errno;
    snprintf(err, errlen, "rename %s to %s: %s", tmp, path, strerror(en));
  }
  if (en) {
    unlink(tmp);
    return en;
  }
  /* the rename itself on disk: the folder's fsync (a failure here leaves
     the whole file in place; it is reported) */
  int dir = open_dir_of(path);
  if (dir < 0 || (fsync(dir) != 0 && errno != EINVAL)) {
    en = errno;
    snprintf(err, errlen, "fsync of %s's folder: %s", path, strerror(en));
  }
  if (dir >= 0) close(dir);
  return en;
}

/***
Write the snapshot to a file (the format: csrc/snapfile.c, README's
"Snapshot files"): to PATH.tmp first, fsync'd and renamed over PATH, so a
crash leaves the old file or the new one whole, never a part. Memory pages
that are all zeroes are not written. Reads /dev/kvm's supported CPUID for
the file's header.
@function save
@tparam string path
@treturn true
@return[2] fail, "snapshot file PATH: why", errno
@usage assert(vm:snapshot()):save("vm.snap")
*/
int l_snap_save(lua_State *L) {
  const Snapshot *s = snap_check(L, 1);
  const char *path = luaL_checkstring(L, 2);
  const char *tmp = lua_pushfstring(L, "%s.tmp", path);
  char err[320];
  int en = save_path(s, path, tmp, err, sizeof err);
  if (en == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  luaL_pushfail(L);
  lua_pushfstring(L, "snapshot file %s: %s", path, err);
  lua_pushinteger(L, en);
  return 3;
}

/***
The user's string kept with the snapshot and in its file (nil until set):
`snap.meta = "booted, before the test"`; any other field is a method.
@field meta
*/
static int l_snap_index(lua_State *L) {
  const Snapshot *s = snap_check(L, 1);
  if (lua_type(L, 2) == LUA_TSTRING && strcmp(lua_tostring(L, 2), "meta") == 0) {
    if (s->meta) lua_pushlstring(L, s->meta, s->metalen);
    else lua_pushnil(L);
    return 1;
  }
  if (luaL_getmetafield(L, 1, "methods") == LUA_TNIL) return 0;
  lua_pushvalue(L, 2);
  lua_rawget(L, -2);
  return 1;
}

static int l_snap_newindex(lua_State *L) {
  Snapshot *s = snap_check(L, 1);
  if (lua_type(L, 2) != LUA_TSTRING || strcmp(lua_tostring(L, 2), "meta") != 0)
    return luaL_error(L, "kvm.snapshot: no field '%s' to set (only 'meta')", luaL_tolstring(L, 2, NULL));
  if (!lua_isnil(L, 3) && lua_type(L, 3) != LUA_TSTRING)
    return luaL_error(L, "kvm.snapshot: meta must be a string or nil, not a %s", luaL_typename(L, 3));
  char *copy = NULL;
  size_t len = 0;
  if (!lua_isnil(L, 3)) {
    const char *v = lua_tolstring(L, 3, &len);
    if (len > SF_MAX_PART)
      return luaL_error(L, "kvm.snapshot: meta of %d bytes, at most %d", (int)(len > INT_MAX ? INT_MAX : len),
                        (int)SF_MAX_PART);
    copy = malloc(len + 1);
    if (copy == NULL) return luaL_error(L, "not enough memory");
    memcpy(copy, v, len);
    copy[len] = '\0';
  }
  free(s->meta);
  s->meta = copy;
  s->metalen = len;
  return 0;
}

static const luaL_Reg snapfile_methods[] = {
  {"save", l_snap_save},
  {NULL, NULL}
};

void kvm_open_snapfile(lua_State *L) {
  luaL_getmetatable(L, SNAPSHOT_MT);
  /* the class's methods move under "methods": __index is a function now */
  if (lua_getfield(L, -1, "__index") == LUA_TTABLE) lua_setfield(L, -2, "methods");
  else lua_pop(L, 1);
  if (lua_getfield(L, -1, "methods") != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "methods");
  }
  luaL_setfuncs(L, snapfile_methods, 0);
  lua_pop(L, 1);
  lua_pushcfunction(L, l_snap_index);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_snap_newindex);
  lua_setfield(L, -2, "__newindex");
  lua_pop(L, 1);
}
