/*
** uart.c - a 16550A UART on eight I/O ports (COM1 is 0x3f8, IRQ 4), a
** device on the bus; a VM may have several (COM1-COM4).
**
** Transmission is instant: THR is always empty (LSR.THRE|TEMT), so every
** THR write re-raises the THR-empty interrupt at once. Output is buffered
** in Uart.out and handed to a Lua FILE or function by uart_flush: after
** the access that set flush_wanted (a newline, a full buffer), on the 10 ms
** tick (a prompt, an echoed key) and when run() returns. Input comes from a
** file descriptor, read without blocking into the receive FIFO when the
** guest drains it, polls LSR, or on the tick.
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
#include <termios.h>
#include <unistd.h>

#include "sink.h"
#include "snapdev.h"

#define UART_FIFO   16           /* a 16550A: Linux's size_fifo() must count 16 */
#define UART_TICK_NS 10000000u   /* 10 ms: input, and output without a newline */

typedef struct Uart {
  Device dev;
  uint16_t port;
  int irq;
  uint8_t ier, iir, fcr, lcr, mcr, lsr, msr, scr, dll, dlm;
  uint8_t rbr;                   /* last byte read from the receiver */
  int thri_pending;              /* THR-empty interrupt waiting for IIR read */
  int irq_level;                 /* last level driven on the irq line */
  uint8_t rx[UART_FIFO];
  int rx_head, rx_count;
  uint8_t held[2 * UART_FIFO];   /* typed bytes a FIFO reset took back, oldest first */
  int held_len;
  int lsr_polls;                 /* LSR reads in a row: a driver polling for input */
  Sink out;                      /* the transmitter's bytes */
  int in_ref;                    /* the input FILE in the VM's table */
  int in_fd;                     /* -1: no input */
  int in_eof;
  luaL_Stream *in_stream;        /* the input FILE */
  int tty_saved;                 /* saved_tios holds the input tty's modes */
  struct termios saved_tios;
  uint64_t rx_bytes, rx_overruns;
} Uart;

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


static int fifo_on(const Uart *s) { return s->fcr & FCR_ENABLE; }

/* a disabled FIFO is a one-byte holding register */
static int rx_capacity(const Uart *s) { return fifo_on(s) ? UART_FIFO : 1; }

static int rx_trigger(const Uart *s) {
  static const int levels[4] = {1, 4, 8, 14};
  return levels[s->fcr >> 6];
}

static void rx_clear(Uart *s) { s->rx_head = 0; s->rx_count = 0; }

/* The guest's driver resets the receive FIFO when it probes the port and on
   every open: typeahead (bytes from the host's input, not loopback) is not
   lost there but taken back, ahead of anything still held, and delivered
   first once the FIFO has room again. */
static void rx_reset(Uart *s) {
  if (s->in_fd >= 0 && !(s->mcr & MCR_LOOP) && s->rx_count > 0) {
    uint8_t keep[sizeof s->held] = {0};
    int n = 0;
    for (int i = 0; i < s->rx_count && n < (int)sizeof keep; i++)
      keep[n++] = s->rx[(s->rx_head + i) % UART_FIFO];
    for (int i = 0; i < s->held_len && n < (int)sizeof keep; i++) keep[n++] = s->held[i];
    memcpy(s->held, keep, (size_t)n);
    s->held_len = n;
  }
  rx_clear(s);
}

/* one received byte; a full FIFO drops it and flags an overrun */
static void rx_push(Uart *s, uint8_t v) {
  if (s->rx_count >= rx_capacity(s)) {
    s->lsr |= LSR_OE;
    s->rx_overruns++;
    return;
  }
  s->rx[(s->rx_head + s->rx_count) % UART_FIFO] = v;
  s->rx_count++;
}

/* highest-priority pending interrupt, as IIR bits 3-0 */
static uint8_t pending(const Uart *s) {
  if ((s->ier & IER_ELSI) && (s->lsr & LSR_ERRS)) return IIR_LSR;
  if ((s->ier & IER_ERBFI) && s->rx_count > 0)
    return (fifo_on(s) && s->rx_count < rx_trigger(s)) ? IIR_CTI : IIR_RDA;
  if ((s->ier & IER_ETBEI) && s->thri_pending) return IIR_THRI;
  if ((s->ier & IER_EDSSI) && (s->msr & 0x0f)) return IIR_MSR;
  return IIR_NONE;
}

/* Recompute IIR and drive the IRQ line on a change. PC boards gate the
   UART's interrupt with OUT2, and loopback forces the outputs inactive. */
static void update_irq(Uart *s) {
  uint8_t p = pending(s);
  s->iir = (uint8_t)(p | (fifo_on(s) ? IIR_FIFO : 0));
  int level = p != IIR_NONE && (s->mcr & (MCR_OUT2 | MCR_LOOP)) == MCR_OUT2;
  if (level != s->irq_level && kvm_irq_line(s->dev.vm, s->irq, level) == 0) s->irq_level = level;
}

/* modem inputs: a connected modem, or the MCR outputs in loopback */
static uint8_t modem_lines(const Uart *s) {
  if (!(s->mcr & MCR_LOOP)) return MSR_DCD | MSR_DSR | MSR_CTS;
  return (uint8_t)(((s->mcr & MCR_RTS) ? MSR_CTS : 0) | ((s->mcr & MCR_DTR) ? MSR_DSR : 0) |
                   ((s->mcr & MCR_OUT1) ? MSR_RI : 0) | ((s->mcr & MCR_OUT2) ? MSR_DCD : 0));
}

/* new modem lines, setting the delta bits 3-0 for what changed */
static void set_modem_lines(Uart *s) {
  uint8_t old = s->msr & 0xf0, now = modem_lines(s), d = s->msr & 0x0f, x = old ^ now;
  if (x & MSR_CTS) d |= 0x01;
  if (x & MSR_DSR) d |= 0x02;
  if ((old & MSR_RI) && !(now & MSR_RI)) d |= 0x04;   /* trailing edge of RI */
  if (x & MSR_DCD) d |= 0x08;
  s->msr = now | d;
}

/*
** Reset the device registers and buffers (a power-on reset). Leaves the
** configuration alone: port, irq, input and output, tty state.
*/
static void uart_reset(Uart *s) {
  s->ier = 0; s->fcr = 0; s->lcr = 0; s->mcr = 0; s->scr = 0;
  s->lsr = 0; s->rbr = 0;
  s->dll = 0x0c; s->dlm = 0;     /* 9600 baud */
  s->msr = MSR_DCD | MSR_DSR | MSR_CTS;
  s->iir = IIR_NONE;
  s->thri_pending = 0;
  rx_clear(s);
  s->held_len = 0;
  s->lsr_polls = 0;
  s->out.len = 0;
  s->out.want = 0;
}

/* Input moves from the host into the FIFO only while the guest wants it: its
   driver enabled the receive interrupt and the IRQ line (IER bit 0, MCR OUT2),
   or it polls LSR (LSR_POLLING reads in a row; Linux's console reads it twice
   in a row at times).
   Linux reads LSR then RBR once to clear the port when it probes and opens
   it: a byte pulled in by that LSR read would be thrown away (typeahead lost
   its first bytes that way); it waits in the host instead. */
#define LSR_POLLING 8
static int input_usable(const Uart *s) {
  return s->in_fd >= 0 && !s->in_eof && !(s->mcr & MCR_LOOP) &&
         s->in_stream != NULL && s->in_stream->closef != NULL &&
         (((s->ier & IER_ERBFI) && (s->mcr & MCR_OUT2)) || s->lsr_polls >= LSR_POLLING);
}

/* read what is ready without blocking; 1 if bytes arrived */
static int fill_rx(Uart *s) {
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
  uint8_t buf[UART_FIFO];
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

static void transmit(Uart *s, uint8_t v) {
  if (s->mcr & MCR_LOOP) rx_push(s, v);    /* the serial output is wired to the input */
  else sink_put(&s->out, v);
}

static uint8_t read_reg(Uart *s, unsigned off) {
  uint8_t v;
  if (off != R_LSR) s->lsr_polls = 0;
  else if (s->lsr_polls < LSR_POLLING) s->lsr_polls++;
  switch (off) {
  case R_RBR_THR:
    if (s->lcr & LCR_DLAB) return s->dll;
    if (s->rx_count > 0) {
      s->rbr = s->rx[s->rx_head];
      s->rx_head = (s->rx_head + 1) % UART_FIFO;
      s->rx_count--;
    }
    if (s->rx_count == 0) fill_rx(s);      /* next bytes, if the host has them */
    update_irq(s);
    return s->rbr;
  case R_IER:
    return (s->lcr & LCR_DLAB) ? s->dlm : s->ier;
  case R_IIR_FCR:
    update_irq(s);
    v = s->iir;
    if ((v & 0x0f) == IIR_THRI) {          /* reading IIR acknowledges THRI */
      s->thri_pending = 0;
      update_irq(s);
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
    update_irq(s);
    return v;
  case R_MSR:
    v = s->msr;
    s->msr &= 0xf0;
    update_irq(s);
    return v;
  case R_SCR:
    return s->scr;
  }
  return 0xff;
}

static void write_reg(Uart *s, unsigned off, uint8_t v) {
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
  update_irq(s);
}

static int uart_flush(Device *d, BusCall *bc) {
  return sink_flush(&((Uart *)d)->out, bc);
}

static int uart_access(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size,
                       uint8_t *data) {
  Uart *s = (Uart *)d;
  for (unsigned j = 0; j < size; j++) {   /* a wide access: byte by byte, as on a PC's bus */
    unsigned off = (unsigned)(addr - s->port) + j;
    if (off > 7) { if (!is_write) data[j] = 0xff; }
    else if (is_write) write_reg(s, off, data[j]);
    else data[j] = read_reg(s, off);
  }
  return s->out.want ? sink_flush(&s->out, bc) : BUS_OK;
}

/* the tick: input that arrived, and output left without a newline (a
   prompt, an echoed key) while the guest idles */
static int uart_tick(Device *d, BusCall *bc) {
  Uart *s = (Uart *)d;
  if (fill_rx(s)) update_irq(s);
  return s->out.len ? sink_flush(&s->out, bc) : BUS_OK;
}

/* ---- terminal ---- */

static void uart_begin_run(Device *d) {
  Uart *s = (Uart *)d;
  if (s->in_fd < 0 || s->tty_saved || s->in_stream == NULL ||
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

static void uart_end_run(Device *d) {
  Uart *s = (Uart *)d;
  if (!s->tty_saved) return;
  s->tty_saved = 0;
  if (s->in_fd >= 0) (void)tcsetattr(s->in_fd, TCSANOW, &s->saved_tios);
}

static void uart_close(Device *d) {
  Uart *s = (Uart *)d;
  s->in_fd = -1;
  s->in_stream = NULL;
  s->dev.tick_ns = 0;
}

/* vm:stats(): serial_tx and serial_rx over every UART */
static void uart_stats(Device *d, lua_State *L) {
  Uart *s = (Uart *)d;
  kvm_add_count(L, "serial_tx", s->out.bytes);
  kvm_add_count(L, "serial_rx", s->rx_bytes);
}

/* ---- snapshots ---- */

/* Version 1 of a UART's state, after the version word: port (u32) and irq
   (u32), to refuse a snapshot of another UART; then one byte each: IER, FCR,
   LCR, MCR, LSR (its error bits), MSR, SCR, DLL, DLM, RBR (the byte last
   read), the THR-empty interrupt pending, the LSR reads in a row; then the
   receive FIFO (a count byte, then its bytes, oldest first) and the typeahead
   a FIFO reset took back (the same). IIR and the IRQ line follow from these
   and are recomputed. Output already handed to the sink is the past; where
   it goes and where input comes from are the restoring VM's. */
#define UART_SNAP_VERSION 1

static int uart_save(Device *d, SnapBuf *b, char *err, size_t errlen) {
  Uart *s = (Uart *)d;
  snapbuf_u32(b, UART_SNAP_VERSION);
  snapbuf_u32(b, s->port);
  snapbuf_u32(b, (uint32_t)s->irq);
  const uint8_t regs[12] = { s->ier, s->fcr, s->lcr, s->mcr, s->lsr, s->msr, s->scr, s->dll,
                             s->dlm, s->rbr, (uint8_t)s->thri_pending, (uint8_t)s->lsr_polls };
  snapbuf_put(b, regs, sizeof regs);
  snapbuf_u8(b, (uint8_t)s->rx_count);
  for (int i = 0; i < s->rx_count; i++) snapbuf_u8(b, s->rx[(s->rx_head + i) % UART_FIFO]);
  snapbuf_u8(b, (uint8_t)s->held_len);
  snapbuf_put(b, s->held, (size_t)s->held_len);
  return snapdev_saved(b, err, errlen);
}

static int uart_restore(Device *d, const uint8_t *p, size_t n, int apply, char *err, size_t errlen) {
  Uart *s = (Uart *)d;
  SnapRd r = { p, n, 0, 0 };
  if (snapdev_version(&r, UART_SNAP_VERSION, err, errlen) < 0) return -1;
  uint32_t port = snaprd_u32(&r), irq = snaprd_u32(&r);
  uint8_t regs[12];
  snaprd_get(&r, regs, sizeof regs);
  uint8_t rx[UART_FIFO], held[sizeof s->held];
  uint8_t rx_count = snaprd_u8(&r);
  if (rx_count > UART_FIFO)
    return snapdev_fail(err, errlen, "receive FIFO holds %u bytes (at most %d)", rx_count, UART_FIFO);
  snaprd_get(&r, rx, rx_count);
  uint8_t held_len = snaprd_u8(&r);
  if (held_len > sizeof held)
    return snapdev_fail(err, errlen, "%u bytes of typeahead held (at most %zu)", held_len, sizeof held);
  snaprd_get(&r, held, held_len);
  if (snapdev_end(&r, err, errlen) < 0) return -1;
  enum { IER, FCR, LCR, MCR, LSR, MSR, SCR, DLL, DLM, RBR, THRI, POLLS };
  if (port != s->port)
    return snapdev_fail(err, errlen, "a UART at port 0x%x, this one is at 0x%x", port, s->port);
  if (irq != (uint32_t)s->irq)
    return snapdev_fail(err, errlen, "a UART on IRQ %u, this one is on IRQ %d", irq, s->irq);
  if (regs[IER] & 0xf0) return snapdev_fail(err, errlen, "IER 0x%02x (bits 3-0 only)", regs[IER]);
  if ((regs[FCR] & ~0xc9) || (regs[FCR] && !(regs[FCR] & FCR_ENABLE)))
    return snapdev_fail(err, errlen, "FCR 0x%02x (0, or FIFO enable with bits 7, 6, 3)", regs[FCR]);
  if (regs[MCR] & 0xe0) return snapdev_fail(err, errlen, "MCR 0x%02x (bits 4-0 only)", regs[MCR]);
  if (regs[LSR] & ~LSR_ERRS)
    return snapdev_fail(err, errlen, "LSR 0x%02x (only the error bits are kept)", regs[LSR]);
  if (regs[THRI] > 1) return snapdev_fail(err, errlen, "THR-empty pending %u (0 or 1)", regs[THRI]);
  if (regs[POLLS] > LSR_POLLING)
    return snapdev_fail(err, errlen, "%u LSR polls in a row (at most %d)", regs[POLLS], LSR_POLLING);
  int cap = (regs[FCR] & FCR_ENABLE) ? UART_FIFO : 1;
  if (rx_count > cap)
    return snapdev_fail(err, errlen, "receive FIFO holds %u bytes with the FIFO off (at most 1)", rx_count);
  if (!apply) return 0;

  s->ier = regs[IER]; s->fcr = regs[FCR]; s->lcr = regs[LCR]; s->mcr = regs[MCR];
  s->lsr = regs[LSR]; s->msr = regs[MSR]; s->scr = regs[SCR]; s->dll = regs[DLL];
  s->dlm = regs[DLM]; s->rbr = regs[RBR];
  s->thri_pending = regs[THRI];
  s->lsr_polls = regs[POLLS];
  memcpy(s->rx, rx, rx_count);
  s->rx_head = 0;
  s->rx_count = rx_count;
  memcpy(s->held, held, held_len);
  s->held_len = held_len;
  /* IIR, and the line driven to its level whatever it was (the irqchip's
     state may come back before or after the devices') */
  uint8_t pend = pending(s);
  s->iir = (uint8_t)(pend | (fifo_on(s) ? IIR_FIFO : 0));
  int level = pend != IIR_NONE && (s->mcr & (MCR_OUT2 | MCR_LOOP)) == MCR_OUT2;
  s->irq_level = kvm_irq_line(s->dev.vm, s->irq, level) == 0 ? level : 0;
  return 0;
}

static const DeviceOps uart_ops = {
  .kind = "serial",
  .access = uart_access,
  .tick = uart_tick,
  .flush = uart_flush,
  .begin_run = uart_begin_run,
  .end_run = uart_end_run,
  .close = uart_close,
  .stats = uart_stats,
  .save = uart_save,
  .restore = uart_restore,
};

/* ---- vm:serial{...} ---- */

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

/* the input option -> stack slot 3: a FILE with a descriptor, or NULL */
static luaL_Stream *input_arg(lua_State *L) {
  if (lua_getfield(L, 2, "input") == LUA_TNIL) return NULL;
  luaL_Stream *in = sink_checkfile(L, -1, "vm:serial", "input");
  if (in == NULL)
    luaL_error(L, "vm:serial: 'input' must be a file, got %s", luaL_typename(L, -1));
  else if (fileno(in->f) < 0)
    luaL_error(L, "vm:serial: 'input' has no file descriptor");
  return in;
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
@raise on a bad option or when the ports are taken (a VM may have several UARTs)
*/
int l_vm_serial(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  kvm_opt_table(L, 2);
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
  luaL_Stream *in = input_arg(L);        /* -> stack slot 3 */

  char buf[128];
  const char *clash = bus_clash(&vm->pio, 0, port, port + 7, buf, sizeof buf);
  if (clash) return luaL_error(L, "%s", clash);
  kvm_device_room(L, vm);
  Sink out;                              /* raises on a bad output, before anything changed */
  sink_open(L, &out, 2, "output", "vm:serial");
  Uart *s = kvm_device_new(L, 1, sizeof(Uart), &uart_ops);
  s->out.kind = out.kind;
  s->out.ref = out.ref;
  s->port = (uint16_t)port;
  s->irq = irq;
  s->in_ref = in ? kvm_vm_ref(L, 1, 3) : 0;
  s->in_stream = in;
  s->in_fd = in ? fileno(in->f) : -1;
  s->dev.tick_ns = (in || out.kind != SINK_NONE) ? UART_TICK_NS : 0;
  uart_reset(s);
  bus_claim(L, &vm->pio, 0, port, port + 7, &s->dev);
  lua_pushvalue(L, 1);
  return 1;
}
