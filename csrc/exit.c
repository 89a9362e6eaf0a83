/*
** exit.c - kvm.exit: a snapshot of why run() returned.
** Fields are decoded once, when run() returns, into a table (uservalue 2);
** the vCPU is pinned by uservalue 1 so e:reply() can answer the guest.
*/

/***
Why `cpu:run()` returned: `e.reason` and the decoded fields of the exit.
@classmod kvm.exit
*/
#define _GNU_SOURCE
#include <string.h>
#include <sys/ioctl.h>

#include "luakvm.h"

typedef struct Exit {
  Vcpu *c;
  uint64_t seq;            /* c->seq when taken: reply() only while current */
  uint32_t reason;         /* KVM_EXIT_* (or ~0u for synthetic reasons) */
} Exit;

static const char *const names[] = {
  "unknown", "exception", "io", "hypercall", "debug", "hlt", "mmio",
  "irq_window_open", "shutdown", "fail_entry", "intr", "set_tpr", "tpr_access",
  "s390_sieic", "s390_reset", "dcr", "nmi", "internal_error", "osi", "papr_hcall",
  "s390_ucontrol", "watchdog", "s390_tsch", "epr", "system_event", "s390_stsi",
  "ioapic_eoi", "hyperv", "arm_nisv", "x86_rdmsr", "x86_wrmsr", "dirty_ring_full",
  "ap_reset_hold", "x86_bus_lock", "xen", "riscv_sbi", "riscv_csr", "notify",
};

const char *kvm_exit_name(uint32_t reason) {
  if (reason < sizeof names / sizeof names[0]) return names[reason];
  return "unknown";
}

static Exit *toexit(lua_State *L, int arg) {
  return (Exit *)luaL_checkudata(L, arg, EXIT_MT);
}

static void setint(lua_State *L, const char *k, uint64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

static void setstr(lua_State *L, const char *k, const char *v) {
  lua_pushstring(L, v);
  lua_setfield(L, -2, k);
}

static void set_rip(lua_State *L, Vcpu *c) {
  struct kvm_regs r;
  if (ioctl(c->fd, KVM_GET_REGS, &r) == 0) setint(L, "rip", r.rip);
}

static const char *suberror_name(uint32_t s) {
  switch (s) {
  case KVM_INTERNAL_ERROR_EMULATION: return "emulation failure";
  case KVM_INTERNAL_ERROR_SIMUL_EX: return "exception while delivering an exception";
  case KVM_INTERNAL_ERROR_DELIVERY_EV: return "exception during event delivery";
  case KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: return "unexpected exit reason";
  default: return "unknown suberror";
  }
}

uint8_t *kvm_io_data(const Vcpu *c, uint64_t *bytes) {
  const struct kvm_run *run = c->run;
  unsigned size = run->io.size;
  uint64_t off = run->io.data_offset, end;
  if ((size != 1 && size != 2 && size != 4) || run->io.count == 0 ||
      __builtin_mul_overflow((uint64_t)size, (uint64_t)run->io.count, bytes) ||
      __builtin_add_overflow(off, *bytes, &end) || end > c->run_size ||
      off < sizeof(struct kvm_run) - sizeof(run->s))
    return NULL;
  return (uint8_t *)run + off;
}

/* decode c->run into the fields table at the top of the stack */
static void decode(lua_State *L, Vcpu *c, uint32_t reason) {
  struct kvm_run *run = c->run;
  switch (reason) {
  case KVM_EXIT_IO: {
    unsigned size = run->io.size;
    uint64_t bytes;
    const uint8_t *d = kvm_io_data(c, &bytes);
    setint(L, "port", run->io.port);
    setstr(L, "direction", run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in");
    setint(L, "size", size);
    setint(L, "count", run->io.count);
    if (d) {
      uint64_t v = 0;
      memcpy(&v, d, size);
      lua_pushlstring(L, (const char *)d, (size_t)bytes);
      lua_setfield(L, -2, "data");
      if (run->io.direction == KVM_EXIT_IO_OUT) setint(L, "value", v);
    } else {
      lua_pushboolean(L, 1);
      lua_setfield(L, -2, "malformed");
    }
    break;
  }
  case KVM_EXIT_MMIO: {
    unsigned len = run->mmio.len > 8 ? 8 : run->mmio.len;
    setint(L, "addr", run->mmio.phys_addr);
    setint(L, "len", run->mmio.len);
    lua_pushboolean(L, run->mmio.is_write);
    lua_setfield(L, -2, "is_write");
    setstr(L, "direction", run->mmio.is_write ? "out" : "in");
    lua_pushlstring(L, (const char *)run->mmio.data, len);
    lua_setfield(L, -2, "data");
    if (run->mmio.is_write) {
      uint64_t v = 0;
      memcpy(&v, run->mmio.data, len);
      setint(L, "value", v);
    }
    break;
  }
  case KVM_EXIT_INTERNAL_ERROR: {
    uint32_t nd = run->internal.ndata;
    if (nd > 16) nd = 16;
    setint(L, "suberror", run->internal.suberror);
    setstr(L, "description", suberror_name(run->internal.suberror));
    lua_createtable(L, (int)nd, 0);
    for (uint32_t i = 0; i < nd; i++) {
      lua_pushinteger(L, (lua_Integer)run->internal.data[i]);
      lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "data");
    if (run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION && nd >= 3 &&
        (run->emulation_failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)) {
      unsigned n = run->emulation_failure.insn_size;
      if (n > sizeof run->emulation_failure.insn_bytes) n = sizeof run->emulation_failure.insn_bytes;
      lua_pushlstring(L, (const char *)run->emulation_failure.insn_bytes, n);
      lua_setfield(L, -2, "insn");
    }
    set_rip(L, c);
    break;
  }
  case KVM_EXIT_FAIL_ENTRY:
    setint(L, "hardware_reason", run->fail_entry.hardware_entry_failure_reason);
    setint(L, "cpu", run->fail_entry.cpu);
    set_rip(L, c);
    break;
  case KVM_EXIT_SYSTEM_EVENT:
    setint(L, "type", run->system_event.type);
    setstr(L, "event", run->system_event.type == KVM_SYSTEM_EVENT_SHUTDOWN ? "shutdown"
                     : run->system_event.type == KVM_SYSTEM_EVENT_RESET ? "reset"
                     : run->system_event.type == KVM_SYSTEM_EVENT_CRASH ? "crash" : "other");
    break;
  case KVM_EXIT_EXCEPTION:
    setint(L, "exception", run->ex.exception);
    setint(L, "error_code", run->ex.error_code);
    set_rip(L, c);
    break;
  case KVM_EXIT_DEBUG: {
    /* guest debug (debug.c): #DB (1) for a single-step (DR6.BS) or a
       hardware breakpoint (DR6.B0..B3: its slot, 1..4), #BP (3) for an int3 */
    const struct kvm_debug_exit_arch *a = &run->debug.arch;
    setint(L, "exception", a->exception);
    setint(L, "pc", a->pc);
    setint(L, "dr6", a->dr6);
    setint(L, "dr7", a->dr7);
    if (a->exception == 1) {
      for (int i = 0; i < 4; i++)
        if (a->dr6 & (1ull << i)) { setint(L, "slot", (uint64_t)i + 1); break; }
      if (a->dr6 & (1ull << 14)) { lua_pushboolean(L, 1); lua_setfield(L, -2, "step"); }
    }
    set_rip(L, c);
    break;
  }
  case KVM_EXIT_HLT:
  case KVM_EXIT_SHUTDOWN:
    set_rip(L, c);
    break;
  default:
    break;
  }
}

/* push a new Exit for vcpu c (at vcpu_idx); reason_override is a synthetic
   reason ("timeout", "intr", ...) or NULL for c->run->exit_reason */
int kvm_push_exit(lua_State *L, int vcpu_idx, Vcpu *c, const char *reason_override) {
  vcpu_idx = lua_absindex(L, vcpu_idx);
  Exit *e = lua_newuserdatauv(L, sizeof(Exit), 2);
  e->c = c;
  e->seq = c->seq;
  uint32_t reason = c->run->exit_reason;
  e->reason = reason_override ? ~0u : reason;
  luaL_setmetatable(L, EXIT_MT);
  lua_pushvalue(L, vcpu_idx);
  lua_setiuservalue(L, -2, 1);
  lua_createtable(L, 0, 8);
  if (reason_override) {
    setstr(L, "reason", reason_override);
    /* an I/O exit cut short (debug_exit, reset, stopped) keeps its details */
    if (strcmp(reason_override, "intr") && strcmp(reason_override, "timeout"))
      if (reason == KVM_EXIT_IO || reason == KVM_EXIT_MMIO) decode(L, c, reason);
  } else {
    setstr(L, "reason", kvm_exit_name(reason));
    setint(L, "exit_reason", reason);
    decode(L, c, reason);
  }
  lua_setiuservalue(L, -2, 2);
  return 1;
}

/*** Answer an "in" port exit or an MMIO read, before the next run().
@function exit:reply
@param v integer (each element of a string I/O gets it), or a string of raw bytes
*/
static int l_exit_reply(lua_State *L) {
  Exit *e = toexit(L, 1);
  Vcpu *c = e->c;
  if (c->fd < 0) return luaL_error(L, "attempt to use a closed kvm.vcpu");
  if (e->seq != c->seq || e->reason == ~0u)
    return luaL_error(L, "reply() to an exit that is no longer current");
  struct kvm_run *run = c->run;
  uint8_t *dst;
  uint64_t bytes;
  unsigned unit;
  if (e->reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_IN) {
    unit = run->io.size;
    dst = kvm_io_data(c, &bytes);
    if (dst == NULL) return luaL_error(L, "reply() to a malformed I/O exit");
  } else if (e->reason == KVM_EXIT_MMIO && !run->mmio.is_write && run->mmio.len <= 8) {
    unit = run->mmio.len;
    bytes = unit;
    dst = run->mmio.data;
  } else {
    return luaL_error(L, "reply() needs an \"in\" I/O exit or an MMIO read");
  }
  if (lua_type(L, 2) == LUA_TSTRING) {
    size_t n;
    const char *s = lua_tolstring(L, 2, &n);
    luaL_argcheck(L, n == bytes, 2, lua_pushfstring(L, "%d bytes expected", (int)bytes));
    memcpy(dst, s, n);
  } else {
    lua_Integer v = luaL_checkinteger(L, 2);
    for (uint64_t i = 0; i < bytes; i += unit) memcpy(dst + i, &v, unit);
  }
  return 0;
}

static int l_exit_index(lua_State *L) {
  toexit(L, 1);
  lua_getiuservalue(L, 1, 2);
  lua_pushvalue(L, 2);
  if (lua_rawget(L, -2) != LUA_TNIL) return 1;
  lua_getmetatable(L, 1);
  lua_getfield(L, -1, "methods");
  lua_pushvalue(L, 2);
  lua_rawget(L, -2);
  return 1;
}

/*** A one-line summary, e.g. "io out port=0x3f8 size=1 count=1 value=0x48",
"internal_error: emulation failure at rip=0xffffffff81234567 insn=0f 01 ca".
@function exit:__tostring
*/
static int l_exit_tostring(lua_State *L) {
  toexit(L, 1);
  lua_getiuservalue(L, 1, 2);
  int t = lua_gettop(L);
  char buf[320];
  size_t k = 0;
#define OUT(...) do { if (k < sizeof buf) k += (size_t)snprintf(buf + k, sizeof buf - k, __VA_ARGS__); } while (0)
#define HAS(key) (lua_getfield(L, t, key) != LUA_TNIL)
#define U64() ((unsigned long long)lua_tointeger(L, -1))
#define STR() (lua_tostring(L, -1) ? lua_tostring(L, -1) : "?")
  lua_getfield(L, t, "reason"); OUT("%s", STR()); lua_settop(L, t);
  if (HAS("direction")) { OUT(" %s", STR()); } lua_settop(L, t);
  if (HAS("port")) { OUT(" port=0x%llx", U64()); } lua_settop(L, t);
  if (HAS("addr")) { OUT(" addr=0x%llx", U64()); } lua_settop(L, t);
  if (HAS("size")) { OUT(" size=%llu", U64()); } lua_settop(L, t);
  if (HAS("len")) { OUT(" len=%llu", U64()); } lua_settop(L, t);
  if (HAS("count")) { OUT(" count=%llu", U64()); } lua_settop(L, t);
  if (HAS("value")) { OUT(" value=0x%llx", U64()); } lua_settop(L, t);
  if (HAS("code")) { OUT(" code=%llu", U64()); } lua_settop(L, t);
  if (HAS("description")) { OUT(": %s", STR()); } lua_settop(L, t);
  if (HAS("suberror")) { OUT(" (suberror %llu)", U64()); } lua_settop(L, t);
  if (HAS("hardware_reason")) { OUT(" hardware_reason=0x%llx", U64()); } lua_settop(L, t);
  if (HAS("event")) { OUT(" %s", STR()); } lua_settop(L, t);
  if (HAS("exception")) { OUT(" exception=%llu", U64()); } lua_settop(L, t);
  if (HAS("slot")) { OUT(" slot=%llu", U64()); } lua_settop(L, t);
  if (lua_getfield(L, t, "step") == LUA_TBOOLEAN) { OUT(" step"); } lua_settop(L, t);
  if (HAS("rip")) { OUT(" at rip=0x%llx", U64()); } lua_settop(L, t);
  if (lua_getfield(L, t, "insn") == LUA_TSTRING) {
    size_t n;
    const unsigned char *s = (const unsigned char *)lua_tolstring(L, -1, &n);
    OUT(" insn=");
    for (size_t i = 0; i < n && i < 15; i++) OUT("%s%02x", i ? " " : "", s[i]);
  }
  lua_settop(L, t);
#undef OUT
#undef HAS
#undef U64
#undef STR
  if (k >= sizeof buf) k = sizeof buf - 1;
  lua_pushlstring(L, buf, k);
  return 1;
}

/*** All decoded fields as a plain table (a copy).
@function exit:fields
*/
static int l_exit_fields(lua_State *L) {
  toexit(L, 1);
  lua_getiuservalue(L, 1, 2);
  lua_newtable(L);
  lua_pushnil(L);
  while (lua_next(L, -3)) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, -4);
  }
  return 1;
}

static const luaL_Reg exit_methods[] = {
  {"reply", l_exit_reply},
  {"fields", l_exit_fields},
  {NULL, NULL}
};

void kvm_open_exit(lua_State *L) {
  static const luaL_Reg meta[] = {
    {"__index", l_exit_index},
    {"__tostring", l_exit_tostring},
    {NULL, NULL}
  };
  kvm_new_class(L, EXIT_MT, exit_methods, meta);
}
