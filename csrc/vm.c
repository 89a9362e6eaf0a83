/*
** vm.c - kvm.vm: the VM object, guest-physical access, in-kernel devices,
** and the port/MMIO claim tables the run loop dispatches from.
*/

/***
A virtual machine, made by `kvm.vm()`: guest memory, vCPUs, in-kernel devices,
the port and MMIO claims the run loop dispatches.
@classmod kvm.vm
*/
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "luakvm.h"

int l_vm_memory(lua_State *L);      /* mem.c */
int l_vm_vcpu(lua_State *L);        /* vcpu.c */
int kvm_mem_access(lua_State *L, uint8_t *p, int width, int valarg);  /* mem.c */

static Vm *tovm(lua_State *L, int arg) {
  return (Vm *)luaL_checkudata(L, arg, VM_MT);
}

Vm *kvm_checkvm(lua_State *L, int arg) {
  Vm *vm = tovm(L, arg);
  if (vm->fd < 0) luaL_error(L, "attempt to use a closed kvm.vm");
  return vm;
}

/*** Create a VM: open /dev/kvm and KVM_CREATE_VM.
@function vm
@treturn kvm.vm
@return[2] fail, message, errno ("open /dev/kvm: No such file or directory (is the kvm module loaded? ...)")
*/
int l_vm_new(lua_State *L) {
  Vm *vm = lua_newuserdatauv(L, sizeof(Vm), 1);
  memset(vm, 0, sizeof *vm);
  vm->fd = -1;
  vm->kvm_fd = -1;
  vm->serial.in_fd = -1;
  vm->debug_exit_port = 0;
  luaL_setmetatable(L, VM_MT);
  lua_createtable(L, 4, 4);
  lua_newtable(L);
  lua_setfield(L, -2, "memories");
  lua_setiuservalue(L, -2, 1);

  vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (vm->kvm_fd < 0) return kvm_fail(L, "open /dev/kvm");
  int v = ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0);
  if (v != KVM_API_VERSION) {
    int en = v < 0 ? errno : EINVAL;
    close(vm->kvm_fd); vm->kvm_fd = -1;
    errno = en;
    return kvm_fail(L, "KVM_GET_API_VERSION (expected 12)");
  }
  int fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
  if (fd < 0) goto err_kvm;
  int sz = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (sz < (int)sizeof(struct kvm_run)) {
    int en = errno;
    close(fd);
    errno = sz < 0 ? en : EINVAL;
    goto err_kvm;
  }
  vm->run_size = sz;
  vm->fd = fd;
  vm->created_ns = kvm_now_ns();
  serial_reset(&vm->serial);
  legacy_reset(&vm->legacy);
  return 1;
err_kvm: {
    int en = errno;
    close(vm->kvm_fd);
    vm->kvm_fd = -1;
    errno = en;
    return kvm_fail(L, fd < 0 ? "KVM_CREATE_VM" : "KVM_GET_VCPU_MMAP_SIZE");
  }
}

/*** Close the VM's file descriptors. Idempotent. Memory and vCPU objects
stay usable until they are closed themselves (they hold their own
resources); VM methods raise afterwards.
@function vm:close
*/
static int l_vm_close(lua_State *L) {
  Vm *vm = tovm(L, 1);
  if (vm->running && vm->fd >= 0)
    return luaL_error(L, "cannot close a kvm.vm while a vcpu runs");
  serial_close(&vm->serial);
  if (vm->fd >= 0) { close(vm->fd); vm->fd = -1; }
  if (vm->kvm_fd >= 0) { close(vm->kvm_fd); vm->kvm_fd = -1; }
  free(vm->port_hits);
  vm->port_hits = NULL;
  return 0;
}

static int l_vm_gc(lua_State *L) {
  Vm *vm = tovm(L, 1);
  vm->running = 0;
  return l_vm_close(L);
}

static int l_vm_tostring(lua_State *L) {
  Vm *vm = tovm(L, 1);
  if (vm->fd < 0) lua_pushliteral(L, "kvm.vm (closed)");
  else {
    uint64_t total = 0; int n = 0;
    for (int i = 0; i < KVM_MAX_REGIONS; i++)
      if (vm->regions[i] && vm->regions[i]->host) { total += vm->regions[i]->size; n++; }
    lua_pushfstring(L, "kvm.vm (fd %d, %d regions, %d KiB)", vm->fd, n, (int)(total >> 10));
  }
  return 1;
}

/* ---- guest-physical access ---- */

static uint8_t *gpa_range(lua_State *L, Vm *vm, uint64_t gpa, uint64_t len) {
  uint8_t *p = kvm_gpa_ptr(vm, gpa, len);
  if (p == NULL)
    luaL_error(L, "guest range %s+%s is outside guest memory", kvm_pushhex(L, (uint64_t)(gpa)), kvm_pushhex(L, (uint64_t)(len)));
  return p;
}

/*** Read bytes by guest-physical address.
@function vm:read
@tparam integer gpa
@tparam integer len
@treturn string
*/
static int l_vm_read(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  uint64_t gpa = (uint64_t)luaL_checkinteger(L, 2);
  lua_Integer len = luaL_checkinteger(L, 3);
  luaL_argcheck(L, len >= 0, 3, "negative length");
  uint8_t *p = gpa_range(L, vm, gpa, (uint64_t)len);
  lua_pushlstring(L, (const char *)p, (size_t)len);
  return 1;
}

/*** Write a string by guest-physical address.
@function vm:write
*/
static int l_vm_write(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  uint64_t gpa = (uint64_t)luaL_checkinteger(L, 2);
  size_t len;
  const char *s = luaL_checklstring(L, 3, &len);
  uint8_t *p = gpa_range(L, vm, gpa, len);
  memcpy(p, s, len);
  return 0;
}

static int vm_uN(lua_State *L, int width) {
  Vm *vm = kvm_checkvm(L, 1);
  uint64_t gpa = (uint64_t)luaL_checkinteger(L, 2);
  return kvm_mem_access(L, gpa_range(L, vm, gpa, (uint64_t)width), width, 3);
}
static int l_vm_u8(lua_State *L) { return vm_uN(L, 1); }
static int l_vm_u16(lua_State *L) { return vm_uN(L, 2); }
static int l_vm_u32(lua_State *L) { return vm_uN(L, 4); }
static int l_vm_u64(lua_State *L) { return vm_uN(L, 8); }

/* ---- in-kernel devices ---- */

static int vm_ioctl0(lua_State *L, unsigned long req, unsigned long arg, const char *name) {
  Vm *vm = kvm_checkvm(L, 1);
  if (ioctl(vm->fd, req, arg) < 0) return kvm_fail(L, name);
  lua_pushboolean(L, 1);
  return 1;
}

/*** Create the in-kernel PIC, IOAPIC and local APICs (KVM_CREATE_IRQCHIP).
Call before creating vCPUs.
@function vm:irqchip
@return true
@return[2] fail, message, errno
*/
static int l_vm_irqchip(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  if (ioctl(vm->fd, KVM_CREATE_IRQCHIP, 0) < 0) return kvm_fail(L, "KVM_CREATE_IRQCHIP");
  vm->has_irqchip = 1;
  lua_pushboolean(L, 1);
  return 1;
}

/*** Create the in-kernel i8254 PIT (KVM_CREATE_PIT2); needs irqchip() first.
@function vm:pit
*/
static int l_vm_pit(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  struct kvm_pit_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.flags = KVM_PIT_SPEAKER_DUMMY;
  if (ioctl(vm->fd, KVM_CREATE_PIT2, &cfg) < 0) return kvm_fail(L, "KVM_CREATE_PIT2");
  lua_pushboolean(L, 1);
  return 1;
}

/*** Set the three-page TSS region Intel VT-x needs below 4 GiB (KVM_SET_TSS_ADDR).
@function vm:tss_addr
*/
static int l_vm_tss_addr(lua_State *L) {
  kvm_checkvm(L, 1);
  uint64_t a = kvm_checkrange(L, 2, 0, 0xffffd000u, "address");
  return vm_ioctl0(L, KVM_SET_TSS_ADDR, (unsigned long)a, "KVM_SET_TSS_ADDR");
}

/*** Set the identity-map page VT-x needs for real mode (KVM_SET_IDENTITY_MAP_ADDR).
@function vm:identity_map_addr
*/
static int l_vm_identity_map_addr(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  uint64_t a = kvm_checkrange(L, 2, 0, 0xfffff000u, "address");
  if (ioctl(vm->fd, KVM_SET_IDENTITY_MAP_ADDR, &a) < 0)
    return kvm_fail(L, "KVM_SET_IDENTITY_MAP_ADDR");
  lua_pushboolean(L, 1);
  return 1;
}

/*** Drive an interrupt line of the in-kernel irqchip (KVM_IRQ_LINE).
@function vm:irq_line
@tparam integer irq 0..23 (GSI)
@param level 0/1 or boolean
*/
static int l_vm_irq_line(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  struct kvm_irq_level il;
  il.irq = (uint32_t)kvm_checkrange(L, 2, 0, 1023, "irq");
  if (lua_isboolean(L, 3)) il.level = (uint32_t)lua_toboolean(L, 3);
  else il.level = (uint32_t)kvm_checkrange(L, 3, 0, 1, "level");
  if (ioctl(vm->fd, KVM_IRQ_LINE, &il) < 0) return kvm_fail(L, "KVM_IRQ_LINE");
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- claims ---- */

static const char *space_name(int is_mmio) { return is_mmio ? "address" : "port"; }

void kvm_claim(lua_State *L, Vm *vm, int is_mmio, uint64_t first, uint64_t last,
               int kind, int ref, void *dev) {
  Range *t = is_mmio ? vm->mmio : vm->io;
  int *n = is_mmio ? &vm->nmmio : &vm->nio;
  int i;
  for (i = 0; i < *n; i++) {
    if (first <= t[i].last && t[i].first <= last) {
      uint64_t hit = first > t[i].first ? first : t[i].first;
      luaL_error(L, "%s %s already claimed by %s-%s", space_name(is_mmio), kvm_pushhex(L, (uint64_t)(hit)), kvm_pushhex(L, (uint64_t)(t[i].first)), kvm_pushhex(L, (uint64_t)(t[i].last)));
    }
  }
  if (*n >= KVM_MAX_RANGES)
    luaL_error(L, "too many %s ranges (at most %d)", space_name(is_mmio), KVM_MAX_RANGES);
  for (i = *n; i > 0 && t[i - 1].first > first; i--) t[i] = t[i - 1];
  t[i].first = first; t[i].last = last; t[i].kind = kind; t[i].ref = ref;
  t[i].dev = dev; t[i].hits = 0;
  (*n)++;
}

/* remove the range that starts at first; returns its ref, or -1 */
static int unclaim(Vm *vm, int is_mmio, uint64_t first, uint64_t last, int *kind) {
  Range *t = is_mmio ? vm->mmio : vm->io;
  int *n = is_mmio ? &vm->nmmio : &vm->nio;
  for (int i = 0; i < *n; i++) {
    if (t[i].first == first && t[i].last == last) {
      int ref = t[i].ref;
      *kind = t[i].kind;
      for (; i < *n - 1; i++) t[i] = t[i + 1];
      (*n)--;
      return ref;
    }
  }
  return -1;
}

/* a free integer key in the VM's handler table */
static int free_ref(lua_State *L) {
  lua_getiuservalue(L, 1, 1);
  int ref = 1;
  while (lua_rawgeti(L, -1, ref) != LUA_TNIL) { lua_pop(L, 1); ref++; }
  lua_pop(L, 2);
  return ref;
}

static void drop_handler(lua_State *L, int ref) {
  lua_getiuservalue(L, 1, 1);
  lua_pushnil(L);
  lua_rawseti(L, -2, ref);
  lua_pop(L, 1);
}

static int set_handler(lua_State *L, int is_mmio, uint64_t first, uint64_t last, int fnarg) {
  Vm *vm = kvm_checkvm(L, 1);
  if (lua_isnil(L, fnarg)) {
    int kind;
    int ref = unclaim(vm, is_mmio, first, last, &kind);
    if (ref < 0)
      return luaL_error(L, "%s range %s-%s is not claimed", space_name(is_mmio), kvm_pushhex(L, (uint64_t)(first)), kvm_pushhex(L, (uint64_t)(last)));
    if (kind == H_LUA) drop_handler(L, ref);
    return 0;
  }
  luaL_checktype(L, fnarg, LUA_TFUNCTION);
  /* replacing the handler of exactly the same range is allowed */
  Range *t = is_mmio ? vm->mmio : vm->io;
  int n = is_mmio ? vm->nmmio : vm->nio;
  for (int i = 0; i < n; i++) {
    if (t[i].first == first && t[i].last == last && t[i].kind == H_LUA) {
      lua_getiuservalue(L, 1, 1);
      lua_pushvalue(L, fnarg);
      lua_rawseti(L, -2, t[i].ref);
      return 0;
    }
  }
  int ref = free_ref(L);
  kvm_claim(L, vm, is_mmio, first, last, H_LUA, ref, NULL);  /* may raise */
  lua_getiuservalue(L, 1, 1);
  lua_pushvalue(L, fnarg);
  lua_rawseti(L, -2, ref);
  return 0;
}

/*** Claim a port or port range for a Lua handler; nil removes it.
The handler is called as fn(port, direction, size, value) for each element
("in": value is nil, return the integer the guest reads, nil = all ones;
"out": value is what the guest wrote). Return kvm.STOP to make run() return.
@function vm:on_io
@param port integer, or {first, last}
@tparam ?function fn
*/
static int l_vm_on_io(lua_State *L) {
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
static int l_vm_on_mmio(lua_State *L) {
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

/*** Claim a debug-exit port: a guest write of a byte makes run() return
reason "debug_exit" with e.code. Default port 0x501.
@function vm:debug_exit
*/
static int l_vm_debug_exit(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  uint64_t port = (uint64_t)luaL_optinteger(L, 2, 0x501);
  luaL_argcheck(L, port <= 0xffff, 2, "port out of range");
  kvm_claim(L, vm, 0, port, port, H_DEBUGEXIT, 0, NULL);
  vm->debug_exit_port = (uint16_t)port;
  lua_settop(L, 1);
  return 1;
}

/*** Claimed ranges: array of {first=, last=, kind=, hits=, mmio=bool}.
@function vm:claims
*/
static int l_vm_claims(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  static const char *kinds[] = {"none", "lua", "serial", "legacy", "debug_exit"};
  lua_newtable(L);
  int k = 1;
  for (int m = 0; m < 2; m++) {
    Range *t = m ? vm->mmio : vm->io;
    int n = m ? vm->nmmio : vm->nio;
    for (int i = 0; i < n; i++) {
      lua_createtable(L, 0, 5);
      lua_pushinteger(L, (lua_Integer)t[i].first); lua_setfield(L, -2, "first");
      lua_pushinteger(L, (lua_Integer)t[i].last); lua_setfield(L, -2, "last");
      lua_pushstring(L, kinds[t[i].kind]); lua_setfield(L, -2, "kind");
      lua_pushinteger(L, (lua_Integer)t[i].hits); lua_setfield(L, -2, "hits");
      lua_pushboolean(L, m); lua_setfield(L, -2, "mmio");
      lua_rawseti(L, -2, k++);
    }
  }
  return 1;
}

const char *kvm_exit_name(uint32_t reason);  /* exit.c */

/*** Counters: {exits = {reason = n}, ports = {[port] = n}, unclaimed_io=,
unclaimed_mmio=, run_seconds=, handler_seconds=, serial_tx=, serial_rx=}.
@function vm:stats
*/
static int l_vm_stats(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  lua_createtable(L, 0, 8);
  lua_newtable(L);
  for (int i = 0; i < 64; i++)
    if (vm->stats.exits_by_reason[i]) {
      lua_pushinteger(L, (lua_Integer)vm->stats.exits_by_reason[i]);
      lua_setfield(L, -2, kvm_exit_name((uint32_t)i));
    }
  lua_setfield(L, -2, "exits");
  lua_newtable(L);
  if (vm->port_hits)
    for (int p = 0; p < 65536; p++)
      if (vm->port_hits[p]) {
        lua_pushinteger(L, vm->port_hits[p]);
        lua_rawseti(L, -2, p);
      }
  lua_setfield(L, -2, "ports");
  lua_pushinteger(L, (lua_Integer)vm->stats.unclaimed_io); lua_setfield(L, -2, "unclaimed_io");
  lua_pushinteger(L, (lua_Integer)vm->stats.unclaimed_mmio); lua_setfield(L, -2, "unclaimed_mmio");
  lua_pushnumber(L, (double)vm->stats.ns_in_run / 1e9); lua_setfield(L, -2, "run_seconds");
  lua_pushnumber(L, (double)vm->stats.ns_in_handlers / 1e9); lua_setfield(L, -2, "handler_seconds");
  lua_pushinteger(L, (lua_Integer)vm->serial.tx_bytes); lua_setfield(L, -2, "serial_tx");
  lua_pushinteger(L, (lua_Integer)vm->serial.rx_bytes); lua_setfield(L, -2, "serial_rx");
  return 1;
}

/*** Memory regions: array of kvm.memory objects, sorted by guest address.
@function vm:regions
*/
static int l_vm_regions(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  lua_newtable(L);
  lua_getiuservalue(L, 1, 1);
  lua_getfield(L, -1, "memories");
  int k = 1;
  lua_pushnil(L);
  while (lua_next(L, -2)) {
    lua_pop(L, 1);
    Memory *m = luaL_testudata(L, -1, MEMORY_MT);
    if (m && m->host) {
      /* insertion sort by guest address */
      int pos = k;
      while (pos > 1) {
        lua_rawgeti(L, -4, pos - 1);
        Memory *o = lua_touserdata(L, -1);
        if (o->guest <= m->guest) { lua_pop(L, 1); break; }
        lua_rawseti(L, -5, pos);
        pos--;
      }
      lua_pushvalue(L, -1);
      lua_rawseti(L, -5, pos);
      k++;
    }
  }
  lua_pop(L, 2);
  (void)vm;
  return 1;
}

static const luaL_Reg vm_methods[] = {
  {"close", l_vm_close},
  {"memory", l_vm_memory},
  {"vcpu", l_vm_vcpu},
  {"read", l_vm_read},
  {"write", l_vm_write},
  {"u8", l_vm_u8}, {"u16", l_vm_u16}, {"u32", l_vm_u32}, {"u64", l_vm_u64},
  {"irqchip", l_vm_irqchip},
  {"pit", l_vm_pit},
  {"tss_addr", l_vm_tss_addr},
  {"identity_map_addr", l_vm_identity_map_addr},
  {"irq_line", l_vm_irq_line},
  {"on_io", l_vm_on_io},
  {"on_mmio", l_vm_on_mmio},
  {"debug_exit", l_vm_debug_exit},
  {"claims", l_vm_claims},
  {"serial", l_vm_serial},
  {"legacy_ports", l_vm_legacy_ports},
  {"boot_markers", l_vm_boot_markers},
  {"load_elf", kvm_elf_load},
  {"stats", l_vm_stats},
  {"regions", l_vm_regions},
  {NULL, NULL}
};

void kvm_open_vm(lua_State *L) {
  luaL_newmetatable(L, VM_MT);
  luaL_newlib(L, vm_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, l_vm_gc); lua_setfield(L, -2, "__gc");
  lua_pushcfunction(L, l_vm_close); lua_setfield(L, -2, "__close");
  lua_pushcfunction(L, l_vm_tostring); lua_setfield(L, -2, "__tostring");
  lua_pushliteral(L, VM_MT); lua_setfield(L, -2, "__name");
  lua_pop(L, 1);
}
