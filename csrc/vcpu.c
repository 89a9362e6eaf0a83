/*
** vcpu.c - kvm.vcpu: the vCPU object and its state: registers, special
** registers, CPUID, MSRs, events, FPU, address translation, counters. The
** run loop is run.c.
*/

/***
A virtual CPU, made by `vm:vcpu(id)`: registers, CPUID, MSRs, events, run().
@classmod kvm.vcpu
*/
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "luakvm.h"

static Vcpu *tovcpu(lua_State *L, int arg) {
  return (Vcpu *)luaL_checkudata(L, arg, VCPU_MT);
}



/* a free slot in vm->vcpus, or raise */
static int free_slot(lua_State *L, const Vm *vm) {
  int slot = 0;
  while (slot < KVM_MAX_VCPUS && vm->vcpus[slot]) slot++;
  if (slot == KVM_MAX_VCPUS) luaL_error(L, "too many vCPUs (at most %d open)", KVM_MAX_VCPUS);
  return slot;
}

/* a closed vCPU userdata on the stack top, pinning the VM at vm_idx */
static Vcpu *new_vcpu(lua_State *L, int vm_idx) {
  vm_idx = lua_absindex(L, vm_idx);
  Vcpu *c = lua_newuserdatauv(L, sizeof(Vcpu), 1);
  memset(c, 0, sizeof *c);
  c->fd = -1;
  luaL_setmetatable(L, VCPU_MT);
  lua_pushvalue(L, vm_idx);
  lua_setiuservalue(L, -2, 1);   /* pin the VM */
  return c;
}

/* open it: its fd and kvm_run mapping, counted among the VM's vCPUs */
static void attach(Vcpu *c, Vm *vm, int slot, int id, int fd, struct kvm_run *run,
                   size_t run_size) {
  c->fd = fd;
  c->id = id;
  c->vm = vm;
  c->run = run;
  c->run_size = run_size;
  c->enter = kvm_enter;
  vm->vcpus[slot] = c;
}

/* the VM's list of its open vCPUs (vm:run's default; the VM keeps them
   alive, as its memories): the one on the top */
static void remember(lua_State *L, int vm_idx, int slot) {
  lua_getiuservalue(L, vm_idx, 1);
  if (lua_getfield(L, -1, "vcpus") == LUA_TTABLE) {
    lua_pushvalue(L, -3);
    lua_rawseti(L, -2, slot + 1);
  }
  lua_pop(L, 2);
}

Vcpu *kvm_vcpu_push(lua_State *L, int vm_idx, int id, int fd, struct kvm_run *run,
                    size_t run_size) {
  Vm *vm = kvm_checkvm(L, vm_idx);
  vm_idx = lua_absindex(L, vm_idx);
  int slot = free_slot(L, vm);
  Vcpu *c = new_vcpu(L, vm_idx);
  remember(L, vm_idx, slot);
  attach(c, vm, slot, id, fd, run, run_size);
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
  int slot = free_slot(L, vm);
  Vcpu *c = new_vcpu(L, 1);      /* before the fd: raising (no memory) leaks nothing */
  remember(L, 1, slot);
  int fd = ioctl(vm->fd, KVM_CREATE_VCPU, (unsigned long)id);
  if (fd < 0) return kvm_fail(L, "KVM_CREATE_VCPU");
  void *run = mmap(NULL, (size_t)vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (run == MAP_FAILED) {
    int en = errno;
    close(fd);
    errno = en;
    return kvm_fail(L, "mmap kvm_run");
  }
  attach(c, vm, slot, (int)id, fd, run, (size_t)vm->run_size);
  return 1;
}

static void add_stats(VcpuStats *to, const VcpuStats *from) {
  to->exits += from->exits;
  for (int i = 0; i < 64; i++) to->exits_by_reason[i] += from->exits_by_reason[i];
  to->unclaimed_io += from->unclaimed_io;
  to->unclaimed_mmio += from->unclaimed_mmio;
  to->ns_in_run += from->ns_in_run;
  to->ns_in_handlers += from->ns_in_handlers;
  to->handler_calls += from->handler_calls;
}

/* the VM's counters: what its closed vCPUs left, plus its open ones' */
void kvm_vm_stats(Vm *vm, VcpuStats *sum, uint32_t **ports) {
  *sum = vm->retired;
  for (int i = 0; i < KVM_MAX_VCPUS; i++)
    if (vm->vcpus[i]) add_stats(sum, &vm->vcpus[i]->stats);
  *ports = NULL;
  for (int i = -1; i < KVM_MAX_VCPUS; i++) {
    uint32_t *p = i < 0 ? vm->retired_ports : vm->vcpus[i] ? vm->vcpus[i]->port_hits : NULL;
    if (p == NULL) continue;
    if (*ports == NULL && (*ports = calloc(65536, sizeof(uint32_t))) == NULL) return;
    for (int k = 0; k < 65536; k++) (*ports)[k] += p[k];
  }
}

void kvm_vcpu_retire(Vcpu *c) {
  Vm *vm = c->vm;
  for (int i = 0; i < KVM_MAX_VCPUS; i++)
    if (vm->vcpus[i] == c) vm->vcpus[i] = NULL;
  add_stats(&vm->retired, &c->stats);
  if (c->port_hits && vm->retired_ports == NULL) {
    vm->retired_ports = c->port_hits;      /* the first to go hands its counters over */
  } else if (c->port_hits) {
    for (int k = 0; k < 65536; k++) vm->retired_ports[k] += c->port_hits[k];
    free(c->port_hits);
  }
  c->port_hits = NULL;
}

static int l_vcpu_close(lua_State *L) {
  Vcpu *c = tovcpu(L, 1);
  if (c->fd < 0) return 0;
  if (c->running) return luaL_error(L, "cannot close a kvm.vcpu while it runs");
  Vm *vm = c->vm;
  for (int i = 0; i < KVM_MAX_VCPUS; i++)       /* the VM lets it go */
    if (vm->vcpus[i] == c) {
      lua_getiuservalue(L, 1, 1);
      lua_getiuservalue(L, -1, 1);
      if (lua_getfield(L, -1, "vcpus") == LUA_TTABLE) {
        lua_pushnil(L);
        lua_rawseti(L, -2, i + 1);
      }
      lua_pop(L, 3);
    }
  munmap(c->run, c->run_size);
  c->run = NULL;
  close(c->fd);
  c->fd = -1;
  kvm_vcpu_retire(c);
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

/* Every key of the table at t: fn(L, key, ud) with the value on the stack
   top (key NULL when it is not a string) returns 0 for an unknown key, which
   raises `bad` formatted with the key and `what`. */
typedef int (*KeyFn)(lua_State *L, const char *k, void *ud);
static void each_key(lua_State *L, int t, KeyFn fn, void *ud, const char *bad, const char *what) {
  t = lua_absindex(L, t);
  lua_pushnil(L);
  while (lua_next(L, t)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    if (!fn(L, k, ud)) luaL_error(L, bad, luaL_tolstring(L, -2, NULL), what);
    lua_pop(L, 1);
  }
}

/* a struct and the fields of it a table may set */
typedef struct Fields { void *base; const Field *f; const char *ctx; } Fields;
static int set_one(lua_State *L, const char *k, void *ud) {
  Fields *fs = ud;
  return k && set_field(L, fs->base, fs->f, k, fs->ctx);
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
  Vcpu *c = kvm_checkvcpu_still(L, 1);
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
  Vcpu *c = kvm_checkvcpu_still(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  struct kvm_regs r;
  if (ioctl(c->fd, KVM_GET_REGS, &r) < 0) return kvm_fail(L, "KVM_GET_REGS");
  Fields fs = {&r, regs_fields, "registers"};
  each_key(L, 2, set_one, &fs, "bad key '%s' in registers (unknown register)", NULL);
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
  Vcpu *c = kvm_checkvcpu_still(L, 1);
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
/* a key of set_sregs: a segment or table register (a table of fields), or a scalar */
static int set_sreg(lua_State *L, const char *k, void *ud) {
  struct kvm_sregs *s = ud;
  if (k == NULL) return 0;
  for (int i = 0; sregs_parts[i].name; i++) {
    if (strcmp(k, sregs_parts[i].name)) continue;
    if (!lua_istable(L, -1))
      luaL_error(L, "bad key '%s' in special registers (table expected, got %s)", k, luaL_typename(L, -1));
    Fields fs = {(char *)s + sregs_parts[i].off, sregs_parts[i].dt ? dt_fields : seg_fields, k};
    each_key(L, -1, set_one, &fs, "bad field '%s' in %s (unknown field)", k);
    return 1;
  }
  return set_field(L, s, sregs_scalars, k, "special registers");
}

static int l_vcpu_set_sregs(lua_State *L) {
  Vcpu *c = kvm_checkvcpu_still(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  struct kvm_sregs s;
  if (ioctl(c->fd, KVM_GET_SREGS, &s) < 0) return kvm_fail(L, "KVM_GET_SREGS");
  each_key(L, 2, set_sreg, &s, "bad key '%s' in special registers (unknown register)", NULL);
  if (ioctl(c->fd, KVM_SET_SREGS, &s) < 0) return kvm_fail(L, "KVM_SET_SREGS");
  lua_pushboolean(L, 1);
  return 1;
}

/*** Set the CPUID the guest sees (KVM_SET_CPUID2), from an array in the
form supported_cpuid() returns.
@function vcpu:set_cpuid
*/
static int l_vcpu_set_cpuid(lua_State *L) {
  Vcpu *c = kvm_checkvcpu_still(L, 1);
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
  Vcpu *c = kvm_checkvcpu_still(L, 1);
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
  Vcpu *c = kvm_checkvcpu_still(L, 1);
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
  Vcpu *c = kvm_checkvcpu_still(L, 1);
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
typedef struct EvKey { struct kvm_vcpu_events *e; int part; } EvKey;

/* a field of one part of the events; some set a validity flag */
static int set_event_field(lua_State *L, const char *fk, void *ud) {
  EvKey *x = ud;
  char full[64];
  if (fk == NULL) return 0;
  snprintf(full, sizeof full, "%s.%s", ev_parts[x->part].name, fk);
  if (!set_field_as(L, x->e, ev_parts[x->part].f, full, fk, ev_parts[x->part].name)) return 0;
  if (x->part == 2 && strcmp(fk, "pending") == 0) x->e->flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
  if (x->part == 1 && strcmp(fk, "shadow") == 0) x->e->flags |= KVM_VCPUEVENT_VALID_SHADOW;
  return 1;
}

static int set_event(lua_State *L, const char *k, void *ud) {
  struct kvm_vcpu_events *e = ud;
  if (k == NULL) return 0;
  if (strcmp(k, "sipi_vector") == 0) {
    int ok;
    lua_Integer v = lua_tointegerx(L, -1, &ok);
    if (!ok || v < 0 || v > 0xffffffffLL)
      luaL_error(L, "bad field 'sipi_vector' in events (integer expected, got %s)", luaL_typename(L, -1));
    e->sipi_vector = (uint32_t)v;
    e->flags |= KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    return 1;
  }
  for (int i = 0; ev_parts[i].name; i++) {
    if (strcmp(k, ev_parts[i].name) || !lua_istable(L, -1)) continue;
    EvKey x = {e, i};
    each_key(L, -1, set_event_field, &x, "bad field '%s' in %s (unknown field)", k);
    return 1;
  }
  return 0;
}

static int l_vcpu_set_events(lua_State *L) {
  Vcpu *c = kvm_checkvcpu_still(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  struct kvm_vcpu_events e;
  if (ioctl(c->fd, KVM_GET_VCPU_EVENTS, &e) < 0) return kvm_fail(L, "KVM_GET_VCPU_EVENTS");
  e.flags = 0;
  each_key(L, 2, set_event, &e, "bad key '%s' in events", NULL);
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
  Vcpu *c = kvm_checkvcpu_still(L, 1);
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

static int set_fpu_key(lua_State *L, const char *k, void *ud) {
  struct kvm_fpu *f = ud;
  if (k && strcmp(k, "fpr") == 0 && lua_istable(L, -1)) set_blocks(L, f->fpr, 8, k);
  else if (k && strcmp(k, "xmm") == 0 && lua_istable(L, -1)) set_blocks(L, f->xmm, 16, k);
  else return k && set_field(L, f, fpu_fields, k, "fpu");
  return 1;
}

/*** Set x87/SSE state; only the keys given change (KVM_SET_FPU).
@function vcpu:set_fpu
*/
static int l_vcpu_set_fpu(lua_State *L) {
  Vcpu *c = kvm_checkvcpu_still(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  struct kvm_fpu f;
  if (ioctl(c->fd, KVM_GET_FPU, &f) < 0) return kvm_fail(L, "KVM_GET_FPU");
  each_key(L, 2, set_fpu_key, &f, "bad key '%s' in fpu (unknown field)", NULL);
  if (ioctl(c->fd, KVM_SET_FPU, &f) < 0) return kvm_fail(L, "KVM_SET_FPU");
  lua_pushboolean(L, 1);
  return 1;
}

/*** Translate a guest-virtual address with the guest's page tables
(KVM_TRANSLATE): gpa, or nil when unmapped.
@function vcpu:translate
*/
static int l_vcpu_translate(lua_State *L) {
  Vcpu *c = kvm_checkvcpu_still(L, 1);
  struct kvm_translation t;
  memset(&t, 0, sizeof t);
  t.linear_address = (uint64_t)luaL_checkinteger(L, 2);
  if (ioctl(c->fd, KVM_TRANSLATE, &t) < 0) return kvm_fail(L, "KVM_TRANSLATE");
  if (!t.valid) { luaL_pushfail(L); return 1; }
  lua_pushinteger(L, (lua_Integer)t.physical_address);
  lua_pushboolean(L, t.writeable);
  return 2;
}


/*** Per-vCPU counters: {exits = n, by_reason = {hlt = n, ...}, run_seconds, handler_seconds}.
@function vcpu:stats
*/
static int l_vcpu_stats(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, (lua_Integer)c->stats.exits); lua_setfield(L, -2, "exits");
  kvm_push_by_reason(L, c->stats.exits_by_reason);
  lua_setfield(L, -2, "by_reason");
  lua_pushnumber(L, (double)c->stats.ns_in_run / 1e9); lua_setfield(L, -2, "run_seconds");
  lua_pushnumber(L, (double)c->stats.ns_in_handlers / 1e9); lua_setfield(L, -2, "handler_seconds");
  return 1;
}

/* {reason name = count} for the nonzero counts */
void kvm_push_by_reason(lua_State *L, const uint64_t by_reason[64]) {
  lua_newtable(L);
  for (int i = 0; i < 64; i++)
    if (by_reason[i]) {
      lua_pushinteger(L, (lua_Integer)by_reason[i]);
      lua_setfield(L, -2, kvm_exit_name((uint32_t)i));
    }
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
  {"set_guest_debug", l_vcpu_set_guest_debug},
  {"guest_debug", l_vcpu_guest_debug},
  {"step", l_vcpu_step},
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
  static const luaL_Reg meta[] = {
    {"__index", l_vcpu_index},
    {"__gc", l_vcpu_gc},
    {"__close", l_vcpu_close},
    {"__tostring", l_vcpu_tostring},
    {NULL, NULL}
  };
  kvm_new_class(L, VCPU_MT, vcpu_methods, meta);
}
