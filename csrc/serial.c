/*
** serial.c - a 16550A UART on eight I/O ports (COM1 is 0x3f8, IRQ 4).
**
** Transmission is instant: THR is always empty (LSR.THRE|TEMT), so every
** THR write re-raises the THR-empty interrupt at once. Output is buffered
** in Serial.out and handed to a Lua FILE or function by serial_flush (the
** run loop calls it when flush_wanted is set and when run() returns).
** Input comes from a file descriptor, read without blocking into the
** receive FIFO when the guest drains it, polls LSR, or the run loop's
** 10 ms tick calls serial_poll_input.
**
** Register behaviour follows the PC16550D datasheet closely enough for
** Linux's 8250 autoconfig() to identify a 16550A: IER keeps only bits 0-3,
** MSR mirrors MCR in loopback, IIR bits 7-6 report the FIFO enable and
** bit 5 stays 0, and the receive FIFO holds exactly 16 bytes.
*/

/*** vm:serial, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "luakvm.h"

/* register offsets */
enum { R_RBR_THR = 0, R_IER = 1, R_IIR_FCR = 2, R_LCR = 3, R_MCR = 4, R_LSR = 5,
       R_MSR = 6, R_SCR = 7 };

#define IER_ERBFI 0x01           /* received data available */
#define IER_ETBEI 0x02           /* THR empty */
#define IER_ELSI  0x04           /* receiver line status */
#define IER_EDSSI 0x08           /* modem status */

#define IIR_NONE  0x01
#define IIR_MSR   0x00
#define IIR_THRI  0x02
#define IIR_RDA   0x04
#define IIR_LSR   0x06
#define IIR_CTI   0x0c           /* character timeout */
#define IIR_FIFO  0xc0

#define FCR_ENABLE 0x01
#define FCR_CLR_RX 0x02
#define FCR_CLR_TX 0x04

#define LCR_DLAB  0x80

#define MCR_DTR   0x01
#define MCR_RTS   0x02
#define MCR_OUT1  0x04
#define MCR_OUT2  0x08
#define MCR_LOOP  0x10

#define LSR_DR    0x01
#define LSR_OE    0x02
#define LSR_ERRS  0x1e           /* OE PE FE BI: cleared by reading LSR */
#define LSR_THRE  0x20
#define LSR_TEMT  0x40

#define MSR_CTS   0x10
#define MSR_DSR   0x20
#define MSR_RI    0x40
#define MSR_DCD   0x80

#define OUT_NONE  0
#define OUT_FILE  1
#define OUT_FUNC  2

/* partial output older than this is flushed with the next byte */
#define FLUSH_AGE_NS 20000000u

static int fifo_on(const Serial *s) { return s->fcr & FCR_ENABLE; }

/* a disabled FIFO is a one-byte holding register */
static int rx_capacity(const Serial *s) { return fifo_on(s) ? SERIAL_FIFO : 1; }

static int rx_trigger(const Serial *s) {
  static const int levels[4] = {1, 4, 8, 14};
  return levels[s->fcr >> 6];
}

static void rx_clear(Serial *s) { s->rx_head = 0; s->rx_count = 0; }

/* The guest's driver resets the receive FIFO when it probes the port and on
   every open: typeahead (bytes from the host's input, not loopback) is not
   lost there but taken back, ahead of anything still held, and delivered
   first once the FIFO has room again. */
static void rx_reset(Serial *s) {
  if (s->in_fd >= 0 && !(s->mcr & MCR_LOOP) && s->rx_count > 0) {
    uint8_t keep[sizeof s->held] = {0};
    int n = 0;
    for (int i = 0; i < s->rx_count && n < (int)sizeof keep; i++)
      keep[n++] = s->rx[(s->rx_head + i) % SERIAL_FIFO];
    for (int i = 0; i < s->held_len && n < (int)sizeof keep; i++) keep[n++] = s->held[i];
    memcpy(s->held, keep, (size_t)n);
    s->held_len = n;
  }
  rx_clear(s);
}

/* one received byte; a full FIFO drops it and flags an overrun */
static void rx_push(Serial *s, uint8_t v) {
  if (s->rx_count >= rx_capacity(s)) {
    s->lsr |= LSR_OE;
    s->rx_overruns++;
    return;
  }
  s->rx[(s->rx_head + s->rx_count) % SERIAL_FIFO] = v;
  s->rx_count++;
}

/* highest-priority pending interrupt, as IIR bits 3-0 */
static uint8_t pending(const Serial *s) {
  if ((s->ier & IER_ELSI) && (s->lsr & LSR_ERRS)) return IIR_LSR;
  if ((s->ier & IER_ERBFI) && s->rx_count > 0)
    return (fifo_on(s) && s->rx_count < rx_trigger(s)) ? IIR_CTI : IIR_RDA;
  if ((s->ier & IER_ETBEI) && s->thri_pending) return IIR_THRI;
  if ((s->ier & IER_EDSSI) && (s->msr & 0x0f)) return IIR_MSR;
  return IIR_NONE;
}

/* Recompute IIR and drive the IRQ line on a change. PC boards gate the
   UART's interrupt with OUT2, and loopback forces the outputs inactive. */
static void update_irq(Vm *vm, Serial *s) {
  uint8_t p = pending(s);
  s->iir = (uint8_t)(p | (fifo_on(s) ? IIR_FIFO : 0));
  int level = p != IIR_NONE && (s->mcr & (MCR_OUT2 | MCR_LOOP)) == MCR_OUT2;
  if (level != s->irq_level && vm->has_irqchip && vm->fd >= 0) {
    struct kvm_irq_level il;
    memset(&il, 0, sizeof il);
    il.irq = (uint32_t)s->irq;
    il.level = (uint32_t)level;
    if (ioctl(vm->fd, KVM_IRQ_LINE, &il) == 0) s->irq_level = level;
  }
}

/* modem inputs: a connected modem, or the MCR outputs in loopback */
static uint8_t modem_lines(const Serial *s) {
  if (!(s->mcr & MCR_LOOP)) return MSR_DCD | MSR_DSR | MSR_CTS;
  return (uint8_t)(((s->mcr & MCR_RTS) ? MSR_CTS : 0) | ((s->mcr & MCR_DTR) ? MSR_DSR : 0) |
                   ((s->mcr & MCR_OUT1) ? MSR_RI : 0) | ((s->mcr & MCR_OUT2) ? MSR_DCD : 0));
}

/* new modem lines, setting the delta bits 3-0 for what changed */
static void set_modem_lines(Serial *s) {
  uint8_t old = s->msr & 0xf0, now = modem_lines(s), d = s->msr & 0x0f, x = old ^ now;
  if (x & MSR_CTS) d |= 0x01;
  if (x & MSR_DSR) d |= 0x02;
  if ((old & MSR_RI) && !(now & MSR_RI)) d |= 0x04;   /* trailing edge of RI */
  if (x & MSR_DCD) d |= 0x08;
  s->msr = now | d;
}

/*
** Reset the device registers and buffers (a power-on reset). Leaves the
** configuration alone: enabled, port, irq, input and output, tty state.
*/
void serial_reset(Serial *s) {
  s->ier = 0; s->fcr = 0; s->lcr = 0; s->mcr = 0; s->scr = 0;
  s->lsr = 0; s->rbr = 0;
  s->dll = 0x0c; s->dlm = 0;     /* 9600 baud */
  s->msr = MSR_DCD | MSR_DSR | MSR_CTS;
  s->iir = IIR_NONE;
  s->thri_pending = 0;
  rx_clear(s);
  s->held_len = 0;
  s->lsr_polls = 0;
  s->out_len = 0;
  s->flush_wanted = 0;
}

/* Input moves from the host into the FIFO only while the guest wants it: its
   driver enabled the receive interrupt and the IRQ line (IER bit 0, MCR OUT2),
   or it polls LSR (LSR_POLLING reads in a row; Linux's console reads it twice
   in a row at times).
   Linux reads LSR then RBR once to clear the port when it probes and opens
   it: a byte pulled in by that LSR read would be thrown away (typeahead lost
   its first bytes that way); it waits in the host instead. */
#define LSR_POLLING 8
static int input_usable(const Serial *s) {
  return s->enabled && s->in_fd >= 0 && !s->in_eof && !(s->mcr & MCR_LOOP) &&
         s->in_stream != NULL && s->in_stream->closef != NULL &&
         (((s->ier & IER_ERBFI) && (s->mcr & MCR_OUT2)) || s->lsr_polls >= LSR_POLLING);
}

/* read what is ready without blocking; 1 if bytes arrived */
static int fill_rx(Serial *s) {
  int room = rx_capacity(s) - s->rx_count;
  if (room <= 0 || !input_usable(s)) return 0;
  if (s->held_len > 0) {         /* typeahead a FIFO reset took back comes first */
    int n = s->held_len < room ? s->held_len : room;
    for (int i = 0; i < n; i++) rx_push(s, s->held[i]);
    memmove(s->held, s->held + n, (size_t)(s->held_len - n));
    s->held_len -= n;
    return 1;
  }
  struct pollfd pfd = { .fd = s->in_fd, .events = POLLIN, .revents = 0 };
  if (poll(&pfd, 1, 0) <= 0) return 0;
  if (pfd.revents & POLLNVAL) { s->in_eof = 1; return 0; }
  uint8_t buf[SERIAL_FIFO];
  ssize_t n = read(s->in_fd, buf, (size_t)room);
  if (n == 0) { s->in_eof = 1; return 0; }
  if (n < 0) {
    if (errno != EAGAIN && errno != EINTR && errno != EWOULDBLOCK) s->in_eof = 1;
    return 0;
  }
  for (ssize_t i = 0; i < n; i++) rx_push(s, buf[i]);
  s->rx_bytes += (uint64_t)n;
  return 1;
}

/* poll the input (run loop: periodic tick). 1 if bytes arrived */
int serial_poll_input(Vm *vm, Serial *s) {
  int got = fill_rx(s);
  if (got) update_irq(vm, s);
  /* the tick is also the moment to push out a partial line */
  if (s->out_len) s->flush_wanted = 1;
  return got;
}

static void transmit(Serial *s, uint8_t v) {
  if (s->mcr & MCR_LOOP) {       /* the serial output is wired to the input */
    rx_push(s, v);
    return;
  }
  if (s->out_kind == OUT_NONE) { s->tx_bytes++; return; }
  if (s->out_len >= SERIAL_OUTBUF) { s->tx_dropped++; s->flush_wanted = 1; return; }
  uint64_t now = kvm_now_ns();
  if (s->out_len == 0) s->out_first_ns = now;
  s->out[s->out_len++] = (char)v;
  s->tx_bytes++;
  if (v == '\n' || s->out_len == SERIAL_OUTBUF || now - s->out_first_ns >= FLUSH_AGE_NS)
    s->flush_wanted = 1;
}

static uint8_t read_reg(Vm *vm, Serial *s, unsigned off) {
  uint8_t v;
  if (off != R_LSR) s->lsr_polls = 0;
  else if (s->lsr_polls < LSR_POLLING) s->lsr_polls++;
  switch (off) {
  case R_RBR_THR:
    if (s->lcr & LCR_DLAB) return s->dll;
    if (s->rx_count > 0) {
      s->rbr = s->rx[s->rx_head];
      s->rx_head = (s->rx_head + 1) % SERIAL_FIFO;
      s->rx_count--;
    }
    if (s->rx_count == 0) fill_rx(s);      /* next bytes, if the host has them */
    update_irq(vm, s);
    return s->rbr;
  case R_IER:
    return (s->lcr & LCR_DLAB) ? s->dlm : s->ier;
  case R_IIR_FCR:
    update_irq(vm, s);
    v = s->iir;
    if ((v & 0x0f) == IIR_THRI) {          /* reading IIR acknowledges THRI */
      s->thri_pending = 0;
      update_irq(vm, s);
    }
    return v;
  case R_LCR:
    return s->lcr;
  case R_MCR:
    return s->mcr;
  case R_LSR:
    /* a polling driver gets input here; an interrupt-driven one on the tick
       (Linux reads LSR then RBR to clear the port when it opens it) */
    if (s->rx_count == 0 && s->lsr_polls >= LSR_POLLING) fill_rx(s);
    v = (uint8_t)((s->lsr & LSR_ERRS) | LSR_THRE | LSR_TEMT | (s->rx_count ? LSR_DR : 0));
    s->lsr &= (uint8_t)~LSR_ERRS;
    update_irq(vm, s);
    return v;
  case R_MSR:
    v = s->msr;
    s->msr &= 0xf0;
    update_irq(vm, s);
    return v;
  case R_SCR:
    return s->scr;
  }
  return 0xff;
}

static void write_reg(Vm *vm, Serial *s, unsigned off, uint8_t v) {
  s->lsr_polls = 0;
  switch (off) {
  case R_RBR_THR:
    if (s->lcr & LCR_DLAB) { s->dll = v; return; }
    transmit(s, v);
    s->thri_pending = 1;                   /* sent at once: THR is empty again */
    break;
  case R_IER:
    if (s->lcr & LCR_DLAB) { s->dlm = v; return; }
    if ((v & IER_ETBEI) && !(s->ier & IER_ETBEI)) s->thri_pending = 1;
    s->ier = v & 0x0f;
    break;
  case R_IIR_FCR:
    if ((v ^ s->fcr) & FCR_ENABLE) rx_reset(s);   /* toggling the FIFOs resets them */
    if (v & FCR_CLR_RX) rx_reset(s);
    /* FCR_CLR_TX: the transmit FIFO is always empty */
    s->fcr = (v & FCR_ENABLE) ? (uint8_t)(v & 0xc9) : 0;
    break;
  case R_LCR:
    s->lcr = v;
    return;
  case R_MCR:
    /* into loopback (Linux's probe): typed bytes in the FIFO wait in the VMM */
    if ((v & MCR_LOOP) && !(s->mcr & MCR_LOOP)) rx_reset(s);
    s->mcr = v & 0x1f;
    set_modem_lines(s);
    break;
  case R_LSR: case R_MSR:                  /* factory test registers: ignored */
    return;
  case R_SCR:
    s->scr = v;
    return;
  }
  update_irq(vm, s);
}

/* one byte at register offset off (0..7) */
void serial_io(Vm *vm, Serial *s, unsigned off, int is_write, uint8_t *val) {
  if (off > 7) { if (!is_write) *val = 0xff; return; }
  if (is_write) write_reg(vm, s, off, *val);
  else *val = read_reg(vm, s, off);
}

int serial_flush(lua_State *L, Vm *vm, int vm_idx, int msgh) {
  Serial *s = &vm->serial;
  size_t n = s->out_len;
  s->flush_wanted = 0;
  if (n == 0) return LUA_OK;
  if (s->out_kind == OUT_NONE) { s->out_len = 0; return LUA_OK; }
  vm_idx = lua_absindex(L, vm_idx);
  if (msgh) msgh = lua_absindex(L, msgh);
  lua_getiuservalue(L, vm_idx, 1);                        /* uv */
  lua_getfield(L, -1, "serial_out");                      /* uv out */
  if (s->out_kind == OUT_FILE) {
    luaL_Stream *p = (luaL_Stream *)luaL_testudata(L, -1, LUA_FILEHANDLE);
    s->out_len = 0;
    lua_pop(L, 2);
    if (p == NULL || p->closef == NULL) {
      lua_pushliteral(L, "serial output: attempt to use a closed file");
      return LUA_ERRRUN;
    }
    if (fwrite(s->out, 1, n, p->f) < n) s->tx_dropped += n;  /* e.g. EPIPE: lost */
    fflush(p->f);
    return LUA_OK;
  }
  lua_pushlstring(L, s->out, n);                          /* uv fn bytes */
  s->out_len = 0;
  int st = lua_pcall(L, 1, 0, msgh);                      /* uv [err] */
  if (st != LUA_OK) lua_remove(L, -2);
  else lua_pop(L, 1);
  return st;
}

/* ---- terminal ---- */

void serial_begin_run(Serial *s) {
  if (!s->enabled || s->in_fd < 0 || s->tty_saved || s->in_stream == NULL ||
      s->in_stream->closef == NULL || !isatty(s->in_fd))
    return;
  if (tcgetattr(s->in_fd, &s->saved_tios) != 0) return;
  struct termios t = s->saved_tios;
  /* cfmakeraw, except: OPOST stays so "\n" still starts a line, and ISIG
     stays so ^C reaches the host (run() returns reason "intr") */
  t.c_iflag &= (tcflag_t)~(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
  t.c_lflag &= (tcflag_t)~(ECHO | ECHONL | ICANON | IEXTEN);
  t.c_cflag &= (tcflag_t)~(CSIZE | PARENB);
  t.c_cflag |= CS8;
  t.c_cc[VMIN] = 1;
  t.c_cc[VTIME] = 0;
  if (tcsetattr(s->in_fd, TCSANOW, &t) == 0) s->tty_saved = 1;
}

void serial_end_run(Serial *s) {
  if (!s->tty_saved) return;
  s->tty_saved = 0;
  if (s->in_fd >= 0) (void)tcsetattr(s->in_fd, TCSANOW, &s->saved_tios);
}

void serial_close(Serial *s) {
  serial_end_run(s);
  s->in_fd = -1;
  s->in_stream = NULL;
  s->enabled = 0;
}

/* ---- vm:serial{...} ---- */

static luaL_Stream *open_file_arg(lua_State *L, int idx, const char *field) {
  luaL_Stream *p = (luaL_Stream *)luaL_testudata(L, idx, LUA_FILEHANDLE);
  if (p == NULL) return NULL;
  if (p->closef == NULL || p->f == NULL)
    luaL_error(L, "vm:serial: '%s' is a closed file", field);
  return p;
}

static lua_Integer int_field(lua_State *L, int opts, const char *k, lua_Integer dflt,
                             lua_Integer lo, lua_Integer hi, const char *range) {
  int isnum;
  lua_Integer v;
  if (lua_getfield(L, opts, k) == LUA_TNIL) { lua_pop(L, 1); return dflt; }
  v = lua_tointegerx(L, -1, &isnum);
  if (!isnum || v < lo || v > hi)
    luaL_error(L, "vm:serial: '%s' must be an integer in %s, got %s", k, range,
               luaL_tolstring(L, -1, NULL));
  lua_pop(L, 1);
  return v;
}

/***
Attach a 16550A UART to eight I/O ports. The guest sees a UART that Linux
identifies as a 16550A (console=ttyS0). Output is flushed at each newline,
when 4 KiB are buffered, on the 10 ms input tick and when run() returns.
Input is read without blocking, straight from the file descriptor (bytes
already buffered in the Lua FILE are not seen); a terminal is put in raw
mode (echo and line editing off; ^C still interrupts run()) while run()
runs and restored afterwards.
@function vm:serial
@tparam[opt] table opts
  `port` (default 0x3f8, at most 0xfff8), `irq` (default 4, 0..23),
  `output`: a file (default io.stdout), a function(bytes) or false to discard,
  `input`: a file to read from (default none)
@treturn kvm.vm the VM, for chaining
@raise on a bad option, when the ports are taken or the UART is already set up
*/
int l_vm_serial(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  Serial *s = &vm->serial;
  lua_settop(L, 2);
  if (lua_isnil(L, 2)) { lua_newtable(L); lua_replace(L, 2); }
  luaL_checktype(L, 2, LUA_TTABLE);
  if (s->enabled) return luaL_error(L, "vm:serial: the UART is already set up");
  /* unknown keys are typos */
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    static const char *const known[] = {"port", "irq", "output", "input", NULL};
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    int i;
    for (i = 0; k && known[i] && strcmp(k, known[i]) != 0; i++) {}
    if (k == NULL || known[i] == NULL)
      return luaL_error(L, "vm:serial: unknown option '%s'", luaL_tolstring(L, -2, NULL));
    lua_pop(L, 1);
  }
  uint64_t port = (uint64_t)int_field(L, 2, "port", 0x3f8, 0, 0xfff8, "0..0xfff8");
  int irq = (int)int_field(L, 2, "irq", 4, 0, 23, "0..23");

  /* output -> stack slot 3 */
  int out_kind;
  switch (lua_getfield(L, 2, "output")) {
  case LUA_TNIL:
    lua_pop(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_getfield(L, -1, "io");
    if (!lua_istable(L, -1))
      return luaL_error(L, "vm:serial: no 'output' given and the io library is not loaded");
    lua_getfield(L, -1, "stdout");
    lua_replace(L, -3);
    lua_pop(L, 1);
    if (open_file_arg(L, -1, "io.stdout") == NULL)
      return luaL_error(L, "vm:serial: io.stdout is not a file");
    out_kind = OUT_FILE;
    break;
  case LUA_TBOOLEAN:
    if (lua_toboolean(L, -1))
      return luaL_error(L, "vm:serial: 'output' must be a file, a function or false");
    lua_pop(L, 1);
    lua_pushnil(L);
    out_kind = OUT_NONE;
    break;
  case LUA_TFUNCTION:
    out_kind = OUT_FUNC;
    break;
  default:
    if (open_file_arg(L, -1, "output") == NULL)
      return luaL_error(L, "vm:serial: 'output' must be a file, a function or false, got %s",
                        luaL_typename(L, -1));
    out_kind = OUT_FILE;
  }

  /* input -> stack slot 4 */
  luaL_Stream *in = NULL;
  int in_fd = -1;
  if (lua_getfield(L, 2, "input") != LUA_TNIL) {
    in = open_file_arg(L, -1, "input");
    if (in == NULL)
      return luaL_error(L, "vm:serial: 'input' must be a file, got %s", luaL_typename(L, -1));
    in_fd = fileno(in->f);
    if (in_fd < 0) return luaL_error(L, "vm:serial: 'input' has no file descriptor");
  }

  kvm_claim(L, vm, 0, port, port + 7, H_SERIAL, 0, s);   /* raises when taken */

  lua_getiuservalue(L, 1, 1);
  lua_pushvalue(L, 3);
  lua_setfield(L, -2, "serial_out");
  lua_pushvalue(L, 4);
  lua_setfield(L, -2, "serial_in");
  lua_pop(L, 1);

  if (vm->has_irqchip && s->irq_level && vm->fd >= 0) {   /* lower a stale line */
    struct kvm_irq_level il;
    memset(&il, 0, sizeof il);
    il.irq = (uint32_t)s->irq;
    (void)ioctl(vm->fd, KVM_IRQ_LINE, &il);
  }
  s->irq_level = 0;
  s->port = (uint16_t)port;
  s->irq = irq;
  s->out_kind = out_kind;
  s->in_fd = in_fd;
  s->in_stream = in;
  s->in_eof = 0;
  s->tty_saved = 0;
  s->tx_bytes = s->rx_bytes = s->tx_dropped = s->rx_overruns = 0;
  serial_reset(s);
  s->enabled = 1;
  lua_pushvalue(L, 1);
  return 1;
}
