/*
** vm.c - kvm.vm: the VM object, guest-physical access, in-kernel devices,
** its bus's claims and its counters. The devices themselves are one file
** each (uart.c, legacy.c, power.c, debugexit.c, debugcon.c, luadev.c,
** virtio_blk.c, virtio_rng.c and virtio_console.c on virtio.c); their
** vm: methods are listed in vm_methods below.
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
int l_vm_run(lua_State *L);         /* smp.c */
int kvm_mem_access(lua_State *L, uint8_t *p, int width, int valarg);  /* mem.c */

static Vm *tovm(lua_State *L, int arg) {
  return (Vm *)luaL_checkudata(L, arg, VM_MT);
}


Vm *kvm_vm_push(lua_State *L) {
  Vm *vm = lua_newuserdatauv(L, sizeof(Vm), 1);
  memset(vm, 0, sizeof *vm);
  vm->fd = -1;
  vm->kvm_fd = -1;
  luaL_setmetatable(L, VM_MT);
  lua_createtable(L, 4, 4);
  lua_newtable(L);
  lua_setfield(L, -2, "memories");
  lua_newtable(L);                   /* [slot + 1] = its open vCPUs, for vm:run */
  lua_setfield(L, -2, "vcpus");
  lua_setiuservalue(L, -2, 1);
  return vm;
}

/*** Create a VM: open /dev/kvm and KVM_CREATE_VM.
@function vm
@treturn kvm.vm
@return[2] fail, message, errno ("open /dev/kvm: No such file or directory (is the kvm module loaded? ...)")
*/
int l_vm_new(lua_State *L) {
  Vm *vm = kvm_vm_push(L);
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
  kvm_devices_close(vm);
  if (vm->fd >= 0) { close(vm->fd); vm->fd = -1; }
  if (vm->kvm_fd >= 0) { close(vm->kvm_fd); vm->kvm_fd = -1; }
  return 0;
}

static int l_vm_gc(lua_State *L) {
  Vm *vm = tovm(L, 1);
  vm->running = 0;
  l_vm_close(L);
  free(vm->retired_ports);
  vm->retired_ports = NULL;
  return 0;
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

static uint8_t *gpa_range(lua_State *L, Vm *vm, uint64_t gpa, uint64_t len, int write) {
  uint8_t *p = write ? kvm_gpa_wptr(vm, gpa, len) : kvm_gpa_ptr(vm, gpa, len);
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
  uint8_t *p = gpa_range(L, vm, gpa, (uint64_t)len, 0);
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
  uint8_t *p = gpa_range(L, vm, gpa, len, 1);
  memcpy(p, s, len);
  return 0;
}

static int vm_uN(lua_State *L, int width) {
  Vm *vm = kvm_checkvm(L, 1);
  uint64_t gpa = (uint64_t)luaL_checkinteger(L, 2);
  return kvm_mem_access(L, gpa_range(L, vm, gpa, (uint64_t)width, !lua_isnoneornil(L, 3)), width, 3);
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
  vm->has_pit = 1;
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
  int irq = (int)kvm_checkrange(L, 2, 0, 1023, "irq");
  int level = lua_isboolean(L, 3) ? lua_toboolean(L, 3) : (int)kvm_checkrange(L, 3, 0, 1, "level");
  if (kvm_irq_line(vm, irq, level) < 0) return kvm_fail(L, "KVM_IRQ_LINE");
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- claims and counters ---- */

/*** Claimed ranges: array of {first=, last=, kind=, hits=, mmio=bool}.
@function vm:claims
*/
static int l_vm_claims(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  lua_newtable(L);
  int k = 1;
  for (int m = 0; m < 2; m++) {
    Bus *b = m ? &vm->mmio : &vm->pio;
    for (int i = 0; i < b->n; i++) {
      lua_createtable(L, 0, 5);
      lua_pushinteger(L, (lua_Integer)b->r[i].first); lua_setfield(L, -2, "first");
      lua_pushinteger(L, (lua_Integer)b->r[i].last); lua_setfield(L, -2, "last");
      lua_pushstring(L, b->r[i].dev->ops->kind); lua_setfield(L, -2, "kind");
      lua_pushinteger(L, (lua_Integer)b->r[i].hits); lua_setfield(L, -2, "hits");
      lua_pushboolean(L, m); lua_setfield(L, -2, "mmio");
      lua_rawseti(L, -2, k++);
    }
  }
  return 1;
}

/*** Counters, over every vCPU the VM had: {exits = {reason = n}, ports =
{[port] = n}, unclaimed_io=, unclaimed_mmio=, run_seconds=, handler_seconds=
(Lua handlers; sampled), and the devices' own: serial_tx=, serial_rx= (the
UARTs'), debugcon_tx=, sleep_requests= (power)}.
@function vm:stats
*/
static int l_vm_stats(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  VcpuStats st;
  uint32_t *ports;
  kvm_vm_stats(vm, &st, &ports);
  lua_createtable(L, 0, 8);
  kvm_push_by_reason(L, st.exits_by_reason);
  lua_setfield(L, -2, "exits");
  lua_newtable(L);
  for (int p = 0; ports && p < 65536; p++)
    if (ports[p]) {
      lua_pushinteger(L, ports[p]);
      lua_rawseti(L, -2, p);
    }
  free(ports);
  lua_setfield(L, -2, "ports");
  lua_pushinteger(L, (lua_Integer)st.unclaimed_io); lua_setfield(L, -2, "unclaimed_io");
  lua_pushinteger(L, (lua_Integer)st.unclaimed_mmio); lua_setfield(L, -2, "unclaimed_mmio");
  lua_pushnumber(L, (double)st.ns_in_run / 1e9); lua_setfield(L, -2, "run_seconds");
  lua_pushnumber(L, (double)st.ns_in_handlers / 1e9); lua_setfield(L, -2, "handler_seconds");
  lua_pushinteger(L, 0); lua_setfield(L, -2, "serial_tx");
  lua_pushinteger(L, 0); lua_setfield(L, -2, "serial_rx");
  kvm_devices_stats(vm, L);
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

/* the devices: each file defines its vm: method; registering a device is
   its line here and in the table below (and its file in the rockspec) */
int l_vm_serial(lua_State *L);        /* uart.c */
int l_vm_legacy_ports(lua_State *L);  /* legacy.c */
int l_vm_boot_markers(lua_State *L);  /* legacy.c */
int l_vm_power(lua_State *L);         /* power.c */
int l_vm_debugcon(lua_State *L);      /* debugcon.c */
int l_vm_debug_exit(lua_State *L);    /* debugexit.c */
int l_vm_on_io(lua_State *L);         /* luadev.c */
int l_vm_on_mmio(lua_State *L);       /* luadev.c */
int l_vm_virtio_blk(lua_State *L);    /* virtio_blk.c */
int l_vm_virtio_rng(lua_State *L);    /* virtio_rng.c */
int l_vm_virtio_console(lua_State *L);  /* virtio_console.c */

static const luaL_Reg vm_methods[] = {
  {"close", l_vm_close},
  {"memory", l_vm_memory},
  {"vcpu", l_vm_vcpu},
  {"run", l_vm_run},
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
  /* devices: one line each */
  {"serial", l_vm_serial},
  {"legacy_ports", l_vm_legacy_ports},
  {"boot_markers", l_vm_boot_markers},
  {"power", l_vm_power},
  {"debugcon", l_vm_debugcon},
  {"virtio_blk", l_vm_virtio_blk},
  {"virtio_rng", l_vm_virtio_rng},
  {"virtio_console", l_vm_virtio_console},
  {"load_elf", kvm_elf_load},
  {"stats", l_vm_stats},
  {"snapshot", l_vm_snapshot},
  {"restore", l_vm_restore},
  {"regions", l_vm_regions},
  {NULL, NULL}
};

void kvm_open_vm(lua_State *L) {
  static const luaL_Reg meta[] = {
    {"__gc", l_vm_gc},
    {"__close", l_vm_close},
    {"__tostring", l_vm_tostring},
    {NULL, NULL}
  };
  kvm_new_class(L, VM_MT, vm_methods, meta);
}
