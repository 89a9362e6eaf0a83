/*
** luadev.c - a Lua function as a device: vm:on_io and vm:on_mmio claim a
** range for it. One device per claimed range; the function is kept in the
** VM's table (by ref) and called for each element of an exit.
*/

/*** vm:on_io and vm:on_mmio, below, are methods of kvm.vm.
@classmod kvm.vm
*/
#include <string.h>

#include "luakvm.h"

/* handler time is sampled: one call in HANDLER_SAMPLE is timed (a clock read
   may be a system call where the clocksource has no vDSO) */
#define HANDLER_SAMPLE 16

typedef struct LuaDev {
  Device dev;
  int fn;                        /* the function's key in the VM's table */
  int is_mmio;
} LuaDev;

/* the value a handler returned: kvm.STOP / POWEROFF / RESET ask run() to
   return (as cpu:stop does); for "in", an integer or nil (all ones) */
static int take_result(lua_State *L, int is_mmio, BusCall *bc, uint64_t addr, int is_write,
                       unsigned size, uint8_t *data) {
  int t = lua_type(L, -1);
  void *key = t == LUA_TLIGHTUSERDATA ? lua_touserdata(L, -1) : NULL;
  if (key && key >= (void *)kvm_stop_keys && key < (void *)(kvm_stop_keys + 3)) {
    int why = (int)((int *)key - kvm_stop_keys) + 1;
    kvm_stop_raise(bc->c, why);
    if (!is_write) memset(data, 0xff, size);
  } else if (!is_write) {
    int ok = t == LUA_TNUMBER;
    lua_Integer v = ok ? lua_tointegerx(L, -1, &ok) : -1;
    if (t != LUA_TNIL && !ok) {
      memset(data, 0xff, size);
      const char *tn = luaL_typename(L, -1);
      lua_pushfstring(L, "handler for %s %s returned a %s (integer or nil expected)",
                      is_mmio ? "address" : "port", kvm_pushhex(L, addr), tn);
      lua_replace(L, -3);
      lua_pop(L, 1);
      return BUS_ERROR;
    }
    memcpy(data, &v, size);      /* nil: -1, all ones */
  }
  lua_pop(L, 1);
  return BUS_OK;
}

/* the value of a write: size bytes, little-endian (MMIO: any of 1-8); the
   usual sizes without a call to memcpy */
static uint64_t written(const uint8_t *data, unsigned size) {
  uint64_t v = 0;
  uint32_t v32;
  uint16_t v16;
  switch (size) {
  case 1: return data[0];
  case 2: memcpy(&v16, data, 2); return v16;
  case 4: memcpy(&v32, data, 4); return v32;
  default: memcpy(&v, data, size); return v;
  }
}

static int luadev_access(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size,
                         uint8_t *data) {
  /* the handler may remove its own claim, and the GC the device with it:
     nothing of d is used after the call */
  LuaDev *h = (LuaDev *)d;
  Vm *vm = d->vm;
  int is_mmio = h->is_mmio;
  lua_State *L = bc->L;
  VcpuStats *st = &bc->c->stats;
  lua_rawgeti(L, bc->tab, h->fn);
  lua_pushinteger(L, (lua_Integer)addr);
  lua_pushvalue(L, bc->strs + (is_write ? 1 : 0));   /* "in" / "out" */
  lua_pushinteger(L, size);
  if (is_write) {
    lua_pushinteger(L, (lua_Integer)written(data, size));
  } else {
    lua_pushnil(L);
  }
  int timed = st->handler_calls++ % HANDLER_SAMPLE == 0;
  uint64_t t0 = timed ? kvm_now_ns() : 0;
  vm->in_handler++;
  int s = lua_pcall(L, 4, 1, bc->msgh);
  vm->in_handler--;
  if (timed) st->ns_in_handlers += (kvm_now_ns() - t0) * HANDLER_SAMPLE;
  if (s != LUA_OK) {
    if (!is_write) memset(data, 0xff, size);
    return BUS_ERROR;
  }
  return take_result(L, is_mmio, bc, addr, is_write, size, data);
}

/* no save or restore: a Lua device's state lives in its script (a
   snapshot leaves it out; the script keeps its own alongside) */
static const DeviceOps luadev_ops = {
  .kind = "lua",
  .access = luadev_access,
  .lua = 1,
};

static const char *space_name(int is_mmio) { return is_mmio ? "address" : "port"; }

/* the device of exactly [first, last], or NULL */
static Range *exact(Bus *b, uint64_t first, uint64_t last) {
  Range *r = bus_find(b, first);
  return r && r->first == first && r->last == last ? r : NULL;
}

static int set_handler(lua_State *L, int is_mmio, uint64_t first, uint64_t last, int fnarg) {
  Vm *vm = kvm_checkvm(L, 1);
  Bus *b = is_mmio ? &vm->mmio : &vm->pio;
  Range *r = exact(b, first, last);
  if (lua_isnil(L, fnarg)) {
    if (r == NULL)
      return luaL_error(L, "%s range %s-%s is not claimed", space_name(is_mmio),
                        kvm_pushhex(L, first), kvm_pushhex(L, last));
    if (r->dev->ops != &luadev_ops)
      return luaL_error(L, "%s range %s-%s belongs to the %s device, not a Lua handler",
                        space_name(is_mmio), kvm_pushhex(L, first), kvm_pushhex(L, last),
                        r->dev->ops->kind);
    int fn = ((LuaDev *)r->dev)->fn;
    kvm_device_remove(L, 1, r->dev);   /* raises before it changes anything */
    kvm_vm_unref(L, 1, fn);
    return 0;
  }
  luaL_checktype(L, fnarg, LUA_TFUNCTION);
  if (r && r->dev->ops == &luadev_ops) {   /* the same range: a new function */
    LuaDev *h = (LuaDev *)r->dev;
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, fnarg);
    lua_rawseti(L, -2, h->fn);
    lua_pop(L, 1);
    return 0;
  }
  char buf[128];
  const char *clash = bus_clash(b, is_mmio, first, last, buf, sizeof buf);
  if (clash) return luaL_error(L, "%s", clash);
  LuaDev *h = kvm_device_new(L, 1, sizeof(LuaDev), &luadev_ops);
  h->fn = kvm_vm_ref(L, 1, fnarg);
  h->is_mmio = is_mmio;
  bus_claim(L, b, is_mmio, first, last, &h->dev);
  lua_pop(L, 1);
  return 0;
}

/*** Claim a port or port range for a Lua handler; nil removes it.
The handler is called as fn(port, direction, size, value) for each element
("in": value is nil, return the integer the guest reads, nil = all ones;
"out": value is what the guest wrote). Return kvm.STOP (or kvm.POWEROFF,
kvm.RESET) to make run() return with that reason once the instruction is done.
@function vm:on_io
@param port integer, or {first, last}
@tparam ?function fn
*/
int l_vm_on_io(lua_State *L) {
  kvm_checkvm(L, 1);
  uint64_t first, last;
  if (lua_istable(L, 2)) {
    lua_rawgeti(L, 2, 1);
    lua_rawgeti(L, 2, 2);
    int ok1, ok2;
    lua_Integer a = lua_tointegerx(L, -2, &ok1), b = lua_tointegerx(L, -1, &ok2);
    lua_pop(L, 2);
    luaL_argcheck(L, ok1 && ok2, 2, "port range must be {first, last} integers");
    luaL_argcheck(L, a >= 0 && b <= 0xffff && a <= b, 2, "port range out of range");
    first = (uint64_t)a; last = (uint64_t)b;
  } else {
    first = last = kvm_checkrange(L, 2, 0, 0xffff, "port");
  }
  luaL_checkany(L, 3);
  return set_handler(L, 0, first, last, 3);
}

/*** Claim a guest-physical MMIO range for a Lua handler; nil removes it.
fn(addr, direction, len, value), as on_io. The range must not be RAM.
@function vm:on_mmio
*/
int l_vm_on_mmio(lua_State *L) {
  kvm_checkvm(L, 1);
  uint64_t base = (uint64_t)luaL_checkinteger(L, 2);
  lua_Integer len = luaL_checkinteger(L, 3);
  luaL_argcheck(L, len > 0, 3, "length must be positive");
  uint64_t last;
  luaL_argcheck(L, !__builtin_add_overflow(base, (uint64_t)len - 1, &last), 3,
                "range wraps around the address space");
  luaL_checkany(L, 4);
  Vm *vm = kvm_checkvm(L, 1);
  for (int i = 0; i < KVM_MAX_REGIONS; i++) {
    Memory *m = vm->regions[i];
    if (m && m->host && base <= m->guest + m->size - 1 && m->guest <= last)
      return luaL_error(L, "MMIO range %s-%s overlaps guest RAM %s-%s (accesses there never exit)",
                        kvm_pushhex(L, base), kvm_pushhex(L, last), kvm_pushhex(L, m->guest),
                        kvm_pushhex(L, m->guest + m->size - 1));
  }
  return set_handler(L, 1, base, last, 4);
}
