/*
** debugcon.c - the debug console of Bochs and QEMU (-debugcon): a port,
** 0xe9 by default, where every byte the guest writes is output, with no
** UART to program. Firmware and early boot code print there (SeaBIOS,
** Linux's earlyprintk=... does not, but a bare-metal guest can in one
** instruction). Reads return the port's number (0xe9), which is how a
** guest detects it.
*/

/*** vm:debugcon, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#include "sink.h"
#include "snapdev.h"

#define DEBUGCON_TICK_NS 10000000u

typedef struct Debugcon {
  Device dev;
  uint16_t port;
  Sink out;
} Debugcon;

static int debugcon_access(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size,
                           uint8_t *data) {
  Debugcon *dc = (Debugcon *)d;
  for (unsigned i = 0; i < size; i++) {
    if (!is_write) { data[i] = (uint8_t)dc->port; continue; }
    sink_put(&dc->out, data[i]);
    if (dc->out.want && sink_flush(&dc->out, bc) != BUS_OK) return BUS_ERROR;   /* full: out now */
  }
  return BUS_OK;
}

static int debugcon_flush(Device *d, BusCall *bc) {
  return sink_flush(&((Debugcon *)d)->out, bc);
}

static void debugcon_stats(Device *d, lua_State *L) {
  kvm_add_count(L, "debugcon_tx", ((Debugcon *)d)->out.bytes);
}

/* ---- snapshots ---- */

/* Version 1 of a debug console's state, after the version word: its port
   (u32). It has no other: a read answers the port, a write is output (what
   the guest wrote before the snapshot is the past; where output goes is the
   restoring VM's). */
#define DEBUGCON_SNAP_VERSION 1

static int debugcon_save(Device *d, SnapBuf *b, char *err, size_t errlen) {
  snapbuf_u32(b, DEBUGCON_SNAP_VERSION);
  snapbuf_u32(b, ((Debugcon *)d)->port);
  return snapdev_saved(b, err, errlen);
}

static int debugcon_restore(Device *d, const uint8_t *p, size_t n, int apply, char *err,
                            size_t errlen) {
  SnapRd r = { p, n, 0, 0 };
  if (snapdev_version(&r, DEBUGCON_SNAP_VERSION, err, errlen) < 0) return -1;
  uint32_t port = snaprd_u32(&r);
  if (snapdev_end(&r, err, errlen) < 0) return -1;
  if (port != ((Debugcon *)d)->port)
    return snapdev_fail(err, errlen, "a debug console at port 0x%x, this one is at 0x%x", port,
                        ((Debugcon *)d)->port);
  return 0;
}

static const DeviceOps debugcon_ops = {
  .kind = "debugcon",
  .access = debugcon_access,
  .tick = debugcon_flush,        /* output without a newline, while the guest runs */
  .flush = debugcon_flush,
  .stats = debugcon_stats,
  .save = debugcon_save,
  .restore = debugcon_restore,
};

/*** Claim a debug console port: what the guest writes there goes to
`output`, like a UART's, without a UART to program.
@function vm:debugcon
@tparam[opt] table opts `port` (default 0xe9), `output` (a file, default
  io.stdout, a function(bytes), or false)
@treturn kvm.vm the VM
*/
int l_vm_debugcon(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  kvm_opt_table(L, 2);
  lua_getfield(L, 2, "port");
  int ok = 1;
  lua_Integer port = lua_isnil(L, -1) ? 0xe9 : lua_tointegerx(L, -1, &ok);
  if (!ok || port < 0 || port > 0xffff) return luaL_error(L, "vm:debugcon: 'port' must be a port in 0..0xffff");
  lua_pop(L, 1);
  char buf[128];
  const char *clash = bus_clash(&vm->pio, 0, (uint64_t)port, (uint64_t)port, buf, sizeof buf);
  if (clash) return luaL_error(L, "vm:debugcon: %s", clash);
  kvm_device_room(L, vm);
  Sink out;
  sink_open(L, &out, 2, "output", "vm:debugcon");
  Debugcon *dc = kvm_device_new(L, 1, sizeof(Debugcon), &debugcon_ops);
  dc->port = (uint16_t)port;
  dc->out.kind = out.kind;
  dc->out.ref = out.ref;
  dc->dev.tick_ns = out.kind != SINK_NONE ? DEBUGCON_TICK_NS : 0;
  bus_claim(L, &vm->pio, 0, (uint64_t)port, (uint64_t)port, &dc->dev);
  lua_pushvalue(L, 1);
  return 1;
}
