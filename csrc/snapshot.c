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
  size_t words = (size_t)((size / SNAP_PAGE + 63) / 64);
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

static const luaL_Reg snap_methods[] = {
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
