/*
** virtio_console.c - a virtio console (virtio 1.2, 5.3) with one port and no
** multiport feature: Linux makes it /dev/hvc0. What the guest writes (the
** transmit queue's readable buffers) goes to a Lua FILE or function like a
** UART's output (sink.c): at a newline, when 4 KiB are buffered, on the
** 10 ms tick and when run() returns. Input is read without blocking from a
** file descriptor into the receive queue's buffers on the tick; the
** receive buffers wait in their queue while no input does.
*/

/*** vm:virtio_console, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#include <errno.h>
#include <poll.h>
#include <unistd.h>

#include "sink.h"
#include "virtio.h"

#define CONSOLE_ID      3
#define CONSOLE_TICK_NS 10000000u   /* 10 ms */
#define CONSOLE_CHUNK   4096
enum { RXQ = 0, TXQ = 1 };

typedef struct Console {
  Virtio v;                      /* first: a Console is a Virtio */
  Sink out;
  int in_fd;                     /* -1: no input */
  int in_ref;                    /* the input FILE in the VM's table */
  luaL_Stream *in_stream;        /* that FILE: closed by Lua, it is read no more */
  int in_eof;
  uint64_t rx_bytes;
} Console;

/* bytes waiting on the input, without blocking: read up to n of them */
static ssize_t read_input(Console *k, uint8_t *buf, size_t n) {
  if (k->in_fd < 0 || k->in_eof || k->in_stream == NULL || k->in_stream->closef == NULL) return 0;
  struct pollfd p = { .fd = k->in_fd, .events = POLLIN };
  if (poll(&p, 1, 0) <= 0 || !(p.revents & (POLLIN | POLLHUP))) return 0;
  ssize_t r;
  do r = read(k->in_fd, buf, n); while (r < 0 && errno == EINTR);
  if (r <= 0) { k->in_eof = 1; return 0; }
  return r;
}

static int console_request(Virtio *v, int q, VirtioChain *c, uint32_t *written) {
  Console *k = (Console *)v;
  if (q == TXQ) {
    uint8_t buf[256];
    for (uint64_t off = 0; off < c->rlen;) {
      uint64_t n = virtio_chain_read(c, off, buf, sizeof buf);
      if (n == 0) break;
      for (uint64_t i = 0; i < n; i++) sink_put(&k->out, buf[i]);
      off += n;
    }
    *written = 0;
    return 0;
  }
  if (c->wlen == 0) { *written = 0; return 0; }
  uint8_t buf[CONSOLE_CHUNK];
  ssize_t r = read_input(k, buf, c->wlen < sizeof buf ? (size_t)c->wlen : sizeof buf);
  if (r <= 0) return 1;                 /* no input yet: the buffer waits */
  *written = (uint32_t)virtio_chain_write(c, 0, buf, (uint64_t)r);
  k->rx_bytes += *written;
  return 0;
}

static int console_access(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size,
                          uint8_t *data) {
  Console *k = (Console *)d;
  virtio_access(d, bc, addr, is_write, size, data);
  return k->out.want ? sink_flush(&k->out, bc) : BUS_OK;
}

static int console_tick(Device *d, BusCall *bc) {
  Console *k = (Console *)d;
  if (k->in_fd >= 0 && !k->in_eof && (k->v.status & VIRTIO_S_DRIVER_OK)) virtio_queue_process(&k->v, RXQ);
  return k->out.len ? sink_flush(&k->out, bc) : BUS_OK;
}

static int console_flush(Device *d, BusCall *bc) {
  return sink_flush(&((Console *)d)->out, bc);
}

static void console_stats(Virtio *v, lua_State *L) {
  Console *k = (Console *)v;
  kvm_add_count(L, "console_tx", k->out.bytes);
  kvm_add_count(L, "console_rx", k->rx_bytes);
}

/* A snapshot holds nothing of the console beyond the transport's state:
   input goes from the file straight into a receive buffer, never waits in
   between, and output handed to the sink is the past. */
static const VirtioType console_type = {
  .kind = "virtio-console",
  .device_id = CONSOLE_ID,
  .nqueues = 2,
  .request = console_request,
  .stats = console_stats,
};

static const DeviceOps console_ops = {
  .kind = "virtio-console",
  .access = console_access,
  .tick = console_tick,
  .flush = console_flush,
  .close = virtio_close,
  .stats = virtio_stats,
  .save = virtio_save,
  .restore = virtio_restore,
};

/*** Attach a virtio console (virtio-mmio): Linux's virtio_console driver
makes it /dev/hvc0 (`console=hvc0` makes it the kernel's console). Output
and input as for `vm:serial` (no terminal modes are changed).
@function vm:virtio_console
@tparam[opt] table opts `output`: a file (default io.stdout), a
  function(bytes) or false; `input`: a file to read from (default none);
  `base`, `irq` as for `vm:virtio_blk`
@treturn kvm.virtio the device
@raise on a bad option or a taken address range
*/
int l_vm_virtio_console(lua_State *L) {
  static const char *const keys[] = {"output", "input", NULL};
  kvm_checkvm(L, 1);
  kvm_opt_table(L, 2);
  luaL_Stream *in = NULL;
  if (lua_getfield(L, 2, "input") != LUA_TNIL) {
    in = sink_checkfile(L, -1, "vm:virtio_console", "input");
    if (in == NULL)
      return luaL_error(L, "vm:virtio_console: 'input' must be a file, got %s", luaL_typename(L, -1));
    if (fileno(in->f) < 0) return luaL_error(L, "vm:virtio_console: 'input' has no file descriptor");
  }
  lua_pop(L, 1);
  Sink out;                             /* raises on a bad output before the device exists */
  sink_open(L, &out, 2, "output", "vm:virtio_console");
  Console *k = (Console *)virtio_new(L, sizeof(Console), &console_ops, &console_type, 0, keys);
  k->out.kind = out.kind;
  k->out.ref = out.ref;
  k->in_fd = -1;
  k->in_stream = in;
  if (in) {
    lua_getfield(L, 2, "input");
    k->in_ref = kvm_vm_ref(L, 1, -1);
    lua_pop(L, 1);
    k->in_fd = fileno(in->f);
  }
  k->v.dev.tick_ns = (in || k->out.kind != SINK_NONE) ? CONSOLE_TICK_NS : 0;
  return 1;
}
