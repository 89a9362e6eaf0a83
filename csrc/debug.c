/*
** debug.c - guest debugging on a vCPU (KVM_SET_GUEST_DEBUG): single-step,
** the four hardware breakpoints (debug registers DR0-3 and DR7, linear
** addresses: execute, write or access watchpoints of 1, 2, 4 or 8 bytes)
** and the interception of #BP (int3) for software breakpoints. What is set
** is kept in the vCPU (Vcpu.dbg) so that cpu:step() can add single-step for
** one instruction and put the rest back. The int3 patching itself, the
** breakpoint list and their actions are Lua (kvm.debug); a KVM_EXIT_DEBUG
** ends run() like any exit the bus does not serve (reason "debug", decoded
** in exit.c).
*/

/*** Guest debugging: cpu:set_guest_debug, cpu:guest_debug and cpu:step
are methods of kvm.vcpu.
@classmod kvm.vcpu
*/
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

#include "luakvm.h"

#define DR7_FIXED 0x600u            /* GE, and bit 10 (always 1) */

static const char *const kinds[] = {"exec", "write", "access", NULL};
static const unsigned kind_rw[] = {0u, 1u, 3u};     /* DR7 R/W field per kind */


/* DR7's LEN field for a length */
static unsigned len_bits(lua_Integer len) {
  switch (len) {
  case 1: return 0u;
  case 2: return 1u;
  case 8: return 2u;
  default: return 3u;               /* 4 */
  }
}

static lua_Integer len_of(unsigned bits) {
  static const lua_Integer lens[] = {1, 2, 8, 4};
  return lens[bits & 3u];
}

/* a canonical 48-bit address (bits 63..47 all equal) */
static int canonical(uint64_t a) {
  uint64_t top = a >> 47;
  return top == 0 || top == 0x1ffff;
}

/* field k of the table on the top: an integer, or raise naming the slot */
static lua_Integer int_field(lua_State *L, int slot, const char *k, int *present) {
  int ok;
  lua_getfield(L, -1, k);
  *present = !lua_isnil(L, -1);
  lua_Integer v = lua_tointegerx(L, -1, &ok);
  if (*present && !ok)
    luaL_error(L, "bad field '%s' in hw[%d] (integer expected, got %s)", k, slot, luaL_typename(L, -1));
  lua_pop(L, 1);
  return v;
}

/* hw[slot], the table on the stack top, into d's DR<slot-1> and DR7 */
static void hw_slot(lua_State *L, struct kvm_guest_debug *d, int slot) {
  int has;
  lua_Integer addr = int_field(L, slot, "addr", &has);
  if (!has) luaL_error(L, "bad field 'addr' in hw[%d] (integer expected, got nil)", slot);
  if (!canonical((uint64_t)addr))
    luaL_error(L, "bad field 'addr' in hw[%d] (not a canonical address)", slot);
  lua_getfield(L, -1, "kind");
  int kind = 0;
  if (!lua_isnil(L, -1)) {
    const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "";
    kind = -1;
    for (int j = 0; kinds[j]; j++)
      if (strcmp(kinds[j], k) == 0) kind = j;
  }
  lua_pop(L, 1);
  if (kind < 0 || kind > 2) {
    luaL_error(L, "bad field 'kind' in hw[%d] (\"exec\", \"write\" or \"access\" expected)", slot);
    return;
  }
  lua_Integer len = int_field(L, slot, "len", &has);
  if (!has) len = 1;
  if (kind == 0 && len != 1)
    luaL_error(L, "bad field 'len' in hw[%d] (an exec breakpoint has length 1)", slot);
  if (len != 1 && len != 2 && len != 4 && len != 8)
    luaL_error(L, "bad field 'len' in hw[%d] (1, 2, 4 or 8 expected)", slot);
  if ((uint64_t)addr & (uint64_t)(len - 1))
    luaL_error(L, "bad field 'addr' in hw[%d] (not aligned to its length %d)", slot, (int)len);
  int i = slot - 1;
  d->arch.debugreg[i] = (uint64_t)addr;
  d->arch.debugreg[7] |= (2ull << (2 * i))                                  /* G<i> */
                       | ((uint64_t)kind_rw[kind] << (16 + 4 * i))
                       | ((uint64_t)len_bits(len) << (18 + 4 * i));
}

/* the table at idx (a closed set of keys) into d */
static void parse_config(lua_State *L, int idx, struct kvm_guest_debug *d) {
  memset(d, 0, sizeof *d);
  if (lua_isnoneornil(L, idx) || (lua_isboolean(L, idx) && !lua_toboolean(L, idx))) return;
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    if (!k || (strcmp(k, "singlestep") && strcmp(k, "sw_bp") && strcmp(k, "hw")))
      luaL_error(L, "bad key '%s' in guest debug (singlestep, sw_bp or hw expected)",
                 luaL_tolstring(L, -2, NULL));
    lua_pop(L, 1);
  }
  lua_getfield(L, idx, "singlestep");
  if (lua_toboolean(L, -1)) d->control |= KVM_GUESTDBG_SINGLESTEP;
  lua_getfield(L, idx, "sw_bp");
  if (lua_toboolean(L, -1)) d->control |= KVM_GUESTDBG_USE_SW_BP;
  lua_pop(L, 2);
  if (lua_getfield(L, idx, "hw") != LUA_TNIL) {
    if (!lua_istable(L, -1)) luaL_error(L, "bad field 'hw' in guest debug (table expected)");
    lua_pushnil(L);
    while (lua_next(L, -2)) {
      int ok;
      lua_Integer slot = lua_tointegerx(L, -2, &ok);
      if (lua_type(L, -2) != LUA_TNUMBER || !ok || slot < 1 || slot > 4)
        luaL_error(L, "bad key in hw (a debug register slot 1..4 expected)");
      if (!lua_istable(L, -1)) luaL_error(L, "bad hw[%d] (table expected)", (int)slot);
      hw_slot(L, d, (int)slot);
      lua_pop(L, 1);
    }
    d->control |= KVM_GUESTDBG_USE_HW_BP;
    d->arch.debugreg[7] |= DR7_FIXED;
  }
  lua_pop(L, 1);
  if (d->control) d->control |= KVM_GUESTDBG_ENABLE;
}

static int set_debug(Vcpu *c, const struct kvm_guest_debug *d) {
  struct kvm_guest_debug copy = *d;     /* KVM may write back into it */
  return ioctl(c->fd, KVM_SET_GUEST_DEBUG, &copy);
}

/*** Set what the vCPU stops for (KVM_SET_GUEST_DEBUG); replaces the whole
configuration, `nil` or `false` turns guest debugging off. A stop ends
run() with reason "debug" (see kvm.exit: `pc`, `dr6`, `dr7`, `exception`, and
`slot` or `step`).
@function vcpu:set_guest_debug
@tparam[opt] table cfg `singlestep` = boolean (every instruction),
  `sw_bp` = boolean (the guest's int3 stops run() instead of entering the
  guest's #BP handler), `hw` = {[slot] = {addr = linear address,
  kind = "exec"|"write"|"access", len = 1|2|4|8}} for slots 1..4 (DR0..DR3;
  "exec" has length 1, a watchpoint's address is aligned to its length)
@treturn true
@return[2] fail, "KVM_SET_GUEST_DEBUG: ...", errno
*/
int l_vcpu_set_guest_debug(lua_State *L) {
  Vcpu *c = kvm_checkvcpu_still(L, 1);
  if (c->running) return luaL_error(L, "set_guest_debug() on a running vCPU");
  struct kvm_guest_debug d;
  lua_settop(L, 2);
  parse_config(L, 2, &d);
  if (set_debug(c, &d) < 0) return kvm_fail(L, "KVM_SET_GUEST_DEBUG");
  c->dbg = d;
  lua_pushboolean(L, 1);
  return 1;
}

/*** The guest-debug configuration set last, in set_guest_debug's form (an
empty table when it is off).
@function vcpu:guest_debug
@treturn table
*/
int l_vcpu_guest_debug(lua_State *L) {
  Vcpu *c = kvm_checkvcpu(L, 1);
  const struct kvm_guest_debug *d = &c->dbg;
  lua_newtable(L);
  if (d->control & KVM_GUESTDBG_SINGLESTEP) { lua_pushboolean(L, 1); lua_setfield(L, -2, "singlestep"); }
  if (d->control & KVM_GUESTDBG_USE_SW_BP) { lua_pushboolean(L, 1); lua_setfield(L, -2, "sw_bp"); }
  if (d->control & KVM_GUESTDBG_USE_HW_BP) {
    uint64_t dr7 = d->arch.debugreg[7];
    lua_newtable(L);
    for (int i = 0; i < 4; i++) {
      if (!(dr7 & (3ull << (2 * i)))) continue;
      unsigned rw = (unsigned)(dr7 >> (16 + 4 * i)) & 3u, len = (unsigned)(dr7 >> (18 + 4 * i)) & 3u;
      lua_createtable(L, 0, 3);
      lua_pushinteger(L, (lua_Integer)d->arch.debugreg[i]);
      lua_setfield(L, -2, "addr");
      lua_pushstring(L, rw == 0 ? "exec" : rw == 1 ? "write" : "access");
      lua_setfield(L, -2, "kind");
      lua_pushinteger(L, len_of(len));
      lua_setfield(L, -2, "len");
      lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "hw");
  }
  return 1;
}

/*** Execute one instruction: run() with single-step added to the guest
debug configuration for this one run, which is then put back. Port and MMIO
exits of the instruction go to the devices as in run(); hardware execute
breakpoints are left out for the step (one at the current instruction would
stop it before it executes), watchpoints stay. On a KVM that cannot
single-step the run ends as run() would, and the options' `timeout` bounds it.
@function vcpu:step
@tparam[opt] table opts run()'s options
@treturn kvm.exit reason "debug" with `step` = true (or what else ended the
  run: a port exit no device serves, a watchpoint's "debug", "hlt"...)
@return[2] fail, message, errno
*/
int l_vcpu_step(lua_State *L) {
  Vcpu *c = kvm_checkvcpu_still(L, 1);
  if (c->running || c->vm->in_handler)
    return luaL_error(L, "step() called from inside a handler (re-entry is not allowed)");
  lua_settop(L, 2);
  struct kvm_guest_debug d = c->dbg;
  d.control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
  for (int i = 0; i < 4; i++)       /* no execute breakpoints during the step */
    if (((d.arch.debugreg[7] >> (16 + 4 * i)) & 3u) == 0) d.arch.debugreg[7] &= ~(3ull << (2 * i));
  if (set_debug(c, &d) < 0) return kvm_fail(L, "KVM_SET_GUEST_DEBUG");
  lua_pushcfunction(L, l_vcpu_run);
  lua_pushvalue(L, 1);
  lua_pushvalue(L, 2);
  int st = lua_pcall(L, 2, LUA_MULTRET, 0);
  int en = errno;
  if (set_debug(c, &c->dbg) < 0 && st == LUA_OK) {
    lua_settop(L, 2);
    return kvm_fail(L, "KVM_SET_GUEST_DEBUG");
  }
  errno = en;
  if (st != LUA_OK) return lua_error(L);
  return lua_gettop(L) - 2;
}
