/*
** vcpu.c - kvm.vcpu: registers, CPUID, MSRs, events, and the run loop
** with port/MMIO dispatch to C devices and Lua handlers.
*/

/***
A virtual CPU, made by `vm:vcpu(id)`: registers, CPUID, MSRs, events, run().
@classmod kvm.vcpu
*/
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "luakvm.h"

static Vcpu *tovcpu(lua_State *L, int arg) {
  return (Vcpu *)luaL_checkudata(L, arg, VCPU_MT);
}

Vcpu *kvm_checkvcpu(lua_State *L, int arg) {
  Vcpu *c = tovcpu(L, arg);
  if (c->fd < 0) luaL_error(L, "attempt to use a closed kvm.vcpu");
  return c;
}

/*** Create vCPU id (KVM_CREATE_VCPU) and map its kvm_run page.
@function vm:vcpu
@tparam integer id 0..
@treturn kvm.vcpu
@return[2] fail, message, errno
*/
int l_vm_vcpu(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  lua_Integer id = luaL_checkinteger(L, 2);
  luaL_argcheck(L, id >= 0, 2, "negative id");
  luaL_argcheck(L, id <= 4095, 2, "id too large");
  Vcpu *c = lua_newuserdatauv(L, sizeof(Vcpu), 1);
  memset(c, 0, sizeof *c);
  c->fd = -1;
  luaL_setmetatable(L, VCPU_MT);
  lua_pushvalue(L, 1);
  lua_setiuservalue(L, -2, 1);   /* pin the VM */
  int fd = ioctl(vm->fd, KVM_CREATE_VCPU, (unsigned long)id);
  if (fd < 0) return kvm_fail(L, "KVM_CREATE_VCPU");
  void *run = mmap(NULL, (size_t)vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (run == MAP_FAILED) {
    int en = errno;
    close(fd);
    errno = en;
    return kvm_fail(L, "mmap kvm_run");
  }
  c->fd = fd;
  c->id = (int)id;
  c->vm = vm;
  c->run = run;
  c->run_size = (size_t)vm->run_size;
  return 1;
}

static int l_vcpu_close(lua_State *L) {
  Vcpu *c = tovcpu(L, 1);
  if (c->fd < 0) return 0;
  if (c->running) return luaL_error(L, "cannot close a kvm.vcpu while it runs");
  munmap(c->run, c->run_size);
  c->run = NULL;
  close(c->fd);
  c->fd = -1;
  return 0;
}

static int l_vcpu_gc(lua_State *L) {
  Vcpu *c = tovcpu(L, 1);
  c->running = 0;
  return l_vcpu_close(L);
}

static int l_vcpu_tostring(lua_State *L) {
  Vcpu *c = tovcpu(L, 1);
  if (c->fd < 0) lua_pushliteral(L, "kvm.vcpu (closed)");
  else lua_pushfstring(L, "kvm.vcpu %d (fd %d)", c->id, c->fd);
  return 1;
}

/* ---- table <-> struct helpers ---- */

typedef struct Field { const char *name; size_t off; int size; } Field;
#define F(T, f) {#f, offsetof(T, f), (int)sizeof(((T *)0)->f)}

static void push_fields(lua_State *L, const void *base, const Field *f) {
  for (; f->name; f++) {
    uint64_t v = 0;
    memcpy(&v, (const char *)base + f->off, (size_t)f->size);
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, f->name);
  }
}

/* set base's field named k from the value at the stack top; 0 if unknown.
   Errors name the field `shown` in `ctx`. */
static int set_field_as(lua_State *L, void *base, const Field *f, const char *k,
                        const char *shown, const char *ctx) {
  for (; f->name; f++) {
    if (strcmp(f->name, k) == 0) {
      k = shown;
      int ok;
      lua_Integer v = lua_tointegerx(L, -1, &ok);
      if (!ok && lua_isboolean(L, -1)) { v = lua_toboolean(L, -1); ok = 1; }
      if (!ok) luaL_error(L, "bad field '%s' in %s (integer expected, got %s)", k, ctx,
                          luaL_typename(L, -1));
      if (f->size < 8) {
        lua_Integer lim = (lua_Integer)1 << (8 * f->size);
        if (v < -(lim >> 1) || v >= lim)
          luaL_error(L, "bad field '%s' in %s (value out of range)", k, ctx);
      }
      memcpy((char *)base + f->off, &v, (size_t)f->size);
      return 1;
    }
  }
  return 0;
}

static int set_field(lua_State *L, void *base, const Field *f, const char *k, const char *ctx) {
  return set_field_as(L, base, f, k, k, ctx);
}

static const Field regs_fields[] = {
  F(struct kvm_regs, rax), F(struct kvm_regs, rbx), F(struct kvm_regs, rcx),
  F(struct kvm_regs, rdx), F(struct kvm_regs, rsi), F(struct kvm_regs, rdi),
  F(struct kvm_regs, rsp), F(struct kvm_regs, rbp), F(struct kvm_regs, r8),
  F(struct kvm_regs, r9), F(struct kvm_regs, r10), F(struct kvm_regs, r11),
  F(struct kvm_regs, r12), F(struct kvm_regs, r13), F(struct kvm_regs, r14),
  F(struct kvm_regs, r15), F(struct kvm_regs, rip), F(struct kvm_regs, rflags),
  {NULL, 0, 0}
};

/*** General registers as {rax=, ..., r15=, rip=, rflags=} (KVM_GET_REGS).
@function vcpu:regs
*/
static int l_vcpu_regs(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  struct kvm_regs r;
  if (ioctl(c->fd, KVM_GET_REGS, &r) < 0) return kvm_fail(L, "KVM_GET_REGS");
  lua_createtable(L, 0, 18);
  push_fields(L, &r, regs_fields);
  return 1;
}

/*** Set general registers; only the keys given change (KVM_SET_REGS).
@function vcpu:set_regs
*/
static int l_vcpu_set_regs(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  struct kvm_regs r;
  if (ioctl(c->fd, KVM_GET_REGS, &r) < 0) return kvm_fail(L, "KVM_GET_REGS");
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    if (k == NULL || !set_field(L, &r, regs_fields, k, "registers"))
      return luaL_error(L, "bad key '%s' in registers (unknown register)",
                        luaL_tolstring(L, -2, NULL));
    lua_pop(L, 1);
  }
  if (ioctl(c->fd, KVM_SET_REGS, &r) < 0) return kvm_fail(L, "KVM_SET_REGS");
  lua_pushboolean(L, 1);
  return 1;
}

static const Field seg_fields[] = {
  F(struct kvm_segment, base), F(struct kvm_segment, limit),
  F(struct kvm_segment, selector), F(struct kvm_segment, type),
  F(struct kvm_segment, present), F(struct kvm_segment, dpl),
  F(struct kvm_segment, db), F(struct kvm_segment, s), F(struct kvm_segment, l),
  F(struct kvm_segment, g), F(struct kvm_segment, avl), F(struct kvm_segment, unusable),
  {NULL, 0, 0}
};
static const Field dt_fields[] = {
  F(struct kvm_dtable, base), F(struct kvm_dtable, limit), {NULL, 0, 0}
};
static const Field sregs_scalars[] = {
  F(struct kvm_sregs, cr0), F(struct kvm_sregs, cr2), F(struct kvm_sregs, cr3),
  F(struct kvm_sregs, cr4), F(struct kvm_sregs, cr8), F(struct kvm_sregs, efer),
  F(struct kvm_sregs, apic_base), {NULL, 0, 0}
};
static const struct { const char *name; size_t off; int dt; } sregs_parts[] = {
  {"cs", offsetof(struct kvm_sregs, cs), 0}, {"ds", offsetof(struct kvm_sregs, ds), 0},
  {"es", offsetof(struct kvm_sregs, es), 0}, {"fs", offsetof(struct kvm_sregs, fs), 0},
  {"gs", offsetof(struct kvm_sregs, gs), 0}, {"ss", offsetof(struct kvm_sregs, ss), 0},
  {"tr", offsetof(struct kvm_sregs, tr), 0}, {"ldt", offsetof(struct kvm_sregs, ldt), 0},
  {"gdt", offsetof(struct kvm_sregs, gdt), 1}, {"idt", offsetof(struct kvm_sregs, idt), 1},
  {NULL, 0, 0}
};

/*** Special registers: segments cs..ss, tr, ldt as {base, limit, selector,
type, present, dpl, db, s, l, g, avl, unusable}; gdt, idt as {base, limit};
cr0, cr2, cr3, cr4, cr8, efer, apic_base (KVM_GET_SREGS).
@function vcpu:sregs
*/
static int l_vcpu_sregs(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  struct kvm_sregs s;
  if (ioctl(c->fd, KVM_GET_SREGS, &s) < 0) return kvm_fail(L, "KVM_GET_SREGS");
  lua_createtable(L, 0, 17);
  for (int i = 0; sregs_parts[i].name; i++) {
    lua_createtable(L, 0, 12);
    push_fields(L, (char *)&s + sregs_parts[i].off, sregs_parts[i].dt ? dt_fields : seg_fields);
    lua_setfield(L, -2, sregs_parts[i].name);
  }
  push_fields(L, &s, sregs_scalars);
  return 1;
}

/*** Set special registers: only the keys given, and of a segment only the
fields given (KVM_SET_SREGS).
@function vcpu:set_sregs
*/
static int l_vcpu_set_sregs(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  struct kvm_sregs s;
  if (ioctl(c->fd, KVM_GET_SREGS, &s) < 0) return kvm_fail(L, "KVM_GET_SREGS");
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    int done = 0;
    if (k) {
      for (int i = 0; !done && sregs_parts[i].name; i++) {
        if (strcmp(k, sregs_parts[i].name)) continue;
        if (!lua_istable(L, -1))
          luaL_error(L, "bad key '%s' in special registers (table expected, got %s)", k,
                     luaL_typename(L, -1));
        lua_pushnil(L);
        while (lua_next(L, -2)) {
          const char *fk = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
          if (fk == NULL || !set_field(L, (char *)&s + sregs_parts[i].off,
                                       sregs_parts[i].dt ? dt_fields : seg_fields, fk, k))
            luaL_error(L, "bad field '%s' in %s (unknown field)", luaL_tolstring(L, -2, NULL), k);
          lua_pop(L, 1);
        }
        done = 1;
      }
      if (!done) done = set_field(L, &s, sregs_scalars, k, "special registers");
    }
    if (!done)
      return luaL_error(L, "bad key '%s' in special registers (unknown register)",
                        luaL_tolstring(L, -2, NULL));
    lua_pop(L, 1);
  }
  if (ioctl(c->fd, KVM_SET_SREGS, &s) < 0) return kvm_fail(L, "KVM_SET_SREGS");
  lua_pushboolean(L, 1);
  return 1;
}

/*** Set the CPUID the guest sees (KVM_SET_CPUID2), from an array in the
form supported_cpuid() returns.
@function vcpu:set_cpuid
*/
static int l_vcpu_set_cpuid(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer n = luaL_len(L, 2);
  luaL_argcheck(L, n >= 0 && n <= 1024, 2, "too many entries (at most 1024)");
  size_t sz = sizeof(struct kvm_cpuid2) + (size_t)n * sizeof(struct kvm_cpuid_entry2);
  struct kvm_cpuid2 *cp = lua_newuserdatauv(L, sz, 0);   /* GC-owned buffer */
  memset(cp, 0, sz);
  cp->nent = (uint32_t)n;
  static const Field ef[] = {
    {"func", offsetof(struct kvm_cpuid_entry2, function), 4},
    F(struct kvm_cpuid_entry2, index), F(struct kvm_cpuid_entry2, flags),
    F(struct kvm_cpuid_entry2, eax), F(struct kvm_cpuid_entry2, ebx),
    F(struct kvm_cpuid_entry2, ecx), F(struct kvm_cpuid_entry2, edx), {NULL, 0, 0}
  };
  for (lua_Integer i = 1; i <= n; i++) {
    if (lua_rawgeti(L, 2, i) != LUA_TTABLE)
      return luaL_error(L, "bad entry %d in cpuid (table expected)", (int)i);
    for (const Field *f = ef; f->name; f++) {
      lua_getfield(L, -1, f->name);
      if (!lua_isnil(L, -1)) {
        /* values above 2^31 given as positive integers are fine for u32 */
        set_field(L, &cp->entries[i - 1], f, f->name, "cpuid entry");
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
  }
  if (ioctl(c->fd, KVM_SET_CPUID2, cp) < 0) return kvm_fail(L, "KVM_SET_CPUID2");
  lua_pushboolean(L, 1);
  return 1;
}

/*** Read MSRs: msrs{index, ...} --> {[index] = value} (KVM_GET_MSRS).
@function vcpu:msrs
@return[2] fail, message, errno (an MSR KVM does not know)
*/
static int l_vcpu_msrs(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_Integer n = luaL_len(L, 2);
  luaL_argcheck(L, n >= 0 && n <= 256, 2, "at most 256 MSRs");
  size_t sz = sizeof(struct kvm_msrs) + (size_t)n * sizeof(struct kvm_msr_entry);
  struct kvm_msrs *m = lua_newuserdatauv(L, sz, 0);
  memset(m, 0, sz);
  m->nmsrs = (uint32_t)n;
  for (lua_Integer i = 1; i <= n; i++) {
    lua_rawgeti(L, 2, i);
    int ok;
    lua_Integer idx = lua_tointegerx(L, -1, &ok);
    if (!ok || idx < 0 || idx > 0xffffffffLL)
      return luaL_error(L, "bad MSR index at position %d", (int)i);
    m->entries[i - 1].index = (uint32_t)idx;
    lua_pop(L, 1);
  }
  int got = ioctl(c->fd, KVM_GET_MSRS, m);
  if (got < 0) return kvm_fail(L, "KVM_GET_MSRS");
  if (got < n) {
    lua_pushfstring(L, "KVM_GET_MSRS: MSR %s cannot be read", kvm_pushhex(L, (uint64_t)(m->entries[got].index)));
    luaL_pushfail(L);
    lua_insert(L, -2);
    lua_pushinteger(L, EINVAL);
    return 3;
  }
  lua_createtable(L, 0, (int)n);
  for (int i = 0; i < got; i++) {
    lua_pushinteger(L, (lua_Integer)m->entries[i].data);
    lua_rawseti(L, -2, m->entries[i].index);
  }
  return 1;
}

/*** Write MSRs: set_msrs{[index] = value} (KVM_SET_MSRS).
@function vcpu:set_msrs
*/
static int l_vcpu_set_msrs(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  int n = 0;
  lua_pushnil(L);
  while (lua_next(L, 2)) { n++; lua_pop(L, 1); }
  luaL_argcheck(L, n <= 256, 2, "at most 256 MSRs");
  size_t sz = sizeof(struct kvm_msrs) + (size_t)n * sizeof(struct kvm_msr_entry);
  struct kvm_msrs *m = lua_newuserdatauv(L, sz, 0);
  memset(m, 0, sz);
  int i = 0;
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    int ok1, ok2;
    lua_Integer idx = lua_tointegerx(L, -2, &ok1), v = lua_tointegerx(L, -1, &ok2);
    if (!ok1 || !ok2 || idx < 0 || idx > 0xffffffffLL)
      return luaL_error(L, "bad MSR entry (integer index and value expected)");
    m->entries[i].index = (uint32_t)idx;
    m->entries[i].data = (uint64_t)v;
    i++;
    lua_pop(L, 1);
  }
  m->nmsrs = (uint32_t)n;
  int got = ioctl(c->fd, KVM_SET_MSRS, m);
  if (got < 0) return kvm_fail(L, "KVM_SET_MSRS");
  if (got < n) {
    lua_pushfstring(L, "KVM_SET_MSRS: MSR %s was refused", kvm_pushhex(L, (uint64_t)(m->entries[got].index)));
    luaL_pushfail(L);
    lua_insert(L, -2);
    lua_pushinteger(L, EINVAL);
    return 3;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static const Field ev_exc[] = {
  F(struct kvm_vcpu_events, exception.injected), F(struct kvm_vcpu_events, exception.nr),
  F(struct kvm_vcpu_events, exception.has_error_code),
  F(struct kvm_vcpu_events, exception.pending), F(struct kvm_vcpu_events, exception.error_code),
  {NULL, 0, 0}
};
static const Field ev_int[] = {
  F(struct kvm_vcpu_events, interrupt.injected), F(struct kvm_vcpu_events, interrupt.nr),
  F(struct kvm_vcpu_events, interrupt.soft), F(struct kvm_vcpu_events, interrupt.shadow),
  {NULL, 0, 0}
};
static const Field ev_nmi[] = {
  F(struct kvm_vcpu_events, nmi.injected), F(struct kvm_vcpu_events, nmi.pending),
  F(struct kvm_vcpu_events, nmi.masked), {NULL, 0, 0}
};
static const struct { const char *name; const Field *f; } ev_parts[] = {
  {"exception", ev_exc}, {"interrupt", ev_int}, {"nmi", ev_nmi}, {NULL, NULL}
};

/* field names inside a part lose the "part." prefix */
static void push_part(lua_State *L, const struct kvm_vcpu_events *e, const Field *f) {
  lua_newtable(L);
  for (; f->name; f++) {
    uint64_t v = 0;
    memcpy(&v, (const char *)e + f->off, (size_t)f->size);
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, strchr(f->name, '.') + 1);
  }
}

/*** Pending events: {exception = {injected, nr, has_error_code, pending,
error_code}, interrupt = {injected, nr, soft, shadow}, nmi = {injected,
pending, masked}, sipi_vector} (KVM_GET_VCPU_EVENTS).
@function vcpu:events
*/
static int l_vcpu_events(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  struct kvm_vcpu_events e;
  if (ioctl(c->fd, KVM_GET_VCPU_EVENTS, &e) < 0) return kvm_fail(L, "KVM_GET_VCPU_EVENTS");
  lua_createtable(L, 0, 4);
  for (int i = 0; ev_parts[i].name; i++) {
    push_part(L, &e, ev_parts[i].f);
    lua_setfield(L, -2, ev_parts[i].name);
  }
  lua_pushinteger(L, e.sipi_vector);
  lua_setfield(L, -2, "sipi_vector");
  return 1;
}

/*** Set events, e.g. inject #BP: set_events{exception = {injected = 1, nr = 3}}.
Only the given fields change (KVM_SET_VCPU_EVENTS).
@function vcpu:set_events
*/
static int l_vcpu_set_events(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  struct kvm_vcpu_events e;
  if (ioctl(c->fd, KVM_GET_VCPU_EVENTS, &e) < 0) return kvm_fail(L, "KVM_GET_VCPU_EVENTS");
  e.flags = 0;
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
    int part = -1;
    for (int i = 0; ev_parts[i].name; i++)
      if (strcmp(k, ev_parts[i].name) == 0) part = i;
    if (strcmp(k, "sipi_vector") == 0) {
      int ok;
      lua_Integer v = lua_tointegerx(L, -1, &ok);
      if (!ok || v < 0 || v > 0xffffffffLL)
        return luaL_error(L, "bad field 'sipi_vector' in events (integer expected, got %s)",
                          luaL_typename(L, -1));
      e.sipi_vector = (uint32_t)v;
      e.flags |= KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    } else if (part < 0 || !lua_istable(L, -1)) {
      return luaL_error(L, "bad key '%s' in events", k);
    } else {
      lua_pushnil(L);
      while (lua_next(L, -2)) {
        const char *fk = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "?";
        char full[64];
        snprintf(full, sizeof full, "%s.%s", ev_parts[part].name, fk);
        if (!set_field_as(L, &e, ev_parts[part].f, full, fk, k))
          luaL_error(L, "bad field '%s' in %s (unknown field)", fk, k);
        if (part == 2 && strcmp(fk, "pending") == 0) e.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
        if (part == 1 && strcmp(fk, "shadow") == 0) e.flags |= KVM_VCPUEVENT_VALID_SHADOW;
        lua_pop(L, 1);
      }
    }
    lua_pop(L, 1);
  }
  if (ioctl(c->fd, KVM_SET_VCPU_EVENTS, &e) < 0) return kvm_fail(L, "KVM_SET_VCPU_EVENTS");
  lua_pushboolean(L, 1);
  return 1;
}

static const Field fpu_fields[] = {
  F(struct kvm_fpu, fcw), F(struct kvm_fpu, fsw), F(struct kvm_fpu, ftwx),
  F(struct kvm_fpu, last_opcode), F(struct kvm_fpu, last_ip), F(struct kvm_fpu, last_dp),
  F(struct kvm_fpu, mxcsr), {NULL, 0, 0}
};

/*** x87/SSE state: {fcw, fsw, ftwx, last_opcode, last_ip, last_dp, mxcsr,
fpr = {8 strings of 16 bytes}, xmm = {16 strings of 16 bytes}} (KVM_GET_FPU).
@function vcpu:fpu
*/
static int l_vcpu_fpu(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  struct kvm_fpu f;
  if (ioctl(c->fd, KVM_GET_FPU, &f) < 0) return kvm_fail(L, "KVM_GET_FPU");
  lua_createtable(L, 0, 9);
  push_fields(L, &f, fpu_fields);
  lua_createtable(L, 8, 0);
  for (int i = 0; i < 8; i++) {
    lua_pushlstring(L, (const char *)f.fpr[i], 16);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "fpr");
  lua_createtable(L, 16, 0);
  for (int i = 0; i < 16; i++) {
    lua_pushlstring(L, (const char *)f.xmm[i], 16);
    lua_rawseti(L, -2, i + 1);
  }
  lua_setfield(L, -2, "xmm");
  return 1;
}

/* copy up to n 16-byte strings from the array at the stack top into dst */
static void set_blocks(lua_State *L, uint8_t (*dst)[16], int n, const char *name) {
  for (int i = 0; i < n; i++) {
    if (lua_rawgeti(L, -1, i + 1) != LUA_TNIL) {
      size_t len;
      const char *b = lua_tolstring(L, -1, &len);
      if (b == NULL || len != 16 || lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "bad field '%s[%d]' in fpu (16-byte string expected)", name, i + 1);
      /* NOLINTNEXTLINE(clang-analyzer-core.NonNullParamChecker): luaL_error does not return */
      memcpy(dst[i], b, 16);
    }
    lua_pop(L, 1);
  }
}

/*** Set x87/SSE state; only the keys given change (KVM_SET_FPU).
@function vcpu:set_fpu
*/
static int l_vcpu_set_fpu(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  struct kvm_fpu f;
  if (ioctl(c->fd, KVM_GET_FPU, &f) < 0) return kvm_fail(L, "KVM_GET_FPU");
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    if (k && strcmp(k, "fpr") == 0 && lua_istable(L, -1)) set_blocks(L, f.fpr, 8, k);
    else if (k && strcmp(k, "xmm") == 0 && lua_istable(L, -1)) set_blocks(L, f.xmm, 16, k);
    else if (k == NULL || !set_field(L, &f, fpu_fields, k, "fpu"))
      return luaL_error(L, "bad key '%s' in fpu (unknown field)", luaL_tolstring(L, -2, NULL));
    lua_pop(L, 1);
  }
  if (ioctl(c->fd, KVM_SET_FPU, &f) < 0) return kvm_fail(L, "KVM_SET_FPU");
  lua_pushboolean(L, 1);
  return 1;
}

/*** Translate a guest-virtual address with the guest's page tables
(KVM_TRANSLATE): gpa, or nil when unmapped.
@function vcpu:translate
*/
static int l_vcpu_translate(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  struct kvm_translation t;
  memset(&t, 0, sizeof t);
  t.linear_address = (uint64_t)luaL_checkinteger(L, 2);
  if (ioctl(c->fd, KVM_TRANSLATE, &t) < 0) return kvm_fail(L, "KVM_TRANSLATE");
  if (!t.valid) { luaL_pushfail(L); return 1; }
  lua_pushinteger(L, (lua_Integer)t.physical_address);
  lua_pushboolean(L, t.writeable);
  return 2;
}

/*** Make the current or next run() return with reason "stopped" (or the
reason given: "poweroff" or "reset", as a device that turned the machine off
or reset it would). Callable from a handler.
@function vcpu:stop
@tparam[opt="stopped"] string reason
*/
static int l_vcpu_stop(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  int why = luaL_checkoption(L, 2, "stopped", kvm_stop_reasons + 1) + 1;
  if (why > c->stop) c->stop = why;
  if (c->run) c->run->immediate_exit = 1;
  return 0;
}

const char *kvm_exit_name(uint32_t reason);

/*** Per-vCPU counters: {exits = n, by_reason = {hlt = n, ...}, run_seconds, handler_seconds}.
@function vcpu:stats
*/
static int l_vcpu_stats(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, (lua_Integer)c->exits); lua_setfield(L, -2, "exits");
  lua_newtable(L);
  for (int i = 0; i < 64; i++)
    if (c->exits_by_reason[i]) {
      lua_pushinteger(L, (lua_Integer)c->exits_by_reason[i]);
      lua_setfield(L, -2, kvm_exit_name((uint32_t)i));
    }
  lua_setfield(L, -2, "by_reason");
  lua_pushnumber(L, (double)c->ns_in_run / 1e9); lua_setfield(L, -2, "run_seconds");
  lua_pushnumber(L, (double)c->ns_in_handlers / 1e9); lua_setfield(L, -2, "handler_seconds");
  return 1;
}

/* ================================================================ */
/* the run loop                                                     */

#define SIG_TICK (SIGRTMIN + 2)

static __thread struct kvm_run *volatile tl_run;
static __thread volatile sig_atomic_t tl_tick, tl_int;
static int tick_installed;

static void on_tick(int sig) {
  (void)sig;
  tl_tick = 1;
  if (tl_run) tl_run->immediate_exit = 1;
}

static void on_int(int sig) {
  (void)sig;
  tl_int = 1;
  if (tl_run) tl_run->immediate_exit = 1;
}

typedef struct RunState {
  Vcpu *c;
  Vm *vm;
  int unclaimed_ignore;
  uint64_t max_exits;
  uint64_t deadline;        /* ns, 0 = none */
  timer_t timer;
  int has_timer;
  struct sigaction old_int;
  int int_installed;
  const char *why;          /* synthetic reason when returning */
  uint64_t halted_since;    /* ns: first tick that saw the vCPU halted for good */
  uint64_t halted_rip;
  int debug_code;
} RunState;

/* stack slots during run() */
enum { S_VCPU = 1, S_VM = 3, S_TAB, S_MSGH, S_IN, S_OUT, S_STOP, S_TOP = S_STOP };

static int traceback(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      msg = lua_tostring(L, -1);
    else
      msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

static int run_setup(lua_State *L, RunState *rs) {
  if (!tick_installed) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_tick;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIG_TICK, &sa, NULL) < 0) return kvm_fail(L, "sigaction");
    tick_installed = 1;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_int;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGINT, &sa, &rs->old_int) == 0) rs->int_installed = 1;
  uint64_t period = 0;
  if (rs->vm->serial.enabled && rs->vm->serial.in_fd >= 0) period = 10000000;   /* 10 ms */
  else if (rs->vm->has_irqchip) period = 50000000;   /* 50 ms: halted for good? */
  if (rs->deadline || period) {
    struct sigevent sev;
    memset(&sev, 0, sizeof sev);
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIG_TICK;
#ifdef sigev_notify_thread_id
    sev.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
#else
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);
#endif
    if (timer_create(CLOCK_MONOTONIC, &sev, &rs->timer) < 0) return kvm_fail(L, "timer_create");
    rs->has_timer = 1;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    uint64_t first = period;
    if (rs->deadline) {
      uint64_t now = kvm_now_ns();
      uint64_t left = rs->deadline > now ? rs->deadline - now : 1;
      if (!first || left < first) first = left;
    }
    its.it_value.tv_sec = (time_t)(first / 1000000000u);
    its.it_value.tv_nsec = (long)(first % 1000000000u);
    its.it_interval.tv_sec = (time_t)(period / 1000000000u);
    its.it_interval.tv_nsec = (long)(period % 1000000000u);
    if (rs->deadline && period == 0) {
      /* one shot at the deadline, then every 10 ms in case of a race */
      its.it_interval.tv_nsec = 10000000;
    }
    timer_settime(rs->timer, 0, &its, NULL);
  }
  return 0;
}

static void run_cleanup(RunState *rs) {
  if (rs->has_timer) { timer_delete(rs->timer); rs->has_timer = 0; }
  if (rs->int_installed) { sigaction(SIGINT, &rs->old_int, NULL); rs->int_installed = 0; }
  tl_run = NULL;
  if (rs->c->run) rs->c->run->immediate_exit = 0;
  serial_end_run(&rs->vm->serial);
  rs->c->running = 0;
  rs->vm->running--;
}

/* call the Lua handler for one element; returns LUA_OK or an error status
   (message on top). *stop raised to 1, 2 or 3 when it returned kvm.STOP,
   kvm.POWEROFF or kvm.RESET. */
static int call_lua(lua_State *L, Vm *vm, Vcpu *c, Range *r, uint64_t addr, int is_write,
                    unsigned size, uint8_t *data, int *stop) {
  lua_rawgeti(L, S_TAB, r->ref);
  lua_pushinteger(L, (lua_Integer)addr);
  lua_pushvalue(L, is_write ? S_OUT : S_IN);
  lua_pushinteger(L, size);
  if (is_write) {
    uint64_t v = 0;
    memcpy(&v, data, size);
    lua_pushinteger(L, (lua_Integer)v);
  } else {
    lua_pushnil(L);
  }
  uint64_t t0 = kvm_now_ns();
  vm->in_handler++;
  int st = lua_pcall(L, 4, 1, S_MSGH);
  vm->in_handler--;
  uint64_t dt = kvm_now_ns() - t0;
  c->ns_in_handlers += dt;
  vm->stats.ns_in_handlers += dt;
  if (st != LUA_OK) {
    if (!is_write) memset(data, 0xff, size);
    return st;
  }
  int t = lua_type(L, -1);
  void *key = t == LUA_TLIGHTUSERDATA ? lua_touserdata(L, -1) : NULL;
  if (key && key >= (void *)kvm_stop_keys && key < (void *)(kvm_stop_keys + 3)) {
    int why = (int)((int *)key - kvm_stop_keys) + 1;
    if (why > *stop) *stop = why;
    if (!is_write) memset(data, 0xff, size);
  } else if (!is_write) {
    if (t == LUA_TNIL) memset(data, 0xff, size);
    else {
      int ok;
      lua_Integer v = lua_tointegerx(L, -1, &ok);
      if (!ok || t != LUA_TNUMBER) {
        memset(data, 0xff, size);
        const char *tn = luaL_typename(L, -1);
        lua_pushfstring(L, "handler for %s %s returned a %s (integer or nil expected)",
                        r >= vm->mmio && r < vm->mmio + KVM_MAX_RANGES ? "address" : "port", kvm_pushhex(L, (uint64_t)(addr)), tn);
        lua_replace(L, -3);
        lua_pop(L, 1);
        return LUA_ERRRUN;
      }
      memcpy(data, &v, size);
    }
  }
  lua_pop(L, 1);
  return LUA_OK;
}

static Range *find_range(Range *t, int n, uint64_t a) {
  int lo = 0, hi = n - 1;
  while (lo <= hi) {
    int mid = (lo + hi) / 2;
    if (a < t[mid].first) hi = mid - 1;
    else if (a > t[mid].last) lo = mid + 1;
    else return &t[mid];
  }
  return NULL;
}

/* result of dispatching one exit */
enum { D_CONTINUE, D_RETURN, D_ERROR };

static int dispatch_io(lua_State *L, RunState *rs) {
  Vcpu *c = rs->c;
  Vm *vm = rs->vm;
  struct kvm_run *run = c->run;
  unsigned size = run->io.size;
  uint32_t count = run->io.count;
  uint64_t bytes;
  int is_write = run->io.direction == KVM_EXIT_IO_OUT;
  uint16_t port = run->io.port;
  /* untrusted: the data must lie inside the kvm_run mapping */
  uint8_t *data = kvm_io_data(c, &bytes);
  if (data == NULL) {
    rs->why = "bad_io";
    return D_RETURN;
  }
  if (vm->port_hits) vm->port_hits[port] += count;
  Range *r = find_range(vm->io, vm->nio, port);
  if (r == NULL) {
    vm->stats.unclaimed_io++;
    if (!is_write) memset(data, 0xff, bytes);   /* empty bus, unless the script replies */
    return rs->unclaimed_ignore ? D_CONTINUE : D_RETURN;
  }
  r->hits += count;
  int stop = 0;
  for (uint32_t i = 0; i < count; i++, data += size) {
    if (i > 0 && r->kind == H_LUA) {
      /* a handler may have removed or replaced claims: look again */
      r = find_range(vm->io, vm->nio, port);
      if (r == NULL) {
        if (!is_write) memset(data, 0xff, (size_t)(bytes - (uint64_t)i * size));
        break;
      }
    }
    switch (r->kind) {
    case H_LUA: {
      int st = call_lua(L, vm, c, r, port, is_write, size, data, &stop);
      if (st != LUA_OK) {
        if (!is_write) memset(data, 0xff, (size_t)(bytes - (uint64_t)i * size));
        return D_ERROR;
      }
      break;
    }
    case H_SERIAL: {
      Serial *s = &vm->serial;
      for (unsigned j = 0; j < size; j++) {
        unsigned reg = (unsigned)(port - s->port) + j;
        if (reg < 8) serial_io(vm, s, reg, is_write, &data[j]);
        else if (!is_write) data[j] = 0xff;
      }
      if (s->flush_wanted && serial_flush(L, vm, S_VM, S_MSGH) != LUA_OK) {
        if (!is_write && i + 1 < count) memset(data + size, 0xff, (size_t)(bytes - (uint64_t)(i + 1) * size));
        return D_ERROR;
      }
      break;
    }
    case H_LEGACY:
      if (legacy_io(vm, &vm->legacy, port, is_write, size, data)) {
        rs->why = "reset";
        return D_RETURN;
      }
      break;
    case H_DEBUGEXIT:
      if (is_write) {
        rs->why = "debug_exit";
        rs->debug_code = data[0];
        return D_RETURN;
      }
      memset(data, 0xff, size);
      break;
    default:
      if (!is_write) memset(data, 0xff, size);
    }
    /* kvm.STOP / cpu:stop(): every element of this exit is still
       dispatched (the instruction completes), then run() returns */
  }
  if (stop) { rs->why = kvm_stop_reasons[stop]; return D_RETURN; }
  return D_CONTINUE;
}

static int dispatch_mmio(lua_State *L, RunState *rs) {
  Vcpu *c = rs->c;
  Vm *vm = rs->vm;
  struct kvm_run *run = c->run;
  unsigned len = run->mmio.len;
  uint64_t addr = run->mmio.phys_addr;
  if (len == 0 || len > 8) { rs->why = "bad_mmio"; return D_RETURN; }
  Range *r = find_range(vm->mmio, vm->nmmio, addr);
  if (r == NULL) {
    vm->stats.unclaimed_mmio++;
    if (!run->mmio.is_write) memset(run->mmio.data, 0xff, len);
    return rs->unclaimed_ignore ? D_CONTINUE : D_RETURN;
  }
  r->hits++;
  int stop = 0;
  if (r->kind == H_LUA) {
    if (call_lua(L, vm, c, r, addr, run->mmio.is_write, len, run->mmio.data, &stop) != LUA_OK)
      return D_ERROR;
  } else if (!run->mmio.is_write) {
    memset(run->mmio.data, 0xff, len);
  }
  if (stop) { rs->why = kvm_stop_reasons[stop]; return D_RETURN; }
  return D_CONTINUE;
}

/* Halted for good: with the in-kernel irqchip, HLT does not exit; a vCPU
   KVM holds halted (KVM_GET_MP_STATE) with interrupts disabled and no NMI or
   event pending can only be woken by an NMI, and nothing here sends one (a
   kernel's "System halted", or `cli; hlt`). */
static int halted_now(Vcpu *c, uint64_t *rip) {
  struct kvm_mp_state mp;
  struct kvm_regs r;
  struct kvm_vcpu_events e;
  if (ioctl(c->fd, KVM_GET_MP_STATE, &mp) < 0 || mp.mp_state != KVM_MP_STATE_HALTED) return 0;
  if (ioctl(c->fd, KVM_GET_REGS, &r) < 0 || (r.rflags & 0x200)) return 0;
  if (ioctl(c->fd, KVM_GET_VCPU_EVENTS, &e) < 0) return 0;
  *rip = r.rip;
  return !e.nmi.pending && !e.nmi.injected && !e.interrupt.injected && !e.exception.injected;
}

/* ... and stays so at the same RIP for HALTED_NS: a kernel booting on
   kvm_amd was seen halted with IF clear for a moment (and went on) */
#define HALTED_NS 1000000000u
static int halted_for_good(RunState *rs) {
  uint64_t rip, now = kvm_now_ns();
  if (!halted_now(rs->c, &rip)) { rs->halted_since = 0; return 0; }
  if (rs->halted_since == 0 || rip != rs->halted_rip) {
    rs->halted_since = now;
    rs->halted_rip = rip;
    return 0;
  }
  return now - rs->halted_since >= HALTED_NS;
}

/* the periodic tick (timer signal): the deadline, a vCPU halted for good,
   serial input, and output left without a newline (a prompt, an echoed key)
   while the guest idles */
static int run_tick(lua_State *L, RunState *rs) {
  Vm *vm = rs->vm;
  Serial *s = &vm->serial;
  tl_tick = 0;
  rs->c->run->immediate_exit = 0;
  if (rs->deadline && kvm_now_ns() >= rs->deadline) {
    rs->why = "timeout";
    return D_RETURN;
  }
  if (s->enabled && s->in_fd >= 0) serial_poll_input(vm, s);
  if (s->enabled && (s->flush_wanted || s->out_len) &&
      serial_flush(L, vm, S_VM, S_MSGH) != LUA_OK)
    return D_ERROR;
  if (vm->has_irqchip && halted_for_good(rs)) {
    rs->why = "halted";
    return D_RETURN;
  }
  return D_CONTINUE;
}

static int opt_field(lua_State *L, int t, const char *k) {
  return lua_getfield(L, t, k);
}

/*** Run the vCPU. Claimed port/MMIO exits are dispatched in C (devices) or
to Lua handlers, and KVM_RUN is re-entered without returning; run() returns
an Exit for anything not handled.
@function vcpu:run
@tparam[opt] table opts {unclaimed = "return"|"ignore", max_exits = n, timeout = seconds}
@treturn kvm.exit reason "hlt", "io", "mmio", "shutdown", "internal_error", ...,
  or the synthetic "timeout", "max_exits", "intr", "stopped", "debug_exit", "reset",
  "halted" (in-kernel irqchip: halted with interrupts disabled and nothing
  pending, at the same RIP for a second)
@return[2] fail, "KVM_RUN: ...", errno
*/
static int l_vcpu_run(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  Vm *vm = c->vm;
  if (c->running || vm->in_handler)
    return luaL_error(L, "run() called from inside a handler (re-entry is not allowed)");
  if (vm->fd < 0) return luaL_error(L, "attempt to use a closed kvm.vm");
  RunState rs;
  memset(&rs, 0, sizeof rs);
  rs.c = c;
  rs.vm = vm;
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    if (opt_field(L, 2, "unclaimed") != LUA_TNIL) {
      const char *u = lua_tostring(L, -1);
      if (u && strcmp(u, "ignore") == 0) rs.unclaimed_ignore = 1;
      else if (!u || strcmp(u, "return") != 0)
        return luaL_error(L, "bad option 'unclaimed' to 'run' (\"return\" or \"ignore\" expected)");
    }
    if (opt_field(L, 2, "max_exits") != LUA_TNIL) {
      int ok;
      lua_Integer n = lua_tointegerx(L, -1, &ok);
      if (!ok || n <= 0) return luaL_error(L, "bad option 'max_exits' to 'run' (positive integer expected)");
      rs.max_exits = (uint64_t)n;
    }
    if (opt_field(L, 2, "timeout") != LUA_TNIL) {
      int ok;
      lua_Number t = lua_tonumberx(L, -1, &ok);
      if (!ok || !(t > 0) || t > 1e9) return luaL_error(L, "bad option 'timeout' to 'run' (positive number of seconds expected)");
      rs.deadline = kvm_now_ns() + (uint64_t)(t * 1e9);
    }
  }
  lua_settop(L, 2);
  lua_getiuservalue(L, 1, 1);          /* S_VM */
  lua_getiuservalue(L, S_VM, 1);       /* S_TAB */
  lua_pushcfunction(L, traceback);     /* S_MSGH */
  lua_pushliteral(L, "in");            /* S_IN */
  lua_pushliteral(L, "out");           /* S_OUT */
  lua_pushlightuserdata(L, &kvm_stop_keys[0]);  /* S_STOP */
  luaL_checkstack(L, 16, "run loop");
  if (vm->port_hits == NULL) vm->port_hits = calloc(65536, sizeof(uint32_t));

  c->running = 1;
  vm->running++;
  int r = run_setup(L, &rs);
  if (r) { run_cleanup(&rs); return r; }
  serial_begin_run(&vm->serial);
  tl_run = c->run;
  tl_tick = 0;
  tl_int = 0;
  if (c->stop) c->run->immediate_exit = 1;

  uint64_t nexits = 0;
  int outcome = D_RETURN;
  int kvm_errno = 0;
  for (;;) {
    uint64_t t0 = kvm_now_ns();
    int rc = ioctl(c->fd, KVM_RUN, 0);
    uint64_t t1 = kvm_now_ns();
    c->ns_in_run += t1 - t0;
    vm->stats.ns_in_run += t1 - t0;
    c->seq++;
    if (rc < 0) {
      if (errno != EINTR && errno != EAGAIN) { kvm_errno = errno; break; }
      c->run->immediate_exit = 0;
      if (c->stop) { rs.why = kvm_stop_reasons[c->stop]; c->stop = 0; break; }
      if (tl_int) { rs.why = "intr"; break; }
      if (tl_tick) {
        outcome = run_tick(L, &rs);
        if (outcome != D_CONTINUE) break;
        continue;
      }
      rs.why = "intr";   /* some other signal */
      break;
    }
    uint32_t reason = c->run->exit_reason;
    c->exits++;
    c->exits_by_reason[reason & 63]++;
    vm->stats.exits_by_reason[reason & 63]++;
    nexits++;
    if (reason == KVM_EXIT_IO) outcome = dispatch_io(L, &rs);
    else if (reason == KVM_EXIT_MMIO) outcome = dispatch_mmio(L, &rs);
    else if (reason == KVM_EXIT_INTR) outcome = D_CONTINUE;
    else outcome = D_RETURN;
    if (outcome != D_CONTINUE) break;
    if (c->stop) { rs.why = kvm_stop_reasons[c->stop]; c->stop = 0; outcome = D_RETURN; break; }
    if (tl_int) { rs.why = "intr"; break; }
    if (rs.max_exits && nexits >= rs.max_exits) { rs.why = "max_exits"; break; }
    if (tl_tick && (outcome = run_tick(L, &rs)) != D_CONTINUE) break;
  }
  /* out of the loop: restore everything before anything can raise */
  run_cleanup(&rs);
  c->stop = 0;
  if (outcome == D_ERROR) {
    /* message (with traceback) on top; flush what the guest wrote so far */
    if (vm->serial.enabled && vm->serial.out_len) {
      int top = lua_gettop(L);
      (void)serial_flush(L, vm, S_VM, 0);
      lua_settop(L, top);
    }
    return lua_error(L);
  }
  if (vm->serial.enabled && vm->serial.out_len) {
    if (serial_flush(L, vm, S_VM, S_MSGH) != LUA_OK) return lua_error(L);
  }
  if (kvm_errno) { errno = kvm_errno; return kvm_fail(L, "KVM_RUN"); }
  if (rs.why && strcmp(rs.why, "debug_exit") == 0) {
    kvm_push_exit(L, 1, c, rs.why);
    lua_getiuservalue(L, -1, 2);
    lua_pushinteger(L, rs.debug_code);
    lua_setfield(L, -2, "code");
    lua_pop(L, 1);
    return 1;
  }
  return kvm_push_exit(L, 1, c, rs.why);
}

static const luaL_Reg vcpu_methods[] = {
  {"close", l_vcpu_close},
  {"regs", l_vcpu_regs},
  {"set_regs", l_vcpu_set_regs},
  {"sregs", l_vcpu_sregs},
  {"set_sregs", l_vcpu_set_sregs},
  {"set_cpuid", l_vcpu_set_cpuid},
  {"msrs", l_vcpu_msrs},
  {"set_msrs", l_vcpu_set_msrs},
  {"events", l_vcpu_events},
  {"set_events", l_vcpu_set_events},
  {"translate", l_vcpu_translate},
  {"fpu", l_vcpu_fpu},
  {"set_fpu", l_vcpu_set_fpu},
  {"run", l_vcpu_run},
  {"stop", l_vcpu_stop},
  {"stats", l_vcpu_stats},
  {NULL, NULL}
};

static int l_vcpu_index(lua_State *L) {
  Vcpu *c = tovcpu(L, 1);
  const char *k = luaL_checkstring(L, 2);
  if (strcmp(k, "id") == 0) { lua_pushinteger(L, c->id); return 1; }
  if (strcmp(k, "vm") == 0) { lua_getiuservalue(L, 1, 1); return 1; }
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_getfield(L, -1, k);
  return 1;
}

void kvm_open_vcpu(lua_State *L) {
  luaL_newmetatable(L, VCPU_MT);
  luaL_newlib(L, vcpu_methods);
  lua_setfield(L, -2, "methods");
  lua_pushcfunction(L, l_vcpu_index); lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_vcpu_gc); lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_vcpu_close); lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, l_vcpu_tostring); lua_setfield(L, -2, "__tostring");
  lua_pop(L, 1);
}
