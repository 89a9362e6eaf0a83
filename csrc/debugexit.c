/*
** debugexit.c - a debug-exit port: a guest write of a byte ends run() with
** reason "debug_exit" and the byte as e.code (as QEMU's isa-debug-exit,
** without its (code << 1) | 1 exit status). Reads see all ones.
*/

/*** vm:debug_exit, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#include <string.h>

#include "snapdev.h"

static int debugexit_access(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size,
                            uint8_t *data) {
  if (!is_write) {
    memset(data, 0xff, size);
    return BUS_OK;
  }
  if (bc->why == NULL) {         /* the first byte of a string write */
    bc->why = "debug_exit";
    bc->code = data[0];
  }
  return BUS_STOP;
}

/* Version 1 of a debug-exit port's state: the version word alone (it keeps
   none), so that the device is in the snapshot and a restore finds it. */
#define DEBUGEXIT_SNAP_VERSION 1

static int debugexit_save(Device *d, SnapBuf *b, char *err, size_t errlen) {
  snapbuf_u32(b, DEBUGEXIT_SNAP_VERSION);
  return snapdev_saved(b, err, errlen);
}

static int debugexit_restore(Device *d, const uint8_t *p, size_t n, int apply, char *err,
                             size_t errlen) {
  SnapRd r = { p, n, 0, 0 };
  if (snapdev_version(&r, DEBUGEXIT_SNAP_VERSION, err, errlen) < 0) return -1;
  return snapdev_end(&r, err, errlen);
}

static const DeviceOps debugexit_ops = {
  .kind = "debug_exit",
  .access = debugexit_access,
  .save = debugexit_save,
  .restore = debugexit_restore,
};

/*** Claim a debug-exit port: a guest write of a byte makes run() return
reason "debug_exit" with e.code.
@function vm:debug_exit
@tparam[opt=0x501] integer port
@treturn kvm.vm the VM
*/
int l_vm_debug_exit(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  uint64_t port = (uint64_t)luaL_optinteger(L, 2, 0x501);
  luaL_argcheck(L, port <= 0xffff, 2, "port out of range");
  char buf[128];
  const char *clash = bus_clash(&vm->pio, 0, port, port, buf, sizeof buf);
  if (clash) return luaL_error(L, "%s", clash);
  Device *d = kvm_device_new(L, 1, sizeof(Device), &debugexit_ops);
  bus_claim(L, &vm->pio, 0, port, port, d);
  lua_settop(L, 1);
  return 1;
}
