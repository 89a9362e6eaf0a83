/*
** legacy.c - the PC ports a Linux boot touches, enough for it to move on:
**   0x61        system control port B (fallback when there is no in-kernel PIT)
**   0x60, 0x64  i8042 keyboard controller with nothing plugged in
**   0x70, 0x71  CMOS RAM and an MC146818 clock that follows the host's UTC
**   0x80        POST codes, kept as boot markers with a timestamp
**   0xcf8-0xcff PCI configuration mechanism 1 with no devices, and the
**               0xcf9 reset control register
** One device on the bus over all these ranges; an access that asks for a
** reset (i8042 pulse of the reset line, output port bit 0 cleared, or 0xcf9
** bit 2) ends run() with reason "reset".
*/

/*** vm:legacy_ports and vm:boot_markers, below, are methods of kvm.vm.
@classmod kvm.vm
*/
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "snapdev.h"

#define LEGACY_I8042  0x01
#define LEGACY_PCI    0x02
#define LEGACY_CMOS   0x04
#define LEGACY_POST   0x08
#define LEGACY_PORT61 0x10
#define LEGACY_KBDQ   8          /* i8042 output queue */
#define MAX_MARKERS   256

typedef struct Marker { uint8_t code; uint64_t ns; } Marker;

typedef struct Legacy {
  Device dev;
  unsigned parts;                /* LEGACY_* claimed by vm:legacy_ports */
  uint8_t port61;
  uint8_t i8042_cmd;             /* command waiting for its data byte, or 0 */
  uint8_t i8042_status;          /* status flags besides OBF/AUXDATA/TIMEOUT */
  uint8_t i8042_out;             /* last byte read from port 0x60 */
  uint8_t i8042_ctr;             /* controller command byte */
  uint8_t i8042_outport;         /* output port (bit 0: reset, bit 1: A20) */
  uint8_t kbdq[LEGACY_KBDQ];     /* pending output bytes ... */
  uint8_t kbdq_flags[LEGACY_KBDQ]; /* ... 1: from the aux port, 2: timeout */
  int kbdq_head, kbdq_count;
  int irq1_level, irq12_level;
  uint8_t cmos_index;
  uint8_t cmos_nmi_masked;
  uint8_t cmos_ram[128];
  int64_t rtc_offset;            /* guest clock minus host clock, seconds */
  uint32_t pci_addr;
  uint8_t pci_rcr;               /* 0xcf9 reset control register */
  uint8_t post_last;
  Marker markers[MAX_MARKERS];
  int nmarkers;
  uint64_t markers_dropped;
} Legacy;

/* i8042 status bits */
#define KBD_OBF     0x01
#define KBD_SYS     0x04
#define KBD_UNLOCK  0x10         /* keyboard not inhibited (Linux warns otherwise) */
#define KBD_AUXDATA 0x20
#define KBD_TIMEOUT 0x40
/* controller command byte bits */
#define CTR_KBDINT  0x01
#define CTR_AUXINT  0x02
#define CTR_KBDDIS  0x10
#define CTR_AUXDIS  0x20
/* flags of a queued byte */
#define Q_AUX       1
#define Q_TIMEOUT   2

/* MC146818 */
#define RTC_SEC     0x00
#define RTC_MIN     0x02
#define RTC_HOUR    0x04
#define RTC_WDAY    0x06
#define RTC_MDAY    0x07
#define RTC_MON     0x08
#define RTC_YEAR    0x09
#define RTC_A       0x0a
#define RTC_B       0x0b
#define RTC_C       0x0c
#define RTC_D       0x0d
#define RTC_CENTURY 0x32
#define B_SET       0x80         /* updates inhibited while the guest sets the clock */
#define B_BINARY    0x04
#define B_24H       0x02

static void legacy_reset(Legacy *lg) {
  lg->port61 = 0;
  lg->i8042_cmd = 0;
  lg->i8042_status = KBD_SYS | KBD_UNLOCK;   /* as left by a BIOS after POST */
  lg->i8042_out = 0;
  lg->i8042_ctr = 0x47;          /* translate, system flag, both interrupts on */
  lg->i8042_outport = 0x03;      /* reset line inactive, A20 on */
  lg->kbdq_head = lg->kbdq_count = 0;
  lg->irq1_level = lg->irq12_level = 0;
  lg->cmos_index = 0;
  lg->cmos_nmi_masked = 0;
  memset(lg->cmos_ram, 0, sizeof lg->cmos_ram);
  lg->cmos_ram[RTC_A] = 0x26;    /* 32.768 kHz base, 1024 Hz rate, UIP 0 */
  lg->cmos_ram[RTC_B] = B_24H;   /* BCD, 24-hour */
  lg->cmos_ram[RTC_D] = 0x80;    /* valid RAM and time */
  lg->rtc_offset = 0;
  lg->pci_addr = 0;
  lg->pci_rcr = 0;
  lg->post_last = 0;
}

/* ---- i8042 ---- */

static void set_line(Legacy *lg, int irq, int *cur, int level) {
  if (level != *cur && kvm_irq_line(lg->dev.vm, irq, level) == 0) *cur = level;
}

/* IRQ 1 / 12 follow the output buffer, as the command byte allows */
static void kbd_update_irq(Legacy *lg) {
  int full = lg->kbdq_count > 0;
  int aux = full && (lg->kbdq_flags[lg->kbdq_head] & Q_AUX);
  set_line(lg, 1, &lg->irq1_level, full && !aux && (lg->i8042_ctr & CTR_KBDINT));
  set_line(lg, 12, &lg->irq12_level, aux && (lg->i8042_ctr & CTR_AUXINT));
}

static void kbd_queue(Legacy *lg, uint8_t v, uint8_t flags) {
  if (lg->kbdq_count >= LEGACY_KBDQ) return;   /* the guest is not reading: drop */
  int i = (lg->kbdq_head + lg->kbdq_count) % LEGACY_KBDQ;
  lg->kbdq[i] = v;
  lg->kbdq_flags[i] = flags;
  lg->kbdq_count++;
  kbd_update_irq(lg);
}

static uint8_t kbd_status(const Legacy *lg) {
  uint8_t st = lg->i8042_status;
  if (lg->kbdq_count > 0) {
    uint8_t f = lg->kbdq_flags[lg->kbdq_head];
    st |= KBD_OBF;
    if (f & Q_AUX) st |= KBD_AUXDATA;
    if (f & Q_TIMEOUT) st |= KBD_TIMEOUT;
  }
  return st;
}

static uint8_t kbd_read_data(Legacy *lg) {
  if (lg->kbdq_count > 0) {
    lg->i8042_out = lg->kbdq[lg->kbdq_head];
    lg->kbdq_head = (lg->kbdq_head + 1) % LEGACY_KBDQ;
    lg->kbdq_count--;
    /* the next byte is a new interrupt: drop the lines for an edge */
    set_line(lg, 1, &lg->irq1_level, 0);
    set_line(lg, 12, &lg->irq12_level, 0);
    kbd_update_irq(lg);
  }
  return lg->i8042_out;
}

/* a controller command on port 0x64; 1 for a reset */
static int kbd_command(Legacy *lg, uint8_t cmd) {
  if (cmd >= 0xf0) {                 /* pulse output port bits 3-0 low where cmd has 0 */
    if (!(cmd & 0x01)) { return 1; }
    return 0;
  }
  if (cmd == 0x20) { kbd_queue(lg, lg->i8042_ctr, 0); return 0; }
  if (cmd > 0x20 && cmd < 0x40) { kbd_queue(lg, 0, 0); return 0; }  /* controller RAM */
  if (cmd >= 0x60 && cmd < 0x80) { lg->i8042_cmd = cmd; return 0; }
  switch (cmd) {
  case 0xa7: lg->i8042_ctr |= CTR_AUXDIS; break;
  case 0xa8: lg->i8042_ctr &= (uint8_t)~CTR_AUXDIS; break;
  case 0xa9: kbd_queue(lg, 0x00, 0); break;      /* aux interface test: ok */
  case 0xaa:                                        /* self test */
    lg->i8042_status |= KBD_SYS;
    kbd_queue(lg, 0x55, 0);
    break;
  case 0xab: kbd_queue(lg, 0x00, 0); break;      /* keyboard interface test: ok */
  case 0xad: lg->i8042_ctr |= CTR_KBDDIS; break;
  case 0xae: lg->i8042_ctr &= (uint8_t)~CTR_KBDDIS; break;
  case 0xc0: kbd_queue(lg, 0x80, 0); break;      /* input port: not inhibited */
  case 0xd0: kbd_queue(lg, lg->i8042_outport, 0); break;
  case 0xd1: case 0xd2: case 0xd3: case 0xd4:
    lg->i8042_cmd = cmd;                            /* data byte follows on 0x60 */
    break;
  case 0xdd: lg->i8042_outport &= (uint8_t)~0x02; break;
  case 0xdf: lg->i8042_outport |= 0x02; break;
  case 0xe0: kbd_queue(lg, 0x00, 0); break;      /* test inputs */
  default: break;                                   /* ignored */
  }
  kbd_update_irq(lg);
  return 0;
}

/* a byte written to port 0x60; 1 for a reset */
static int kbd_write_data(Legacy *lg, uint8_t v) {
  uint8_t cmd = lg->i8042_cmd;
  lg->i8042_cmd = 0;
  switch (cmd) {
  case 0x60: lg->i8042_ctr = v; kbd_update_irq(lg); return 0;
  case 0xd1:
    lg->i8042_outport = v;
    if (!(v & 0x01)) { return 1; }
    return 0;
  case 0xd2: kbd_queue(lg, v, 0); return 0;        /* as if the keyboard sent it */
  case 0xd3: kbd_queue(lg, v, Q_AUX); return 0;    /* as if the mouse sent it */
  case 0xd4:                                          /* to the mouse: none there */
    kbd_queue(lg, 0xfe, Q_AUX | Q_TIMEOUT);
    return 0;
  default:
    if (cmd >= 0x61 && cmd < 0x80) return 0;          /* controller RAM: dropped */
    kbd_queue(lg, 0xfe, Q_TIMEOUT);               /* to the keyboard: none there */
    return 0;
  }
}

/* ---- CMOS and clock ---- */

static int rtc_bcd(const Legacy *lg) { return !(lg->cmos_ram[RTC_B] & B_BINARY); }

static uint8_t rtc_enc(const Legacy *lg, int v) {
  return rtc_bcd(lg) ? (uint8_t)(((v / 10) << 4) | (v % 10)) : (uint8_t)v;
}

static int rtc_dec(const Legacy *lg, uint8_t v) {
  return rtc_bcd(lg) ? (v >> 4) * 10 + (v & 0x0f) : v;
}

static uint8_t rtc_hour_enc(const Legacy *lg, int h) {
  if (lg->cmos_ram[RTC_B] & B_24H) return rtc_enc(lg, h);
  int h12 = h % 12 == 0 ? 12 : h % 12;
  return (uint8_t)(rtc_enc(lg, h12) | (h >= 12 ? 0x80 : 0));
}

/* the guest's clock fields, from the host's UTC plus the guest's offset */
static void rtc_snapshot(Legacy *lg) {
  time_t t = time(NULL) + (time_t)lg->rtc_offset;
  struct tm tm;
  gmtime_r(&t, &tm);
  uint8_t *r = lg->cmos_ram;
  r[RTC_SEC] = rtc_enc(lg, tm.tm_sec > 59 ? 59 : tm.tm_sec);
  r[RTC_MIN] = rtc_enc(lg, tm.tm_min);
  r[RTC_HOUR] = rtc_hour_enc(lg, tm.tm_hour);
  r[RTC_WDAY] = rtc_enc(lg, tm.tm_wday + 1);
  r[RTC_MDAY] = rtc_enc(lg, tm.tm_mday);
  r[RTC_MON] = rtc_enc(lg, tm.tm_mon + 1);
  r[RTC_YEAR] = rtc_enc(lg, (tm.tm_year + 1900) % 100);
  r[RTC_CENTURY] = rtc_enc(lg, (tm.tm_year + 1900) / 100);
}

/* the guest finished setting the clock: remember how far off the host it is */
static void rtc_commit(Legacy *lg) {
  const uint8_t *r = lg->cmos_ram;
  struct tm tm;
  memset(&tm, 0, sizeof tm);
  tm.tm_sec = rtc_dec(lg, r[RTC_SEC]);
  tm.tm_min = rtc_dec(lg, r[RTC_MIN]);
  if (lg->cmos_ram[RTC_B] & B_24H) tm.tm_hour = rtc_dec(lg, r[RTC_HOUR]);
  else tm.tm_hour = rtc_dec(lg, r[RTC_HOUR] & 0x7f) % 12 + ((r[RTC_HOUR] & 0x80) ? 12 : 0);
  tm.tm_mday = rtc_dec(lg, r[RTC_MDAY]);
  tm.tm_mon = rtc_dec(lg, r[RTC_MON]) - 1;
  tm.tm_year = rtc_dec(lg, r[RTC_CENTURY]) * 100 + rtc_dec(lg, r[RTC_YEAR]) - 1900;
  time_t t = timegm(&tm);
  if (t != (time_t)-1) lg->rtc_offset = (int64_t)t - (int64_t)time(NULL);
}

static int is_clock_reg(unsigned i) {
  return i == RTC_SEC || i == RTC_MIN || i == RTC_HOUR || i == RTC_WDAY || i == RTC_MDAY ||
         i == RTC_MON || i == RTC_YEAR || i == RTC_CENTURY;
}

static uint8_t cmos_read(Legacy *lg) {
  unsigned i = lg->cmos_index & 0x7f;
  if (is_clock_reg(i)) {
    if (!(lg->cmos_ram[RTC_B] & B_SET)) rtc_snapshot(lg);
    return lg->cmos_ram[i];
  }
  switch (i) {
  case RTC_A: return lg->cmos_ram[RTC_A] & 0x7f;    /* never inside an update */
  case RTC_C: { uint8_t v = lg->cmos_ram[RTC_C]; lg->cmos_ram[RTC_C] = 0; return v; }
  case RTC_D: return 0x80;
  default: return lg->cmos_ram[i];
  }
}

static void cmos_write(Legacy *lg, uint8_t v) {
  unsigned i = lg->cmos_index & 0x7f;
  switch (i) {
  case RTC_A: lg->cmos_ram[RTC_A] = v & 0x7f; return;
  case RTC_B: {
    uint8_t old = lg->cmos_ram[RTC_B];
    if ((v & B_SET) && !(old & B_SET)) rtc_snapshot(lg);  /* freeze the fields */
    lg->cmos_ram[RTC_B] = v;
    if ((old & B_SET) && !(v & B_SET)) rtc_commit(lg);
    return;
  }
  case RTC_C: case RTC_D: return;                  /* read-only */
  default: lg->cmos_ram[i] = v; return;
  }
}

/* ---- dispatch ---- */

/* one byte at a byte-wide port; 1 for a reset */
static int byte_io(Legacy *lg, uint16_t port, int is_write, uint8_t *v) {
  unsigned parts = lg->parts;
  switch (port) {
  case 0x60:
    if (!(parts & LEGACY_I8042)) break;
    if (is_write) return kbd_write_data(lg, *v);
    *v = kbd_read_data(lg);
    return 0;
  case 0x64:
    if (!(parts & LEGACY_I8042)) break;
    if (is_write) return kbd_command(lg, *v);
    *v = kbd_status(lg);
    return 0;
  case 0x61:
    if (!(parts & LEGACY_PORT61)) break;
    if (is_write) {
      lg->port61 = (uint8_t)((lg->port61 & 0xf0) | (*v & 0x0f));
    } else {
      lg->port61 ^= 0x30;      /* refresh toggle and PIT channel 2 output flip */
      *v = lg->port61;
    }
    return 0;
  case 0x70:
    if (!(parts & LEGACY_CMOS)) break;
    if (is_write) {
      lg->cmos_index = *v & 0x7f;
      lg->cmos_nmi_masked = *v >> 7;
    } else {
      *v = (uint8_t)(lg->cmos_index | (lg->cmos_nmi_masked << 7));
    }
    return 0;
  case 0x71:
    if (!(parts & LEGACY_CMOS)) break;
    if (is_write) cmos_write(lg, *v);
    else *v = cmos_read(lg);
    return 0;
  case 0x80:
    if (!(parts & LEGACY_POST)) break;
    if (is_write) {
      lg->post_last = *v;
      if (lg->nmarkers < MAX_MARKERS) {
        lg->markers[lg->nmarkers].code = *v;
        lg->markers[lg->nmarkers].ns = kvm_now_ns() - lg->dev.vm->created_ns;
        lg->nmarkers++;
      } else {
        lg->markers_dropped++;
      }
    } else {
      *v = lg->post_last;
    }
    return 0;
  }
  if (!is_write) *v = 0xff;
  return 0;
}

/* 0xcf8-0xcff; 1 for a reset */
static int pci_io(Legacy *lg, uint16_t port, int is_write, unsigned size, uint8_t *data) {
  if (port == 0xcf8 && size == 4) {
    if (is_write)
      lg->pci_addr = (uint32_t)data[0] | (uint32_t)data[1] << 8 |
                     (uint32_t)data[2] << 16 | (uint32_t)data[3] << 24;
    else
      for (unsigned i = 0; i < 4; i++) data[i] = (uint8_t)(lg->pci_addr >> (8 * i));
    return 0;
  }
  if (port == 0xcf9 && size == 1) {
    if (!is_write) { data[0] = lg->pci_rcr; return 0; }
    lg->pci_rcr = data[0] & 0x0a;
    if (data[0] & 0x04) { return 1; }
    return 0;
  }
  /* no devices: configuration data reads all ones; other partial accesses
     to the address register see an empty bus, so mechanism 2 probes fail */
  if (!is_write) memset(data, 0xff, size);
  return 0;
}

static int legacy_access(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size,
                         uint8_t *data) {
  Legacy *lg = (Legacy *)d;
  uint16_t port = (uint16_t)addr;
  int reset = 0;
  if (size != 1 && size != 2 && size != 4) {
    if (!is_write) memset(data, 0xff, size);
  } else if (port >= 0xcf8 && port <= 0xcff) {
    reset = pci_io(lg, port, is_write, size, data);
  } else {
    for (unsigned i = 0; i < size; i++)
      reset |= byte_io(lg, (uint16_t)(port + i), is_write, &data[i]);
  }
  if (!reset) return BUS_OK;
  bc->why = "reset";
  return BUS_STOP;
}

/* ---- snapshots ---- */

/* Version 1 of the legacy ports' state, after the version word: the parts
   claimed (u32, to refuse a snapshot with others); port 0x61; the i8042's
   pending command, status flags, last byte read, command byte and output
   port, then its output queue (a count byte, then a {byte, flags} pair per
   entry, oldest first); the CMOS index and NMI mask, the 128 bytes of CMOS
   RAM and the clock's offset from the host's UTC (s64, seconds); the PCI
   address register (u32), 0xcf9 and the last POST code. The IRQ 1 and 12
   lines follow from the queue and are driven again. The boot markers are
   the host's record of this VM's run, not the machine's: they stay. */
#define LEGACY_SNAP_VERSION 1
/* the clock's offset: a guest can set any BCD fields (up to year 16599 with
   digits above 9), so some 14,000 years away; more is a corrupt file */
#define RTC_OFFSET_MAX (1ll << 40)

static int legacy_save(Device *d, SnapBuf *b, char *err, size_t errlen) {
  Legacy *lg = (Legacy *)d;
  snapbuf_u32(b, LEGACY_SNAP_VERSION);
  snapbuf_u32(b, lg->parts);
  const uint8_t kbd[6] = { lg->port61, lg->i8042_cmd, lg->i8042_status, lg->i8042_out,
                           lg->i8042_ctr, lg->i8042_outport };
  snapbuf_put(b, kbd, sizeof kbd);
  snapbuf_u8(b, (uint8_t)lg->kbdq_count);
  for (int i = 0; i < lg->kbdq_count; i++) {
    int k = (lg->kbdq_head + i) % LEGACY_KBDQ;
    snapbuf_u8(b, lg->kbdq[k]);
    snapbuf_u8(b, lg->kbdq_flags[k]);
  }
  snapbuf_u8(b, lg->cmos_index);
  snapbuf_u8(b, lg->cmos_nmi_masked);
  snapbuf_put(b, lg->cmos_ram, sizeof lg->cmos_ram);
  snapbuf_u64(b, (uint64_t)lg->rtc_offset);
  snapbuf_u32(b, lg->pci_addr);
  snapbuf_u8(b, lg->pci_rcr);
  snapbuf_u8(b, lg->post_last);
  return snapdev_saved(b, err, errlen);
}

static int legacy_restore(Device *d, const uint8_t *p, size_t n, int apply, char *err, size_t errlen) {
  Legacy *lg = (Legacy *)d;
  SnapRd r = { p, n, 0, 0 };
  if (snapdev_version(&r, LEGACY_SNAP_VERSION, err, errlen) < 0) return -1;
  uint32_t parts = snaprd_u32(&r);
  uint8_t kbd[6];
  snaprd_get(&r, kbd, sizeof kbd);
  uint8_t q[LEGACY_KBDQ], qf[LEGACY_KBDQ];
  uint8_t qn = snaprd_u8(&r);
  if (qn > LEGACY_KBDQ)
    return snapdev_fail(err, errlen, "i8042 queue holds %u bytes (at most %d)", qn, LEGACY_KBDQ);
  for (int i = 0; i < qn; i++) {
    q[i] = snaprd_u8(&r);
    qf[i] = snaprd_u8(&r);
    if (qf[i] & ~(Q_AUX | Q_TIMEOUT))
      return snapdev_fail(err, errlen, "i8042 queue entry %d has flags 0x%x (0-3)", i, qf[i]);
  }
  uint8_t index = snaprd_u8(&r), nmi = snaprd_u8(&r);
  uint8_t ram[sizeof lg->cmos_ram];
  snaprd_get(&r, ram, sizeof ram);
  int64_t offset = (int64_t)snaprd_u64(&r);
  uint32_t pci_addr = snaprd_u32(&r);
  uint8_t rcr = snaprd_u8(&r), post = snaprd_u8(&r);
  if (snapdev_end(&r, err, errlen) < 0) return -1;
  if (parts != lg->parts)
    return snapdev_fail(err, errlen, "legacy ports with parts 0x%x, these have 0x%x", parts, lg->parts);
  if (index > 0x7f) return snapdev_fail(err, errlen, "CMOS index 0x%02x (0-0x7f)", index);
  if (nmi > 1) return snapdev_fail(err, errlen, "CMOS NMI mask %u (0 or 1)", nmi);
  if (offset > RTC_OFFSET_MAX || offset < -RTC_OFFSET_MAX)
    return snapdev_fail(err, errlen, "clock offset %lld s (at most 2^40)", (long long)offset);
  if (rcr & ~0x0a) return snapdev_fail(err, errlen, "reset control 0x%02x (bits 3, 1 only)", rcr);
  if (!apply) return 0;

  lg->port61 = kbd[0];
  lg->i8042_cmd = kbd[1];
  lg->i8042_status = kbd[2];
  lg->i8042_out = kbd[3];
  lg->i8042_ctr = kbd[4];
  lg->i8042_outport = kbd[5];
  memcpy(lg->kbdq, q, qn);
  memcpy(lg->kbdq_flags, qf, qn);
  lg->kbdq_head = 0;
  lg->kbdq_count = qn;
  lg->cmos_index = index;
  lg->cmos_nmi_masked = nmi;
  memcpy(lg->cmos_ram, ram, sizeof ram);
  lg->rtc_offset = offset;
  lg->pci_addr = pci_addr;
  lg->pci_rcr = rcr;
  lg->post_last = post;
  /* both lines to their levels, whatever they were (kbd_update_irq drives
     a line only when it changes) */
  lg->irq1_level = lg->irq12_level = -1;
  kbd_update_irq(lg);
  if (lg->irq1_level < 0) lg->irq1_level = 0;
  if (lg->irq12_level < 0) lg->irq12_level = 0;
  return 0;
}

static const DeviceOps legacy_ops = {
  .kind = "legacy",
  .access = legacy_access,
  .save = legacy_save,
  .restore = legacy_restore,
};

/* ---- Lua ---- */

static const struct { const char *name; unsigned part; uint16_t first, last; } claims[] = {
  {"port61", LEGACY_PORT61, 0x61, 0x61},
  {"i8042", LEGACY_I8042, 0x60, 0x60},
  {"i8042", LEGACY_I8042, 0x64, 0x64},
  {"cmos", LEGACY_CMOS, 0x70, 0x71},
  {"post", LEGACY_POST, 0x80, 0x80},
  {"pci", LEGACY_PCI, 0xcf8, 0xcff},
};
#define NCLAIMS (sizeof claims / sizeof claims[0])

/* the parts wanted: all, less those given false in the table at 2 */
static unsigned parts_arg(lua_State *L) {
  unsigned want = LEGACY_I8042 | LEGACY_PCI | LEGACY_CMOS | LEGACY_POST | LEGACY_PORT61;
  lua_settop(L, 2);
  if (lua_isnil(L, 2)) return want;
  luaL_checktype(L, 2, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, 2)) {
    const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
    unsigned part = 0;
    for (size_t i = 0; k && i < NCLAIMS; i++)
      if (strcmp(k, claims[i].name) == 0) part = claims[i].part;
    if (part == 0)
      luaL_error(L, "vm:legacy_ports: unknown part '%s' (i8042, pci, cmos, post, port61)",
                 luaL_tolstring(L, -2, NULL));
    if (!lua_isboolean(L, -1))
      luaL_error(L, "vm:legacy_ports: '%s' must be a boolean, got %s", k, luaL_typename(L, -1));
    if (lua_toboolean(L, -1)) want |= part; else want &= ~part;
    lua_pop(L, 1);
  }
  return want;
}

/***
Claim the legacy PC ports a Linux boot touches: `port61` (0x61, system
control port B, used when there is no in-kernel PIT), `i8042` (0x60, 0x64:
a keyboard controller with nothing plugged in; a reset pulse ends run()
with reason "reset"), `cmos` (0x70-0x71: CMOS RAM and a clock following
the host's UTC in BCD), `post` (0x80: POST codes, see vm:boot_markers),
`pci` (0xcf8-0xcff: configuration mechanism 1 with no devices; 0xcf9
bit 2 resets). All are on by default; pass `name = false` to leave one out.
@function vm:legacy_ports
@tparam[opt] table parts e.g. `{ pci = false }`
@treturn kvm.vm the VM, for chaining
@raise on an unknown key, a non-boolean value, a port already claimed, or
  when called twice
*/
int l_vm_legacy_ports(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  unsigned want = parts_arg(L);
  if (kvm_device_find(vm, &legacy_ops))
    return luaL_error(L, "vm:legacy_ports: the legacy ports are already set up");
  /* check every range before claiming any, so a failure claims nothing */
  int n = 0;
  for (size_t i = 0; i < NCLAIMS; i++) {
    if (!(want & claims[i].part)) continue;
    char buf[128];
    const char *clash = bus_clash(&vm->pio, 0, claims[i].first, claims[i].last, buf, sizeof buf);
    if (clash) return luaL_error(L, "vm:legacy_ports: %s (%s)", clash, claims[i].name);
    n++;
  }
  if (vm->pio.n + n > BUS_MAX_RANGES)
    return luaL_error(L, "vm:legacy_ports: too many port ranges (at most %d)", BUS_MAX_RANGES);
  Legacy *lg = kvm_device_new(L, 1, sizeof(Legacy), &legacy_ops);
  legacy_reset(lg);
  lg->parts = want;
  for (size_t i = 0; i < NCLAIMS; i++)
    if (want & claims[i].part) bus_claim(L, &vm->pio, 0, claims[i].first, claims[i].last, &lg->dev);
  lua_pushvalue(L, 1);
  return 1;
}

/***
The POST codes the guest wrote to port 0x80, in order, with the time since
the VM was created. At most 256 are kept; later ones are counted.
@function vm:boot_markers
@treturn {{code=int,seconds=number,ns=int},...} the markers
@treturn int how many were dropped because the list was full
*/
int l_vm_boot_markers(lua_State *L) {
  Vm *vm = (Vm *)luaL_checkudata(L, 1, VM_MT);   /* readable after close too */
  Legacy *lg = (Legacy *)kvm_device_find(vm, &legacy_ops);
  int n = lg ? lg->nmarkers : 0;
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, lg->markers[i].code);
    lua_setfield(L, -2, "code");
    lua_pushnumber(L, (lua_Number)lg->markers[i].ns / 1e9);
    lua_setfield(L, -2, "seconds");
    lua_pushinteger(L, (lua_Integer)lg->markers[i].ns);
    lua_setfield(L, -2, "ns");
    lua_rawseti(L, -2, i + 1);
  }
  lua_pushinteger(L, lg ? (lua_Integer)lg->markers_dropped : 0);
  return 2;
}
