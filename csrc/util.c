/*
** util.c - what every file of the core uses: the clock, error results,
** argument checks, the classes' metatables, the objects' checks, and the
** values a handler returns to end a run. It uses no other file.
*/
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "luakvm.h"

uint64_t kvm_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* nil, "WHAT: strerror (hint)", errno -- the io.open convention */
int kvm_fail(lua_State *L, const char *what) {
  int en = errno;
  const char *hint = "";
  if (strcmp(what, "open /dev/kvm") == 0) {
    if (en == ENOENT || en == ENXIO || en == ENODEV)
      hint = " (is the kvm module loaded? try 'modprobe kvm_intel' or 'kvm_amd')";
    else if (en == EACCES || en == EPERM)
      hint = " (add your user to the 'kvm' group, or check /dev/kvm's mode)";
  }
  luaL_pushfail(L);
  lua_pushfstring(L, "%s: %s%s", what, strerror(en), hint);
  lua_pushinteger(L, en);
  return 3;
}

const char *kvm_pushhex(lua_State *L, uint64_t v) {
  char b[24];
  snprintf(b, sizeof b, "0x%llx", (unsigned long long)v);
  return lua_pushstring(L, b);
}

/* an integer in [lo, hi] (unsigned comparison), else an argument error */
uint64_t kvm_checkrange(lua_State *L, int arg, uint64_t lo, uint64_t hi,
                        const char *what) {
  uint64_t v = (uint64_t)luaL_checkinteger(L, arg);
  if (v < lo || v > hi)
    luaL_argerror(L, arg, lua_pushfstring(L, "%s out of range", what));
  return v;
}

uint8_t *kvm_gpa_ptr(Vm *vm, uint64_t gpa, uint64_t len) {
  uint64_t end;
  if (__builtin_add_overflow(gpa, len, &end)) return NULL;
  for (int i = 0; i < KVM_MAX_REGIONS; i++) {
    Memory *m = vm->regions[i];
    if (m == NULL || m->host == NULL) continue;
    if (gpa >= m->guest && end <= m->guest + m->size) return m->host + (gpa - m->guest);
  }
  return NULL;
}

uint8_t *kvm_gpa_wptr(Vm *vm, uint64_t gpa, uint64_t len) {
  uint64_t end;
  if (__builtin_add_overflow(gpa, len, &end)) return NULL;
  for (int i = 0; i < KVM_MAX_REGIONS; i++) {
    Memory *m = vm->regions[i];
    if (m == NULL || m->host == NULL) continue;
    if (gpa >= m->guest && end <= m->guest + m->size) {
      kvm_mem_mark(m, gpa - m->guest, len);
      return m->host + (gpa - m->guest);
    }
  }
  return NULL;
}

void kvm_add_count(lua_State *L, const char *k, uint64_t n) {
  lua_getfield(L, -1, k);
  lua_Integer have = lua_tointeger(L, -1);
  lua_pop(L, 1);
  lua_pushinteger(L, have + (lua_Integer)n);
  lua_setfield(L, -2, k);
}

/* an open kvm.vm / kvm.vcpu at arg, or raise */
Vm *kvm_checkvm(lua_State *L, int arg) {
  Vm *vm = (Vm *)luaL_checkudata(L, arg, VM_MT);
  if (vm->fd < 0) luaL_error(L, "attempt to use a closed kvm.vm");
  return vm;
}

Vcpu *kvm_checkvcpu(lua_State *L, int arg) {
  Vcpu *c = (Vcpu *)luaL_checkudata(L, arg, VCPU_MT);
  if (c->fd < 0) luaL_error(L, "attempt to use a closed kvm.vcpu");
  return c;
}

Vcpu *kvm_checkvcpu_still(lua_State *L, int arg) {
  Vcpu *c = kvm_checkvcpu(L, arg);
  if (c->on_thread && !c->serving)
    luaL_error(L, "vCPU %d is running on its thread (vm:run): its state can be read or changed "
               "from a handler serving it, or after vm:run returns", c->id);
  return c;
}

void kvm_opt_table(lua_State *L, int idx) {
  lua_settop(L, idx);
  if (lua_isnil(L, idx)) { lua_newtable(L); lua_replace(L, idx); }
  luaL_checktype(L, idx, LUA_TTABLE);
}

void kvm_new_class(lua_State *L, const char *name, const luaL_Reg *methods,
                   const luaL_Reg *meta) {
  luaL_newmetatable(L, name);
  luaL_setfuncs(L, meta, 0);
  /* with an __index function of its own, the class finds methods under "methods" */
  int has_index = lua_getfield(L, -1, "__index") != LUA_TNIL;
  lua_pop(L, 1);
  lua_newtable(L);
  luaL_setfuncs(L, methods, 0);
  lua_setfield(L, -2, has_index ? "methods" : "__index");
  lua_pop(L, 1);
}

/* kvm.STOP, kvm.POWEROFF, kvm.RESET: what a handler returns to end run()
   with that reason (kvm_stop_reasons[i + 1]) */
int kvm_stop_keys[3];
const char *const kvm_stop_reasons[] = {"none", "stopped", "poweroff", "reset", NULL};
