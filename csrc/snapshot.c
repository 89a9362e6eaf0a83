/*
** snapshot.c - kvm.snapshot: vm:snapshot() and vm:restore(snap).
** See snapshot.h for what a snapshot holds; snapfile.c keeps it in a file.
*/

/***
A VM's saved state, made by `vm:snapshot()`.
@classmod kvm.snapshot
*/
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "snapshot.h"

/* ---- buffers ---- */

void snapbuf_put(SnapBuf *b, const void *p, size_t n) {
  if (b->oom || n == 0) return;
  if (b->cap - b->n < n) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->n < n) {
      if (cap > SIZE_MAX / 2) { b->oom = 1; return; }
      cap *= 2;
    }
    uint8_t *q = realloc(b->p, cap);
    if (q == NULL) { b->oom = 1; return; }
    b->p = q;
    b->cap = cap;
  }
  memcpy(b->p + b->n, p, n);
  b->n += n;
}

void snapbuf_u32(SnapBuf *b, uint32_t v) { snapbuf_put(b, &v, 4); }
void snapbuf_u64(SnapBuf *b, uint64_t v) { snapbuf_put(b, &v, 8); }

void snapbuf_record(SnapBuf *b, uint32_t tag, const void *p, uint32_t len) {
  snapbuf_u32(b, tag);
  snapbuf_u32(b, len);
  snapbuf_put(b, p, len);
}

void snaprd_get(SnapRd *r, void *dst, size_t n) {
  if (r->bad || r->n - r->off < n) {
    r->bad = 1;
    memset(dst, 0, n);
    return;
  }
  memcpy(dst, r->p + r->off, n);
  r->off += n;
}

uint32_t snaprd_u32(SnapRd *r) { uint32_t v; snaprd_get(r, &v, 4); return v; }
uint64_t snaprd_u64(SnapRd *r) { uint64_t v; snaprd_get(r, &v, 8); return v; }

int snaprd_record(SnapRd *r, uint32_t *tag, const uint8_t **p, uint32_t *len) {
  if (r->bad) return -1;
  if (r->off == r->n) return 0;
  *tag = snaprd_u32(r);
  *len = snaprd_u32(r);
  if (r->bad || r->n - r->off < *len) { r->bad = 1; return -1; }
  *p = r->p + r->off;
  r->off += *len;
  return 1;
}

/* ---- the snapshot object ---- */

/* 64-bit words of a bitmap with a bit per page of size bytes (at least one) */
static size_t bitmap_words(uint64_t size) {
  size_t w = (size_t)((size / SNAP_PAGE + 63) / 64);
  return w ? w : 1;
}

static uint64_t next_id = 1;

Snapshot *snap_push(lua_State *L) {
  Snapshot *s = lua_newuserdatauv(L, sizeof(Snapshot), 0);
  memset(s, 0, sizeof *s);
  s->id = __atomic_fetch_add(&next_id, 1, __ATOMIC_RELAXED);
  luaL_setmetatable(L, SNAPSHOT_MT);
  return s;
}

SnapPart *snap_add_part(Snapshot *s, uint32_t kind, uint32_t id, const char *name, uint64_t addr,
                        uint8_t *data, size_t len) {
  if (s->nparts >= 1 << 20) { free(data); return NULL; }
  SnapPart *np = realloc(s->parts, sizeof(SnapPart) * (size_t)(s->nparts + 1));
  if (np == NULL) { free(data); return NULL; }
  s->parts = np;
  SnapPart *p = &s->parts[s->nparts++];
  memset(p, 0, sizeof *p);
  p->kind = kind;
  p->id = id;
  if (name) {
    strncpy(p->name, name, sizeof p->name - 1);
  }
  p->addr = addr;
  p->data = data;
  p->len = len;
  return p;
}

SnapMem *snap_add_mem(Snapshot *s, uint32_t slot, uint32_t flags, uint64_t guest, uint64_t size) {
  if (s->nmem >= KVM_MAX_REGIONS || size == 0 || size % SNAP_PAGE) return NULL;
  size_t words = bitmap_words(size);
  uint64_t *nz = calloc(words, 8);
  if (nz == NULL) return NULL;
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) { free(nz); return NULL; }
  SnapMem *m = &s->mem[s->nmem++];
  m->slot = slot;
  m->flags = flags;
  m->guest = guest;
  m->size = size;
  m->pages = p;
  m->nonzero = nz;
  return m;
}

static void snap_free(Snapshot *s) {
  for (int i = 0; i < s->nparts; i++) free(s->parts[i].data);
  free(s->parts);
  s->parts = NULL;
  s->nparts = 0;
  for (int i = 0; i < s->nmem; i++) {
    munmap(s->mem[i].pages, s->mem[i].size);
    free(s->mem[i].nonzero);
  }
  s->nmem = 0;
  free(s->meta);
  s->meta = NULL;
}

Snapshot *snap_check(lua_State *L, int arg) {
  return (Snapshot *)luaL_checkudata(L, arg, SNAPSHOT_MT);
}

static int l_snap_gc(lua_State *L) {
  snap_free(snap_check(L, 1));
  return 0;
}

/* ---- taking one ---- */

/* add b's bytes as a part (the snapshot owns them, or they are freed) */
static int add_part(Snapshot *s, uint32_t kind, uint32_t id, const char *name, uint64_t addr,
                    SnapBuf *b) {
  uint8_t *p = b->p;
  b->p = NULL;
  if (b->oom) { free(p); return -1; }
  return snap_add_part(s, kind, id, name, addr, p, b->n) ? 0 : -1;
}

/* the MSRs KVM saves and restores (KVM_GET_MSR_INDEX_LIST), once per process */
#define MAX_MSRS 1024
static uint32_t msr_list[MAX_MSRS];
static uint32_t msr_count;
static int msr_known;
static pthread_mutex_t msr_lock = PTHREAD_MUTEX_INITIALIZER;

static int get_msr_list(int kvm_fd) {
  int r = 0;
  pthread_mutex_lock(&msr_lock);
  if (!msr_known) {
    static uint32_t buf[MAX_MSRS + 1];   /* a kvm_msr_list: nmsrs, then the indices */
    struct kvm_msr_list *l = (struct kvm_msr_list *)(void *)buf;
    memset(buf, 0, sizeof buf);
    l->nmsrs = MAX_MSRS;
    if (ioctl(kvm_fd, KVM_GET_MSR_INDEX_LIST, l) < 0) {
      r = -1;                    /* E2BIG: more than MAX_MSRS, never seen */
    } else {
      msr_count = l->nmsrs;
      memcpy(msr_list, l->indices, 4 * (size_t)msr_count);
      msr_known = 1;
    }
  }
  pthread_mutex_unlock(&msr_lock);
  return r;
}

/* bytes of KVM_GET_XSAVE2's buffer (KVM_CAP_XSAVE2), 4096 for KVM_GET_XSAVE,
   0 without XSAVE (then KVM_GET_FPU) */
static size_t xsave_size(Vm *vm) {
  static size_t known;           /* the same for every VM of the process */
  size_t n = __atomic_load_n(&known, __ATOMIC_RELAXED);
  if (n) return n - 1;
  int x2 = ioctl(vm->fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
  if (x2 > (int)sizeof(struct kvm_xsave)) n = (size_t)x2;
  else n = ioctl(vm->fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE) > 0 ? sizeof(struct kvm_xsave) : 0;
  __atomic_store_n(&known, n + 1, __ATOMIC_RELAXED);
  return n;
}

/* KVM_CHECK_EXTENSION of a capability every VM of the process shares */
static int has_cap(Vm *vm, int cap, int *known) {
  int k = __atomic_load_n(known, __ATOMIC_RELAXED);
  if (k == 0) {
    k = ioctl(vm->fd, KVM_CHECK_EXTENSION, cap) > 0 ? 1 : 2;
    __atomic_store_n(known, k, __ATOMIC_RELAXED);
  }
  return k == 1;
}
static int cap_xcrs, cap_debugregs;

/* A vCPU that left KVM_RUN for port or MMIO I/O finishes that access on its
   next KVM_RUN: with immediate_exit KVM does only that and returns EINTR
   (the KVM API document's way to sync a vCPU before saving its state). */
static int settle(Vcpu *c) {
  uint32_t why = c->run->exit_reason;
  if (c->seq == 0 || (why != KVM_EXIT_IO && why != KVM_EXIT_MMIO)) return 0;   /* nothing pending */
  c->run->immediate_exit = 1;
  int r = ioctl(c->fd, KVM_RUN, 0);
  int en = errno;
  c->run->immediate_exit = 0;
  if (r < 0 && en != EINTR && en != EAGAIN) { errno = en; return -1; }
  c->seq++;                      /* the access is done: an Exit held can no longer reply */
  c->run->exit_reason = KVM_EXIT_INTR;
  return 0;
}

/* ioctl into a record; the name of what failed in *what */
#define GETREC(req, tag, var, name)                                      \
  do {                                                                   \
    if (ioctl(c->fd, req, &(var)) < 0) { *what = name; goto fail; }      \
    snapbuf_record(b, tag, &(var), (uint32_t)sizeof(var));               \
  } while (0)

static int save_vcpu(Vcpu *c, SnapBuf *b, size_t xsz, const char **what) {
  Vm *vm = c->vm;
  struct kvm_mp_state mp;
  struct kvm_regs regs;
  struct kvm_sregs sregs;
  struct kvm_xcrs xcrs;
  struct kvm_debugregs dregs;
  struct kvm_lapic_state lapic;
  struct kvm_vcpu_events ev;
  void *buf = NULL;
  *what = "KVM_RUN (to finish an access)";
  if (settle(c) < 0) return -1;
  GETREC(KVM_GET_MP_STATE, SNAP_R_MP_STATE, mp, "KVM_GET_MP_STATE");
  GETREC(KVM_GET_REGS, SNAP_R_REGS, regs, "KVM_GET_REGS");
  GETREC(KVM_GET_SREGS, SNAP_R_SREGS, sregs, "KVM_GET_SREGS");
  if (xsz) {
    buf = calloc(1, xsz);
    *what = "out of memory";
    if (buf == NULL) goto fail;
    *what = xsz > sizeof(struct kvm_xsave) ? "KVM_GET_XSAVE2" : "KVM_GET_XSAVE";
    if (ioctl(c->fd, xsz > sizeof(struct kvm_xsave) ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, buf) < 0)
      goto fail;
    snapbuf_record(b, SNAP_R_XSAVE, buf, (uint32_t)xsz);
    free(buf);
    buf = NULL;
  } else {
    struct kvm_fpu fpu;
    GETREC(KVM_GET_FPU, SNAP_R_FPU, fpu, "KVM_GET_FPU");
  }
  if (has_cap(vm, KVM_CAP_XCRS, &cap_xcrs))
    GETREC(KVM_GET_XCRS, SNAP_R_XCRS, xcrs, "KVM_GET_XCRS");
  if (has_cap(vm, KVM_CAP_DEBUGREGS, &cap_debugregs))
    GETREC(KVM_GET_DEBUGREGS, SNAP_R_DEBUGREGS, dregs, "KVM_GET_DEBUGREGS");
  if (vm->has_irqchip) GETREC(KVM_GET_LAPIC, SNAP_R_LAPIC, lapic, "KVM_GET_LAPIC");
  GETREC(KVM_GET_VCPU_EVENTS, SNAP_R_EVENTS, ev, "KVM_GET_VCPU_EVENTS");

  /* MSRs: KVM_GET_MSRS stops at the first it cannot read; skip that one */
  *what = "KVM_GET_MSR_INDEX_LIST";
  if (get_msr_list(vm->kvm_fd) < 0) goto fail;
  struct kvm_msrs *ms = calloc(1, sizeof *ms + sizeof(struct kvm_msr_entry) * (msr_count + 1));
  *what = "out of memory";
  if (ms == NULL) goto fail;
  buf = ms;
  uint32_t done = 0, kept = 0;
  SnapBuf mb = {0};
  while (done < msr_count) {
    uint32_t n = msr_count - done;
    ms->nmsrs = n;
    for (uint32_t i = 0; i < n; i++) {
      ms->entries[i].index = msr_list[done + i];
      ms->entries[i].data = 0;
    }
    int got = ioctl(c->fd, KVM_GET_MSRS, ms);
    if (got < 0) { *what = "KVM_GET_MSRS"; free(mb.p); goto fail; }
    for (int i = 0; i < got; i++) {
      snapbuf_u32(&mb, ms->entries[i].index);
      snapbuf_u32(&mb, 0);
      snapbuf_u64(&mb, ms->entries[i].data);
      kept++;
    }
    done += (uint32_t)got + 1;   /* the one at `got` could not be read */
  }
  snapbuf_record(b, SNAP_R_MSRS, mb.p, (uint32_t)mb.n);
  free(mb.p);
  if (mb.oom) { *what = "out of memory"; goto fail; }
  free(buf);
  buf = NULL;

  /* the CPUID the guest sees */
  struct kvm_cpuid2 *cp = calloc(1, sizeof *cp + sizeof(struct kvm_cpuid_entry2) * 256);
  *what = "out of memory";
  if (cp == NULL) goto fail;
  buf = cp;
  cp->nent = 256;
  *what = "KVM_GET_CPUID2";
  if (ioctl(c->fd, KVM_GET_CPUID2, cp) < 0) goto fail;
  snapbuf_record(b, SNAP_R_CPUID, cp->entries, (uint32_t)(sizeof(struct kvm_cpuid_entry2) * cp->nent));
  free(buf);
  buf = NULL;
  int khz = ioctl(c->fd, KVM_GET_TSC_KHZ, 0);
  if (khz > 0) {
    uint32_t k = (uint32_t)khz;
    snapbuf_record(b, SNAP_R_TSC_KHZ, &k, 4);
  }
  return 0;
fail:
  free(buf);
  return -1;
}

static int save_vm(Vm *vm, SnapBuf *b, const char **what) {
  if (vm->has_irqchip) {
    static const uint32_t tags[3] = {SNAP_R_PIC_MASTER, SNAP_R_PIC_SLAVE, SNAP_R_IOAPIC};
    for (uint32_t i = 0; i < 3; i++) {
      struct kvm_irqchip chip;
      memset(&chip, 0, sizeof chip);
      chip.chip_id = i;
      if (ioctl(vm->fd, KVM_GET_IRQCHIP, &chip) < 0) { *what = "KVM_GET_IRQCHIP"; return -1; }
      snapbuf_record(b, tags[i], &chip, sizeof chip);
    }
  }
  if (vm->has_pit) {
    struct kvm_pit_state2 pit;
    if (ioctl(vm->fd, KVM_GET_PIT2, &pit) < 0) { *what = "KVM_GET_PIT2"; return -1; }
    snapbuf_record(b, SNAP_R_PIT, &pit, sizeof pit);
  }
  struct kvm_clock_data clk;
  memset(&clk, 0, sizeof clk);
  if (ioctl(vm->fd, KVM_GET_CLOCK, &clk) < 0) { *what = "KVM_GET_CLOCK"; return -1; }
  snapbuf_record(b, SNAP_R_CLOCK, &clk, sizeof clk);
  return 0;
}

/* a device's first claimed address; bit 63 set for MMIO; ~0 for none */
static uint64_t dev_addr(Vm *vm, Device *d) {
  for (int i = 0; i < vm->pio.n; i++)
    if (vm->pio.r[i].dev == d) return vm->pio.r[i].first;
  for (int i = 0; i < vm->mmio.n; i++)
    if (vm->mmio.r[i].dev == d) return vm->mmio.r[i].first | (1ull << 63);
  return ~0ull;
}

static int page_is_zero(const uint8_t *p) {
  const uint64_t *q = (const uint64_t *)(const void *)p;
  uint64_t acc = 0;
  for (unsigned i = 0; i < SNAP_PAGE / 8; i += 8)
    acc |= q[i] | q[i + 1] | q[i + 2] | q[i + 3] | q[i + 4] | q[i + 5] | q[i + 6] | q[i + 7];
  return acc == 0;
}

static void copy_region(SnapMem *sm, const uint8_t *host) {
  uint64_t pages = sm->size / SNAP_PAGE;
  for (uint64_t pg = 0; pg < pages; pg++) {
    const uint8_t *src = host + pg * SNAP_PAGE;
    if (page_is_zero(src)) continue;
    memcpy(sm->pages + pg * SNAP_PAGE, src, SNAP_PAGE);
    sm->nonzero[pg >> 6] |= 1ull << (pg & 63);
  }
}

/* turn KVM's dirty logging on for a region (for snapshots), and keep a
   bitmap of the pages the VMM writes */
static int track_region(Vm *vm, Memory *m) {
  size_t words = bitmap_words(m->size);
  if (m->vmm_dirty == NULL) {
    m->vmm_dirty = calloc(words, 8);
    if (m->vmm_dirty == NULL) { errno = ENOMEM; return -1; }
  } else {
    memset(m->vmm_dirty, 0, words * 8);
  }
  if (!m->logging) {
    struct kvm_userspace_memory_region r;
    memset(&r, 0, sizeof r);
    r.slot = m->slot;
    r.flags = m->flags | KVM_MEM_LOG_DIRTY_PAGES;
    r.guest_phys_addr = m->guest;
    r.memory_size = m->size;
    r.userspace_addr = (uint64_t)(uintptr_t)m->host;
    if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) return -1;
    m->logging = 1;
  }
  return 0;
}

/* KVM's dirty pages of a region since the last call, ORed into bm (cleared in KVM) */
static int harvest(Vm *vm, Memory *m, uint64_t *bm, size_t words) {
  memset(bm, 0, words * 8);
  struct kvm_dirty_log dl;
  memset(&dl, 0, sizeof dl);
  dl.slot = m->slot;
  dl.dirty_bitmap = bm;
  if (ioctl(vm->fd, KVM_GET_DIRTY_LOG, &dl) < 0) return -1;
  for (size_t w = 0; w < words; w++)
    bm[w] |= __atomic_exchange_n(&m->vmm_dirty[w], 0, __ATOMIC_RELAXED);
  return 0;
}

/* the VM's memory equals snapshot `id` from now on, but for pages logged
   dirty after this call */
static int set_baseline(Vm *vm, uint64_t id) {
  vm->baseline = 0;
  uint64_t *bm = NULL;
  size_t have = 0;
  for (int i = 0; i < KVM_MAX_REGIONS; i++) {
    Memory *m = vm->regions[i];
    if (m == NULL || m->host == NULL) continue;
    size_t words = bitmap_words(m->size);
    if (words > have) {
      free(bm);
      bm = malloc(words * 8);
      if (bm == NULL) { errno = ENOMEM; return -1; }
      have = words;
    }
    if (track_region(vm, m) < 0 || harvest(vm, m, bm, words) < 0) { free(bm); return -1; }
  }
  free(bm);
  vm->baseline = id;
  return 0;
}

static void check_still(lua_State *L, Vm *vm, const char *fn) {
  if (vm->running || vm->threads)
    luaL_error(L, "vm:%s: a vCPU is running (call it between runs)", fn);
}

/*** Save the VM's whole state: every vCPU's registers, FPU/XSAVE, MSRs,
events, local APIC and MP state, the in-kernel irqchip, PIT and clock, each
device's state, and guest memory (a copy, zero pages not stored). From then
on the VM tracks which pages change, so `vm:restore` of this snapshot copies
back only those. Lua port and MMIO handlers (vm:on_io, vm:on_mmio) keep
their state in the script and are left out; a Lua virtio device (vm:virtio)
is saved as far as its transport goes, and refuses while the script holds a
chain. Call it between runs.
@function vm:snapshot
@treturn kvm.snapshot
@return[2] fail, message, errno (a KVM call failed, a device cannot be saved now)
*/
int l_vm_snapshot(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  check_still(L, vm, "snapshot");
  Snapshot *s = snap_push(L);
  char err[160] = "";
  const char *what = NULL;
  SnapBuf b = {0};
  size_t xsz = xsave_size(vm);
  for (int i = 0; i < KVM_MAX_VCPUS; i++) {
    Vcpu *c = vm->vcpus[i];
    if (c == NULL || c->fd < 0) continue;
    memset(&b, 0, sizeof b);
    if (save_vcpu(c, &b, xsz, &what) < 0) {
      snprintf(err, sizeof err, "vm:snapshot: vCPU %d: %s: %s", c->id, what, strerror(errno));
      goto fail;
    }
    if (add_part(s, SNAP_VCPU, (uint32_t)c->id, NULL, 0, &b) < 0) goto oom;
  }
  memset(&b, 0, sizeof b);
  if (save_vm(vm, &b, &what) < 0) {
    snprintf(err, sizeof err, "vm:snapshot: %s: %s", what, strerror(errno));
    goto fail;
  }
  if (add_part(s, SNAP_VM, 0, NULL, 0, &b) < 0) goto oom;
  for (int i = 0; i < vm->ndevs; i++) {
    Device *d = vm->devs[i];
    if (d == NULL || d->closed || d->ops->save == NULL) continue;
    memset(&b, 0, sizeof b);
    char derr[120] = "";
    pthread_mutex_lock(&d->lock);
    int r = d->ops->save(d, &b, derr, sizeof derr);
    pthread_mutex_unlock(&d->lock);
    if (r < 0) {
      free(b.p);
      b.p = NULL;
      errno = EBUSY;
      snprintf(err, sizeof err, "vm:snapshot: device %s: %s", d->ops->kind, derr);
      goto fail;
    }
    if (add_part(s, SNAP_DEVICE, (uint32_t)i, d->ops->kind, dev_addr(vm, d), &b) < 0) goto oom;
  }
  for (int i = 0; i < KVM_MAX_REGIONS; i++) {
    Memory *m = vm->regions[i];
    if (m == NULL || m->host == NULL) continue;
    SnapMem *sm = snap_add_mem(s, m->slot, m->flags, m->guest, m->size);
    if (sm == NULL) goto oom;
    copy_region(sm, m->host);
  }
  s->trusted = 1;
  if (set_baseline(vm, s->id) < 0) {
    snprintf(err, sizeof err, "vm:snapshot: dirty logging (KVM_SET_USER_MEMORY_REGION, KVM_GET_DIRTY_LOG): %s",
             strerror(errno));
    goto fail;
  }
  return 1;
oom:
  errno = ENOMEM;
  snprintf(err, sizeof err, "vm:snapshot: out of memory");
fail:
  {
    int en = errno;
    free(b.p);
    luaL_pushfail(L);
    lua_pushstring(L, err);
    lua_pushinteger(L, en);
    return 3;
  }
}

/* ---- putting one back ---- */

#define MAX_TAG 16

typedef struct Recs {
  const uint8_t *p[MAX_TAG + 1];
  uint32_t len[MAX_TAG + 1];
} Recs;

/* split a VM or vCPU part into its records, each tag at most once and
   below max_tag; *err says what is wrong */
static int split(const SnapPart *part, uint32_t max_tag, Recs *r, char *err, size_t errlen,
                 const char *whose) {
  memset(r, 0, sizeof *r);
  SnapRd rd = {part->data, part->len, 0, 0};
  uint32_t tag, len;
  const uint8_t *p;
  int k;
  while ((k = snaprd_record(&rd, &tag, &p, &len)) == 1) {
    if (tag == 0 || tag > max_tag) {
      snprintf(err, errlen, "%s: unknown record %u", whose, tag);
      return -1;
    }
    if (r->p[tag]) {
      snprintf(err, errlen, "%s: record %u twice", whose, tag);
      return -1;
    }
    r->p[tag] = p;
    r->len[tag] = len;
  }
  if (k < 0) {
    snprintf(err, errlen, "%s: a record runs past the end of its part", whose);
    return -1;
  }
  return 0;
}

/* record `tag` present (unless optional) with exactly `size` bytes */
static int need(const Recs *r, uint32_t tag, size_t size, int optional, const char *name,
                char *err, size_t errlen, const char *whose) {
  if (r->p[tag] == NULL) {
    if (optional) return 0;
    snprintf(err, errlen, "%s: no %s", whose, name);
    return -1;
  }
  if (r->len[tag] != size) {
    snprintf(err, errlen, "%s: %s is %u bytes, %zu expected", whose, name, r->len[tag], size);
    return -1;
  }
  return 0;
}

#define NEED(tag, type, opt, name) \
  if (need(r, tag, sizeof(type), opt, name, err, errlen, whose) < 0) return -1

static int check_vcpu(Vm *vm, const Recs *r, size_t xsz, char *err, size_t errlen,
                      const char *whose) {
  NEED(SNAP_R_MP_STATE, struct kvm_mp_state, 0, "MP state");
  NEED(SNAP_R_REGS, struct kvm_regs, 0, "registers");
  NEED(SNAP_R_SREGS, struct kvm_sregs, 0, "special registers");
  NEED(SNAP_R_FPU, struct kvm_fpu, 1, "FPU state");
  NEED(SNAP_R_XCRS, struct kvm_xcrs, 1, "XCRs");
  NEED(SNAP_R_DEBUGREGS, struct kvm_debugregs, 1, "debug registers");
  NEED(SNAP_R_LAPIC, struct kvm_lapic_state, !vm->has_irqchip, "local APIC");
  NEED(SNAP_R_EVENTS, struct kvm_vcpu_events, 0, "events");
  NEED(SNAP_R_TSC_KHZ, uint32_t, 1, "TSC frequency");
  if (r->p[SNAP_R_LAPIC] && !vm->has_irqchip) {
    snprintf(err, errlen, "%s: has a local APIC, this VM has no in-kernel irqchip (vm:irqchip())", whose);
    return -1;
  }
  uint32_t mp;
  memcpy(&mp, r->p[SNAP_R_MP_STATE], 4);
  if (mp > KVM_MP_STATE_SIPI_RECEIVED) {
    snprintf(err, errlen, "%s: MP state %u is not an x86 one", whose, mp);
    return -1;
  }
  if (!r->p[SNAP_R_XSAVE] == !r->p[SNAP_R_FPU]) {
    snprintf(err, errlen, "%s: needs XSAVE state or FPU state, not %s", whose,
             r->p[SNAP_R_FPU] ? "both" : "neither");
    return -1;
  }
  if (r->p[SNAP_R_XSAVE]) {
    uint32_t n = r->len[SNAP_R_XSAVE];
    if (xsz == 0 || n < sizeof(struct kvm_xsave) || n > xsz || n % 4) {
      snprintf(err, errlen, "%s: XSAVE state of %u bytes, this host's KVM takes %zu", whose, n, xsz);
      return -1;
    }
  }
  if (r->p[SNAP_R_XCRS] && !has_cap(vm, KVM_CAP_XCRS, &cap_xcrs)) {
    snprintf(err, errlen, "%s: has XCRs, this host's KVM has no KVM_CAP_XCRS", whose);
    return -1;
  }
  if (r->p[SNAP_R_XCRS]) {
    struct kvm_xcrs x;
    memcpy(&x, r->p[SNAP_R_XCRS], sizeof x);
    if (x.nr_xcrs > KVM_MAX_XCRS) {
      snprintf(err, errlen, "%s: %u XCRs, at most %d", whose, x.nr_xcrs, KVM_MAX_XCRS);
      return -1;
    }
  }
  if (!r->p[SNAP_R_MSRS] || r->len[SNAP_R_MSRS] % 16 || r->len[SNAP_R_MSRS] > 16 * 4096) {
    snprintf(err, errlen, "%s: MSR list missing or malformed", whose);
    return -1;
  }
  uint32_t cl = r->len[SNAP_R_CPUID];
  if (!r->p[SNAP_R_CPUID] || cl % sizeof(struct kvm_cpuid_entry2) ||
      cl / sizeof(struct kvm_cpuid_entry2) > 256) {
    snprintf(err, errlen, "%s: CPUID table missing or malformed", whose);
    return -1;
  }
  if (r->p[SNAP_R_TSC_KHZ]) {
    uint32_t khz;
    memcpy(&khz, r->p[SNAP_R_TSC_KHZ], 4);
    if (khz == 0 || khz > 100000000u) {
      snprintf(err, errlen, "%s: TSC frequency %u kHz", whose, khz);
      return -1;
    }
  }
  return 0;
}

static int check_vm(Vm *vm, const Recs *r, char *err, size_t errlen) {
  const char *whose = "the VM's part";
  int chip = !vm->has_irqchip;
  NEED(SNAP_R_PIC_MASTER, struct kvm_irqchip, chip, "PIC (master)");
  NEED(SNAP_R_PIC_SLAVE, struct kvm_irqchip, chip, "PIC (slave)");
  NEED(SNAP_R_IOAPIC, struct kvm_irqchip, chip, "IOAPIC");
  NEED(SNAP_R_PIT, struct kvm_pit_state2, !vm->has_pit, "PIT");
  NEED(SNAP_R_CLOCK, struct kvm_clock_data, 0, "clock");
  if (!vm->has_irqchip && r->p[SNAP_R_IOAPIC]) {
    snprintf(err, errlen, "the snapshot has an in-kernel irqchip, this VM has none (vm:irqchip())");
    return -1;
  }
  if (!vm->has_pit && r->p[SNAP_R_PIT]) {
    snprintf(err, errlen, "the snapshot has an in-kernel PIT, this VM has none (vm:pit())");
    return -1;
  }
  static const uint32_t tags[3] = {SNAP_R_PIC_MASTER, SNAP_R_PIC_SLAVE, SNAP_R_IOAPIC};
  for (uint32_t i = 0; i < 3 && vm->has_irqchip; i++) {
    struct kvm_irqchip c;
    memcpy(&c, r->p[tags[i]], sizeof c);
    if (c.chip_id != i) {
      snprintf(err, errlen, "%s: irqchip record %u holds chip %u", whose, tags[i], c.chip_id);
      return -1;
    }
  }
  return 0;
}

#define PUT(req, tag, name)                                                         \
  do {                                                                              \
    if (r->p[tag] && ioctl(c->fd, req, r->p[tag]) < 0) { *what = name; return -1; } \
  } while (0)

/* KVM_SET_MSRS stops at the first MSR it refuses. Some it lists as saved it
   refuses to take back as they are (MSR_KVM_ASYNC_PF_INT without an
   in-kernel LAPIC): one that already holds the value saved is passed over,
   any other fails the restore. The vCPU remembers those (msr_held), so a
   reset loop sets the rest in one call and checks them in one more. */
static int put_msrs(Vcpu *c, const uint8_t *p, uint32_t n, uint8_t *scratch, const char **what) {
  static __thread char msg[64];
  struct kvm_msrs *ms = (struct kvm_msrs *)(void *)scratch;
  /* a kvm_msrs of up to 4 entries (a flexible array cannot sit in a struct) */
  uint64_t heldbuf[(sizeof(struct kvm_msrs) + 4 * sizeof(struct kvm_msr_entry)) / 8];
  struct kvm_msrs *held = (struct kvm_msrs *)(void *)heldbuf;
  memset(heldbuf, 0, sizeof heldbuf);
  uint32_t m = 0;
  memset(ms, 0, sizeof *ms);
  for (uint32_t i = 0; i < n; i++) {
    struct kvm_msr_entry e;
    memcpy(&e, p + 16 * (size_t)i, 16);
    int h = 0;
    for (int k = 0; k < c->nmsr_held; k++) h |= c->msr_held[k] == e.index;
    if (h && held->nmsrs < 4) held->entries[held->nmsrs++] = e;
    else ms->entries[m++] = e;
  }
  while (m > 0) {
    ms->nmsrs = m;
    int set = ioctl(c->fd, KVM_SET_MSRS, ms);
    if (set < 0) { *what = "KVM_SET_MSRS"; return -1; }
    if ((uint32_t)set == m) break;
    uint64_t onebuf[(sizeof(struct kvm_msrs) + sizeof(struct kvm_msr_entry)) / 8];
    struct kvm_msrs *one = (struct kvm_msrs *)(void *)onebuf;   /* entries[set] refused */
    memset(onebuf, 0, sizeof onebuf);
    one->nmsrs = 1;
    one->entries[0] = ms->entries[set];
    uint64_t want = one->entries[0].data;
    if (ioctl(c->fd, KVM_GET_MSRS, one) != 1 || one->entries[0].data != want) {
      snprintf(msg, sizeof msg, "KVM_SET_MSRS (MSR 0x%x refused)", one->entries[0].index);
      *what = msg;
      errno = EINVAL;
      return -1;
    }
    if (c->nmsr_held < 4) c->msr_held[c->nmsr_held++] = one->entries[0].index;
    m -= (uint32_t)set + 1;
    memmove(ms->entries, ms->entries + set + 1, sizeof(struct kvm_msr_entry) * m);
  }
  if (held->nmsrs) {             /* still the values saved? */
    uint64_t want[4] = {0};
    for (uint32_t k = 0; k < held->nmsrs; k++) want[k] = held->entries[k].data;
    int got = ioctl(c->fd, KVM_GET_MSRS, held);
    for (uint32_t k = 0; k < held->nmsrs; k++)
      if (got != (int)held->nmsrs || held->entries[k].data != want[k]) {
        snprintf(msg, sizeof msg, "KVM_SET_MSRS (MSR 0x%x refused)", held->entries[k].index);
        *what = msg;
        errno = EINVAL;
        return -1;
      }
  }
  return 0;
}

/* a vCPU's state, in Firecracker's order: the LAPIC before the MSRs (the
   TSC deadline needs its timer mode), events last */
static int put_vcpu(Vcpu *c, const Recs *r, size_t xsz, const char **what, uint8_t *scratch) {
  *what = "records missing";     /* checked before (check_vcpu, or made by save_vcpu) */
  errno = EINVAL;
  if (!r->p[SNAP_R_EVENTS] || !r->p[SNAP_R_MSRS] || !r->p[SNAP_R_CPUID]) return -1;
  *what = "KVM_RUN (to finish an access)";
  if (settle(c) < 0) return -1;
  if (c->seq == 0 && r->len[SNAP_R_CPUID]) {   /* CPUID may change only before the first KVM_RUN */
    uint32_t n = r->len[SNAP_R_CPUID] / (uint32_t)sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *cp = (struct kvm_cpuid2 *)(void *)scratch;
    cp->nent = n;
    cp->padding = 0;
    memcpy(cp->entries, r->p[SNAP_R_CPUID], r->len[SNAP_R_CPUID]);
    *what = "KVM_SET_CPUID2";
    if (ioctl(c->fd, KVM_SET_CPUID2, cp) < 0) return -1;
  }
  if (r->p[SNAP_R_TSC_KHZ]) {
    uint32_t khz;
    memcpy(&khz, r->p[SNAP_R_TSC_KHZ], 4);
    if (c->tsc_khz != khz) {     /* asked once: a reset loop does not ask again */
      int now = ioctl(c->fd, KVM_GET_TSC_KHZ, 0);
      *what = "KVM_SET_TSC_KHZ";
      if (now > 0 && (uint32_t)now != khz && ioctl(c->fd, KVM_SET_TSC_KHZ, (unsigned long)khz) < 0)
        return -1;
      c->tsc_khz = now > 0 ? khz : 0;
    }
  }
  PUT(KVM_SET_MP_STATE, SNAP_R_MP_STATE, "KVM_SET_MP_STATE");
  PUT(KVM_SET_REGS, SNAP_R_REGS, "KVM_SET_REGS");
  PUT(KVM_SET_SREGS, SNAP_R_SREGS, "KVM_SET_SREGS");
  if (r->p[SNAP_R_XSAVE]) {     /* shorter than this host's: the rest is zeroes */
    memset(scratch, 0, xsz);
    memcpy(scratch, r->p[SNAP_R_XSAVE], r->len[SNAP_R_XSAVE]);
    *what = "KVM_SET_XSAVE";
    if (ioctl(c->fd, KVM_SET_XSAVE, scratch) < 0) return -1;
  }
  PUT(KVM_SET_FPU, SNAP_R_FPU, "KVM_SET_FPU");
  PUT(KVM_SET_XCRS, SNAP_R_XCRS, "KVM_SET_XCRS");
  PUT(KVM_SET_DEBUGREGS, SNAP_R_DEBUGREGS, "KVM_SET_DEBUGREGS");
  PUT(KVM_SET_LAPIC, SNAP_R_LAPIC, "KVM_SET_LAPIC");
  if (put_msrs(c, r->p[SNAP_R_MSRS], r->len[SNAP_R_MSRS] / 16, scratch, what) < 0) return -1;
  struct kvm_vcpu_events ev;
  memcpy(&ev, r->p[SNAP_R_EVENTS], sizeof ev);
  ev.flags &= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW |
              KVM_VCPUEVENT_VALID_SMM | KVM_VCPUEVENT_VALID_PAYLOAD;
  *what = "KVM_SET_VCPU_EVENTS";
  if (ioctl(c->fd, KVM_SET_VCPU_EVENTS, &ev) < 0) return -1;
  return 0;
}

static int put_vm(Vm *vm, const Recs *r, const char **what) {
  static const uint32_t tags[3] = {SNAP_R_PIC_MASTER, SNAP_R_PIC_SLAVE, SNAP_R_IOAPIC};
  for (int i = 0; i < 3; i++)
    if (r->p[tags[i]] && ioctl(vm->fd, KVM_SET_IRQCHIP, r->p[tags[i]]) < 0) {
      *what = "KVM_SET_IRQCHIP";
      return -1;
    }
  if (r->p[SNAP_R_PIT] && ioctl(vm->fd, KVM_SET_PIT2, r->p[SNAP_R_PIT]) < 0) {
    *what = "KVM_SET_PIT2";
    return -1;
  }
  struct kvm_clock_data clk;
  if (r->p[SNAP_R_CLOCK] == NULL) { *what = "no clock"; errno = EINVAL; return -1; }
  memcpy(&clk, r->p[SNAP_R_CLOCK], sizeof clk);
  clk.flags = 0;                 /* the clock goes on from the value saved */
  memset(clk.pad, 0, sizeof clk.pad);
  if (ioctl(vm->fd, KVM_SET_CLOCK, &clk) < 0) {
    *what = "KVM_SET_CLOCK";
    return -1;
  }
  return 0;
}

/* copy page pg of sm back into host (zeroes where the snapshot had none) */
static inline void put_page(const SnapMem *sm, uint8_t *host, uint64_t pg) {
  if (sm->nonzero[pg >> 6] & (1ull << (pg & 63)))
    memcpy(host + pg * SNAP_PAGE, sm->pages + pg * SNAP_PAGE, SNAP_PAGE);
  else
    memset(host + pg * SNAP_PAGE, 0, SNAP_PAGE);
}

/* memory: every page (first restore), or those dirty since the baseline */
static int put_memory(Vm *vm, const Snapshot *s, uint64_t *pages) {
  int fast = vm->baseline == s->id;
  for (int i = 0; i < s->nmem && fast; i++) {
    Memory *m = vm->regions[s->mem[i].slot];
    if (!m->logging || m->vmm_dirty == NULL) fast = 0;
  }
  *pages = 0;
  for (int i = 0; i < s->nmem; i++) {
    const SnapMem *sm = &s->mem[i];
    Memory *m = vm->regions[sm->slot];
    size_t words = bitmap_words(sm->size);
    if (fast) {
      uint64_t *bm = malloc(words * 8);
      if (bm == NULL) { errno = ENOMEM; return -1; }
      if (harvest(vm, m, bm, words) < 0) { free(bm); return -1; }
      for (size_t w = 0; w < words; w++)
        for (uint64_t b = bm[w]; b; b &= b - 1) {
          put_page(sm, m->host, w * 64 + (uint64_t)__builtin_ctzll(b));
          (*pages)++;
        }
      free(bm);
    } else {
      /* drop every page (they read as zeroes again), then copy the non-zero ones */
      if (madvise(m->host, m->size, MADV_DONTNEED) < 0) memset(m->host, 0, m->size);
      for (size_t w = 0; w < words; w++)
        for (uint64_t b = sm->nonzero[w]; b; b &= b - 1) {
          uint64_t pg = w * 64 + (uint64_t)__builtin_ctzll(b);
          memcpy(m->host + pg * SNAP_PAGE, sm->pages + pg * SNAP_PAGE, SNAP_PAGE);
          (*pages)++;
        }
    }
  }
  if (!fast && set_baseline(vm, s->id) < 0) return -1;
  return 0;
}

/* the VM device a device part belongs to, or NULL */
static Device *part_device(Vm *vm, const SnapPart *p) {
  for (int i = 0; i < vm->ndevs; i++) {
    Device *d = vm->devs[i];
    if (d && !d->closed && d->ops->save && !strcmp(d->ops->kind, p->name) && dev_addr(vm, d) == p->addr)
      return d;
  }
  return NULL;
}

static const char *addr_str(uint64_t a, char *buf, size_t n) {
  snprintf(buf, n, "%s 0x%llx", (a >> 63) ? "MMIO" : "port", (unsigned long long)(a & ~(1ull << 63)));
  return buf;
}

/* everything restore needs, checked before anything changes */
typedef struct Plan {
  Recs vm;
  Recs cpu[KVM_MAX_VCPUS];
  Vcpu *vcpu[KVM_MAX_VCPUS];
  Device *dev[KVM_MAX_DEVICES];  /* by part index among device parts */
  const SnapPart *devpart[KVM_MAX_DEVICES];
  int ncpu, ndev;
  size_t xsz, scratch;
  int backed;                    /* bk and bkvm hold the state before */
  SnapBuf bk[KVM_MAX_VCPUS], bkvm;
} Plan;

static void drop_backup(Plan *pl) {
  for (int k = 0; k < pl->ncpu; k++) {
    free(pl->bk[k].p);
    memset(&pl->bk[k], 0, sizeof pl->bk[k]);
  }
  free(pl->bkvm.p);
  memset(&pl->bkvm, 0, sizeof pl->bkvm);
  pl->backed = 0;
}

/* vm:restore's working space, kept by the thread: a reset loop allocates
   nothing (allocating ~100 KiB per restore cost as much as its ioctls) */
static __thread Plan *tl_plan;
static __thread uint8_t *tl_scratch;
static __thread size_t tl_scratch_len;

/* the vCPUs' and the VM's state as they are, to put back when KVM refuses
   a value of the snapshot */
static int backup(Vm *vm, Plan *pl, char *err, size_t errlen) {
  const char *what = NULL;
  for (int k = 0; k < pl->ncpu; k++)
    if (save_vcpu(pl->vcpu[k], &pl->bk[k], pl->xsz, &what) < 0 || pl->bk[k].oom) {
      snprintf(err, errlen, "saving vCPU %d first: %s: %s", pl->vcpu[k]->id, what ? what : "", strerror(errno));
      return -1;
    }
  if (save_vm(vm, &pl->bkvm, &what) < 0 || pl->bkvm.oom) {
    snprintf(err, errlen, "saving the VM's state first: %s: %s", what ? what : "", strerror(errno));
    return -1;
  }
  pl->backed = 1;
  return 0;
}

static int plan_restore(Vm *vm, const Snapshot *s, Plan *pl, char *err, size_t errlen) {
  char a[48];
  pl->xsz = xsave_size(vm);
  /* a snapshot from a file may come from another CPU */
  if (!s->trusted && snap_check_cpu(s, vm->kvm_fd, err, errlen) < 0) return -1;
  int nvm = 0;
  /* memory: the same regions */
  int nreg = 0;
  for (int i = 0; i < KVM_MAX_REGIONS; i++)
    if (vm->regions[i] && vm->regions[i]->host) nreg++;
  for (int i = 0; i < s->nmem; i++) {
    const SnapMem *sm = &s->mem[i];
    Memory *m = sm->slot < KVM_MAX_REGIONS ? vm->regions[sm->slot] : NULL;
    if (m == NULL || m->host == NULL || m->guest != sm->guest || m->size != sm->size) {
      snprintf(err, errlen, "the snapshot's memory slot %u (0x%llx, %llu bytes) is not in this VM",
               sm->slot, (unsigned long long)sm->guest, (unsigned long long)sm->size);
      return -1;
    }
  }
  if (nreg != s->nmem) {
    snprintf(err, errlen, "this VM has %d memory regions, the snapshot %d", nreg, s->nmem);
    return -1;
  }
  /* parts */
  size_t scratch = sizeof(struct kvm_msrs) + (size_t)65536 + 64;
  if (pl->xsz > scratch) scratch = pl->xsz;
  for (int i = 0; i < s->nparts; i++) {
    const SnapPart *p = &s->parts[i];
    if (p->kind == SNAP_VM) {
      if (nvm++) { snprintf(err, errlen, "two VM parts"); return -1; }
      if (split(p, SNAP_R_CLOCK, &pl->vm, err, errlen, "the VM's part") < 0) return -1;
      if (check_vm(vm, &pl->vm, err, errlen) < 0) return -1;
    } else if (p->kind == SNAP_VCPU) {
      char whose[32];
      snprintf(whose, sizeof whose, "vCPU %u", p->id);
      Vcpu *c = NULL;
      for (int k = 0; k < KVM_MAX_VCPUS; k++)
        if (vm->vcpus[k] && vm->vcpus[k]->fd >= 0 && (uint32_t)vm->vcpus[k]->id == p->id) c = vm->vcpus[k];
      if (c == NULL) { snprintf(err, errlen, "the snapshot has vCPU %u, this VM has not", p->id); return -1; }
      for (int k = 0; k < pl->ncpu; k++)
        if (pl->vcpu[k] == c) { snprintf(err, errlen, "vCPU %u twice", p->id); return -1; }
      if (pl->ncpu >= KVM_MAX_VCPUS) { snprintf(err, errlen, "too many vCPUs"); return -1; }
      Recs *r = &pl->cpu[pl->ncpu];
      if (split(p, SNAP_R_TSC_KHZ, r, err, errlen, whose) < 0) return -1;
      if (check_vcpu(vm, r, pl->xsz, err, errlen, whose) < 0) return -1;
      pl->vcpu[pl->ncpu++] = c;
    } else if (p->kind == SNAP_DEVICE) {
      if (memchr(p->name, 0, sizeof p->name) == NULL) { snprintf(err, errlen, "a device name"); return -1; }
      Device *d = part_device(vm, p);
      if (d == NULL) {
        snprintf(err, errlen, "the snapshot has a device %s at %s, this VM has none there", p->name,
                 addr_str(p->addr, a, sizeof a));
        return -1;
      }
      for (int k = 0; k < pl->ndev; k++)
        if (pl->dev[k] == d) {
          snprintf(err, errlen, "device %s at %s twice", p->name, addr_str(p->addr, a, sizeof a));
          return -1;
        }
      char derr[120] = "";
      pthread_mutex_lock(&d->lock);
      int ok = d->ops->restore ? d->ops->restore(d, p->data, p->len, 0, derr, sizeof derr) : -1;
      pthread_mutex_unlock(&d->lock);
      if (ok < 0) {
        snprintf(err, errlen, "device %s at %s: %s", p->name, addr_str(p->addr, a, sizeof a),
                 d->ops->restore ? derr : "cannot be restored");
        return -1;
      }
      pl->dev[pl->ndev] = d;
      pl->devpart[pl->ndev++] = p;
    } else {
      snprintf(err, errlen, "a part of unknown kind %u", p->kind);
      return -1;
    }
  }
  if (nvm != 1) { snprintf(err, errlen, "no VM part"); return -1; }
  int ncpu = 0;
  for (int k = 0; k < KVM_MAX_VCPUS; k++) ncpu += vm->vcpus[k] && vm->vcpus[k]->fd >= 0;
  if (ncpu != pl->ncpu) {
    snprintf(err, errlen, "this VM has %d vCPUs, the snapshot %d", ncpu, pl->ncpu);
    return -1;
  }
  for (int i = 0; i < vm->ndevs; i++) {
    Device *d = vm->devs[i];
    if (d == NULL || d->closed || d->ops->save == NULL) continue;
    int found = 0;
    for (int k = 0; k < pl->ndev; k++) found |= pl->dev[k] == d;
    if (!found) {
      snprintf(err, errlen, "this VM has a device %s at %s, the snapshot has none there",
               d->ops->kind, addr_str(dev_addr(vm, d), a, sizeof a));
      return -1;
    }
  }
  pl->scratch = scratch;
  return 0;
}

/*** Put the VM back into the state of a snapshot: its vCPUs, irqchip, PIT,
clock, devices and memory. The VM must have the snapshot's memory regions
(same slots, addresses and sizes), vCPUs (same ids) and devices (same kinds
at the same addresses): the one that took it, or one built the same way in
another process (kvm.load_snapshot). Everything is checked before anything
changes; a snapshot that does not fit changes nothing. The first restore of a
snapshot into a VM copies all its memory; later ones (and restores right after
vm:snapshot) copy only the pages changed since, by the guest (KVM's dirty log)
or by the VMM (devices, vm:write). Call it between runs.
@function vm:restore
@tparam kvm.snapshot snap
@treturn true
@treturn integer pages copied
@return[2] fail, message, errno
*/
int l_vm_restore(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  Snapshot *s = snap_check(L, 2);
  check_still(L, vm, "restore");
  if (tl_plan == NULL && (tl_plan = calloc(1, sizeof *tl_plan)) == NULL)
    return luaL_error(L, "vm:restore: out of memory");
  Plan *pl = tl_plan;
  pl->ncpu = pl->ndev = 0;
  char err[200] = "";
  const char *what = NULL;
  uint8_t *scratch = NULL;
  int en = EINVAL;
  uint64_t pages = 0;
  if (plan_restore(vm, s, pl, err, sizeof err) < 0) goto fail;
  if (tl_scratch_len < pl->scratch) {
    free(tl_scratch);
    tl_scratch_len = 0;
    if ((tl_scratch = calloc(1, pl->scratch)) == NULL) {
      en = ENOMEM;
      snprintf(err, sizeof err, "out of memory");
      goto fail;
    }
    tl_scratch_len = pl->scratch;
  }
  scratch = tl_scratch;
  /* what KVM checks itself goes first; for a snapshot from a file, whose
     values KVM may refuse (the checks above cannot know each field's
     rules), the vCPUs' and the VM's state are saved first and put back */
  if (!s->trusted && backup(vm, pl, err, sizeof err) < 0) { en = errno; goto fail; }
  for (int k = 0; k < pl->ncpu; k++)
    if (put_vcpu(pl->vcpu[k], &pl->cpu[k], pl->xsz, &what, scratch) < 0) {
      en = errno;
      snprintf(err, sizeof err, "vCPU %d: %s: %s (nothing changed)", pl->vcpu[k]->id, what, strerror(en));
      goto rollback;
    }
  if (put_vm(vm, &pl->vm, &what) < 0) {
    en = errno;
    snprintf(err, sizeof err, "%s: %s (nothing changed)", what, strerror(en));
    goto rollback;
  }
  for (int k = 0; k < pl->ndev; k++) {
    Device *d = pl->dev[k];
    const SnapPart *p = pl->devpart[k];
    char derr[120] = "";
    pthread_mutex_lock(&d->lock);
    d->ops->restore(d, p->data, p->len, 1, derr, sizeof derr);
    pthread_mutex_unlock(&d->lock);
  }
  if (put_memory(vm, s, &pages) < 0) {
    en = errno;
    snprintf(err, sizeof err, "memory: %s", strerror(en));
    goto fail;
  }
  drop_backup(pl);
  lua_pushboolean(L, 1);
  lua_pushinteger(L, (lua_Integer)pages);
  return 2;
rollback:
  if (pl->backed) {
    for (int k = 0; k < pl->ncpu; k++) {
      Recs r;
      SnapPart bp = {.data = pl->bk[k].p, .len = pl->bk[k].n};
      if (split(&bp, SNAP_R_TSC_KHZ, &r, err + strlen(err), 0, "") == 0)
        put_vcpu(pl->vcpu[k], &r, pl->xsz, &what, scratch);
    }
    Recs r;
    SnapPart bp = {.data = pl->bkvm.p, .len = pl->bkvm.n};
    if (split(&bp, SNAP_R_CLOCK, &r, err + strlen(err), 0, "") == 0) put_vm(vm, &r, &what);
  } else {
    size_t l = strlen(err);
    if (l > 18 && !strcmp(err + l - 18, " (nothing changed)"))
      snprintf(err + l - 18, sizeof err - (l - 18), " (the vCPUs' state is now partly restored)");
  }
fail:
  drop_backup(pl);
  luaL_pushfail(L);
  lua_pushfstring(L, "vm:restore: %s", err);
  lua_pushinteger(L, en);
  return 3;
}

static int l_snap_tostring(lua_State *L) {
  Snapshot *s = snap_check(L, 1);
  uint64_t bytes = 0;
  for (int i = 0; i < s->nmem; i++) bytes += s->mem[i].size;
  int ncpu = 0;
  for (int i = 0; i < s->nparts; i++) ncpu += s->parts[i].kind == SNAP_VCPU;
  lua_pushfstring(L, "kvm.snapshot (%d vCPUs, %d memory regions, %I MiB)", ncpu, s->nmem,
                  (lua_Integer)(bytes >> 20));
  return 1;
}

static const char *const kind_names[] = {"?", "vm", "vcpu", "device"};

/*** What the snapshot holds, part by part.
@function snapshot:parts
@treturn table a list of {kind = "vm" | "vcpu" | "device", id =, name = (a
  device's kind), addr = (a device's first port or MMIO address), mmio =
  (boolean), bytes = (its state's size)}
*/
static int l_snap_parts(lua_State *L) {
  Snapshot *s = snap_check(L, 1);
  lua_createtable(L, s->nparts, 0);
  for (int i = 0; i < s->nparts; i++) {
    const SnapPart *p = &s->parts[i];
    lua_createtable(L, 0, 6);
    lua_pushstring(L, kind_names[p->kind < 4 ? p->kind : 0]);
    lua_setfield(L, -2, "kind");
    lua_pushinteger(L, (lua_Integer)p->id);
    lua_setfield(L, -2, "id");
    if (p->kind == SNAP_DEVICE) {
      lua_pushstring(L, p->name);
      lua_setfield(L, -2, "name");
      lua_pushinteger(L, (lua_Integer)(p->addr & ~(1ull << 63)));
      lua_setfield(L, -2, "addr");
      lua_pushboolean(L, (int)(p->addr >> 63));
      lua_setfield(L, -2, "mmio");
    }
    lua_pushinteger(L, (lua_Integer)p->len);
    lua_setfield(L, -2, "bytes");
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

/*** The guest memory it holds, region by region.
@function snapshot:memory
@treturn table a list of {slot =, guest =, size =, pages = (pages that are
  not all zeroes: what a file stores)}
*/
static int l_snap_memory(lua_State *L) {
  Snapshot *s = snap_check(L, 1);
  lua_createtable(L, s->nmem, 0);
  for (int i = 0; i < s->nmem; i++) {
    const SnapMem *m = &s->mem[i];
    lua_Integer pages = 0;
    size_t words = bitmap_words(m->size);
    for (size_t w = 0; w < words; w++) pages += __builtin_popcountll(m->nonzero[w]);
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, (lua_Integer)m->slot);
    lua_setfield(L, -2, "slot");
    lua_pushinteger(L, (lua_Integer)m->guest);
    lua_setfield(L, -2, "guest");
    lua_pushinteger(L, (lua_Integer)m->size);
    lua_setfield(L, -2, "size");
    lua_pushinteger(L, pages);
    lua_setfield(L, -2, "pages");
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

static const luaL_Reg snap_methods[] = {
  {"parts", l_snap_parts},
  {"memory", l_snap_memory},
  {NULL, NULL}
};

void kvm_open_snapshot(lua_State *L) {
  static const luaL_Reg meta[] = {
    {"__gc", l_snap_gc},
    {"__tostring", l_snap_tostring},
    {NULL, NULL}
  };
  kvm_new_class(L, SNAPSHOT_MT, snap_methods, meta);
  kvm_open_snapfile(L);
}
