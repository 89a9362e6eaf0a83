/*
** mem.c - kvm.memory: a host mapping registered as a guest memory slot.
*/

/***
A guest memory region (a KVM memory slot), made by `vm:memory{...}`.
@classmod kvm.memory
*/
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "luakvm.h"

#define PAGE 4096u

static Memory *tomem(lua_State *L, int arg) {
  return (Memory *)luaL_checkudata(L, arg, MEMORY_MT);
}

Memory *kvm_checkmemory(lua_State *L, int arg) {
  Memory *m = tomem(L, arg);
  if (m->host == NULL) luaL_error(L, "attempt to use a closed kvm.memory");
  return m;
}

/* read a field of the options table at index 2 */
static int opt_field(lua_State *L, const char *k) {
  return lua_getfield(L, 2, k);
}

static int opt_bool(lua_State *L, const char *k) {
  int t = opt_field(L, k);
  int v = lua_toboolean(L, -1);
  if (t != LUA_TNIL && t != LUA_TBOOLEAN)
    luaL_error(L, "bad option '%s' to 'memory' (boolean expected, got %s)", k, lua_typename(L, t));
  lua_pop(L, 1);
  return v;
}

static uint64_t opt_int(lua_State *L, const char *k, int required, uint64_t dflt) {
  int t = opt_field(L, k);
  if (t == LUA_TNIL) {
    lua_pop(L, 1);
    if (required) luaL_error(L, "bad option '%s' to 'memory' (integer expected, got nil)", k);
    return dflt;
  }
  int ok;
  lua_Integer v = lua_tointegerx(L, -1, &ok);
  if (!ok)
    luaL_error(L, "bad option '%s' to 'memory' (%s)", k,
               t == LUA_TNUMBER ? "number has no integer representation"
                                : lua_pushfstring(L, "integer expected, got %s", lua_typename(L, t)));
  lua_pop(L, 1);
  return (uint64_t)v;
}

/*** Map host memory and register it as guest RAM (KVM_SET_USER_MEMORY_REGION).
@function vm:memory
@tparam table opts {guest = gpa, size = bytes [, slot = n] [, readonly = true]
  [, dirty_log = true] [, hugepages = true]}; guest and size page-aligned.
@treturn kvm.memory
@return[2] fail, message, errno
*/
int l_vm_memory(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    lua_pop(L, 1);
    const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "?";
    if (strcmp(k, "guest") && strcmp(k, "size") && strcmp(k, "slot") &&
        strcmp(k, "readonly") && strcmp(k, "dirty_log") && strcmp(k, "hugepages"))
      return luaL_error(L, "bad option '%s' to 'memory' (unknown option)", luaL_tolstring(L, -1, NULL));
  }
  uint64_t guest = opt_int(L, "guest", 1, 0);
  uint64_t size = opt_int(L, "size", 1, 0);
  int readonly = opt_bool(L, "readonly");
  int dirty = opt_bool(L, "dirty_log");
  int huge = opt_bool(L, "hugepages");
  uint64_t end;
  if ((int64_t)size <= 0)
    return luaL_error(L, "bad option 'size' to 'memory' (must be positive)");
  if ((guest | size) & (PAGE - 1))
    return luaL_error(L, "bad option '%s' to 'memory' (not a multiple of 4096)",
                      (guest & (PAGE - 1)) ? "guest" : "size");
  if (__builtin_add_overflow(guest, size, &end) || end > (1ull << 52))
    return luaL_error(L, "bad option 'size' to 'memory' (region ends beyond the guest-physical address space)");
  if (size > (1ull << 46))
    return luaL_error(L, "bad option 'size' to 'memory' (too large)");
  int free_slot = -1;
  for (int i = 0; i < KVM_MAX_REGIONS; i++) {
    Memory *o = vm->regions[i];
    if (o == NULL || o->host == NULL) { if (free_slot < 0) free_slot = i; continue; }
    if (guest < o->guest + o->size && o->guest < end)
      return luaL_error(L, "bad option 'guest' to 'memory' (%s-%s overlaps region %s-%s)", kvm_pushhex(L, (uint64_t)(guest)), kvm_pushhex(L, (uint64_t)((end - 1))), kvm_pushhex(L, (uint64_t)(o->guest)), kvm_pushhex(L, (uint64_t)((o->guest + o->size - 1))));
  }
  uint64_t slot = opt_int(L, "slot", 0, (uint64_t)free_slot);
  if (free_slot < 0 || slot >= KVM_MAX_REGIONS)
    return luaL_error(L, "bad option 'slot' to 'memory' (0..%d, and a free one)", KVM_MAX_REGIONS - 1);
  if (vm->regions[slot] && vm->regions[slot]->host)
    return luaL_error(L, "bad option 'slot' to 'memory' (slot %d is in use)", (int)slot);

  Memory *m = lua_newuserdatauv(L, sizeof(Memory), 1);
  memset(m, 0, sizeof *m);
  luaL_setmetatable(L, MEMORY_MT);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);   /* pin the VM */

  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return kvm_fail(L, "mmap");
  if (huge) madvise(p, size, MADV_HUGEPAGE);   /* best effort: THP */
  madvise(p, size, MADV_MERGEABLE);
  struct kvm_userspace_memory_region r;
  memset(&r, 0, sizeof r);
  r.slot = (uint32_t)slot;
  r.flags = (readonly ? KVM_MEM_READONLY : 0) | (dirty ? KVM_MEM_LOG_DIRTY_PAGES : 0);
  r.guest_phys_addr = guest;
  r.memory_size = size;
  r.userspace_addr = (uint64_t)(uintptr_t)p;
  if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) {
    int en = errno;
    munmap(p, size);
    errno = en;
    return kvm_fail(L, "KVM_SET_USER_MEMORY_REGION");
  }
  m->vm = vm;
  m->host = p;
  m->guest = guest;
  m->size = size;
  m->slot = (uint32_t)slot;
  m->flags = r.flags;
  m->logging = dirty;
  vm->regions[slot] = m;
  /* the VM keeps its memories alive: dropping the handle must not unmap RAM */
  lua_getiuservalue(L, 1, 1);
  lua_getfield(L, -1, "memories");
  lua_pushvalue(L, -3);
  lua_pushboolean(L, 1);
  lua_rawset(L, -3);
  lua_pop(L, 2);
  return 1;
}

/*** Unregister the slot (if the VM is open) and unmap. Idempotent.
@function memory:close
*/
static int l_mem_close(lua_State *L) {
  Memory *m = tomem(L, 1);
  if (m->host == NULL) return 0;
  Vm *vm = m->vm;
  if (vm->running)
    return luaL_error(L, "cannot close a kvm.memory while a vcpu runs");
  if (vm->fd >= 0 && vm->regions[m->slot] == m) {
    struct kvm_userspace_memory_region r;
    memset(&r, 0, sizeof r);
    r.slot = m->slot;
    r.guest_phys_addr = m->guest;
    r.memory_size = 0;
    ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r);
  }
  if (vm->regions[m->slot] == m) vm->regions[m->slot] = NULL;
  munmap(m->host, m->size);
  m->host = NULL;
  free(m->vmm_dirty);
  m->vmm_dirty = NULL;
  if (lua_getiuservalue(L, 1, 1) == LUA_TUSERDATA &&
      lua_getiuservalue(L, -1, 1) == LUA_TTABLE &&
      lua_getfield(L, -1, "memories") == LUA_TTABLE) {
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    lua_rawset(L, -3);
  }
  return 0;
}

static int l_mem_gc(lua_State *L) {
  Memory *m = tomem(L, 1);
  if (m->host) m->vm->running = 0;   /* at GC nothing can be running */
  return l_mem_close(L);
}

static int l_mem_tostring(lua_State *L) {
  Memory *m = tomem(L, 1);
  if (m->host == NULL) lua_pushliteral(L, "kvm.memory (closed)");
  else lua_pushfstring(L, "kvm.memory (slot %d, %s-%s%s)", (int)m->slot, kvm_pushhex(L, (uint64_t)(m->guest)), kvm_pushhex(L, (uint64_t)((m->guest + m->size - 1))),
                       (m->flags & KVM_MEM_READONLY) ? ", readonly" : "");
  return 1;
}

/* [off, off+len) inside the region, else raise */
static uint8_t *span(lua_State *L, Memory *m, int offarg, lua_Integer off, lua_Integer len,
                     int write) {
  uint64_t end;
  if (off < 0) luaL_argerror(L, offarg, "negative offset");
  if (len < 0) luaL_argerror(L, offarg + 1, "negative length");
  if (__builtin_add_overflow((uint64_t)off, (uint64_t)len, &end) || end > m->size)
    luaL_error(L, "range %s+%s is outside the region (size %s)", kvm_pushhex(L, (uint64_t)(off)), kvm_pushhex(L, (uint64_t)(len)), kvm_pushhex(L, (uint64_t)(m->size)));
  if (write) kvm_mem_mark(m, (uint64_t)off, (uint64_t)len);   /* for a snapshot restore */
  return m->host + off;
}

static int l_mem_read(lua_State *L) {
  Memory *m = kvm_checkmemory(L, 1);
  lua_Integer off = luaL_checkinteger(L, 2), len = luaL_checkinteger(L, 3);
  uint8_t *p = span(L, m, 2, off, len, 0);
  lua_pushlstring(L, (const char *)p, (size_t)len);
  return 1;
}

static int l_mem_write(lua_State *L) {
  Memory *m = kvm_checkmemory(L, 1);
  lua_Integer off = luaL_checkinteger(L, 2);
  size_t len;
  const char *s = luaL_checklstring(L, 3, &len);
  uint8_t *p = span(L, m, 2, off, (lua_Integer)len, 1);
  memcpy(p, s, len);
  return 0;
}

/*** Fill len bytes at off with byte.
@function memory:fill
*/
static int l_mem_fill(lua_State *L) {
  Memory *m = kvm_checkmemory(L, 1);
  lua_Integer off = luaL_checkinteger(L, 2), len = luaL_checkinteger(L, 3);
  int byte = (int)kvm_checkrange(L, 4, 0, 255, "byte");
  uint8_t *p = span(L, m, 2, off, len, 1);
  memset(p, byte, (size_t)len);
  return 0;
}

/* get (valarg absent) or set a little-endian value of width bytes at p */
int kvm_mem_access(lua_State *L, uint8_t *p, int width, int valarg) {
  if (lua_isnoneornil(L, valarg)) {
    uint64_t v = 0;
    memcpy(&v, p, (size_t)width);   /* x86-64 is little-endian */
    lua_pushinteger(L, (lua_Integer)v);
    return 1;
  }
  lua_Integer v = luaL_checkinteger(L, valarg);
  if (width < 8) {
    lua_Integer lim = (lua_Integer)1 << (8 * width);
    luaL_argcheck(L, v >= -(lim >> 1) && v < lim, valarg, "value does not fit");
  }
  memcpy(p, &v, (size_t)width);
  return 0;
}

static int mem_uN(lua_State *L, int width) {
  Memory *m = kvm_checkmemory(L, 1);
  lua_Integer off = luaL_checkinteger(L, 2);
  return kvm_mem_access(L, span(L, m, 2, off, width, !lua_isnoneornil(L, 3)), width, 3);
}
static int l_mem_u8(lua_State *L) { return mem_uN(L, 1); }
static int l_mem_u16(lua_State *L) { return mem_uN(L, 2); }
static int l_mem_u32(lua_State *L) { return mem_uN(L, 4); }
static int l_mem_u64(lua_State *L) { return mem_uN(L, 8); }

/*** Copy a file (or part of it) straight into the region: no Lua string.
@function memory:load
@tparam integer off offset in the region
@tparam string path
@tparam[opt=0] integer file_off
@tparam[opt] integer len bytes (default: to the end of the file)
@treturn integer bytes loaded
@return[2] fail, message, errno (missing file, or it does not fit)
*/
static int l_mem_load(lua_State *L) {
  Memory *m = kvm_checkmemory(L, 1);
  lua_Integer off = luaL_checkinteger(L, 2);
  const char *path = luaL_checkstring(L, 3);
  lua_Integer foff = luaL_optinteger(L, 4, 0);
  luaL_argcheck(L, off >= 0, 2, "negative offset");
  luaL_argcheck(L, foff >= 0, 4, "negative file offset");
  lua_Integer want = luaL_optinteger(L, 5, -1);
  luaL_argcheck(L, want >= -1, 5, "negative length");
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int en = errno;
    luaL_pushfail(L);
    lua_pushfstring(L, "%s: %s", path, strerror(en));
    lua_pushinteger(L, en);
    return 3;
  }
  struct stat st;
  int bad = fstat(fd, &st) < 0 ? errno : 0;
  if (bad || !S_ISREG(st.st_mode)) {
    int en = bad ? bad : S_ISDIR(st.st_mode) ? EISDIR : 0;
    close(fd);
    luaL_pushfail(L);
    lua_pushfstring(L, "%s: %s", path, en ? strerror(en) : "not a regular file");
    lua_pushinteger(L, en ? en : EINVAL);
    return 3;
  }
  uint64_t fsize = (uint64_t)st.st_size;
  const char *err = NULL;
  uint64_t len = 0, end;
  if ((uint64_t)foff > fsize) err = "file offset is past the end of the file";
  else {
    len = want < 0 ? fsize - (uint64_t)foff : (uint64_t)want;
    if ((uint64_t)foff + len > fsize) err = "file is shorter than the length asked for";
    else if (__builtin_add_overflow((uint64_t)off, len, &end) || end > m->size)
      err = "file does not fit in the region";
  }
  if (err) {
    close(fd);
    lua_pushfstring(L, "%s: %s (%I bytes at offset %s, region size %s)", path, err,
                    (lua_Integer)len, kvm_pushhex(L, (uint64_t)(off)), kvm_pushhex(L, (uint64_t)(m->size)));
    luaL_pushfail(L);
    lua_insert(L, -2);
    lua_pushinteger(L, EINVAL);
    return 3;
  }
  uint64_t done = 0;
  kvm_mem_mark(m, (uint64_t)off, len);
  while (done < len) {
    ssize_t n = pread(fd, m->host + off + done, len - done, (off_t)(foff + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int en = n < 0 ? errno : EIO;
      close(fd);
      errno = en;
      return kvm_fail(L, path);
    }
    done += (uint64_t)n;
  }
  close(fd);
  lua_pushinteger(L, (lua_Integer)len);
  return 1;
}

/*** Pages written since the last call (needs dirty_log = true): an array
of page indices within the region (KVM_GET_DIRTY_LOG).
@function memory:dirty_pages
*/
static int l_mem_dirty_pages(lua_State *L) {
  Memory *m = kvm_checkmemory(L, 1);
  if (!(m->flags & KVM_MEM_LOG_DIRTY_PAGES))
    return luaL_error(L, "memory region was created without dirty_log = true");
  if (m->vm->fd < 0) return luaL_error(L, "attempt to use a closed kvm.vm");
  uint64_t pages = m->size / PAGE;
  size_t words = (size_t)((pages + 63) / 64);
  uint64_t *bm = lua_newuserdatauv(L, words * 8, 0);
  memset(bm, 0, words * 8);
  struct kvm_dirty_log dl;
  memset(&dl, 0, sizeof dl);
  dl.slot = m->slot;
  dl.dirty_bitmap = bm;
  if (ioctl(m->vm->fd, KVM_GET_DIRTY_LOG, &dl) < 0) return kvm_fail(L, "KVM_GET_DIRTY_LOG");
  if (m->vmm_dirty)   /* the log is cleared: a snapshot restore must still see these */
    for (size_t w = 0; w < words; w++)
      if (bm[w]) __atomic_fetch_or(&m->vmm_dirty[w], bm[w], __ATOMIC_RELAXED);
  lua_newtable(L);
  int k = 1;
  for (size_t w = 0; w < words; w++)
    for (uint64_t b = bm[w]; b; b &= b - 1) {
      /* NOLINTNEXTLINE(bugprone-misplaced-widening-cast): w * 64 < 2^63 (a page index) */
      lua_pushinteger(L, (lua_Integer)(w * 64 + (size_t)__builtin_ctzll(b)));
      lua_rawseti(L, -2, k++);
    }
  return 1;
}

static int l_mem_index(lua_State *L) {
  Memory *m = tomem(L, 1);
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "guest") == 0) { lua_pushinteger(L, (lua_Integer)m->guest); return 1; }
  if (strcmp(k, "size") == 0) { lua_pushinteger(L, (lua_Integer)m->size); return 1; }
  if (strcmp(k, "slot") == 0) { lua_pushinteger(L, m->slot); return 1; }
  if (strcmp(k, "readonly") == 0) { lua_pushboolean(L, (m->flags & KVM_MEM_READONLY) != 0); return 1; }
  if (strcmp(k, "closed") == 0) { lua_pushboolean(L, m->host == NULL); return 1; }
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

static const luaL_Reg mem_methods[] = {
  {"close", l_mem_close},
  {"read", l_mem_read},
  {"write", l_mem_write},
  {"fill", l_mem_fill},
  {"load", l_mem_load},
  {"u8", l_mem_u8}, {"u16", l_mem_u16}, {"u32", l_mem_u32}, {"u64", l_mem_u64},
  {"dirty_pages", l_mem_dirty_pages},
  {NULL, NULL}
};

void kvm_open_memory(lua_State *L) {
  static const luaL_Reg meta[] = {
    {"__index", l_mem_index},
    {"__gc", l_mem_gc},
    {"__close", l_mem_close},
    {"__tostring", l_mem_tostring},
    {NULL, NULL}
  };
  kvm_new_class(L, MEMORY_MT, mem_methods, meta);
}
