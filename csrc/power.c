/*
** power.c - ACPI fixed-hardware power management: the PM1a event block
** (status and enable, 16 bits each) and the PM1a control block (16 bits) on
** the ports the FADT names (kvm.acpi). A write with SLP_EN (bit 13) enters
** the sleep state SLP_TYP (bits 10-12); the DSDT's \_S5 names the type of a
** power off, which ends run() with reason "poweroff". Other sleep states are
** counted and ignored (the guest goes on). Control reads back SCI_EN (bit 0)
** set: there is no SMI_CMD, ACPI is always on. Status bits are write-one-to-
** clear; nothing sets them yet (no power button, PM timer or SCI).
*/

/*** vm:power, below, is a method of kvm.vm.
@classmod kvm.vm
*/
#include <string.h>

#include "snapdev.h"

#define SCI_EN 0x0001
#define SLP_EN 0x2000

typedef struct Power {
  Device dev;
  uint16_t evt, cnt;             /* the blocks' ports */
  int s5;                        /* SLP_TYP of a power off */
  uint16_t sts, en, ctl;         /* PM1a_STS, PM1a_EN, PM1a_CNT */
  uint64_t sleeps;               /* sleep requests seen (S5 included) */
} Power;

/* the register and byte at port p, or NULL */
static uint16_t *reg_at(Power *pw, uint16_t p, unsigned *byte) {
  if (p >= pw->evt && p < pw->evt + 2) { *byte = p - pw->evt; return &pw->sts; }
  if (p >= pw->evt + 2 && p < pw->evt + 4) { *byte = p - pw->evt - 2u; return &pw->en; }
  if (p >= pw->cnt && p < pw->cnt + 2) { *byte = p - pw->cnt; return &pw->ctl; }
  return NULL;
}

/* one byte written to register r; 1 when it set SLP_EN */
static int write_byte(Power *pw, uint16_t *r, unsigned byte, uint8_t v) {
  uint16_t shifted = (uint16_t)(v << (8 * byte));
  if (r == &pw->sts) { pw->sts &= (uint16_t)~shifted; return 0; }   /* write one to clear */
  *r = (uint16_t)((*r & ~(0xff << (8 * byte))) | shifted);
  return r == &pw->ctl && byte == 1 && (pw->ctl & SLP_EN);
}

static int power_access(Device *d, BusCall *bc, uint64_t addr, int is_write, unsigned size,
                        uint8_t *data) {
  Power *pw = (Power *)d;
  int sleep = 0;
  for (unsigned i = 0; i < size; i++) {      /* byte by byte, as on a PC's I/O bus */
    unsigned byte;
    uint16_t *r = reg_at(pw, (uint16_t)(addr + i), &byte);
    if (!is_write) data[i] = r ? (uint8_t)(*r >> (8 * byte)) : 0xff;
    else if (r) sleep |= write_byte(pw, r, byte, data[i]);
  }
  pw->ctl |= SCI_EN;
  if (!sleep) return BUS_OK;
  pw->ctl &= (uint16_t)~SLP_EN;              /* SLP_EN reads as 0 */
  pw->sleeps++;
  if (((pw->ctl >> 10) & 7) != pw->s5) return BUS_OK;
  bc->why = "poweroff";
  return BUS_STOP;
}

static void power_stats(Device *d, lua_State *L) {
  kvm_add_count(L, "sleep_requests", ((Power *)d)->sleeps);
}

/* ---- snapshots ---- */

/* Version 1 of the power device's state, after the version word: the event
   and control blocks' ports and \_S5's SLP_TYP (u32 each: the guest's FADT
   and DSDT name them, so a snapshot with others is refused), then PM1a_STS,
   PM1a_EN and PM1a_CNT (u16 each). The sleep counter is vm:stats', not the
   machine's. */
#define POWER_SNAP_VERSION 1

static int power_save(Device *d, SnapBuf *b, char *err, size_t errlen) {
  Power *pw = (Power *)d;
  snapbuf_u32(b, POWER_SNAP_VERSION);
  snapbuf_u32(b, pw->evt);
  snapbuf_u32(b, pw->cnt);
  snapbuf_u32(b, (uint32_t)pw->s5);
  snapbuf_u16(b, pw->sts);
  snapbuf_u16(b, pw->en);
  snapbuf_u16(b, pw->ctl);
  return snapdev_saved(b, err, errlen);
}

static int power_restore(Device *d, const uint8_t *p, size_t n, int apply, char *err, size_t errlen) {
  Power *pw = (Power *)d;
  SnapRd r = { p, n, 0, 0 };
  if (snapdev_version(&r, POWER_SNAP_VERSION, err, errlen) < 0) return -1;
  uint32_t evt = snaprd_u32(&r), cnt = snaprd_u32(&r), s5 = snaprd_u32(&r);
  uint16_t sts = snaprd_u16(&r), en = snaprd_u16(&r), ctl = snaprd_u16(&r);
  if (snapdev_end(&r, err, errlen) < 0) return -1;
  if (evt != pw->evt || cnt != pw->cnt)
    return snapdev_fail(err, errlen, "PM1a blocks at 0x%x and 0x%x, these are at 0x%x and 0x%x",
                        evt, cnt, pw->evt, pw->cnt);
  if (s5 != (uint32_t)pw->s5)
    return snapdev_fail(err, errlen, "S5 sleep type %u, this device's is %d", s5, pw->s5);
  if (!(ctl & SCI_EN) || (ctl & SLP_EN))
    return snapdev_fail(err, errlen, "PM1a_CNT 0x%04x (SCI_EN always set, SLP_EN never)", ctl);
  if (!apply) return 0;
  pw->sts = sts;
  pw->en = en;
  pw->ctl = ctl;
  return 0;
}

static const DeviceOps power_ops = {
  .kind = "power",
  .access = power_access,
  .stats = power_stats,
  .save = power_save,
  .restore = power_restore,
};

static lua_Integer opt_int(lua_State *L, const char *k, lua_Integer dflt, lua_Integer max) {
  lua_getfield(L, 2, k);
  int ok = 1;
  lua_Integer v = lua_isnil(L, -1) ? dflt : lua_tointegerx(L, -1, &ok);
  if (!ok || v < 0 || v > max) luaL_error(L, "vm:power: '%s' must be an integer in 0..%d", k, (int)max);
  lua_pop(L, 1);
  return v;
}

/*** Claim the ACPI PM1a event block (4 ports at `evt`) and control block
(2 ports at `cnt`): the guest's S5 (`poweroff`) ends run() with reason
"poweroff". kvm.acpi's FADT names the same ports.
@function vm:power
@tparam[opt] table opts `evt` (default 0x600), `cnt` (default 0x604),
  `s5` (the SLP_TYP of \_S5, default 5)
@treturn kvm.vm the VM
*/
int l_vm_power(lua_State *L) {
  Vm *vm = kvm_checkvm(L, 1);
  kvm_opt_table(L, 2);
  uint16_t evt = (uint16_t)opt_int(L, "evt", 0x600, 0xfffc);
  uint16_t cnt = (uint16_t)opt_int(L, "cnt", 0x604, 0xfffe);
  lua_Integer s5 = opt_int(L, "s5", 5, 7);
  char buf[128];
  const char *clash = bus_clash(&vm->pio, 0, evt, evt + 3u, buf, sizeof buf);
  if (!clash) clash = bus_clash(&vm->pio, 0, cnt, cnt + 1u, buf, sizeof buf);
  if (!clash && evt <= cnt + 1u && cnt <= evt + 3u) clash = "the event and control blocks overlap";
  if (!clash && vm->ndevs >= KVM_MAX_DEVICES) clash = "too many devices";
  if (!clash && vm->pio.n + 2 > BUS_MAX_RANGES) clash = "too many port ranges";
  if (clash) return luaL_error(L, "vm:power: %s", clash);
  Power *pw = kvm_device_new(L, 1, sizeof(Power), &power_ops);
  pw->evt = evt;
  pw->cnt = cnt;
  pw->s5 = (int)s5;
  pw->ctl = SCI_EN;
  bus_claim(L, &vm->pio, 0, evt, evt + 3u, &pw->dev);
  bus_claim(L, &vm->pio, 0, cnt, cnt + 1u, &pw->dev);
  lua_pushvalue(L, 1);
  return 1;
}
